"""DyLoRA slicing: the sliced file reproduces what each trainer computed at the slice rank.

LyCORIS `algo=dylora`: the module's sampler calls `get_weight(b * block_size)`, which uses
ceil(rank / bs) + 1 blocks with scale alpha / (that many blocks) -- so the module's own output
over the first k ranks is `get_weight(k - block_size)` (the off-by-one), at scale alpha * bs / k.
"""

import json
import math

import pytest
import torch
import torch.nn as nn

from lycoris_core import decode_tensors, load_adapter_file
from lycoris_core.dylora import new_alpha, slice_dylora
from lycoris_core.safe_io import save_tensors_atomic


class _Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(16, 24)
        self.conv = nn.Conv2d(8, 12, 3, padding=1)

    def forward(self, x):
        return self.lin(x)


@pytest.fixture(scope="module")
def lycoris_dylora(tmp_path_factory):
    lycoris = pytest.importorskip("lycoris")
    torch.manual_seed(0)
    # other tests change LycorisNetwork's class-level presets: set the targets this test needs
    saved = {k: getattr(lycoris.LycorisNetwork, k) for k in ("TARGET_REPLACE_MODULE", "TARGET_REPLACE_NAME",
                                                                "MODULE_ALGO_MAP", "NAME_ALGO_MAP", "ENABLE_CONV")
             if hasattr(lycoris.LycorisNetwork, k)}
    lycoris.LycorisNetwork.apply_preset({"target_module": ["Linear", "Conv2d"], "target_name": [], "name_algo_map": {},
                                         "module_algo_map": {}, "enable_conv": True})
    model = _Model()
    originals = {name: mod.weight.detach().clone() for name, mod in (("lin", model.lin), ("conv", model.conv))}
    net = lycoris.create_lycoris(model, 1.0, linear_dim=8, linear_alpha=4, algo="dylora", block_size=2)
    net.apply_to()
    for key, value in saved.items():
        setattr(lycoris.LycorisNetwork, key, value)
    assert {l.lora_name for l in net.loras} == {"lycoris_lin", "lycoris_conv"}
    for p in net.parameters():
        nn.init.normal_(p, std=0.1)
    path = tmp_path_factory.mktemp("dy") / "dylora.safetensors"
    state = {k: v.detach().float() for k, v in net.state_dict().items()}
    save_tensors_atomic(path, state, {"ss_network_args": json.dumps({"algo": "dylora", "block_size": "2"})})
    return model, net, originals, path


@pytest.mark.parametrize("k", [2, 4, 6, 8])
def test_lycoris_slice_reproduces_module_output(lycoris_dylora, tmp_path, k):
    model, net, originals, path = lycoris_dylora
    out = tmp_path / f"slice{k}.safetensors"
    result = slice_dylora(path, k, out)
    assert result.metadata["lycoris_pack.alpha_policy"] == "lycoris-train"
    sliced = load_adapter_file(out)
    torch.manual_seed(1)
    x = torch.randn(5, 16)
    xc = torch.randn(2, 8, 6, 6)
    for module_name, layer, inp in (("lycoris_lin", model.lin, x), ("lycoris_conv", model.conv, xc)):
        lyco = next(l for l in net.loras if l.lora_name == module_name)
        lyco.get_random_rank_weight = lambda lyco=lyco: lyco.get_weight(k - lyco.block_size)
        with torch.no_grad():
            expected = layer(inp)  # LyCORIS's own forward (non-bypass) at k ranks
        name = "lin" if module_name == "lycoris_lin" else "conv"
        weight = originals[name]
        patched, _ = sliced.adapters[module_name].patch(weight)
        got = (nn.functional.linear(inp, patched, layer.bias) if name == "lin" else
               nn.functional.conv2d(inp, patched, layer.bias, padding=1))
        assert torch.allclose(got, expected, rtol=1e-5, atol=1e-5), float((got - expected).abs().max())
        assert sliced.adapters[module_name].rank == k


