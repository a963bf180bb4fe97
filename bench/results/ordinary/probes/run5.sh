#!/usr/bin/env bash
# demo-scale probes M.. (2026-12-01, harden eb67a4d): can the default recipe keep more clean accuracy at the demo's
# compute? Each is L (the demo's recipe now: bf16, the shipped 2,000 images, 1,600 trained on, --batch-size auto -> 32,
# mu 2) with one change, judged on VALIDATION only: val1000.npz (1,000 stratified images of fashion-mnist:train
# outside the shipped 2,000, seed 1), clean + white-box APGD-CE 20 steps, exactly as run4.sh judged G-L.
#   ROOT=CHECKOUT OUT_DIR=DIR [DATA=TRAINING_FILE] bash run5.sh NAME OPTIONS...     (NAME=G_eval CKPT=... evaluates an existing patch)
set -euo pipefail
: "${ROOT:?set ROOT to a checkout with .venv}"; source "$ROOT/.venv/bin/activate"
cd $ROOT/examples
export PYTHONPATH=$ROOT OMP_NUM_THREADS=${T:-1}
N=$1; shift
O=$OUT_DIR/$N
mkdir -p $O
CKPT=${CKPT:-$O/p.safetensors}
if [ ! -f "$CKPT" ]; then
  /usr/bin/time -f "%e s wall %U user" python -m hardener patch fmnist_base.safetensors --data ${DATA:-data/fashion-mnist-train-2000.npz} \
    --precision bf16 --out $CKPT --force --report $O/patch.json "$@" 2> $O/patch.log > /dev/null
fi
/usr/bin/time -f "%e s wall %U user" python -m hardener eval $CKPT --data $OUT_DIR/val1000.npz \
  --attack apgd-ce --steps 20 --threat whitebox --no-checks --force --report $O/val.json 2> $O/val.log > /dev/null
