"""Issue 30: the latency ratios of a few light-bench checkpoints, measured in several passes on a quiet machine.

One pass times every checkpoint once (`hardener.measure_cost`: base and patched forwards interleaved in this one
process, one thread, batch 1 and 256, the median of repeats within its time budget); the passes repeat that, so that
each checkpoint gets as many independent ratios as there are passes, and the table gives their median and range.
A single pass moved two checkpoints of the same shapes by up to 0.06 at batch 1 (`results/light/table-lora.md`).

    OMP_NUM_THREADS=1 python bench/light_latency_passes.py OUT_DIR RUN... --passes 5 --json J > table.md
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import hardener  # noqa: E402

ARCHS = {"r": "resnet9_small", "v": "vgg_silu_small", "t": "vit_small"}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("folder", type=Path)
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--passes", type=int, default=5)
    ap.add_argument("--budget-s", type=float, default=10.0)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    torch.manual_seed(0)
    models = {r: hardener.load(str(a.folder / f"{r}.safetensors"),
                               arch=f"{ROOT / 'examples' / 'fmnist_model.py'}:{ARCHS[r.split('-')[0]]}").eval()
              for r in a.runs}
    ratios: dict[str, dict[str, list[float]]] = {r: {} for r in a.runs}
    macs: dict[str, float] = {}
    for k in range(a.passes):
        for r, m in models.items():
            cost = hardener.measure_cost(m, budget_s=a.budget_s)
            macs[r] = round(cost.macs_ratio, 3)
            for b, v in cost.latency["batches"].items():
                ratios[r].setdefault(b, []).append(v["ratio"])
            print(f"pass {k + 1}: {r} " + ", ".join(f"{b}: {v[-1]:.3f}" for b, v in ratios[r].items()), file=sys.stderr)
    print("| run | MACs ratio | " + " | ".join(f"latency ratio, batch {b}: median [min–max]" for b in ratios[a.runs[0]])
          + " |")
    print("|---|---|" + "---|" * len(ratios[a.runs[0]]))
    for r in a.runs:
        cells = [f"{statistics.median(v):.2f} [{min(v):.2f}–{max(v):.2f}]" for v in ratios[r].values()]
        print(f"| {r} | {macs[r]:.2f} | " + " | ".join(cells) + " |")
    print(f"\n{a.passes} passes, each timing every run once (one thread, base and patched interleaved, "
          f"{a.budget_s:g} s budget per run and pass).")
    if a.json:
        a.json.write_text(json.dumps({"passes": a.passes, "budget_s": a.budget_s, "macs_ratio": macs,
                                      "latency_ratios": ratios}, indent=1))


if __name__ == "__main__":
    main()
