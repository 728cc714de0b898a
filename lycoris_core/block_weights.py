"""Per-block strength strings: three dialects, always resolved onto block ids.

`parse_block_weights(text, architecture, block_ids)` reads one of:

- **named** (ours): ``IN04=0.5, OUT*=0, D00-D18=1, S=0, TE=1, BASE=1``. Items are
  ``SELECTOR=VALUE`` separated by ``,``, ``;`` or new lines. A selector is an id (``IN04``; ``IN4``
  and ``MID`` for ``M00`` also work), a glob (``OUT*``, ``S1?``), a range of ids in the
  architecture's order (``D00-D18``, ``IN05-OUT05``), a group (``IN``, ``M``, ``OUT``, ``D``, ``S``,
  ``J``, ``B``, ``T``, ``L``, ``TE`` — all TE1/TE2…), or ``*``/``ALL``. ``DEFAULT=v`` sets every id
  no item names (1 otherwise). Later items override earlier ones. Values: numbers, ``A``/``a``/``B``/``b``
  (the A and B parameters, lower case halved), ``R`` (uniform [0, 3)) and ``U`` (uniform
  [−1.5, 1.5)) drawn once per id, Inspire's ranges. Detected by a ``=`` (and no leading ``%``).
- **inspire** (ComfyUI-Inspire-Pack "Lora Loader (Block Weight)"): comma-separated vectors,
  ``NAME:vector`` lines, preset names, ``%`` shorthand, tokens R/U/A/a/B/b. Inspire reads a
  vector by *position over the blocks the file holds*; here the vector is read against the
  complete layout of its length (what Inspire does on a complete file of that kind) and bound
  to ids, so a file lacking blocks does not shift the values (Inspire #191). Layouts: SD1 17
  (base, IN01, IN02, IN04, IN05, IN07, IN08, M00, OUT03–OUT11) and 27 (base, IN01–IN11, mid0–2,
  OUT00–OUT11); SDXL 12 (base, IN04, IN05, IN07, IN08, M00, OUT00–OUT05) and 21 (base, IN01–IN08,
  mid0–2, OUT00–OUT08); double/single DiTs 1+D+S (Flux 58) and 1+D (Flux 20: the single blocks
  keep the last value, Inspire's "running out" rule). Inspire's three middle slots map onto the
  one M00 id: M00 takes mid1 (the one standard LoRAs have); a warning says when mid0/mid2 differ.
  ``%`` shorthand: ``%default=0, base=1, in=0.5, out4-6=1, double=1, single3=0.2``; an index
  is a 1-based position in the group's complete Inspire layout (in: IN01…, out: OUT00…,
  mid: M00, double: D00…, single: S00…), not among the blocks of one file.
- **lbw** (sd-webui-lora-block-weight): a vector whose slots name fixed ids; 17 (as Inspire's
  17), 26 (BASE, IN00–IN11, M00, OUT00–OUT11), 12 (as Inspire's 12), 20 (BASE, IN00–IN08, M00,
  OUT00–OUT08), 61 (Flux: CLIP, T5, IN, D00–D18, S00–S37, OUT). SD layouts of either UNet apply to
  the other by id (LBW scatters every short vector into its 26 slots); ids a layout lacks get 0.
  Tokens R ([0, 1)), U ((−0.5, 1.5)), X / X+d / X−d (the `x` parameter).
- **vector**: one value per id in `block_ids` order without the TE ids (BASE first) — for
  architectures neither tool has a layout for (SD3, Wan, Qwen-Image, Lumina, LTX, …). For SD1
  it is the LBW 26 layout, for SDXL LBW 20, for Flux Inspire 58.

Text encoders: in the inspire/lbw/vector dialects the TE ids take the BASE value (LBW's 61 has
CLIP → TE1 and T5 → TE2). Random tokens are drawn from `random.Random(seed mod 2**31)` in order.

Auto detection, in order: empty → every id 1 ("empty"); a preset name (user presets, then the
shipped ones; the dialect of a shipped preset is its origin's); ``NAME:`` is dropped; leading
``%`` → inspire shorthand; a ``=`` → named; else a vector, whose length picks the layout. When a
length has both an LBW and an Inspire layout (SD1 17, SDXL 12, the same ids), ``X`` tokens or an
LBW preset name make it lbw, otherwise inspire (A/B tokens, Inspire preset names, or nothing).
A vector of a length the architecture has no layout for raises `BlockWeightError`, listing the
accepted lengths and their ids, and the architecture whose layout has that length. The named form
typed with ``:`` or a space instead of ``=`` (``IN04:0.5``, ``OUT* 0``) is refused with the string
that was likely meant. A vector read in the other SD UNet's layout (an SDXL 12/20 on SD1, an SD1
17/26 on SDXL) applies by id with a warning, except a shipped LBW preset, made to scatter onto both.
"""

