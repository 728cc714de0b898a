"""Load LyCORIS Stack on a real ComfyUI: a stack gives what the same files chained through Load
LyCORIS give, in every mode, on float and fp8 models; rows off or at 0 leave nothing behind;
LORA_STACK in/out, the report, trigger words, hashes and Wan 2.2 expert pairs."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from tiny_models import lycoris_file, tiny_flux, tiny_sd15, unet_output

FILES = {  # name -> lycoris-lora arguments
    "locon": {"algo": "locon", "conv_dim": 4, "conv_alpha": 2},
    "lokr": {"algo": "lokr", "factor": 4, "conv_dim": 2, "conv_alpha": 1},
    "loha": {"algo": "loha", "conv_dim": 4, "conv_alpha": 2},
}
ROWS = [("locon", 0.8), ("lokr", 1.2), ("loha", -0.5)]


def _folder(tmp_path, pack):
    from comfyui_runtime import use_loras_folder
    from lycoris_pack.nodes import cache

    use_loras_folder(tmp_path)
    cache.clear()


def _files(tmp_path, root, prefix="lora_unet_", target=("Linear", "Conv2d"), seed=0):
    for i, (name, kwargs) in enumerate(FILES.items()):
        kwargs = dict(kwargs)
        algo = kwargs.pop("algo")
        lycoris_file(root, tmp_path / f"{name}.safetensors", prefix, algo, seed=seed + i, target_module=target,
                     **kwargs)


def stack(pack, model, rows, clip=None, model_low=None, lora_stack=None, schedule=None):
    """Run the registered LycorisStack node with `rows` given as API JSON gives them: flat
    `rows.<field>_<n>` values, nested the way ComfyUI 0.28's dynamic combo hands them over."""
    node = pack.NODE_CLASS_MAPPINGS["LycorisStack"]
    flat = {f"rows.{field}_{n}": value for n, row in enumerate(rows, 1) for field, value in row.items()}
    if hasattr(node, "define_schema"):  # V3 node (ComfyUI 0.28)
        nested = {"rows": str(len(rows)), **{k[len("rows."):]: v for k, v in flat.items()}}
        out = node.execute(model=model, rows=nested, clip=clip, model_low=model_low, lora_stack=lora_stack,
                           schedule=schedule)
        return out.args
    return node().load(model, str(len(rows)), clip=clip, model_low=model_low, lora_stack=lora_stack,
                       schedule=schedule, **flat)["result"]


def chain(pack, model, rows, clip=None):
    node = pack.NODE_CLASS_MAPPINGS["LycorisLoader"]()
    for row in rows:
        if row.get("on", True):
            model, clip, _ = node.load(model, clip, row["lora_name"], row["strength_model"],
                                       row.get("strength_clip", 0.0), row.get("mode", "auto"),
                                       row.get("block_weights", ""))["result"][:3]
    return model, clip


def _sd_inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(1, 4, 16, 16, generator=g), torch.tensor([300.0]), torch.randn(1, 5, 64, generator=g)


def _rows(mode, block_weights=""):
    return [{"lora_name": f"{name}.safetensors", "strength_model": s, "strength_clip": 0.0, "mode": mode,
             "block_weights": block_weights if name == "lokr" else ""} for name, s in ROWS]


def _effect_error(y, y_ref, y_base) -> float:
    """|stack - chain| relative to the stack's effect on the output (printed: pytest -s shows the figures)."""
    error = float((y - y_ref).norm() / (y - y_base).norm())
    print(f"stack vs chained loaders: {error:.1e} of the stack's effect")
    return error


