"""Inspect LyCORIS: the report's per-block norms against the trainer's own deltas, the heat map's
pixels against its colour bar, metadata in the report, clear errors.

Set LYCORIS_INSPECT_PNG_DIR to keep the rendered pictures (inspect_sd1_<algo>.png, inspect_flux.png)."""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from tiny_models import lycoris_file, tiny_clip, tiny_sd15

ROW = re.compile(r"^  ([A-Z]+\d*)\s+(\S+)\s+(\d+)$")


@pytest.fixture
def loras(pack, tmp_path):
    from comfyui_runtime import use_loras_folder

    use_loras_folder(tmp_path)
    return tmp_path


def _keep(heatmap, name: str) -> None:
    folder = os.environ.get("LYCORIS_INSPECT_PNG_DIR")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        heatmap.image.save(Path(folder) / name)


def _sd_block(lora_name: str) -> str:
    """The block of a lycoris-lora module of the ldm UNet, read from its name (input_blocks_4_1_... -> IN04)."""
    name = lora_name[len("lycoris_"):]
    m = re.match(r"(input|output)_blocks_(\d+)_", name)
    if m:
        return ("IN" if m.group(1) == "input" else "OUT") + f"{int(m.group(2)):02d}"
    return "M00" if name.startswith("middle_block_") else "BASE"


