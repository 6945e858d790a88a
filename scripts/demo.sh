#!/usr/bin/env bash
# The demo: set up ./.venv (torch 2.13.0 CPU wheel, hydranets, Fashion-MNIST from Debian), then run the
# whole pipeline -- baseline, subtasks, HydraNet, evaluation at every k, report -- in a few minutes.
#   scripts/demo.sh                              Fashion-MNIST, about 5 minutes on 2 CPU cores
#   scripts/demo.sh --dataset tiny-imagenet-32   the same pipeline at full size (hours on a CPU)
#   scripts/demo.sh --dataset cifar100           for users with CIFAR-100 (downloaded on first use)
#   scripts/demo.sh ... key=value                any config override, e.g. out=runs/mine train.epochs=5
set -euo pipefail
cd "$(dirname "$0")/.."
dataset=fashion-mnist
if [ "${1:-}" = "--dataset" ]; then dataset=${2:?--dataset needs a name}; shift 2; fi
case "$dataset" in
  fashion-mnist) config=configs/demo-fashion-mnist.yaml ;;
  tiny-imagenet-32) config=configs/pipeline-tiny-imagenet-32.yaml ;;
  cifar100) config=configs/pipeline-cifar100.yaml ;;
  *) echo "error: unknown --dataset $dataset; choose fashion-mnist, tiny-imagenet-32 or cifar100" >&2; exit 2 ;;
esac
bash scripts/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate
exec python -m hydranets pipeline --config "$config" "$@"
