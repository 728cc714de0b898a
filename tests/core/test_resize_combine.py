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


# -- plain LoRA output: any algorithm in, lora_up / lora_down / alpha out -------------------------
import copy  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402

import lycoris  # noqa: E402,F401  (the oracle: a test-only dependency, never skipped)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import lycoris_oracle as lo  # noqa: E402

from lycoris_core import load_adapter_file  # noqa: E402

PLAIN_SUFFIXES = (".lora_up.weight", ".lora_down.weight", ".alpha")
# stacks of lycoris-lora files on the same TinyModel (Linear 64->96 with/without bias, 3x3 and 1x1
# convs); weights are the multipliers the oracle recorded, so each file's truth is its own forward
STACKS = {
    "locon+loha+lokr": [("locon", 1.0), ("loha", 0.7), ("lokr_f4", 1.0)],
    "tucker": [("locon_tucker", 0.7), ("loha_tucker", 1.0), ("lokr_tucker", 0.7)],
    "scalars+full-factor lokr": [("lora_scalar", 1.0), ("rs_lokr", 0.7), ("lokr_full_matrix", 1.0)],
    "half precision": [("lora_fp16", 1.0), ("loha_fp16", 0.7), ("lokr_fp16", 0.7)],
    # alone, a LoKr whose w2 is stored flat does not say a conv's kernel size: the base model does
    "one lokr with base (kronecker svd)": [("lokr_f4", 0.7)],
    "one tucker lokr (kronecker svd)": [("lokr_tucker", 1.0)],
    "locon+lohas (factor svd)": [("locon", 0.7), ("loha", 1.0), ("rs_loha", 0.7)],
}
KRONECKER = "exact svd of the kronecker product"
FACTORS = "qr-core svd of the concatenated factors"
# a lone layer's route: LoKr through the SVDs of w1 and w2, non-Tucker LoHa through its r1*r2 factors
ALONE = {**{c: KRONECKER for c in ("lokr_f4", "lokr_default", "lokr_tucker", "lokr_full_matrix", "rs_lokr",
                                   "lokr_decompose_both", "lokr_unbalanced", "lokr_bf16")},
         **{c: FACTORS for c in ("loha", "loha_scalar", "rs_loha", "loha_fp16")}}


@pytest.fixture(scope="module")
def oracle(tmp_path_factory):
    return lo.case_builder(tmp_path_factory.mktemp("plain_lora"))


def _stack_truth(oracle, stack):
    """Per layer path: (record, expected output) = y_base + sum_i (y_i at weight w_i - y_base)."""
    cases = [(oracle(case_id), w) for case_id, w in stack]
    truth = {}
    for path, record in cases[0][0].layers.items():
        effect = sum(oc.layers[path].y[w] - oc.layers[path].y_base for oc, w in cases)
        truth[path] = (record, record.y_base + effect)
    return cases, truth


def _lycoris_forward(path, oc, layer_path, x):
    """lycoris-lora loads `path` onto a fresh copy of the base model; the layer's output for x."""
    model = copy.deepcopy(oc.base_model)
    net, _ = lycoris.create_lycoris_from_weights(1.0, path, model)
    net.apply_to()
    net.eval()
    with torch.no_grad():
        return dict(model.named_modules())[layer_path](x)


def _check_plain_keys(tensors):
    assert tensors and all(k.endswith(PLAIN_SUFFIXES) for k in tensors), sorted(tensors)
    for key, tensor in tensors.items():
        if key.endswith(".alpha"):  # alpha = rank: a loader's alpha / rank is exactly 1
            up = tensors[key[: -len("alpha")] + "lora_up.weight"]
            assert float(tensor) == up.shape[1]


