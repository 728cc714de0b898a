"""The factored bypass as a layer runs it: input-side transforms before the base forward,
W-dependent constants computed once per weight token, then each adapter beside the layer.

Truth: lycoris-lora's own forward (strengths 1, 0.5, -1; Linear and conv, with and without
bias), PEFT's merge_and_unload for PEFT DoRA, and for stacks the sequential merge (each
family's merge is checked against its trainer elsewhere).
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
from lycoris_core.algos.base import DecodeContext, chain_inputs, patching_cheaper, plan_bypass, weight_token  # noqa: E402
from lycoris_core.algos.boft import PeftBOFT  # noqa: E402
from lycoris_core.algos.oft import PeftOFT  # noqa: E402

TOL = 1e-5  # relative to the adapter's effect at full strength: fp32 rounding of y does not shrink with m
STRENGTHS = (1.0, 0.5, -1.0)
CASES = ["lora", "locon", "locon_tucker", "loha", "loha_tucker", "lokr_f4", "lokr_tucker", "glora", "rs_glora",
         "ia3_output", "ia3_input", "diag_oft", "boft", "diag_oft_rescaled", "full", "dora_lora_out",
         "dora_lora_in", "dora_loha", "dora_lokr"]


@pytest.fixture(scope="module")
def oracle(tmp_path_factory):
    return lo.case_builder(tmp_path_factory.mktemp("bypass_factored"), multipliers=STRENGTHS)


def run_layer(layer, x, entries, token):
    """What nodes/bypass.py does: the weight only when some adapter asks for it on this call."""
    geometry = LayerGeometry.of(layer)
    steps, needs = plan_bypass([(a, m, True) for a, m in entries], geometry, token)
    weight = layer.weight.detach() if needs else None
    inputs = chain_inputs(x, steps, weight, geometry, token)
    with torch.no_grad():
        y = torch.nn.functional.linear(inputs[0], layer.weight, layer.bias) if geometry.linear \
            else layer._conv_forward(inputs[0], layer.weight, layer.bias)
        for (a, m, side), x_k in zip(steps, inputs[1:]):
            y = a.bypass(x_k, y, weight, layer.bias, geometry, m, token=token, input_applied=side)
    return y, needs


@pytest.mark.parametrize("case_id", CASES)
def test_factored_bypass_reproduces_the_trainers_forward(oracle, case_id):
    oc = oracle(case_id)
    adapters = load_adapter_file(oc.path).adapters
    errors = {}
    for path, record in oc.layers.items():
        layer = record.base_layer
        token = weight_token(layer.weight)
        for m in STRENGTHS:
            adapter = adapters[record.lora_name].moved(torch.device("cpu"))  # a fresh cache, as per device
            first, _ = run_layer(layer, record.x, [(adapter, m)], token)
            again, needs_again = run_layer(layer, record.x, [(adapter, m)], token)
            assert not needs_again, f"{case_id} {path}: the second call still reads the weight"
            assert not adapter.bypass_is_dense(LayerGeometry.of(layer))
            torch.testing.assert_close(again, first, rtol=0, atol=0)
            errors[(path, m)] = lo.rel_error(first, record.y[m], record.y_base) * min(1.0, abs(m))
    assert max(errors.values()) <= TOL, f"{case_id}: {errors}"


@pytest.mark.parametrize("case_id", CASES)
def test_bypass_form_follows_the_token_count(oracle, case_id):
    """The cost model keeps a one-token call factored and patches the weight for a call with a
    million tokens, for every family and layer kind; T-LoRA (whose forward masks ranks per step,
    unlike its merge) never patches."""
    oc = oracle(case_id)
    adapters = load_adapter_file(oc.path).adapters
    for record in oc.layers.values():
        entries = [(adapters[record.lora_name], tuple(record.base_layer.weight.shape))]
        assert not patching_cheaper(entries, 1), case_id
        assert patching_cheaper(entries, 10**6), case_id
        assert not patching_cheaper(entries * 2, 1) and patching_cheaper(entries * 2, 10**6)


@pytest.mark.parametrize("case_id", ["lora", "loha", "boft"])
def test_a_slice_is_charged_the_whole_working_copy(oracle, case_id):
    """An adapter on a slice of a fused layer (Flux qkv) patches a copy of the whole weight:
    at the token count where its own slice would just tip the model to patching, a weight three
    slices tall keeps it factored."""
    oc = oracle(case_id)
    adapters = load_adapter_file(oc.path).adapters
    for record in oc.layers.values():
        shape = tuple(record.base_layer.weight.shape)
        entries = [(adapters[record.lora_name], shape)]
        low, high = 1, 10**9  # the least token count that patches, by bisection
        while low < high:
            mid = (low + high) // 2
            low, high = (low, mid) if patching_cheaper(entries, mid) else (mid + 1, high)
        fused = (3 * shape[0],) + shape[1:]
        assert patching_cheaper(entries, low) and patching_cheaper(entries, low, shape)
        assert not patching_cheaper(entries, low, fused), (case_id, shape, low)


def test_tlora_never_patches(oracle):
    oc = oracle("tlora")
    adapters = load_adapter_file(oc.path).adapters
    for record in oc.layers.values():
        adapter = adapters[record.lora_name]
        assert adapter.algo == "tlora" and not patching_cheaper([(adapter, tuple(record.base_layer.weight.shape))], 10**6)


def test_dora_scale_is_recomputed_when_the_weight_changes(oracle):
    oc = oracle("dora_lora_out")
    adapters = load_adapter_file(oc.path).adapters
    record = oc.layers["lin"]
    layer = record.base_layer
    adapter = adapters[record.lora_name].moved(torch.device("cpu"))
    geometry = LayerGeometry.of(layer)
    run_layer(layer, record.x, [(adapter, 0.5)], weight_token(layer.weight))
    assert not adapter.bypass_needs_weight(geometry, token=weight_token(layer.weight), strength=0.5)
    assert adapter.bypass_needs_weight(geometry, token=weight_token(layer.weight), strength=1.0)
    with torch.no_grad():
        layer.weight.mul_(1.5)  # in place: same storage, new version
    token = weight_token(layer.weight)
    assert adapter.bypass_needs_weight(geometry, token=token, strength=0.5)
    try:
        y, needs = run_layer(layer, record.x, [(adapter, 0.5)], token)
        assert needs
        w_new, b_new = adapter.patch(layer.weight.detach(), 0.5, layer.bias)
        expected = torch.nn.functional.linear(record.x, w_new, b_new)
        assert lo.rel_error(y, expected, torch.nn.functional.linear(record.x, layer.weight, layer.bias)) <= TOL
        # a different tensor (new storage) is a new token too
        other = layer.weight.detach().clone()
        assert adapter.bypass_needs_weight(geometry, token=weight_token(other), strength=0.5)
    finally:
        with torch.no_grad():
            layer.weight.div_(1.5)


def test_dora_without_weight_or_cache_names_the_key(oracle):
    oc = oracle("dora_lora_out")
    record = oc.layers["lin"]
    adapter = load_adapter_file(oc.path).adapters[record.lora_name]
    y = record.y_base.clone()
    with pytest.raises(Exception, match=record.lora_name):
        adapter.bypass(record.x, y, None, record.base_layer.bias, LayerGeometry.of(record.base_layer), 1.0,
                       token=("never", "seen"))


def _peft_oft(columns, block):
    tensors = {"oft_R.weight": torch.randn(columns // block, block * (block - 1) // 2) * 0.1}
    return PeftOFT("oft", tensors, DecodeContext(convention="peft", peft_config={"use_cayley_neumann": False}))


def _peft_boft(out, columns, block):
    tensors = {"boft_R": torch.randn(2, columns // block, block, block) * 0.1, "boft_s": 1 + 0.1 * torch.randn(out, 1)}
    return PeftBOFT("boft", tensors, DecodeContext(convention="peft"))


@pytest.mark.parametrize("bias", [True, False])
def test_stacked_bypass_equals_the_sequential_merge(oracle, bias):
    """Input-side (GLoRA, IA3 on input, PEFT OFT/BOFT, input-axis DoRA), output-side (Diag-OFT,
    output DoRA) and additive families in one stack: bypass == merging them one after another.
    DoRA normalises with the weight it was given, so it comes first (the base weight)."""
    torch.manual_seed(3)
    layer = torch.nn.Linear(64, 96, bias=bias)
    stack = []
    for case_id, m in [("dora_lora_in", 0.5), ("glora", -1.0), ("ia3_input", 0.5), ("loha", 1.0),
                       ("diag_oft_rescaled", 0.5), ("lokr_f4", -1.0), ("dora_lora_out", 1.0)]:
        oc = oracle(case_id)
        stack.append((load_adapter_file(oc.path).adapters[oc.layers["lin"].lora_name], m))
    stack[-1:-1] = [(_peft_oft(64, 8), 0.5), (_peft_boft(96, 64, 8), 1.0)]
    dora_first = stack[0]
    x = torch.randn(3, 5, 64)
    token = weight_token(layer.weight)
    for order in (stack[:-1], [dora_first] + stack[1:-1][::-1], [stack[-1]] + stack[1:-1]):
        moved = [(a.moved(torch.device("cpu")), m) for a, m in order]
        y, _ = run_layer(layer, x, moved, token)
        w, b = layer.weight.detach(), None if layer.bias is None else layer.bias.detach()
        for a, m in order:
            w, b = a.patch(w, m, b)
        with torch.no_grad():
            expected = torch.nn.functional.linear(x, w, b)
            base = layer(x)
        assert lo.rel_error(y, expected, base) <= TOL
        y_again, needs = run_layer(layer, x, moved, token)
        assert not needs  # everything that depends on W is cached by now
        torch.testing.assert_close(y_again, y, rtol=0, atol=0)


def test_peft_dora_bypass_matches_merge_and_unload(tmp_path):
    import test_peft_oracle as po

    pc = po._build("lora_dora", tmp_path)
    adapters = load_adapter_file(pc.adapter_path).adapters
    model = po.PeftTiny()
    torch.manual_seed(0)
    for name in po.ALL:
        layer = getattr(model, name)
        layer.load_state_dict({k: pc.base_sd[f"{name}.{k}"] for k in layer.state_dict()})
        adapter = next(a for key, a in adapters.items() if key.endswith(name)).moved(torch.device("cpu"))
        x = lo.probe_input(layer, seed=7)
        with torch.no_grad():
            base = layer(x)
            merged = torch.nn.utils.stateless.functional_call(
                layer, {k: pc.reference_sd[f"{name}.{k}"] for k in layer.state_dict()}, (x,))
        token = weight_token(layer.weight)
        for m in STRENGTHS:
            y, _ = run_layer(layer, x, [(adapter, m)], token)
            w, b = adapter.patch(layer.weight.detach(), m, layer.bias)
            with torch.no_grad():
                ours_merge = layer._conv_forward(x, w, b) if w.dim() > 2 else torch.nn.functional.linear(x, w, b)
            assert lo.rel_error(y, ours_merge, base) <= TOL, (name, m)
            if m == 1.0:
                assert lo.rel_error(y, merged, base) <= TOL, name
        assert not run_layer(layer, x, [(adapter, -1.0)], token)[1]
