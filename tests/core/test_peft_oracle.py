"""PEFT 0.21.2 files: lycoris_core's merge equals PEFT's own `merge_and_unload`.

Each case: `get_peft_model` on a tiny model, random adapter parameters, `save_pretrained`
(adapter_model.safetensors + adapter_config.json); the reference is the weights (and biases)
of `merge_and_unload()`. Error: ||dW_ours - dW_peft|| / ||dW_peft|| per tensor, <= 1e-5.
A diffusers-style copy (keys `transformer.<path>.lora_A.weight`, config in the safetensors
metadata `lora_adapter_metadata`, no config file) must give the same result.
"""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from torch import nn

import peft  # noqa: E402  (the oracle: never skipped)
from safetensors.torch import load_file, save_file  # noqa: E402

from lycoris_core import load_adapter_file, merge_into_state_dict  # noqa: E402

TOL = 1e-5


class PeftTiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(64, 96)
        self.lin_nobias = nn.Linear(96, 64, bias=False)
        self.sq = nn.Linear(32, 32)  # square: IA3's two orientations have the same numel
        self.conv3 = nn.Conv2d(16, 32, 3, padding=1)
        self.conv1 = nn.Conv2d(32, 48, 1)


ALL = ["lin", "lin_nobias", "sq", "conv3", "conv1"]
WITH_BIAS = ["lin", "sq", "conv3", "conv1"]


class PeftConv1dTiny(nn.Module):
    """Conv1d layers (audio / video-time models) beside a Conv2d control: PEFT builds LoKr's
    Kronecker product on a full 3-D `lokr_w2` without a kernel axis on w1."""

    def __init__(self):
        super().__init__()
        self.c1d_k3 = nn.Conv1d(16, 32, 3, padding=1)
        self.c1d_k1 = nn.Conv1d(32, 48, 1)
        self.c2d_k3 = nn.Conv2d(16, 32, 3, padding=1)


CONV1D = ["c1d_k3", "c1d_k1", "c2d_k3"]


def _cases():
    from peft import BOFTConfig, IA3Config, LoHaConfig, LoKrConfig, LoraConfig, OFTConfig

    return {
        "lora": lambda: LoraConfig(r=8, lora_alpha=16, target_modules=ALL),
        "lora_alpha_ne_r": lambda: LoraConfig(r=4, lora_alpha=3, target_modules=ALL),
        "lora_rslora": lambda: LoraConfig(r=8, lora_alpha=4, use_rslora=True, target_modules=ALL),
        "lora_patterns": lambda: LoraConfig(r=8, lora_alpha=8, target_modules=ALL,
                                            rank_pattern={"conv3": 4, "lin": 2},
                                            alpha_pattern={"conv1": 32, "lin_nobias": 3}),
        "lora_rslora_patterns": lambda: LoraConfig(r=8, lora_alpha=8, use_rslora=True, target_modules=ALL,
                                                   rank_pattern={"sq": 2}, alpha_pattern={"conv3": 5}),
        "lora_dora": lambda: LoraConfig(r=8, lora_alpha=16, use_dora=True, target_modules=ALL),
        # PEFT refuses to merge lora_bias into a layer without bias: only layers that have one
        "lora_bias": lambda: LoraConfig(r=8, lora_alpha=16, lora_bias=True, target_modules=WITH_BIAS),
        "loha": lambda: LoHaConfig(r=8, alpha=4, target_modules=ALL),
        "loha_effective_conv": lambda: LoHaConfig(r=4, alpha=6, use_effective_conv2d=True, target_modules=ALL),
        "loha_patterns": lambda: LoHaConfig(r=8, alpha=4, target_modules=ALL,
                                            rank_pattern={"lin": 4}, alpha_pattern={"conv3": 7}),
        "lokr": lambda: LoKrConfig(r=4, alpha=2, target_modules=ALL),
        "lokr_factor4": lambda: LoKrConfig(r=4, alpha=3, decompose_factor=4, target_modules=ALL),
        "lokr_decompose_both": lambda: LoKrConfig(r=2, alpha=3, decompose_both=True, decompose_factor=16,
                                                  target_modules=ALL),
        "lokr_effective_conv": lambda: LoKrConfig(r=2, alpha=3, use_effective_conv2d=True, decompose_factor=4,
                                                  target_modules=ALL),
        # r >= every factor dim: both factors full; PEFT still scales by alpha / r
        "lokr_both_full": lambda: LoKrConfig(r=64, alpha=16, target_modules=ALL),
        # OFT blocks tile the input features (Linear I, conv I*kh*kw): block size 8 divides all of them
        "oft_neumann": lambda: OFTConfig(r=0, oft_block_size=8, target_modules=ALL),
        "oft_exact_cayley": lambda: OFTConfig(r=0, oft_block_size=8, use_cayley_neumann=False, target_modules=ALL),
        "oft_neumann_3_terms": lambda: OFTConfig(r=0, oft_block_size=8, num_cayley_neumann_terms=3,
                                                 target_modules=ALL),
        "oft_block_share": lambda: OFTConfig(r=0, oft_block_size=8, block_share=True, target_modules=ALL),
        "boft": lambda: BOFTConfig(boft_block_size=8, target_modules=["lin", "lin_nobias", "sq"]),
        "ia3": lambda: IA3Config(target_modules=ALL, feedforward_modules=[]),
        "ia3_feedforward": lambda: IA3Config(target_modules=ALL, feedforward_modules=["lin", "sq", "conv3"]),
    }


