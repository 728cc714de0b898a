"""Algorithm families, in the order the reader tries them on a module's keys.

Adding a family: one module with an `Adapter` subclass and one line here.
"""

from .base import Adapter, DecodeContext, LayerGeometry
from .boft import BOFT, PeftBOFT
from .full import Full, Norm, ParameterDelta
from .glora import GLoRA
from .ia3 import IA3, PeftIA3
from .loha import LoHa
from .lokr import LoKr
from .lora import LoRA
from .oft import DiagOFT, LegacyOFT, PeftOFT
from .tlora import TLoRA

FAMILIES: tuple[type[Adapter], ...] = (
    TLoRA, LoHa, LoKr, DiagOFT, BOFT, LegacyOFT, PeftOFT, PeftBOFT, GLoRA, IA3, PeftIA3, ParameterDelta, Full, Norm,
    LoRA,
)

# Keys that modify or accompany a family rather than identify one.
MODIFIERS = ("alpha", "dora_scale", "scalar", "lora_magnitude_vector", "rescale", "reshape_weight")


def known_suffixes() -> tuple[str, ...]:
    """Every suffix any family owns, longest first (suffixes may contain dots)."""
    names = set(MODIFIERS)
    for family in FAMILIES:
        names.update(family.owned())
    return tuple(sorted(names, key=len, reverse=True))


__all__ = ["Adapter", "DecodeContext", "LayerGeometry", "FAMILIES", "MODIFIERS", "known_suffixes"]
