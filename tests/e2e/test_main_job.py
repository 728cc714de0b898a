"""End to end: the real ComfyUI server with this pack runs the example workflow posted to /prompt
(what README's main-job command does) and the loader's report says every module matched."""

import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))

import run_main_job  # noqa: E402


def test_example_workflow_through_the_http_api(tmp_path):
    result = run_main_job.run(tmp_path / "main_job", timeout=600)
    assert result["image"].is_file() and result["image"].stat().st_size > 100
    assert result["image"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = result["report"]
    assert "0 unmatched, 0 keys not understood, 0 modules with errors" in report, report
    done, total = re.search(r"(\d+)/(\d+) modules matched", report).groups()
    assert done == total and int(total) > 0, report
    assert "patched:" in report and "text-encoder layers" in report
