"""`python -m lycoris_core`: inspect adapters and bake them into state dicts from the shell.

Every failure is one line on stderr and a non-zero exit; outputs are written atomically, so a
failed run leaves no partial file.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from .errors import AdapterFormatError
from .inspection import format_summary, summarize
from .merge import DTYPES, merge_files
from .reader import load_adapter_file


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
    """`FILE[:NUMBER]` -> (FILE, NUMBER); a colon not followed by a number belongs to the path."""
    path, sep, tail = text.rpartition(":")
    if sep:
        try:
            return path, float(tail)
        except ValueError:
            pass
    return text, default


def cmd_inspect(args) -> int:
    summary = summarize(load_adapter_file(args.file))
    print(json.dumps(summary, indent=2, default=str) if args.json else format_summary(summary))
    return 0


def cmd_merge(args) -> int:
    adapters = []
    for spec in args.adapter:
        path, strength = parse_weighted(spec)
        adapters.append((load_adapter_file(path), strength))
    dtype = DTYPES[args.dtype] if args.dtype else None
    coverages = merge_files(args.base, adapters, args.out, dtype=dtype, progress=Progress("merge"))
    for coverage in coverages:
        for line in coverage.lines():
            print(line)
    return 0


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
    p.add_argument("--dtype", choices=sorted(DTYPES), help="dtype of floating-point tensors in the output "
                   "(default: as in the base)")
    p.set_defaults(run=cmd_merge)
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