@pytest.mark.parametrize("mode", ["merge", "bypass", "auto"])
def test_stack_equals_chained_loaders_on_a_float_model(pack, tmp_path, mode):
    _folder(tmp_path, pack)
    model = tiny_sd15()
    _files(tmp_path, model.model.diffusion_model)
    rows = _rows(mode, block_weights="IN*=0.5, OUT00=0")
    stacked = stack(pack, model, rows)
    chained, _ = chain(pack, model, rows)
    y_base = unet_output(model, *_sd_inputs())
    y, y_ref = unet_output(stacked[0], *_sd_inputs()), unet_output(chained, *_sd_inputs())
    assert _effect_error(y, y_ref, y_base) <= 1e-5
    assert model.patches == {} and not model.object_patches  # the input is never modified
    report = stacked[2]
    assert report.startswith("LyCORIS stack: 3 of 3 rows applied")
    for label in ("[row 1]", "[row 2]", "[row 3]", "block weights (named"):
        assert label in report, report
    assert "overlap: row 1 and row 2 both change" in report


@pytest.fixture
def recent(comfy):
    try:
        import comfy.quant_ops  # noqa: F401
    except ImportError:
        pytest.skip("the pinned March-2024 runtime has no Flux class and no fp8 weight_dtype loader")


def _flux_inputs():
    g = torch.Generator().manual_seed(0)
    return (torch.randn(1, 16, 8, 8, generator=g), torch.tensor([0.5]), torch.randn(1, 5, 32, generator=g),
            torch.randn(1, 16, generator=g))


def _flux_run(patcher):
    with torch.no_grad():
        patcher.patch_model()
        try:
            return patcher.model.diffusion_model(*_flux_inputs()).float()
        finally:
            patcher.unpatch_model()


@pytest.mark.parametrize("mode", ["merge", "bypass", "auto"])
def test_stack_equals_chained_loaders_on_an_fp8_model(pack, recent, tmp_path, mode):
    model = tiny_flux(tmp_path, weight_dtype="fp8_e4m3fn")
    _folder(tmp_path, pack)
    _files(tmp_path, model.model.diffusion_model, target=("Linear",))
    rows = _rows(mode)
    stacked = stack(pack, model, rows)
    chained, _ = chain(pack, model, rows)
    y_base, y, y_ref = _flux_run(model), _flux_run(stacked[0]), _flux_run(chained)
    assert _effect_error(y, y_ref, y_base) <= 1e-5
    assert model.patches == {}


def _idle_rows_leave_nothing(pack, model, rows, run):
    """Rows 2 and 3 off / at strength 0: the stack's output is bit-identical to row 1 alone, with the
    same patches; a stack of only idle rows gives the input model itself."""
    rows[1]["on"] = False
    rows[2]["strength_model"] = 0.0
    only_first = stack(pack, model, rows[:1])
    with_idle = stack(pack, model, rows)
    assert torch.equal(run(with_idle[0]), run(only_first[0]))
    assert set(with_idle[0].patches) == set(only_first[0].patches)
    assert with_idle[5] == [(rows[0]["lora_name"], rows[0]["strength_model"], 0.0)]
    assert "[row 2] lokr.safetensors: off" in with_idle[2] and "strength 0, skipped" in with_idle[2]
    none = stack(pack, model, [dict(rows[0], on=False), dict(rows[1], on=True, strength_model=0.0)])
    assert none[0] is model  # nothing applied: the model itself, no clone, no patch
    assert torch.equal(run(none[0]), run(model))


@pytest.mark.parametrize("mode", ["merge", "bypass", "auto"])
def test_rows_off_or_at_zero_leave_nothing_behind(pack, tmp_path, mode):
    _folder(tmp_path, pack)
    model = tiny_sd15()
    _files(tmp_path, model.model.diffusion_model)
    _idle_rows_leave_nothing(pack, model, _rows(mode), lambda m: unet_output(m, *_sd_inputs()))


@pytest.mark.parametrize("mode", ["merge", "bypass", "auto"])
def test_rows_off_or_at_zero_leave_an_fp8_model_untouched(pack, recent, tmp_path, mode):
    model = tiny_flux(tmp_path, weight_dtype="fp8_e4m3fn")
    _folder(tmp_path, pack)
    _files(tmp_path, model.model.diffusion_model, target=("Linear",))
    _idle_rows_leave_nothing(pack, model, _rows(mode), _flux_run)


