"""Resize keeps what it reports; combine by concatenation is exact; SVD combine matches dense."""

import pytest
import torch

from lycoris_core import decode_tensors, merge_into_state_dict
from lycoris_core.combine import combine
from lycoris_core.resize import resize
from lycoris_core.safe_io import save_tensors_atomic


def _lora(gen, rank, alpha, tucker=False, prefix="lora_unet_"):
    t = {
        f"{prefix}lin.lora_up.weight": torch.randn(48, rank, generator=gen),
        f"{prefix}lin.lora_down.weight": torch.randn(rank, 40, generator=gen),
        f"{prefix}lin.alpha": torch.tensor(float(alpha)),
        f"{prefix}conv.lora_up.weight": torch.randn(24, rank, 1, 1, generator=gen),
        f"{prefix}conv.alpha": torch.tensor(float(alpha)),
    }
    if tucker:
        t[f"{prefix}conv.lora_mid.weight"] = torch.randn(rank, rank, 3, 3, generator=gen)
        t[f"{prefix}conv.lora_down.weight"] = torch.randn(rank, 8, 1, 1, generator=gen)
    else:
        t[f"{prefix}conv.lora_down.weight"] = torch.randn(rank, 8, 3, 3, generator=gen)
    return t


BASE = {"lin.weight": torch.randn(48, 40), "conv.weight": torch.randn(24, 8, 3, 3), "conv.bias": torch.randn(24)}
SHAPES = {"lora_unet_lin": (48, 40), "lora_unet_conv": (24, 8, 3, 3)}


def _delta(adapter_file, name):
    return adapter_file.adapters[name].delta(torch.zeros(SHAPES[name]))


@pytest.mark.parametrize("tucker", [False, True])
@pytest.mark.parametrize("kwargs", [dict(rank=3), dict(mode="energy", value=0.8), dict(mode="ratio", value=0.3, rank=5)])
def test_resize_reports_what_it_keeps(tucker, kwargs):
    gen = torch.Generator().manual_seed(0)
    source = decode_tensors(_lora(gen, 8, 4.0, tucker))
    result = resize(source, **kwargs)
    out = decode_tensors(result.tensors)
    assert len(result.layers) == 2
    for layer in result.layers:
        before, after = _delta(source, layer.name), _delta(out, layer.name)
        measured = float((before - after).norm() / before.norm())
        assert layer.rel_error == pytest.approx(measured, rel=1e-3, abs=1e-6)
        # an orthogonal truncation: kept share and error are tied
        assert layer.energy_kept + layer.rel_error ** 2 == pytest.approx(1.0, abs=1e-4)
        assert out.adapters[layer.name].scale == pytest.approx(source.adapters[layer.name].scale, rel=1e-6)
        if kwargs.get("mode") == "energy":
            assert layer.energy_kept >= 0.8 - 1e-6
        assert ("lora_mid.weight" in out.adapters[layer.name].tensors) == (tucker and layer.name == "lora_unet_conv")
    assert result.metadata["lycoris_pack.tool"] == "lycoris_core.resize"


def test_resize_exact_when_rank_covers_and_alpha_rule():
    gen = torch.Generator().manual_seed(1)
    up, down = torch.randn(48, 2, generator=gen), torch.randn(2, 40, generator=gen)
    t = {"m.lora_up.weight": torch.cat([up, torch.zeros(48, 6)], 1),
         "m.lora_down.weight": torch.cat([down, torch.randn(6, 40, generator=gen)], 0), "m.alpha": torch.tensor(4.0)}
    result = resize(decode_tensors(t), rank=2)
    (layer,) = result.layers
    assert layer.rank == 2 and layer.rel_error < 1e-5
    assert float(result.tensors["m.alpha"]) == pytest.approx(4.0 / 8 * 2)  # alpha' = (alpha / r) r'
    unchanged = resize(decode_tensors(t), rank=8)
    assert torch.equal(unchanged.tensors["m.lora_up.weight"], t["m.lora_up.weight"])


def test_resize_copies_other_algorithms():
    gen = torch.Generator().manual_seed(2)
    t = _lora(gen, 4, 4.0)
    t.update({"lora_unet_h.hada_w1_a": torch.randn(6, 2), "lora_unet_h.hada_w1_b": torch.randn(2, 5),
              "lora_unet_h.hada_w2_a": torch.randn(6, 2), "lora_unet_h.hada_w2_b": torch.randn(2, 5)})
    result = resize(decode_tensors(t), rank=2)
    assert torch.equal(result.tensors["lora_unet_h.hada_w1_a"], t["lora_unet_h.hada_w1_a"])
    assert any("loha" in reason for _, reason in result.skipped)