from __future__ import annotations

import fnmatch
import functools
import os
import random
import re
from dataclasses import dataclass, field

from .blocks import block_id, canonical_architecture, id_group

PRESET_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "presets")
DIALECTS = ("auto", "named", "inspire", "lbw", "vector")


class BlockWeightError(ValueError):
    """A block-weight string that cannot be read for this architecture (one line)."""


# -- presets ---------------------------------------------------------------------------------

def read_presets(text: str) -> dict[str, str]:
    """Presets from text in the preset-file format shared by Inspire and LBW: one
    ``NAME:v1,v2,...`` per line. Blank lines, lines starting with ``#`` or ``//``, lines without
    ``:`` and Inspire's ``@`` test generators (XY-plot helpers) are skipped; a later line
    overrides an earlier one of the same name. Values are kept as text (any dialect)."""
    presets: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", "//", "@")) or ":" not in line:
            continue
        name, value = line.split(":", 1)
        name, value = name.strip(), value.strip()
        if name and value:
            presets[name] = value
    return presets


def load_preset_file(path) -> dict[str, str]:
    """Read a user's preset file (Inspire ``lbw-preset.txt`` / ``lbw-preset.custom.txt``, LBW
    ``lbwpresets.txt``, or ours). Raises `BlockWeightError` when it cannot be read."""
    try:
        with open(path, encoding="utf-8-sig") as handle:
            return read_presets(handle.read())
    except (OSError, UnicodeDecodeError) as error:
        raise BlockWeightError(f"{path}: cannot read the preset file ({error})") from None


@functools.lru_cache(maxsize=1)
def _shipped() -> tuple[dict[str, str], dict[str, str]]:
    presets: dict[str, str] = {}
    origin: dict[str, str] = {}
    for dialect in ("lbw", "inspire"):
        for name, value in load_preset_file(os.path.join(PRESET_DIR, f"{dialect}.txt")).items():
            presets[name] = value
            origin[name] = dialect
    return presets, origin


def shipped_presets() -> dict[str, str]:
    """The shipped presets (LBW defaults and Inspire's), name -> vector text."""
    return dict(_shipped()[0])


def preset_dialect(name: str) -> str | None:
    """"lbw" or "inspire" for a shipped preset name, None otherwise."""
    return _shipped()[1].get(name)


def presets_for(architecture: str, block_ids, presets: dict | None = None) -> list[str]:
    """Names of the presets (shipped, then `presets`) that read without error for this
    architecture and ids: what a preset drop-down can offer."""
    names = list(shipped_presets()) + [n for n in (presets or {}) if n not in shipped_presets()]
    fitting = []
    for name in names:
        try:
            parse_block_weights(name, architecture, block_ids, presets)
        except BlockWeightError:
            continue
        fitting.append(name)
    return fitting


# -- result ----------------------------------------------------------------------------------

def _fmt(value: float) -> str:
    text = f"{value:.6g}"
    return "0" if text == "-0" else text


