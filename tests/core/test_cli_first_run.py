"""The command line as a new user meets it (issue 22): `merge` bakes a kohya / diffusers adapter's
text-encoder modules into SD1.x, SD2.x and SDXL checkpoints, and every run that would write a
useless or harmful file is refused with one line that names the user's file and what to do."""

import os
import pickle

import pytest
import torch
from safetensors.torch import load_file

from lycoris_core.cli import main
from lycoris_core.safe_io import save_tensors_atomic

RANK, ALPHA = 4, 2.0


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _lora(gen, out_features, in_features, alpha=ALPHA):
    return {"lora_down.weight": torch.randn(RANK, in_features, generator=gen),
            "lora_up.weight": torch.randn(out_features, RANK, generator=gen), "alpha": torch.tensor(alpha)}


def _delta(module, strength):
    """strength * alpha / rank * up @ down (alpha absent: rank, PEFT's scale 1)."""
    up, down = module["lora_up.weight"], module["lora_down.weight"]
    alpha = float(module["alpha"]) if "alpha" in module else up.shape[1]
    return strength * alpha / up.shape[1] * (up @ down)


def _save_adapter(path, modules, peft=False, metadata=None):
    tensors = {}
    for name, module in modules.items():
        for suffix, tensor in module.items():
            if peft:
                suffix = {"lora_down.weight": "lora_A.weight", "lora_up.weight": "lora_B.weight"}.get(suffix)
                if suffix is None:
                    continue
            tensors[f"{name}.{suffix}"] = tensor
    save_tensors_atomic(path, tensors, metadata)


def _no_leftovers(folder):
    return not [p for p in os.listdir(folder) if p.endswith(".tmp")]


# -- text encoders -----------------------------------------------------------------------------

def _hf_layer(prefix, width, layer=0):
    keys = {}
    for part in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj"):
        keys[f"{prefix}text_model.encoder.layers.{layer}.{part}.weight"] = (width, width)
        keys[f"{prefix}text_model.encoder.layers.{layer}.{part}.bias"] = (width,)
    keys[f"{prefix}text_model.encoder.layers.{layer}.mlp.fc1.weight"] = (2 * width, width)
    keys[f"{prefix}text_model.encoder.layers.{layer}.mlp.fc2.weight"] = (width, 2 * width)
    return keys


def _openclip_layer(prefix, width, layer=0):
    r = f"{prefix}transformer.resblocks.{layer}."
    return {r + "attn.in_proj_weight": (3 * width, width), r + "attn.in_proj_bias": (3 * width,),
            r + "attn.out_proj.weight": (width, width), r + "mlp.c_fc.weight": (2 * width, width),
            r + "mlp.c_proj.weight": (width, 2 * width), r + "ln_1.weight": (width,)}


UNET = {"model.diffusion_model.input_blocks.1.1.proj_in.weight": (16, 16)}
CHECKPOINTS = {
    "sd1": {**UNET, **_hf_layer("cond_stage_model.transformer.", 8)},
    "sd2": {**UNET, **_openclip_layer("cond_stage_model.model.", 8)},
    "sdxl": {**UNET, "model.diffusion_model.label_emb.0.0.weight": (16, 16),
             **_hf_layer("conditioner.embedders.0.transformer.", 8),
             **_openclip_layer("conditioner.embedders.1.model.", 12)},
}
HF_DOTTED = {"self_attn_q_proj": "self_attn.q_proj", "self_attn_k_proj": "self_attn.k_proj",
             "self_attn_v_proj": "self_attn.v_proj", "self_attn_out_proj": "self_attn.out_proj",
             "mlp_fc1": "mlp.fc1", "mlp_fc2": "mlp.fc2"}
HF_PARTS = {"self_attn_q_proj": "q", "self_attn_k_proj": "k", "self_attn_v_proj": "v",
            "self_attn_out_proj": "attn.out_proj.weight", "mlp_fc1": "mlp.c_fc.weight", "mlp_fc2": "mlp.c_proj.weight"}
