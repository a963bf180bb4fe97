"""Issue 30's second validation set: 2,000 images the example bases never trained on and the verdict never reports.

The light-patch bench chose recipes on held-out images of fashion-mnist:train (`bench/light_fmnist.sh`). The bases
were trained on that split, so clean accuracy there is inflated (the example base: 95.2% on them, 92.3% on test) and
compressed toward the base's. Clean differences of a point or two did not carry to test (bench/RESULTS.md, "Stop 49").
This set comes from fashion-mnist:test instead, disjoint from the verdict's 1,000 images (`harden eval --max-samples
1000`, seed 0: `hardener.data.samples`): 2,000 seeded stratified images (seed 1) of the other 9,000.

    python bench/light_val2k.py OUT.npz      # writes the set (images uint8 N,1,28,28; labels), prints its digest
"""
from __future__ import annotations

import hashlib
import sys

import numpy as np
import torch

from hardener import data as hdata

VERDICT, SIZE, SEED = 1000, 2000, 1


def val2k() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(images, labels, indices into fashion-mnist:test) of the set; no index is one of the verdict's."""
    ds = hdata.load("fashion-mnist:test")
    verdict, rest = hdata.stratified_split(ds.labels, VERDICT, 0)  # what `harden eval --max-samples 1000` covers
    chosen = rest[hdata.stratified_split(ds.labels[rest], SIZE, SEED)[0]]
    assert not set(chosen.tolist()) & set(verdict.tolist())
    return ds.images[chosen], ds.labels[chosen], chosen


def main(out: str) -> None:
    images, labels, idx = val2k()
    np.savez(out, images=images.numpy(), labels=labels.numpy())
    digest = hashlib.sha256(idx.numpy().astype("<i8").tobytes()).hexdigest()[:16]
    print(f"{out}: {len(idx)} images of fashion-mnist:test outside the verdict's {VERDICT}, "
          f"classes {torch.bincount(labels).tolist()}, indices sha256 {digest}")


if __name__ == "__main__":
    main(sys.argv[1])