@dataclass
class BlockWeights:
    """Weights bound to block ids. `weight(id)` is the multiplier of that block's layers."""

    architecture: str
    block_ids: list[str]
    values: dict[str, float]
    dialect: str  # "named" | "inspire" | "inspire-shorthand" | "lbw" | "vector" | "empty"
    layout: str | None = None  # e.g. "LBW SD1 LoRA (17)"
    preset: str | None = None  # the preset name the text named, if any
    populated: str = ""  # the input vector with random tokens realised (reproducible)
    default: float = 1.0  # the weight of an id not in `block_ids`
    warnings: list[str] = field(default_factory=list)
    unset: list[str] = field(default_factory=list)  # ids the vector's layout does not name (got 0)

    @property
    def vector(self) -> dict[str, float]:
        """The populated per-id weights, in `block_ids` order."""
        return {b: self.values[b] for b in self.block_ids}

    def weight(self, block: str) -> float:
        return self.values.get(block, self.default)

    def weight_for_key(self, key: str) -> float:
        """The weight of a model key or an adapter module name (via `block_id`)."""
        return self.weight(block_id(key, self.architecture))

    @property
    def is_identity(self) -> bool:
        return all(v == 1.0 for v in self.values.values())

    def describe(self, compact: bool = False) -> str:
        """The resolved named form ("BASE=1, IN00=0, ..."), which reads back to the same weights.
        `compact`: runs of equal values within a group as ranges ("IN00-IN03=0")."""
        ids = self.block_ids
        if not compact:
            return ", ".join(f"{b}={_fmt(self.values[b])}" for b in ids)
        parts, i = [], 0
        while i < len(ids):
            j = i
            while (j + 1 < len(ids) and id_group(ids[j + 1]) == id_group(ids[i])
                   and self.values[ids[j + 1]] == self.values[ids[i]]):
                j += 1
            name = ids[i] if i == j else f"{ids[i]}-{ids[j]}"
            parts.append(f"{name}={_fmt(self.values[ids[i]])}")
            i = j + 1
        return ", ".join(parts)

    def summary(self) -> str:
        """One line: which dialect and layout were read, and the compact named form."""
        what = self.dialect + (f" {self.layout}" if self.layout else "")
        if self.preset:
            what = f"preset {self.preset} ({what})"
        return f"{what}: {self.describe(compact=True)}"


# -- layouts ---------------------------------------------------------------------------------

@dataclass
class _Layout:
    name: str
    dialect: str
    slots: list[tuple[str, tuple[str, ...]]]  # (label, ids the slot sets)
    tail: tuple[str, ...] = ()  # ids that keep the last value (Inspire running out)
    foreign: str | None = None  # the architecture the layout was made for, when not this one

    def __len__(self):
        return len(self.slots)


def _r(prefix: str, lo: int, hi: int) -> list[str]:
    return [f"{prefix}{i:02d}" for i in range(lo, hi + 1)]


def _slots(ids: list[str], base: tuple[str, ...]) -> list[tuple[str, tuple[str, ...]]]:
    return [("BASE", base) if b == "BASE" else (b, (b,)) for b in ids]


def _layouts(arch: str, block_ids: list[str]) -> list[_Layout]:
    te = tuple(b for b in block_ids if id_group(b) == "TE")
    base = ("BASE",) + te
    blocks = [b for b in block_ids if b != "BASE" and id_group(b) != "TE"]
    out: list[_Layout] = []
    if arch in ("sd1", "sdxl"):
        lbw17 = ["BASE"] + _r("IN", 1, 2) + _r("IN", 4, 5) + _r("IN", 7, 8) + ["M00"] + _r("OUT", 3, 11)
        lbw26 = ["BASE"] + _r("IN", 0, 11) + ["M00"] + _r("OUT", 0, 11)
        lbw12 = ["BASE"] + _r("IN", 4, 5) + _r("IN", 7, 8) + ["M00"] + _r("OUT", 0, 5)
        lbw20 = ["BASE"] + _r("IN", 0, 8) + ["M00"] + _r("OUT", 0, 8)
        mids = [("mid0", ()), ("mid1", ("M00",)), ("mid2", ())]
        own = {"sd1": ("SD1", lbw17, lbw26, "SDXL", lbw12, lbw20),
               "sdxl": ("SDXL", lbw12, lbw20, "SD1", lbw17, lbw26)}[arch]
        name, short, full, other, oshort, ofull = own
        out += [_Layout(f"{name} LoRA ({len(short)})", "lbw", _slots(short, base)),
                _Layout(f"{name} LoCon ({len(full)})", "lbw", _slots(full, base)),
                _Layout(f"{other} LoRA ({len(oshort)}), applied by id", "lbw", _slots(oshort, base), foreign=other),
                _Layout(f"{other} LoCon ({len(ofull)}), applied by id", "lbw", _slots(ofull, base), foreign=other),
                _Layout(f"{name} LoRA ({len(short)})", "inspire", _slots(short, base))]
        n = 11 if arch == "sd1" else 8
        lyc = [("BASE", base)] + [(b, (b,)) for b in _r("IN", 1, n)] + mids + [(b, (b,)) for b in _r("OUT", 0, n)]
        out.append(_Layout(f"{name}-LyC ({len(lyc)})", "inspire", lyc))
    elif arch in ("flux", "chroma", "flux2", "hunyuan_video"):
        doubles = [b for b in blocks if id_group(b) == "D"]
        singles = [b for b in blocks if id_group(b) == "S"]
        if arch in ("flux", "chroma"):
            clip, t5 = (("TE1",), ("TE2",)) if arch == "flux" else ((), te)
            lbw61 = ([("CLIP", clip), ("T5", t5), ("IN", ("BASE",))] + [(b, (b,)) for b in _r("D", 0, 18)]
                     + [(b, (b,)) for b in _r("S", 0, 37)] + [("OUT", ())])
            out.append(_Layout("Flux (61)", "lbw", lbw61))
        out.append(_Layout(f"base + double + single ({1 + len(doubles) + len(singles)})", "inspire",
                           [("BASE", base)] + [(b, (b,)) for b in doubles + singles]))
        out.append(_Layout(f"base + double ({1 + len(doubles)}), single blocks keep the last value",
                           "inspire", [("BASE", base)] + [(b, (b,)) for b in doubles], tail=tuple(singles)))
    full = _full_layout(block_ids)
    if not any(len(layout) == len(full) for layout in out):
        out.append(full)
    return out


