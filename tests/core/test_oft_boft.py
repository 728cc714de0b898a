"""OFT / BOFT decoders (lycoris_core.algos.oft, .boft) against the trainers that wrote the files.

LyCORIS (lycoris-lora 4.1.3, Diag-OFT and BOFT): truth is each wrapped layer's training-time
(rebuild) forward at multipliers 1.0 and 0.7 on fixed probe inputs; LyCORIS's merge helpers are
not used. Error: ||y_ours - y_oracle|| / ||y_oracle - y_base|| <= 1e-4, for the merged weight and
for bypass (which must not need the layer's weight). fp16/bf16 files: the network's parameters
(and its constraint, which the file stores as `alpha`) are rounded to the save dtype before the
truth is recorded; decoding must still compute in fp32.

PEFT 0.21.2 (OFT v2, BOFT): the reference is `merge_and_unload()`; at strength m the expected
weight is W + m (W_peft - W) (sd-scripts' rule; PEFT has no strength). BOFT with more than one
butterfly factor needs PEFT's CUDA block-diagonal kernel; a pure-torch stand-in for that kernel
lets PEFT build its own permutations on CPU.
"""

from __future__ import annotations

import copy
import json
import os

import sys

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import lycoris_oracle as lo  # noqa: E402

from lycoris_core.algos import DecodeContext, LayerGeometry
from lycoris_core.algos.boft import BOFT, PeftBOFT
from lycoris_core.algos.oft import DiagOFT, LegacyOFT, PeftOFT
from lycoris_core.errors import AdapterFormatError

TOL = 1e-4
PEFT_TOL = 1e-5
MULTIPLIERS = (1.0, 0.7)
NOISE = 0.05


Tiny, probe = lo.TinyModel, lo.probe_input  # the shared oracle's model and probe inputs


def run_layer(layer: nn.Module, x, weight, bias):
    if isinstance(layer, nn.Linear):
        return F.linear(x, weight, bias)
    return F.conv2d(x, weight, bias, layer.stride, layer.padding, layer.dilation, layer.groups)


def rel_error(ours, oracle, base) -> float:
    effect = (oracle - base).norm()
    assert effect > 0, "the adapter does not change this layer; the case tests nothing"
    return float((ours.float() - oracle).norm() / effect)


def group_modules(tensors: dict, suffixes=None) -> dict:
    """{module name: {suffix: tensor}}; LyCORIS names have no dots, PEFT suffixes are given."""
    modules: dict = {}
    for key, value in tensors.items():
        if suffixes is None:
            name, suffix = key.split(".", 1)
        else:
            suffix = next(s for s in suffixes if key.endswith("." + s))
            name = key[: -len(suffix) - 1]
        modules.setdefault(name, {})[suffix] = value
    return modules


# -- LyCORIS oracle ---------------------------------------------------------------------------
LYCORIS_CASES = {
    # id: (algo, linear_dim, kwargs, save dtype)
    "diag_oft": ("diag-oft", 16, {}, torch.float32),
    "diag_oft_dim8": ("diag-oft", 8, {}, torch.float32),
    "diag_oft_constraint": ("diag-oft", 16, {"constraint": 1e-3}, torch.float32),
    "diag_oft_rescaled": ("diag-oft", 8, {"rescaled": True}, torch.float32),
    "boft": ("boft", 8, {}, torch.float32),
    "boft_rescaled_constraint": ("boft", 16, {"rescaled": True, "constraint": 1e-3}, torch.float32),
    "diag_oft_fp16": ("diag-oft", 16, {"rescaled": True, "constraint": 1e-3}, torch.float16),
    "diag_oft_bf16": ("diag-oft", 8, {"rescaled": True, "constraint": 1e-3}, torch.bfloat16),
    "boft_fp16": ("boft", 16, {"rescaled": True, "constraint": 1e-3}, torch.float16),
    "boft_bf16": ("boft", 8, {"rescaled": True}, torch.bfloat16),
}
FAMILY = {"diag-oft": DiagOFT, "boft": BOFT}


