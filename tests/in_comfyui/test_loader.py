"""Load LyCORIS on a real ComfyUI: same weights as ComfyUI's own LoraLoader where ComfyUI is right,
the trainer's forward where it is wrong or silent, inputs never modified, clear errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tiny_models import lycoris_file, patched_state_dict, tiny_clip, tiny_sd15, unet_output

ADDITIVE = {
    "lora": {},
    "locon": {"conv_dim": 4, "conv_alpha": 2},
    "locon_tucker": {"algo": "locon", "conv_dim": 4, "conv_alpha": 2, "use_tucker": True},
    "loha": {"conv_dim": 4, "conv_alpha": 2},
    "lokr": {"factor": 4, "conv_dim": 2, "conv_alpha": 1},
}
ORACLE_ONLY = {  # ComfyUI is wrong or silent for these: compare with the trainer's forward
    "ia3": {},
    "dora_out": {"algo": "lora", "dora_wd": True},
    "dora_in": {"algo": "lora", "dora_wd": True, "wd_on_output": False},
    "glora": {"conv_dim": 4, "conv_alpha": 2},
    "full": {},
    "diag_oft_rescaled": {"algo": "diag-oft", "rescaled": True, "constraint": 1e-3},
}


def _load(pack, model, clip, name, strength_model=1.0, strength_clip=1.0, mode="merge"):
    node = pack.NODE_CLASS_MAPPINGS["LycorisLoader"]()
    return node.load(model, clip, name, strength_model, strength_clip, mode)["result"][:3]


def _loras(tmp_path, pack):
    from comfyui_runtime import use_loras_folder

    use_loras_folder(tmp_path)
    from lycoris_pack.nodes import cache

    cache.clear()


def _make(tmp_path, model, case, kwargs):
    kwargs = dict(kwargs)
    algo = kwargs.pop("algo", case)
    path = tmp_path / f"{case}.safetensors"
    net, wrapped = lycoris_file(model.model.diffusion_model, path, "lora_unet_", algo, **kwargs)
    return path, net, wrapped


@pytest.mark.parametrize("case", sorted(ADDITIVE))
@pytest.mark.parametrize("strength", [1.0, 0.6])
def test_same_weights_as_comfyui_loraloader(pack, tmp_path, case, strength):
    import comfy.sd
    import comfy.utils

    _loras(tmp_path, pack)
    model = tiny_sd15()
    path, _, _ = _make(tmp_path, model, case, ADDITIVE[case])
    ours, _, report = _load(pack, model, None, path.name, strength, 0.0)
    theirs, _ = comfy.sd.load_lora_for_models(model, None, comfy.utils.load_torch_file(str(path), safe_load=True),
                                              strength, 0.0)
    a, b = patched_state_dict(ours), patched_state_dict(theirs)
    changed = [k for k in a if not torch.equal(a[k], model.model.state_dict()[k])]
    assert changed, "the adapter changed nothing"
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)
    assert "0 unmatched" in report and "0 keys not understood" in report, report


def _relative_errors(net, wrapped, patched, base_sd, strength):
    net.set_multiplier(strength)
    g = torch.Generator().manual_seed(3)
    worst = 0.0
    for lora in net.loras:
        base = lora.org_module[0]
        path = next(n for n, m in wrapped.named_modules() if m is base)
        weight = patched["diffusion_model." + path + ".weight"]
        bias = patched.get("diffusion_model." + path + ".bias")
        if isinstance(base, torch.nn.Linear):
            x = torch.randn(5, base.in_features, generator=g)
            ours = F.linear(x, weight, bias)
            y_base = F.linear(x, base_sd["diffusion_model." + path + ".weight"], bias if bias is None else
                              base_sd["diffusion_model." + path + ".bias"])
        else:
            x = torch.randn(2, base.in_channels, 7, 7, generator=g)
            conv = lambda w, b: F.conv2d(x, w, b, base.stride, base.padding, base.dilation, base.groups)  # noqa: E731
            ours = conv(weight, bias)
            y_base = conv(base_sd["diffusion_model." + path + ".weight"],
                          base_sd.get("diffusion_model." + path + ".bias"))
        with torch.no_grad():
            truth = lora(x)
        worst = max(worst, float((ours - truth).norm() / (truth - y_base).norm()))
    return worst


@pytest.mark.parametrize("case", sorted(ORACLE_ONLY))
@pytest.mark.parametrize("strength", [1.0, 0.7])
def test_matches_the_trainers_forward(pack, tmp_path, case, strength):
    _loras(tmp_path, pack)
    model = tiny_sd15()
    base_sd = {k: v.clone() for k, v in model.model.state_dict().items()}
    path, net, wrapped = _make(tmp_path, model, case, ORACLE_ONLY[case])
    ours, _, report = _load(pack, model, None, path.name, strength, 0.0)
    error = _relative_errors(net, wrapped, patched_state_dict(ours), base_sd, strength)
    assert error < 1e-4, (case, error)
    assert "0 unmatched" in report, report


def test_inputs_are_never_modified(pack, tmp_path):
    _loras(tmp_path, pack)
    model = tiny_sd15()
    before = {k: v.clone() for k, v in model.model.state_dict().items()}
    path, _, _ = _make(tmp_path, model, "loha", ADDITIVE["loha"])
    new_model, _, _ = _load(pack, model, None, path.name)
    assert model.patches == {} and new_model is not model and new_model.patches
    patched_state_dict(new_model)
    for key, value in model.model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_text_encoder_patched_like_comfyui(pack, tmp_path):
    import comfy.sd
    import comfy.utils

    _loras(tmp_path, pack)
    model, clip = tiny_sd15(), tiny_clip(tmp_path)
    path = tmp_path / "te.safetensors"
    lycoris_file(clip.cond_stage_model.clip_l.transformer.text_model, path, "lora_te_text_model_", "lora")
    ours_model, ours_clip, report = _load(pack, model, clip, path.name, 1.0, 0.8)
    _, theirs_clip = comfy.sd.load_lora_for_models(model, clip, comfy.utils.load_torch_file(str(path), safe_load=True),
                                                   1.0, 0.8)
    a, b = patched_state_dict(ours_clip.patcher), patched_state_dict(theirs_clip.patcher)
    changed = [k for k in a if not torch.equal(a[k], clip.cond_stage_model.state_dict()[k])]
    assert changed
    for key in a:
        # both compute in fp32; a stored fp16 weight may then differ by its last bit (1 ulp)
        ulp = torch.finfo(a[key].dtype).eps if a[key].is_floating_point() else 0
        torch.testing.assert_close(a[key].float(), b[key].float(), rtol=max(1e-5, 1.01 * ulp), atol=1e-6, msg=key)
    assert "text-encoder layers" in report and "0 unmatched" in report, report


def test_model_only_skips_text_encoder_modules(pack, tmp_path):
    _loras(tmp_path, pack)
    model, clip = tiny_sd15(), tiny_clip(tmp_path)
    te = tmp_path / "te.safetensors"
    lycoris_file(clip.cond_stage_model.clip_l.transformer.text_model, te, "lora_te_text_model_", "lora")
    unet = tmp_path / "unet.safetensors"
    lycoris_file(model.model.diffusion_model, unet, "lora_unet_", "lora")
    from safetensors.torch import load_file, save_file

    both = tmp_path / "both.safetensors"
    save_file({**load_file(str(te)), **load_file(str(unet))}, str(both))
    node = pack.NODE_CLASS_MAPPINGS["LycorisLoaderModelOnly"]()
    new_model, report = node.load(model, both.name, 1.0, "merge")["result"][:2]
    assert new_model.patches and "skipped" in report and "0 unmatched" in report, report


def test_bad_files_name_the_file(pack, tmp_path):
    _loras(tmp_path, pack)
    model = tiny_sd15()
    (tmp_path / "garbage.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="garbage.safetensors"):
        _load(pack, model, None, "garbage.safetensors")
    from safetensors.torch import save_file

    other = {"lora_unet_some_other_model_layer.lora_up.weight": torch.zeros(8, 2),
             "lora_unet_some_other_model_layer.lora_down.weight": torch.zeros(2, 8)}
    save_file(other, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="other.safetensors.*nothing in this file matches"):
        _load(pack, model, None, "other.safetensors")
    assert model.patches == {}


def test_decoded_files_are_cached(pack, tmp_path, monkeypatch):
    _loras(tmp_path, pack)
    model = tiny_sd15()
    path, _, _ = _make(tmp_path, model, "lora", {})
    from lycoris_pack.nodes import cache

    calls = []
    real = cache.load_adapter_file
    monkeypatch.setattr(cache, "load_adapter_file", lambda p: calls.append(p) or real(p))
    _load(pack, model, None, path.name)
    _load(pack, model, None, path.name)
    assert len(calls) == 1


BYPASS_CASES = {"locon": ADDITIVE["locon"], "loha": ADDITIVE["loha"], "lokr": ADDITIVE["lokr"],
                "ia3": {}, "dora_out": ORACLE_ONLY["dora_out"], "diag_oft_rescaled": ORACLE_ONLY["diag_oft_rescaled"],
                "glora": ORACLE_ONLY["glora"]}


@pytest.mark.parametrize("case", sorted(BYPASS_CASES))
def test_bypass_equals_merge(pack, tmp_path, case):
    _loras(tmp_path, pack)
    model = tiny_sd15()
    path, _, _ = _make(tmp_path, model, case, BYPASS_CASES[case])
    merged, _, _ = _load(pack, model, None, path.name, 0.8, 0.0, "merge")
    bypassed, _, report = _load(pack, model, None, path.name, 0.8, 0.0, "bypass")
    torch.manual_seed(0)
    x = torch.randn(1, 4, 16, 16)
    t = torch.tensor([500.0])
    context = torch.randn(1, 5, 64)
    base_weights = {k: v.clone() for k, v in model.model.state_dict().items()}
    outputs = []
    for patcher in (merged, bypassed):
        patcher.patch_model()
        try:
            with torch.no_grad():
                outputs.append(patcher.model.diffusion_model(x, t, context=context))
            if patcher is bypassed:
                for key, value in patcher.model.state_dict().items():
                    assert torch.equal(value, base_weights[key]), key  # base weights untouched
        finally:
            patcher.unpatch_model()
    assert "bypass: " in report, report
    if case in ("locon", "ia3", "diag_oft_rescaled"):
        assert "dense" not in report, report  # factored / output-side bypass on Linear layers
    rel = float((outputs[0] - outputs[1]).norm() / outputs[0].norm())
    assert rel < 1e-5, rel
    layer = model.model.diffusion_model.input_blocks[1][1].proj_in
    assert getattr(layer.forward, "__func__", None) is type(layer).forward  # unpatch restored the forward


class _Payload:
    """Unpickling this would create a file: the loader must never run it."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import pathlib

        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def test_pickle_adapters_are_refused_and_never_executed(pack, tmp_path):
    _loras(tmp_path, pack)
    model = tiny_sd15()
    marker = tmp_path / "pwned"
    torch.save({"lora_unet_x.lora_up.weight": _Payload(str(marker))}, str(tmp_path / "evil.pt"))
    with pytest.raises(ValueError, match="evil.pt"):
        _load(pack, model, None, "evil.pt")
    assert not marker.exists() and model.patches == {}


