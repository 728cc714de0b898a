"""Bake adapters into weights: in memory (state dicts) or streamed file to file.

Each layer is patched in fp32 by every adapter in turn, checked for NaN/Inf and cast once.
The streamed path holds one layer at a time, so merging into a multi-GB checkpoint needs
about one layer of extra memory, and its output appears atomically or not at all.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable

import torch

from .errors import AdapterFormatError
from .matching import Coverage, match_generic
from .reader import AdapterFile

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# weight key -> [(adapter, strength, coverage, rows)]; rows: (part, parts) of a fused weight, or None
Patches = dict[str, list[tuple[object, float, object, tuple[int, int] | None]]]


def plan(adapters: Iterable[tuple[AdapterFile, float]], model_keys, match=match_generic,
         block_weight: Callable[[str], float] | None = None) -> tuple[Patches, list[Coverage]]:
    """Which adapter patches which weight, in the order given, plus a coverage per file.
    `match(adapter_file, keys) -> Coverage` maps module names to weight keys. `block_weight(key)`
    multiplies the strength per weight key (per-block strength); a layer whose strength comes out
    0 gets no patch at all, so it stays bit-identical."""
    keys = list(model_keys)
    patches: Patches = {}
    coverages = []
    for adapter_file, strength in adapters:
        coverage = match(adapter_file, keys)
        coverages.append(coverage)
        rows = getattr(coverage, "rows", {})
        for module, weight_key in coverage.matched.items():
            layer_strength = float(strength) * (1.0 if block_weight is None else float(block_weight(weight_key)))
            if layer_strength != 0.0:
                patches.setdefault(weight_key, []).append(
                    (adapter_file.adapters[module], layer_strength, coverage, rows.get(module)))
    return patches, coverages


def part_rows(rows: tuple[int, int] | None, height: int) -> slice:
    """The rows of a layer of `height` rows that part `rows` = (part, parts) patches."""
    if rows is None:
        return slice(None)
    part, parts = rows
    if height % parts:
        raise ValueError(f"{height} rows do not split into {parts} equal parts")
    size = height // parts
    return slice(part * size, (part + 1) * size)


def part_shape(rows: tuple[int, int] | None, shape) -> tuple[int, ...]:
    """The shape of the part of a weight of `shape` that `rows` patches."""
    shape = tuple(shape)
    if rows is None:
        return shape
    return (len(range(*part_rows(rows, shape[0]).indices(shape[0]))),) + shape[1:]


def check_shapes(patches: Patches, shape_of: Callable[[str], tuple]) -> None:
    """Drop, before anything is written, the patches whose adapter does not fit its layer's shape
    (an adapter for another model: same names, other widths); each goes to its file's problems."""
    for weight_key in list(patches):
        kept = []
        for entry in patches[weight_key]:
            adapter, _, coverage, rows = entry
            try:
                adapter.check_weight(part_shape(rows, shape_of(weight_key)))
            except (AdapterFormatError, ValueError) as error:
                coverage.problems.append(str(error) if isinstance(error, AdapterFormatError)
                                         else str(adapter.error(f"cannot patch {weight_key}: {error}")))
                coverage.matched.pop(adapter.name, None)
                continue
            kept.append(entry)
        if kept:
            patches[weight_key] = kept
        else:
            del patches[weight_key]


def nothing_applied(coverage: Coverage, base_path) -> AdapterFormatError:
    """The error for an adapter of which no module fits the model: what was tried, and why not."""
    why = []
    if coverage.unmatched:
        why.append(f"{len(coverage.unmatched)} modules name no layer of it (e.g. {coverage.unmatched[0]})")
    if coverage.problems:
        why.append(f"{len(coverage.problems)} do not fit their layer's shape (e.g. {coverage.problems[0]})")
    if coverage.duplicates:
        why.append(f"{len(coverage.duplicates)} duplicates")
    return AdapterFormatError(
        f"nothing applied: no module of {coverage.source} fits a layer of {base_path} "
        f"({'; '.join(why) or 'the adapter has no modules'}); is the adapter for another base model? "
        "nothing was written")


def patch_layer(weight_key: str, weight, bias, layer_patches, inplace: bool = False):
    """Apply `layer_patches` to one layer in fp32. A patch whose shape does not fit is skipped
    and reported on its file's coverage; the layer keeps the other patches. `inplace`: the
    caller owns `weight`, which may be overwritten. A patch on part of a fused weight (`rows`)
    patches those rows only."""
    w = weight.to(torch.float32)
    b = None if bias is None else bias.to(torch.float32)
    owned = inplace or w.data_ptr() != weight.data_ptr()
    owned_b = inplace or b is None or b.data_ptr() != bias.data_ptr()
    applied = False
    for entry in layer_patches:
        adapter, strength, coverage = entry[:3]
        rows = entry[3] if len(entry) > 3 else None
        try:
            if rows is None:
                w_new, b_new = adapter.patch(w, strength, b, inplace=owned)
            else:
                part = part_rows(rows, w.shape[0])
                w_part, b_part = adapter.patch(w[part], strength, None if b is None else b[part], inplace=False)
        except AdapterFormatError as error:
            coverage.problems.append(str(error))
            coverage.matched.pop(adapter.name, None)
            continue
        except (RuntimeError, ValueError, IndexError) as error:  # factors that do not fit this layer
            coverage.problems.append(str(adapter.error(f"cannot patch {weight_key} {list(weight.shape)}: {error}")))
            coverage.matched.pop(adapter.name, None)
            continue
        if rows is not None:
            if not _finite(w_part) or (b_part is not None and not _finite(b_part)):
                raise adapter.error(f"patching {weight_key} gives NaN or Inf values; nothing was written")
            if not owned:
                w, owned = w.clone(), True
            w[part] = w_part
            if b_part is not None and b is not None:
                if not owned_b:
                    b, owned_b = b.clone(), True
                b[part] = b_part
            applied = True
            continue
        if not _finite(w_new) or (b_new is not None and not _finite(b_new)):
            raise adapter.error(f"patching {weight_key} gives NaN or Inf values; nothing was written")
        w, b, applied = w_new, (b_new if b_new is not None else b), True
        owned = owned_b = True
    return w, b, applied