def _sds_file(tmp_path, unit=2, rank=8, alpha=4.0):
    torch.manual_seed(0)
    tensors = {
        "lora_unet_a.lora_down.weight": torch.randn(rank, 20),
        "lora_unet_a.lora_up.weight": torch.randn(30, rank),
        "lora_unet_a.alpha": torch.tensor(alpha),
        "lora_unet_c.lora_down.weight": torch.randn(rank, 4, 3, 3),
        "lora_unet_c.lora_up.weight": torch.randn(6, rank, 1, 1),
        "lora_unet_c.alpha": torch.tensor(alpha),
    }
    path = tmp_path / "sds.safetensors"
    save_tensors_atomic(path, tensors, {"ss_network_module": "networks.dylora",
                                        "ss_network_args": json.dumps({"unit": str(unit)})})
    return path, tensors


@pytest.mark.parametrize("policy,expected", [
    ("trainer", 4.0 * math.sqrt(4 / 8)),
    ("sds-train", 4.0 * math.sqrt(4 / 8)),
    ("kohya-extractor", 4.0),
    ("webui-dyn", 4.0 * 4 / 8),
])
def test_sds_policies(tmp_path, policy, expected):
    path, tensors = _sds_file(tmp_path)
    result = slice_dylora(path, 4, alpha_policy=policy)
    out = decode_tensors(result.tensors, result.metadata)
    for name in ("lora_unet_a", "lora_unet_c"):
        assert out.adapters[name].alpha == pytest.approx(expected, rel=1e-6)
        assert torch.equal(result.tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_down.weight"][:4])
        assert torch.equal(result.tensors[f"{name}.lora_up.weight"], tensors[f"{name}.lora_up.weight"][:, :4])
    assert result.metadata["lycoris_pack.alpha_policy"] == ("sds-train" if policy == "trainer" else policy)
    assert result.metadata["ss_network_dim"] == "4"
    # the sd-scripts training scale at rank 4: alpha / sqrt(r * r')
    if policy in ("trainer", "sds-train"):
        assert out.adapters["lora_unet_a"].scale == pytest.approx(4.0 / math.sqrt(8 * 4), rel=1e-6)


def test_webui_dyn_reports_truncation_only(tmp_path):
    path, _ = _sds_file(tmp_path)
    result = slice_dylora(path, 8, alpha_policy="webui-dyn")
    assert all(layer.rel_error < 1e-6 for layer in result.layers)
    result = slice_dylora(path, 4, alpha_policy="webui-dyn")
    for layer in result.layers:  # same scale: error^2 + kept <= 1 only up to cross terms; both reported
        assert 0 < layer.rel_error and 0 < layer.energy_kept < 1


def test_rank_not_multiple_of_unit_refused(tmp_path):
    path, _ = _sds_file(tmp_path, unit=4)
    with pytest.raises(ValueError, match="multiple of the DyLoRA rank step 4"):
        slice_dylora(path, 6)


def test_unmarked_file_needs_explicit_policy(tmp_path):
    torch.manual_seed(0)
    tensors = {"lora_unet_a.lora_down.weight": torch.randn(8, 20), "lora_unet_a.lora_up.weight": torch.randn(30, 8),
               "lora_unet_a.alpha": torch.tensor(8.0)}
    path = tmp_path / "plain.safetensors"
    save_tensors_atomic(path, tensors, {})
    with pytest.raises(ValueError, match="alpha policy"):
        slice_dylora(path, 4)
    result = slice_dylora(path, 4, alpha_policy="kohya-extractor")
    assert result.layers[0].alpha == 8.0


def test_new_alpha_rules():
    assert new_alpha("lycoris-train", 4.0, 8, 4, block_size=2) == 8.0
    assert new_alpha("webui-dyn", 4.0, 8, 2) == 1.0
    assert new_alpha("sds-train", 4.0, 16, 4) == pytest.approx(2.0)
