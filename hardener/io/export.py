"""Export a patched model so that it runs without harden, on [0, 1] pixels, and check it in a fresh interpreter.

Formats: `torchscript` (torch.jit.trace; `torch.jit.load`), `export` (a `torch.export` program with a dynamic batch
dimension; `torch.export.load(f).module()`), `onnx` (torch.onnx.export, opset 17, dynamic batch; needs the `onnx`
package, and `onnxruntime` to be checked). Every export is checked by loading the file in a new Python process and
comparing its logits with the patched model's on the same inputs.
"""
from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

from ..errors import InputError, RunError
from .checkpoint import write_bytes, write_torch

FORMATS = {"torchscript": ".ts.pt", "export": ".pt2", "onnx": ".onnx"}

_LOADERS = {
    "torchscript": "m = torch.jit.load(path)\ny = m(x)",
    "export": "m = torch.export.load(path).module()\ny = m(x)",
    "onnx": ("import onnxruntime as ort\ns = ort.InferenceSession(path, providers=['CPUExecutionProvider'])\n"
             "y = torch.from_numpy(s.run(None, {s.get_inputs()[0].name: x.numpy()})[0])"),
}


def default_path(model_path: str | Path, fmt: str) -> Path:
    return Path(model_path).with_suffix(FORMATS[fmt])


def _write(target: Path, fmt: str, model: nn.Module, example: torch.Tensor) -> None:
    """Serialized in memory, then written atomically (torch's zip writer aborts the process on a full disk)."""
    import io


    if fmt == "torchscript":
        # without gradients: nn.MultiheadAttention (torchvision's ViT) takes one path on every call, so the trace's
        # own check sees the same graph twice (with trainable patches it switches paths between calls)
        # a forward first: a lora patch merges its weight there once, so that every traced call runs the same graph
        with torch.no_grad():
            model(example)
            traced = torch.jit.trace(model, example, check_trace=True)
        write_torch(target, traced, jit=True)
        return
    buf = io.BytesIO()
    if fmt == "export":
        batch = torch.export.Dim("batch", min=1, max=1 << 16)
        torch.export.save(torch.export.export(model, (example,), dynamic_shapes=({0: batch},)), buf)
    else:
        torch.onnx.export(model, (example,), buf, dynamo=False, opset_version=17, input_names=["pixels"],
                          output_names=["logits"], dynamic_axes={"pixels": {0: "batch"}, "logits": {0: "batch"}})
    write_bytes(target, buf.getvalue())


def export(model: nn.Module, shape: list[int] | tuple[int, ...], fmt: str, target: Path) -> None:
    """Write `model` (eval mode, [0, 1] inputs of `shape` C,H,W) to `target` in format `fmt`."""
    if fmt not in FORMATS:
        raise InputError(f"--format must be one of {', '.join(FORMATS)}, got '{fmt}'")
    if fmt == "onnx":
        try:
            import onnx  # noqa: F401 - torch.onnx.export needs it
        except ImportError:
            raise InputError("--format onnx needs the onnx package: pip install onnx (and onnxruntime to run it)") \
                from None
    model = model.eval()
    example = torch.rand(2, *shape)
    try:
        _write(target, fmt, model, example)
    except RunError:
        raise
    except Exception as e:  # noqa: BLE001 - tracers and exporters fail in many types
        raise RunError(f"exporting as {fmt} failed: {type(e).__name__}: {str(e).strip().splitlines()[0]}") \
            from None


def check_in_fresh_interpreter(target: Path, fmt: str, model: nn.Module, shape, n: int = 3,
                               atol: float = 1e-4) -> float:
    """Load `target` in a new Python process, run it on `n` random inputs and compare with `model`'s logits;
    returns the largest absolute difference (RunError above `atol`, or if loading fails)."""
    if fmt == "onnx":
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            raise InputError("checking an ONNX export needs onnxruntime: pip install onnxruntime (or --no-check)") \
                from None
    x = torch.rand(n, *shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model.eval()(x).float()
    with tempfile.TemporaryDirectory() as d:
        torch.save({"x": x}, Path(d) / "in.pt")
        code = ("import sys, torch\npath = sys.argv[1]\nx = torch.load(sys.argv[2])['x']\n" + _LOADERS[fmt]
                + "\ntorch.save({'y': y.detach().float()}, sys.argv[3])\n")
        # -P: not the working directory on the import path (a stray torch.py there must not run)
        r = subprocess.run([sys.executable, "-P", "-c", code, str(Path(target).resolve()), str(Path(d) / "in.pt"),
                            str(Path(d) / "out.pt")], capture_output=True, text=True, timeout=600, cwd=d)
        if r.returncode != 0:
            last = (r.stderr.strip().splitlines() or ["no output"])[-1]
            raise RunError(f"the exported {fmt} file does not load in a fresh interpreter: {last}")
        got = torch.load(Path(d) / "out.pt")["y"]
    if got.shape != expected.shape:
        raise RunError(f"the exported {fmt} file gives logits of shape {tuple(got.shape)}, the patched model "
                       f"{tuple(expected.shape)}")
    diff = float((got - expected).abs().max())
    if not diff <= atol:  # NaN fails too
        raise RunError(f"the exported {fmt} file gives other logits than the patched model (max difference {diff:.3g})")
    return diff
