"""Slice a DyLoRA file to a lower rank: keep the first r' components, set alpha by a stated policy.

Why a policy: a DyLoRA is rank-ordered (any prefix works), but the scale each trainer used at a
given rank is not what a loader computes from a sliced file (loaders use alpha / r). With r the
file's rank, r' the slice, alpha the stored alpha (reference lycoris-format 3.10, utilities 5):

- ``sds-train``: sd-scripts `networks.dylora` trained the block ending at r' with the scale
  (alpha / r) * sqrt(r / r') = alpha / sqrt(r r'); a loader applies alpha' / r', so
  alpha' = alpha * sqrt(r' / r).
- ``lycoris-train``: LyCORIS `algo=dylora` scales a run over k blocks of `block_size` by
  alpha / k (blocks, not ranks). Its sampler calls `get_weight(b * block_size)`, which uses
  b + 1 blocks (the off-by-one of `get_weight`: ceil(rank / bs) blocks *plus one*), so a run over
  r' = k * bs ranks has scale alpha / k = alpha * bs / r', i.e. alpha' = alpha * block_size.
- ``kohya-extractor`` (= the paper's alpha / r'): alpha kept, as sd-scripts'
  `extract_lora_from_dylora.py` writes it.
- ``webui-dyn``: the full file's scale alpha / r kept (sd-webui `dyn=`): alpha' = alpha * r' / r.
- ``trainer`` (default): `sds-train` for `ss_network_module = networks.dylora`, `lycoris-train`
  for `ss_network_args.algo = dylora`; refused for files that say neither.

r' must be a multiple of the trainer's step (`unit` / `block_size` from the metadata).
"""

from __future__ import annotations

import json
import math
from typing import Callable

import torch

from .algos.base import flat
from .extract import UtilityResult
from .keys import join_key
from .reader import AdapterFile, load_adapter_file, network_args
from .svd import LayerReport, error_summary, frobenius_of_product, parse_dtype, product_error

TOOL = "lycoris_core.slice"
POLICIES = ("trainer", "sds-train", "lycoris-train", "kohya-extractor", "webui-dyn")
UP, DOWN = "lora_up.weight", "lora_down.weight"


def dylora_trainer(metadata: dict) -> tuple[str | None, int | None]:
    """(trainer, rank step) from the metadata: ("sd-scripts", unit), ("lycoris", block_size) or
    (None, None). sd-scripts' `unit` defaults to 1, LyCORIS's `block_size` to 4."""
    args = network_args(metadata)
    if metadata.get("ss_network_module") == "networks.dylora":
        return "sd-scripts", _int(args.get("unit"), 1)
    if str(args.get("algo", "")).lower() == "dylora":
        return "lycoris", _int(args.get("block_size"), 4)
    return None, None


def _int(value, default):
    try:
        return int(float(value))
    except (TypeError, ValueError):
        return default


def new_alpha(policy: str, alpha: float, rank: int, new_rank: int, block_size: int = 4) -> float:
    """alpha' for slicing a module of rank `rank` and alpha `alpha` to `new_rank` (module docstring)."""
    if policy == "sds-train":
        return alpha * math.sqrt(new_rank / rank)
    if policy == "lycoris-train":
        return alpha * block_size
    if policy == "kohya-extractor":
        return alpha
    if policy == "webui-dyn":
        return alpha * new_rank / rank
    raise ValueError(f"unknown alpha policy '{policy}' (choose from {', '.join(POLICIES)})")


