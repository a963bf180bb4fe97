"""`harden export`: a patched checkpoint as a file that runs without harden ([0, 1] inputs): TorchScript, a
torch.export program or ONNX, checked in a fresh interpreter against the patched model's logits."""
from __future__ import annotations

from pathlib import Path

from ...errors import InputError
from ...io import export as X
from ...io.session import load_model
from ...runtime.console import err_console, out
from ..signals import outputs_or_none
from . import Call, model_arg, model_options


def run(call: Call) -> None:
    kw = call.params
    model = model_arg(kw["model"])
    target = Path(kw["out_path"]) if kw["out_path"] else X.default_path(model, kw["fmt"])
    call.check_run([("--out", target)], kw["force"])
    loaded = load_model(model, model_options(kw))
    if loaded.manifest is None:
        raise InputError(f"'{model}' is not a harden-patched checkpoint")
    shape = loaded.spec.shape
    if not shape:
        raise InputError("the checkpoint records no input shape")
    with outputs_or_none(lambda: "interrupted: the export was not finished and checked, nothing was written") as done:
        done.append(target)  # before the write: an interrupt just as the file lands removes it too
        X.export(loaded.patched, shape, kw["fmt"], target)
        if not kw["no_check"]:
            diff = X.check_in_fresh_interpreter(target, kw["fmt"], loaded.patched, shape)
            if not kw["quiet"]:
                err_console.print(f"checked in a fresh interpreter: largest logit difference {diff:.2g}",
                                  highlight=False)
    out(str(target))