def test_stacked_bypass_adapters_equal_stacked_merges(pack, tmp_path):
    _loras(tmp_path, pack)
    model = tiny_sd15()
    first, _, _ = _make(tmp_path, model, "locon", ADDITIVE["locon"])
    second, _, _ = _make(tmp_path, model, "lokr", ADDITIVE["lokr"])
    outputs = []
    for mode in ("merge", "bypass"):
        once, _, _ = _load(pack, model, None, first.name, 0.7, 0.0, mode)
        twice, _, _ = _load(pack, once, None, second.name, 1.2, 0.0, mode)
        assert once.patches == {} or mode == "merge"
        torch.manual_seed(0)
        x, t, context = torch.randn(1, 4, 16, 16), torch.tensor([300.0]), torch.randn(1, 5, 64)
        outputs.append(unet_output(twice, x, t, context))
    assert float((outputs[0] - outputs[1]).norm() / outputs[0].norm()) < 1e-5


@pytest.mark.parametrize("mode", ["merge", "bypass"])
def test_block_weights_bind_to_block_ids(pack, tmp_path, mode):
    import comfy.sd
    import comfy.utils

    _loras(tmp_path, pack)
    model = tiny_sd15()
    path, _, _ = _make(tmp_path, model, "locon", ADDITIVE["locon"])
    node = pack.NODE_CLASS_MAPPINGS["LycorisLoaderModelOnly"]()
    patched, report = node.load(model, path.name, 1.0, mode, block_weights="IN*=0, M00=0.5")["result"][:2]
    assert "block weights (named" in report, report
    lora = comfy.utils.load_torch_file(str(path), safe_load=True)
    full, _ = comfy.sd.load_lora_for_models(model, None, lora, 1.0, 0.0)
    half, _ = comfy.sd.load_lora_for_models(model, None, lora, 0.5, 0.0)
    base = model.model.state_dict()
    if mode == "merge":
        ours, at_one, at_half = patched_state_dict(patched), patched_state_dict(full), patched_state_dict(half)
        for key in base:
            if key.startswith("diffusion_model.input_blocks."):
                assert torch.equal(ours[key], base[key]), key  # a block at 0 stays bit-identical
            elif key.startswith("diffusion_model.middle_block."):
                torch.testing.assert_close(ours[key], at_half[key], rtol=1e-5, atol=1e-6, msg=key)
            else:
                torch.testing.assert_close(ours[key], at_one[key], rtol=1e-5, atol=1e-6, msg=key)
    else:
        from lycoris_pack.nodes.bypass import bypassed_layers

        bypassed = set(bypassed_layers(patched))
        assert bypassed and not any(k.startswith("diffusion_model.input_blocks.") for k in bypassed)
        assert any(k.startswith("diffusion_model.middle_block.") for k in bypassed)
    with pytest.raises(ValueError, match="Load LyCORIS"):
        node.load(model, path.name, 1.0, mode, block_weights="1,0,1")  # wrong length names the ids


