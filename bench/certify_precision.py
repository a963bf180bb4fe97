"""Issue 32, throughput of the noisy forwards: which batch size is fastest per noisy copy on this machine, and whether
a bf16 forward keeps the top-class counts of fp32 identical (the condition for using it in certification).

    python bench/certify_precision.py MODEL [--mean M --std S] [--images 20] [--draws 2000] [--sigma 0.25] --out J

Same process, one thread (OMP_NUM_THREADS), the example architecture; each batch size is timed on the same noise,
median of 5 repeats; counts compare fp32 with bf16 autocast over the same noise, image by image."""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import hardener  # noqa: E402
from hardener import data as hdata  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--mean"), ap.add_argument("--std")
    ap.add_argument("--images", type=int, default=20)
    ap.add_argument("--draws", type=int, default=2000)
    ap.add_argument("--sigma", type=float, default=0.25)
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    model = hardener.load(a.model, arch=f"{ROOT / 'examples' / 'fmnist_model.py'}:resnet9_small", mean=a.mean,
                          std=a.std).eval()
    ds = hardener.as_dataset("fashion-mnist:test")
    x = hdata.to_float(ds.images[: a.images])
    g = torch.Generator().manual_seed(0)
    noisy = x[0].unsqueeze(0) + a.sigma * torch.randn((1000, *x.shape[1:]), generator=g)
    speed = {}
    with torch.no_grad():
        for b in (50, 100, 200, 400, 1000):
            times = []
            for _ in range(5):
                t0 = time.perf_counter()
                for i in range(0, 1000, b):
                    model(noisy[i:i + b])
                times.append((time.perf_counter() - t0) / 1000)
            speed[b] = statistics.median(times) * 1e3
        same, diff, flips, t32, t16 = 0, 0, 0, 0.0, 0.0
        for i in range(a.images):
            noise = a.sigma * torch.randn((a.draws, *x.shape[1:]), generator=g)
            t0 = time.perf_counter()
            p32 = model(x[i] + noise).argmax(1)
            t1 = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                p16 = model(x[i] + noise).argmax(1)
            t16 += time.perf_counter() - t1
            t32 += t1 - t0
            c32, c16 = torch.bincount(p32, minlength=10), torch.bincount(p16, minlength=10)
            top = int(c32.argmax())
            same += int(c32[top] == c16[top])
            diff += int(c32[top] != c16[top])
            flips += int((p32 != p16).sum())
    rep = {"model": a.model, "threads": torch.get_num_threads(), "sigma": a.sigma,
           "ms_per_noisy_forward_by_batch": speed, "images": a.images, "draws_per_image": a.draws,
           "bf16_top_class_count_identical": same, "bf16_top_class_count_different": diff,
           "bf16_flipped_predictions": flips, "fp32_ms_per_forward": 1e3 * t32 / (a.images * a.draws),
           "bf16_ms_per_forward": 1e3 * t16 / (a.images * a.draws)}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(rep, indent=1))
    print(json.dumps(rep, indent=1))


if __name__ == "__main__":
    main()
