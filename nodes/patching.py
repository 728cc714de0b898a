"""Apply a decoded adapter file to ComfyUI's MODEL and CLIP (merge mode) and report what it did.

Patches go through `ModelPatcher.add_patches` on clones, so the inputs are never modified and
ComfyUI keeps its lazy patching, low-VRAM and unpatch behaviour.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import comfy.utils
import torch

from ..lycoris_core import AdapterFormatError, LayerGeometry
from ..lycoris_core.algos.tlora import current_timestep
from ..lycoris_core.matching import Coverage, TargetClaims, duplicate_line
from ..lycoris_core.reader import trainer_notes
from .bypass import BypassForward
from .key_map import build_key_map, is_text_encoder_module, resolve, target_key
from .patches import LAZY, diff_patch, embed_slice, lazy_patch


@dataclass
class LoadReport:
    """Coverage of one file on the model and on the text encoders."""

    coverage: Coverage
    skipped_text_encoder: list[str] = field(default_factory=list)
    bypass_dense: dict[str, int] = field(default_factory=dict)  # algo -> layers rebuilt every step
    bypassed: int = 0
    targets: dict[str, str] = field(default_factory=dict)  # module -> "model" | "clip"

    def count_bypass(self, adapter, geometry) -> None:
        self.bypassed += 1
        if adapter.bypass_is_dense(geometry):
            label = adapter.algo + ("+dora" if adapter.has_dora else "")
            self.bypass_dense[label] = self.bypass_dense.get(label, 0) + 1

    def text(self, adapter_file, strengths: str) -> str:
        c = self.coverage
        lines = [
            f"LyCORIS {adapter_file.name} ({strengths})",
            "algorithms: " + ", ".join(f"{k} x{v}" for k, v in adapter_file.algorithms().items())
            + "; ranks: " + (", ".join(map(str, adapter_file.ranks())) or "-"),
        ]
        lines.extend(trainer_notes(adapter_file.metadata, adapter_file.context.peft_config))
        on_model = sum(1 for v in self.targets.values() if v == "model")
        on_clip = sum(1 for v in self.targets.values() if v == "clip")
        lines.append(f"patched: {on_model} model layers, {on_clip} text-encoder layers")
        if self.bypassed:
            dense = ", ".join(f"{a} x{n}" for a, n in sorted(self.bypass_dense.items()))
            lines.append(f"bypass: {self.bypassed} layers run the adapter beside the layer"
                         + (f"; {sum(self.bypass_dense.values())} of them build a dense weight every step "
                            f"(no factored form: {dense})" if dense else ""))
        if self.skipped_text_encoder:
            lines.append(f"skipped: {len(self.skipped_text_encoder)} text-encoder modules (no CLIP input)")
        lines.extend(c.lines())
        return "\n".join(lines)


def apply_adapter_file(model, clip, adapter_file, strength_model: float, strength_clip: float, mode: str = "merge",
                       block_weight=None):
    """(new model, new clip, LoadReport). A side with strength 0 (or None input) is left as is.

    mode "merge": weight patches; "bypass": the adapters run in the forward of Linear/Conv
    layers (norm and embedding layers are still merged: they are tiny and not quantized).
    `block_weight(key) -> float` multiplies each layer's strength by its block's weight; a
    layer whose strength ends at 0 is left untouched (bit-identical).

    Raises AdapterFormatError when nothing of the file matches the model.
    """
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
    owners = {"model": model, "clip": clip}
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
                coverage.unmatched.append(module)
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
            base = weights[key] if offset is None else weights[key].narrow(*offset)
            adapter.check_weight(base.shape)
            bypass = active and mode == "bypass" and reorder is None
            layer = _bypassable_layer(owners[side], key, adapter) if bypass else None
            if layer is not None:
                bypassed[side].append((key[: -len(".weight")], adapter, strength, offset))
                report.count_bypass(adapter, LayerGeometry.of(layer))
            elif active:
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
            f"nothing in this file matches the connected model{'/clip' if clip is not None else ''} "
            f"(is it for another base model?); {detail}",
            path=adapter_file.path,
        )

    new_model = model.clone() if model is not None else None
    new_clip = clip.clone() if clip is not None else None
    for side, target_obj in (("model", new_model), ("clip", new_clip)):
        for strength, group in patches[side].items():
            if group:
                target_obj.add_patches(group, strength)
        for path, adapter, strength, offset in bypassed[side]:
            _add_bypass(_patcher(target_obj), path, adapter, strength, offset)
    if any(adapter.algo == "tlora" for _, adapter, _, _ in bypassed["model"]):
        _publish_timestep(new_model)
    return new_model, new_clip, report


def _publish_timestep(patcher) -> None:
    """T-LoRA's rank mask follows the sampling step: wrap the model call so the current timestep
    (the sampler hands ComfyUI a sigma) is published before every step, keeping any wrapper
    another node installed."""
    previous = patcher.model_options.get("model_function_wrapper")
    sampling = patcher.model.model_sampling

    def wrapper(apply_model, args):
        current_timestep.value = float(sampling.timestep(args["timestep"]).reshape(-1)[0])
        if previous is not None:
            return previous(apply_model, args)
        return apply_model(args["input"], args["timestep"], **args["c"])

    patcher.set_model_unet_function_wrapper(wrapper)


def _patcher(owner):
    """The ModelPatcher behind a MODEL (itself) or a CLIP (its `.patcher`)."""
    return getattr(owner, "patcher", owner)


def _bypassable_layer(owner, key: str, adapter):
    """The Linear/Conv module whose weight is `key`, or None when bypass cannot serve it (norms,
    embeddings, biases)."""
    if adapter.algo == "norm" or not key.endswith(".weight"):
        return None
    try:
        module = comfy.utils.get_attr(_patcher(owner).model, key[: -len(".weight")])
    except AttributeError:
        return None
    return module if isinstance(module, (torch.nn.Linear, torch.nn.modules.conv._ConvNd)) else None


def _add_bypass(patcher, path: str, adapter, strength: float, offset) -> None:
    name = f"{path}.forward"
    current = patcher.object_patches.get(name)
    if isinstance(current, BypassForward):
        patcher.add_object_patch(name, current.extended(adapter, strength, offset))
    else:
        module = comfy.utils.get_attr(patcher.model, path)
        patcher.add_object_patch(name, BypassForward(module, [(adapter, strength, offset)]))


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