def test_lora_stack_in_and_out(pack, tmp_path):
    _folder(tmp_path, pack)
    model = tiny_sd15()
    _files(tmp_path, model.model.diffusion_model)
    incoming = [("locon.safetensors", 0.8, 1.0), ("None", 1.0, 1.0), ["lokr.safetensors", 1.2, 0.0]]
    only_stack = stack(pack, model, [], lora_stack=incoming)
    chained, _ = chain(pack, model, [{"lora_name": n, "strength_model": s} for n, s in
                                     (("locon.safetensors", 0.8), ("lokr.safetensors", 1.2))])
    y_base = unet_output(model, *_sd_inputs())
    assert _effect_error(unet_output(only_stack[0], *_sd_inputs()), unet_output(chained, *_sd_inputs()), y_base) <= 1e-5
    assert only_stack[5] == [("locon.safetensors", 0.8, 1.0), ("lokr.safetensors", 1.2, 0.0)]
    both = stack(pack, model, _rows("merge")[2:], lora_stack=only_stack[5])  # ours feeds ours
    assert [name for name, _, _ in both[5]] == ["locon.safetensors", "lokr.safetensors", "loha.safetensors"]
    assert "[lora_stack 1]" in both[2] and "[row 1]" in both[2]
    with pytest.raises(ValueError, match="lora_stack entry 1"):
        stack(pack, model, [], lora_stack=[("locon.safetensors",)])
    with pytest.raises(ValueError, match="missing.safetensors"):
        stack(pack, model, [], lora_stack=[("missing.safetensors", 1.0, 1.0)])


def test_trigger_words_and_hashes(pack, tmp_path):
    _folder(tmp_path, pack)
    model = tiny_sd15()
    _files(tmp_path, model.model.diffusion_model)
    path = tmp_path / "locon.safetensors"
    save_file(load_file(str(path)), str(path), {"modelspec.trigger_phrase": "zkx style",
                                                "ss_tag_frequency": json.dumps({"a": {"hat": 2}})})
    (tmp_path / "lokr.civitai.info").write_text(json.dumps({"trainedWords": ["ohwx", "zkx style"]}))
    out = stack(pack, model, _rows("merge")[:2])
    assert out[3] == "zkx style, ohwx"
    expected = []
    for name in ("locon", "lokr"):
        data = (tmp_path / f"{name}.safetensors").read_bytes()
        header = int.from_bytes(data[:8], "little")
        expected.append(f"{name}: {hashlib.sha256(data[8 + header:]).hexdigest()[:12]}")
    assert out[4] == ", ".join(expected)
    assert "trigger words (metadata modelspec.trigger_phrase): zkx style" in out[2]


def test_wan_pairs_find_their_twin(pack, tmp_path):
    """Two experts (two different models): a *high_noise* row sends its *low_noise* twin to model_low."""
    _folder(tmp_path, pack)
    high, low = tiny_sd15(seed=0), tiny_sd15(seed=1)
    lycoris_file(high.model.diffusion_model, tmp_path / "style_high_noise.safetensors", "lora_unet_", "lora", seed=3)
    lycoris_file(low.model.diffusion_model, tmp_path / "style_low_noise.safetensors", "lora_unet_", "lora", seed=4)
    lycoris_file(low.model.diffusion_model, tmp_path / "detail.safetensors", "lora_unet_", "lora", seed=5)
    rows = [{"lora_name": "style_high_noise.safetensors", "strength_model": 0.9, "expert": "both"},
            {"lora_name": "detail.safetensors", "strength_model": 0.6, "expert": "low"}]
    out = stack(pack, high, rows, model_low=low)
    ref_high, _ = chain(pack, high, rows[:1])
    ref_low, _ = chain(pack, low, [dict(rows[0], lora_name="style_low_noise.safetensors"), rows[1]])
    for ours, ref, base in ((out[0], ref_high, high), (out[6], ref_low, low)):
        y_base = unet_output(base, *_sd_inputs())
        assert _effect_error(unet_output(ours, *_sd_inputs()), unet_output(ref, *_sd_inputs()), y_base) <= 1e-5
    assert "-> model_low" in out[2] and "style_low_noise: " in out[4]
    alone = stack(pack, high, rows)  # no model_low: the low row is skipped, said in the report
    assert "model_low is not connected; skipped" in alone[2] and alone[6] is None


