"""Block-weight strings: Inspire and LBW vectors, presets and preset files, the named syntax."""

import os

import pytest

from lycoris_core.block_weights import (
    PRESET_DIR, BlockWeightError, load_preset_file, parse_block_weights, preset_dialect, shipped_presets,
)
from lycoris_core.blocks import architecture_blocks, block_id

SD1 = architecture_blocks("sd1")
SDXL = architecture_blocks("sdxl")
FLUX = architecture_blocks("flux")
IDS = {"sd1": SD1, "sdxl": SDXL, "flux": FLUX}


def parse(text, arch="sd1", **kwargs):
    return parse_block_weights(text, arch, IDS.get(arch) or architecture_blocks(arch), **kwargs)


def ones(ids, *names):
    return {i: (1.0 if i in names else 0.0) for i in ids}


# -- shipped presets -------------------------------------------------------------------------

def _preset_arch(name):
    if name.startswith("SDXL-"):
        return "sdxl", (21 if "-LyC-" in name else 12)
    if name.startswith("SD-"):
        return "sd1", (27 if "-LyC-" in name else 17)
    if name.startswith("FLUX-"):
        return "flux", (20 if "-DBL-" in name else 58)
    return ("flux", 61) if name == "FLUXALL" else ("sd1", 17)


def test_every_shipped_preset_parses_for_its_architecture():
    presets = shipped_presets()
    assert len(presets) == 10 + 1 + 16 + 5 + 5 + 5 + 4 + 6  # LBW, FLUXALL, SD-, SD-LyC-, SDXL-, SDXL-LyC-, FLUX-
    for name, vector in presets.items():
        arch, length = _preset_arch(name)
        assert len(vector.split(",")) == length, name
        weights = parse(name, arch)
        assert weights.preset == name
        assert weights.dialect == preset_dialect(name), name
        assert weights.dialect == ("lbw" if "-" not in name else "inspire"), name
        assert set(weights.vector) == set(IDS[arch])


def test_preset_files_are_in_the_preset_file_format():
    for filename in ("inspire.txt", "lbw.txt"):
        with open(os.path.join(PRESET_DIR, filename), encoding="utf-8") as handle:
            for line in handle:
                line = line.strip()
                assert not line or line.startswith("#") or (":" in line and "," in line), line


def test_lbw_and_inspire_17_agree_and_bind_to_ids():
    lbw = parse("OUTS")
    inspire = parse("SD-OUTS")
    assert lbw.dialect == "lbw" and inspire.dialect == "inspire"
    assert lbw.vector == inspire.vector
    assert lbw.vector == ones(SD1, "BASE", "TE", "OUT07", "OUT08", "OUT09", "OUT10", "OUT11")
    assert parse("SD-INS").vector == ones(SD1, "BASE", "TE", "IN01", "IN02", "IN04")
    assert parse("MIDD").vector == ones(SD1, "BASE", "TE", "IN05", "IN07", "IN08", "M00", "OUT03", "OUT04",
                                        "OUT05", "OUT06")
    mout = parse("SD-MOUT")
    assert mout.weight("OUT09") == 0.5 and mout.weight("IN08") == 1 and mout.weight("IN07") == 0


def test_lyc_and_sdxl_layouts():
    assert parse("SD-LyC-MIDALL").vector == ones(SD1, "BASE", "TE", "M00")
    assert parse("SD-LyC-INALL").vector == ones(SD1, "BASE", "TE", *[f"IN{i:02d}" for i in range(1, 12)])
    assert parse("SDXL-OUTALL", "sdxl").vector == ones(SDXL, "BASE", "TE1", "TE2",
                                                       *[f"OUT{i:02d}" for i in range(6)])
    assert parse("SDXL-LyC-OUTALL", "sdxl").vector == ones(SDXL, "BASE", "TE1", "TE2",
                                                           *[f"OUT{i:02d}" for i in range(9)])
    lbw20 = parse(",".join(["0.5"] + ["0"] * 9 + ["1"] + ["0.25"] * 9), "sdxl")
    assert lbw20.dialect == "lbw" and lbw20.weight("M00") == 1 and lbw20.weight("OUT08") == 0.25
    assert lbw20.weight("TE2") == 0.5  # text encoders take BASE in the vector dialects
    # Inspire's three middle slots are one id here: M00 takes mid1, with a warning when they differ
    mids = parse(",".join(["1"] * 9 + ["0.2", "0.7", "0.2"] + ["1"] * 9), "sdxl")
    assert mids.weight("M00") == 0.7 and any("mid1" in w for w in mids.warnings)


