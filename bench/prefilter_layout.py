"""The pre-filter's memory layout on the CPU (issue 30): its hidden layers channels-last (NHWC, today's code) against
the base's own NCHW, side by side in one process, as latency against the base at batch 1 and 256.

    OMP_NUM_THREADS=1 python bench/prefilter_layout.py --json results/light/prefilter_layout.json > layout.md

For each architecture of `examples/fmnist_model.py` it builds the heavy default (`--preset robust`) and
`--preset light` patches, the latter also with the separable pre-filter design (one epoch on 64 random images: latency does not depend on the weights, so the bases are
random too), then times the base, the patched model with `Prefilter.channels_last` off and on, interleaved, one
forward each per round, and reports medians over the rounds. Run it on a quiet machine."""
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
sys.path.insert(0, str(ROOT / "examples"))
import fmnist_model  # noqa: E402

import hardener  # noqa: E402
from hardener.patches.prefilter import Prefilter  # noqa: E402

ARCHS = ("resnet9_small", "vgg_silu_small", "vit_small")
RECIPES = {"heavy default": {"recipe": "robust"}, "--preset light": {"recipe": "light"},
           "--preset light --prefilter-design separable": {"recipe": "light", "prefilter_design": "separable"}}


def shapes(arch: str, recipe: dict) -> hardener.PatchedModel:
    torch.manual_seed(0)
    base = getattr(fmnist_model, arch)()
    data = (torch.rand(64, 1, 28, 28), torch.arange(64) % 10)
    return hardener.patch(base, data, **recipe, mean=0.286, std=0.353, epochs=1, progress=False,
                          allow_low_accuracy=True).eval()


def timings(model, batch: int, rounds: int) -> dict:
    x = torch.rand(batch, *model.model.spec.shape)
    modes = {"base": None, "nchw": False, "channels_last": True}
    times: dict[str, list[float]] = {k: [] for k in modes}

    def forward(mode):
        if modes[mode] is None:
            with model.patches_disabled():
                return model(x)
        Prefilter.channels_last = modes[mode]
        return model(x)

    try:
        with torch.no_grad():
            for k in modes:  # warm-up
                forward(k)
            for _ in range(rounds):
                for k in modes:
                    t = time.perf_counter()
                    forward(k)
                    times[k].append(time.perf_counter() - t)
    finally:
        Prefilter.channels_last = True
    ms = {k: 1e3 * statistics.median(v) for k, v in times.items()}
    return {"base_ms": round(ms["base"], 3), "nchw_ms": round(ms["nchw"], 3),
            "channels_last_ms": round(ms["channels_last"], 3),
            "ratio_nchw": round(ms["nchw"] / ms["base"], 3),
            "ratio_channels_last": round(ms["channels_last"] / ms["base"], 3), "rounds": rounds}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", type=Path)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 256])
    ap.add_argument("--rounds", type=int, nargs="+", default=[200, 11], help="rounds at each batch")
    ap.add_argument("--archs", nargs="+", default=list(ARCHS))
    ap.add_argument("--recipes", nargs="+", default=list(RECIPES), help="names of RECIPES")
    a = ap.parse_args()
    rows = []
    for arch in a.archs:
        for name in a.recipes:
            recipe = RECIPES[name]
            model = shapes(arch, recipe)
            row = {"arch": arch, "recipe": name, "macs_ratio": round(model.cost.macs_ratio, 3),
                   "batches": {b: timings(model, b, r) for b, r in zip(a.batches, a.rounds)}}
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    rounds = ", ".join(f"batch {b}: {r}" for b, r in zip(a.batches, a.rounds))
    print(f"One process, {torch.get_num_threads()} thread(s), torch {torch.__version__}; latency / the base's, medians "
          f"of interleaved rounds ({rounds}).\n")
    print("| arch | patch | MACs | " + " | ".join(f"batch {b}: NCHW → channels-last" for b in a.batches) + " |")
    print("|---|---|---|" + "---|" * len(a.batches))
    for r in rows:
        print(f"| {r['arch']} | {r['recipe']} | {r['macs_ratio']:.2f}x | " + " | ".join(
            f"{t['ratio_nchw']:.2f} → {t['ratio_channels_last']:.2f}" for t in r["batches"].values()) + " |")
    if a.json:
        a.json.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
