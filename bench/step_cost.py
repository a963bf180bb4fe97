"""Training cost per image of each recipe variant of issue 18's search, measured side by side.

    OMP_NUM_THREADS=1 python bench/step_cost.py [--images 640] [--rounds 2] [--only bf16,PGD-2] [--out FILE]

Each variant trains one epoch on the same `--images` images of fashion-mnist:train (no validation, no report) on the
example base, through `hardener.patch`; the variants run interleaved in one process, `--rounds` times, and the
fastest round of each is kept, so that machine load hits them alike. Output: milliseconds per training image per
epoch, against the default recipe's, and the multiply-adds the patches add per image.
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
from hardener import data as hdata  # noqa: E402

BASE = str(ROOT / "examples/fmnist_base.safetensors")
ARCH = str(ROOT / "examples/fmnist_model.py") + ":resnet9_small"
VARIANTS = {  # name: (recipe, options) -- the default recipe is preset robust (r4)
    "default (r4: pre-filter 64, PGD-5)": ("robust", {}),
    "default in bf16 (--precision bf16)": ("robust", {"precision": "bf16"}),
    "PGD-2": ("robust", {"steps": 2}),
    "PGD-3": ("robust", {"steps": 3}),
    "N-FGSM": ("robust", {"attack": "n-fgsm"}),
    "pre-filter stride 2": ("robust", {"prefilter_stride": 2}),
    "pre-filter width 32": ("robust", {"width": 32}),
    "pre-filter width 32, stride 2, PGD-2": ("robust", {"width": 32, "prefilter_stride": 2, "steps": 2}),
    "no pre-filter (fixers only)": ("robust", {"at": "stem,auto"}),
    "full adversarial fine-tuning, PGD-5 (m4)": (None, {"method": "adv-train", "adversary": "patched", "mu": 0,
                                                        "lam": 0, "lr": 1e-3, "attack": "pgd", "steps": 5}),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=640)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--only", help="comma-separated substrings: run the variants whose names contain one (and the "
                                   "default, the reference)")
    a = ap.parse_args()
    if a.only:
        keep = [k.strip() for k in a.only.split(",") if k.strip()]
        for name in list(VARIANTS)[1:]:
            if not any(k in name for k in keep):
                del VARIANTS[name]
    torch.manual_seed(0)
    ds = hdata.load("fashion-mnist:train")
    ds = ds.take(hdata.stratified_split(ds.labels, a.images, 0)[0])
    best: dict[str, float] = {}
    macs: dict[str, int] = {}
    for r in range(a.rounds):
        for name, (recipe, opts) in VARIANTS.items():
            p = hardener.patch(BASE, ds, recipe, arch=ARCH, mean=0.2860, std=0.3530, eps=0.1, epochs=1,
                               select_on=0, holdout=0, **opts)
            ms = 1000 * p.train_seconds / a.images
            best[name] = min(best.get(name, ms), ms)
            if p.sites:
                macs[name] = hardener.measure_cost(p, latency=False).added()["macs"]
            print(f"round {r + 1}: {name}: {ms:.1f} ms per image", file=sys.stderr, flush=True)
    ref = best[next(iter(VARIANTS))]
    rows = [{"variant": n, "ms_per_image": best[n], "relative": best[n] / ref, "macs_added": macs.get(n)}
            for n in VARIANTS]
    print("| variant | ms per training image per epoch | vs the default | multiply-adds added per image |")
    print("|---|---|---|---|")
    for x in rows:
        m = f"{x['macs_added'] / 1e6:.1f}M" if x["macs_added"] else "– (trains the base)"
        print(f"| {x['variant']} | {x['ms_per_image']:.1f} | {x['relative']:.2f} | {m} |")
    if a.out:
        a.out.write_text(json.dumps({"rows": rows, "only": a.only, "images": a.images, "rounds": a.rounds, "threads":
                                     torch.get_num_threads(), "torch": torch.__version__,
                                     "machine": platform.processor() or platform.machine()}, indent=2) + "\n")


if __name__ == "__main__":
    main()