def test_lbw_short_vectors_fill_by_id_and_apply_across_sd_unets():
    w = parse("ALL", "sdxl")  # LBW's 17-slot default on SDXL: scattered into the ids by name
    assert w.dialect == "lbw" and "applied by id" in w.layout
    assert w.weight("OUT03") == 1 and w.weight("OUT00") == 0 and w.weight("IN00") == 0
    assert "OUT00" in w.unset
    assert any("OUT09" in m for m in w.warnings)  # no such block in SDXL
    with pytest.raises(BlockWeightError, match="Inspire dialect"):
        parse("SD-ALL", "sdxl")  # an Inspire 17 preset means an SD1 file: no reading on SDXL


def test_flux_layouts():
    lbw = parse(",".join(["0.1", "0.2", "0.3"] + ["0.4"] * 19 + ["0.5"] * 38 + ["0.6"]), "flux")
    assert lbw.dialect == "lbw" and lbw.layout == "Flux (61)"
    assert (lbw.weight("TE1"), lbw.weight("TE2"), lbw.weight("BASE")) == (0.1, 0.2, 0.3)
    assert lbw.weight("D18") == 0.4 and lbw.weight("S00") == 0.5
    assert any("OUT" in m for m in lbw.warnings)
    full = parse("FLUX-SINGLE-31to37", "flux")
    assert [b for b, v in full.vector.items() if v and b.startswith(("D", "S"))] == [f"S{i}" for i in range(30, 38)]
    tail = parse("FLUX-DBL-TAIL6", "flux")  # Inspire: the single blocks keep the last value
    assert tail.weight("D12") == 0 and tail.weight("D13") == 1 and tail.weight("S37") == 1
    assert parse("FLUX-DBL-FRONT7", "flux").weight("S00") == 0


def test_single_blocks_only_flux_adapter_keeps_double_values_on_double_ids():
    modules = [f"lycoris_single_transformer_blocks_{i}_attn_to_q" for i in range(38)]
    ids = architecture_blocks("flux", modules)
    assert ids == FLUX
    present = {block_id(m, "flux") for m in modules}
    vector = ",".join(["1"] + ["0.25"] * 19 + ["0.75"] * 38)
    w = parse_block_weights(vector, "flux", ids, present_ids=present)
    assert all(w.weight_for_key(m) == 0.75 for m in modules)
    assert w.weight("D00") == 0.25
    # Inspire would have put the double values on the single blocks: say so
    assert any("S00=0.25 (here 0.75)" in m for m in w.warnings)
    dbl = parse_block_weights("FLUX-DBL-FRONT7", "flux", ids, present_ids=present)
    assert dbl.weight_for_key(modules[0]) == 0 and dbl.weight("D06") == 1


def test_wrong_length_lists_the_expected_ids():
    with pytest.raises(BlockWeightError) as error:
        parse("1,1,1,1,1", "sdxl")
    text = str(error.value)
    assert "5 value(s)" in text and "sdxl" in text
    for part in ("12 (", "20 (", "21 (", "BASE, IN04-IN05, IN07-IN08, M00, OUT00-OUT05", "BASE, IN00-IN08, M00, OUT00-OUT08"):
        assert part in text
    with pytest.raises(BlockWeightError, match=r"31 \(vector BASE \+ blocks \(31\): BASE, B00-B29\)"):
        parse("1,1,1", "wan")
    assert issubclass(BlockWeightError, ValueError)


def test_vector_dialect_for_other_dits():
    keys = [f"diffusion_model.joint_blocks.{i}.x_block.attn.qkv.weight" for i in range(24)]
    ids = architecture_blocks("sd3", keys)
    w = parse_block_weights(",".join(["1"] + ["0"] * 12 + ["0.5"] * 12), "sd3", ids)
    assert w.dialect == "vector" and w.weight("J11") == 0 and w.weight("J12") == 0.5 and w.weight("TE3") == 1


# -- tokens ----------------------------------------------------------------------------------

