"""`harden certify`: certified L2 radii of the smoothed model (randomized smoothing), per sample and summarised."""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from .. import boundary as B, certify as C, data as hdata, report as R, validate as V
from ..checkpoint import atomic_write, sha256_file
from ..console import ProgressView, err_console, out
from ..errors import InputError, UsageError
from ..resume import EvalStore, fingerprint
from ..signals import outputs_or_none
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
    # a batch of noisy copies of one image (the noise, the noisy input, the model's first activations)
    V.check_batch_memory(min(cfg.batch_size, max(cfg.n0, cfg.n)), loaded.spec.shape, 3)
    if kw["max_samples"] and kw["max_samples"] < len(ds):
        ds = ds.take(hdata.stratified_split(ds.labels, kw["max_samples"], kw["seed"])[0])
    model_sha = sha256_file(Path(model))
    store, rows = _store(ds, cfg, device, model_sha, kw)
    with outputs_or_none(lambda: _stopped(store, rows)) as written:
        res = _certify(loaded, ds, cfg, device, kw, store, rows)
        rep = _report(model, model_sha, ds, cfg, res, device, kw)
        for path, text in ((tsv_path, res.to_tsv), (report_path, lambda: _report_text(rep, report_path))):
            if path:
                content = text()
                written.append(path)  # before the write: an interrupt just as the file lands removes it too
                atomic_write(Path(path), lambda tmp, c=content: Path(tmp).write_text(c))
    store.clear()
    if kw["as_json"]:
        out(json.dumps(rep, indent=2, sort_keys=True))


def _report(model: str, model_sha: str, ds: hdata.Dataset, cfg: C.SmoothingConfig, res: C.CertifyResult, device,
            kw: dict) -> dict:
    """The report, and its summary line on stderr."""
    s = res.summary()
    rep = {"schema": "harden.certify-report/1", "harden_version": __version__, "checkpoint": model,
           "checkpoint_sha256": model_sha, "data": R.data_record(ds, []),
           "threat_model": f"certified: L2 radius of the smoothed model (σ = {cfg.sigma:g}), with probability "
                           f"{1 - cfg.alpha:g} over the noise", "summary": s, "rows": res.rows,
           "environment": R.environment(str(device), kw["seed"], kw["deterministic"])}
    d = s["draws_per_sample"]
    err_console.print(f"{s['n']} samples, σ {cfg.sigma:g}, {_method_line(s)}, α {cfg.alpha:g}: smoothed clean "
                      f"{100 * s['clean_accuracy_smoothed']:.1f}%, abstained {100 * s['abstention_rate']:.1f}%; "
                      "certified at radius " + ", ".join(f"{r}: {100 * v:.1f}%"
                                                         for r, v in s["certified_accuracy"].items())
                      + f" (largest radius N allows: {s['max_certifiable_radius']:g}); noisy forwards per sample: "
                      f"mean {d['mean']:,.0f}, median {d['median']:,}, max {d['max']:,}")
    return rep


def _report_text(rep: dict, path: str) -> str:
    return to_markdown(rep) if Path(path).suffix.lower() == ".md" else json.dumps(rep, indent=2, sort_keys=True)


def _store(ds: hdata.Dataset, cfg: C.SmoothingConfig, device, model_sha: str, kw: dict) -> tuple[EvalStore, list]:
    """The certification's resumable state (beside --report or --tsv, or --state-dir) and the rows it holds."""
    rules = {"stops": C.STOPS, "reach_z": C.REACH_Z} if cfg.sequential else {}  # a rule change is another run
    fp = fingerprint({"model": model_sha, "data": ds.fingerprint(), "certify": asdict(cfg), "device": device.type,
                      **rules})
    folder = B.eval_state_dir(kw["state_dir"], [p for p in (kw["report_path"], kw["tsv_path"]) if p])
    state = folder / f".harden-certify-{fp[:16]}.partial" if folder is not None else None
    store = EvalStore(state, fp, kw["resume"])
    return store, list((store.get("rows") or {}).get("rows", []))


def _stopped(store: EvalStore, rows: list) -> str:
    """Interrupted (certifying or writing): the certified rows saved for --resume."""
    store.flush()
    if store.path is None:
        return ("interrupted; no progress saved (pass --state-dir DIR, --report or --tsv to make a certification "
                "resumable)")
    return f"interrupted: {len(rows)} samples saved to '{store.path}'; rerun the same command with --resume"


def _certify(loaded, ds: hdata.Dataset, cfg: C.SmoothingConfig, device, kw: dict, store: EvalStore,
             rows: list) -> C.CertifyResult:
    """The certification, each finished row kept in `store`."""
    if rows and not kw["quiet"]:
        err_console.print(f"resuming: {len(rows)} of {len(ds)} samples already certified", highlight=False)

    def keep(row: dict) -> None:
        rows.append(row)
        store.put("rows", {"rows": list(rows)})
    with ProgressView(kw["quiet"]) as progress:
        return C.certify(loaded.patched, hdata.to_float(ds.images), ds.labels, cfg, loaded.spec.num_classes,
                         device, progress, done=list(rows), on_row=keep)


def _method_line(s: dict) -> str:
    if s.get("method") == "sequential":
        return f"sequential CERTIFY up to radius {s['max_radius']:g} (cap N {s['N']:,})"
    return f"N {s['N']:,}"


def _stops_text(s: dict) -> str:
    """Why sequential samples stopped, e.g. ' Stopped: 41 at the largest radius, 2 next radius out of reach.'"""
    if not s.get("stops"):
        return ""
    names = {"radius": "at the largest radius", "abstain": "abstained", "decided": "decided between radii",
             "reach": f"next radius out of reach (z {s['out_of_reach_z']:g})", "cap": "at the cap"}
    return " Stopped: " + ", ".join(f"{k} {names[w]}" for w, k in s["stops"].items() if k) + "."


def to_markdown(rep: dict) -> str:
    s = rep["summary"]
    d = s["draws_per_sample"]
    lines = ["## harden certify report", "", f"Model `{Path(rep['checkpoint']).name}` (sha256 "
             f"`{rep['checkpoint_sha256'][:16]}…`), data `{rep['data']['source']}` ({s['n']} samples).", "",
             f"Threat model: {rep['threat_model']}. {_method_line(s)}, n0 {s['n0']}, α {s['alpha']}, seed "
             f"{s['seed']}; bound: {s['bound']}; largest certifiable radius with "
             f"this N: {s['max_certifiable_radius']}.", "",
             f"Noisy forwards per sample (selection included): mean {d['mean']}, median {d['median']}, "
             f"max {d['max']}." + _stops_text(s), "",
             f"Smoothed clean accuracy {100 * s['clean_accuracy_smoothed']:.1f}%, abstention "
             f"{100 * s['abstention_rate']:.1f}%.", "", "| radius | certified accuracy |", "|---|---|"]
    lines += [f"| {r} | {100 * v:.1f}% |" for r, v in s["certified_accuracy"].items()]
    return "\n".join(lines) + "\n"