def test_schema_declares_rows_as_inputs(pack):
    node = pack.NODE_CLASS_MAPPINGS["LycorisStack"]
    types = node.INPUT_TYPES()
    if hasattr(node, "define_schema"):
        kind, options = types["required"]["rows"]
        assert kind == "COMFY_DYNAMICCOMBO_V3"
        assert options["options"][0]["key"] == "1"  # a new node starts with one row
        three = next(o for o in options["options"] if o["key"] == "3")
        # all optional, in row order (the front-end shows required inputs first)
        assert list(three["inputs"]["optional"])[:8] == ["on_1", "lora_name_1", "strength_model_1", "strength_clip_1",
                                                          "mode_1", "expert_1", "block_weights_1", "on_2"]
        assert not three["inputs"].get("required")
    else:
        assert "rows" in types["required"] and "rows.lora_name_10" in types["optional"]


def test_combine_takes_a_lora_stack(pack, tmp_path):
    """Combine LyCORIS with the stack's LORA_STACK gives the file it gives with the same files chosen by name."""
    from lycoris_pack.lycoris_core import load_adapter_file, merge_into_state_dict

    _folder(tmp_path, pack)
    model = tiny_sd15()
    root = model.model.diffusion_model
    lycoris_file(root, tmp_path / "a.safetensors", "lora_unet_", "lora", seed=1)
    lycoris_file(root, tmp_path / "b.safetensors", "lora_unet_", "lora", seed=2)
    out = stack(pack, model, [{"lora_name": "a.safetensors", "strength_model": 0.5, "strength_clip": 0.0},
                              {"lora_name": "b.safetensors", "strength_model": -1.2, "strength_clip": 0.0}])
    node = pack.NODE_CLASS_MAPPINGS["LycorisCombine"]()
    node.run("none", 1.0, "none", 1.0, "none", 1.0, 0, "from_stack", lora_stack=out[5])
    node.run("a.safetensors", 0.5, "b.safetensors", -1.2, "none", 1.0, 0, "by_name")
    base = {k: v.clone() for k, v in root.state_dict().items()}
    one, _ = merge_into_state_dict(base, [(load_adapter_file(tmp_path / "from_stack.safetensors"), 1.0)])
    two, _ = merge_into_state_dict(base, [(load_adapter_file(tmp_path / "by_name.safetensors"), 1.0)])
    for key in base:
        assert torch.equal(one[key], two[key]), key
    with pytest.raises(ValueError, match="at least two adapters"):
        node.run("a.safetensors", 1.0, "none", 1.0, "none", 1.0, 0, "one")


@pytest.mark.parametrize("mode", ["merge", "bypass"])
def test_stack_equals_comfyuis_own_loraloader_chain(pack, tmp_path, mode):
    """An independent oracle: ComfyUI's own LoraLoader, once per file (LoCon and LoKr, which it reads right)."""
    import nodes

    _folder(tmp_path, pack)
    model = tiny_sd15()
    _files(tmp_path, model.model.diffusion_model)
    rows = _rows(mode)[:2]
    theirs = model
    for row in rows:
        theirs, _ = nodes.LoraLoader().load_lora(theirs, None, row["lora_name"], row["strength_model"], 0.0)
    ours = stack(pack, model, rows)[0]
    y_base = unet_output(model, *_sd_inputs())
    assert _effect_error(unet_output(ours, *_sd_inputs()), unet_output(theirs, *_sd_inputs()), y_base) <= 1e-5


