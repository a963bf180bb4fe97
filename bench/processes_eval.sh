#!/usr/bin/env bash
# Issue 17: wall time of one standard evaluation (AutoAttack standard suite, white-box + Square) with 1 and with N
# processes (torchrun, one thread each), same model, samples and seed; and that the two reports agree.
#   bash bench/processes_eval.sh [N_SAMPLES] [PROCS] [DEVICE]     -> bench/results/processes_eval.json
# Default: the default recipe's checkpoint of bench/results/verdict/, 100 test images, 2 processes, cpu; BS (default 8)
# is --batch-size, the block size of the shards: N/BS blocks are dealt to the processes (fewer blocks than processes
# leaves processes idle).
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-100} P=${2:-2} DEV=${3:-cpu}
OUT=bench/results; TMP=$(mktemp -d)
export OMP_NUM_THREADS=1
ARGS=(eval bench/results/verdict/default-10pct.safetensors --arch examples/fmnist_model.py:resnet9_small
      --data fashion-mnist:test --max-samples "$N" --eps 0.1 --suite standard --threat whitebox,blackbox
      --no-checks --quiet --device "$DEV" --batch-size "${BS:-8}" --json)
t0=$(date +%s.%N); python -m hardener "${ARGS[@]}" > "$TMP/one.json"; t1=$(date +%s.%N)
python -m torch.distributed.run --standalone --nproc_per_node "$P" -m hardener "${ARGS[@]}" > "$TMP/many.json"
t2=$(date +%s.%N)
python3 - "$TMP" "$t0" "$t1" "$t2" "$N" "$P" "$DEV" "$OUT/processes_eval.json" <<'PY'
import json, sys
tmp, t0, t1, t2, n, p, dev, out = sys.argv[1], *map(float, sys.argv[2:5]), int(sys.argv[5]), int(sys.argv[6]), sys.argv[7], sys.argv[8]
a, b = json.load(open(f"{tmp}/one.json")), json.load(open(f"{tmp}/many.json"))
same = a["models"]["patched"]["per_sample_broken_by"] == b["models"]["patched"]["per_sample_broken_by"]
res = {"samples": n, "processes": p, "device": dev, "attack": "AutoAttack standard (APGD-CE, APGD-T, FAB-T, Square 5000)",
       "seconds_1": round(t1 - t0, 1), f"seconds_{p}": round(t2 - t1, 1), "speedup": round((t1 - t0) / (t2 - t1), 2),
       "per_sample_equal": same, "robust": a["summary"]["robust"], "blackbox": a["summary"].get("blackbox")}
json.dump(res, open(out, "w"), indent=2)
print(json.dumps(res, indent=2))
PY
