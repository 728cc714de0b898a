"""Apply a decoded adapter file to ComfyUI's MODEL and CLIP and report what it did.

Each layer is merged (a weight patch through `ModelPatcher.add_patches`, so ComfyUI keeps its lazy
patching, low-VRAM and unpatch behaviour, and requantizes quantized weights itself) or bypassed
(the adapter runs beside the layer, nodes/bypass.py), by the mode: "merge", "bypass", or "auto"
(bypass where the stored weight is quantized, merge where it is float). Always on clones: the
inputs are never modified. Layer shapes and kinds come from nodes/layers.py, never from
`state_dict()` shapes (packed for GGUF and nvfp4).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

from ..lycoris_core import AdapterFormatError
from ..lycoris_core.fit import MODEL_CONFIG_FAMILIES, cause, model_family, shortfall, trained_for
from ..lycoris_core.matching import Coverage, TargetClaims, duplicate_line
from ..lycoris_core.reader import trainer_notes
from .bypass import add_bypass
from .cast_patches import add_cast_patches, casts_in_forward
from .call_state import ScheduledStrength, check_schedule_runtime, publish_calls
from .key_map import build_key_map, is_text_encoder_module, resolve, target_key
from .layers import (forward_skipped, geometry, is_weight_layer, layer_list, logical_weight_shape, module_of,
                     precision, stored_format)
from .patches import LAZY, diff_patch, embed_slice, lazy_patch


@dataclass
class LoadReport:
    """Coverage of one file on the model and on the text encoders."""

    coverage: Coverage
    skipped_text_encoder: list[str] = field(default_factory=list)
    bypass_dense: dict[str, int] = field(default_factory=dict)  # algo -> layers rebuilt every step
    bypassed: int = 0
    bypassed_quantized: dict[str, int] = field(default_factory=dict)  # stored format -> layers bypassed
    not_bypassed: list[str] = field(default_factory=list)  # layers bypass was asked for but cannot serve
    forward_skipped: list[str] = field(default_factory=list)  # layers this ComfyUI computes without their forward
    merged_quantized: dict[str, int] = field(default_factory=dict)  # stored format -> layers merged into it
    targets: dict[str, str] = field(default_factory=dict)  # module -> "model" | "clip"
    scheduled: int = 0  # layers whose strength follows a schedule
    schedule: str = ""  # the schedule, in words
    bypass_bytes: int = 0  # the adapters' fp32 copies bypass keeps on each compute device
    bypass_transient: int = 0  # the largest transient weight a patched-form call makes
    shape_misfits: int = 0  # modules whose layer exists with another shape
    fit: str | None = None  # "warning: ...: an SDXL adapter on an SD1.5 model", when the file does not fit

    def count_bypass(self, adapter, layer_geometry, quantized: str | None) -> None:
        self.bypassed += 1
        self.bypass_bytes += sum(4 * t.numel() for t in adapter.tensors.values() if t.is_floating_point())
        weight = math.prod(layer_geometry.weight_shape or (0,))
        # the fp32 working copy and its cast back (DoRA also builds W + dW for its norms)
        self.bypass_transient = max(self.bypass_transient, weight * (4 + 2 + (4 if adapter.has_dora else 0)))
        if quantized:
            self.bypassed_quantized[quantized] = self.bypassed_quantized.get(quantized, 0) + 1
        if adapter.bypass_is_dense(layer_geometry):
            label = adapter.algo + ("+dora" if adapter.has_dora else "")
            self.bypass_dense[label] = self.bypass_dense.get(label, 0) + 1

    def text(self, adapter_file, strengths: str) -> str:
        c = self.coverage
        lines = [
            f"LyCORIS {adapter_file.name} ({strengths})",
            "algorithms: " + ", ".join(f"{k} x{v}" for k, v in adapter_file.algorithms().items())
            + "; ranks: " + (", ".join(map(str, adapter_file.ranks())) or "-"),
        ]
        if self.fit:
            lines.insert(1, self.fit)
        lines.extend(trainer_notes(adapter_file.metadata, adapter_file.context.peft_config) + adapter_file.notes)
        on_model = sum(1 for v in self.targets.values() if v == "model")
        on_clip = sum(1 for v in self.targets.values() if v == "clip")
        lines.append(f"patched: {on_model} model layers, {on_clip} text-encoder layers")
        if self.bypassed:
            dense = ", ".join(f"{a} x{n}" for a, n in sorted(self.bypass_dense.items()))
            lines.append(f"bypass: {self.bypassed} layers run the adapter beside the layer"
                         + (f"; {sum(self.bypass_dense.values())} of them build a dense weight every step "
                            f"(no factored form: {dense})" if dense else "")
                         + (f"; on quantized weights: {_counts(self.bypassed_quantized)}"
                            if self.bypassed_quantized else ""))
            lines.append(f"bypass memory: {_megabytes(self.bypass_bytes)} of adapter copies per compute device "
                         f"(freed when the model unloads) and up to {_megabytes(self.bypass_transient)} per layer "
                         "call, outside ComfyUI's memory estimate")
        if self.schedule:
            lines.append(f"schedule: {self.schedule}; {self.scheduled} layers follow it in bypass (the adapter "
                         "runs beside the layer, so its strength can change every step)")
        lines.extend(self.notes() + self.warnings())
        if self.skipped_text_encoder:
            lines.append(f"skipped: {len(self.skipped_text_encoder)} text-encoder modules (no CLIP input)")
        lines.extend(c.lines())
        return "\n".join(lines)

    def warnings(self) -> list[str]:
        """What the user may not expect: layers merged although bypass was asked for, and adapters
        rounded into quantized weights."""
        out = []
        if self.not_bypassed:
            shown = layer_list(self.not_bypassed)
            out.append(f"warning: {len(self.not_bypassed)} layers cannot be bypassed (not a Linear/Conv "
                       f"layer, a norm adapter, or rows ComfyUI reorders) and were merged instead"
                       + (" at full strength, unscheduled" if self.schedule else "") + f": {shown}")
        if self.forward_skipped:
            shown = layer_list(self.forward_skipped)
            out.append(f"warning: {len(self.forward_skipped)} layers are computed by this ComfyUI without their "
                       "forward (fused int8 / fp16-accumulation kernels), where a bypass would do nothing; they were "
                       "merged instead" + (" at full strength, unscheduled" if self.schedule else "") + f": {shown}")
        rounded = {f: n for f, n in self.merged_quantized.items() if not f.startswith("gguf")}
        if rounded:
            kept = "; ".join(f"{f} keeps {precision(f)}" for f in sorted(rounded))
            out.append(f"warning: merged into quantized weights ({_counts(rounded)}): ComfyUI requantizes "
                       f"each patched weight ({kept}), so a change smaller than a step is lost; use mode auto "
                       "or bypass to keep it exact")
        return out

    def notes(self) -> list[str]:
        """Facts about the merge that are not a loss."""
        gguf = {f: n for f, n in self.merged_quantized.items() if f.startswith("gguf")}
        if not gguf:
            return []
        return [f"merged into GGUF weights ({_counts(gguf)}): ComfyUI-GGUF applies the patch to the dequantised "
                "weight at every step (exact, with a dense patch per layer per step)"]


def _megabytes(n: int) -> str:
    return f"{n / 2**20:.1f} MB"


def _counts(counts: dict) -> str:
    return ", ".join(f"{name} x{n}" for name, n in sorted(counts.items()))


def apply_adapter_file(model, clip, adapter_file, strength_model: float, strength_clip: float, mode: str = "merge",
                       block_weight=None, schedule=None):
    """(new model, new clip, LoadReport). A side with strength 0 (or None input) is left as is.

    mode "merge": weight patches; "bypass": the adapters run in the forward of Linear/Conv-like
    layers of any op class (other layers are merged, and the report lists them); "auto": bypass
    on layers whose stored weight is quantized, merge on float ones.
    `block_weight(key) -> float` multiplies each layer's strength by its block's weight; a
    layer whose strength ends at 0 is left untouched (bit-identical).

    `schedule` (lycoris_core.schedule.Schedule): the model side's strength follows it call by call,
    so its layers run in bypass whatever the mode (text encoders run once per prompt: unscheduled).

    Raises AdapterFormatError when nothing of the file matches the model.
    """
    scheduling = schedule is not None and model is not None and strength_model != 0
    if scheduling:
        check_schedule_runtime(schedule)
    use_model = model is not None and strength_model != 0
    use_clip = clip is not None and strength_clip != 0
    key_map = build_key_map(model, clip)
    sides = {}
    if model is not None:
        sides["model"] = (model.model.state_dict(), float(strength_model), use_model)
    if clip is not None:
        sides["clip"] = (clip.cond_stage_model.state_dict(), float(strength_clip), use_clip)
    layer_count = sum(sum(1 for k in sd if k.endswith(".weight")) for sd, _, _ in sides.values())
    coverage = Coverage(
        source=adapter_file.name,
        unknown_keys=list(adapter_file.unknown_keys),
        problems=list(adapter_file.problems),
        model_layers=layer_count,
    )
    report = LoadReport(coverage)
    # side -> strength handed to add_patches -> {patch key: value}
    patches: dict[str, dict[float, dict]] = {"model": {}, "clip": {}}
    bypassed: dict[str, list] = {"model": [], "clip": []}  # (module path, adapter, strength, offset)
    cast_patched: dict[str, list] = {"model": [], "clip": []}  # (norm layer path, adapter, strength)
    roots = {side: _patcher(owner).model for side, owner in (("model", model), ("clip", clip)) if owner is not None}
    claims = TargetClaims()

    for module, adapter in adapter_file.adapters.items():
        target = resolve(module, key_map)
        side = None
        if target is not None:
            side = next((s for s, (sd, _, _) in sides.items() if target_key(target) in sd), None)
        if side is None:
            if clip is None and is_text_encoder_module(module):
                report.skipped_text_encoder.append(module)
            else:
                coverage.add_unmatched(module)
            continue
        weights, strength, active = sides[side]
        key = target_key(target)
        if block_weight is not None:
            strength *= block_weight(key)
            active = active and strength != 0
        offset = None if isinstance(target, str) else target[1]
        # ComfyUI's own maps reorder some rows with a function (Flux/SD3 `norm_out.linear`: scale and
        # shift swapped); only its weight patches apply that, so such a layer is merged, never bypassed.
        reorder = target[2] if isinstance(target, tuple) and len(target) > 2 else None
        rows = (offset[1], offset[2]) if offset is not None and offset[0] == 0 else None
        applied = claims.conflict(key, rows)
        if applied is not None:
            coverage.duplicates.append(duplicate_line(module, key, applied, rows))
            continue
        try:
            layer = module_of(roots[side], key) if key.endswith(".weight") else None
            shape = list(logical_weight_shape(layer) or weights[key].shape)
            if offset is not None:
                shape[offset[0]] = offset[2]
            adapter.check_weight(tuple(shape))
            quantized = stored_format(layer) if layer is not None else None
            scheduled = scheduling and side == "model"
            wants_bypass = active and (scheduled or mode == "bypass" or (mode == "auto" and quantized is not None))
            if wants_bypass and layer is not None and forward_skipped(layer, quantized):
                report.forward_skipped.append(key)  # its forward never runs here: merged, as bypass would do nothing
                wants_bypass = False
            norm_beside = adapter.algo == "norm" and not scheduled and casts_in_forward(layer)
            if wants_bypass and norm_beside and reorder is None:
                # a norm layer's adapter: applied by the layer's own cast, as bypass keeps Linear/Conv
                cast_patched[side].append((key[: -len(".weight")], adapter, strength))
                report.count_bypass(adapter, geometry(layer), quantized)
            elif wants_bypass and reorder is None and _bypassable(layer, adapter):
                value = ScheduledStrength(strength, schedule) if scheduled else strength
                bypassed[side].append((key[: -len(".weight")], adapter, value, offset))
                report.scheduled += scheduled
                report.count_bypass(adapter, geometry(layer), quantized)
            elif active:
                if wants_bypass and key.endswith(".weight"):  # a bare parameter (diff_m) has no forward
                    report.not_bypassed.append(key)
                if quantized is not None:
                    report.merged_quantized[quantized] = report.merged_quantized.get(quantized, 0) + 1
                base = None if LAZY else weights[key] if offset is None else weights[key].narrow(*offset)
                _add(patches[side], adapter, target, key, offset, base, weights, strength, bias=False)
                bias_key = key[: -len("weight")] + "bias" if key.endswith(".weight") else None
                if adapter.changes_bias() and bias_key in weights:
                    bias_offset = None if offset is None else (0, offset[1], offset[2])
                    bias_base = weights[bias_key] if offset is None else weights[bias_key].narrow(*bias_offset)
                    bias_target = (bias_key if offset is None and reorder is None
                                   else (bias_key, bias_offset) + ((reorder,) if reorder else ()))
                    _add(patches[side], adapter, bias_target, bias_key, bias_offset, bias_base, weights, strength,
                         bias=True)
        except AdapterFormatError as error:
            coverage.problems.append(str(error))
            report.shape_misfits += 1
            continue
        except (RuntimeError, ValueError, IndexError) as error:  # e.g. a slice the layer does not have
            coverage.problems.append(str(adapter.error(f"cannot patch {key} at {offset}: {error}")))
            continue
        claims.add(module, key, rows)
        coverage.matched[module] = key
        report.targets[module] = side

    if not coverage.matched:
        detail = f"first unmatched module: {coverage.unmatched[0]}" if coverage.unmatched else (
            coverage.problems[0] if coverage.problems else "it has no module for the connected inputs")
        raise AdapterFormatError(
            f"nothing in this file matches the connected model{'/clip' if clip is not None else ''}: "
            f"{_fit_reason(adapter_file, model, report)}; {detail}",
            path=adapter_file.path,
        )
    on_model = sum(1 for v in report.targets.values() if v == "model")
    short = shortfall(
        landed_model=on_model, landed_text_encoder=len(report.targets) - on_model,
        offered=len(coverage.matched) + len(coverage.unmatched) + len(coverage.problems) + len(coverage.duplicates),
        file_model_modules=sum(1 for m in adapter_file.adapters if not is_text_encoder_module(m)),
        model_asked=use_model)
    if short:
        report.fit = f"warning: {short}: {_fit_reason(adapter_file, model, report)}"
        logging.warning("LyCORIS %s: %s", adapter_file.name, report.fit)

    new_model = model.clone() if model is not None else None
    new_clip = clip.clone() if clip is not None else None
    for side, target_obj in (("model", new_model), ("clip", new_clip)):
        for strength, group in patches[side].items():
            if group:
                target_obj.add_patches(group, strength)
        if bypassed[side]:
            plans = add_bypass(_patcher(target_obj), bypassed[side])
            if side == "model":  # each call's strengths and timestep, written before the call
                publish_calls(target_obj, plans)
        if cast_patched[side]:
            add_cast_patches(_patcher(target_obj), cast_patched[side])
    for line in report.warnings():
        logging.warning("LyCORIS %s: %s", adapter_file.name, line)
    if report.scheduled:
        report.schedule = schedule.describe()
    return new_model, new_clip, report


def model_label(model) -> tuple[str | None, str]:
    """(family key, ComfyUI's name for it) of a MODEL: its model config class (SD15, SDXL, Flux, ...)."""
    if model is None:
        return None, "connected"
    config = getattr(model.model, "model_config", None)
    name = type(config).__name__ if config is not None else type(model.model).__name__
    keys = () if name in MODEL_CONFIG_FAMILIES else tuple(model.model.state_dict().keys())
    return model_family(name, keys), name


def _fit_reason(adapter_file, model, report) -> str:
    """Why modules of the file did not land on this model, in words."""
    family, label = model_label(model)
    coverage = report.coverage
    return cause(trained_for(adapter_file.metadata, adapter_file.adapters), family, label,
                 report.shape_misfits, len(coverage.unmatched))


def _patcher(owner):
    """The ModelPatcher behind a MODEL (itself) or a CLIP (its `.patcher`)."""
    return getattr(owner, "patcher", owner)


def _bypassable(layer, adapter) -> bool:
    """Whether bypass can serve this adapter on this layer: a Linear/Conv-like layer of any op
    class (norms, embeddings and norm-layer adapters are merged)."""
    return layer is not None and adapter.algo != "norm" and is_weight_layer(layer)


def _add(groups: dict, adapter, target, key, offset, base, weights, strength, bias: bool) -> None:
    """Put one patch into `groups` (strength -> {target: value})."""
    if LAZY:
        groups.setdefault(strength, {})[target] = lazy_patch(adapter, bias=bias)
        return
    value, hand_strength = diff_patch(adapter, base, strength, bias=bias)
    if offset is not None:  # old runtimes take no slices: embed the slice's diff in the full shape
        value = (embed_slice(value[0], weights[key].shape, offset),)
    group = groups.setdefault(hand_strength, {})
    if key in group:  # several slices of one fused weight: sum their diffs
        group[key] = (group[key][0] + value[0],)
    else:
        group[key] = value