# adapter module -> (checkpoint key, rows of it the module patches or None), per checkpoint and dialect
CASES = {
    ("sd1", "kohya"): {
        f"lora_te_text_model_encoder_layers_0_{part}":
            (f"cond_stage_model.transformer.text_model.encoder.layers.0.{dotted}.weight", None)
        for part, dotted in HF_DOTTED.items()},
    ("sd1", "peft"): {
        "text_encoder.text_model.encoder.layers.0.mlp.fc1":
            ("cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight", None),
        "text_encoder.text_model.encoder.layers.0.self_attn.v_proj":
            ("cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.v_proj.weight", None)},
    ("sd2", "kohya"): {
        f"lora_te_text_model_encoder_layers_0_{part}":
            ("cond_stage_model.model.transformer.resblocks.0." + (
                "attn.in_proj_weight" if len(target) == 1 else target),
             None if len(target) > 1 else "qkv".index(target))
        for part, target in HF_PARTS.items()},
    ("sdxl", "kohya"): {
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj":
            ("conditioner.embedders.0.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight", None),
        "lora_te2_text_model_encoder_layers_0_self_attn_q_proj":
            ("conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight", 0),
        "lora_te2_text_model_encoder_layers_0_self_attn_v_proj":
            ("conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight", 2),
        "lora_te2_text_model_encoder_layers_0_mlp_fc2":
            ("conditioner.embedders.1.model.transformer.resblocks.0.mlp.c_proj.weight", None)},
    ("sdxl", "peft"): {
        "text_encoder.text_model.encoder.layers.0.mlp.fc1":
            ("conditioner.embedders.0.transformer.text_model.encoder.layers.0.mlp.fc1.weight", None),
        "text_encoder_2.text_model.encoder.layers.0.self_attn.k_proj":
            ("conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight", 1)},
}


