"""Fuzz the adapter-file readers with mutated real adapter files, reproducibly.

    .venv/bin/python bench/fuzz_adapter_files.py --cases 10000 --seed 0

Seeds are LoRA/LoHa/LoKr files written by lycoris-lora (a test dependency) plus one file holding
every dtype; each case applies 1-3 mutations (bit flips, byte overwrites, truncation, header
length changes, structured JSON header edits, appended garbage, zip/pickle prefixes) from
tests/core/mutations.py -- the engine the hypothesis test uses -- driven by `random.Random(seed)`.

Every case goes through `lycoris_core.safe_io.load_tensors` and, when it imports,
`lycoris_core.reader.load_adapter_file`. Outcomes: ok (accepted, and agrees with the header),
format_error (AdapterFormatError naming the file), crash (any other exception, a disagreement
with the header, a case over --max-seconds, or a Python allocation over --max-peak-mb).
Exit status 1 if anything crashed.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import pathlib
import signal
import sys
import tempfile
import time
import tracemalloc
from collections import Counter

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def _load_mutations():
    name = "lycoris_pack_tests_mutations"
    spec = importlib.util.spec_from_file_location(name, ROOT / "tests" / "core" / "mutations.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


class _Hang(Exception):
    pass


def _on_alarm(signum, frame):
    raise _Hang()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=10000, help="number of mutated files (default 10000)")
    parser.add_argument("--seed", type=int, default=0, help="random seed; same seed, same cases (default 0)")
    parser.add_argument("--max-seconds", type=float, default=5.0, help="a case slower than this is a crash")
    parser.add_argument("--max-peak-mb", type=float, default=16.0,
                        help="a case allocating more Python memory than this at peak is a crash")
    parser.add_argument("--no-memory-check", action="store_true", help="skip tracemalloc (faster)")
    parser.add_argument("--show", type=int, default=10, help="crashes to print in full")
    parser.add_argument("--keep", metavar="DIR", help="copy the files of crashing cases into DIR")
    args = parser.parse_args(argv)

    mutations = _load_mutations()
    from lycoris_core.errors import AdapterFormatError
    from lycoris_core.safe_io import load_tensors

    layers = {"load_tensors": (load_tensors, True)}
    try:
        from lycoris_core.reader import load_adapter_file
    except Exception as error:  # noqa: BLE001 - reported below
        print(f"reader layer NOT fuzzed: lycoris_core.reader.load_adapter_file does not import "
              f"({type(error).__name__}: {error})")
    else:
        layers["reader.load_adapter_file"] = (load_adapter_file, False)
    print(f"fuzzed layers: {', '.join(layers)}")

    use_alarm = hasattr(signal, "SIGALRM")
    if use_alarm:
        signal.signal(signal.SIGALRM, _on_alarm)
    counts = {layer: Counter() for layer in layers}
    crashes = []
    slowest = (0.0, "")
    with tempfile.TemporaryDirectory(prefix="lycoris_fuzz_") as folder:
        seeds = mutations.make_seed_files(folder)
        seed_names = sorted(seeds)
        case_dir = pathlib.Path(folder) / "case"
        case_dir.mkdir()
        path = str(case_dir / "mutated.safetensors")
        started = time.perf_counter()
        for case in range(args.cases):
            source = mutations.RandomSource(f"{args.seed}:{case}")
            seed_name = source.choice(seed_names)
            data, described = mutations.mutate(source, seeds[seed_name])
            with open(path, "wb") as handle:
                handle.write(data)
            for layer, (function, verify_header) in layers.items():
                verify = (lambda result, data=data: mutations.check_loaded(data, *result)) if verify_header else None
                if not args.no_memory_check:
                    tracemalloc.start()
                if use_alarm:
                    signal.setitimer(signal.ITIMER_REAL, args.max_seconds)
                t0 = time.perf_counter()
                try:
                    outcome, detail = mutations.classify(lambda: function(path), AdapterFormatError, path, verify)
                except _Hang:
                    outcome, detail = "crash", f"no answer within {args.max_seconds} s (hang)"
                finally:
                    if use_alarm:
                        signal.setitimer(signal.ITIMER_REAL, 0)
                elapsed = time.perf_counter() - t0
                if not args.no_memory_check:
                    peak = tracemalloc.get_traced_memory()[1]
                    tracemalloc.stop()
                    if peak > args.max_peak_mb * 2**20 and outcome != "crash":
                        outcome, detail = "crash", f"allocated {peak / 2**20:.1f} MiB at peak"
                if elapsed > args.max_seconds and outcome != "crash":
                    outcome, detail = "crash", f"took {elapsed:.1f} s"
                if elapsed > slowest[0]:
                    slowest = (elapsed, f"{layer}, case {case}")
                counts[layer][outcome] += 1
                if outcome == "crash":
                    crashes.append((case, layer, seed_name, described, detail))
                    if args.keep:
                        os.makedirs(args.keep, exist_ok=True)
                        pathlib.Path(args.keep, f"case{case}_{seed_name}.safetensors").write_bytes(data)
        seconds = time.perf_counter() - started

    print(f"cases run: {args.cases} (seed {args.seed}) in {seconds:.1f} s "
          f"({seconds / max(1, args.cases) * 1000:.2f} ms/case), slowest call {slowest[0] * 1000:.1f} ms ({slowest[1]})")
    for layer, counter in counts.items():
        print(f"  {layer:26s} ok {counter['ok']:6d}   AdapterFormatError {counter['format_error']:6d}   "
              f"crash {counter['crash']:6d}")
    for case, layer, seed_name, described, detail in crashes[: args.show]:
        print(f"CRASH case {case} [{layer}] seed {seed_name}: {described}\n    -> {detail}")
    if len(crashes) > args.show:
        print(f"... and {len(crashes) - args.show} more crashes")
    return 1 if crashes else 0


if __name__ == "__main__":
    sys.exit(main())
