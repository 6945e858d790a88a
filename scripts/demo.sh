#!/usr/bin/env bash
# The demo: set up ./.venv (torch 2.13.0 CPU wheel, hydranets, Fashion-MNIST from Debian), then run the
# whole pipeline -- baseline, subtasks, HydraNet, evaluation at every k, report -- in a few minutes.
#   scripts/demo.sh                              Fashion-MNIST, 5-10 minutes on 2 CPU cores, set-up included
#   scripts/demo.sh --dataset tiny-imagenet-32   the same pipeline at full size (hours on a CPU)
#   scripts/demo.sh --dataset cifar100           for users with CIFAR-100 (downloaded on first use)
#   scripts/demo.sh ... key=value                any config override, e.g. out=runs/mine train.epochs=5
set -euo pipefail
cd "$(dirname "$0")/.."
dataset=fashion-mnist
if [ "${1:-}" = "-h" ] || [ "${1:-}" = "--help" ]; then
  sed -n '2,7s/^# \{0,1\}//p' "$0"
  echo "(the overrides are those of 'hydranets pipeline': .venv/bin/python -m hydranets pipeline --help)"
  exit 0
fi
if [ "${1:-}" = "--dataset" ]; then dataset=${2:?--dataset needs a name}; shift 2; fi
case "$dataset" in
  fashion-mnist) config=configs/demo-fashion-mnist.yaml ;;
  tiny-imagenet-32) config=configs/pipeline-tiny-imagenet-32.yaml ;;
  cifar100) config=configs/pipeline-cifar100.yaml ;;
  *) echo "error: unknown --dataset $dataset; choose fashion-mnist, tiny-imagenet-32 or cifar100" >&2; exit 2 ;;
esac
echo "setting up .venv (torch 2.13.0 CPU wheel, hydranets; a minute or two the first time) ..." >&2
bash scripts/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate
exec python -m hydranets pipeline --config "$config" "$@"
