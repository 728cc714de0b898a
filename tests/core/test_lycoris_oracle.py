"""Merged weights from lycoris_core reproduce the LyCORIS 4.1.3 training forward.

Every case of `lycoris_oracle.CASES` is a file written by lycoris-lora itself; the truth is the
wrapped layers' forward (rebuild mode) at multipliers 1.0 and 0.7. Error metric:
||y_ours - y_oracle|| / ||y_oracle - y_base|| (relative to the adapter's effect).
"""

from __future__ import annotations

import math
import os
import sys

import pytest
import torch

import lycoris  # noqa: F401,E402  (the oracle: a test-only dependency, never skipped)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import lycoris_oracle as lo  # noqa: E402

from lycoris_core import load_adapter_file, merge_into_state_dict  # noqa: E402

TOL = 1e-4

# algorithm each case must decode as (per module); norms mix two families
EXPECTED_ALGO = {
    "locon": "lora", "locon_tucker": "lora", "lora_alpha0": "lora", "lora_scalar": "lora",
    "loha_tucker": "loha", "loha_scalar": "loha", "dylora": "lora", "full": "full",
    "ia3_output": "ia3", "ia3_input": "ia3", "glora_scalar": "glora", "rs_glora": "glora",
    "tlora": "tlora",
}


def expected_algo(case_id: str, module: str) -> str:
    if case_id == "norms":
        return "lora" if module == "lycoris_lin" else "norm"
    return EXPECTED_ALGO.get(case_id, lo.CASES[case_id].algo)


@pytest.fixture(scope="session")
def oracle(tmp_path_factory):
    return lo.case_builder(tmp_path_factory.mktemp("lycoris_oracle"))


@pytest.fixture(scope="session")
def kohya_oracle(tmp_path_factory):
    return lo.build_kohya(tmp_path_factory.mktemp("kohya_oracle"))


def _merge(oc: lo.OracleCase, m: float):
    adapter_file = load_adapter_file(oc.path)
    before = {k: v.clone() for k, v in oc.base_state_dict.items()}
    merged, coverages = merge_into_state_dict(oc.base_state_dict, [(adapter_file, m)])
    for k, v in before.items():  # the input state dict is never modified
        assert torch.equal(oc.base_state_dict[k], v), k
    return adapter_file, merged, coverages


@pytest.mark.parametrize("m", lo.MULTIPLIERS)
@pytest.mark.parametrize("case_id", lo.ORACLE_CASE_IDS)
def test_merge_reproduces_lycoris_forward(oracle, case_id, m):
    oc = oracle(case_id)
    adapter_file, merged, coverages = _merge(oc, m)
    (coverage,) = coverages
    file_modules = {r.lora_name for r in oc.layers.values()}
    assert set(adapter_file.adapters) == file_modules
    assert coverage.matched == {r.lora_name: f"{p}.weight" for p, r in oc.layers.items()}
    assert coverage.unmatched == [] and coverage.unknown_keys == [] and coverage.problems == []
    assert adapter_file.unknown_keys == [] and adapter_file.problems == []
    errors = {
        path: lo.rel_error(lo.layer_output(rec, merged), rec.y[m], rec.y_base)
        for path, rec in oc.layers.items()
    }
    worst = max(errors, key=errors.get)
    assert errors[worst] <= TOL, f"{case_id} m={m}: rel errors {errors}"
    # layers the adapter does not touch are shared, not copied
    for key in oc.base_state_dict:
        if key.rsplit(".", 1)[0] not in oc.layers:
            assert merged[key] is oc.base_state_dict[key]


@pytest.mark.parametrize("case_id", list(lo.CASES))
def test_decodes_as_expected_algorithm(oracle, case_id):
    oc = oracle(case_id)
    adapter_file = load_adapter_file(oc.path)
    for name, adapter in adapter_file.adapters.items():
        assert adapter.algo == expected_algo(case_id, name), name
        if "dora" in case_id:
            assert adapter.describe().get("dora"), name


@pytest.mark.parametrize("case_id", ["lora_fp16", "lora_bf16", "loha_fp16", "loha_bf16", "lokr_fp16", "lokr_bf16"])
def test_save_dtype_cases_really_are_half(oracle, case_id):
    oc = oracle(case_id)
    dtypes = {v.dtype for v in oc.saved.values()}
    assert dtypes == {lo.CASES[case_id].save_dtype}


# gamma per module that the construction implies (linear dim/alpha for Linear and 1x1 conv)
EXPECTED_SCALE = {
    "lora": {"lycoris_lin": 4 / 8, "lycoris_conv3": 4 / 8, "lycoris_conv1": 4 / 8},
    "locon": {"lycoris_lin": 4 / 8, "lycoris_conv3": 2 / 4, "lycoris_conv1": 4 / 8},
    "lora_alpha0": {"lycoris_lin": 1.0, "lycoris_conv3": 1.0},  # LyCORIS stores alpha = rank
    "lokr_full_matrix": {"lycoris_lin": 1.0, "lycoris_conv3": 1.0, "lycoris_conv1": 1.0},
    "lokr_full_matrix_nometa": {"lycoris_lin": 1.0, "lycoris_conv3": 1.0, "lycoris_conv1": 1.0},
    "rs_lora": {"lycoris_lin": 4 / math.sqrt(8), "lycoris_conv3": 2 / math.sqrt(4)},
    "rs_loha": {"lycoris_lin": 4 / math.sqrt(8), "lycoris_conv3": 2 / math.sqrt(4)},
    "rs_glora": {"lycoris_lin": 4 / math.sqrt(8), "lycoris_conv3": 2 / math.sqrt(4)},
    "rs_lokr_full": {"lycoris_lin": math.sqrt(16), "lycoris_conv3": math.sqrt(16)},
    "rs_lokr": {"lycoris_conv1": math.sqrt(8)},  # both factors full: needs ss_network_dim
}