def _reset_presets():
    from lycoris import LycorisNetwork

    LycorisNetwork.apply_preset({
        "target_module": ["Linear", "Conv2d"], "target_name": [], "name_algo_map": {}, "module_algo_map": {},
        "exclude_name": [], "lora_prefix": "lycoris", "enable_conv": True, "use_fnmatch": False,
    })


def build_lycoris(case_id: str, directory) -> dict:
    from lycoris import create_lycoris

    algo, dim, kwargs, dtype = LYCORIS_CASES[case_id]
    _reset_presets()
    torch.manual_seed(0)
    model = Tiny()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.2)  # non-trivial biases: bypass must keep b unrotated
    base = copy.deepcopy(model)
    try:
        net = create_lycoris(model, 1.0, linear_dim=dim, linear_alpha=1.0, algo=algo, **kwargs)
        net.apply_to()
    finally:
        _reset_presets()
    g = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for p in net.parameters():
            if p.dim() >= 1:  # oft_blocks start at zero, rescale at ones
                p.add_(torch.randn(p.shape, generator=g) * NOISE)
            if dtype != torch.float32:
                p.copy_(p.to(dtype).float())
        if dtype != torch.float32:
            for lora in net.loras:  # the file stores the constraint rounded, as `alpha`
                if lora.constraint > 0:
                    c = float(lora.alpha)
                    lora.constraint *= float(torch.tensor(c).to(dtype).float()) / c
    net.eval()

    layers = {}
    modules, base_modules = dict(model.named_modules()), dict(base.named_modules())
    for i, lora in enumerate(net.loras):
        path = next(n for n, m in modules.items() if m is lora.org_module[0])
        layer = base_modules[path]
        x = probe(layer, 100 + i)
        with torch.no_grad():
            outputs = {}
            for m in MULTIPLIERS:
                net.set_multiplier(m)
                outputs[m] = modules[path](x).clone()
            layers[lora.lora_name] = (layer, x, layer(x), outputs)
    path = os.path.join(str(directory), f"{case_id}.safetensors")
    net.save_weights(path, dtype, {})
    return {"path": path, "layers": layers, "family": FAMILY[algo], "dtype": dtype}


@pytest.fixture(scope="module")
def lycoris_files(tmp_path_factory):
    directory = tmp_path_factory.mktemp("lycoris_oft")
    cache = {}

    def get(case_id):
        if case_id not in cache:
            cache[case_id] = build_lycoris(case_id, directory)
        return cache[case_id]

    return get


def decoded(case) -> dict:
    tensors = load_file(case["path"])
    modules = group_modules(tensors)
    assert set(modules) == set(case["layers"])
    adapters = {}
    for name, own in modules.items():
        assert case["family"].detect(own)
        assert all(t.dtype == case["dtype"] for t in own.values())
        adapters[name] = case["family"](name, own, DecodeContext(path=case["path"]))
    return adapters


@pytest.mark.parametrize("case_id", list(LYCORIS_CASES))
def test_lycoris_merge_matches_forward(case_id, lycoris_files):
    case = lycoris_files(case_id)
    worst = 0.0
    for name, adapter in decoded(case).items():
        layer, x, y_base, outputs = case["layers"][name]
        for m, y_oracle in outputs.items():
            w, b = adapter.patch(layer.weight.detach(), m, None if layer.bias is None else layer.bias.detach())
            assert w.dtype == torch.float32 and w.shape == layer.weight.shape
            if layer.bias is not None:
                assert torch.equal(b, layer.bias.detach())  # LyCORIS never touches the bias
            err = rel_error(run_layer(layer, x, w, b), y_oracle, y_base)
            worst = max(worst, err)
            assert err <= TOL, f"{case_id} {name} m={m}: {err:.2e}"
    print(f"{case_id}: merge max rel err {worst:.1e}")


