"""`python -m lycoris_core extract | resize | slice | combine`: a short report on success; one line
on stderr, exit 1 and no output file on bad input."""

import json
import subprocess
import sys

import pytest
import torch

from lycoris_core import load_adapter_file
from lycoris_core.cli import main
from lycoris_core.safe_io import save_tensors_atomic


@pytest.fixture()
def files(tmp_path):
    gen = torch.Generator().manual_seed(0)
    base = {"model.diffusion_model.a.weight": torch.randn(32, 24, generator=gen),
            "model.diffusion_model.c.weight": torch.randn(16, 8, 3, 3, generator=gen)}
    tuned = {k: v + 0.1 * torch.randn(v.shape, generator=gen) for k, v in base.items()}
    save_tensors_atomic(tmp_path / "base.safetensors", base)
    save_tensors_atomic(tmp_path / "tuned.safetensors", tuned)
    dylora = {"lora_unet_a.lora_down.weight": torch.randn(8, 24, generator=gen),
              "lora_unet_a.lora_up.weight": torch.randn(32, 8, generator=gen), "lora_unet_a.alpha": torch.tensor(4.0)}
    save_tensors_atomic(tmp_path / "dy.safetensors", dylora,
                        {"ss_network_module": "networks.dylora", "ss_network_args": json.dumps({"unit": "4"})})
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file at all")
    return tmp_path


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_utilities_succeed(files, capsys):
    x, r, c, s = (files / n for n in ("x.safetensors", "r.safetensors", "c.safetensors", "s.safetensors"))
    code, out, _ = _run(capsys, "extract", "--base", files / "base.safetensors", "--tuned", files / "tuned.safetensors",
                        "--out", x, "--rank", 6, "--conv-rank", 4, "--rank-pattern", ".*a=5")
    assert code == 0 and "relative error" in out and x.exists()
    adapter = load_adapter_file(x)
    assert adapter.adapters["lora_unet_a"].rank == 5 and adapter.adapters["lora_unet_c"].rank == 4
    code, out, _ = _run(capsys, "extract", "--base", files / "base.safetensors", "--tuned", files / "tuned.safetensors",
                        "--out", files / "e.safetensors", "--mode", "energy", "--value", 0.5, "--tucker")
    assert code == 0
    code, out, _ = _run(capsys, "resize", x, "--out", r, "--rank", 2)
    assert code == 0 and load_adapter_file(r).ranks() == [2]
    code, out, _ = _run(capsys, "resize", x, "--out", files / "r2.safetensors", "--energy", 0.6)
    assert code == 0 and "kept" in out
    code, out, _ = _run(capsys, "combine", f"{x}:0.5", f"{r}:-1", "--out", c)
    assert code == 0 and load_adapter_file(c).ranks() == [6, 7]
    code, out, _ = _run(capsys, "combine", x, r, "--out", files / "c2.safetensors", "--rank", 3)
    assert code == 0 and load_adapter_file(files / "c2.safetensors").ranks() == [3]
    code, out, _ = _run(capsys, "slice", files / "dy.safetensors", "--rank", 4, "--out", s)
    assert code == 0 and "sds-train" in out
    assert load_adapter_file(s).adapters["lora_unet_a"].alpha == pytest.approx(4.0 * (4 / 8) ** 0.5, rel=1e-6)


