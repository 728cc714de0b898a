"""Bypass forwards reproduce the LyCORIS training forward for every case of the merge oracle.

y' = adapter.bypass(x, f(x), W, b, geometry, m) must match the wrapped layer's output within
1e-4 (relative to the adapter's effect), and families with an output- or factor-side form
must not need the layer's weight (quantized layers have none to read).
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

import lycoris  # noqa: F401  (the oracle: a test-only dependency, never skipped)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import lycoris_oracle as lo  # noqa: E402

from lycoris_core import LayerGeometry, load_adapter_file  # noqa: E402

TOL = 1e-4
NEEDS_NO_WEIGHT = {"lora", "locon", "loha", "lokr_f4", "lokr_default", "ia3_output", "diag_oft", "boft",
                   "diag_oft_rescaled", "full"}


@pytest.fixture(scope="session")
def oracle(tmp_path_factory):
    return lo.case_builder(tmp_path_factory.mktemp("bypass_oracle"))


@pytest.mark.parametrize("m", lo.MULTIPLIERS)
@pytest.mark.parametrize("case_id", [c for c in lo.ORACLE_CASE_IDS if c not in ("norms",)])
def test_bypass_reproduces_lycoris_forward(oracle, case_id, m):
    oc = oracle(case_id)
    adapters = load_adapter_file(oc.path).adapters
    errors = {}
    for path, record in oc.layers.items():
        layer = record.base_layer
        adapter = adapters[record.lora_name]
        weight = None if case_id in NEEDS_NO_WEIGHT else layer.weight.detach()
        assert (case_id not in NEEDS_NO_WEIGHT) or not adapter.bypass_needs_weight() or adapter.algo == "full"
        if adapter.algo == "full":
            weight = layer.weight.detach()  # only to learn whether the layer has a bias to shift
        with torch.no_grad():
            y = adapter.bypass(record.x, record.y_base.clone(), weight, layer.bias, LayerGeometry.of(layer), m)
        errors[path] = lo.rel_error(y, record.y[m], record.y_base)
    assert max(errors.values()) <= TOL, f"{case_id} m={m}: {errors}"


@pytest.mark.parametrize("timestep", [0, 350, 600, 999])
def test_tlora_bypass_applies_the_trainers_timestep_mask(tmp_path, timestep):
    """lycoris-lora's own masked forward (set_timestep_mask + compute_timestep_mask) is the truth."""
    import copy

    from lycoris import create_lycoris
    from lycoris.modules.tlora import clear_timestep_mask, compute_timestep_mask, set_timestep_mask

    from lycoris_core.algos.tlora import TLoRA

    lo.reset_presets(["Linear"])
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 48), torch.nn.Linear(48, 24))
    base = copy.deepcopy(model)
    net = create_lycoris(model, 1.0, linear_dim=8, linear_alpha=4, algo="tlora")
    net.apply_to()
    lo.randomise(net, use_scalar=False)
    path = tmp_path / "tlora.safetensors"
    metadata = {"ss_network_args": '{"algo": "tlora", "tlora_min_rank": "2", "tlora_alpha": "1.5"}'}
    net.save_weights(str(path), torch.float32, metadata)
    adapters = load_adapter_file(path).adapters
    for adapter in adapters.values():
        assert isinstance(adapter, TLoRA)
        adapter.clock = torch.tensor(float(timestep))  # what the node layer fills per model call
    x = torch.randn(3, 5, 32)
    set_timestep_mask(compute_timestep_mask(timestep, 1000, 8, 2, 1.5))
    try:
        for i, (layer, base_layer) in enumerate(zip(model, base)):
            inp = x if i == 0 else torch.randn(3, 5, 48)
            with torch.no_grad():
                truth, y_base = layer(inp), base_layer(inp)
                ours = adapters[f"lycoris_{i}"].bypass(inp, y_base.clone(), base_layer.weight, base_layer.bias,
                                                      LayerGeometry.of(base_layer), 1.0)
            assert lo.rel_error(ours, truth, y_base) <= TOL
    finally:
        clear_timestep_mask()
