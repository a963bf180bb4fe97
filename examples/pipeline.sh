#!/usr/bin/env bash
# A robustness gate in a CI job: patch a frozen checkpoint, evaluate the patched file white-box, fail the job when
# clean or robust accuracy falls under the gate, and keep the reports (and, with MLFLOW=1, an MLflow run) either way.
# stdout carries data only (the patched file's path; the report JSON), progress goes to stderr, and the exit code
# says what happened: 0 passed, 1 a gate missed, 2 bad input, 3 the run failed, 130 interrupted.
#
#   bash examples/pipeline.sh                      # the Fashion-MNIST example, the default recipe (minutes)
#   MODEL=... ARCH=... DATA=... TEST=... bash examples/pipeline.sh   # your checkpoint and data
#
# Knobs (environment): MODEL, ARCH, MEAN, STD, DATA (training subset), TEST (evaluation data), EPS, OUT (folder),
# GATE (--fail-under), ATTACK, SAMPLES (evaluated images), PATCH_ARGS / EVAL_ARGS (more options), MLFLOW=1.
set -euo pipefail
cd "$(dirname "$0")"
MODEL=${MODEL:-fmnist_base.safetensors}
ARCH=${ARCH:-fmnist_model.py:resnet9_small}
MEAN=${MEAN:-0.2860} STD=${STD:-0.3530}
DATA=${DATA:-data/fashion-mnist-train-2000.npz}
TEST=${TEST:-data/fashion-mnist-test-1000.npz}
EPS=${EPS:-0.1}
OUT=${OUT:-out/pipeline}
GATE=${GATE:-clean=0.80,robust=0.40}
ATTACK=${ATTACK:-apgd-ce,apgd-dlr}
SAMPLES=${SAMPLES:-250}
HARDEN=${HARDEN:-harden}
TRACK=(); [ -n "${MLFLOW:-}" ] && TRACK=(--mlflow)
mkdir -p "$OUT"
# shellcheck disable=SC2086
patched=$($HARDEN patch "$MODEL" --arch "$ARCH" --mean "$MEAN" --std "$STD" --data "$DATA" --eps "$EPS" \
  --out "$OUT/model.hardened.safetensors" --report "$OUT/patch.json" --force "${TRACK[@]}" ${PATCH_ARGS:-})
status=0
# shellcheck disable=SC2086
$HARDEN eval "$patched" --arch "$ARCH" --data "$TEST" --max-samples "$SAMPLES" --attack "$ATTACK" --eps "$EPS" \
  --threat whitebox --fail-under "$GATE" --report "$OUT/eval.json" --report "$OUT/eval.html" --force \
  "${TRACK[@]}" ${EVAL_ARGS:-} --json > "$OUT/eval.stdout.json" || status=$?
case $status in
  0) echo "robustness gate passed ($GATE): $OUT/eval.html" >&2 ;;
  1) echo "robustness gate missed ($GATE): $OUT/eval.html" >&2 ;;
  *) echo "evaluation failed (exit $status)" >&2 ;;
esac
exit $status
