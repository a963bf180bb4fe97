#!/usr/bin/env bash
# demo-scale probes G and H (2026-12-01; harden before the bf16-validation commit): the default recipe on the shipped subset with the options
# given (G: --precision bf16; H: --precision bf16 --mu 3), evaluated in fp32 on 500 shipped test images as the demo did
#   ROOT=CHECKOUT OUT_DIR=DIR bash run3.sh NAME OPTIONS...    (H was not evaluated on test: the choice was made on
#   its held-out images, and it did not change the demo)
set -euo pipefail
: "${ROOT:?set ROOT to a checkout with .venv}"; source "$ROOT/.venv/bin/activate"
cd $ROOT/examples
export PYTHONPATH=$ROOT OMP_NUM_THREADS=${T:-1}
N=$1; shift
O=$OUT_DIR/$N
mkdir -p $O
/usr/bin/time -f "%e s wall %U user" python -m hardener patch fmnist_base.safetensors --data data/fashion-mnist-train-2000.npz \
  --out $O/p.safetensors --force --report $O/patch.json "$@" 2> $O/patch.log > /dev/null
/usr/bin/time -f "%e s wall %U user" python -m hardener eval $O/p.safetensors --data data/fashion-mnist-test-1000.npz --max-samples 500 \
  --attack apgd-ce,apgd-dlr --threat whitebox,adaptive --force --report $O/eval.json --report $O/eval.md 2> $O/eval.log > /dev/null
