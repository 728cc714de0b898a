"""What a model layer is, asked of the module and its weight, never of `state_dict()` shapes.

ComfyUI builds layers from several op classes: plain torch layers, `comfy.ops` manual-cast
layers, 0.28's mixed-precision layers (plain `torch.nn.Module`s holding a `QuantizedTensor`),
ComfyUI-GGUF's layers (a `GGMLTensor` of packed bytes). Their state dicts report packed storage
(GGUF Q8_0: [256, 272] for a 256x256 weight; nvfp4: [out, in/2]), so every shape and kind
question goes through here. Everything is duck-typed on the conventions those op classes share
(`in_features`/`out_features`, `kernel_size`, `weight`), so other op packs that follow them work too.
"""

from __future__ import annotations

import comfy.ops
import comfy.utils
import torch

from ..lycoris_core import LayerGeometry

try:  # ComfyUI >= 0.4: quantized checkpoints (comfy_quant)
    from comfy.quant_ops import QuantizedTensor
except ImportError:  # the pinned March-2024 runtime has none
    QuantizedTensor = None

# GGUF tensor types that are plain floats (the layer computes them like any float weight)
_GGUF_FLOAT_TYPES = {"F32", "F16", "BF16"}


def module_of(model: torch.nn.Module, key: str):
    """The module that owns parameter `key` (e.g. "diffusion_model.x.weight"), or None."""
    path, _, _ = key.rpartition(".")
    try:
        return comfy.utils.get_attr(model, path) if path else model
    except AttributeError:
        return None


def logical_weight_shape(module) -> tuple | None:
    """The weight's shape as the layer computes with it: GGUF's `tensor_shape`, a
    QuantizedTensor's original shape, else the tensor's own shape. None without a weight."""
    weight = getattr(module, "weight", None)
    if weight is None:
        return None
    shape = getattr(weight, "tensor_shape", None)  # GGMLTensor
    if shape is None:
        params = getattr(weight, "_params", None)  # QuantizedTensor (comfy_kitchen)
        shape = getattr(params, "orig_shape", None)
    if shape is None:
        shape = getattr(module, "_orig_shape", None) if is_quantized_tensor(weight) else None
    return tuple(shape if shape is not None else weight.shape)


def stored_format(module) -> str | None:
    """The quantized storage of the layer's weight ("float8_e4m3fn", "int8_tensorwise", "mxfp8",
    "nvfp4", "gguf Q4_0", ...), or None for a float weight the runtime can patch exactly."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor):
        return None
    tensor_type = getattr(weight, "tensor_type", None)
    if tensor_type is not None:  # GGMLTensor
        name = getattr(tensor_type, "name", str(tensor_type))
        return None if name in _GGUF_FLOAT_TYPES else f"gguf {name}"
    if is_quantized_tensor(weight):
        return getattr(module, "quant_format", None) or getattr(weight, "_layout_cls", "quantized")
    if weight.dtype.itemsize == 1:  # fp8 / int8 storage computed through a cast
        return str(weight.dtype).replace("torch.", "")
    return None


# what a weight keeps when ComfyUI requantizes a merged one (the formats' published layouts)
_PRECISION = {
    "float8_e4m3fn": "3 mantissa bits: steps of 6-12 % of each value",
    "float8_e5m2": "2 mantissa bits: steps of 12-25 % of each value",
    "int8_tensorwise": "255 levels across the layer's largest value",
    "mxfp8": "3 mantissa bits, one power-of-two scale per 32 values",
    "nvfp4": "8 magnitudes (1 mantissa bit), one scale per 16 values",
}


def precision(stored: str) -> str:
    """In words, the resolution of a stored format (see `stored_format`)."""
    return _PRECISION.get(stored, "the format's own step")


def is_weight_layer(module) -> bool:
    """A Linear- or Conv-like layer whose output is op(x, weight) + bias, which bypass can wrap:
    any op class with `in_features`/`out_features` (Linear) or `kernel_size` (Conv), a weight of
    the matching rank, and no transposed conv (its weight is applied the other way round)."""
    shape = logical_weight_shape(module)
    if shape is None or getattr(module, "transposed", False):
        return False
    kernel = getattr(module, "kernel_size", None)
    if kernel is not None:
        return len(shape) == 2 + len(tuple(kernel))
    return hasattr(module, "in_features") and hasattr(module, "out_features") and len(shape) == 2


# ComfyUI's "cast the weight, then the torch op" forwards (its plain and manual-cast layers)
_COMFY_LAYERS = [getattr(comfy.ops.disable_weight_init, name) for name in ("Linear", "Conv1d", "Conv2d", "Conv3d")
                 if hasattr(comfy.ops.disable_weight_init, name)]
_CAST_FORWARDS = {layer.forward_comfy_cast_weights for layer in _COMFY_LAYERS}
_FORWARDS = {layer.forward for layer in _COMFY_LAYERS} | {
    torch.nn.Linear.forward, torch.nn.Conv1d.forward, torch.nn.Conv2d.forward, torch.nn.Conv3d.forward}


def computes_on_cast_weight(module) -> bool:
    """Whether the layer's forward is "read the weight in the input's dtype (dequantising it),
    then F.linear / the conv": torch's layers, ComfyUI's plain and manual-cast layers, GGUF's
    layers. Bypass may then run that op on a patched copy of the weight it reads instead, and
    loses no kernel. Layers with their own matmul (fp8 scaled-mm ops, QuantizedTensor layers
    with int8/fp8/fp4 kernels) keep their forward."""
    if is_quantized_tensor(getattr(module, "weight", None)) or getattr(module, "padding_mode", "zeros") != "zeros":
        return False
    cls = type(module)
    if cls.forward not in _FORWARDS:
        return False
    if callable(getattr(cls, "forward_ggml_cast_weights", None)) and callable(getattr(cls, "cast_bias_weight", None)):
        return True  # ComfyUI-GGUF: dequantise, then the torch op
    own = getattr(cls, "forward_comfy_cast_weights", None)
    return own is None or own in _CAST_FORWARDS


def geometry(module) -> LayerGeometry:
    """The core's description of how the layer applies its weight, with its logical shape."""
    return LayerGeometry.of(module, weight_shape=logical_weight_shape(module))


def is_quantized_tensor(tensor) -> bool:
    return QuantizedTensor is not None and isinstance(tensor, QuantizedTensor)


def forward_skipped(module, stored: str | None) -> bool:
    """Whether this runtime computes the layer without calling its forward, where a bypass could not
    run: ComfyUI >= 0.37's `comfy.ops.linear_input_act` (a cast and a fused kernel) serves int8
    tensorwise Linear layers, and every Linear while fp16 accumulation is on."""
    import comfy.ops

    if getattr(comfy.ops, "linear_input_act", None) is None or getattr(module, "kernel_size", None) is not None:
        return False
    fp16_accumulation = getattr(getattr(torch.backends.cuda, "matmul", None), "allow_fp16_accumulation", False)
    return stored == "int8_tensorwise" or bool(fp16_accumulation)


def layer_list(paths, limit: int = 5) -> str:
    """The first `limit` layer names of a report or log line, then "..." when there are more."""
    return ", ".join(paths[:limit]) + (", ..." if len(paths) > limit else "")