@pytest.mark.parametrize("case_id", list(EXPECTED_SCALE))
def test_scale(oracle, case_id):
    adapters = load_adapter_file(oracle(case_id).path).adapters
    for name, gamma in EXPECTED_SCALE[case_id].items():
        assert adapters[name].scale == pytest.approx(gamma, rel=1e-5), name


def test_ranks(oracle):
    assert load_adapter_file(oracle("lora").path).adapters["lycoris_lin"].rank == 8
    assert load_adapter_file(oracle("locon").path).adapters["lycoris_conv3"].rank == 4
    assert load_adapter_file(oracle("loha_tucker").path).adapters["lycoris_conv3"].rank == 4
    lokr = load_adapter_file(oracle("lokr_tucker").path).adapters
    assert lokr["lycoris_conv3"].rank == 2  # from lokr_w2_b, not lokr_w2_a (= b for Tucker)
    both = load_adapter_file(oracle("lokr_decompose_both").path).adapters
    assert both["lycoris_lin"].rank == 2


def test_dylora_decodes_as_full_rank_lora(oracle):
    """DyLoRA's forward draws a random rank, so there is no output oracle. Shape/scale check only:
    the file decodes as LoRA at the full rank, conv ups may be 2-D, and the merge equals
    W + m*(alpha/r)*up@down computed here from the saved tensors (NOT an oracle)."""
    oc = oracle("dylora")
    adapter_file = load_adapter_file(oc.path)
    assert oc.saved["lycoris_conv3.lora_up.weight"].dim() == 2  # LyCORIS writes conv ups 2-D
    assert oc.saved["lycoris_conv1.lora_up.weight"].dim() == 2
    expected_rank = {"lycoris_lin": 8, "lycoris_lin_nobias": 8, "lycoris_conv3": 4, "lycoris_conv1": 8}
    for name, rank in expected_rank.items():
        assert adapter_file.adapters[name].algo == "lora"
        assert adapter_file.adapters[name].rank == rank
    for m in lo.MULTIPLIERS:
        merged, (coverage,) = merge_into_state_dict(oc.base_state_dict, [(adapter_file, m)])
        assert coverage.complete and len(coverage.matched) == 4
        for path, record in oc.layers.items():
            up = oc.saved[f"{record.lora_name}.lora_up.weight"].float()
            down = oc.saved[f"{record.lora_name}.lora_down.weight"].float()
            alpha = float(oc.saved[f"{record.lora_name}.alpha"])
            w = oc.base_state_dict[f"{path}.weight"]
            expected = w + m * (alpha / down.shape[0]) * (up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)).reshape(w.shape)
            assert torch.allclose(merged[f"{path}.weight"], expected, rtol=0, atol=1e-6), path


def test_kohya_names_match_the_right_layers(kohya_oracle):
    """lycoris.kohya with two text encoders (a list) and a U-Net: lora_te1_/lora_te2_/lora_unet_
    names decode, each component's state dict gets exactly its own modules, outputs match."""
    adapter_file = load_adapter_file(kohya_oracle.path)
    prefixes = {"te1": "lora_te1_", "te2": "lora_te2_", "unet": "lora_unet_"}
    all_modules = {r.lora_name for layers in kohya_oracle.layers.values() for r in layers.values()}
    assert set(adapter_file.adapters) == all_modules
    for component, layers in kohya_oracle.layers.items():
        assert layers and all(r.lora_name.startswith(prefixes[component]) for r in layers.values())
        base_sd = {k: v.detach().clone() for k, v in kohya_oracle.components[component].state_dict().items()}
        for m in lo.MULTIPLIERS:
            merged, (coverage,) = merge_into_state_dict(base_sd, [(adapter_file, m)])
            assert coverage.matched == {r.lora_name: f"{p}.weight" for p, r in layers.items()}
            assert set(coverage.unmatched) == all_modules - set(coverage.matched)
            for path, record in layers.items():
                err = lo.rel_error(lo.layer_output(record, merged), record.y[m], record.y_base)
                assert err <= TOL, (component, path, m, err)


@pytest.mark.parametrize("case_id", ["loha", "loha_tucker", "boft", "boft_rescaled_constraint"])
def test_patch_of_a_weight_autograd_tracks(oracle, case_id, monkeypatch):
    """A weight that requires grad (a model's Parameter patched outside no_grad, as ComfyUI's
    partial loads do) gets the same patch: the reused buffers of the fast path are skipped.
    BOFT's stages are split into several groups (a gather between each)."""
    import lycoris_core.algos.boft as boft

    monkeypatch.setattr(boft, "COMPOSED_BLOCK", 4)
    oc = oracle(case_id)
    adapters = load_adapter_file(oc.path).adapters
    for record in oc.layers.values():
        adapter, weight = adapters[record.lora_name], record.base_layer.weight.detach()
        with torch.no_grad():
            fast, _ = adapter.patch(weight, 0.7)
        tracked, _ = adapter.patch(weight.clone().requires_grad_(True), 0.7)
        assert tracked.requires_grad
        torch.testing.assert_close(tracked.detach(), fast, rtol=0, atol=1e-6)