@pytest.mark.parametrize("checkpoint,dialect", sorted(CASES))
def test_merge_maps_text_encoders(tmp_path, capsys, checkpoint, dialect):
    gen = torch.Generator().manual_seed(len(checkpoint) * 7 + len(dialect))
    base = {k: torch.randn(shape, generator=gen) for k, shape in CHECKPOINTS[checkpoint].items()}
    save_tensors_atomic(tmp_path / "base.safetensors", base)
    modules = {"lora_unet_input_blocks_1_1_proj_in" if dialect == "kohya" else "unet.input_blocks.1.1.proj_in":
               _lora(gen, 16, 16)}
    targets = dict(CASES[(checkpoint, dialect)])
    targets[next(iter(modules))] = ("model.diffusion_model.input_blocks.1.1.proj_in.weight", None)
    for name, (key, part) in targets.items():
        if name not in modules:
            rows, cols = base[key].shape
            modules[name] = _lora(gen, rows if part is None else rows // 3, cols)
    if dialect == "peft":
        modules = {n: {k: v for k, v in m.items() if k != "alpha"} for n, m in modules.items()}
    _save_adapter(tmp_path / "lora.safetensors", modules, peft=dialect == "peft")
    out = tmp_path / "merged.safetensors"
    code, printed, err = _run(capsys, "merge", "--base", tmp_path / "base.safetensors",
                              "--adapter", f"{tmp_path / 'lora.safetensors'}:0.75", "--out", out)
    assert code == 0, err
    assert f"{len(modules)}/{len(modules)} modules matched, 0 unmatched" in printed, printed
    merged = load_file(str(out))
    expected = {k: v.clone() for k, v in base.items()}
    for name, (key, part) in targets.items():
        delta = _delta(modules[name], 0.75)
        if part is None:
            expected[key] += delta
        else:
            n = base[key].shape[0] // 3
            expected[key][part * n:(part + 1) * n] += delta
    assert merged.keys() == base.keys()
    for key in base:
        torch.testing.assert_close(merged[key], expected[key], rtol=1e-5, atol=1e-5, msg=key)
    assert any(not torch.equal(merged[k], base[k]) for k in base if "cond_stage" in k or "conditioner" in k)


# -- nothing useful: refused, nothing written ---------------------------------------------------

@pytest.fixture()
def sd1(tmp_path):
    gen = torch.Generator().manual_seed(1)
    base = {k: torch.randn(shape, generator=gen) for k, shape in CHECKPOINTS["sd1"].items()}
    save_tensors_atomic(tmp_path / "base.safetensors", base)
    fits = {"lora_unet_input_blocks_1_1_proj_in": _lora(gen, 16, 16)}
    _save_adapter(tmp_path / "lora.safetensors", fits)
    wider = {"lora_unet_input_blocks_1_1_proj_in": _lora(gen, 32, 32),  # same names, SDXL-like widths
             "lora_te_text_model_encoder_layers_0_mlp_fc1": _lora(gen, 24, 12)}
    _save_adapter(tmp_path / "other_model.safetensors", wider)
    return tmp_path


def _refused(code, err, folder, *, names=()):
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1 and lines[0].startswith("error: "), err
    for name in names:
        assert str(name) in lines[0], (name, lines[0])
    assert _no_leftovers(folder)
    return lines[0]


def test_adapter_for_another_model_writes_nothing(sd1, capsys):
    out = sd1 / "merged.safetensors"
    code, _, err = _run(capsys, "merge", "--base", sd1 / "base.safetensors", "--adapter",
                        sd1 / "other_model.safetensors", "--out", out)
    line = _refused(code, err, sd1, names=("other_model.safetensors", sd1 / "base.safetensors"))
    assert "nothing applied" in line and "shape" in line
    assert not out.exists()


def test_out_naming_an_input_or_existing_file(sd1, capsys):
    base = sd1 / "base.safetensors"
    before = base.read_bytes()
    code, _, err = _run(capsys, "merge", "--base", base, "--adapter", sd1 / "lora.safetensors", "--out", base)
    line = _refused(code, err, sd1, names=(base, "--overwrite"))
    assert "--base" in line and base.read_bytes() == before
    code, _, err = _run(capsys, "merge", "--base", base, "--adapter", sd1 / "lora.safetensors",
                        "--out", sd1 / "lora.safetensors")
    assert "--adapter" in _refused(code, err, sd1)
    (sd1 / "taken.safetensors").write_bytes(b"mine")
    code, _, err = _run(capsys, "merge", "--base", base, "--adapter", sd1 / "lora.safetensors",
                        "--out", sd1 / "taken.safetensors")
    assert "already exists" in _refused(code, err, sd1, names=("--overwrite",))
    assert (sd1 / "taken.safetensors").read_bytes() == b"mine"
    code, _, err = _run(capsys, "merge", "--base", base, "--adapter", sd1 / "lora.safetensors",
                        "--out", sd1 / "taken.safetensors", "--overwrite")
    assert code == 0, err
    assert "model.diffusion_model.input_blocks.1.1.proj_in.weight" in load_file(str(sd1 / "taken.safetensors"))
    # every subcommand that writes checks its --out the same way
    code, _, err = _run(capsys, "resize", sd1 / "lora.safetensors", "--rank", 2, "--out", sd1 / "lora.safetensors")
    _refused(code, err, sd1, names=("--overwrite",))
    code, _, err = _run(capsys, "extract", "--base", base, "--tuned", sd1 / "taken.safetensors", "--out", base)
    _refused(code, err, sd1, names=("--overwrite",))
    assert base.read_bytes() == before


@pytest.mark.parametrize("command", ["merge", "resize", "combine", "slice", "extract"])
def test_out_must_be_safetensors_in_an_existing_folder(sd1, capsys, command):
    lora, base = sd1 / "lora.safetensors", sd1 / "base.safetensors"
    head = {"merge": ["merge", "--base", base, "--adapter", lora], "resize": ["resize", lora, "--rank", 2],
            "combine": ["combine", lora, lora], "slice": ["slice", lora, "--rank", 2, "--alpha-policy", "sds-train"],
            "extract": ["extract", "--base", base, "--tuned", base]}[command]
    code, _, err = _run(capsys, *head, "--out", sd1 / "merged.ckpt")
    assert "merged.safetensors" in _refused(code, err, sd1, names=("merged.ckpt",))
    assert not (sd1 / "merged.ckpt").exists()
    code, _, err = _run(capsys, *head, "--out", sd1 / "no_such_folder" / "x.safetensors")
    line = _refused(code, err, sd1, names=(sd1 / "no_such_folder", "does not exist"))
    assert ".tmp" not in line


def test_pickle_base_is_named_and_never_loaded(sd1, capsys):
    marker = sd1 / "unpickled"

    class Trap:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    ckpt = sd1 / "model.ckpt"
    ckpt.write_bytes(pickle.dumps({"state_dict": Trap()}, protocol=2))
    zipped = sd1 / "model_zip.ckpt"
    torch.save({"w": torch.zeros(2)}, zipped)
    for path in (ckpt, zipped):
        code, _, err = _run(capsys, "merge", "--base", path, "--adapter", sd1 / "lora.safetensors",
                            "--out", sd1 / "merged.safetensors")
        line = _refused(code, err, sd1, names=(path,))
        assert "is not a safetensors file (a pickle .ckpt?); convert it to .safetensors first" in line
        assert "header length" not in line
    assert not marker.exists() and not (sd1 / "merged.safetensors").exists()


def test_decimal_comma_strength(sd1, capsys):
    code, _, err = _run(capsys, "merge", "--base", sd1 / "base.safetensors", "--adapter",
                        f"{sd1 / 'lora.safetensors'}:0,5", "--out", sd1 / "merged.safetensors")
    line = _refused(code, err, sd1, names=("did you mean", f"{sd1 / 'lora.safetensors'}:0.5"))
    assert "cannot open" not in line


# -- utilities that would do nothing useful ----------------------------------------------------

def _loha(gen, out_features, in_features):
    return {"hada_w1_a.weight": torch.randn(out_features, 2, generator=gen),
            "hada_w1_b.weight": torch.randn(2, in_features, generator=gen),
            "hada_w2_a.weight": torch.randn(out_features, 2, generator=gen),
            "hada_w2_b.weight": torch.randn(2, in_features, generator=gen), "alpha": torch.tensor(2.0)}


@pytest.fixture()
def families(tmp_path):
    gen = torch.Generator().manual_seed(2)
    loha = {"lora_unet_a": {k.replace(".weight", ""): v for k, v in _loha(gen, 8, 6).items()}}
    _save_adapter(tmp_path / "loha.safetensors", loha)
    _save_adapter(tmp_path / "lora.safetensors", {"lora_unet_a": _lora(gen, 8, 6)},
                  metadata={"ss_network_module": "networks.lora"})
    _save_adapter(tmp_path / "bare.safetensors", {"lora_unet_a": _lora(gen, 8, 6)})
    return tmp_path


def test_resize_of_a_non_lora(families, capsys):
    out = families / "r.safetensors"
    code, _, err = _run(capsys, "resize", families / "loha.safetensors", "--rank", 2, "--out", out)
    line = _refused(code, err, families, names=(families / "loha.safetensors", "loha", "combine"))
    assert "--rank N" in line and not out.exists()


def test_slice_of_a_plain_lora(families, capsys):
    out = families / "s.safetensors"
    code, _, err = _run(capsys, "slice", families / "lora.safetensors", "--rank", 2, "--out", out,
                        "--alpha-policy", "sds-train")
    line = _refused(code, err, families, names=(families / "lora.safetensors", "not a DyLoRA", "resize"))
    assert "networks.lora" in line and not out.exists()
    # no metadata either way: sliced as asked, with a warning that names resize
    code, printed, err = _run(capsys, "slice", families / "bare.safetensors", "--rank", 2, "--out", out,
                              "--alpha-policy", "sds-train")
    assert code == 0 and out.exists() and err.startswith("warning: ") and "resize" in err


def test_combine_that_would_densify(families, capsys):
    out = families / "c.safetensors"
    code, _, err = _run(capsys, "combine", families / "lora.safetensors", f"{families / 'loha.safetensors'}:0.5",
                        "--out", out)
    _refused(code, err, families, names=("--rank N", "dense"))
    assert not out.exists()
    code, printed, err = _run(capsys, "combine", families / "lora.safetensors",
                              f"{families / 'loha.safetensors'}:0.5", "--out", out, "--rank", 4)
    assert code == 0 and out.exists(), err


def test_adapter_whose_text_encoder_part_alone_fits_writes_nothing(sd1, capsys):
    """An SDXL LoRA on SD1.5: its CLIP-L modules fit SD1's text encoder, its UNet modules fit nothing."""
    gen = torch.Generator().manual_seed(5)
    sdxl_like = {"lora_unet_input_blocks_1_1_proj_in": _lora(gen, 32, 32),
                 "lora_te1_text_model_encoder_layers_0_mlp_fc1": _lora(gen, 16, 8),
                 "lora_te2_text_model_encoder_layers_0_mlp_fc1": _lora(gen, 48, 12)}
    _save_adapter(sd1 / "sdxl_like.safetensors", sdxl_like)
    out = sd1 / "merged.safetensors"
    code, _, err = _run(capsys, "merge", "--base", sd1 / "base.safetensors", "--adapter",
                        sd1 / "sdxl_like.safetensors", "--out", out)
    line = _refused(code, err, sd1, names=("sdxl_like.safetensors", sd1 / "base.safetensors", "diffusion model",
                                           "text-encoder"))
    assert not out.exists(), line
    # an adapter with text-encoder modules only is merged as asked
    _save_adapter(sd1 / "te_only.safetensors", {"lora_te_text_model_encoder_layers_0_mlp_fc1": _lora(gen, 16, 8)})
    code, _, err = _run(capsys, "merge", "--base", sd1 / "base.safetensors", "--adapter",
                        sd1 / "te_only.safetensors", "--out", out)
    assert code == 0 and out.exists(), err