@pytest.mark.parametrize("case_id", list(LYCORIS_CASES))
def test_lycoris_bypass_matches_forward(case_id, lycoris_files):
    case = lycoris_files(case_id)
    worst = 0.0
    for name, adapter in decoded(case).items():
        layer, x, y_base, outputs = case["layers"][name]
        assert not adapter.bypass_needs_weight()
        bias = None if layer.bias is None else layer.bias.detach()
        for m, y_oracle in outputs.items():
            out = adapter.bypass(x, y_base.clone(), None, bias, LayerGeometry.of(layer), m)
            err = rel_error(out, y_oracle, y_base)
            worst = max(worst, err)
            assert err <= TOL, f"{case_id} {name} m={m}: {err:.2e}"
    print(f"{case_id}: bypass max rel err {worst:.1e}")


@pytest.mark.parametrize("composed_block", [4, 8, 16])
@pytest.mark.parametrize("case_id", ["boft", "boft_rescaled_constraint"])
def test_lycoris_boft_stage_groups_match_forward(case_id, composed_block, lycoris_files, monkeypatch):
    """BOFT multiplies its butterfly stages out in groups of blocks up to COMPOSED_BLOCK channels;
    small limits force several groups (every stage alone at 4), each gathered by its own
    reshape: merge and bypass still equal the trainer's forward."""
    import lycoris_core.algos.boft as boft

    monkeypatch.setattr(boft, "COMPOSED_BLOCK", composed_block)
    case = lycoris_files(case_id)
    stages = set()
    for name, adapter in decoded(case).items():
        layer, x, y_base, outputs = case["layers"][name]
        bias = None if layer.bias is None else layer.bias.detach()
        for m, y_oracle in outputs.items():
            w, b = adapter.patch(layer.weight.detach(), m, bias)
            assert rel_error(run_layer(layer, x, w, b), y_oracle, y_base) <= TOL, (name, m)
            out = adapter.bypass(x, y_base.clone(), None, bias, LayerGeometry.of(layer), m)
            assert rel_error(out, y_oracle, y_base) <= TOL, (name, m)
        _, groups = adapter.__dict__["_bypass_cache"]["composed"]  # (key, groups) of the last call
        stages.add(tuple((p, q) for p, q, _ in groups))
    assert any(len(g) > 1 for g in stages), stages  # the limit did split the stages


def test_lycoris_rank_and_detection(lycoris_files):
    case = lycoris_files("boft_rescaled_constraint")
    tensors = load_file(case["path"])
    for name, own in group_modules(tensors).items():
        assert BOFT.detect(own) and not DiagOFT.detect(own)
        adapter = BOFT(name, own, DecodeContext(path=case["path"]))
        assert adapter.rank == own["oft_blocks"].shape[-1]
        assert adapter.algo == "boft" and not adapter.additive
        assert set(own) <= set(BOFT.owned())


def test_legacy_oft_diag_matches_lycoris_forward(lycoris_files):
    """A LyCORIS 2.0 `oft_diag` file stores the finished R; rebuilt here from a Diag-OFT file
    (no rescale) it must reproduce the trainer's forward, including m = 0.7 (m R + (1 - m) I)."""
    case = lycoris_files("diag_oft_constraint")
    tensors = load_file(case["path"])
    for name, own in group_modules(tensors).items():
        blocks = own["oft_blocks"].double()
        q = blocks - blocks.transpose(1, 2)
        c = float(own["alpha"]) * blocks.shape[0] * blocks.shape[1]
        norm = q.norm() + 1e-8
        if norm > c:
            q = q * (c / norm)
        eye = torch.eye(q.shape[-1], dtype=q.dtype)
        legacy = {"oft_diag": ((eye + q) @ torch.linalg.inv(eye - q)).float()}
        assert LegacyOFT.detect(legacy) and not DiagOFT.detect(legacy)
        adapter = LegacyOFT(name, legacy, DecodeContext())
        layer, x, y_base, outputs = case["layers"][name]
        bias = None if layer.bias is None else layer.bias.detach()
        for m, y_oracle in outputs.items():
            w, b = adapter.patch(layer.weight.detach(), m, bias)
            assert rel_error(run_layer(layer, x, w, b), y_oracle, y_base) <= TOL
            out = adapter.bypass(x, y_base.clone(), None, bias, LayerGeometry.of(layer), m)
            assert rel_error(out, y_oracle, y_base) <= TOL


