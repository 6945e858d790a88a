#!/usr/bin/env bash
# The checks that need a CUDA GPU, as one script for a machine lent for minutes (not yet run on one):
# the device tests (dispatch, batch loader, training with resumption, export, each against the CPU), then top-k
# dispatch against the dense equivalent and training throughput, measured on the GPU.
#   bash scripts/gpu_check.sh            (after bash scripts/setup.sh; PYTHON=... to use another interpreter)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python
"$PY" -c "import torch, sys; torch.cuda.is_available() or sys.exit('gpu_check: no CUDA device here'); \
print(torch.cuda.get_device_name(0), 'torch', torch.__version__)"
"$PY" -m pytest -q -rs tests/test_devices.py
"$PY" benchmarks/routing_speed.py --device cuda --repeats 15
"$PY" benchmarks/train_speed.py --steps 20 --repeats 3 --precisions fp32,bf16
