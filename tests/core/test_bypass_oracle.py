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
    directory = tmp_path_factory.mktemp("bypass_oracle")
    cache: dict = {}

    def get(case_id):
        if case_id not in cache:
            cache[case_id] = lo.build_case(lo.CASES[case_id], directory)
        return cache[case_id]

    return get


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
