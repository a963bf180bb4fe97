#!/usr/bin/env bash
# Compatibility bench (issue 21, item 4): layers -> patch -> eval -> export (torch.export and ONNX) on torchvision's
# resnet18, mobilenet_v3_small, efficientnet_b0, convnext_tiny, densenet121, vit_b_16 and timm's resnet18,
# efficientnet_b0, convnext_atto, vit_tiny_patch16_224, and issue 34's googlenet, swin_t, MaxVit, regnet_y_400mf,
# shufflenet_v2_x0_5, timm levit_128s, Swin, MaxViT, DeiT distilled, mobilevit_xxs and Hugging Face ViT, DeiT, Swin,
# ConvNext, ResNet (saved with save_pretrained, run through the README's folder route), random-init (10 classes) at
# 32x32 RGB (MaxVit 64x64), one CPU thread.
# It runs in its own venv (torch 2.14.1, torchvision 0.29.1, timm, transformers, onnx, onnxruntime; the project's
# .venv is left alone and needs no torchvision). The work is bench/compat.py's; results in bench/results/compat/
# (table.md, one JSON per model, logs/, reports/). Re-runnable: models with a results file are skipped (pass --force
# to redo).
# Usage: bench/compat.sh [run|table] [--models tv_resnet18,timm_vit_tiny_patch16_224] [--recipes robust] [--force]
#   COMPAT_VENV (default /work/venv-compat, else $ROOT/.venv-compat), COMPAT_TORCH (default 2.14.1),
#   COMPAT_TORCHVISION (default 0.29.1).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
VENV=${COMPAT_VENV:-$( [ -d /work ] && echo /work/venv-compat || echo "$ROOT/.venv-compat")}
TORCH=${COMPAT_TORCH:-2.14.1}
TORCHVISION=${COMPAT_TORCHVISION:-0.29.1}
PY=$VENV/bin/python

if ! "$PY" -c "import torch, torchvision, timm, transformers, onnx, onnxruntime, torchattacks, hardener" \
    2>/dev/null; then
  echo "setting up $VENV (torch $TORCH, torchvision $TORCHVISION, timm, transformers, onnx, onnxruntime)" >&2
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q "torch==$TORCH" "torchvision==$TORCHVISION"
  "$VENV/bin/pip" install -q timm transformers onnx onnxruntime safetensors "click>=8.1" "rich>=13" "jsonschema>=4.18" \
    "numpy>=1.24" "pillow>=9" "scipy>=1.10"
  "$VENV/bin/pip" install -q --no-deps "torchattacks>=3.5"   # its requirements pin what it does not need
  "$VENV/bin/pip" install -q --no-deps -e "$ROOT"
fi
# harden must be this checkout's (an editable install of another worktree would test other code)
"$PY" - "$ROOT" <<'PY'
import sys, pathlib, hardener
want = pathlib.Path(sys.argv[1]).resolve() / "hardener"
got = pathlib.Path(hardener.__file__).resolve().parent
if got != want:
    sys.exit(f"the venv's hardener is {got}, not {want}: pip install --no-deps -e {want.parent}")
PY

cmd=${1:-run}
[ $# -gt 0 ] && shift
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
exec nice -n 10 "$PY" "$ROOT/bench/compat.py" "$cmd" "$@"
