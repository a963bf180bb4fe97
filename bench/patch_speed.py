"""Speed of the patch loop with and without the frozen-base caches, against its bound.

    python bench/patch_speed.py [--subset 10%] [--sites layer1,layer2] [--rounds 2] [--out FILE] [--quick]

Transfer training (adversarial examples of the frozen base, no augmentation) of fixers on the
Fashion-MNIST example base. Per round, in the same process and interleaved so that machine load
hits all three alike, it times one epoch of:
  uncached  `fit` with --no-cache (base forward for the targets, full forward+backward every step)
  cached    `fit` with the caches (targets and the first site's output looked up)
  bound     forward+backward of the model *after the first site* alone, for the clean and the
            adversarial batch (what any patch loop must do), with no loss, optimiser or bookkeeping
and reports images/s, taking the fastest round of each. The one-off costs (attacking the base,
filling the caches) are reported apart.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from hardener import attacks as A  # noqa: E402
from hardener import data as hdata  # noqa: E402
from hardener.io.checkpoint import load_base  # noqa: E402
from hardener.model.classifier import Classifier, InputSpec  # noqa: E402
from hardener.patches import Fixer, FixerConfig, PatchedModel  # noqa: E402
from hardener.training import fit as F  # noqa: E402
from hardener.training.cache import FrozenPrefix  # noqa: E402


def build(sites: list[str], shapes: dict) -> PatchedModel:
    torch.manual_seed(0)
    base = load_base(ROOT / "examples/fmnist_base.safetensors", f"{ROOT / 'examples/fmnist_model.py'}:resnet9_small")
    p = PatchedModel(Classifier(base.net, InputSpec(shape=[1, 28, 28], mean=[0.2860], std=[0.3530])))
    for s in sites:
        p.attach(s, Fixer(shapes[s][0], FixerConfig()))
    return p


def site_shapes(sites: list[str]) -> dict:
    p = build([], {})
    out = {}
    hooks = [p.net.get_submodule(s).register_forward_hook(
        lambda _m, _i, o, s=s: out.__setitem__(s, list(o.shape[1:]))) for s in sites]
    with torch.no_grad():
        p(torch.rand(2, 1, 28, 28))
    for h in hooks:
        h.remove()
    return out


def bound_epoch(p: PatchedModel, ds: hdata.Dataset, adv: torch.Tensor, bs: int) -> float:
    """Forward+backward of the suffix after the first site, clean and adversarial batch, one epoch."""
    prefix, why = FrozenPrefix.plan(p, hdata.to_float(ds.images[:8]))
    assert prefix is not None, why
    feeds = []
    for i in range(0, len(ds), bs):
        x = hdata.to_float(ds.images[i:i + bs])
        feeds.append((x, prefix.site_output(x), adv[i:i + bs], prefix.site_output(adv[i:i + bs])))
    params = list(p.patch_parameters())
    for q in params:
        q.requires_grad_(True)
    p.train()
    t0 = time.perf_counter()
    for x, fx, xa, fa in feeds:
        with prefix.feeding(fx):
            a = p(x)
        with prefix.feeding(fa):
            b = p(xa)
        (a.sum() + b.sum()).backward()
    seconds = time.perf_counter() - t0
    p.eval()
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--subset", default="10%")
    ap.add_argument("--sites", default="layer1,layer2")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--quick", action="store_true", help="200 images, 1 round (CI: keeps the script from rotting)")
    ap.add_argument("--out", default=str(ROOT / "bench/results/patch_speed.json"))
    args = ap.parse_args()
    subset = "200" if args.quick else args.subset
    rounds = 1 if args.quick else args.rounds
    sites = args.sites.split(",")
    shapes = site_shapes(sites)
    try:
        full = hdata.load("fashion-mnist:train")
    except Exception:  # noqa: BLE001 - the shipped subset when the Debian package is missing
        if not args.quick:
            raise
        full = hdata.load(str(ROOT / "examples/data/fashion-mnist-train-2000.npz"))
    idx, _ = hdata.stratified_split(full.labels, hdata.parse_subset(subset), seed=0)
    ds = full.take(idx)
    spec = A.AttackSpec("apgd-ce", eps=0.1, steps=10, n_classes=10)
    bs = args.batch_size
    cpu = torch.device("cpu")

    # One-off: the base's adversarial examples (shared by all variants).
    p = build(sites, shapes)
    t0 = time.perf_counter()
    from hardener.patches.attach import Disabled
    adv = F._base_adversarials(Disabled(p), ds, spec, bs, cpu, None)
    attack_s = time.perf_counter() - t0

    times: dict[str, list[float]] = {"uncached": [], "cached": [], "bound": []}
    cache_s = None
    for _ in range(rounds):
        for variant in ("uncached", "cached", "bound"):
            p = build(sites, shapes)
            if variant == "bound":
                times[variant].append(bound_epoch(p, ds, adv, bs))
                continue
            cfg = F.FitConfig(epochs=1, batch_size=bs, cache=variant == "cached")
            orig = F._base_adversarials
            F._base_adversarials = lambda *a, **k: adv  # reuse the one-off attack
            info: dict = {}
            try:
                logs = F.fit(p, ds, spec, cfg, cpu, info=info)
            finally:
                F._base_adversarials = orig
            times[variant].append(logs[0].seconds)
            if variant == "cached":
                cache_s = info.get("cache_seconds")
                note = info.get("cache")
    n = len(ds)
    best = {k: min(v) for k, v in times.items()}
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    result = {
        "what": "one epoch of transfer training of fixers (fixer loss, lambda=mu=1) on the Fashion-MNIST example base",
        "images": n, "sites": sites, "batch_size": bs, "rounds": rounds, "seconds": times,
        "images_per_s": {k: n / v for k, v in best.items()},
        "cached_fraction_of_bound": best["bound"] / best["cached"],
        "uncached_fraction_of_bound": best["bound"] / best["uncached"],
        "speedup_cached_vs_uncached": best["uncached"] / best["cached"],
        "one_off_seconds": {"attack_base_apgd10": attack_s, "fill_caches": cache_s},
        "cache_note": note,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
                    "torch": torch.__version__},
        "commit": commit, "quick": args.quick,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps({k: result[k] for k in ("images_per_s", "cached_fraction_of_bound", "speedup_cached_vs_uncached",
                                              "cache_note")}, indent=2))


if __name__ == "__main__":
    main()