@pytest.mark.parametrize("stack", list(STACKS))
def test_plain_lora_at_full_rank_reproduces_the_stack_in_lycoris(oracle, tmp_path, stack):
    cases, truth = _stack_truth(oracle, STACKS[stack])
    out = tmp_path / "plain.safetensors"
    base = cases[0][0].base_state_dict if "with base" in stack else None
    result = combine([(oc.path, w) for oc, w in cases], out, plain=True, dtype="fp32", base=base)
    written = load_adapter_file(out)
    _check_plain_keys({f"{n}.{k}": t for n, a in written.adapters.items() for k, t in a.tensors.items()})
    assert result.metadata["lycoris_pack.output"] == "plain lora" and not result.skipped
    assert {layer.name for layer in result.layers} == {r.lora_name for r, _ in truth.values()}
    for layer in result.layers:
        assert layer.rel_error < 1e-5 and layer.energy_kept == pytest.approx(1.0, abs=1e-9)
        if "factor svd" in stack:
            assert layer.method == FACTORS
    for layer_path, (record, expected) in truth.items():
        y = _lycoris_forward(str(out), cases[0][0], layer_path, record.x)
        assert lo.rel_error(y, expected, record.y_base) < 1e-4, layer_path


def _linear_delta_in_lycoris(path, oc, multiplier=1.0):
    """dW of the Linear `lin` as lycoris-lora applies `path`: its forward on the identity, minus the base."""
    model = copy.deepcopy(oc.base_model)
    net, _ = lycoris.create_lycoris_from_weights(multiplier, path, model)
    net.apply_to()
    net.eval()
    eye = torch.eye(model.lin.in_features)
    with torch.no_grad():
        return (model.lin(eye) - oc.base_model.lin(eye)).T


@pytest.mark.parametrize("dtype", ["fp16", "bf16", None])
@pytest.mark.parametrize("rule", [dict(), dict(rank=4), dict(mode="energy", value=0.9),
                                  dict(rank=6, mode="energy", value=0.99)])
def test_plain_lora_reports_the_error_it_has(oracle, tmp_path, rule, dtype):
    stack = STACKS["locon+loha+lokr"]
    cases = [(oracle(case_id), w) for case_id, w in stack]
    out = tmp_path / "plain.safetensors"
    result = combine([(oc.path, w) for oc, w in cases], out, plain=True, dtype=dtype, **rule)
    written = load_adapter_file(out)
    _check_plain_keys({f"{n}.{k}": t for n, a in written.adapters.items() for k, t in a.tensors.items()})
    expected_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, None: torch.float32}[dtype]  # inputs: fp32
    assert {a.tensors["lora_up.weight"].dtype for a in written.adapters.values()} == {expected_dtype}
    inputs = [(load_adapter_file(oc.path), w) for oc, w in cases]
    for layer in result.layers:
        shape = inputs[0][0].adapters[layer.name].expected_shape() or tuple(
            oracle("locon").base_state_dict[f"{_path_of(oracle, layer.name)}.weight"].shape)
        target = sum(w * f.adapters[layer.name].delta(torch.zeros(shape)) for f, w in inputs)
        stored = written.adapters[layer.name].delta(torch.zeros(shape))
        measured = float((stored - target).norm() / target.norm())
        assert layer.rel_error == pytest.approx(measured, rel=1e-3, abs=1e-6), layer.name
        if "value" in rule:  # the energy share asked for is kept (before rounding), unless the cap binds
            assert layer.energy_kept >= rule["value"] - 1e-6 or layer.rank == rule.get("rank")
        if "rank" in rule and "value" not in rule:
            assert layer.rank <= rule["rank"]
    # the Linear layer's delta as lycoris-lora itself applies both files agrees with the report
    lin = next(l for l in result.layers if l.name == "lycoris_lin")
    target = sum(_linear_delta_in_lycoris(oc.path, oc, w) for oc, w in cases)
    stored = _linear_delta_in_lycoris(str(out), cases[0][0])
    assert float((stored - target).norm() / target.norm()) == pytest.approx(lin.rel_error, rel=2e-3, abs=1e-5)
    # the text report: summary line, then the worst layers first
    lines = result.report_lines()
    assert lines[2].startswith("relative error: mean")
    listed = [float(line.split("rel. error ")[1].split()[0]) for line in lines[3:] if "rel. error" in line]
    assert listed == sorted(listed, reverse=True) and len(listed) == len(result.layers)