def test_file_metadata_attached_like_comfyuis_loader(pack, tmp_path):
    """ComfyUI's LoraLoader attaches the file's metadata as "lora_metadata" to the patched model and
    clip (LTXV's IC-LoRA node reads it); the pack's loader attaches the same dict to both."""
    import comfy.model_patcher
    import nodes
    from safetensors.torch import load_file, save_file

    if not hasattr(comfy.model_patcher.ModelPatcher, "set_attachments"):
        pytest.skip("this ComfyUI has no model attachments (its LoraLoader attaches no metadata)")
    _loras(tmp_path, pack)
    model, clip = tiny_sd15(), tiny_clip(tmp_path)
    path = tmp_path / "te.safetensors"
    lycoris_file(clip.cond_stage_model.clip_l.transformer.text_model, path, "lora_te_text_model_", "lora")
    metadata = {"reference_downscale_factor": "2", "ss_network_module": "lycoris.kohya"}
    save_file(load_file(str(path)), str(path), metadata)
    ours_model, ours_clip, _ = _load(pack, model, clip, path.name, 1.0, 1.0)
    theirs_model, theirs_clip = nodes.LoraLoader().load_lora(model, clip, path.name, 1.0, 1.0)
    expected = theirs_model.get_attachment("lora_metadata")
    assert expected == metadata == theirs_clip.patcher.get_attachment("lora_metadata")
    assert ours_model.get_attachment("lora_metadata") == expected
    assert ours_clip.patcher.get_attachment("lora_metadata") == expected
    assert model.get_attachment("lora_metadata") is None  # the input model is not touched