def _full_layout(ids: list[str]) -> _Layout:
    te = tuple(b for b in ids if id_group(b) == "TE")
    blocks = [b for b in ids if b != "BASE" and id_group(b) != "TE"]
    return _Layout(f"BASE + blocks ({len(blocks) + 1})", "vector", [("BASE", ("BASE",) + te)] + [(b, (b,)) for b in blocks])


def _ids_text(layout: _Layout) -> str:
    labels = [label for label, _ in layout.slots]
    runs, i = [], 0
    while i < len(labels):  # compress IN00, IN01, ... into IN00-IN11
        j = i
        while (j + 1 < len(labels) and re.fullmatch(r"[A-Z]+\d+", labels[j + 1])
               and id_group(labels[j + 1]) == id_group(labels[i])
               and int(labels[j + 1][len(id_group(labels[i])):]) == int(labels[j][len(id_group(labels[i])):]) + 1):
            j += 1
        runs.append(labels[i] if i == j else f"{labels[i]}-{labels[j]}")
        i = j + 1
    return ", ".join(runs)


# -- tokens ----------------------------------------------------------------------------------

_NUMBER = re.compile(r"^[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?$")
_X = re.compile(r"^X(?:([+-])(\d+\.?\d*|\.\d+))?$")


class _Tokens:
    def __init__(self, dialect: str, seed: int, a: float, b: float, x: float):
        self.dialect, self.a, self.b, self.x = dialect, a, b, x
        self.rng = random.Random(int(seed) % (2 ** 31))

    def value(self, token: str, where: str) -> float:
        token = token.strip()
        if _NUMBER.match(token):
            return float(token)
        lbw = self.dialect == "lbw"
        if token in ("R", "r"):
            return round(self.rng.random(), 3) if lbw else round(self.rng.uniform(0.0, 3.0), 2)
        if token in ("U", "u"):
            return round(self.rng.uniform(-0.5, 1.5), 3) if lbw else round(self.rng.uniform(-1.5, 1.5), 2)
        if not lbw and token in ("A", "a", "B", "b"):
            value = self.a if token in "Aa" else self.b
            return value / 2 if token.islower() else value
        m = _X.match(token)
        if m and self.dialect in ("lbw", "auto"):
            shift = float(m.group(2) or 0.0) * (-1 if m.group(1) == "-" else 1)
            return self.x + shift
        if " " in token and all(_NUMBER.match(t) or t in "RrUuAaBb" for t in token.split()):
            raise BlockWeightError(
                f"{where}: '{token}' is an Inspire per-layer list (space-separated values for the layers "
                f"of one block); per-layer weights are not supported, give one value per block")
        allowed = "a number, R, U, X, X+d or X-d" if lbw else "a number, R, U, A, a, B or b"
        raise BlockWeightError(f"{where}: '{token}' is not a weight (expected {allowed})")


# -- parsing ---------------------------------------------------------------------------------

def _lookup(name: str, presets: dict[str, str]) -> str | None:
    if name in presets:
        return name
    folded = {k.lower(): k for k in presets}
    return folded.get(name.lower())