CASES = _cases()


def _conv1d_cases():
    from peft import LoKrConfig

    return {
        # r >= half of every factor: lokr_w2 is stored full, (b, d, k) on Conv1d
        "lokr_conv1d_full_w2": lambda: LoKrConfig(r=8, alpha=4, target_modules=CONV1D),
        "lokr_conv1d_full_w2_factor4": lambda: LoKrConfig(r=4, alpha=3, decompose_factor=4, target_modules=CONV1D),
        # control: w2 as w2_a @ w2_b (the Tucker form on Conv1d is left out: PEFT 0.21.2's own
        # merge fails on it in torch.kron, "view size is not compatible")
        "lokr_conv1d_decomposed": lambda: LoKrConfig(r=1, alpha=2, target_modules=CONV1D),
    }


CONV1D_CASES = _conv1d_cases()


class PeftCase:
    def __init__(self, directory, base_sd, reference_sd, adapter_path, config):
        self.directory = directory
        self.base_sd = base_sd
        self.reference_sd = reference_sd
        self.adapter_path = adapter_path
        self.config = config


def _build(case_id: str, directory) -> PeftCase:
    from peft import get_peft_model

    torch.manual_seed(11)
    model = PeftConv1dTiny() if case_id in CONV1D_CASES else PeftTiny()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.2)
    base_sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    peft_model = get_peft_model(copy.deepcopy(model), {**CASES, **CONV1D_CASES}[case_id]())
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if p.requires_grad:  # adapter parameters only
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    out = os.path.join(str(directory), case_id)
    peft_model.save_pretrained(out)
    merged_model = peft_model.merge_and_unload()
    reference = {k: v.detach().clone() for k, v in merged_model.state_dict().items()}
    assert set(reference) == set(base_sd)
    with open(os.path.join(out, "adapter_config.json"), encoding="utf-8") as handle:
        config = json.load(handle)
    return PeftCase(out, base_sd, reference, os.path.join(out, "adapter_model.safetensors"), config)


@pytest.fixture(scope="session")
def peft_case(tmp_path_factory):
    directory = tmp_path_factory.mktemp("peft_oracle")
    cache: dict[str, PeftCase] = {}

    def get(case_id):
        if case_id not in cache:
            cache[case_id] = _build(case_id, directory)
        return cache[case_id]

    return get


