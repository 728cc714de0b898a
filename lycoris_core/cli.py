"""`python -m lycoris_core`: inspect adapters and bake them into state dicts from the shell.

Every failure is one line on stderr and a non-zero exit; outputs are written atomically, so a
failed run leaves no partial file. A run that would write nothing useful (an adapter that applies
to nothing, a resize with nothing to resize, ...) is refused before it writes, naming the command
that would do the job; so is an `--out` that would replace an input or an existing file (unless
`--overwrite`) or that is not a .safetensors name.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time

from .errors import AdapterFormatError
from .inspection import format_summary, summarize
from .merge import DTYPES, merge_files
from .reader import load_adapter_file
from .svd import parse_patterns


class Progress:
    """A one-line progress bar on stderr (silent when stderr is not a terminal)."""

    def __init__(self, label: str, stream=sys.stderr):
        self.label, self.stream = label, stream
        self.enabled = stream.isatty()
        self.last = 0.0

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled or (done < total and time.monotonic() - self.last < 0.1):
            return
        self.last = time.monotonic()
        width = 30
        filled = width * done // max(total, 1)
        self.stream.write(f"\r{self.label} [{'#' * filled}{'.' * (width - filled)}] {done}/{total}")
        if done >= total:
            self.stream.write("\n")
        self.stream.flush()


def parse_weighted(text: str, default: float = 1.0) -> tuple[str, float]:
    """`FILE[:NUMBER]` -> (FILE, NUMBER); a colon not followed by a number belongs to the path,
    except a decimal comma (`file:0,5`), which is refused with the number it likely means."""
    path, sep, tail = text.rpartition(":")
    if sep:
        try:
            return path, float(tail)
        except ValueError:
            pass
        if re.fullmatch(r"\s*[+-]?\d*,\d+\s*", tail) and not os.path.exists(text):
            meant = tail.strip().replace(",", ".")
            raise ValueError(f"{text}: '{tail}' is not a strength; did you mean {path}:{meant}? "
                             "(strengths take a decimal point)")
    return text, default


def check_input(path, role: str) -> None:
    """`path` exists and is a safetensors file, else a one-line error saying what to do. A pickle
    (.ckpt/.pt/.bin) is recognised by its first bytes, never loaded."""
    from .errors import AdapterFormatError
    from .safe_io import MAX_HEADER_BYTES, SafetensorsReader, _head, _starts_like_pickle

    path = os.fspath(path)
    if not os.path.exists(path):
        raise ValueError(f"{role} {path}: no such file; check the path")
    if os.path.isdir(path):
        raise ValueError(f"{role} {path} is a folder; give the .safetensors file inside it")
    try:
        SafetensorsReader(path).close()
    except AdapterFormatError as error:
        head = _head(path, 8)
        header_len = int.from_bytes(head, "little") if len(head) == 8 else 0
        if _starts_like_pickle(head) or header_len > MAX_HEADER_BYTES:
            raise ValueError(f"{path} is not a safetensors file (a pickle .ckpt?); convert it to .safetensors "
                             "first") from None
        raise error


def check_output(out, inputs: dict, overwrite: bool) -> None:
    """Refuse, before any work, an `--out` that is not a .safetensors name, whose folder is
    missing, or that names an input or an existing file (without `overwrite`).
    `inputs`: option -> path(s) of what the command reads."""
    out = os.fspath(out)
    if not out.lower().endswith(".safetensors"):
        stem = os.path.splitext(out)[0] if out.lower().endswith((".ckpt", ".pt", ".pth", ".bin")) else out
        raise ValueError(f"--out {out}: the output is written as safetensors; give a name ending in .safetensors "
                         f"(e.g. {stem}.safetensors)")
    folder = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(folder):
        raise ValueError(f"--out {out}: the folder {folder} does not exist; create it first or choose another --out")
    if not os.access(folder, os.W_OK):
        raise ValueError(f"--out {out}: cannot write in the folder {folder}; choose another --out")
    if os.path.isdir(out):
        raise ValueError(f"--out {out} is a folder; give a file name ending in .safetensors")
    if not os.path.exists(out) or overwrite:
        return
    for role, paths in inputs.items():
        for path in paths if isinstance(paths, (list, tuple)) else [paths]:
            if path and os.path.exists(path) and os.path.samefile(path, out):
                raise ValueError(f"--out {out} is the {role} file; writing it would replace your input: choose "
                                 "another --out (or add --overwrite to replace it)")
    raise ValueError(f"--out {out} already exists; choose another name, or add --overwrite to replace it")


def _command(name: str, *args: str) -> str:
    return "python -m lycoris_core " + " ".join((name,) + args)


def cmd_inspect(args) -> int:
    summary = summarize(load_adapter_file(args.file))
    print(json.dumps(summary, indent=2, default=str) if args.json else format_summary(summary))
    return 0


def cmd_merge(args) -> int:
    specs = [parse_weighted(spec) for spec in args.adapter]
    check_input(args.base, "--base")
    for path, _ in specs:
        check_input(path, "--adapter")
    check_output(args.out, {"--base": args.base, "--adapter": [p for p, _ in specs]}, args.overwrite)
    adapters = [(load_adapter_file(path), strength) for path, strength in specs]
    dtype = DTYPES[args.dtype] if args.dtype else None
    blocks = None
    if args.block_weights:
        from .block_weights import load_preset_file, parse_block_weights
        from .blocks import architecture_blocks, detect_architecture
        from .safe_io import SafetensorsReader

        with SafetensorsReader(args.base) as reader:
            keys = reader.keys()
        arch = args.architecture or detect_architecture(keys)
        presets = load_preset_file(args.presets) if args.presets else None
        blocks = parse_block_weights(args.block_weights, arch, architecture_blocks(arch, keys), presets)
        print(f"block weights: {blocks.summary()}")
        for warning in blocks.warnings:
            print(f"  warning: {warning}")
    coverages = merge_files(args.base, adapters, args.out, dtype=dtype, progress=Progress("merge"),
                            block_weight=None if blocks is None else blocks.weight_for_key)
    for coverage in coverages:
        for line in coverage.lines():
            print(line)
    return 0


def _report(result, out: str) -> None:
    for line in result.report_lines():
        print(line)
    print(f"wrote {out}")


def _one_line(command):
    """Numerical failures (e.g. an SVD that does not converge even in fp64) as one-line errors."""
    def run(args) -> int:
        try:
            return command(args)
        except (RuntimeError, TypeError) as error:
            raise ValueError(str(error)) from error
    return run


@_one_line
def cmd_extract(args) -> int:
    from .extract import extract

    check_input(args.base, "--base")
    check_input(args.tuned, "--tuned")
    check_output(args.out, {"--base": args.base, "--tuned": args.tuned}, args.overwrite)
    result = extract(
        args.base, args.tuned, args.out, mode=args.mode, value=args.value,
        rank=args.rank if args.rank is not None else (32 if args.mode == "fixed" else None),
        conv_rank=args.conv_rank, tucker=args.tucker, algo=args.algo, factor=args.factor, dtype=args.dtype,
        rank_pattern=parse_patterns(args.rank_pattern, "--rank-pattern", int),
        alpha_pattern=parse_patterns(args.alpha_pattern, "--alpha-pattern", float),
        min_change=args.min_change, device=args.device, progress=Progress("extract"),
    )
    _report(result, args.out)
    return 0


@_one_line
def cmd_resize(args) -> int:
    from .resize import resize

    if args.energy is not None:
        mode, value = "energy", args.energy
    else:
        mode, value = args.mode, args.value
    if mode == "fixed" and args.rank is None:
        raise ValueError("resize needs --rank N or --energy X (or --mode with --value)")
    check_input(args.file, "FILE")
    check_output(args.out, {"input": args.file}, args.overwrite)
    source = load_adapter_file(args.file)
    if not any(a.algo == "lora" and "bias_indices" not in a.tensors for a in source.adapters.values()):
        families = ", ".join(sorted({a.algo for a in source.adapters.values()}))
        raise ValueError(f"{args.file} has no LoRA/LoCon module to resize (its modules are {families}); resize "
                         "would only copy it. To turn it into a LoRA of rank N: "
                         + _command("combine", args.file, "--rank", "N", "--out", args.out))
    result = resize(source, None, mode=mode, value=value, rank=args.rank, conv_rank=args.conv_rank,
                    rank_pattern=parse_patterns(args.rank_pattern, "--rank-pattern", int), dtype=args.dtype,
                    progress=Progress("resize"))
    result.save(args.out)
    _report(result, args.out)
    return 0


@_one_line
def cmd_slice(args) -> int:
    from .dylora import dylora_trainer, slice_dylora

    check_input(args.file, "FILE")
    check_output(args.out, {"input": args.file}, args.overwrite)
    source = load_adapter_file(args.file)
    trainer, _ = dylora_trainer(source.metadata)
    if trainer is None:
        says = _not_dylora(source.metadata)
        resize_it = _command("resize", args.file, "--rank", str(args.rank), "--out", args.out)
        if says:
            raise ValueError(f"{args.file} is not a DyLoRA ({says}): keeping its first {args.rank} ranks would "
                             f"drop components it was trained with. To lower its rank: {resize_it}")
        print(f"warning: {args.file}'s metadata does not say it is a DyLoRA; if it is a plain LoRA, slicing drops "
              f"components it needs (see the relative error below); to lower a LoRA's rank: {resize_it}",
              file=sys.stderr)
    result = slice_dylora(source, args.rank, args.out, alpha_policy=args.alpha_policy, unit=args.unit,
                          dtype=args.dtype, progress=Progress("slice"))
    print(f"alpha policy: {result.metadata['lycoris_pack.alpha_policy']} "
          f"(trainer: {result.metadata['lycoris_pack.trainer']}, rank step {result.metadata['lycoris_pack.rank_step']})")
    _report(result, args.out)
    return 0


def _not_dylora(metadata: dict) -> str | None:
    """What in the metadata says the file is not a DyLoRA (None: it says nothing either way).
    Callers have checked `dylora_trainer` found no DyLoRA trainer."""
    module = metadata.get("ss_network_module")
    if module:
        return f"its metadata says ss_network_module={module}"
    tool = metadata.get("lycoris_pack.tool")
    if tool:
        return f"it was written by {tool}"
    return None


@_one_line
def cmd_combine(args) -> int:
    from .combine import combine

    inputs = [parse_weighted(spec) for spec in args.files]
    for path, _ in inputs:
        check_input(path, "FILE")
    if args.base:
        check_input(args.base, "--base")
    check_output(args.out, {"input": [p for p, _ in inputs], "--base": args.base}, args.overwrite)
    mode, value = ("energy", args.energy) if args.energy is not None else (args.mode, args.value)
    if args.drop_unrepresentable and not args.plain:
        raise ValueError("--drop-unrepresentable goes with --plain")
    result = combine(inputs, None, rank=args.rank, conv_rank=args.conv_rank, mode=mode, value=value,
                     base=args.base, dtype=args.dtype, plain=args.plain,
                     drop_unrepresentable=args.drop_unrepresentable, progress=Progress("combine"))
    dense = [layer for layer in result.layers if layer.method == "materialised full diff"]
    if dense and args.rank is None and mode == "fixed":
        raise ValueError(
            f"combining these files exactly would store {len(dense)} layers as dense full-size weights "
            f"(e.g. {dense[0].name}: {dense[0].source} are of families that cannot be concatenated); add --plain "
            "for a lossless plain LoRA, or --plain --rank N for one of rank N: "
            + _command("combine", *args.files, "--plain", "--rank", "N", "--out", args.out))
    result.save(args.out)
    _report(result, args.out)
    return 0


def add_utility_commands(sub) -> None:
    """extract / resize / slice / combine (lycoris_core.extract, .resize, .dylora, .combine)."""
    from .dylora import POLICIES
    from .svd import DTYPES as OUT_DTYPES, MODES

    p = sub.add_parser("extract", help="LoRA/LoCon (or LoKr) from a (base, fine-tuned) pair of state dicts")
    p.add_argument("--base", required=True, help="base model (safetensors state dict)")
    p.add_argument("--tuned", required=True, help="fine-tuned model with the same layer names")
    p.add_argument("--out", required=True, help="output .safetensors (written atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists (even an input file)")
    p.add_argument("--mode", choices=MODES, default="fixed",
                   help="rank rule: fixed N | threshold t (sigma > t) | ratio p (sigma > p*sigma1) | "
                        "quantile q (nuclear share) | energy p (squared-Frobenius share); default fixed")
    p.add_argument("--rank", type=int, help="fixed mode: rank of Linear/1x1 layers (default 32); other modes: cap")
    p.add_argument("--conv-rank", type=int, help="k x k convs (default: --rank; 0 skips them)")
    p.add_argument("--value", type=float, help="the threshold / ratio / quantile / energy of --mode")
    p.add_argument("--dtype", choices=sorted(OUT_DTYPES), default="fp16", help="output dtype (default fp16)")
    p.add_argument("--tucker", action="store_true", help="k x k convs as Tucker-2 (lora_mid) by HOSVD")
    p.add_argument("--algo", choices=("lora", "lokr"), default="lora", help="lokr: nearest Kronecker product")
    p.add_argument("--factor", type=int, default=-1, help="LoKr factor (LyCORIS factorization; -1: balanced)")
    p.add_argument("--rank-pattern", action="append", metavar="REGEX=N",
                   help="fixed rank for layers whose dotted path matches REGEX (0 skips them); repeatable")
    p.add_argument("--alpha-pattern", action="append", metavar="REGEX=A", help="alpha for matching layers")
    p.add_argument("--min-change", type=float, default=0.0,
                   help="skip layers with ||tuned-base|| <= this share of ||base|| (default: only identical)")
    p.add_argument("--device", help="torch device for the SVDs (default cpu)")
    p.set_defaults(run=cmd_extract)

    p = sub.add_parser("resize", help="lower the rank of a LoRA/LoCon file (fixed rank or kept energy)")
    p.add_argument("file")
    p.add_argument("--out", required=True, help="output .safetensors (written atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists (even an input file)")
    p.add_argument("--rank", type=int, help="new rank (with --energy or another --mode: a cap)")
    p.add_argument("--energy", type=float, help="keep this share of each layer's squared Frobenius norm")
    p.add_argument("--value", type=float, help="value of --mode (threshold / ratio / quantile / energy)")
    p.add_argument("--mode", choices=MODES, default="fixed")
    p.add_argument("--conv-rank", type=int, help="new rank of k x k convs (default: --rank)")
    p.add_argument("--rank-pattern", action="append", metavar="REGEX=N", help="fixed rank for matching modules")
    p.add_argument("--dtype", choices=sorted(OUT_DTYPES), help="output dtype (default: as stored)")
    p.set_defaults(run=cmd_resize)

    p = sub.add_parser("slice", help="keep the first N ranks of a DyLoRA file")
    p.add_argument("file")
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--out", required=True, help="output .safetensors (written atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists (even an input file)")
    p.add_argument("--alpha-policy", choices=POLICIES, default="trainer",
                   help="trainer (default: what the file's trainer computed at this rank), sds-train, "
                        "lycoris-train, kohya-extractor (alpha kept), webui-dyn (alpha/dim kept)")
    p.add_argument("--unit", type=int, help="rank step (default: unit / block_size from the metadata)")
    p.add_argument("--dtype", choices=sorted(OUT_DTYPES), help="output dtype (default: as stored)")
    p.set_defaults(run=cmd_slice)

    p = sub.add_parser("combine", help="several adapters with weights into one (exact, or SVD to a rank)")
    p.add_argument("files", nargs="+", metavar="FILE[:WEIGHT]")
    p.add_argument("--out", required=True, help="output .safetensors (written atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists (even an input file)")
    p.add_argument("--rank", type=int, help="re-factorise to this rank (default: exact concatenation)")
    p.add_argument("--conv-rank", type=int, help="rank of k x k convs in SVD mode (default: --rank)")
    p.add_argument("--mode", choices=MODES, default="fixed", help="rank rule in SVD mode")
    p.add_argument("--value", type=float, help="value of --mode")
    p.add_argument("--energy", type=float, help="keep this share of each layer's squared Frobenius norm "
                   "(= --mode energy --value X; --rank then caps)")
    p.add_argument("--plain", action="store_true",
                   help="write a plain LoRA (lora_up/lora_down/alpha only) whatever the inputs' algorithms, for "
                        "runtimes that take only LoRA; default rule: lossless (--energy 1.0)")
    p.add_argument("--drop-unrepresentable", action="store_true",
                   help="with --plain: leave out (and list) what a LoRA cannot hold (norm/bias changes, "
                        "weight-dependent modules without --base) instead of refusing")
    p.add_argument("--base", help="base model: needed for DoRA/GLoRA/OFT/BOFT/IA3 inputs")
    p.add_argument("--dtype", choices=sorted(OUT_DTYPES), help="output dtype (default: the first input's)")
    p.set_defaults(run=cmd_combine)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m lycoris_core", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("inspect", help="algorithms, ranks, alphas, metadata and trigger words of an adapter")
    p.add_argument("file")
    p.add_argument("--json", action="store_true", help="machine-readable output, per-module detail included")
    p.set_defaults(run=cmd_inspect)

    p = sub.add_parser("merge", help="bake adapters into a safetensors state dict, layer by layer")
    p.add_argument("--base", required=True, help="the model (safetensors state dict, any layer names)")
    p.add_argument("--adapter", required=True, action="append", metavar="FILE[:STRENGTH]",
                   help="an adapter and its strength (default 1.0); repeat for several, applied in order")
    p.add_argument("--out", required=True, help="output .safetensors (written atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists (even an input file)")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="dtype of floating-point tensors in the output "
                   "(default: as in the base)")
    p.add_argument("--block-weights", metavar="TEXT", help="per-block strength for every adapter: named ids "
                   "('IN04=0.5, OUT*=0'), an Inspire or sd-webui LBW vector, or a preset name")
    p.add_argument("--architecture", help="the base's block layout (sd1, sdxl, flux, ...; default: detected "
                   "from its keys)")
    p.add_argument("--presets", metavar="FILE", help="a preset file (NAME:vector lines, Inspire/LBW format)")
    p.set_defaults(run=cmd_merge)

    add_utility_commands(sub)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except AdapterFormatError as error:
        print(f"error: {error}", file=sys.stderr)
    except (OSError, ValueError) as error:
        print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
    return 1
