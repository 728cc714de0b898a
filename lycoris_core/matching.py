"""Map adapter modules onto a model's layers and report the coverage of every load.

Outside ComfyUI (command line, generic state dicts) a module name matches a layer `X.weight`
when both are equal in underscore form after stripping the known dialect prefixes. ComfyUI's own
key maps are used by `nodes/` instead; both produce the same `Coverage`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .keys import underscore_form


@dataclass
class Coverage:
    """What one adapter file did to one model."""

    source: str
    matched: dict[str, str] = field(default_factory=dict)  # module name -> model layer (weight key)
    unmatched: list[str] = field(default_factory=list)  # module names with no layer in the model
    unknown_keys: list[str] = field(default_factory=list)  # file keys no algorithm understood
    problems: list[str] = field(default_factory=list)  # modules left out (bad shapes), one line each
    model_layers: int = 0  # adaptable layers in the model

    @property
    def untouched(self) -> int:
        return max(self.model_layers - len(set(self.matched.values())), 0)

    @property
    def complete(self) -> bool:
        return not (self.unmatched or self.unknown_keys or self.problems)

    def lines(self, limit: int = 20) -> list[str]:
        total = len(self.matched) + len(self.unmatched) + len(self.problems)
        out = [
            f"{self.source}: {len(self.matched)}/{total} modules matched, "
            f"{len(self.unmatched)} unmatched, {len(self.unknown_keys)} keys not understood, "
            f"{len(self.problems)} modules with errors; {self.untouched} of {self.model_layers} model layers untouched"
        ]
        for title, items in (("unmatched", self.unmatched), ("not understood", self.unknown_keys),
                             ("error", self.problems)):
            for item in items[:limit]:
                out.append(f"  {title}: {item}")
            if len(items) > limit:
                out.append(f"  ... {len(items) - limit} more {title}")
        return out


def layer_index(model_keys) -> dict[str, str]:
    """underscore form -> weight key, for every `X.weight` of a state dict."""
    index: dict[str, str] = {}
    for key in model_keys:
        if not key.endswith(".weight"):
            continue
        module = key[: -len(".weight")]
        index.setdefault(underscore_form(module), key)
        index.setdefault(module.replace(".", "_"), key)
    return index


def match_generic(adapter_file, model_keys) -> Coverage:
    """Coverage of `adapter_file` on a generic state dict with keys `model_keys`."""
    keys = list(model_keys)
    index = layer_index(keys)
    coverage = Coverage(
        source=adapter_file.name,
        unknown_keys=list(adapter_file.unknown_keys),
        problems=list(adapter_file.problems),
        model_layers=sum(1 for k in keys if k.endswith(".weight")),
    )
    claimed: dict[str, str] = {}
    for module in adapter_file.adapters:
        target = index.get(underscore_form(module)) or index.get(module.replace(".", "_"))
        if target is None:
            coverage.unmatched.append(module)
        elif target in claimed:
            # e.g. lora_te1_X and lora_te2_X on a generic dict holding one X: refuse to guess
            coverage.problems.append(
                f"{adapter_file.path}: {module}: matches {target}, which {claimed[target]} already patches; left out")
        else:
            claimed[target] = module
            coverage.matched[module] = target
    return coverage
