"""`harden certify`: certified L2 radii of the smoothed model (randomized smoothing), per sample and summarised."""
from __future__ import annotations

import json
from pathlib import Path

from ... import data as hdata
from ...certification import run as CR
from ...certification import smoothing as C
from ...errors import InputError, UsageError
from ...io.checkpoint import atomic_write, sha256_file
from ...io.resume import state_folder
from ...io.session import finish_spec, load_data, load_model
from ...runtime import distributed as D
from ...runtime.console import ProgressView, err_console, out
from ..signals import outputs_or_none
from . import Call, data_options, model_arg, model_options, start


def run(call: Call) -> None:
    kw = call.params
    model = model_arg(kw["model"])
    if not kw["data"]:
        raise UsageError("missing --data (labelled images to certify)")
    tsv_path, report_path = kw["tsv_path"], kw["report_path"]
    call.check_run([("--tsv", tsv_path), ("--report", report_path)], kw["force"])
    if report_path and Path(report_path).suffix.lower() not in (".json", ".md"):
        raise InputError(f"--report '{report_path}': certify writes .json or .md reports")
    subset = hdata.parse_subset(kw["subset"])
    sigma, alpha, n_samples = kw["sigma"], kw["alpha"], kw["n_samples"]
    if kw["max_radius"] is not None and not kw["sequential"]:
        raise InputError("--max-radius applies to sequential certification: drop --fixed (fixed-n CERTIFY draws --n "
                         "copies whatever the radius) or drop --max-radius")
    cfg = C.SmoothingConfig(sigma=sigma, n0=kw["n0"], n=n_samples, alpha=alpha, batch_size=kw["batch_size"],
                            seed=kw["seed"], sequential=kw["sequential"], max_radius=kw["max_radius"])
    note = cfg.check_reach()  # --n too small to certify anything: an error; too small for --max-radius: a warning
    if note:
        err_console.print(f"[yellow]warning:[/] {note}", highlight=False)
    world, device = start(kw)
    loaded = load_model(model, model_options(kw))
    ds = load_data(loaded, kw["data"], data_options(kw))
    finish_spec(loaded, ds, device)
    CR.check_memory(cfg, loaded.spec.shape)
    model_sha = loaded.base.sha256 if loaded.base is not None else sha256_file(Path(model))  # a plain file: hashed once
    ds = hdata.samples(ds, subset, kw["max_samples"], kw["seed"])
    folder = state_folder(kw["state_dir"], [p for p in (kw["report_path"], kw["tsv_path"]) if p])
    store, rows = CR.state_store(ds, cfg, device, world, model_sha, folder, kw["resume"], loaded.spec.to_json(),
                                 beside="a --report or --tsv")
    if rows and not kw["quiet"]:
        mine = f"this process's {len(D.shard(len(ds), 1, world))}" if world.active else str(len(ds))
        err_console.print(f"resuming: {len(rows)} of {mine} samples already certified", highlight=False)
    with outputs_or_none(lambda: CR.stopped(
            store, rows, "rerun the same command with --resume",
            "pass --state-dir DIR, --report or --tsv to make a certification resumable")) as written:
        with ProgressView(kw["quiet"]) as progress:
            cert = CR.certify_run(loaded.patched, ds, cfg, device, n_classes=loaded.spec.num_classes,
                               model_name=model, model_sha=model_sha,
                               progress=progress, done=list(rows), keep=CR.keeper(store, rows, cfg),
                               deterministic=kw["deterministic"], world=world)
        if cert is None:  # another rank of a sharded run: rank 0 reports (and clears every rank's state after)
            D.finish(world)
            return
        err_console.print(CR.summary_line(cert.summary), highlight=False, markup=False)
        rep = cert.to_dict()
        if tsv_path:  # the table of samples, whatever its suffix
            written.append(tsv_path)  # before the write: an interrupt just as the file lands removes it too
            atomic_write(Path(tsv_path), lambda tmp: Path(tmp).write_text(cert.to_tsv()))
        if report_path:  # .json or .md (checked first)
            written.append(report_path)
            cert.save(report_path)
    store.clear()
    D.clear_other_states(store.path, world)  # the other ranks' state too, now that the report is written
    D.finish(world)
    if kw["as_json"]:
        out(json.dumps(rep, indent=2, sort_keys=True))