# -- bad input ----------------------------------------------------------------------------------
def test_blocks_that_do_not_fit_the_layer_name_the_key():
    # 16 blocks of 6 cover 96 output channels; the layer has 64
    adapter = DiagOFT("lycoris_lin", {"oft_blocks": torch.zeros(16, 6, 6), "alpha": torch.tensor(0.0)},
                      DecodeContext(path="bad.safetensors"))
    with pytest.raises(AdapterFormatError) as err:
        adapter.patch(torch.zeros(64, 96))
    assert err.value.key == "lycoris_lin.oft_blocks" and "lycoris_lin.oft_blocks" in str(err.value)
    with pytest.raises(AdapterFormatError) as err:
        BOFT("lycoris_x", {"oft_blocks": torch.zeros(3, 16, 6, 6)}, DecodeContext()).patch(torch.zeros(64, 8))
    assert err.value.key == "lycoris_x.oft_blocks"


@pytest.mark.parametrize("family, tensors, key", [
    (DiagOFT, {"oft_blocks": torch.zeros(4, 6, 5)}, "oft_blocks"),  # not square
    (DiagOFT, {"oft_blocks": torch.zeros(4, 6, 6), "rescale": torch.ones(23, 1)}, "rescale"),
    (LegacyOFT, {"oft_diag": torch.zeros(4, 6)}, "oft_diag"),
    (BOFT, {"oft_blocks": torch.zeros(3, 12, 6, 6)}, "oft_blocks"),  # 12 blocks: no butterfly
    (BOFT, {"oft_blocks": torch.zeros(5, 8, 6, 6)}, "oft_blocks"),  # more stages than log2(n) + 1
    (BOFT, {"oft_blocks": torch.zeros(2, 4, 5, 5)}, "oft_blocks"),  # odd block size
    (PeftOFT, {"oft_R.weight": torch.zeros(8, 27)}, "oft_R.weight"),  # 27 is no bs(bs-1)/2
    (PeftBOFT, {"boft_R": torch.zeros(2, 3, 8, 8), "boft_s": torch.ones(4, 1)}, "boft_R"),
])
def test_inconsistent_shapes_are_rejected(family, tensors, key):
    with pytest.raises(AdapterFormatError) as err:
        family("m", tensors, DecodeContext(path="bad.safetensors"))
    assert err.value.key == f"m.{key}"


def test_peft_shapes_that_do_not_fit_the_layer():
    oft = PeftOFT("base_model.model.lin", {"oft_R.weight": torch.zeros(8, 28)}, DecodeContext(convention="peft"))
    with pytest.raises(AdapterFormatError, match="input features") as err:
        oft.patch(torch.zeros(96, 72))
    assert err.value.key == "base_model.model.lin.oft_R.weight"
    shared = PeftOFT("m", {"oft_R.weight": torch.zeros(1, 28)},
                     DecodeContext(convention="peft", peft_config={"block_share": False}))
    with pytest.raises(AdapterFormatError):
        shared.patch(torch.zeros(96, 64))
    boft = PeftBOFT("m", {"boft_R": torch.zeros(1, 8, 8, 8), "boft_s": torch.ones(95, 1)}, DecodeContext())
    with pytest.raises(AdapterFormatError) as err:
        boft.patch(torch.zeros(96, 64))
    assert err.value.key == "m.boft_s"


# -- PEFT ---------------------------------------------------------------------------------------
PEFT_TARGETS = ["lin", "lin_nobias", "conv3", "conv1"]