def _rel(ours, ref, base):
    d_ref = (ref.float() - base.float()).norm()
    d_ours = (ours.float() - ref.float()).norm()
    if d_ref == 0:
        return float(d_ours)
    return float(d_ours / d_ref)


def _check(pc: PeftCase, adapter_file, expect_changed_bias: bool):
    merged, (coverage,) = merge_into_state_dict(pc.base_sd, [(adapter_file, 1.0)])
    assert coverage.unmatched == [] and coverage.unknown_keys == [] and coverage.problems == []
    assert sorted(coverage.matched.values()) == sorted(f"{n}.weight" for n in pc.config["target_modules"])
    errors = {}
    for key, ref in pc.reference_sd.items():
        errors[key] = _rel(merged[key], ref, pc.base_sd[key])
        if key.endswith(".weight") and key[: -len(".weight")] in pc.config["target_modules"]:
            assert not torch.equal(ref, pc.base_sd[key]), f"PEFT left {key} unchanged: case tests nothing"
    if expect_changed_bias:
        assert any(not torch.equal(pc.reference_sd[k], pc.base_sd[k]) for k in pc.base_sd if k.endswith(".bias"))
    bad = {k: v for k, v in errors.items() if v > TOL}
    assert not bad, f"relative errors above {TOL}: {bad}"
    return max(errors.values())


@pytest.mark.parametrize("case_id", list(CASES))
def test_peft_file_matches_merge_and_unload(peft_case, case_id):
    pc = peft_case(case_id)
    adapter_file = load_adapter_file(pc.adapter_path)
    assert adapter_file.unknown_keys == [] and adapter_file.problems == []
    assert all(name.startswith("base_model.model.") for name in adapter_file.adapters)
    _check(pc, adapter_file, expect_changed_bias=case_id in ("lora_bias", "ia3", "ia3_feedforward"))


@pytest.mark.parametrize("case_id", list(CONV1D_CASES))
def test_peft_lokr_conv1d_matches_merge_and_unload(peft_case, case_id):
    """LoKr on Conv1d, each way PEFT stores w2; the full 3-D w2 is the case LyCORIS' layout gets wrong."""
    pc = peft_case(case_id)
    adapter_file = load_adapter_file(pc.adapter_path)
    assert adapter_file.unknown_keys == [] and adapter_file.problems == []
    w2 = {n: a.tensors.get("lokr_w2") for n, a in adapter_file.adapters.items()}
    if case_id.startswith("lokr_conv1d_full_w2"):
        assert w2["base_model.model.c1d_k3"] is not None and w2["base_model.model.c1d_k3"].dim() == 3
    _check(pc, adapter_file, expect_changed_bias=False)
    # bypass (the adapter beside the layer) against the conv run with PEFT's merged weight
    from lycoris_core.algos.base import LayerGeometry

    x = torch.randn(2, 16, 9, generator=torch.Generator().manual_seed(3))
    base_w, base_b = pc.base_sd["c1d_k3.weight"], pc.base_sd["c1d_k3.bias"]
    geometry = LayerGeometry(1, (3,), (1,), (1,), (1,), 1, tuple(base_w.shape))
    y = torch.nn.functional.conv1d(x, base_w, base_b, padding=1)
    ours = adapter_file.adapters["base_model.model.c1d_k3"].bypass(x, y.clone(), base_w, base_b, geometry)
    ref = torch.nn.functional.conv1d(x, pc.reference_sd["c1d_k3.weight"], base_b, padding=1)
    assert _rel(ours, ref, y) <= TOL


@pytest.mark.parametrize("case_id", ["lora", "lora_rslora_patterns", "lora_dora", "loha_patterns",
                                     "lokr_both_full", "ia3_feedforward"])
