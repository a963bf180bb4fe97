"""Discover named layers: output shapes, call counts, parameter counts, valid patch sites."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from .errors import InputError
from .model import Classifier
from .patches.sites import suggest_sites  # noqa: F401  (moved there: site parsing and suggestion in one module)


@dataclass
class LayerInfo:
    name: str
    type: str
    params: int
    calls: int
    shape: list[int] | None  # output shape without the batch dimension
    site: bool
    reason: str  # why it is (not) a fixer site
    nonnegative: bool | None = None

    def to_json(self) -> dict:
        return asdict(self)


def probe(model: Classifier, x: torch.Tensor) -> list[LayerInfo]:
    """One forward on `x` with a hook on every named module of model.net."""
    calls: dict[str, int] = {}
    shapes: dict[str, list[int] | None] = {}
    nonneg: dict[str, bool] = {}
    handles = []
    named = [(n, m) for n, m in model.net.named_modules() if n]

    def make(name: str):
        def hook(_m, _i, out):
            calls[name] = calls.get(name, 0) + 1
            if isinstance(out, torch.Tensor):
                shapes[name] = list(out.shape[1:])
                nonneg[name] = nonneg.get(name, True) and bool((out >= 0).all())
            else:
                shapes[name] = None
        return hook

    for name, m in named:
        handles.append(m.register_forward_hook(make(name)))
    try:
        with torch.no_grad():
            model(x)
    except InputError:
        raise
    except Exception as e:  # noqa: BLE001 - any failure of the user's forward is an input mismatch
        raise InputError(f"the model fails on input of shape {tuple(x.shape[1:])}: {type(e).__name__}: "
                         f"{str(e).splitlines()[0]} (check --input-shape, --resize or the data)") from None
    finally:
        for h in handles:
            h.remove()
    infos = []
    for name, m in named:
        n_calls = calls.get(name, 0)
        shape = shapes.get(name)
        if n_calls == 0:
            ok, why = False, "not called"
        elif n_calls > 1:
            ok, why = False, f"called {n_calls}x per forward (shared module)"
        elif shape is None:
            ok, why = False, "output is not a tensor"
        elif len(shape) != 3:
            ok, why = False, f"{len(shape) + 1}-D output, not a feature map"
        else:
            ok, why = True, ""
        infos.append(LayerInfo(name, type(m).__name__, sum(p.numel() for p in m.parameters()),
                               n_calls, shape, ok, why, nonneg.get(name)))
    return infos

