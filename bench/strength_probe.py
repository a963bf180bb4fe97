"""Does lowering a patch's strength trade robustness for clean accuracy smoothly? (issue 14's clean-accuracy gap)

    OMP_NUM_THREADS=1 python bench/strength_probe.py PATCHED.safetensors [N] [STRENGTHS]
    # as run: bench/results/verdict/default-10pct.safetensors 300 1.0,0.8,0.6,0.4

`set_strength(s)` scales every patch's residual (s = 0 is the base exactly). N seeded random images of
fashion-mnist:train (seed 123; some of them may be among the patch's training images: a shape probe, not a verdict),
clean accuracy and white-box APGD-CE (20 steps, eps 0.1) at each strength. Output: results/strength_probe.txt.
"""
import sys
import time

import torch

import hardener
from hardener import attacks as A

torch.manual_seed(0)
torch.set_num_threads(1)
m = hardener.load(sys.argv[1], arch="examples/fmnist_model.py:resnet9_small").eval()
ds = hardener.as_dataset("fashion-mnist:train")
g = torch.Generator().manual_seed(123)
idx = torch.randperm(len(ds), generator=g)[:int(sys.argv[2]) if len(sys.argv) > 2 else 300]
x, y = ds.batch(idx)
for s in [float(v) for v in (sys.argv[3] if len(sys.argv) > 3 else "1.0,0.8,0.6,0.4").split(",")]:
    m.set_strength(s)
    t = time.time()
    with torch.no_grad():
        clean = (m(x).argmax(1) == y).float().mean().item()
    adv = A.build(m, A.AttackSpec("apgd-ce", eps=0.1, steps=20))(x, y)
    with torch.no_grad():
        rob = (m(adv).argmax(1) == y).float().mean().item()
    print(f"strength {s}: clean {100 * clean:.1f} apgd-ce-20 {100 * rob:.1f} ({time.time() - t:.0f}s)", flush=True)