def _sequential(files):
    merged = BASE
    for adapter_file, weight in files:
        merged, _ = merge_into_state_dict(merged, [(adapter_file, weight)])
    return merged


@pytest.mark.parametrize("tuckers", [(False, False), (True, True), (True, False)])
def test_concatenation_is_exact(tuckers):
    gen = torch.Generator().manual_seed(3)
    files = [(decode_tensors(_lora(gen, 4, 2.0, tuckers[0]), path="a"), 0.5),
             (decode_tensors(_lora(gen, 6, 16.0, tuckers[1]), path="b"), -0.8)]
    expected = _sequential(files)
    result = combine(files, dtype="fp32")
    merged, coverages = merge_into_state_dict(BASE, [(decode_tensors(result.tensors), 1.0)])
    assert coverages[0].complete
    for key in ("lin.weight", "conv.weight"):
        change = (expected[key] - BASE[key]).norm()
        assert float((merged[key] - expected[key]).norm() / change) < 1e-6
    assert {layer.rank for layer in result.layers} == {10}
    assert float(result.tensors["lora_unet_lin.alpha"]) == 10.0
    assert ("lora_unet_conv.lora_mid.weight" in result.tensors) == all(tuckers)


def test_svd_combine_reports_measured_error_and_matches_dense():
    gen = torch.Generator().manual_seed(4)
    files = [(decode_tensors(_lora(gen, 4, 2.0), path="a"), 0.7), (decode_tensors(_lora(gen, 6, 3.0), path="b"), 0.4)]
    target = {n: sum(w * _delta(f, n) for f, w in files) for n in SHAPES}
    result = combine(files, rank=5, dtype="fp32")
    out = decode_tensors(result.tensors)
    for layer in result.layers:
        d = target[layer.name]
        measured = float((_delta(out, layer.name) - d).norm() / d.norm())
        assert layer.rel_error == pytest.approx(measured, rel=1e-3)
        s = torch.linalg.svdvals(d.reshape(d.shape[0], -1))
        optimal = float(s[5:].norm() / s.norm())
        assert measured == pytest.approx(optimal, rel=1e-4)


def test_combine_materialises_loha_exactly():
    gen = torch.Generator().manual_seed(5)
    loha = {"lora_unet_lin.hada_w1_a": torch.randn(48, 2, generator=gen),
            "lora_unet_lin.hada_w1_b": torch.randn(2, 40, generator=gen),
            "lora_unet_lin.hada_w2_a": torch.randn(48, 2, generator=gen),
            "lora_unet_lin.hada_w2_b": torch.randn(2, 40, generator=gen), "lora_unet_lin.alpha": torch.tensor(1.0)}
    files = [(decode_tensors(_lora(gen, 4, 2.0), path="a"), 0.5), (decode_tensors(loha, path="h"), 0.7)]
    expected = _sequential(files)
    result = combine(files, dtype="fp32")
    assert "lora_unet_lin.diff" in result.tensors
    merged, _ = merge_into_state_dict(BASE, [(decode_tensors(result.tensors), 1.0)])
    for key in ("lin.weight", "conv.weight"):
        assert float((merged[key] - expected[key]).norm() / (expected[key] - BASE[key]).norm()) < 1e-6
    # a LoHa alone keeps its structure, its weight folded in
    alone = combine([(decode_tensors(loha, path="h"), 0.5)], dtype="fp32")
    assert "lora_unet_lin.hada_w1_a" in alone.tensors
    d = decode_tensors(alone.tensors).adapters["lora_unet_lin"].delta(torch.zeros(48, 40))
    assert torch.allclose(d, 0.5 * decode_tensors(loha).adapters["lora_unet_lin"].delta(torch.zeros(48, 40)), atol=1e-5)


def test_dora_needs_base(tmp_path):
    gen = torch.Generator().manual_seed(6)
    dora = _lora(gen, 4, 2.0)
    dora["lora_unet_lin.dora_scale"] = torch.rand(48, 1, generator=gen) + 1
    plain = _lora(gen, 2, 2.0)
    files = [(decode_tensors(dora, path="d"), 0.6), (decode_tensors(plain, path="p"), 1.0)]
    with pytest.raises(ValueError, match="lora_unet_lin.*base"):
        combine(files)
    base_path = tmp_path / "base.safetensors"
    save_tensors_atomic(base_path, BASE)
    result = combine(files, base=base_path, dtype="fp32")
    expected = _sequential(files)
    merged, _ = merge_into_state_dict(BASE, [(decode_tensors(result.tensors), 1.0)])
    for key in ("lin.weight", "conv.weight"):
        assert float((merged[key] - expected[key]).norm() / (expected[key] - BASE[key]).norm()) < 1e-5