def _sdxl_like_file(tmp_path, model, clip, unet_fits: bool):
    """A file as an SDXL trainer writes it, seen from a (tiny) SD1.5 model: its first text encoder fits
    the CLIP, its second (`lora_te2_`) is not in the model, and its UNet layers carry the model's names
    with wider inputs (SDXL's cross-attention reads 2048-wide embeddings) unless `unet_fits`."""
    from safetensors.torch import load_file, save_file

    te, unet = tmp_path / "te_part.safetensors", tmp_path / "unet_part.safetensors"
    lycoris_file(clip.cond_stage_model.clip_l.transformer.text_model, te, "lora_te1_text_model_", "lora")
    lycoris_file(model.model.diffusion_model, unet, "lora_unet_", "lora")
    tensors = load_file(str(te))
    tensors.update({key.replace("lora_te1_", "lora_te2_", 1): value.clone() for key, value in tensors.items()})
    for key, value in load_file(str(unet)).items():
        if not unet_fits and key.endswith("lora_down.weight"):
            value = torch.cat([value, value[:, :8]], dim=1)  # 8 more input channels than the layer has
        tensors[key] = value
    path = tmp_path / f"sdxl_like_{unet_fits}.safetensors"
    save_file(tensors, str(path), {"ss_base_model_version": "sdxl_base_v1-0"})
    return path, sum(1 for k in tensors if k.startswith("lora_te2_") and k.endswith("lora_up.weight"))


