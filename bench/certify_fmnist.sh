#!/usr/bin/env bash
# Issue 32's bench: certified L2 accuracy of the smoothed example base on Fashion-MNIST (bench/RESULTS.md,
# "Certified robustness"), at sigma 0.25 and 0.5, for
#   (a) the frozen base smoothed as is,
#   (b) the base + harden's denoiser (`--preset certify --noise-sigma SIGMA`, 10% of fashion-mnist:train),
#   (c) the ceiling: a copy of the base fully fine-tuned on Gaussian-noised inputs, same data (`--method adv-train
#       --noise-sigma SIGMA`).
# Certification: sequential CERTIFY (`--sequential`: n0 = 100 selection draws, then an anytime-valid confidence
# sequence, cap N = 100,000, alpha 0.001, stopping at --max-radius = 2 sigma, at abstention or once the sample's place
# among the reported radii is decided) on seeded stratified test images: SAMPLES_B (default 500) for (b), SAMPLES_A
# (default 200) for (a) and (c). Side by side on FIXED_SAMPLES (default 50) images, for the rows in FIXED_ROWS: Cohen
# et al.'s fixed-N CERTIFY (N = 100,000) and the sequential one on the same images. One thread per run: about 0.8 ms
# per noisy forward of the base here, so fixed N is about 80 CPU-s per image for (a) and (c) and more for (b).
#   bash bench/certify_fmnist.sh [OUT_DIR]           # resumable: finished reports are kept, interrupted runs resume
#   ROWS="b_denoiser_s0.25" bash bench/certify_fmnist.sh OUT_DIR   # only the named rows (one process per row)
#   PROCS=2 ROWS=... bash bench/certify_fmnist.sh OUT_DIR           # each row over 2 processes (torchrun), one
#     thread each: the same rows, about half the wall time; resume a row with the PROCS it started with
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-bench/out/certify}
N=${N:-100000}
SIGMAS=${SIGMAS:-0.25 0.5}
SAMPLES_A=${SAMPLES_A:-200}; SAMPLES_B=${SAMPLES_B:-500}; SAMPLES_C=${SAMPLES_C:-200}
FIXED_SAMPLES=${FIXED_SAMPLES:-50}; FIXED_ROWS=${FIXED_ROWS:-a_base_s0.25 a_base_s0.5 c_noise_ft_s0.25 c_noise_ft_s0.5 b_denoiser_s0.25 b_denoiser_s0.5}
mkdir -p "$OUT"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
M=(--arch examples/fmnist_model.py:resnet9_small)
BASE=examples/fmnist_base.safetensors
NORM=(--mean 0.2860 --std 0.3530)
P=("${NORM[@]}" --data fashion-mnist:train --subset 10% --force --quiet --eval-samples 200)
certify() {  # certify NAME SIGMA MODEL SAMPLES [ARGS...]: NAME.json (report), NAME.tsv, NAME.log (with CPU time)
  local name=$1 sigma=$2 model=$3 samples=$4; shift 4
  [ -f "$OUT/$name.json" ] && return 0
  [ -n "${ROWS:-}" ] && [[ " $ROWS " != *" $name "* ]] && return 0  # ROWS="NAME ...": only these (parallel runs)
  local resume=(); [ -f "$OUT/$name.started" ] && resume=(--resume)
  touch "$OUT/$name.started"
  local run=(python -m hardener)  # PROCS=2: one row over 2 processes (torchrun; sample i on process i mod 2)
  [ "${PROCS:-1}" -gt 1 ] && run=(python -m torch.distributed.run --standalone --nproc_per_node "$PROCS" -m hardener)
  /usr/bin/time -f "%e s wall, %U s user" "${run[@]}" certify "$model" "${M[@]}" "$@" --data fashion-mnist:test \
    --max-samples "$samples" --sigma "$sigma" --draws "$N" --n0 100 --alpha 0.001 --batch-size 200 --force --quiet \
    "${resume[@]}" --state-dir "$OUT/state" --tsv "$OUT/$name.tsv" --report "$OUT/$name.json" 2>> "$OUT/$name.log"  # appended: a resumed row sums its runs' CPU time
}
model_of() {  # the checkpoint of a row name's model
  case $1 in a_base_s*) echo "$BASE" ;; b_denoiser_s*) echo "$OUT/denoiser_s${1#b_denoiser_s}.safetensors" ;;
             c_noise_ft_s*) echo "$OUT/noise_ft_s${1#c_noise_ft_s}.safetensors" ;; esac
}
norm_of() {  # the plain base needs its normalisation; patched files record theirs
  case $1 in a_base_s*) echo "${NORM[*]}" ;; esac
}
for s in $SIGMAS; do
  certify "a_base_s$s" "$s" "$(model_of "a_base_s$s")" "$SAMPLES_A" --sequential "${NORM[@]}"
  [ -f "$OUT/denoiser_s$s.safetensors" ] || [ -n "${ROWS:-}" ] || python -m hardener patch "$BASE" "${M[@]}" "${P[@]}" --preset certify \
    --noise-sigma "$s" --out "$OUT/denoiser_s$s.safetensors" 2> "$OUT/denoiser_s$s.patch.log"
  certify "b_denoiser_s$s" "$s" "$(model_of "b_denoiser_s$s")" "$SAMPLES_B" --sequential
  [ -f "$OUT/noise_ft_s$s.safetensors" ] || [ -n "${ROWS:-}" ] || python -m hardener patch "$BASE" "${M[@]}" "${P[@]}" --method adv-train \
    --noise-sigma "$s" --lr 1e-3 --epochs 10 --out "$OUT/noise_ft_s$s.safetensors" 2> "$OUT/noise_ft_s$s.patch.log"
  certify "c_noise_ft_s$s" "$s" "$(model_of "c_noise_ft_s$s")" "$SAMPLES_C" --sequential
done
for row in $FIXED_ROWS; do  # side by side: the same FIXED_SAMPLES images, sequential and fixed N
  s=${row##*_s}
  # shellcheck disable=SC2046
  certify "$row.seq$FIXED_SAMPLES" "$s" "$(model_of "$row")" "$FIXED_SAMPLES" --sequential $(norm_of "$row")
  # shellcheck disable=SC2046
  certify "$row.fixed$FIXED_SAMPLES" "$s" "$(model_of "$row")" "$FIXED_SAMPLES" --fixed $(norm_of "$row")
done