def parse_block_weights(text: str, architecture: str, block_ids, presets: dict | None = None,
                        seed: int = 0, *, dialect: str = "auto", a: float = 4.0, b: float = 1.0,
                        x: float = 1.0, inverse: bool = False, present_ids=None) -> BlockWeights:
    """Read a block-weight string for `architecture` whose ids are `block_ids`
    (`architecture_blocks(architecture, model_keys)`).

    `presets`: user presets (name -> text) consulted before the shipped ones. `seed`: for R/U.
    `dialect`: "auto" or one of "named", "inspire", "lbw", "vector" to force a reading.
    `a`, `b`: Inspire's A and B (its loader's defaults); `x`: LBW's X. `inverse`: every weight w
    becomes 1 − w (Inspire's option). `present_ids`: the ids the adapter file has layers in; with
    it, a vector Inspire would read differently (by position over those blocks) gets a warning
    naming the blocks that differ.
    """
    arch = canonical_architecture(architecture)
    ids = [str(i).upper() for i in block_ids]
    if not ids:
        raise BlockWeightError(f"no block ids given for {arch}")
    if dialect not in DIALECTS:
        raise BlockWeightError(f"unknown dialect '{dialect}'; one of {', '.join(DIALECTS)}")
    shipped = _shipped()[0]
    user = dict(presets or {})
    body = (text or "").strip()
    preset = None
    hint = None
    for _ in range(3):  # a preset may name another preset
        name = _lookup(body, user) if body else None
        source = user
        if name is None and body:
            name, source = _lookup(body, shipped), shipped
        if name is None:
            break
        preset = preset or name
        if source is shipped:
            hint = hint or preset_dialect(name)
        body = source[name].strip()
    if ":" in body and not body.startswith("%"):
        suggestion = _named_suggestion(body, arch, ids)
        if suggestion is not None:  # `IN04:0.5`: the named form with a colon
            raise BlockWeightError(f"block weights '{body}': did you mean {suggestion}? (named blocks are "
                                   "SELECTOR=VALUE)")
        name = body.split(":", 1)[0]
        if not re.search(r"[=,;\n]", name):
            body = body.split(":", 1)[1].strip()  # a pasted `NAME:vector` line
    if dialect == "auto":
        if not body:
            chosen = "empty"
        elif body.startswith("%"):
            chosen = "inspire-shorthand"
        elif "=" in body:
            chosen = "named"
        else:
            chosen = "vector-like"
    else:
        chosen = {"named": "named", "vector": "vector-like", "inspire": "vector-like", "lbw": "vector-like"}[dialect]
        if dialect == "inspire" and body.startswith("%"):
            chosen = "inspire-shorthand"
        if not body:
            chosen = "empty"
    if chosen == "empty":
        result = BlockWeights(arch, ids, {i: 1.0 for i in ids}, "empty", preset=preset)
    elif chosen == "named":
        result = _parse_named(body, arch, ids, seed, a, b)
    elif chosen == "inspire-shorthand":
        result = _parse_shorthand(body, arch, ids)
    else:
        force = None if dialect == "auto" else dialect
        result = _parse_vector(body, arch, ids, shipped, user, seed, a, b, x, force, hint, present_ids)
    result.preset = result.preset or preset
    if inverse:
        result.values = {k: 1.0 - v for k, v in result.values.items()}
        result.default = 1.0 - result.default
    return result