def test_diffusers_style_file(peft_case, tmp_path, case_id):
    """Keys `transformer.<path>.<suffix>`, PEFT config (component-prefixed keys) in the safetensors
    metadata `lora_adapter_metadata`, no adapter_config.json beside the file."""
    pc = peft_case(case_id)
    tensors = load_file(pc.adapter_path)
    renamed = {"transformer." + k[len("base_model.model."):]: v for k, v in tensors.items()}
    packed = {f"transformer.{k}": v for k, v in pc.config.items()}
    path = tmp_path / "pytorch_lora_weights.safetensors"
    save_file(renamed, str(path), {"lora_adapter_metadata": json.dumps(packed, sort_keys=True), "format": "pt"})
    assert not (tmp_path / "adapter_config.json").exists()
    adapter_file = load_adapter_file(path)
    assert all(name.startswith("transformer.") for name in adapter_file.adapters)
    _check(pc, adapter_file, expect_changed_bias=case_id == "ia3_feedforward")


def test_peft_scale_needs_the_config(peft_case, tmp_path):
    """Without adapter_config.json the file has no alpha at all; the same tensors with the config
    give alpha/r. (Guards against the config being silently ignored.)"""
    pc = peft_case("lora_alpha_ne_r")
    with_config = load_adapter_file(pc.adapter_path)
    assert with_config.adapters["base_model.model.lin"].scale == pytest.approx(3 / 4)
    lone = tmp_path / "adapter_model.safetensors"
    save_file(load_file(pc.adapter_path), str(lone))
    without = load_adapter_file(lone)
    assert without.adapters["base_model.model.lin"].scale == pytest.approx(1.0)


def _without_config(pc: PeftCase, directory) -> str:
    """The adapter file alone, as it lands in models/loras."""
    lone = os.path.join(str(directory), "adapter_model.safetensors")
    save_file(load_file(pc.adapter_path), lone)
    return lone


def test_peft_ia3_orientation_without_the_config(peft_case, tmp_path):
    """IA3's feed-forward side is in the tensors wherever they can tell: Linear vectors are (1, in)
    or (out, 1), square or not, and a conv vector's length fits one side when in != out. Here
    lin, sq and conv3 (16 -> 32) are feed-forward, conv1 and lin_nobias are not."""
    pc = peft_case("ia3_feedforward")
    adapter_file = load_adapter_file(_without_config(pc, tmp_path))
    assert adapter_file.context.peft_config is None
    _check(pc, adapter_file, expect_changed_bias=True)


def test_peft_missing_config_is_said(peft_case, tmp_path, caplog, capsys):
    """Report note, log warning and `inspect` all say the config is missing and what was assumed."""
    from lycoris_core.cli import main
    from lycoris_core.inspection import format_summary, summarize

    pc = peft_case("lora_alpha_ne_r")
    assert load_adapter_file(pc.adapter_path).notes == []
    lone = _without_config(pc, tmp_path)
    with caplog.at_level("WARNING"):
        adapter_file = load_adapter_file(lone)
    (note,) = adapter_file.notes
    assert note.startswith("no adapter_config.json beside adapter_model.safetensors: alpha taken as rank (scale 1)")
    assert note.endswith("put the config beside it")
    assert any(note in r.getMessage() and r.levelname == "WARNING" for r in caplog.records)
    assert note in format_summary(summarize(adapter_file))
    assert main(["inspect", lone]) == 0
    assert note in capsys.readouterr().out
    (tmp_path / "ia3").mkdir()
    ia3 = load_adapter_file(_without_config(peft_case("ia3"), tmp_path / "ia3"))
    assert "IA3 feed-forward layers read from the tensor shapes" in ia3.notes[0] and "alpha" not in ia3.notes[0]


def test_peft_strength_is_linear_for_lora(peft_case):
    pc = peft_case("lora")
    adapter_file = load_adapter_file(pc.adapter_path)
    merged, _ = merge_into_state_dict(pc.base_sd, [(adapter_file, 0.7)])
    for name in ALL:
        key = f"{name}.weight"
        expected = pc.base_sd[key] + 0.7 * (pc.reference_sd[key] - pc.base_sd[key])
        assert _rel(merged[key], expected, pc.base_sd[key]) <= TOL, key
