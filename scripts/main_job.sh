#!/usr/bin/env bash
# The main job: set up .venv (torch, the pinned ComfyUI) and run the example workflow through a
# real ComfyUI server's HTTP API. Leaves out/main_job/lycoris_example.png and coverage_report.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec .venv/bin/python scripts/run_main_job.py "$@"
