"""`harden predict`: classes for inputs, from the model as it is, the smoothed model (--smooth), or inference-time
post-training (--adaptive); the checkpoint is never modified."""
from __future__ import annotations

import json

import torch

from ... import data as hdata
from ...certification.smoothing import ABSTAIN, Smoothed, SmoothingConfig
from ...errors import InputError, UsageError
from ...evaluation import threats as E
from ...io.session import (
    Loaded,
    finish_spec,
    load_data,
    load_model,
    pick_device,
    set_deterministic,
)
from ...runtime.console import ProgressView, err_console, out
from . import Call, adaptive, data_options, model_arg, model_options


def run(call: Call) -> None:
    kw = call.params
    model = model_arg(kw["model"])
    call.check_run([], False)
    if not kw["data"]:
        raise UsageError("missing --data (the inputs to classify)")
    torch.manual_seed(kw["seed"])
    set_deterministic(kw["deterministic"])
    device = pick_device(kw["device"])
    loaded = load_model(model, model_options(kw))
    ds = load_data(loaded, kw["data"], data_options(kw), labels_required=False)
    finish_spec(loaded, ds, device)
    if kw["max_samples"]:
        ds = ds.take(torch.arange(min(kw["max_samples"], len(ds))))
    rows = _predictions(loaded, hdata.to_float(ds.images), kw, device)
    _render(rows, ds, loaded.spec.classes, kw)


def _predictions(loaded: Loaded, x: torch.Tensor, kw: dict, device: torch.device) -> list[dict]:
    if kw["smooth_sigma"] is not None:
        if kw["adaptive"]:
            raise InputError("--smooth and --adaptive are two different predictors: give one")
        sm = Smoothed(loaded.patched, loaded.spec.num_classes,
                      SmoothingConfig(sigma=kw["smooth_sigma"], n=kw["smooth_n"], alpha=kw["smooth_alpha"],
                                      seed=kw["seed"]), device)
        rows = []
        for i in range(len(x)):
            c = sm.predict(x[i], i)
            rows.append({"index": i, "prediction": c, "confidence": None, "abstained": c == ABSTAIN})
        return rows
    if kw["adaptive"]:
        pred = adaptive.predictor(loaded, kw, device, kw["adaptive_eps"])
        with ProgressView(kw["quiet"] or kw["as_json"]) as progress:
            return pred.predict(x, progress)
    with torch.no_grad():
        probs = torch.cat([torch.softmax(E.finite_logits(loaded.patched(x[i:i + 256].to(device))), 1).cpu()
                           for i in range(0, len(x), 256)])
    return [{"index": i, "prediction": int(p.argmax()), "confidence": float(p.max())} for i, p in enumerate(probs)]


def _render(rows: list[dict], ds: hdata.Dataset, names: list[str] | None, kw: dict) -> None:
    """One line (or JSON object) per input on stdout; the accuracy on stderr when every input has a label."""
    labelled = bool((ds.labels != hdata.UNLABELLED).all())
    for r in rows:
        if r.get("abstained"):
            r["class"], r["confidence"] = "abstain", None
        elif names:
            r["class"] = names[r["prediction"]]
        if labelled:
            r["label"] = int(ds.labels[r["index"]])
        conf = "" if r["confidence"] is None else f"{r['confidence']:.4f}"
        out(json.dumps(r, sort_keys=True) if kw["as_json"]
            else f"{r['index']}\t{r.get('class', r['prediction'])}\t{conf}")
    if labelled and not kw["quiet"]:
        hits = sum(r["prediction"] == r["label"] for r in rows)
        extra = (f"; post-trained {sum(r['post_trained'] for r in rows)} of {len(rows)} inputs, "
                 f"{sum(r['seconds'] for r in rows) / max(1, len(rows)):.2f} s per input") if kw["adaptive"] else ""
        err_console.print(f"accuracy {hits}/{len(rows)} = {hits / max(1, len(rows)):.4f}{extra}")