def _path_of(oracle, lora_name):
    return next(p for p, r in oracle("locon").layers.items() if r.lora_name == lora_name)


@pytest.mark.parametrize("case_id,algo", [("dora_lora_out", "lora with DoRA"), ("ia3_output", "ia3"),
                                          ("diag_oft", "diag-oft"), ("glora", "glora"), ("norms", "norm"),
                                          ("full", "full")])
def test_plain_lora_refuses_what_a_lora_cannot_hold_by_name(oracle, tmp_path, case_id, algo):
    oc = oracle(case_id)
    out = tmp_path / "plain.safetensors"
    with pytest.raises(ValueError) as caught:
        combine([(oracle("locon").path, 1.0), (oc.path, 1.0)], out, plain=True)
    message = str(caught.value)
    assert f"{case_id}.safetensors" in message and f"({algo}" in message
    refused = [r.lora_name for r in oc.layers.values() if f"{r.lora_name} ({algo}" in message]
    assert refused and not out.exists()
    # left out on request, and listed
    result = combine([(oracle("locon").path, 1.0), (oc.path, 1.0)], out, plain=True, drop_unrepresentable=True)
    assert out.exists() and {name.split(": ")[-1] for name, _ in result.skipped} >= set(refused)
    _check_plain_keys(result.tensors)


def test_plain_lora_converts_dora_exactly_for_a_given_base(oracle, tmp_path):
    oc = oracle("dora_lora_out")
    out = tmp_path / "plain.safetensors"
    combine([(oc.path, 1.0)], out, plain=True, base=oc.base_state_dict, dtype="fp32")
    for layer_path, record in oc.layers.items():
        y = _lycoris_forward(str(out), oc, layer_path, record.x)
        assert lo.rel_error(y, record.y[1.0], record.y_base) < 1e-4, layer_path


@pytest.mark.parametrize("scale", [1e-6, 1e-2])
def test_plain_lora_factors_are_balanced_so_half_precision_keeps_small_and_large_deltas(scale):
    gen = torch.Generator().manual_seed(8)
    # a rank-4 delta with a steep spectrum: unbalanced U*S / Vh factors put its tail in fp16 subnormals
    u = torch.linalg.qr(torch.randn(320, 4, generator=gen))[0]
    v = torch.linalg.qr(torch.randn(640, 4, generator=gen))[0]
    s = torch.tensor([1.0, 1e-1, 1e-2, 1e-3]) * scale * 640
    loha = {"m.hada_w1_a": u * s, "m.hada_w1_b": v.T, "m.hada_w2_a": torch.ones(320, 1),
            "m.hada_w2_b": torch.ones(1, 640), "m.alpha": torch.tensor(1.0)}
    result = combine([(decode_tensors(loha, path="tiny"), 1.0)], plain=True, dtype="fp16")
    (layer,) = result.layers
    up, down = result.tensors["m.lora_up.weight"].float(), result.tensors["m.lora_down.weight"].float()
    assert layer.rank == 4 and torch.allclose(up.norm(dim=0), down.norm(dim=1), rtol=2e-3)
    assert layer.rel_error < 1e-3  # fp16 rounding of balanced factors, whatever the delta's scale


def test_plain_lora_writes_the_inputs_factor_dtype_by_default():
    gen = torch.Generator().manual_seed(9)
    t = {"m.alpha": torch.tensor(2.0), "m.lora_up.weight": torch.randn(12, 4, generator=gen).half(),
         "m.lora_down.weight": torch.randn(4, 10, generator=gen).half()}  # alpha first, in fp32
    result = combine([(decode_tensors(t, path="half"), 1.0)], plain=True)
    assert result.tensors["m.lora_up.weight"].dtype == torch.float16
    assert result.metadata["lycoris_pack.dtype"] == "float16"