def test_random_tokens_are_seeded_and_in_each_dialects_range():
    a, b, c = parse("SD-ROUT", seed=5), parse("SD-ROUT", seed=5), parse("SD-ROUT", seed=6)
    assert a.vector == b.vector and a.populated == b.populated and a.vector != c.vector
    outs = [a.weight(f"OUT{i:02d}") for i in range(3, 12)]
    assert all(0 <= v < 3 for v in outs) and all(round(v, 2) == v for v in outs)
    lbw = parse(",".join(["X"] + ["R"] * 16), x=0.5, seed=1)  # X makes it LBW: R in [0, 1), 3 decimals
    assert lbw.dialect == "lbw" and lbw.weight("BASE") == 0.5
    assert all(0 <= lbw.weight(i) < 1 for i in ("IN01", "OUT11"))
    many = parse(",".join(["U"] * 26), seed=2)  # LBW 26: U in (-0.5, 1.5)
    assert all(-0.5 < v < 1.5 for v in many.vector.values())
    assert parse(",".join(["X+0.25", "X-1"] + ["1"] * 15), x=1.0).vector["IN01"] == 0.0


def test_a_and_b_tokens():
    w = parse("SD-AB", a=2.0, b=0.5)
    assert w.dialect == "inspire"
    assert (w.weight("BASE"), w.weight("IN01"), w.weight("OUT07"), w.weight("OUT03")) == (2.0, 0.5, 2.0, 0.5)
    assert parse("SD-AOUT").weight("BASE") == 4.0  # Inspire's loader default A
    assert parse(",".join(["a", "b"] + ["1"] * 15), a=3.0).vector["IN01"] == 0.5
    with pytest.raises(BlockWeightError, match="mix"):
        parse(",".join(["A", "X"] + ["1"] * 15))
    with pytest.raises(BlockWeightError, match="per-layer"):
        parse(",".join(["1", "1 0 1"] + ["1"] * 15))
    with pytest.raises(BlockWeightError, match="'Q' is not a weight"):
        parse(",".join(["1", "Q"] + ["1"] * 15))


def test_pasted_lines_first_entry_preset_and_inverse():
    line = "MINE:" + ",".join(["1"] + ["0"] * 16)
    assert parse(line).vector == ones(SD1, "BASE", "TE")
    assert parse("SD-INS, something").preset == "SD-INS"  # Inspire: invalid vector led by a preset name
    inv = parse("SD-INS", inverse=True)
    assert inv.weight("IN01") == 0 and inv.weight("IN05") == 1 and inv.weight("BASE") == 0
    assert parse("").dialect == "empty" and parse("").is_identity
    with pytest.raises(BlockWeightError, match="LBW dialect"):
        parse(",".join(["1"] * 27), dialect="lbw")


# -- named syntax ----------------------------------------------------------------------------

def test_named_syntax():
    w = parse("IN04=0.5, OUT*=0, BASE=1")
    assert w.dialect == "named"
    assert w.weight("IN04") == 0.5 and w.weight("OUT11") == 0 and w.weight("IN05") == 1 and w.weight("TE") == 1
    f = parse("D00-D18=1, S=0, TE=0.25, BASE=1", "flux")
    assert f.weight("D18") == 1 and f.weight("S37") == 0 and f.weight("TE1") == f.weight("TE2") == 0.25
    x = parse("DEFAULT=0; IN4=1\nMID=0.5; IN05-OUT01=0.75; te2=2", "sdxl")
    assert x.weight("IN04") == 1 and x.weight("M00") == 0.75 and x.weight("OUT01") == 0.75
    assert x.weight("OUT02") == 0 and x.weight("TE2") == 2 and x.weight("TE1") == 0
    assert parse("*=0, S1?=1", "flux").weight("S15") == 1
    later = parse("OUT=0, OUT05=1")
    assert later.weight("OUT05") == 1 and later.weight("OUT04") == 0


def test_named_syntax_errors_name_the_ids():
    with pytest.raises(BlockWeightError, match="names no block of sdxl; its ids are BASE, IN00-IN08, M00, OUT00-OUT08"):
        parse("IN11=0", "sdxl")
    with pytest.raises(BlockWeightError, match="'D' names no block of sd1"):
        parse("D=0")
    with pytest.raises(BlockWeightError, match="SELECTOR=VALUE"):
        parse("IN04=1, OUT")
    with pytest.raises(BlockWeightError, match="comes after"):
        parse("OUT03-IN02=1")


@pytest.mark.parametrize("arch, text", [("sd1", "SD-MOUT"), ("sdxl", "SDXL-LyC-INALL"), ("flux", "FLUX-DBL-MID6"),
                                        ("sd1", "IN04=0.5, OUT*=0.25")])
def test_describe_reads_back(arch, text):
    w = parse(text, arch)
    assert w.describe().startswith("BASE=")
    for form in (w.describe(), w.describe(compact=True)):
        again = parse(form, arch)
        assert again.dialect == "named" and again.vector == w.vector
    assert w.summary()


# -- % shorthand and preset files ------------------------------------------------------------

