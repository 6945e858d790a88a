#!/usr/bin/env bash
# Install hydranets and what its tests and demo need.
#   scripts/setup.sh            into ./.venv (created if missing)
#   scripts/setup.sh --system   into the current Python (CI)
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" != "--system" ]; then
  [ -d .venv ] || python3 -m venv .venv
  # shellcheck disable=SC1091
  . .venv/bin/activate
fi
# torch first, pinned: a looser requirement would pull a multi-GB CUDA build on a CPU-only machine.
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[dev]"
# Debian extras: Fashion-MNIST for the demo, Chromium for the report's browser test.
if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  missing=""
  [ -d /usr/share/datasets/fashion-mnist ] || missing="$missing dataset-fashion-mnist"
  command -v chromium >/dev/null 2>&1 || missing="$missing chromium"
  if [ -n "$missing" ]; then
    (apt-get install -y -q $missing >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q $missing >/dev/null; }) \
      || echo "warning: could not install$missing (the tests that need them will skip)" >&2
  fi
fi
