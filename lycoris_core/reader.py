"""Decode an adapter file into per-layer `Adapter`s, keeping what it could not interpret.

Every key ends up in exactly one place: a decoded adapter, the list of keys not understood, or
a per-module problem (inconsistent shapes). Nothing is dropped silently.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field

import torch

from .algos import FAMILIES, MODIFIERS, Adapter, DecodeContext, known_suffixes
from .errors import AdapterFormatError
from .keys import pattern_matches, split_key


@dataclass
class AdapterFile:
    """One decoded adapter file."""

    path: str
    metadata: dict
    adapters: dict[str, Adapter]
    unknown_keys: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    context: DecodeContext = field(default_factory=DecodeContext)
    notes: list[str] = field(default_factory=list)  # how the file was read where it left a choice

    @property
    def name(self) -> str:
        return os.path.basename(self.path)

    def algorithms(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for adapter in self.adapters.values():
            label = adapter.algo + ("+dora" if adapter.describe().get("dora") else "")
            counts[label] = counts.get(label, 0) + 1
        return dict(sorted(counts.items()))

    def ranks(self) -> list[int]:
        return sorted({a.rank for a in self.adapters.values() if a.rank is not None})


def network_args(metadata: dict) -> dict:
    """`ss_network_args` (a JSON object of strings) as a dict; {} when absent or malformed."""
    raw = metadata.get("ss_network_args")
    if not raw:
        return {}
    try:
        args = json.loads(raw)
    except (TypeError, ValueError):
        return {}
    return args if isinstance(args, dict) else {}


def trainer_notes(metadata: dict, peft_config: dict | None = None) -> list[str]:
    """What the trainer recorded that changes how the file reads, one line each: SimpleTuner's
    `lycoris_config` (algorithm, factor, dims) and `trained_words`, the PEFT rank and alpha read from
    `lora_adapter_metadata` (diffusers scripts write no `.alpha` tensor)."""
    notes = []
    config = _json_object(metadata.get("lycoris_config"))
    if config:
        shown = ("algo", "factor", "linear_dim", "linear_alpha", "conv_dim", "conv_alpha", "full_matrix",
                 "bypass_mode", "apply_preset")
        notes.append("LyCORIS config: " + ", ".join(f"{k}={json.dumps(config[k])}" for k in shown if k in config))
    words = metadata.get("trained_words")
    if isinstance(words, str) and words.strip():
        notes.append("trained words: " + ", ".join(w.strip() for w in words.split(",") if w.strip()))
    if peft_config is not None and "lora_adapter_metadata" in metadata:
        notes.append(f"PEFT config from lora_adapter_metadata: r={peft_config.get('r')}, "
                     f"lora_alpha={peft_config.get('lora_alpha')}"
                     + (", rslora" if peft_config.get("use_rslora") else ""))
    return notes


def _json_object(raw) -> dict:
    if not isinstance(raw, str) or not raw:
        return {}
    try:
        value = json.loads(raw)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _group(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, dict[str, torch.Tensor]], list[str]]:
    suffixes = known_suffixes()
    modules: dict[str, dict[str, torch.Tensor]] = {}
    unknown = []
    for key, tensor in tensors.items():
        split = split_key(key, suffixes)
        if split is None:
            unknown.append(key)
            continue
        module, suffix = split
        modules.setdefault(module, {})[suffix] = tensor
    return modules, unknown


def _convention(names, metadata: dict, peft_config) -> str:
    if peft_config is not None or "lora_adapter_metadata" in metadata:
        return "peft"
    if any(name.startswith("base_model.model.") for name in names):
        return "peft"
    return "lycoris"


def decode_tensors(
    tensors: dict[str, torch.Tensor],
    metadata: dict | None = None,
    path: str = "<memory>",
    peft_config: dict | None = None,
) -> AdapterFile:
    """Decode a state dict (any dialect) into an `AdapterFile`.

    Raises `AdapterFormatError` when the file holds no adapter at all; modules with
    inconsistent shapes are listed in `problems` and left out.
    """
    metadata = dict(metadata or {})
    modules, unknown = _group(tensors)
    if peft_config is None:
        peft_config = _diffusers_config(metadata)
    context = DecodeContext(
        path=str(path),
        metadata=metadata,
        convention=_convention(modules, metadata, peft_config),
        peft_config=peft_config,
        network_args=network_args(metadata),
    )
    adapters: dict[str, Adapter] = {}
    problems: list[str] = []
    for module, parts in modules.items():
        family = next((f for f in FAMILIES if f.detect(parts)), None)
        if family is None:
            unknown.extend(f"{module}.{suffix}" for suffix in parts)
            continue
        owned = set(family.owned()) | set(MODIFIERS)
        leftovers = [s for s in parts if s not in owned]
        unknown.extend(f"{module}.{suffix}" for suffix in leftovers)
        try:
            adapter = family(module, {s: t for s, t in parts.items() if s in owned}, context)
            if context.convention == "peft" and peft_config is not None:
                adapter.scale_override = _peft_scale(adapter, peft_config)
        except AdapterFormatError as error:
            problems.append(str(error))
            continue
        except (IndexError, RuntimeError, ValueError, TypeError) as error:  # shapes no family check foresaw
            problems.append(str(AdapterFormatError(f"{family.algo} tensors do not fit together ({error})",
                                                   path=str(path), key=module)))
            continue
        adapters[module] = adapter
    if not adapters:
        detail = f"{len(problems)} module(s) with bad shapes, first: {problems[0]}" if problems else (
            f"none of its {len(tensors)} keys is an adapter key"
            + (f" (e.g. '{unknown[0]}')" if unknown else "")
        )
        raise AdapterFormatError(f"not a LoRA/LyCORIS adapter file: {detail}", path=str(path))
    return AdapterFile(str(path), metadata, adapters, sorted(unknown), problems, context,
                       missing_config_notes(adapters, context))


def missing_config_notes(adapters: dict[str, Adapter], context: DecodeContext) -> list[str]:
    """PEFT files keep alpha, rs-LoRA, rank/alpha patterns, OFT's Cayley settings and IA3's
    feed-forward modules only in adapter_config.json; without it, say in one line what was assumed."""
    if context.convention != "peft" or context.peft_config is not None:
        return []
    algos = {}
    for adapter in adapters.values():
        algos.setdefault(adapter.algo, []).append(adapter)
    assumed = []
    unscaled = [a for name in ("lora", "loha", "lokr") for a in algos.get(name, []) if a.alpha is None]
    if unscaled:
        assumed.append(f"alpha taken as rank (scale 1) on {len(unscaled)} LoRA/LoHa/LoKr layers "
                       "(lora_alpha, use_rslora, rank/alpha patterns are only in the config)")
    if "oft" in algos:
        assumed.append("OFT rotations with PEFT's defaults (Cayley-Neumann series, 5 terms, no COFT)")
    if "ia3" in algos:
        assumed.append("IA3 feed-forward layers read from the tensor shapes (a conv with as many inputs as "
                       "outputs taken as not feed-forward)")
    if not assumed:
        return []
    where = os.path.basename(context.path) if context.path != "<memory>" else "the file"
    return [f"no adapter_config.json beside {where}: " + "; ".join(assumed) + "; put the config beside it"]


def load_adapter_file(path, *, allow_pickle_weights_only: bool = False) -> AdapterFile:
    """Read and decode an adapter file. A PEFT `adapter_config.json` beside it is honoured."""
    from .safe_io import load_tensors  # imported here: safe_io is the only place that touches bytes

    path = str(path)
    tensors, metadata = load_tensors(path, allow_pickle_weights_only=allow_pickle_weights_only)
    adapter_file = decode_tensors(tensors, metadata, path=path, peft_config=_peft_config_beside(path))
    for note in adapter_file.notes:
        logging.getLogger(__name__).warning("%s: %s", path, note)
    return adapter_file


def _peft_config_beside(path: str) -> dict | None:
    candidate = os.path.join(os.path.dirname(os.path.abspath(path)), "adapter_config.json")
    if not os.path.isfile(candidate):
        return None
    try:
        with open(candidate, encoding="utf-8") as handle:
            config = json.load(handle)
    except (OSError, ValueError) as error:
        raise AdapterFormatError(f"adapter_config.json beside the file is not valid JSON ({error})", path=candidate)
    return config if isinstance(config, dict) else None


def _diffusers_config(metadata: dict) -> dict | None:
    """diffusers exports keep the PEFT config as JSON in `lora_adapter_metadata`, keys prefixed by
    component (`transformer.r`); without component prefixes it is a plain PEFT config."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return None
    try:
        config = json.loads(raw)
    except (TypeError, ValueError):
        return None
    if not isinstance(config, dict):
        return None
    flat_config: dict = {}
    for key, value in config.items():
        flat_config.setdefault(key.split(".", 1)[-1], value)
    return flat_config


def _pattern_value(patterns: dict, module_path: str):
    for pattern, value in (patterns or {}).items():
        if pattern_matches(pattern, module_path):
            return value
    return None


def _peft_scale(adapter: Adapter, config: dict) -> float | None:
    """gamma for PEFT files: alpha / r (LoRA: lora_alpha / r, or / sqrt(r) with use_rslora),
    with `rank_pattern` / `alpha_pattern` overriding per module. OFT/BOFT/IA3 have no scale."""
    if adapter.algo not in ("lora", "loha", "lokr"):
        return None
    module_path = adapter.name.split("base_model.model.", 1)[-1]
    # LoKr with both factors full has no rank in its shapes: PEFT still divides by r.
    rank = adapter.rank or _pattern_value(config.get("rank_pattern"), module_path) or config.get("r")
    alpha_key = "lora_alpha" if adapter.algo == "lora" else "alpha"
    alpha = _pattern_value(config.get("alpha_pattern"), module_path)
    if alpha is None:
        alpha = config.get(alpha_key)
    if alpha is None or not rank:
        return None
    if adapter.algo == "lora" and config.get("use_rslora"):
        return float(alpha) / math.sqrt(float(rank))
    return float(alpha) / float(rank)