def _finite(tensor: torch.Tensor) -> bool:
    """No NaN/Inf anywhere: any of them makes the sum non-finite (one reduction, no bool copy)."""
    return math.isfinite(float(tensor.sum()))


def _bias_key(weight_key: str) -> str:
    return weight_key[: -len("weight")] + "bias"


def _cast(tensor: torch.Tensor, like: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    if dtype is not None and like.is_floating_point():
        return tensor.to(dtype)
    return tensor.to(like.dtype)


def merge_into_state_dict(state_dict: dict, adapters, dtype: torch.dtype | None = None, inplace: bool = False):
    """(new state dict, coverages). The input dict and its tensors are never modified unless
    `inplace` (the caller owns the tensors); untouched tensors are shared, or cast when `dtype`
    is given."""
    patches, coverages = plan(adapters, state_dict.keys())
    merged = {key: _cast(tensor, tensor, dtype) for key, tensor in state_dict.items()}  # same object if no cast
    for weight_key, layer_patches in patches.items():
        bias_key = _bias_key(weight_key)
        weight, bias = state_dict[weight_key], state_dict.get(bias_key)
        w, b, applied = patch_layer(weight_key, weight, bias, layer_patches, inplace)
        if not applied:
            continue
        merged[weight_key] = _cast(w, weight, dtype)
        if bias is not None:
            merged[bias_key] = _cast(b, bias, dtype)
    return merged, coverages


def _is_text_encoder(module: str) -> bool:
    return module.startswith(("lora_te", "text_encoder"))


def _refuse_if_nothing_applied(adapters, coverages, base_path) -> None:
    """Raise when an adapter applies to nothing, or has diffusion-model modules of which none
    applies (an SDXL adapter on SD1.5 whose CLIP-L part fits: the file would be a useless copy)."""
    for (adapter_file, _), coverage in zip(adapters, coverages):
        if not coverage.matched:
            raise nothing_applied(coverage, base_path)
        model_modules = [m for m in adapter_file.adapters if not _is_text_encoder(m)]
        if model_modules and all(_is_text_encoder(m) for m in coverage.matched):
            example = next((m for m in coverage.unmatched if not _is_text_encoder(m)), None) or (
                coverage.problems[0] if coverage.problems else model_modules[0])
            raise AdapterFormatError(
                f"nothing of {coverage.source} applies to the diffusion model of {base_path}: none of its "
                f"{len(model_modules)} model modules fits (e.g. {example}), only {len(coverage.matched)} "
                "text-encoder modules do; is the adapter for another base model? nothing was written")


def merge_files(base_path, adapters, out_path, dtype: torch.dtype | None = None,
                progress: Callable[[int, int], None] | None = None, match=match_generic,
                block_weight: Callable[[str], float] | None = None) -> list[Coverage]:
    """Stream `base_path` to `out_path` with `adapters` ([(AdapterFile, strength)]) baked in.
    `match` maps module names to the file's keys (default: generic name matching);
    `block_weight(key)` scales the strength per weight key (see `plan`)."""
    from .safe_io import SafetensorsReader, write_tensors_streamed

    adapters = list(adapters)
    with SafetensorsReader(base_path) as reader:
        keys = reader.keys()
        patches, coverages = plan(adapters, keys, match, block_weight)
        check_shapes(patches, reader.shape)
        _refuse_if_nothing_applied(adapters, coverages, base_path)
        key_set = set(keys)
        layer_of = {k: k for k in patches}
        layer_of.update({_bias_key(k): k for k in patches if _bias_key(k) in key_set})
        out_dtypes = {}
        for key in keys:
            stored = reader.dtype(key)
            out_dtypes[key] = dtype if dtype is not None and stored.is_floating_point else stored
        specs = [(key, out_dtypes[key], reader.shape(key)) for key in keys]
        pending: dict[str, torch.Tensor] = {}
        done = [0]

        def produce(key: str) -> torch.Tensor:
            done[0] += 1
            if progress is not None:
                progress(done[0], len(keys))
            if key in pending:
                return pending.pop(key).to(out_dtypes[key])
            layer = layer_of.get(key)
            if layer is None:
                return reader.tensor(key).to(out_dtypes[key])
            # weight and bias of a patched layer are computed together; the later one waits in `pending`
            weight, bias_key = reader.tensor(layer), _bias_key(layer)
            bias = reader.tensor(bias_key) if bias_key in key_set else None
            w, b, applied = patch_layer(layer, weight, bias, patches[layer], inplace=True)
            results = {layer: w if applied else weight}
            if bias is not None:
                results[bias_key] = b if applied else bias
            value = results.pop(key)
            pending.update(results)
            return value.to(out_dtypes[key])

        def produce_checked(key: str) -> torch.Tensor:
            value = produce(key)
            if done[0] == len(keys):  # the last tensor: a file whose patches all failed is not kept
                _refuse_if_nothing_applied(adapters, coverages, base_path)
            return value

        write_tensors_streamed(out_path, specs, produce_checked, metadata=reader.metadata)
    return coverages