def test_plain_lora_on_the_command_line(oracle, tmp_path, capsys):
    from lycoris_core.cli import main

    locon, lokr, dora = oracle("locon").path, oracle("lokr_f4").path, oracle("dora_lora_out").path
    out = tmp_path / "plain.safetensors"
    code = main(["combine", f"{locon}:0.5", lokr, "--plain", "--energy", "0.95", "--dtype", "fp16", "--out", str(out)])
    printed = capsys.readouterr().out.splitlines()
    assert code == 0 and out.exists()
    written = load_adapter_file(out).adapters
    _check_plain_keys({f"{n}.{k}": t for n, a in written.items() for k, t in a.tensors.items()})
    assert printed[2].startswith("relative error: mean") and "rel. error" in printed[3]
    # a DoRA input without --base: one line naming the file and the module, exit 1, nothing written
    refused = tmp_path / "refused.safetensors"
    code = main(["combine", locon, dora, "--plain", "--out", str(refused)])
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1 and not refused.exists()
    assert "dora_lora_out.safetensors: lycoris_lin (lora with DoRA" in err and "--drop-unrepresentable" in err
    code = main(["combine", locon, dora, "--plain", "--drop-unrepresentable", "--out", str(refused)])
    assert code == 0 and "left out" in capsys.readouterr().out


@pytest.mark.parametrize("rule", [dict(rank=3), dict(mode="energy", value=0.8), dict()])
@pytest.mark.parametrize("case_id", list(ALONE))
def test_plain_lora_of_a_lone_lokr_or_loha_is_the_optimal_truncation(oracle, case_id, rule):
    """A lone LoKr / LoHa layer never goes through an SVD of its whole delta (see ALONE): its error
    must still be the optimal one, sqrt(sum of the dropped sigma^2) / ||delta||, from the dense SVD."""
    source = load_adapter_file(oracle(case_id).path)
    result = combine([(source, 0.6)], plain=True, dtype="fp32", **rule)
    written = decode_tensors(result.tensors)
    assert {layer.method for layer in result.layers} == {ALONE[case_id]}
    for layer in result.layers:
        adapter = source.adapters[layer.name]
        target = 0.6 * adapter.delta(torch.zeros(layer.shape))
        s = torch.linalg.svdvals(target.reshape(target.shape[0], -1).double())
        optimal = float(s[layer.rank:].norm() / s.norm())
        stored = written.adapters[layer.name].delta(torch.zeros(layer.shape))
        measured = float((stored - target).norm() / target.norm())
        assert measured == pytest.approx(optimal, rel=1e-3, abs=2e-6), layer.name
        assert layer.rel_error == pytest.approx(measured, rel=1e-3, abs=1e-6)
        if rule.get("mode") == "energy":  # the smallest rank that keeps the share
            energy = torch.cumsum(s * s, 0) / float((s * s).sum())
            assert layer.rank == int((energy < 0.8 - 1e-9).sum()) + 1


def test_svd_combine_keeps_norm_changes_whole(oracle):
    """A LoRA pair cannot hold a norm layer's 1-D change: SVD mode keeps it (and its bias) as `diff`, exactly."""
    oc = oracle("norms")
    result = combine([(oc.path, 0.7)], rank=4, dtype="fp32")
    written = decode_tensors(result.tensors)
    assert {a.algo for a in written.adapters.values()} == {"lora", "full"}
    merged, _ = merge_into_state_dict(oc.base_state_dict, [(written, 1.0)])
    for path, record in oc.layers.items():
        if written.adapters[record.lora_name].algo == "full":
            assert lo.rel_error(lo.layer_output(record, merged), record.y[0.7], record.y_base) < 1e-5, path