def _peft_configs():
    from peft import BOFTConfig, OFTConfig

    return {
        "oft_neumann": (lambda: OFTConfig(r=0, oft_block_size=8, target_modules=PEFT_TARGETS), 1),
        "oft_exact_cayley": (lambda: OFTConfig(r=0, oft_block_size=8, use_cayley_neumann=False,
                                               target_modules=PEFT_TARGETS), 1),
        "oft_neumann_3_terms": (lambda: OFTConfig(r=0, oft_block_size=8, num_cayley_neumann_terms=3,
                                                  target_modules=PEFT_TARGETS), 1),
        "oft_neumann_8_terms": (lambda: OFTConfig(r=0, oft_block_size=4, num_cayley_neumann_terms=8,
                                                  target_modules=PEFT_TARGETS), 1),
        "oft_r4": (lambda: OFTConfig(r=4, oft_block_size=0, use_cayley_neumann=False, target_modules=PEFT_TARGETS), 1),
        "oft_block_share": (lambda: OFTConfig(r=0, oft_block_size=8, block_share=True,
                                              target_modules=PEFT_TARGETS), 1),
        # parameters saved unprojected (no forward after the last change): PEFT's merge projects them
        "oft_coft": (lambda: OFTConfig(r=0, oft_block_size=8, coft=True, eps=0.5, target_modules=PEFT_TARGETS), 1),
        "boft": (lambda: BOFTConfig(boft_block_size=8, target_modules=PEFT_TARGETS), 1),
        "boft_blocks4": (lambda: BOFTConfig(boft_block_size=0, boft_block_num=4, target_modules=PEFT_TARGETS), 1),
        "boft_2_factors": (lambda: BOFTConfig(boft_block_size=8, boft_n_butterfly_factor=2,
                                              target_modules=PEFT_TARGETS), 2),
        "boft_3_factors": (lambda: BOFTConfig(boft_block_size=4, boft_n_butterfly_factor=3,
                                              target_modules=["lin", "lin_nobias", "conv1"]), 3),
    }


class _BlockDiagKernel:
    """Stand-in for PEFT's `fbd_cuda` extension: (N, D, H, H) -> [(N, D*H, D*H)]."""

    @staticmethod
    def forward(blocks):
        return [torch.stack([torch.block_diag(*factor) for factor in blocks])]


def seeded_tiny() -> nn.Module:
    """The PEFT cases' base model: fixed seed, non-trivial biases."""
    torch.manual_seed(0)
    model = Tiny()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.2)
    return model


def build_peft(case_id: str, directory, monkeypatch) -> dict:
    import peft
    import peft.tuners.boft.layer as boft_layer

    make_config, factors = _peft_configs()[case_id]
    if factors > 1:
        monkeypatch.setattr(boft_layer, "_FBD_CUDA", _BlockDiagKernel())
    model = seeded_tiny()
    base = copy.deepcopy(model)
    wrapped = peft.get_peft_model(model, make_config())
    g = torch.Generator().manual_seed(99)
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            if "oft_R" in name or "boft_R" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
            elif "boft_s" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    out_dir = os.path.join(str(directory), case_id)
    wrapped.save_pretrained(out_dir)
    layers = {}
    base_modules = dict(base.named_modules())
    for i, path in enumerate(PEFT_TARGETS):
        layer = base_modules[path]
        x = probe(layer, 200 + i)
        with torch.no_grad():
            y_peft = wrapped.base_model.model.get_submodule(path)(x) if isinstance(layer, nn.Linear) else None
        layers[path] = (layer, x, y_peft)
    merged = wrapped.merge_and_unload().state_dict()
    with open(os.path.join(out_dir, "adapter_config.json")) as f:
        config = json.load(f)
    tensors = load_file(os.path.join(out_dir, "adapter_model.safetensors"))
    return {"config": config, "tensors": tensors, "merged": merged, "layers": layers,
            "path": os.path.join(out_dir, "adapter_model.safetensors")}


PEFT_SUFFIXES = ("oft_R.weight", "boft_R", "boft_s")