def test_inspire_shorthand():
    w = parse("%default=0, base=1, in=0.5, out4-6=1, mid=0.25")
    assert w.dialect == "inspire-shorthand"
    assert w.weight("BASE") == 1 and w.weight("TE") == 1 and w.weight("IN00") == 0.5
    assert [w.weight(f"OUT{i:02d}") for i in range(2, 7)] == [0, 1, 1, 1, 0] and w.weight("M00") == 0.25
    assert parse("%default=0, in1=1").weight("IN01") == 1  # positions in Inspire's layout: IN01 first
    f = parse("%default=0, double=1, single3=0.2", "flux")
    assert f.weight("BASE") == 0 and f.weight("D10") == 1 and f.weight("S02") == 0.2 and f.weight("S03") == 0
    with pytest.raises(BlockWeightError, match="no 'double' blocks"):
        parse("%double=1")
    with pytest.raises(BlockWeightError, match="positions run 1-8"):
        parse("%in9=1", "sdxl")
    with pytest.raises(BlockWeightError, match="non-negative"):
        parse("%in=-1")


def test_user_preset_file(tmp_path):
    path = tmp_path / "lbw-preset.custom.txt"
    path.write_text("# my presets\n\nSD-FACE:" + ",".join(["1"] + ["0"] * 7 + ["1"] * 9) + "\n"
                    "@TEST:17\nbroken line\nSD-INS:" + ",".join(["0"] * 17) + "\n"
                    "NAMED:IN04=0.5, OUT*=0\nALIAS:SD-FACE\n", encoding="utf-8")
    presets = load_preset_file(path)
    assert set(presets) == {"SD-FACE", "SD-INS", "NAMED", "ALIAS"}
    face = parse("SD-FACE", presets=presets)
    assert face.preset == "SD-FACE" and face.weight("OUT03") == 1 and face.weight("IN01") == 0
    assert parse("SD-INS", presets=presets).weight("BASE") == 0  # a user preset overrides a shipped one
    assert parse("NAMED", presets=presets).weight("OUT05") == 0
    assert parse("ALIAS", presets=presets).vector == face.vector
    with pytest.raises(BlockWeightError, match="cannot read"):
        load_preset_file(tmp_path / "missing.txt")


# -- what a new user types (issue 22) ---------------------------------------------------------

@pytest.mark.parametrize("text, meant", [
    ("IN04:0.5", "IN04=0.5"),
    ("IN04:0.5, OUT*:0", "IN04=0.5, OUT*=0"),
    ("IN04=0.5, OUT03:0", "IN04=0.5, OUT03=0"),
    ("IN04 0.5", "IN04=0.5"),
    ("IN04=1; mid 0.25", "IN04=1, mid=0.25"),
])
def test_colon_or_missing_equals_sign_says_what_was_meant(text, meant):
    with pytest.raises(BlockWeightError) as error:
        parse(text)
    assert f"did you mean {meant}?" in str(error.value)
    assert "value(s) given" not in str(error.value)  # not the list of vector lengths


def test_selector_without_a_weight():
    with pytest.raises(BlockWeightError, match=r"'OUT' is not SELECTOR=VALUE; it has no weight: did you mean OUT="):
        parse("IN04=1, OUT")
    pasted = parse("MINE:" + ",".join(["1"] + ["0"] * 16))  # a pasted NAME:vector line still reads
    assert pasted.vector == ones(SD1, "BASE", "TE")


def test_a_vector_of_another_architecture_is_flagged():
    sdxl_on_sd1 = parse(",".join(["1"] * 5 + ["0"] * 7), "sd1")  # LBW's SDXL 12: read by id, with a warning
    assert sdxl_on_sd1.weight("IN04") == 1 and sdxl_on_sd1.weight("OUT00") == 0
    assert "SDXL layout, but this model is sd1" in sdxl_on_sd1.warnings[0]
    assert any("SDXL layout" in w for w in parse(",".join(["1"] * 20), "sd1").warnings)
    assert any("SD1 layout, but this model is sdxl" in w for w in parse(",".join(["1"] * 26), "sdxl").warnings)
    assert not any("layout, but" in w for w in parse(",".join(["1"] * 17), "sd1").warnings)  # its own
    assert not any("layout, but" in w for w in parse("ALL", "sdxl").warnings)  # LBW's presets scatter by design
    with pytest.raises(BlockWeightError, match=r"17 values is the SD1 LoRA \(Inspire/LBW\) layout: weights for "
                                               r"another model\?"):
        parse(",".join(["1"] * 17), "flux")