def test_an_adapter_for_another_base_model_is_named_and_shown(pack, tmp_path, caplog):
    """An SDXL file on an SD1.5 model: the report names the cause, the log warns, the UI output carries
    the warning the web extension turns into the node's warning state; SDXL's second text encoder is
    "not in this model", never a duplicate of the first."""
    _loras(tmp_path, pack)
    model, clip = tiny_sd15(), tiny_clip(tmp_path)
    path, te2_modules = _sdxl_like_file(tmp_path, model, clip, unet_fits=False)
    node = pack.NODE_CLASS_MAPPINGS["LycorisLoader"]()
    with caplog.at_level("WARNING"):
        answer = node.load(model, clip, path.name, 1.0, 1.0, "auto")
    new_model, new_clip, report = answer["result"][:3]
    [warning] = answer["ui"]["lycoris_warning"]
    assert warning == report.splitlines()[1], report
    assert warning.startswith("warning: only the text encoder changed"), warning
    assert "an SDXL adapter on an SD1.5 model (file: ss_base_model_version=sdxl_base_v1-0; model: SD15)" in warning
    assert "0 duplicates" in report and f"not in this model (no layer of that name) ({te2_modules}):" in report, report
    assert any(warning in record.getMessage() for record in caplog.records if record.levelname == "WARNING")
    assert not new_model.patches and new_clip.patcher.patches  # only the text encoder was patched


def test_a_fitting_adapter_shows_no_warning(pack, tmp_path):
    _loras(tmp_path, pack)
    model, clip = tiny_sd15(), tiny_clip(tmp_path)
    path = tmp_path / "fits.safetensors"
    lycoris_file(model.model.diffusion_model, path, "lora_unet_", "lora")
    answer = pack.NODE_CLASS_MAPPINGS["LycorisLoader"]().load(model, clip, path.name, 1.0, 1.0, "auto")
    assert answer["ui"]["lycoris_warning"] == [] and "warning" not in answer["result"][2]


