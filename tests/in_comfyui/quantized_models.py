"""Quantized tiny models written by the runtimes' own quantisers and loaded by their own loaders:
ComfyUI 0.28's `QuantizedTensor.from_float` (comfy_quant checkpoints, UNETLoader), the `gguf`
package in ComfyUI-GGUF's file layout (its UnetLoaderGGUF), and UNETLoader's fp8 weight_dtype."""

from __future__ import annotations

import importlib
import json
import shutil
import sys
from pathlib import Path

import torch

from tiny_models import load_diffusion_model, write_tiny_flux

GGUF_SOURCE = Path(__file__).resolve().parents[3] / "shared" / "runtimes" / "ComfyUI-GGUF"
COMFY_QUANT_FORMATS = ("float8_e4m3fn", "int8_tensorwise", "mxfp8", "nvfp4")
GGUF_FORMATS = ("Q8_0", "Q4_0")
# format name -> how it is loaded; the Linear weights of the transformer blocks are quantized
FORMATS = ("fp8_e4m3fn",) + COMFY_QUANT_FORMATS + tuple(f"gguf_{q}" for q in GGUF_FORMATS)


def _quantized_keys(state_dict: dict):
    return [k for k, v in state_dict.items() if "blocks." in k and k.endswith(".weight") and v.dim() == 2]


def write_comfy_quant(path: Path, state_dict: dict, quant_format: str) -> None:
    """A ComfyUI 0.28 quantized checkpoint: `X.weight` (+ scales) from QuantizedTensor.from_float
    and `X.comfy_quant` naming the format, as QUANTIZATION.md lays it out."""
    from comfy.quant_ops import QUANT_ALGOS, QuantizedTensor
    from safetensors.torch import save_file

    layout = QUANT_ALGOS[quant_format]["comfy_tensor_layout"]
    out = dict(state_dict)
    for key in _quantized_keys(state_dict):
        out.pop(key)
        out.update(QuantizedTensor.from_float(state_dict[key], layout).state_dict(key))
        out[key[: -len("weight")] + "comfy_quant"] = torch.tensor(
            list(json.dumps({"format": quant_format}).encode()), dtype=torch.uint8)
    save_file({k: v.contiguous() for k, v in out.items()}, str(path))


def write_gguf(path: Path, state_dict: dict, qtype_name: str, arch: str = "flux") -> None:
    """A GGUF file in ComfyUI-GGUF's layout: the architecture in `general.architecture`, block
    Linear weights quantized by `gguf.quants.quantize`, everything else F32."""
    import gguf

    qtype = getattr(gguf.GGMLQuantizationType, qtype_name)
    quantized = set(_quantized_keys(state_dict))
    writer = gguf.GGUFWriter(path=None, arch=arch)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for key, value in state_dict.items():
        data = value.to(torch.float32).numpy()
        kind = qtype if key in quantized else gguf.GGMLQuantizationType.F32
        writer.add_tensor(key, gguf.quants.quantize(data, kind), raw_dtype=kind)
    writer.write_header_to_file(path=str(path))
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def gguf_nodes(scratch: Path):
    """ComfyUI-GGUF's nodes module, imported from a copy as ComfyUI imports a custom node package."""
    name = "comfyui_gguf_under_test"
    if name not in sys.modules:
        copy = scratch / name
        if not copy.exists():
            shutil.copytree(GGUF_SOURCE, copy, ignore=shutil.ignore_patterns(".git", "__pycache__"))
        sys.path.insert(0, str(scratch))
        importlib.import_module(name)
    return sys.modules[f"{name}.nodes"]


def load_quantized_flux(folder: Path, fmt: str, seed: int = 0):
    """(ModelPatcher of a tiny Flux stored in `fmt`, loaded by the runtime's own loader, its float
    state dict before quantisation)."""
    folder.mkdir(parents=True, exist_ok=True)
    state_dict = write_tiny_flux(folder / "float.safetensors", seed)
    if fmt == "fp8_e4m3fn":
        return load_diffusion_model(folder, "float.safetensors", "fp8_e4m3fn"), state_dict
    if fmt in COMFY_QUANT_FORMATS:
        write_comfy_quant(folder / f"{fmt}.safetensors", state_dict, fmt)
        return load_diffusion_model(folder, f"{fmt}.safetensors"), state_dict
    qtype = fmt[len("gguf_"):]
    write_gguf(folder / f"{qtype}.gguf", state_dict, qtype)
    nodes = gguf_nodes(folder.parent)
    from comfyui_runtime import use_model_folder

    use_model_folder("diffusion_models", folder)
    return nodes.UnetLoaderGGUF().load_unet(f"{qtype}.gguf")[0], state_dict


def dequantised_weights(patcher) -> dict:
    """The diffusion model's weights as the runtime dequantises them (ComfyUI-GGUF's dequantiser,
    QuantizedTensor.dequantize, fp8 cast), keyed as in a checkpoint."""
    out = {}
    for name, module in patcher.model.diffusion_model.named_modules():
        for param_name, value in module.named_parameters(recurse=False):
            key = f"{name}.{param_name}" if name else param_name
            if hasattr(value, "tensor_type"):  # GGMLTensor
                from comfyui_gguf_under_test.dequant import dequantize_tensor

                value = dequantize_tensor(value, torch.float32)
            elif hasattr(value, "dequantize") and type(value.data).__name__ == "QuantizedTensor":
                value = value.data.dequantize()
            out[key] = torch.Tensor(value.detach()).to(torch.float32).clone()
    return out


def _is_quantized(data) -> bool:
    tensor_type = getattr(data, "tensor_type", None)
    if tensor_type is not None:
        return getattr(tensor_type, "name", "") not in ("F32", "F16", "BF16")
    return type(data).__name__ == "QuantizedTensor" or data.dtype.itemsize == 1


def stored_bytes(patcher, quantized_only: bool = False) -> dict:
    """The diffusion model's stored tensors as raw bytes (quantized data and scales); with
    `quantized_only`, those of quantized weights only."""
    out = {}
    for name, value in patcher.model.diffusion_model.named_parameters():
        data = value.data
        if quantized_only and not _is_quantized(data):
            continue
        if type(data).__name__ == "QuantizedTensor":
            parts = data.state_dict(name)
        else:
            parts = {name: torch.Tensor(data)}
        for key, tensor in parts.items():
            out[key] = tensor.detach().reshape(-1).view(torch.uint8).clone()
    return out
