"""bench/gpu_checks.py (the NVIDIA checks of issue 23) in its --dry-run on the CPU, on the runtime
under test: the same code as on a GPU, CUDA-only steps reported as SKIP.

Run as a subprocess, as a user runs it: exit 0, a PASS line for every check (check 1: each
algorithm of --quick in bypass and auto, both forms, on each model format this runtime loads, its
effect measured against the CPU reference run), the summary's verdicts."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "bench" / "gpu_checks.py"
CHECKS = {"1": "algorithms", "2": "sync", "3": "memory", "4": "pressure"}


def _gpu_checks():
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import gpu_checks
    finally:
        sys.path.remove(str(SCRIPT.parent))
    return gpu_checks


@pytest.fixture(scope="module")
def dry_run(comfy_root, tmp_path_factory):
    """(exit status, stdout, stderr) of one dry run."""
    env = dict(os.environ, COMFYUI_PATH=str(comfy_root), PYTHONUNBUFFERED="1")
    result = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--quick",
                             "--workdir", str(tmp_path_factory.mktemp("gpu_checks"))],
                            capture_output=True, text=True, env=env, timeout=1200)
    return result.returncode, result.stdout, result.stderr


def test_dry_run_passes_every_check(dry_run):
    status, out, err = dry_run
    assert status == 0, out[-6000:] + err[-6000:]
    lines = out.splitlines()
    for check, name in CHECKS.items():
        verdict = [line for line in lines if line.startswith(f"check {check} {name}")]
        assert len(verdict) == 1 and " PASS " in verdict[0], verdict
        assert any(line.startswith(f"PASS  {check} {name}") for line in lines), f"check {check} passed no case"
    assert "ALL PASSED" in out
    assert not any(line.startswith("FAIL") for line in lines)


def test_dry_run_covers_every_case_with_a_measured_effect(dry_run, comfy):
    """Check 1: one line per format x algorithm x mode x form, the adapter's effect visible in the
    CPU reference and matched within 1e-3 on both calls; check 2: each also called with no host
    read; CUDA-only steps said as SKIP with the reason."""
    _, out, _ = dry_run
    gpu_checks = _gpu_checks()
    try:
        import comfy.quant_ops  # noqa: F401
        formats = gpu_checks.FLUX_FORMATS
    except ImportError:  # the pinned March-2024 runtime: a tiny SD1.5 instead of Flux
        formats = ("sd15",)
    pattern = re.compile(r"^PASS  1 algorithms  (\S+) (\S+) (\S+) (\S+)  effect err (\S+) / (\S+) .*effect (\S+) of")
    seen = {}
    for line in out.splitlines():
        match = pattern.match(line)
        if match:
            fmt, algo, mode, form, first, second, size = match.groups()
            seen[(fmt, algo, mode, form)] = (float(first), float(second), float(size))
    expected = {(f, a, m, p) for f in formats for a in gpu_checks.QUICK_ALGOS for m in gpu_checks.MODES
                for p in gpu_checks.FORMS}
    assert set(seen) == expected
    for first, second, size in seen.values():
        assert first < 1e-3 and second < 1e-3 and size > 1e-4
    for fmt, algo, mode, form in expected:
        assert f"PASS  2 sync        {fmt} {algo} {mode} {form}  no host read" in out
    assert re.search(r"^SKIP  2 sync .*set_sync_debug_mode  needs CUDA", out, re.M)
    assert re.search(r"^SKIP  3 memory .*memory_allocated  needs CUDA", out, re.M)
    assert re.search(r"^SKIP  4 pressure .*no VRAM", out, re.M)


def test_a_failed_or_silent_check_fails_the_run():
    """The verdict: any FAIL, or a check that printed nothing, is exit status 1."""
    gpu_checks = _gpu_checks()
    report = gpu_checks.Report()
    report.line("1", "PASS", "case")
    report.line("2", "SKIP", "case", "why")
    assert report.summary(["1", "2"]) == 0
    report.line("2", "FAIL", "case")
    assert report.summary(["1", "2"]) == 1
    assert gpu_checks.Report().summary(["3"]) == 1