def test_a_file_with_nothing_for_this_model_names_the_cause(pack, tmp_path):
    from safetensors.torch import load_file, save_file

    _loras(tmp_path, pack)
    model = tiny_sd15()
    path = tmp_path / "wide.safetensors"
    lycoris_file(model.model.diffusion_model, path, "lora_unet_", "lora")
    tensors = {k: torch.cat([v, v[:, :8]], dim=1) if k.endswith("lora_down.weight") else v
               for k, v in load_file(str(path)).items()}
    save_file(tensors, str(path))  # no metadata: the cause comes from the shapes
    with pytest.raises(ValueError, match="wide.safetensors.*nothing in this file matches.*exist in this "
                                         "SD1.5 model with other widths"):
        pack.NODE_CLASS_MAPPINGS["LycorisLoaderModelOnly"]().load(model, path.name, 1.0, "auto")


def test_the_file_input_is_lora_name_and_the_old_name_still_loads(pack, tmp_path):
    """Same input names as core's LoraLoader, so swapping keeps the file; API prompts and calls that
    use the old `lycoris_name` still run (a posted prompt is renamed before validation)."""
    import nodes

    from lycoris_pack.nodes.loader import rename_legacy_inputs
    from lycoris_pack.nodes.routes import legacy_prompt_handler

    core = nodes.LoraLoader.INPUT_TYPES()["required"]
    for name in ("LycorisLoader", "LycorisLoaderModelOnly"):
        ours = pack.NODE_CLASS_MAPPINGS[name].INPUT_TYPES()["required"]
        assert list(ours)[:len(ours) - 1] == [k for k in core if k in ours], list(ours)  # same order, then mode
    _loras(tmp_path, pack)
    model = tiny_sd15()
    path = tmp_path / "old.safetensors"
    lycoris_file(model.model.diffusion_model, path, "lora_unet_", "lora")
    node = pack.NODE_CLASS_MAPPINGS["LycorisLoaderModelOnly"]()
    new_model, report = node.load(model, lycoris_name=path.name, strength_model=1.0, mode="merge")["result"][:2]
    assert new_model.patches and "old.safetensors" in report
    prompt = {"1": {"class_type": "LycorisLoader", "inputs": {"lycoris_name": "a.safetensors", "strength_model": 1}},
              "2": {"class_type": "LycorisCombine", "inputs": {"lycoris_name_1": "b.safetensors"}}}
    posted = legacy_prompt_handler({"prompt": prompt, "client_id": "x"})
    assert posted["prompt"]["1"]["inputs"] == {"lora_name": "a.safetensors", "strength_model": 1}
    assert posted["prompt"]["2"]["inputs"] == {"lycoris_name_1": "b.safetensors"}
    assert rename_legacy_inputs({"3": {"class_type": "LycorisLoaderModelOnly",
                                       "inputs": {"lora_name": "new", "lycoris_name": "old"}}}
                                )["3"]["inputs"] == {"lora_name": "new"}


def test_peft_file_without_its_config_says_so(pack, tmp_path):
    """A PEFT file as it usually lands in models/loras (no adapter_config.json): the loader's report
    says alpha was taken as rank; with the config beside it, the scale is lora_alpha / r and no note."""
    import json

    from safetensors.torch import save_file

    _loras(tmp_path, pack)
    model = tiny_sd15()
    key = "diffusion_model.input_blocks.1.1.proj_in.weight"
    weight = model.model.state_dict()[key]
    out_features, in_features = weight.shape[:2]
    g = torch.Generator().manual_seed(0)
    down, up = torch.randn(4, in_features, generator=g), torch.randn(out_features, 4, generator=g)
    tensors = {"base_model.model.input_blocks.1.1.proj_in.lora_A.weight": down.reshape(4, in_features, 1, 1),
               "base_model.model.input_blocks.1.1.proj_in.lora_B.weight": up.reshape(out_features, 4, 1, 1)}
    for folder in ("alone", "with_config"):
        (tmp_path / folder).mkdir()
        save_file(tensors, str(tmp_path / folder / "adapter_model.safetensors"))
    (tmp_path / "with_config" / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 2, "target_modules": ["proj_in"]}))
    delta = (up @ down).reshape(weight.shape)
    for folder, scale in (("alone", 1.0), ("with_config", 0.5)):
        patched, _, report = _load(pack, model, None, f"{folder}/adapter_model.safetensors", 1.0, 0.0)
        said = "no adapter_config.json beside adapter_model.safetensors: alpha taken as rank (scale 1)" in report
        assert said == (folder == "alone"), report
        got = patched_state_dict(patched)[key]
        torch.testing.assert_close(got, weight + scale * delta, rtol=1e-5, atol=1e-5)