def _parse_vector(body, arch, ids, shipped, user, seed, a, b, x, force, hint, present_ids) -> BlockWeights:
    items = [item.strip() for item in body.split(",")]
    while items and not items[-1]:
        items.pop()  # a trailing comma
    if any(not item for item in items):
        raise BlockWeightError(f"block weights '{body}': empty entry between commas")
    has_x = any(_X.match(item) for item in items)
    has_ab = any(item in ("A", "a", "B", "b") for item in items)
    if has_x and has_ab:
        raise BlockWeightError("block weights mix LBW's X tokens with Inspire's A/B tokens")
    want = force
    if want is None:
        if has_x or hint == "lbw":
            want = "lbw"
        elif has_ab or hint == "inspire":
            want = "inspire"
    layouts = _layouts(arch, ids)
    if want == "vector":
        layouts = [_full_layout(ids)]
    elif want is not None:  # our id-order vector extends Inspire's reading to other architectures
        layouts = [layout for layout in layouts if layout.dialect == want
                   or (want == "inspire" and layout.dialect == "vector")]
    candidates = [layout for layout in layouts if len(layout) == len(items)]
    if not candidates:
        # Inspire: an invalid vector whose first entry is a preset name means that preset
        first = items[0] if items else ""
        in_user = _lookup(first, user)
        name = in_user or _lookup(first, shipped)
        if name is not None and len(items) > 1:
            source = user if in_user else shipped
            result = _parse_vector(source[name], arch, ids, shipped, user, seed, a, b, x, force,
                                   None if in_user else preset_dialect(name), present_ids)
            result.preset = name
            return result
        why = {None: "", "lbw": " in the LBW dialect", "inspire": " in the Inspire dialect",
               "vector": " as a vector"}[want]
        if want and hint == want and not force:
            why += " (its preset is an " + ("LBW" if want == "lbw" else "Inspire") + " one)"
        suggestion = _named_suggestion(body, arch, ids)
        if suggestion is not None:  # `IN04 0.5`: the named form without its `=`
            raise BlockWeightError(f"block weights '{body}': did you mean {suggestion}? (named blocks are "
                                   "SELECTOR=VALUE)")
        accepted = "; ".join(f"{len(layout)} ({layout.dialect} {layout.name}: {_ids_text(layout)})"
                             for layout in layouts) or "none"
        elsewhere = [f"{name} ({tool})" for length, family, name, tool in KNOWN_LENGTHS
                     if length == len(items) and family != arch]
        foreign = (f" ({len(items)} values is the {' or '.join(elsewhere)} layout: weights for another model?)"
                   if elsewhere else "")
        raise BlockWeightError(
            f"block weights for {arch}: {len(items)} value(s) given{why}{foreign}; expected {accepted}")
    layout = next((c for c in candidates if c.dialect == "inspire"), candidates[0])
    tokens = _Tokens(layout.dialect, seed, a, b, x)
    realised = [tokens.value(item, f"entry {n + 1} ({layout.slots[n][0]})") for n, item in enumerate(items)]
    values = {i: 0.0 for i in ids}
    named: set[str] = set()
    warnings: list[str] = []
    unused = []
    for (label, targets), value in zip(layout.slots, realised):
        present = [t for t in targets if t in values]
        for target in present:
            values[target] = value
            named.add(target)
        if targets and not present and value != 0:
            unused.append(label)
    for target in layout.tail:
        if target in values:
            values[target] = realised[-1]
            named.add(target)
    by_label = dict(zip((s[0] for s in layout.slots), realised))
    if "mid1" in by_label and (by_label["mid0"] != by_label["mid1"] or by_label["mid2"] != by_label["mid1"]):
        warnings.append(f"the middle block is one id (M00) here; it takes mid1's value {_fmt(by_label['mid1'])}, "
                        f"not mid0's {_fmt(by_label['mid0'])} / mid2's {_fmt(by_label['mid2'])}")
    if "OUT" in by_label and "IN" in by_label and by_label["OUT"] != by_label["IN"]:
        warnings.append(f"LBW's IN and OUT slots both mean BASE here (the non-block layers); BASE takes IN's "
                        f"value {_fmt(by_label['IN'])}, OUT's {_fmt(by_label['OUT'])} is unused")
    if "CLIP" in by_label and not dict(layout.slots)["CLIP"] and by_label["CLIP"] != 0:
        warnings.append(f"{arch} has no CLIP text encoder: the CLIP slot's value is unused")
    if unused:
        warnings.append(f"{', '.join(unused)} name no block of {arch}: their values are unused")
    if layout.tail and realised[-1] != 0:
        warnings.append(f"the single blocks take the last value {_fmt(realised[-1])} (Inspire's rule for a "
                        f"vector shorter than the blocks)")
    if layout.foreign and hint != "lbw":  # a shipped LBW preset is made to scatter onto either UNet
        warnings.insert(0, f"{len(items)} values is sd-webui LBW's {layout.foreign} layout, but this model is "
                           f"{arch}: the values were applied by block id; if the vector was made for an "
                           f"{layout.foreign} model, write one for {arch} (or the named form, e.g. IN04=0.5)")
    unset = [i for i in ids if i not in named]
    if present_ids is not None:
        present = {str(p).upper() for p in present_ids}
        hit = [i for i in unset if i in present]
        if hit:
            warnings.append(f"the {layout.dialect} {layout.name} layout names no slot for {', '.join(hit)}, which "
                            f"this file has: they get 0 (write a longer layout or the named form to set them)")
        if layout.dialect in ("inspire", "lbw"):
            differ = _inspire_differences(realised, values, ids, present)
            if differ:
                shown = ", ".join(differ[:8]) + (f" and {len(differ) - 8} more" if len(differ) > 8 else "")
                warnings.append("Inspire-Pack would read this vector by position over the blocks this file holds "
                                f"and give {shown}; here values bind to block ids")
    populated = ",".join(_fmt(v) for v in realised)
    default = realised[-1] if layout.tail else 0.0
    return BlockWeights(arch, ids, values, layout.dialect, layout.name, None, populated, default, warnings, unset)


