#!/usr/bin/env bash
# Issue 30's search: the cheapest patch that holds white-box robustness (bench/RESULTS.md, "Light patches").
# The protocol of bench/cheap_fmnist.sh: the example bases of examples/fmnist_model.py, 10% of fashion-mnist:train
# (6,000 images, stratified, seed 0), eps 0.1 Linf; recipes compared on VALIDATION data only (500 training images
# outside the subset held out by --select-on: per-epoch PGD-10, picks the epoch; 500 more for the patch report's quick
# check: APGD-CE-20 white-box and transfer). Every run is `--preset robust` (the default recipe until issue 30) with
# the named changes; its inference cost (multiply-adds relative to the base) is the run's `cost` in the report when
# harden records it, else bench/light_cost.py's. One thread per run; /usr/bin/time -v records CPU seconds.
#   bash bench/light_fmnist.sh OUT_DIR RUN...          # the named runs, skipping finished ones
#   RESUME=1 bash bench/light_fmnist.sh OUT_DIR RUN... # continue interrupted runs from OUT_DIR/RUN.safetensors.partial
#   TEST=1 bash bench/light_fmnist.sh OUT_DIR RUN...   # the verdict on test, for runs chosen on validation: the
#     verdict's 1,000 seeded stratified images of fashion-mnist:test, white-box APGD-CE -> APGD-DLR (100 steps), BPDA
#     through the input patch on what they left (threat adaptive), transfer from the base, eps 0.1 -> RUN.test.*;
#     an evaluation it started before resumes, and the base's own attack rows are kept in OUT_DIR/base-cache
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: light_fmnist.sh OUT_DIR RUN...}
shift
mkdir -p "$OUT"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# The robust teacher of the distillation runs (*T): today's default (heavy) patch of the run's base, the run A-default
# (for r, the bench's runs used the verdict's file, TEACHER=..., its sha256 in their training record); built first with
# the default recipe when missing.
declare -A ARCH=([r]=resnet9_small [v]=vgg_silu_small [t]=vit_small)
TWINS="--method fixer,auxbn --bn auto"  # BN twins beside the recipe's patches (no multiply-adds)
L2="--width 16 --rho 4 $TWINS"  # a width-16 pre-filter and fixers at rho 4: 1.233x the example base's multiply-adds
L4="--at stem,auto --rho 2 $TWINS"  # fixers only, rho 2 at the stem and the suggested sites: 1.20x
PRE="--at prefilter:input $TWINS --epochs 20"  # the pre-filter alone with BN twins, one stage (the P and S runs)
T20="--loss rslad --teacher @TEACHER@ --epochs 20"  # RSLAD from the run's heavy default patch, for 20 epochs
declare -A RUNS=(
  [L1]="--width 16 --rho 4"
  [L2]="$L2"
  [L3]="--width 32 --prefilter-stride 2 --rho 4 $TWINS"
  [L4]="$L4"
  [L5]="--width 32 --prefilter-stride 2 --prefilter-design shuffle --rho 4 $TWINS"
  [L6]="--width 32 --prefilter-design separable --rho 4 $TWINS"
  [B125]="--budget 1.25 $TWINS"
  [B2]="--budget 2 $TWINS"
  [default]=""  # today's heavy default recipe: the teacher, and the frontier's top row
  [L2e20]="$L2 --epochs 20"
  [L2e20m1]="$L2 --epochs 20 --mu 1"  # no teacher: one stage
  [L2e20m15]="$L2 --epochs 20 --mu 1.5"  # no teacher at the mu chosen for distillation: the clean/robust trade
  [L4e20m1]="$L4 --epochs 20 --mu 1"  # fixers only, no teacher: the design inside 1.25x in latency, one stage
  # the pre-filter alone (no fixers: every fixer adds thin convolutions, the slowest multiply-adds per unit, profile.md)
  # with BN twins, one stage: plain width 16 at full resolution (1.13x), shuffle width 32 at stride 2 (1.14x); and the
  # stride-2 shuffle beside rho-4 fixers (= L5, 1.24x) under the one-stage recipe
  [P16e20m1]="$PRE --width 16 --mu 1"
  [P16e20m15]="$PRE --width 16 --mu 1.5"  # P16e20m1's clean/robust trade at mu 1.5
  [P12e20m1]="$PRE --width 12 --mu 1"  # vgg_silu_small: the widest plain one inside 1.25x (1.16x)
  [P8e20m1]="$PRE --width 8 --mu 1"  # vit_small: the widest plain one inside 1.25x (1.23x)
  # P16e20m1 distilled from the heavy default (RSLAD) at mu 1.5: the teacher kept L2's robustness at less pull to the
  # base (L2Te20Tm15); and P16e20m1 without the BN twins (the pre-filter alone on the base's own BN statistics, whose
  # serving route keeps the base's clean normalisation)
  [P16Te20Tm15]="$PRE --width 16 $T20 --mu 1.5"
  [Q16e20m1]="--at prefilter:input --epochs 20 --width 16 --mu 1"
  # P16e20m1 with BN twins at the example base's first blocks only (E) or its last ones only (L): where the twins'
  # robustness is, and whether the base's own statistics elsewhere keep the clean accuracy (resnet9_small's names)
  [P16e20m1E]="--at prefilter:input --method fixer,auxbn --bn prep.1,layer1.conv.1,layer1.res.a.1,layer1.res.b.1 \
--epochs 20 --width 16 --mu 1"
  [P16e20m1L]="--at prefilter:input --method fixer,auxbn --bn layer2.conv.1,layer3.conv.1,layer3.res.a.1,layer3.res.b.1 \
--epochs 20 --width 16 --mu 1"
  # P16e20m1 with its twins trained as they serve (--twin-stats): clean and adversarial inputs in one batch (J), whose
  # statistics the running ones average as at inference, or on the base's running statistics, affine only (F): the
  # clean points the twins cost (P16e20m1E/L) come from normalisation learned apart from how it serves?
  [P16e20m1J]="$PRE --width 16 --mu 1 --twin-stats joint"
  [P16e20m1F]="$PRE --width 16 --mu 1 --twin-stats frozen"
  # P16e20m1 pulled harder towards the base's clean logits: the clean / robust frontier of the pre-filter alone, read
  # on val2k (bench/light_val2k.sh), where mu 1 -> 1.5 bought +0.4 clean for -0.45 white-box
  [P16e20m2]="$PRE --width 16 --mu 2"
  [P16e20m3]="$PRE --width 16 --mu 3"
  [P12e20m1J]="$PRE --width 12 --mu 1 --twin-stats joint"  # vgg_silu_small: P12e20m1 with joint twins
  # --preset light with joint twins (r: L2e20m1J; v: a width-8 pre-filter, fixers rho 8): does the preset take them?
  [B125e20m1J]="--budget 1.25 $TWINS --epochs 20 --mu 1 --twin-stats joint"
  [P12Te20Tm15]="$PRE --width 12 $T20 --mu 1.5"  # vgg_silu_small: P16Te20Tm15's recipe at its widest plain width
  [S32e20m1]="$PRE --width 32 --prefilter-stride 2 --prefilter-design shuffle --mu 1"
  [L5e20m1]="--width 32 --prefilter-stride 2 --prefilter-design shuffle --rho 4 $TWINS --epochs 20 --mu 1"
  [B125e20m1]="--budget 1.25 $TWINS --epochs 20 --mu 1"  # --preset light without a teacher, at mu 1 (r: = L2e20m1)
  # the same with the lighter pre-filter designs tried first (vit_small: a shuffle pre-filter of width 16 at stride 2,
  # or a separable one of width 16, where the plain design fits only width 8)
  [B125Se20m1]="--budget 1.25 --prefilter-design shuffle --prefilter-stride 2 $TWINS --epochs 20 --mu 1"
  [B125Pe20m1]="--budget 1.25 --prefilter-design separable $TWINS --epochs 20 --mu 1"
  # L2 distilled from the heavy default patch (RSLAD: its soft labels on the clean input; TEACHER=FILE another file)
  [L2T]="$L2 --loss rslad --teacher @TEACHER@"
  [L2Te20T]="$L2 $T20"
  # fixers only (no pre-filter: its thin full-resolution convolutions are the slowest multiply-adds, profile.md)
  [L4Te20T]="$L4 $T20"
  [L4Te20Tm1]="$L4 $T20 --mu 1"
  # whatever --budget 1.25 builds on the architecture, distilled from its heavy default for 20 epochs; the same at 2
  [B125Te20T]="--budget 1.25 $TWINS $T20"
  [B125Te20Tm1]="--budget 1.25 $TWINS $T20 --mu 1"
  [B2Te20T]="--budget 2 $TWINS $T20"
  # L2Te20T with less pull to the base's clean logits (the preset's mu 2.5 outweighs RSLAD's own terms, whose
  # teacher already keeps clean accuracy): mu trades white-box for clean accuracy
  [L2Te20Tm1]="$L2 $T20 --mu 1"
  [L2Te20Tm0]="$L2 $T20 --mu 0"
  [L2Te20Tm15]="$L2 $T20 --mu 1.5"
  # lora weight deltas (rank 8) on every conv and linear layer, merged when served: capacity at no multiply-adds per
  # image. With BN twins alone (R8: 1.00x) and beside P16e20m1's pre-filter (P16R8: the pre-filter's 1.13x): does
  # capacity the served model does not pay for buy back the clean points the light patches lose?
  [R8e20m1]="--at lora:auto --lora-rank 8 $TWINS --epochs 20 --mu 1"
  [P16R8e20m1]="--at prefilter:input,lora:auto --lora-rank 8 $TWINS --epochs 20 --width 16 --mu 1"
  # R8e20m1 at rank 16 (more capacity, still 1.00x), and without the BN twins (lora alone: do the twins still pay
  # for themselves beside the deltas, or cost clean points?)
  [R16e20m1]="--at lora:auto --lora-rank 16 $TWINS --epochs 20 --mu 1"
  [R8e20m1N]="--at lora:auto --lora-rank 8 --epochs 20 --mu 1"
  # P16R8e20m1 held white-box with room to spare and lost clean points: μ 2 trades the one for the other; a width-8
  # pre-filter (about half its multiply-adds and latency) beside the deltas; and the pre-filter alone with lora on
  # vgg_silu_small (P12, as v-P12e20m1) and vit_small (P8, as t-P8e20m1)
  [P16R8e20m2]="--at prefilter:input,lora:auto --lora-rank 8 $TWINS --epochs 20 --width 16 --mu 2"
  [P8R8e20m2]="--at prefilter:input,lora:auto --lora-rank 8 $TWINS --epochs 20 --width 8 --mu 2"
  [P12R8e20m1]="--at prefilter:input,lora:auto --lora-rank 8 $TWINS --epochs 20 --width 12 --mu 1"
  [P8R8e20m1]="--at prefilter:input,lora:auto --lora-rank 8 $TWINS --epochs 20 --width 8 --mu 1"
  # the μ-2 recipe on vgg_silu_small (its widest plain pre-filter inside 1.25x, as v-P12R8e20m1) and vit_small (P8),
  # and on vit_small with rank-16 deltas (a quarter of its width-64 layers' rank: capacity at no multiply-adds)
  [P12R8e20m2]="--at prefilter:input,lora:auto --lora-rank 8 $TWINS --epochs 20 --width 12 --mu 2"
  [P8R16e20m2]="--at prefilter:input,lora:auto --lora-rank 16 $TWINS --epochs 20 --width 8 --mu 2"
  # no pre-filter: rank-16 deltas and twins alone, at the base's multiply-adds (a thin full-resolution pre-filter
  # costs vgg_silu_small and vit_small 1.33-1.45x their latency at 1.16-1.23x their multiply-adds)
  [R16e20m2]="--at lora:auto --lora-rank 16 $TWINS --epochs 20 --mu 2"
  # P8R16e20m2 once lora:auto also takes attention layers (35351db: deltas on nn.MultiheadAttention's packed qkv and
  # output projections; before it, vit_small's deltas sat on its patch embedding, MLPs and head only)
  [P8R16e20m2a]="--at prefilter:input,lora:auto --lora-rank 16 $TWINS --epochs 20 --width 8 --mu 2"
  [R16e20m2a]="--at lora:auto --lora-rank 16 $TWINS --epochs 20 --mu 2"  # R16e20m2 with attention deltas too
  [P8R8e20m2a]="--at prefilter:input,lora:auto --lora-rank 8 $TWINS --epochs 20 --width 8 --mu 2"  # --preset light's
  # shapes on vit_small (P8R8e20m2 with attention deltas too)
  # P8R16e20m2a with a width-4 pre-filter: about a third of its multiply-adds (vit_small: 1.07x), for the latency the
  # width-8 pre-filter overspends (1.41 / 1.55 at batch 1 / 256)
  [P4R16e20m2a]="--at prefilter:input,lora:auto --lora-rank 16 $TWINS --epochs 20 --width 4 --mu 2"
)
for run in "$@"; do
  name=${run#*-}; arch=${ARCH[${run%%-*}]}  # RUN is A-NAME: A picks the architecture (r, v, t)
  teacher=${TEACHER:-$OUT/${run%%-*}-default.safetensors}
  if [ -n "${TEST:-}" ]; then
    [ -f "$OUT/$run.test.json" ] && continue
    state="$OUT/state-$run.test" resume=()  # an evaluation interrupted after its first save resumes
    if compgen -G "$state/.harden-eval-*.partial" > /dev/null; then resume=(--resume); fi
    /usr/bin/time -v python -m hardener eval "$OUT/$run.safetensors" --arch "examples/fmnist_model.py:$arch" \
      --data fashion-mnist:test --max-samples 1000 --attack apgd-ce,apgd-dlr --eps 0.1 \
      --threat whitebox,adaptive,transfer --quiet --force --report "$OUT/$run.test.json" --report "$OUT/$run.test.md" \
      --base-cache "$OUT/base-cache" --state-dir "$state" ${resume[@]+"${resume[@]}"} > /dev/null 2> "$OUT/$run.test.log" || echo "$run test failed: see $OUT/$run.test.log" >&2
    continue
  fi
  [ -f "$OUT/$run.json" ] && continue
  if [[ ${RUNS[$name]} == *@TEACHER@* ]] && [ ! -f "$teacher" ]; then  # a distilled run builds its teacher first
    bash "$0" "$OUT" "${run%%-*}-default"
  fi
  base=examples/fmnist_base.safetensors
  if [ "$arch" != resnet9_small ]; then  # the other bases are trained as bench/archs_fmnist.sh trains them
    base=$OUT/$arch.base.safetensors
    [ -f "$base" ] || python examples/train_base.py --model "$arch" --epochs 4 --out "$base" 2> "$OUT/$arch.base.log"
  fi
  # shellcheck disable=SC2086
  /usr/bin/time -v python -m hardener patch "$base" \
    --arch "examples/fmnist_model.py:$arch" --mean 0.2860 --std 0.3530 --data fashion-mnist:train --subset 10% \
    --preset robust --eps 0.1 --eval-samples 500 --force --quiet --out "$OUT/$run.safetensors" --report "$OUT/$run.json" \
    ${RUNS[$name]//@TEACHER@/$teacher} ${RESUME:+--resume} > "$OUT/$run.out" 2>> "$OUT/$run.log" || echo "$run failed: see $OUT/$run.log" >&2
done
