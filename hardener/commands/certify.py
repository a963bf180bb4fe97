"""`harden certify`: certified L2 radii of the smoothed model (randomized smoothing), per sample and summarised."""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from .. import certify as C, data as hdata, report as R, validate as V
from ..checkpoint import atomic_write, sha256_file
from ..console import ProgressView, err_console, out
from ..errors import InputError, Interrupted, UsageError
from ..resume import EvalStore, fingerprint, sigterm_as_interrupt
from ..session import finish_spec, load_data, load_model, pick_device
from ..version import __version__
from . import Call, data_options, model_arg, model_options


def run(call: Call) -> None:
    kw = call.params
    model = model_arg(kw["model"])
    if not kw["data"]:
        raise UsageError("missing --data (labelled images to certify)")
    tsv_path, report_path = kw["tsv_path"], kw["report_path"]
    call.check_run([("--tsv", tsv_path), ("--report", report_path)], kw["force"])
    if report_path and Path(report_path).suffix.lower() not in (".json", ".md"):
        raise InputError(f"--report '{report_path}': certify writes .json or .md reports")
    sigma, alpha, n_samples = kw["sigma"], kw["alpha"], kw["n_samples"]
    if kw["max_radius"] is not None and not kw["sequential"]:
        raise UsageError("--max-radius needs --sequential (fixed-n CERTIFY draws --n copies whatever the radius)")
    cfg = C.SmoothingConfig(sigma=sigma, n0=kw["n0"], n=n_samples, alpha=alpha, batch_size=kw["batch_size"],
                            seed=kw["seed"], sequential=kw["sequential"], max_radius=kw["max_radius"])
    device = pick_device(kw["device"])
    loaded = load_model(model, model_options(kw))
    ds = load_data(loaded, kw["data"], data_options(kw))
    finish_spec(loaded, ds, device)
    if kw["max_samples"] and kw["max_samples"] < len(ds):
        ds = ds.take(hdata.stratified_split(ds.labels, kw["max_samples"], kw["seed"])[0])
    model_sha = sha256_file(Path(model))
    res, store = _certify(loaded, ds, cfg, device, model_sha, kw)
    s = res.summary()
    rep = {"schema": "harden.certify-report/1", "harden_version": __version__, "checkpoint": model,
           "checkpoint_sha256": model_sha, "data": R.data_record(ds, []),
           "threat_model": f"certified: L2 radius of the smoothed model (σ = {sigma:g}), with probability "
                           f"{1 - alpha:g} over the noise", "summary": s, "rows": res.rows,
           "environment": R.environment(str(device), kw["seed"], kw["deterministic"])}
    d = s["draws_per_sample"]
    err_console.print(f"{s['n']} samples, σ {sigma:g}, {_method_line(s)}, α {alpha:g}: smoothed clean "
                      f"{100 * s['clean_accuracy_smoothed']:.1f}%, abstained {100 * s['abstention_rate']:.1f}%; "
                      "certified at radius " + ", ".join(f"{r}: {100 * v:.1f}%"
                                                         for r, v in s["certified_accuracy"].items())
                      + f" (largest radius N allows: {s['max_certifiable_radius']:g}); noisy forwards per sample: "
                      f"mean {d['mean']:,.0f}, median {d['median']:,}, max {d['max']:,}")
    if tsv_path:
        atomic_write(Path(tsv_path), lambda tmp: Path(tmp).write_text(res.to_tsv()))
    if report_path:
        as_md = Path(report_path).suffix.lower() == ".md"
        text = to_markdown(rep) if as_md else json.dumps(rep, indent=2, sort_keys=True)
        atomic_write(Path(report_path), lambda tmp: Path(tmp).write_text(text))
    store.clear()
    if kw["as_json"]:
        out(json.dumps(rep, indent=2, sort_keys=True))


def _certify(loaded, ds: hdata.Dataset, cfg: C.SmoothingConfig, device, model_sha: str,
             kw: dict) -> tuple[C.CertifyResult, EvalStore]:
    """The certification, one row per sample kept in a resumable state (beside --report or --tsv, or --state-dir)."""
    fp = fingerprint({"model": model_sha, "data": ds.fingerprint(), "certify": asdict(cfg), "device": device.type})
    folder = V.eval_state_dir(kw["state_dir"], [p for p in (kw["report_path"], kw["tsv_path"]) if p])
    state = folder / f".harden-certify-{fp[:16]}.partial" if folder is not None else None
    store = EvalStore(state, fp, kw["resume"])
    rows = list((store.get("rows") or {}).get("rows", []))
    if rows and not kw["quiet"]:
        err_console.print(f"resuming: {len(rows)} of {len(ds)} samples already certified", highlight=False)

    def keep(row: dict) -> None:
        rows.append(row)
        store.put("rows", {"rows": list(rows)})
    try:
        with ProgressView(kw["quiet"]) as progress, sigterm_as_interrupt():
            res = C.certify(loaded.patched, hdata.to_float(ds.images), ds.labels, cfg, loaded.spec.num_classes,
                            device, progress, done=list(rows), on_row=keep)
    except KeyboardInterrupt:
        store.flush()
        if state is None:
            raise Interrupted("interrupted; no progress saved (pass --state-dir DIR, --report or --tsv to make a "
                              "certification resumable)") from None
        raise Interrupted(f"interrupted: {len(rows)} samples saved to '{state}'; rerun the same command with "
                          "--resume") from None
    return res, store


def _method_line(s: dict) -> str:
    if s.get("method") == "sequential":
        return f"sequential CERTIFY up to radius {s['max_radius']:g} (cap N {s['N']:,})"
    return f"N {s['N']:,}"


def to_markdown(rep: dict) -> str:
    s = rep["summary"]
    d = s["draws_per_sample"]
    lines = ["## harden certify report", "", f"Model `{Path(rep['checkpoint']).name}` (sha256 "
             f"`{rep['checkpoint_sha256'][:16]}…`), data `{rep['data']['source']}` ({s['n']} samples).", "",
             f"Threat model: {rep['threat_model']}. {_method_line(s)}, n0 {s['n0']}, α {s['alpha']}, seed "
             f"{s['seed']}; bound: {s['bound']}; largest certifiable radius with "
             f"this N: {s['max_certifiable_radius']}.", "",
             f"Noisy forwards per sample (selection included): mean {d['mean']}, median {d['median']}, "
             f"max {d['max']}.", "",
             f"Smoothed clean accuracy {100 * s['clean_accuracy_smoothed']:.1f}%, abstention "
             f"{100 * s['abstention_rate']:.1f}%.", "", "| radius | certified accuracy |", "|---|---|"]
    lines += [f"| {r} | {100 * v:.1f}% |" for r, v in s["certified_accuracy"].items()]
    return "\n".join(lines) + "\n"
