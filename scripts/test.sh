#!/usr/bin/env bash
# The test suite: fast tests and the slow end-to-end checks.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -d .venv ] && [ -z "${CI:-}" ] && . .venv/bin/activate
exec python -m pytest -q "$@"