def _inspire_differences(realised, values, ids, present) -> list[str]:
    """Where Inspire's positional reading over the present blocks differs from ours."""
    walk = [i for i in ids if i in present and i != "BASE" and id_group(i) != "TE"]
    differ = []
    for n, block in enumerate(walk):
        theirs = realised[min(n + 1, len(realised) - 1)]
        if theirs != values[block]:
            differ.append(f"{block}={_fmt(theirs)} (here {_fmt(values[block])})")
    return differ


_SELECTOR_ID = re.compile(r"^([A-Z]+)(\d+)$")


def _normal_id(selector: str, ids: list[str]) -> str | None:
    if selector in ids:
        return selector
    if selector == "MID" and "M00" in ids:
        return "M00"
    m = _SELECTOR_ID.match(selector)
    if m:
        for block in ids:
            n = _SELECTOR_ID.match(block)
            if n and n.group(1) == m.group(1) and int(n.group(2)) == int(m.group(2)):
                return block
    return None


def _select(selector: str, ids: list[str], arch: str) -> list[str]:
    if selector in ("*", "ALL"):
        return list(ids)
    exact = _normal_id(selector, ids)
    if exact is not None:
        return [exact]
    if any(c in selector for c in "*?["):
        hit = [i for i in ids if fnmatch.fnmatchcase(i, selector)]
        if hit:
            return hit
    elif "-" in selector:
        lo, _, hi = selector.partition("-")
        start, end = _normal_id(lo.strip(), ids), _normal_id(hi.strip(), ids)
        if start is not None and end is not None:
            i, j = ids.index(start), ids.index(end)
            if i > j:
                raise BlockWeightError(f"range {selector}: {start} comes after {end} in {arch}'s block order")
            return ids[i:j + 1]
    else:
        group = [i for i in ids if id_group(i) == selector]
        if group:
            return group
    groups = []
    for i in ids:
        if id_group(i) not in groups:
            groups.append(id_group(i))
    raise BlockWeightError(
        f"'{selector}' names no block of {arch}; its ids are {_compress(ids)} (groups: {', '.join(groups)})")


# vector lengths the tools define, by architecture: (length, layout, tool); for "weights for another
# model?" hints when a length fits no layout of the model at hand
KNOWN_LENGTHS = (
    (17, "sd1", "SD1 LoRA", "Inspire/LBW"), (26, "sd1", "SD1 LoCon", "LBW"), (27, "sd1", "SD1-LyC", "Inspire"),
    (12, "sdxl", "SDXL LoRA", "Inspire/LBW"), (20, "sdxl", "SDXL LoCon", "LBW"), (21, "sdxl", "SDXL-LyC", "Inspire"),
    (20, "flux", "Flux base + double", "Inspire"), (58, "flux", "Flux base + double + single", "Inspire"),
    (61, "flux", "Flux", "LBW"),
)
_ITEM = re.compile(r"^\s*([A-Za-z*?][^:=\s,;]*)\s*(?::|\s)\s*([^:=\s,;]+)\s*$")
_WORD_TOKENS = ("R", "r", "U", "u", "A", "a", "B", "b")


def _selectable(selector: str, ids: list[str], arch: str) -> bool:
    try:
        _select(selector, ids, arch)
    except BlockWeightError:
        return False
    return True


def _named_suggestion(body: str, arch: str, ids: list[str]) -> str | None:
    """`IN04=0.5, OUT*=0` when every item of `body` is a selector and a weight joined by `:` or a
    space (`IN04:0.5`, `OUT* 0`) instead of `=`; None when it does not read that way."""
    fixed, changed = [], False
    for item in re.split(r"[,;\n]+", body):
        if not item.strip():
            continue
        if "=" in item:
            fixed.append(item.strip())
            continue
        changed = True
        m = _ITEM.match(item)
        if m is None or not (_NUMBER.match(m.group(2)) or m.group(2) in _WORD_TOKENS):
            return None
        selector = m.group(1).upper()
        if not _selectable(selector, ids, arch):
            return None
        fixed.append(f"{m.group(1)}={m.group(2)}")
    return ", ".join(fixed) if changed else None


