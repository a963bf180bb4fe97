"""Issue 17: attacks in fp32 vs bf16 (and fp16) on the same model and samples: images/s, robust accuracy, peak memory.

    python bench/precision_eval.py [--device cuda] [--n 1000] [--out bench/results/precision_eval.json]

Evaluates the example base patched by the default recipe if a checkpoint is given (--model), else the example base,
on a seeded stratified subset of fashion-mnist:test with APGD-CE (100 steps), white-box, eps 0.1. Meant for a GPU
(bf16 on CPUs without bf16 units is slower than fp32); on CPU it still runs and records what it measured.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import hardener

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(ROOT / "examples" / "fmnist_base.safetensors"))
    ap.add_argument("--device", default="auto")
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=500)
    ap.add_argument("--precisions", default="fp32,bf16")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "precision_eval.json"))
    a = ap.parse_args()
    arch = f"{ROOT / 'examples' / 'fmnist_model.py'}:resnet9_small"
    rows = []
    for prec in a.precisions.split(","):
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        t0 = time.time()
        rep = hardener.evaluate(a.model, "fashion-mnist:test", "apgd-ce", eps=0.1, threat="whitebox", checks=False,
                                max_samples=a.n, batch_size=a.batch_size, arch=arch, mean="0.2860", std="0.3530",
                                device=a.device, precision=prec)
        secs = time.time() - t0
        m = rep.data["models"].get("patched", rep.data["models"]["base"])
        row = {"precision": prec, "seconds": round(secs, 1), "images_per_s": round(a.n / secs, 2),
               "clean": m["clean"]["accuracy"], "robust": m["threats"]["whitebox"]["robust"],
               "device": rep.data["environment"]["device"],
               "peak_memory_mb": round(torch.cuda.max_memory_allocated() / 2**20) if torch.cuda.is_available()
               else None}
        rows.append(row)
        print(json.dumps(row))
    Path(a.out).write_text(json.dumps({"model": a.model, "n": a.n, "attack": "apgd-ce 100 steps, eps 0.1, white-box",
                                       "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
