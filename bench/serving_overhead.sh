#!/usr/bin/env bash
# Issue 30: the serving overhead of harden's own code at batch 1, before and after a change, on the same checkpoints.
# Alternates one pass of bench/light_latency_passes.py from each of two checkouts (each imports its own hardener),
# so that both see the same machine state; prints each pass's ratios (batch 1, batch 256). Run it quiet, one thread.
#   bash bench/serving_overhead.sh OLD_TREE NEW_TREE FOLDER RUN... [PASSES=4]
set -euo pipefail
OLD=${1:?usage: serving_overhead.sh OLD_TREE NEW_TREE FOLDER RUN...}; NEW=${2:?}; DIR=${3:?}; shift 3
export OMP_NUM_THREADS=1
for k in $(seq "${PASSES:-4}"); do
  for tree in "$OLD" "$NEW"; do
    echo "## pass $k, $(git -C "$tree" rev-parse --short HEAD) ($tree)"
    python "$tree/bench/light_latency_passes.py" "$DIR" "$@" --passes 1 2>&1 >/dev/null | sed 's/^pass 1: //'
  done
done
