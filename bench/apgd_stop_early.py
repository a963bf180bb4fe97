"""APGD with and without the early stop that evaluation uses: seconds, and whether the verdicts agree per sample.

    python bench/apgd_stop_early.py CHECKPOINT [--samples 250] [--steps 100] [--out FILE.json]

CHECKPOINT is the example base (examples/fmnist_base.safetensors) or a patch of it (`harden patch` output). Both
runs attack the same clean-correct samples of the shipped test set (examples/data/fashion-mnist-test-1000.npz, the
first --samples), eps 0.1 Linf, white-box, in batches of 256, with APGD-CE and then APGD-DLR, each on what is left.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import hardener  # noqa: E402
from hardener.attacks.apgd import apgd  # noqa: E402


def chain(model, x, y, steps: int, stop_early: bool) -> dict:
    left = torch.ones(len(y), dtype=torch.bool)
    out = {}
    for loss in ("ce", "dlr"):
        t0 = time.perf_counter()
        idx = left.nonzero().flatten()
        for i in range(0, len(idx), 256):
            b = idx[i:i + 256]
            adv = apgd(model, x[b], y[b], eps=0.1, steps=steps, loss=loss, stop_early=stop_early)
            with torch.no_grad():
                left[b] = model(adv).argmax(1) == y[b]
        out[loss] = {"seconds": round(time.perf_counter() - t0, 2), "attacked": len(idx),
                     "robust_after": int(left.sum())}
    out["robust_mask"] = left
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoint")
    ap.add_argument("--samples", type=int, default=250)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--out")
    args = ap.parse_args()
    torch.manual_seed(0)
    model = hardener.load(args.checkpoint, arch=f"{ROOT / 'examples/fmnist_model.py'}:resnet9_small", mean="0.2860",
                          std="0.3530").eval()  # mean/std: for the base (a patch carries its own)
    ds = hardener.as_dataset(str(ROOT / "examples/data/fashion-mnist-test-1000.npz"))
    x, y = hardener.data.to_float(ds.images[:args.samples]), ds.labels[:args.samples]
    with torch.no_grad():
        keep = model(x).argmax(1) == y
    x, y = x[keep], y[keep]
    full = chain(model, x, y, args.steps, stop_early=False)
    fast = chain(model, x, y, args.steps, stop_early=True)
    res = {"checkpoint": args.checkpoint, "samples": args.samples, "clean_correct": len(y), "steps": args.steps,
           "eps": 0.1, "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
           "torch": torch.__version__,
           "reference": {k: v for k, v in full.items() if k != "robust_mask"},
           "stop_early": {k: v for k, v in fast.items() if k != "robust_mask"},
           "same_verdict_per_sample": bool(torch.equal(full["robust_mask"], fast["robust_mask"]))}
    res["speedup"] = round(sum(full[k]["seconds"] for k in ("ce", "dlr")) /
                           sum(fast[k]["seconds"] for k in ("ce", "dlr")), 2)
    text = json.dumps(res, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