def _compress(ids: list[str]) -> str:
    return _ids_text(_Layout("", "", [(i, (i,)) for i in ids]))


def _parse_named(body, arch, ids, seed, a, b) -> BlockWeights:
    tokens = _Tokens("named", seed, a, b, 1.0)
    default = 1.0
    assignments = []
    for item in re.split(r"[,;\n]+", body):
        item = item.strip()
        if not item:
            continue
        if "=" not in item:
            suggestion = _named_suggestion(body, arch, ids)
            hint = (f"did you mean {suggestion}?" if suggestion is not None
                    else f"it has no weight: did you mean {item.strip()}=<weight>, e.g. {item.strip()}=0?"
                    if _selectable(item.strip().upper(), ids, arch) else "e.g. IN04=0.5, OUT*=0")
            raise BlockWeightError(f"named block weights: '{item}' is not SELECTOR=VALUE; {hint}")
        selector, _, value = item.partition("=")
        selector, value = selector.strip().upper(), value.strip()
        if selector == "DEFAULT":
            default = tokens.value(value, item)
            continue
        assignments.append((item, _select(selector, ids, arch), value))
    values = {i: default for i in ids}
    for item, targets, value in assignments:
        for target in targets:
            values[target] = tokens.value(value, item)
    result = BlockWeights(arch, ids, values, "named", default=default)
    result.populated = result.describe()
    return result


_SHORTHAND_ITEM = re.compile(r"^(default|base|in|mid|out|double|single)(?:(\d+)(?:-(\d+))?)?$")
_SHORTHAND_VALUE = re.compile(r"^(?:\d+\.?\d*|\.\d+)$")


def _shorthand_groups(arch: str, ids: list[str]) -> dict[str, tuple[list[str], list[str]]]:
    """group -> (every id of the group, the ids by 1-based position in Inspire's layout)."""
    of = {g: [i for i in ids if id_group(i) == g] for g in ("IN", "M", "OUT", "D", "S")}
    groups = {}
    if arch in ("sd1", "sdxl"):
        groups["in"] = (of["IN"], [i for i in of["IN"] if i != "IN00"])
        groups["mid"] = (of["M"], of["M"] * 3)  # Inspire's mid0/1/2 are one M00 here
        groups["out"] = (of["OUT"], of["OUT"])
    if of["D"] or of["S"]:
        groups["double"] = (of["D"], of["D"])
        groups["single"] = (of["S"], of["S"])
    return groups


def _parse_shorthand(body, arch, ids) -> BlockWeights:
    groups = _shorthand_groups(arch, ids)
    default, base = 1.0, None
    assignments = []
    for item in body[1:].split(","):
        item = item.strip()
        if not item:
            continue
        name, _, value = item.partition("=")
        name, value = name.strip().lower(), value.strip()
        m = _SHORTHAND_ITEM.match(name)
        if not m or not _SHORTHAND_VALUE.match(value):
            raise BlockWeightError(
                f"% shorthand: '{item}' is not GROUP[N[-M]]=VALUE with GROUP one of default, base, in, mid, out, "
                f"double, single and VALUE a non-negative number")
        group = m.group(1)
        if group == "default":
            default = float(value)
            continue
        if group == "base":
            base = float(value)
            continue
        if group not in groups:
            raise BlockWeightError(f"% shorthand: {arch} has no '{group}' blocks (groups: "
                                   f"{', '.join(['default', 'base'] + list(groups))}); use the named form")
        every, positions = groups[group]
        if m.group(2) is None:
            targets = every
        else:
            lo = int(m.group(2))
            hi = int(m.group(3)) if m.group(3) else lo
            if not 1 <= lo <= hi <= len(positions):
                raise BlockWeightError(f"% shorthand: '{item}': {group} positions run 1-{len(positions)} "
                                       f"({_compress(list(dict.fromkeys(positions)))}) in {arch}")
            targets = positions[lo - 1:hi]
        assignments.append((targets, float(value)))
    values = {i: default for i in ids}
    base_value = default if base is None else base
    for i in ids:
        if i == "BASE" or id_group(i) == "TE":
            values[i] = base_value
    for targets, value in assignments:
        for target in targets:
            values[target] = value
    result = BlockWeights(arch, ids, values, "inspire-shorthand", "%", default=default)
    result.populated = result.describe()
    return result