def test_clip_rows_equal_chained_loaders(pack, tmp_path):
    from tiny_models import patched_state_dict, tiny_clip

    _folder(tmp_path, pack)
    model, clip = tiny_sd15(), tiny_clip(tmp_path)
    text_model = clip.cond_stage_model.clip_l.transformer.text_model
    for i, name in enumerate(("te_a", "te_b")):
        lycoris_file(text_model, tmp_path / f"{name}.safetensors", "lora_te_text_model_", "lora", seed=10 + i)
    rows = [{"lora_name": "te_a.safetensors", "strength_model": 1.0, "strength_clip": 0.7},
            {"lora_name": "te_b.safetensors", "strength_model": 1.0, "strength_clip": -0.4}]
    out = stack(pack, model, rows, clip=clip)
    _, chained = chain(pack, model, rows, clip=clip)
    ours, theirs = patched_state_dict(out[1].patcher), patched_state_dict(chained.patcher)
    base = clip.cond_stage_model.state_dict()
    changed = [k for k in ours if not torch.equal(ours[k], base.get(k, ours[k]))]
    assert changed
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key


def test_lora_metadata_attached_as_the_chain_leaves_it(pack, tmp_path):
    import comfy.model_patcher

    if not hasattr(comfy.model_patcher.ModelPatcher, "set_attachments"):
        pytest.skip("this ComfyUI has no model attachments (its LoraLoader attaches no metadata)")
    _folder(tmp_path, pack)
    model = tiny_sd15()
    _files(tmp_path, model.model.diffusion_model)
    for name, value in (("locon", "first"), ("lokr", "second")):
        path = tmp_path / f"{name}.safetensors"
        save_file(load_file(str(path)), str(path), {"reference_downscale_factor": value})
    rows = _rows("merge")  # loha (last) has no metadata: the chain keeps lokr's
    ours, theirs = stack(pack, model, rows)[0], chain(pack, model, rows)[0]
    assert ours.get_attachment("lora_metadata") == theirs.get_attachment("lora_metadata") == \
        {"reference_downscale_factor": "second"}
    assert model.get_attachment("lora_metadata") is None


def test_a_scheduled_stack_equals_the_same_files_chained_with_that_schedule(pack, tmp_path):
    """The stack's `schedule` input: every row's model side follows it, as chained loaders each given
    that schedule do, step by step through ComfyUI's sampler with CFG (negative pass at 0.5)."""
    import comfy.sample

    _folder(tmp_path, pack)
    model = tiny_sd15()
    _files(tmp_path, model.model.diffusion_model)
    schedule = pack.NODE_CLASS_MAPPINGS["LycorisSchedule"]().build("always", "0:1, 0.5:0.3", "hold", 0.5)[0]
    rows = _rows("merge")
    stacked = stack(pack, model, rows, schedule=schedule)
    assert "schedule: 0:1, 0.5:0.3" in stacked[2], stacked[2]
    node = pack.NODE_CLASS_MAPPINGS["LycorisLoaderModelOnly"]()
    chained = model
    for row in rows:
        chained = node.load(chained, row["lora_name"], row["strength_model"], "merge", schedule=schedule)["result"][0]

    def sample(m):
        g = torch.Generator().manual_seed(4)
        latent = torch.zeros(1, 4, 8, 8)
        conds = [[[torch.randn(1, 3, 64, generator=g), {}]] for _ in range(2)]
        return comfy.sample.sample(m, torch.randn(latent.shape, generator=g), 4, 2.5, "euler", "normal",
                                   conds[0], conds[1], latent, disable_pbar=True, seed=4)

    y, y_ref, y_base = sample(stacked[0]), sample(chained), sample(model)
    assert float((y_ref - y_base).norm()) > 0
    assert _effect_error(y, y_ref, y_base) <= 1e-5