def _tensor_hash(path) -> str:
    """sd-webui's "Lora hashes" entry computed here from the bytes: sha256 after the safetensors header."""
    import hashlib

    data = path.read_bytes()
    header = int.from_bytes(data[:8], "little")
    return f"{path.stem}: {hashlib.sha256(data[8 + header:]).hexdigest()[:12]}"


def test_trigger_words_and_hash_outputs_follow_the_existing_ones(pack, tmp_path):
    """The single loaders give trigger words and the Civitai hash as the stack does, as outputs
    appended after the old ones (saved workflows link outputs by index)."""
    import json

    from safetensors.torch import load_file, save_file

    old = {"LycorisLoader": ("MODEL", "CLIP", "STRING"), "LycorisLoaderModelOnly": ("MODEL", "STRING")}
    for name, types in old.items():
        node = pack.NODE_CLASS_MAPPINGS[name]
        assert node.RETURN_TYPES == types + ("STRING", "STRING")
        assert node.RETURN_NAMES[-2:] == ("trigger_words", "adapter_hashes")
        assert len(node.OUTPUT_TOOLTIPS) == len(node.RETURN_TYPES)
    _loras(tmp_path, pack)
    model, clip = tiny_sd15(), tiny_clip(tmp_path)
    path = tmp_path / "style.safetensors"
    lycoris_file(model.model.diffusion_model, path, "lora_unet_", "lora")
    save_file(load_file(str(path)), str(path), {"modelspec.trigger_phrase": "zkx style, ohwx"})
    # sd-webui/Forge sidecar: its activation text first, then the metadata's phrase without repeats
    (tmp_path / "style.json").write_text(json.dumps({"activation text": "ohwx, red hat", "preferred weight": 0.7}))
    answer = pack.NODE_CLASS_MAPPINGS["LycorisLoader"]().load(model, clip, path.name, 1.0, 1.0, "merge")
    new_model, new_clip, report, words, hashes = answer["result"]
    assert new_model.patches and words == "ohwx, red hat, zkx style"
    assert hashes == _tensor_hash(path)
    assert "trigger words (style.json, metadata modelspec.trigger_phrase): ohwx, red hat, zkx style" in report
    assert "preferred weight (sidecar): 0.7" in report and f"hash: {hashes}" in report
    assert answer["ui"]["text"] == [report]

    bare = tmp_path / "bare.safetensors"  # no sidecar, no metadata: no words, still a hash
    lycoris_file(model.model.diffusion_model, bare, "lora_unet_", "lora", seed=3)
    only = pack.NODE_CLASS_MAPPINGS["LycorisLoaderModelOnly"]().load(model, bare.name, 0.5, "bypass")["result"]
    assert len(only) == 4 and only[2] == "" and only[3] == _tensor_hash(bare)

    stack = pack.NODE_CLASS_MAPPINGS["LycorisStack"]  # one row of the stack says the same
    row = {"lora_name": path.name, "strength_model": 1.0, "strength_clip": 0.0}
    if hasattr(stack, "define_schema"):
        out = stack.execute(model=model, rows={"rows": "1", **{f"{k}_1": v for k, v in row.items()}}).args
    else:
        out = stack().load(model, "1", **{f"rows.{k}_1": v for k, v in row.items()})["result"]
    assert out[3:5] == (words, hashes)
