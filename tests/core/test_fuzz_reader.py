"""Fuzzing the readers with mutated real adapter files (lycoris-lora LoRA/LoHa/LoKr seeds).

Property: the loader returns tensors that agree with the (parsed) header, or raises
AdapterFormatError naming the file -- never another exception, never a hang, never a big
allocation. `bench/fuzz_adapter_files.py` runs the same engine (tests/core/mutations.py) with
plain `random` for many more cases.
"""

from __future__ import annotations

import importlib.util
import pathlib
import sys
import time
import tracemalloc

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

ROOT = pathlib.Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from lycoris_core.errors import AdapterFormatError  # noqa: E402
from lycoris_core.safe_io import load_tensors  # noqa: E402


def _load_mutations():
    name = "lycoris_pack_tests_mutations"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, pathlib.Path(__file__).with_name("mutations.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


mutations = _load_mutations()

MAX_SECONDS_PER_CASE = 5.0
MAX_PEAK_BYTES = 16 * 1024 * 1024  # seed files are ~2 KB; anything near this is an untrusted-size allocation


def _reader_layer():
    """`lycoris_core.reader.load_adapter_file` if that module imports (it is written in parallel)."""
    try:
        from lycoris_core.reader import load_adapter_file
    except Exception as error:  # noqa: BLE001 - report, do not hide
        return None, f"{type(error).__name__}: {error}"
    return load_adapter_file, None


@pytest.fixture(scope="session")
def fuzz_env(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz")
    seeds = mutations.make_seed_files(folder)
    work = folder / "case"
    work.mkdir()
    reader, why = _reader_layer()
    layers = "load_tensors" + (" + reader.load_adapter_file" if reader else f" only (reader not importable: {why})")
    print(f"\nfuzzed layers: {layers}")
    return {"seeds": seeds, "path": str(work / "mutated.safetensors"), "reader": reader, "stats": {}}


def test_seed_files_load(fuzz_env):
    """The unmutated seeds are valid for both layers (otherwise the fuzzing proves little)."""
    for name, data in fuzz_env["seeds"].items():
        path = fuzz_env["path"]
        pathlib.Path(path).write_bytes(data)
        tensors, metadata = load_tensors(path)
        assert mutations.check_loaded(data, tensors, metadata) is None
        if fuzz_env["reader"] is not None and name in mutations.SEED_ALGOS:
            adapter_file = fuzz_env["reader"](path)
            assert adapter_file is not None


class DrawSource:
    """The mutation engine's randomness, drawn through hypothesis (so failures shrink)."""

    def __init__(self, data):
        self.data = data

    def integer(self, lo, hi):
        return self.data.draw(st.integers(lo, hi))

    def choice(self, seq):
        return self.data.draw(st.sampled_from(list(seq)))

    def blob(self, n):
        return self.data.draw(st.binary(min_size=n, max_size=n))


def _run(call, path, verify):
    tracemalloc.start()
    started = time.perf_counter()
    try:
        outcome, detail = mutations.classify(call, AdapterFormatError, path, verify)
    finally:
        elapsed = time.perf_counter() - started
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    return outcome, detail, elapsed, peak


@settings(max_examples=1000, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                 HealthCheck.data_too_large])
@given(data=st.data())
def test_mutated_files_fail_cleanly(fuzz_env, data):
    source = DrawSource(data)
    seed_name = source.choice(sorted(fuzz_env["seeds"]))
    mutated, described = mutations.mutate(source, fuzz_env["seeds"][seed_name])
    path = fuzz_env["path"]
    with open(path, "wb") as handle:
        handle.write(mutated)
    stats = fuzz_env["stats"]

    outcome, detail, elapsed, peak = _run(
        lambda: load_tensors(path), path, lambda result: mutations.check_loaded(mutated, *result))
    stats[("load_tensors", outcome)] = stats.get(("load_tensors", outcome), 0) + 1
    context = f"seed {seed_name}, {described}"
    assert outcome != "crash", f"load_tensors: {detail} ({context})"
    assert elapsed < MAX_SECONDS_PER_CASE, f"load_tensors took {elapsed:.1f} s ({context})"
    assert peak < MAX_PEAK_BYTES, f"load_tensors allocated {peak} bytes at peak ({context})"

    reader = fuzz_env["reader"]
    if reader is not None:
        outcome, detail, elapsed, peak = _run(lambda: reader(path), path, None)
        stats[("reader", outcome)] = stats.get(("reader", outcome), 0) + 1
        assert outcome != "crash", f"reader.load_adapter_file: {detail} ({context})"
        assert elapsed < MAX_SECONDS_PER_CASE, f"load_adapter_file took {elapsed:.1f} s ({context})"
        assert peak < MAX_PEAK_BYTES, f"load_adapter_file allocated {peak} bytes at peak ({context})"


def test_fuzz_summary(fuzz_env):
    """Prints what was fuzzed, and checks the mutations reached both outcomes (not all rejected)."""
    stats = fuzz_env["stats"]
    print(f"\nfuzz outcomes: {dict(sorted(stats.items()))}")
    if not stats:
        pytest.skip("the fuzz test did not run in this session")
    assert stats.get(("load_tensors", "ok"), 0) > 0, "no mutated file was accepted: the mutations are too blunt"
    assert stats.get(("load_tensors", "format_error"), 0) > 0
    if fuzz_env["reader"] is None:
        # made loud on purpose: the reader layer was not fuzzed in this run
        print(f"WARNING: lycoris_core.reader was not fuzzed: {_reader_layer()[1]}")
    else:
        assert sum(v for (layer, _), v in stats.items() if layer == "reader") > 0
