"""Inference-time post-training (`harden predict --adaptive`) and its evaluation (`harden eval --defense adaptive`)."""
from __future__ import annotations

from pathlib import Path

import torch

from ... import attacks as A
from ... import data as hdata
from ...errors import InputError, UsageError
from ...evaluation.adaptive import AdaptiveConfig, AdaptivePredictor, evaluate_adaptive
from ...io.checkpoint import atomic_write
from ...io.session import Loaded, load_data
from ...reports import report as R
from ...runtime.console import ProgressView, err_console, out
from ...version import __version__
from . import data_options


def predictor(loaded: Loaded, kw: dict, device: torch.device, eps_text: str):
    """The adaptive predictor of the options (--reference-data, --neighbour..., --post-lr) at budget `eps_text`."""
    if not kw["reference_data"]:
        raise UsageError("--adaptive needs --reference-data (labelled training data to post-train on)")
    cfg = AdaptiveConfig(eps=A.parse_eps(eps_text), neighbour=kw["neighbour"], neighbour_steps=kw["neighbour_steps"],
                         iterations=kw["iterations"], batch=kw["post_batch"], post_train=kw["post_train"],
                         adapt=kw["adapt"], lr=kw["post_lr"], seed=kw["seed"])
    ref = load_data(loaded, kw["reference_data"], data_options(kw))
    hdata.check_labels(ref, loaded.spec.num_classes)
    return AdaptivePredictor(loaded.patched, ref, cfg, device)


def evaluate(model: str, loaded: Loaded, ds: hdata.Dataset, names: list[str], kw: dict,
             device: torch.device) -> None:
    """`harden eval --defense adaptive`: clean and robust accuracy of the adaptive predictor on adversarial examples
    of the static model, plus an end-to-end attack; a JSON report."""
    for p in kw["report_paths"]:
        if Path(p).suffix.lower() != ".json":
            raise InputError(f"--defense adaptive writes JSON reports only, not '{p}'")
    pred = predictor(loaded, kw, device, kw["eps"])
    spec = A.AttackSpec(name=names[0], eps=A.parse_eps(kw["eps"]), norm=kw["norm"], steps=kw["steps"],
                        seed=kw["seed"], n_classes=loaded.spec.num_classes)
    x, y = hdata.to_float(ds.images), ds.labels
    with ProgressView(kw["quiet"] or kw["as_json"]) as progress:
        res = evaluate_adaptive(pred, x, y, spec, kw["e2e_samples"], kw["e2e_steps"], progress)
    rep = {"schema": "harden.adaptive-report/1", "harden_version": __version__, "checkpoint": model,
           "patches": loaded.manifest.patches if loaded.manifest else [], "data": R.data_record(ds, []),
           "environment": R.environment(str(device), kw["seed"], kw["deterministic"]), **res}
    _render(res, spec)
    for p in kw["report_paths"]:
        atomic_write(Path(p), lambda tmp: Path(tmp).write_text(R.json_text(rep)))
    if kw["as_json"]:
        out(R.json_text(rep))


def _render(res: dict, spec: A.AttackSpec) -> None:
    from rich.table import Table

    st, ad, e2e = res["static"], res["adaptive_predictor"], res["end_to_end"]
    t = Table(title=f"adaptive post-training: {res['n']} samples, {spec.label} eps={spec.eps:g}")
    for col in ("predictor", "measure", "threat model", "accuracy"):
        t.add_column(col)
    t.add_row("static", "clean", "—", R.pct(st["clean"]))
    t.add_row("static", f"after {spec.label}", "white-box on the static model", R.pct(st["robust_static_whitebox"]))
    t.add_row("adaptive", "clean", "—", R.pct(ad["clean"]))
    t.add_row("adaptive", f"after {spec.label}", "static transfer (paper)", R.pct(ad["robust_static_transfer"]))
    t.add_row("adaptive", "neighbour accuracy", "static transfer", R.pct(ad["neighbour_accuracy_adversarial"]))
    if e2e:
        t.add_row("adaptive", f"after end-to-end PGD-{e2e['steps']}", f"end to end ({e2e['n']} samples)",
                  R.pct(e2e["robust"]))
    err_console.print(t)
    err_console.print(f"{ad['seconds_per_image']:.2f} s per image; post-trained {ad['post_trained_fraction']:.0%} "
                      "of inputs")