@pytest.mark.parametrize("case_id", list(_peft_configs()))
def test_peft_matches_merge_and_unload(case_id, tmp_path, monkeypatch):
    case = build_peft(case_id, tmp_path, monkeypatch)
    modules = group_modules(case["tensors"], PEFT_SUFFIXES)
    context = DecodeContext(path=case["path"], convention="peft", peft_config=case["config"])
    worst, worst_bypass = 0.0, 0.0
    factors = _peft_configs()[case_id][1]
    for name, own in modules.items():
        path = name.removeprefix("base_model.model.")
        family = PeftOFT if PeftOFT.detect(own) else PeftBOFT
        assert family.detect(own) and family is (PeftBOFT if case_id.startswith("boft") else PeftOFT)
        if family is PeftBOFT:
            assert own["boft_R"].shape[0] == factors
        adapter = family(name, own, context)
        layer, x, y_peft = case["layers"][path]
        w0 = layer.weight.detach()
        bias = None if layer.bias is None else layer.bias.detach()
        w_peft = case["merged"][f"{path}.weight"]
        for m in MULTIPLIERS:
            w, b = adapter.patch(w0, m, bias)
            expected = w0 + m * (w_peft - w0)
            err = float((w - expected).norm() / (expected - w0).norm())
            worst = max(worst, err)
            assert err <= PEFT_TOL, f"{case_id} {path} m={m}: {err:.2e}"
            if bias is not None:
                assert torch.equal(b, case["merged"][f"{path}.bias"])
            # bypass (input-side rotation for Linear, the patched weight for convs)
            y_base = run_layer(layer, x, w0, bias)
            truth = run_layer(layer, x, expected, bias)
            out = adapter.bypass(x, y_base.clone(), w0, bias, LayerGeometry.of(layer), m)
            err = rel_error(out, truth, y_base)
            worst_bypass = max(worst_bypass, err)
            assert err <= TOL, f"{case_id} {path} bypass m={m}: {err:.2e}"
        if case["config"].get("coft"):  # the projection is active: skipping it would be wrong
            plain = family(name, own, DecodeContext(convention="peft", peft_config={**case["config"], "coft": False}))
            w, _ = plain.patch(w0)
            assert float((w - w_peft).norm() / (w_peft - w0).norm()) > 0.1
        if y_peft is not None:  # PEFT's own (unmerged) Linear forward
            out = adapter.bypass(x, run_layer(layer, x, w0, bias), w0, bias, LayerGeometry.of(layer), 1.0)
            assert rel_error(out, y_peft, run_layer(layer, x, w0, bias)) <= TOL
    print(f"{case_id}: merge max rel err {worst:.1e}, bypass {worst_bypass:.1e}")


def test_peft_defaults_without_config(tmp_path, monkeypatch):
    """No adapter_config.json: PEFT's defaults (Neumann series, 5 terms) apply."""
    case = build_peft("oft_neumann", tmp_path, monkeypatch)
    for name, own in group_modules(case["tensors"], PEFT_SUFFIXES).items():
        path = name.removeprefix("base_model.model.")
        w0 = case["layers"][path][0].weight.detach()
        w, _ = PeftOFT(name, own, DecodeContext(convention="peft")).patch(w0)
        w_peft = case["merged"][f"{path}.weight"]
        assert float((w - w_peft).norm() / (w_peft - w0).norm()) <= PEFT_TOL


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_peft_half_precision_files_decode_in_fp32(dtype, tmp_path, monkeypatch):
    """A PEFT file saved in half precision decodes (in fp32) to PEFT's merge of the rounded params."""
    import peft

    for case_id in ("oft_exact_cayley", "boft"):
        case = build_peft(case_id, tmp_path / case_id, monkeypatch)
        rounded = {k: v.to(dtype) for k, v in case["tensors"].items()}
        half_dir = tmp_path / f"{case_id}_half"
        os.makedirs(half_dir)
        save_file(rounded, str(half_dir / "adapter_model.safetensors"))
        with open(half_dir / "adapter_config.json", "w") as f:
            json.dump(case["config"], f)
        model = seeded_tiny()
        base = copy.deepcopy(model)
        loaded = peft.PeftModel.from_pretrained(model, str(half_dir))
        loaded.float()  # the rounded values, computed in fp32
        merged = loaded.merge_and_unload().state_dict()
        context = DecodeContext(convention="peft", peft_config=case["config"])
        for name, own in group_modules(rounded, PEFT_SUFFIXES).items():
            path = name.removeprefix("base_model.model.")
            adapter = (PeftOFT if PeftOFT.detect(own) else PeftBOFT)(name, own, context)
            w0 = base.get_submodule(path).weight.detach()
            w, _ = adapter.patch(w0)
            assert w.dtype == torch.float32
            w_peft = merged[f"{path}.weight"]
            assert float((w - w_peft).norm() / (w_peft - w0).norm()) <= PEFT_TOL, f"{case_id} {path}"
