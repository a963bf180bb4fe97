"""Time harden's APGD-CE evaluation against calling torchattacks directly (same model, samples, budget).

    python bench/eval_speed.py [--samples 1000] [--steps 100] [--out bench/eval_speed.json]

Both sides attack the shipped Fashion-MNIST example base (eps 0.1, Linf) on the same seeded
stratified test samples. "raw" is what a user would write: torchattacks.APGD over all samples in
batches, then one scoring pass. "harden" is `evaluation.threats.run_chain` (only clean-correct samples are
attacked, every returned example is checked against eps, RNG isolated).
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

import torchattacks  # noqa: E402

from hardener import attacks as A  # noqa: E402
from hardener import data as hdata  # noqa: E402
from hardener.evaluation import threats as E  # noqa: E402
from hardener.io.checkpoint import load_base  # noqa: E402
from hardener.model.classifier import Classifier, InputSpec  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=1000)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--data", default="fashion-mnist:test")
    ap.add_argument("--out", default=str(ROOT / "bench/eval_speed.json"))
    args = ap.parse_args()

    torch.manual_seed(0)
    base = load_base(ROOT / "examples/fmnist_base.safetensors", f"{ROOT / 'examples/fmnist_model.py'}:resnet9_small")
    model = Classifier(base.net, InputSpec(shape=[1, 28, 28], mean=[0.2860], std=[0.3530])).eval()
    ds = hdata.load(args.data)
    idx, _ = hdata.stratified_split(ds.labels, args.samples, seed=0)
    x, y = hdata.to_float(ds.images[idx]), ds.labels[idx]
    eps = 0.1

    t0 = time.perf_counter()
    atk = torchattacks.APGD(model, norm="Linf", eps=eps, steps=args.steps, n_restarts=1, seed=0, loss="ce")
    raw_correct = 0
    for i in range(0, len(y), args.batch_size):
        adv = atk(x[i:i + args.batch_size], y[i:i + args.batch_size])
        with torch.no_grad():
            raw_correct += int((model(adv).argmax(1) == y[i:i + args.batch_size]).sum())
    raw_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    cfg = E.EvalConfig(attacks=["apgd-ce"], eps=eps, steps=args.steps, batch_size=args.batch_size, checks=False)
    clean = E.predict(model, x, args.batch_size, torch.device("cpu")).argmax(1) == y
    spec = A.AttackSpec("apgd-ce", eps=eps, steps=args.steps, n_classes=10)
    chain = E.run_chain("whitebox", model, model, x, y, clean, [spec], cfg, torch.device("cpu"))
    ours_s = time.perf_counter() - t0

    result = {
        "samples": len(y), "attack": "apgd-ce", "eps": eps, "steps": args.steps, "batch_size": args.batch_size,
        "raw_torchattacks": {"seconds": raw_s, "images_per_s": len(y) / raw_s, "robust_accuracy": raw_correct / len(y)},
        "harden": {"seconds": ours_s, "images_per_s": len(y) / ours_s,
                   "robust_accuracy": float(chain.robust.float().mean())},
        "speedup": raw_s / ours_s,
        "machine": {"cpu_threads": torch.get_num_threads(), "platform": platform.platform(),
                    "torch": torch.__version__, "torchattacks": torchattacks.__version__},
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
