#!/usr/bin/env bash
# demo-scale probes I, J, K (2026-12-01, harden af6faf7): is the demo's clean cost overfitting? The demo's patch
# (1,600 training images) scores 89.6 clean on its training images and 82.5 on its held-out ones; r4 (6,000 images)
# loses far less. I = the demo's recipe + --augment (pad 4, random crop, flip), J = + --batch-size 32 (4x the optimiser
# steps at the same image-epochs), K = both. Trained exactly as the demo trains (bf16 here), judged on VALIDATION
# only: 1,000 stratified images of fashion-mnist:train outside the shipped 2,000 (val1000.npz, seed 1; the base
# trained on them, so clean figures are optimistic for base and patch alike), clean + white-box APGD-CE 20 steps.
#   ROOT=CHECKOUT OUT_DIR=DIR bash run4.sh NAME OPTIONS...     (NAME=G_eval CKPT=... evaluates an existing patch)
set -euo pipefail
: "${ROOT:?set ROOT to a checkout with .venv}"; source "$ROOT/.venv/bin/activate"
cd $ROOT/examples
export PYTHONPATH=$ROOT OMP_NUM_THREADS=${T:-1}
N=$1; shift
O=$OUT_DIR/$N
mkdir -p $O
CKPT=${CKPT:-$O/p.safetensors}
if [ ! -f "$CKPT" ]; then
  /usr/bin/time -f "%e s wall %U user" python -m hardener patch fmnist_base.safetensors --data data/fashion-mnist-train-2000.npz \
    --precision bf16 --out $CKPT --force --report $O/patch.json "$@" 2> $O/patch.log > /dev/null
fi
/usr/bin/time -f "%e s wall %U user" python -m hardener eval $CKPT --data $OUT_DIR/val1000.npz \
  --attack apgd-ce --steps 20 --threat whitebox --no-checks --force --report $O/val.json 2> $O/val.log > /dev/null