def slice_dylora(
    adapter_file,
    rank: int,
    out_path=None,
    *,
    alpha_policy: str = "trainer",
    unit: int | None = None,
    dtype=None,
    progress: Callable[[int, int], None] | None = None,
) -> UtilityResult:
    """Keep `lora_down[:rank]` / `lora_up[:, :rank]` of every LoRA module of a DyLoRA file.

    `alpha_policy`: see the module docstring; `unit` overrides the rank step read from the
    metadata. Each layer reports the relative difference between what a loader computes from
    the sliced module and from the full one (scale changes included) and the share of the full
    delta's energy the kept components carry. Other modules are copied unchanged.
    """
    source = adapter_file if isinstance(adapter_file, AdapterFile) else load_adapter_file(adapter_file)
    if alpha_policy not in POLICIES:
        raise ValueError(f"unknown alpha policy '{alpha_policy}' (choose from {', '.join(POLICIES)})")
    trainer, step = dylora_trainer(source.metadata)
    policy = alpha_policy
    if policy == "trainer":
        if trainer is None:
            raise ValueError(
                f"{source.name}: the metadata does not say which trainer made this DyLoRA "
                "(no ss_network_module=networks.dylora nor ss_network_args algo=dylora); "
                "choose an alpha policy explicitly")
        policy = "sds-train" if trainer == "sd-scripts" else "lycoris-train"
    if unit is not None:
        step = int(unit)
    step = step or 1
    if rank < 1 or int(rank) != rank:
        raise ValueError(f"the slice rank must be a whole number >= 1, got {rank}")
    if rank % step:
        raise ValueError(f"rank {rank} is not a multiple of the DyLoRA rank step {step} "
                         f"({'unit' if trainer == 'sd-scripts' else 'block_size'} from the metadata); "
                         f"choose one of {step}, {2 * step}, {3 * step}, ...")
    block_size = step
    out_dtype = parse_dtype(dtype)

    tensors: dict[str, torch.Tensor] = {}
    layers: list[LayerReport] = []
    skipped: list[tuple[str, str]] = []
    alphas = set()
    names = list(source.adapters)
    for index, name in enumerate(names):
        if progress is not None:
            progress(index, len(names))
        adapter = source.adapters[name]
        if adapter.algo != "lora" or "lora_mid.weight" in adapter.tensors or "bias_indices" in adapter.tensors:
            for suffix, tensor in adapter.tensors.items():
                tensors[join_key(name, suffix)] = tensor
            skipped.append((name, f"{adapter.algo} module (not a plain LoRA) copied unchanged"))
            continue
        r = adapter.rank
        k = min(rank, r)
        alpha = adapter.alpha if adapter.alpha is not None else float(r)
        alpha2 = new_alpha(policy, alpha, r, k, block_size)
        up, down = adapter.tensors[UP], adapter.tensors[DOWN]
        new_up, new_down = up[:, :k].contiguous(), down[:k].contiguous()
        if out_dtype is not None:
            new_up, new_down = new_up.to(out_dtype), new_down.to(out_dtype)
        for suffix, tensor in adapter.tensors.items():
            if suffix not in (UP, DOWN, "alpha"):
                tensors[join_key(name, suffix)] = tensor
        tensors[f"{name}.{UP}"] = new_up
        tensors[f"{name}.{DOWN}"] = new_down
        tensors[f"{name}.alpha"] = torch.tensor(alpha2, dtype=torch.float32)
        alphas.add(round(alpha2, 6))
        # what a loader computes: (alpha / r) up down for the input, (alpha' / k) up' down' for the output
        full_up, full_down = flat(adapter.t(UP)) * adapter.scale, flat(adapter.t(DOWN))
        new_scale = float(tensors[f"{name}.alpha"]) / k
        err, norm = product_error(full_up, full_down, flat(new_up.float()) * new_scale, flat(new_down.float()))
        kept_norm = frobenius_of_product(full_up[:, :k], full_down[:k])
        kept = (kept_norm / norm) ** 2 if norm > 0 else 1.0
        layers.append(LayerReport(name, name, tuple(adapter.expected_shape() or ()), k,
                                  err / norm if norm > 0 else 0.0, kept, norm, f"slice {r} -> {k}", alpha2))
    if progress is not None:
        progress(len(names), len(names))
    if not layers:
        raise ValueError(f"{source.name}: no LoRA module to slice")

    meta = dict(source.metadata)
    meta.pop("sshs_model_hash", None)
    meta.pop("sshs_legacy_hash", None)
    meta.update({
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(next(iter(alphas))) if len(alphas) == 1 else "Dynamic",
        "lycoris_pack.tool": TOOL,
        "lycoris_pack.source": source.name,
        "lycoris_pack.rank": str(rank),
        "lycoris_pack.alpha_policy": policy,
        "lycoris_pack.trainer": trainer or "unknown",
        "lycoris_pack.rank_step": str(step),
        "lycoris_pack.errors": json.dumps(error_summary(layers)),
    })
    result = UtilityResult(tensors, meta, layers, skipped)
    if out_path is not None:
        result.save(out_path)
    return result