def _forward_delta(module) -> torch.Tensor:
    """The weight change the trainer's forward applies (what the file means), read from that forward by
    probing: the identity for a Linear, one-hot kernel windows for a Conv2d. (lycoris-lora's own
    get_diff_weight applies LoHa's scale twice, so it cannot serve as the reference.)"""
    layer = module.org_module[0].float()  # (the wrapped copy's) fp16 layers: probe in fp32, as the file is
    with torch.no_grad():
        if isinstance(layer, torch.nn.Linear):
            x = torch.eye(layer.in_features)
            return (module(x) - module.org_forward(x)).T
        out_c, in_c, kh, kw = layer.weight.shape
        (sh, sw), (ph, pw) = layer.stride, layer.padding
        oh, ow = -(-ph // sh), -(-pw // sw)  # the first output whose window starts inside the input
        top, left = oh * sh - ph, ow * sw - pw
        x = torch.zeros(in_c * kh * kw, in_c, top + kh + ph, left + kw + pw)
        for n, (c, a, b) in enumerate(np.ndindex(in_c, kh, kw)):
            x[n, c, top + a, left + b] = 1.0
        response = (module(x) - module.org_forward(x))[:, :, oh, ow]  # [basis, out]
        return response.T.reshape(out_c, in_c, kh, kw)


def _oracle_norms(networks) -> tuple[dict[str, float], dict[str, int]]:
    """Per-block sqrt(sum ||delta||_F^2) of the trainer's deltas; `networks`: (lycoris network, its
    module name -> block id)."""
    squares: dict[str, float] = {}
    layers: dict[str, int] = {}
    for net, block_of in networks:
        for module in net.loras:
            block = block_of(module.lora_name)
            squares[block] = squares.get(block, 0.0) + float(_forward_delta(module).double().square().sum())
            layers[block] = layers.get(block, 0) + 1
    return {b: math.sqrt(s) for b, s in squares.items()}, layers


def _report_table(report: str) -> dict[str, tuple[str, int]]:
    table = report.split("per-block magnitude", 1)[1].split("not measured", 1)[0].split("every module", 1)[0]
    rows = {}
    for line in table.splitlines():
        m = ROW.match(line)
        if m:
            rows[m.group(1)] = (m.group(2), int(m.group(3)))
    return rows


def _packed(pixels: np.ndarray) -> np.ndarray:
    rgb = pixels.reshape(-1, 3).astype(np.int64)
    return rgb[:, 0] << 16 | rgb[:, 1] << 8 | rgb[:, 2]


def _dominant_colour(pixels: np.ndarray) -> np.ndarray:
    code = int(np.bincount(_packed(pixels)).argmax())
    return np.array([code >> 16, (code >> 8) & 255, code & 255])


def _check_picture(heatmap, image_tensor, expected: dict[str, float]) -> None:
    """The node's IMAGE is the picture; every cell's fill sits on the colour bar where its value is."""
    from lycoris_pack.nodes.heatmap import BACKGROUND, value_label

    assert image_tensor.dtype == torch.float32 and image_tensor.dim() == 4 and image_tensor.shape[0] == 1
    assert image_tensor.shape[3] == 3 and 0.0 <= float(image_tensor.min()) and float(image_tensor.max()) <= 1.0
    pixels = np.asarray(heatmap.image)
    assert image_tensor.shape[1:3] == pixels.shape[:2] and pixels.shape[0] > 150 and pixels.shape[1] > 400
    torch.testing.assert_close(image_tensor[0], torch.from_numpy(pixels.astype(np.float32) / 255))
    assert len(np.unique(_packed(pixels))) > 50 and pixels.std() > 20  # not blank

    assert heatmap.scale_max == pytest.approx(max(expected.values()), rel=1e-5)
    x0, y0, x1, y1 = heatmap.colour_bar
    bar = pixels[(y0 + y1) // 2, x0:x1 + 1].astype(float)
    for block, (cx0, cy0, cx1, cy1) in heatmap.cells.items():
        fill = _dominant_colour(pixels[cy0:cy1 + 1, cx0:cx1 + 1]).astype(float)
        if block not in expected:
            assert tuple(fill) == BACKGROUND and heatmap.labels[block] == "-", block
            continue
        assert heatmap.labels[block] == value_label(expected[block])
        position = int(np.linalg.norm(bar - fill, axis=1).argmin())
        read_back = position / (x1 - x0) * heatmap.scale_max
        assert read_back == pytest.approx(expected[block], abs=0.01 * heatmap.scale_max), block
    assert set(expected) <= set(heatmap.cells)


@pytest.mark.parametrize("algo, with_model", [("locon", True), ("loha", False), ("lokr", True)])
def test_per_block_norms_match_the_trainers_deltas(pack, loras, tmp_path, algo, with_model):
    from lycoris_pack.nodes.inspect_node import inspect_adapter

    model, clip = tiny_sd15(), tiny_clip(tmp_path)
    unet_net, _ = lycoris_file(model.model.diffusion_model, tmp_path / "u.safetensors", "lora_unet_", algo, seed=3)
    te_net, _ = lycoris_file(clip.cond_stage_model.clip_l.transformer.text_model, tmp_path / "t.safetensors",
                             "lora_te_text_model_", algo, seed=4)
    save_file({**load_file(tmp_path / "u.safetensors"), **load_file(tmp_path / "t.safetensors")},
              str(loras / f"{algo}.safetensors"))
    expected, layers = _oracle_norms([(unet_net, _sd_block), (te_net, lambda name: "TE")])
    assert {"BASE", "IN01", "M00", "OUT03", "TE"} <= set(expected)  # the tiny UNet's blocks are all there

    out = pack.NODE_CLASS_MAPPINGS["LycorisInspect"]().inspect(f"{algo}.safetensors", "auto",
                                                                model if with_model else None)
    report, image = out["result"]
    assert out["ui"]["text"] == [report]
    rows = _report_table(report)
    assert list(rows)[:2] == ["BASE", "IN00"] and len(rows) == 27  # sd1 layout: BASE, 12 IN, M00, 12 OUT, TE
    for block, (text, count) in rows.items():
        if block in expected:
            assert float(text) == pytest.approx(expected[block], rel=2e-5), block
            assert count == layers[block], block
        else:
            assert (text, count) == ("-", 0), block
    source = "connected model" if with_model else "file's module names"
    assert f"architecture: sd1 (detected from the {source})" in report
    if with_model:
        unet_modules = len(unet_net.loras)
        assert f"connected model: {unet_modules} of {unet_modules} diffusion-model modules match" in report

    heatmap = inspect_adapter(f"{algo}.safetensors", "auto", model if with_model else None)[1]
    _check_picture(heatmap, image, expected)
    _keep(heatmap, f"inspect_sd1_{algo}.png")


def test_metadata_and_modules_in_the_report(pack, loras, tmp_path):
    model = tiny_sd15()
    lycoris_file(model.model.diffusion_model, tmp_path / "m.safetensors", "lora_unet_", "locon")
    tensors = load_file(tmp_path / "m.safetensors")
    tags = {"5_mychar": {"mychar": 10, "red hair": 4, "smile": 2}, "2_bg": {"mychar": 3, "outdoors": 5}}
    metadata = {"ss_base_model_version": "sd_v1", "ss_network_module": "lycoris.kohya",
                "ss_network_args": json.dumps({"conv_dim": "4", "conv_alpha": "2", "algo": "locon"}),
                "ss_tag_frequency": json.dumps(tags), "ss_output_name": "mychar_v3"}
    save_file(tensors, str(loras / "meta.safetensors"), metadata)

    report = pack.NODE_CLASS_MAPPINGS["LycorisInspect"]().inspect("meta.safetensors")["result"][0]
    assert "ss_base_model_version: sd_v1" in report and "ss_output_name: mychar_v3" in report
    assert "conv_dim=4, conv_alpha=2, algo=locon" in report
    assert "trigger words: mychar (13), outdoors (5), red hair (4), smile (2)" in report
    modules = sorted({k.split(".")[0] for k in tensors})
    for name in modules:  # one line per module: algorithm, rank, alpha, dtype, shape
        line = next(line for line in report.splitlines() if line.startswith(f"  {name}: "))
        assert "rank 4" in line and "alpha 2" in line and "float32" in line, line
    assert f"modules ({len(modules)})" in report

    stamp = pack.NODE_CLASS_MAPPINGS["LycorisInspect"].IS_CHANGED("meta.safetensors")
    save_file(tensors, str(loras / "meta.safetensors"))  # retrained under the same name: inspected again
    assert pack.NODE_CLASS_MAPPINGS["LycorisInspect"].IS_CHANGED("meta.safetensors") != stamp


def test_bad_files_give_clear_errors(pack, loras):
    node = pack.NODE_CLASS_MAPPINGS["LycorisInspect"]()
    (loras / "garbage.safetensors").write_bytes(b"\x00\x01 this is not a safetensors file" * 10)
    with pytest.raises(ValueError, match=r"Inspect LyCORIS: .*garbage\.safetensors"):
        node.inspect("garbage.safetensors")
    save_file({"model.layer.weight": torch.ones(2, 2)}, str(loras / "plain.safetensors"))
    with pytest.raises(ValueError, match=r"plain\.safetensors.*not a LoRA/LyCORIS adapter file"):
        node.inspect("plain.safetensors")
    with pytest.raises(ValueError, match="not in the loras folders"):
        node.inspect("missing.safetensors")
    save_file({"lora_unet_x.lora_up.weight": torch.ones(4, 2), "lora_unet_x.lora_down.weight": torch.ones(2, 3)},
              str(loras / "ok.safetensors"))
    with pytest.raises(ValueError, match="unknown architecture 'sd9'"):
        node.inspect("ok.safetensors", "sd9")


def _flux_adapter(path: Path) -> tuple[dict[str, float], dict[str, int]]:
    """A kohya-named Flux LoRA (every double and single block, in/out layers, both text encoders) with a
    magnitude pattern over the blocks, and one IA3 module; returns the expected per-block norms."""
    g = torch.Generator().manual_seed(7)
    tensors, squares, layers = {}, {}, {}

    def lora(name: str, block: str, size: float, alpha: float = 2.0) -> None:
        up, down = torch.randn(12, 4, generator=g) * size, torch.randn(4, 10, generator=g)
        tensors.update({f"{name}.lora_up.weight": up, f"{name}.lora_down.weight": down,
                        f"{name}.alpha": torch.tensor(alpha)})
        squares[block] = squares.get(block, 0.0) + float(((alpha / 4) * up.double() @ down.double()).square().sum())
        layers[block] = layers.get(block, 0) + 1

    for i in range(19):
        for part in ("img_attn_qkv", "img_mlp_0", "txt_attn_proj"):
            lora(f"lora_unet_double_blocks_{i}_{part}", f"D{i:02d}", 0.2 + 0.1 * (i % 7))
    for i in range(38):
        for part in ("linear1", "linear2"):
            lora(f"lora_unet_single_blocks_{i}_{part}", f"S{i:02d}", 0.05 + 0.6 * math.exp(-((i - 25) / 6) ** 2))
    lora("lora_unet_img_in", "BASE", 0.3)
    lora("lora_unet_final_layer_linear", "BASE", 0.3)
    lora("lora_te1_text_model_encoder_layers_0_mlp_fc1", "TE1", 0.4)
    lora("lora_te3_encoder_block_0_layer_0_SelfAttention_q", "TE2", 0.1)
    tensors["lora_unet_single_blocks_3_modulation_lin.weight"] = torch.rand(12, generator=g)  # IA3: not measured
    tensors["lora_unet_single_blocks_3_modulation_lin.on_input"] = torch.tensor(False)
    save_file(tensors, str(path), {"ss_base_model_version": "flux1"})
    return {b: math.sqrt(s) for b, s in squares.items()}, layers


def test_flux_adapter_heatmap(pack, loras):
    from lycoris_pack.nodes.inspect_node import inspect_adapter

    expected, layers = _flux_adapter(loras / "flux_style.safetensors")
    out = pack.NODE_CLASS_MAPPINGS["LycorisInspect"]().inspect("flux_style.safetensors")
    report, image = out["result"]
    rows = _report_table(report)
    assert list(rows) == ["BASE"] + [f"D{i:02d}" for i in range(19)] + [f"S{i:02d}" for i in range(38)] + ["TE1", "TE2"]
    for block, (text, count) in rows.items():
        assert float(text) == pytest.approx(expected[block], rel=2e-5) and count == layers[block], block
    assert "architecture: flux (detected from the file's module names)" in report
    assert "not measured: 1 module (ia3 x1)" in report

    heatmap = inspect_adapter("flux_style.safetensors")[1]
    _check_picture(heatmap, image, expected)
    _keep(heatmap, "inspect_flux.png")
