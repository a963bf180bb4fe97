#!/usr/bin/env bash
# The built-in example: Fashion-MNIST base (shipped, trained by examples/train_base.py), patch it with
# fixers on 10% of the training set, evaluate base and patched model. Under 10 minutes on 2 CPU cores.
set -euo pipefail
cd "$(dirname "$0")"
HARDEN=${HARDEN:-harden}
OUT=${OUT:-out}
mkdir -p "$OUT"

if [ -e /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] || [ -n "${HARDEN_FASHION_MNIST_DIR:-}" ]; then
  TRAIN=fashion-mnist:train; SUBSET=10%; TEST=fashion-mnist:test
else
  echo "Fashion-MNIST package not found (apt-get install dataset-fashion-mnist); using the shipped subset" >&2
  TRAIN=data/fashion-mnist-train-2000.npz; SUBSET=1000; TEST=data/fashion-mnist-test-1000.npz
fi
SAMPLES=${SAMPLES:-400}

set -x
"$HARDEN" layers fmnist_base.safetensors --input-shape 1,28,28 > "$OUT/sites.txt"
"$HARDEN" patch fmnist_base.safetensors --data "$TRAIN" --subset "$SUBSET" --eval-data "$TEST" \
  --eval-samples "$SAMPLES" --epochs 10 --out "$OUT/fmnist.hardened.safetensors" --force \
  --report "$OUT/patch-report.json"
"$HARDEN" eval "$OUT/fmnist.hardened.safetensors" --data "$TEST" --max-samples "$SAMPLES" \
  --attack apgd-ce,apgd-dlr,fgsm --eps 0.1 --eps-sweep 0,0.05,0.1 \
  --report "$OUT/eval-report.md" --report "$OUT/eval-report.html" --json > "$OUT/eval-report.json"
set +x
echo "reports in examples/$OUT/: patch-report.json, eval-report.{json,md,html}" >&2
