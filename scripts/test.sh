#!/usr/bin/env bash
# The test command: set up .venv (scripts/setup_env.sh) and run every test.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec .venv/bin/python -m pytest tests -q "$@"
