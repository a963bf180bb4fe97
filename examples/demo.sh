#!/usr/bin/env bash
# The built-in example: the Fashion-MNIST base (shipped, trained by examples/train_base.py), patched with harden's
# default recipe on the shipped subset of its training set, then evaluated white-box and with BPDA through its
# pre-filter on shipped test images. Reports land in examples/$OUT/. Time and figures measured: bench/RESULTS.md ("The ordinary path").
set -euo pipefail
cd "$(dirname "$0")"
HARDEN=${HARDEN:-harden}
OUT=${OUT:-out}
TRAIN=${TRAIN:-data/fashion-mnist-train-2000.npz}
TEST=${TEST:-data/fashion-mnist-test-1000.npz}
SAMPLES=${SAMPLES:-250}
# Training in bfloat16 autocast (the patch weights stay fp32) is the same recipe in 0.6x the time on CPUs with native
# bf16 (AVX512-BF16 or AMX; measured in bench/RESULTS.md, "The ordinary path"); elsewhere bf16 runs emulated and may be
# slower (not measured), so the demo trains in fp32 there. Evaluation is always fp32.
if [ -z "${PRECISION:-}" ]; then
  PRECISION=fp32
  grep -qE '\b(avx512_bf16|amx_bf16)\b' /proc/cpuinfo 2>/dev/null && PRECISION=bf16
fi
mkdir -p "$OUT"

set -x
"$HARDEN" layers fmnist_base.safetensors --input-shape 1,28,28 > "$OUT/sites.txt"
# What a user types: the checkpoint and the labelled subset they have (harden.toml here gives arch, mean/std, eps).
"$HARDEN" patch fmnist_base.safetensors --data "$TRAIN" --precision "$PRECISION" \
  --out "$OUT/fmnist.hardened.safetensors" --force --report "$OUT/patch-report.json"
# The verdict on test images the base never saw: white-box APGD-CE + APGD-DLR (100 steps each) on the patched
# model itself, then the same attacks with the pre-filter as the identity in the backward pass (BPDA) on what they
# left; base and patched side by side.
"$HARDEN" eval "$OUT/fmnist.hardened.safetensors" --data "$TEST" --max-samples "$SAMPLES" \
  --attack apgd-ce,apgd-dlr --threat whitebox,adaptive --force --report "$OUT/eval-report.md" \
  --report "$OUT/eval-report.html" --json > "$OUT/eval-report.json"
set +x
python3 - "$OUT/eval-report.json" "$OUT/fmnist.hardened.safetensors" "$TEST" <<'PY' >&2 || true
import json, sys
r = json.load(open(sys.argv[1]))
def a(m, k):
    v = r["models"][m]
    x = v["clean"] if k == "clean" else v["threats"].get(k, {}).get("robust")
    return f"{100 * x['accuracy']:.1f}%" if x else "-"
print(f"{r['data']['n']} test images, eps {r['eps']:g}: clean base {a('base', 'clean')} / patched {a('patched', 'clean')}; "
      f"white-box base {a('base', 'whitebox')} / patched {a('patched', 'whitebox')}; "
      f"after BPDA through the pre-filter too {100 * r['summary']['robust']:.1f}%")
# Clean accuracy costs one forward pass: measured on every shipped test image too, with the library API.
try:
    import torch, hardener
except ImportError:  # a python3 without harden's venv
    sys.exit(0)
m = hardener.load(sys.argv[2], arch="fmnist_model.py:resnet9_small").eval()
ds = hardener.as_dataset(sys.argv[3])
x = hardener.data.to_float(ds.images)
with torch.no_grad():
    patched = (m(x).argmax(1) == ds.labels).float().mean().item()
    with m.patches_disabled():
        base = (m(x).argmax(1) == ds.labels).float().mean().item()
print(f"clean on all {len(ds.labels):,} shipped test images: base {100 * base:.1f}% / patched {100 * patched:.1f}% "
      f"({100 * (patched - base):+.1f} points)")
PY
echo "reports in examples/$OUT/: patch-report.json, eval-report.{json,md,html}" >&2
