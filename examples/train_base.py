"""Train the example base model on Fashion-MNIST and save it as .safetensors.

    python examples/train_base.py --epochs 4 --out examples/fmnist_base.safetensors
    python examples/train_base.py --model vgg_silu_small --epochs 4 --out examples/fmnist_vgg_silu.safetensors

Plain clean training (SGD + OneCycle, as the fixer paper's base); no adversarial examples.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fmnist_model  # noqa: E402

from hardener import data as hdata  # noqa: E402

MEAN, STD = 0.2860, 0.3530  # Fashion-MNIST training-set statistics, pixels in [0, 1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data", default="fashion-mnist:train")
    ap.add_argument("--out", default="examples/fmnist_base.safetensors")
    ap.add_argument("--model", default="resnet9_small", choices=["resnet9_small", "vgg_silu_small", "vit_small"],
                    help="a constructor of examples/fmnist_model.py")
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    ds = hdata.load(args.data)
    model = getattr(fmnist_model, args.model)()
    steps = args.epochs * ((len(ds) + args.batch_size - 1) // args.batch_size)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=steps)
    g = torch.Generator().manual_seed(args.seed)
    for epoch in range(args.epochs):
        model.train()
        perm = torch.randperm(len(ds), generator=g)
        t0, total, correct = time.time(), 0.0, 0
        for i in range(0, len(ds), args.batch_size):
            x, y = ds.batch(perm[i:i + args.batch_size])
            x = hdata.augment(x, g, pad=2, hflip=True)
            out = model((x - MEAN) / STD)
            loss = F.cross_entropy(out, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(y)
            correct += int((out.argmax(1) == y).sum())
        print(f"epoch {epoch + 1}/{args.epochs}: loss {total / len(ds):.4f} "
              f"train acc {correct / len(ds):.4f} ({time.time() - t0:.0f}s)", file=sys.stderr)
    model.eval()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, args.out,
              metadata={"arch": f"examples/fmnist_model.py:{args.model}", "mean": str(MEAN), "std": str(STD)})
    print(f"saved {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
