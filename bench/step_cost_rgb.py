"""Training cost per image of the default recipe on a ResNet-18 at 32x32 RGB, against full adversarial fine-tuning.

    OMP_NUM_THREADS=1 /work/venv-compat/bin/python bench/step_cost_rgb.py [--images 256] [--rounds 2] [--out FILE]

Timing and mechanics only (issue 18, item 4: no RGB data at hand): torchvision's resnet18 (10 classes, random init,
seed 0), random uint8 images and labels. Each variant trains one epoch on the same images through `hardener.patch`
(eps 8/255, no validation, no report); the variants run interleaved in one process, `--rounds` times, and the fastest
round of each is kept, so that machine load hits them alike. Needs torchvision (bench/compat.sh's venv).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import hardener  # noqa: E402

IMAGENET = dict(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
VARIANTS = {  # name: (recipe, options)
    "default recipe (pre-filter 64 + fixers, PGD-5)": ("robust", {}),
    "default recipe, --prefilter-stride 2": ("robust", {"prefilter_stride": 2}),
    "full adversarial fine-tuning, PGD-5": (None, {"method": "adv-train", "adversary": "patched", "mu": 0, "lam": 0,
                                                   "lr": 1e-3, "attack": "pgd", "steps": 5}),
}


def main() -> None:
    import torchvision

    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (a.images, 3, 32, 32), generator=g, dtype=torch.uint8)
    y = torch.randint(0, 10, (a.images,), generator=g)
    best: dict[str, float] = {}
    macs: dict[str, tuple[int, int]] = {}
    for r in range(a.rounds):
        for name, (recipe, opts) in VARIANTS.items():
            torch.manual_seed(0)
            net = torchvision.models.resnet18(num_classes=10).eval()
            p = hardener.patch(net, (x, y), recipe, eps="8/255", epochs=1, select_on=0, holdout=0, batch_size=64,
                               **IMAGENET, **opts)
            ms = 1000 * p.train_seconds / a.images
            best[name] = min(best.get(name, ms), ms)
            if p.sites:
                c = hardener.measure_cost(p, latency=False).added()
                macs[name] = (c["macs"], c["base_macs"])
            print(f"round {r + 1}: {name}: {ms:.1f} ms per image", file=sys.stderr, flush=True)
    ref = best["full adversarial fine-tuning, PGD-5"]
    rows = [{"variant": n, "ms_per_image": best[n], "vs_full_adversarial_fine_tuning": best[n] / ref,
             "macs_added": macs.get(n, (None, None))[0], "base_macs": macs.get(n, (None, None))[1]} for n in VARIANTS]
    print("| variant (torchvision resnet18, 3x32x32) | ms per training image per epoch | vs full adversarial "
          "fine-tuning | multiply-adds added per image |")
    print("|---|---|---|---|")
    for row in rows:
        m = (f"{row['macs_added'] / 1e6:.1f}M ({100 * row['macs_added'] / row['base_macs']:.0f}% of the base's "
             f"{row['base_macs'] / 1e6:.1f}M)" if row["macs_added"] else "– (trains the base)")
        print(f"| {row['variant']} | {row['ms_per_image']:.1f} | {row['vs_full_adversarial_fine_tuning']:.2f} | {m} |")
    if a.out:
        a.out.write_text(json.dumps({"rows": rows, "images": a.images, "rounds": a.rounds, "threads":
                                     torch.get_num_threads(), "torch": torch.__version__,
                                     "torchvision": torchvision.__version__,
                                     "machine": platform.processor() or platform.machine()}, indent=2) + "\n")


if __name__ == "__main__":
    main()