@pytest.mark.parametrize("argv", [
    ("extract", "--base", "{d}/base.safetensors", "--tuned", "{d}/missing.safetensors", "--out", "{d}/o.safetensors"),
    ("extract", "--base", "{d}/base.safetensors", "--tuned", "{d}/junk.safetensors", "--out", "{d}/o.safetensors"),
    ("extract", "--base", "{d}/base.safetensors", "--tuned", "{d}/base.safetensors", "--out", "{d}/o.safetensors"),
    ("extract", "--base", "{d}/base.safetensors", "--tuned", "{d}/tuned.safetensors", "--out", "{d}/o.safetensors",
     "--mode", "energy"),
    ("extract", "--base", "{d}/base.safetensors", "--tuned", "{d}/tuned.safetensors", "--out", "{d}/o.safetensors",
     "--mode", "energy", "--value", "1.5"),
    ("extract", "--base", "{d}/base.safetensors", "--tuned", "{d}/tuned.safetensors", "--out", "{d}/o.safetensors",
     "--rank-pattern", "nonumber"),
    ("resize", "{d}/junk.safetensors", "--out", "{d}/o.safetensors", "--rank", "2"),
    ("resize", "{d}/dy.safetensors", "--out", "{d}/o.safetensors"),
    ("slice", "{d}/dy.safetensors", "--rank", "3", "--out", "{d}/o.safetensors"),
    ("slice", "{d}/base.safetensors", "--rank", "4", "--out", "{d}/o.safetensors"),
    ("combine", "{d}/dy.safetensors", "{d}/junk.safetensors", "--out", "{d}/o.safetensors"),
    ("combine", "{d}/dy.safetensors:0.5", "--out", "{d}/o.safetensors", "--mode", "ratio"),
])
def test_bad_input_one_line_no_file(files, capsys, argv):
    code, out, err = _run(capsys, *(a.format(d=files) for a in argv))
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert not (files / "o.safetensors").exists()
    assert not [p for p in files.iterdir() if p.name.endswith(".tmp")]


def test_module_entry_point(files):
    proc = subprocess.run([sys.executable, "-m", "lycoris_core", "slice", str(files / "dy.safetensors"), "--rank", "3",
                           "--out", str(files / "o.safetensors")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "multiple of the DyLoRA rank step 4" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_merge_with_block_weights(tmp_path, capsys):
    """`merge --block-weights` scales each layer by its block's weight; a block at 0 is copied as is."""
    from safetensors.torch import load_file

    gen = torch.Generator().manual_seed(3)
    names = {"in": "input_blocks.4.1.proj_in", "mid": "middle_block.1.proj_in", "out": "output_blocks.3.1.proj_in"}
    base = {f"model.diffusion_model.{n}.weight": torch.randn(16, 16, generator=gen) for n in names.values()}
    base["model.diffusion_model.label_emb.0.0.weight"] = torch.randn(16, 16, generator=gen)  # sdxl marker
    lora = {}
    for n in names.values():
        kohya = "lora_unet_" + n.replace(".", "_")
        lora[f"{kohya}.lora_down.weight"] = torch.randn(4, 16, generator=gen)
        lora[f"{kohya}.lora_up.weight"] = torch.randn(16, 4, generator=gen)
        lora[f"{kohya}.alpha"] = torch.tensor(2.0)
    save_tensors_atomic(tmp_path / "base.safetensors", base)
    save_tensors_atomic(tmp_path / "lora.safetensors", lora)
    out = tmp_path / "out.safetensors"
    code, printed, err = _run(capsys, "merge", "--base", tmp_path / "base.safetensors", "--adapter",
                              f"{tmp_path / 'lora.safetensors'}:0.5", "--out", out,
                              "--block-weights", "IN*=0, M00=0.25")
    assert code == 0, err
    assert "block weights: named" in printed
    merged = load_file(str(out))
    for group, weight in (("in", 0.0), ("mid", 0.25), ("out", 1.0)):
        key = f"model.diffusion_model.{names[group]}.weight"
        kohya = "lora_unet_" + names[group].replace(".", "_")
        delta = 0.5 * (lora[f"{kohya}.lora_up.weight"] @ lora[f"{kohya}.lora_down.weight"]) * (2.0 / 4)
        if weight == 0.0:
            assert torch.equal(merged[key], base[key])
        else:
            torch.testing.assert_close(merged[key], base[key] + weight * delta, rtol=1e-5, atol=1e-6)
    code, _, err = _run(capsys, "merge", "--base", tmp_path / "base.safetensors", "--adapter",
                        tmp_path / "lora.safetensors", "--out", tmp_path / "bad.safetensors", "--block-weights", "1,2,3")
    assert code == 1 and "sdxl" in err and err.count("\n") == 1, err
    assert not (tmp_path / "bad.safetensors").exists()
