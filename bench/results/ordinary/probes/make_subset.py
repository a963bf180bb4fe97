# The training files of probes S, S1 (4,000 images) and U (6,000), as run (paths of the session's scratch folder):
#   python make_subset.py OUT N  ->  the shipped 2,000 (the seed-0 stratified subset: the first 200 per class of
#   stratified_split's per-class order) + the next N/10 - 200 per class of that order, skipping val1000's images
#   (by content hash), so that validation stays outside the training data.
import hashlib
import sys

import numpy as np
import torch

sys.path.insert(0, "/work/snap")
from hardener import data as hdata

ds = hdata.load("fashion-mnist:train")
labels = ds.labels; imgs = ds.images.numpy() if hasattr(ds.images, "numpy") else np.asarray(ds.images)
h = lambda a: hashlib.sha1(np.ascontiguousarray(a).tobytes()).hexdigest()
val = np.load("/work/probe/val1000.npz"); vh = {h(a) for a in val["images"]}
shipped = np.load("/work/main/examples/data/fashion-mnist-train-2000.npz"); sh = {h(a) for a in shipped["images"]}
N = int(sys.argv[2]); EXTRA = N // 10 - 200
g = torch.Generator().manual_seed(0)
chosen = []
for c in torch.unique(labels):
    ix = torch.nonzero(labels == c).flatten()
    perm = ix[torch.randperm(len(ix), generator=g)]
    first = perm[:200].tolist()
    assert all(h(imgs[i]) in sh for i in first), "shipped = first 200 per class"
    more = [i for i in perm[200:].tolist() if h(imgs[i]) not in vh][:EXTRA]
    chosen += first + more
chosen = sorted(chosen)
assert len(chosen) == N and not any(h(imgs[i]) in vh for i in chosen)
np.savez_compressed(sys.argv[1], images=imgs[chosen], labels=labels[chosen].numpy(), classes=shipped["classes"])
print("ok", len(chosen))
