"""`harden eval`: attacks in each threat model on a plain or patched checkpoint, the per-sample worst case, the
sanity checks, gates (`--fail-under`), reports; resumable, and shardable over processes (torchrun)."""
from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path

import torch

from .. import (api, attacks as A, boundary as B, data as hdata, distributed as D, evaluation as E, report as R,
               validate as V)
from ..checkpoint import sha256_file
from ..console import ProgressView, announce, err_console, out
from ..errors import InputError, RunError, ThresholdError, UsageError
from ..patches.attach import Disabled
from ..resume import EvalStore, fingerprint
from ..signals import outputs_or_none
from ..session import check_accuracy, finish_spec, load_data, load_model, load_parent
from . import Call, adaptive, data_options, invocation, model_arg, model_options, start, track


def run(call: Call) -> None:
    kw = call.params
    model, data, thresholds, threats, raw, names, sweep = _check(call)
    world, device = start(kw)
    loaded, reference, surrogate, ds = _load(model, data, kw, device)
    if kw["defense"] == "adaptive":
        if world.active:
            raise InputError("--defense adaptive runs in one process: start it without torchrun")
        adaptive.evaluate(model, loaded, ds, names, kw, device)
        return
    batch_size = _auto_batch(kw["batch_size"], loaded, ds, device, world, kw["quiet"])
    ecfg = E.EvalConfig(attacks=names, eps=A.parse_eps(kw["eps"]), norm=kw["norm"], steps=kw["steps"],
                        restarts=kw["restarts"], queries=kw["queries"], threats=threats, batch_size=batch_size,
                        seed=kw["seed"], eps_sweep=sweep, checks=not kw["no_checks"],
                        smooth_grad=A.parse_smooth_grad(kw["smooth_grad"]), overrides=A.suite_settings(raw),
                        precision=kw["precision"])
    model_sha = sha256_file(Path(model))
    store = _store(loaded, ds, ecfg, device, world, model_sha, kw)
    with outputs_or_none(lambda: _stopped(store)) as written:
        result = _attack(loaded, ds, ecfg, device, reference, surrogate, world, kw, store)
        if result is None:  # another rank of a sharded run: rank 0 reports (and clears every rank's state after)
            D.finish(world)
            return
        rep = _report(model, model_sha, loaded, ds, ecfg, result, thresholds, world, device, kw,
                      invocation.record("eval", call), written)
    store.clear()
    if world.active and store.path is not None:  # the other ranks' state too, now that the report is written
        for r in range(1, world.size):
            store.path.with_name(store.path.name.replace(f"-rank0of{world.size}", f"-rank{r}of{world.size}")) \
                .unlink(missing_ok=True)
    D.finish(world)
    if kw["as_json"]:
        out(R.json_text(rep))
    missed = ThresholdError("--fail-under missed: " + "; ".join(rep["gates"]["missed"])) \
        if rep["gates"]["missed"] else None
    if kw["mlflow"]:
        try:
            track(kw, rep, list(kw["report_paths"]), f"harden eval {Path(model).name}")
        except RunError as e:
            if missed is None:
                raise
            err_console.print(f"Error: {e.message}", highlight=False, markup=False)  # the gate's exit code wins
    if missed is not None:
        raise missed


def _check(call: Call):
    """Option errors before any loading: the data, gates, threat models, attacks, eps sweep, output paths."""
    kw = call.params
    model = model_arg(kw["model"])
    data = kw["data"] or kw["eval_data"]
    if not data:
        raise UsageError("missing --data (or `eval_data` in harden.toml)")
    if kw["mlflow"]:
        if kw["defense"] == "adaptive":
            raise InputError("--mlflow does not log --defense adaptive evaluations: log its --report yourself")
        from ..tracking import require

        require()
    thresholds = R.parse_fail_under(kw["fail_under"])
    threats = api.parse_threats(kw["threat"], "--threat")
    if "surrogate" in [t.strip() for t in kw["threat"].split(",")] and not kw["surrogate"]:
        raise InputError("--threat surrogate needs --surrogate CHECKPOINT (a model to transfer attacks from)")
    for p in kw["report_paths"]:
        R.check_path(p)
    call.check_run([("--report", p) for p in kw["report_paths"]], kw["force"])
    raw = list(kw["attack_names"]) + ([A.SUITE_VERSIONS[kw["suite"]]] if kw["suite"] else [])
    names = A.parse_attack_list(raw or ["apgd-ce"])
    if kw["defense"] != "adaptive":
        R.check_gate_attacks(thresholds, names, threats, kw["allow_weak_gate"], kw["steps"])
    A.check_eps(A.parse_eps(kw["eps"]), kw["norm"], what="--eps")
    sweep = [A.check_eps(A.parse_eps(e), kw["norm"], what="--eps-sweep", zero=True)
             for e in kw["eps_sweep"].split(",")] if kw["eps_sweep"] else None
    return model, data, thresholds, threats, raw, names, sweep


def _auto_batch(batch_size, loaded, ds, device, world, quiet: bool) -> int:
    """--batch-size auto: the largest power of two whose attack step fits (the smallest over the ranks)."""
    if batch_size != "auto":
        return batch_size
    x, y = hdata.to_float(ds.images[:64]), ds.labels[:64]
    bs = E.find_batch_size(loaded.patched, x, y, device)
    if world.active:  # one block layout for every rank: the smallest that fits everywhere
        import torch.distributed as dist

        t = torch.tensor([bs], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        bs = int(t.item())
    if not quiet:
        err_console.print(f"batch size: auto -> {bs}", highlight=False)
    return bs


def _load(model: str, data: str, kw: dict, device: torch.device):
    """The model (on --route), its --parent, the data (the seeded subset), the --surrogate."""
    loaded = load_model(model, model_options(kw))
    reference = load_parent(loaded, kw["parent"], model_options(kw))
    if kw["route"]:
        if not loaded.patched.has_auxbn:
            raise InputError(f"--route {kw['route']}: '{model}' has no auxiliary BNs")
        loaded.patched.set_route(kw["route"])
    ds = load_data(loaded, data, data_options(kw))
    finish_spec(loaded, ds, device)
    for e in [kw["eps"], *(kw["eps_sweep"].split(",") if kw["eps_sweep"] else [])]:  # L2: against the image size
        A.check_eps(A.parse_eps(e), kw["norm"], math.prod(ds.shape), what="--eps", zero=e != kw["eps"])
    low = check_accuracy(Disabled(loaded.patched), ds, loaded.spec.num_classes, device, kw["allow_low_accuracy"])
    loaded.warnings += [low] if low else []
    for w in loaded.warnings:
        err_console.print(f"[yellow]warning:[/] {w}", highlight=False)
    if reference is not None:
        reference.to(device)
    surrogate = _load_surrogate(kw["surrogate"], kw, ds, device)
    announce(ds, kw["quiet"])
    subset = hdata.parse_subset(kw["subset"])
    if kw["max_samples"] and kw["max_samples"] < len(ds):
        subset = kw["max_samples"]
    if subset is not None:
        idx, _ = hdata.stratified_split(ds.labels, subset, kw["seed"])
        ds = ds.take(idx)
    return loaded, reference, surrogate, ds


def _load_surrogate(path: str | None, kw: dict, ds, device):
    """The --surrogate model (plain or harden checkpoint, the model's --arch), taking [0, 1] pixels, in eval mode."""
    if not path:
        return None
    V.regular_input(path, "--surrogate")
    loaded = load_model(path, model_options(kw))
    finish_spec(loaded, ds, device)
    return loaded.patched.eval()


def _store(loaded, ds, ecfg: E.EvalConfig, device, world, model_sha: str, kw: dict) -> EvalStore:
    """The evaluation's resumable state (per rank): in --state-dir, HARDEN_CACHE_DIR or beside the first --report."""
    fp = fingerprint({"model": model_sha, "data": ds.fingerprint(), "eval": asdict(ecfg),
                      "device": device.type, "route": loaded.patched.current_route, "parent": kw["parent"],
                      "surrogate": sha256_file(Path(kw["surrogate"])) if kw["surrogate"] else None})
    state_dir = B.eval_state_dir(kw["state_dir"], list(kw["report_paths"]))
    shard = f"-rank{world.rank}of{world.size}" if world.active else ""
    state = state_dir / f".harden-eval-{fp[:16]}{shard}.partial" if state_dir is not None else None
    return EvalStore(state, fp, kw["resume"])


def _stopped(store: EvalStore) -> str:
    """Interrupted (in an attack, the checks, the sweep or the report): the finished attacks saved for --resume."""
    store.flush()
    if store.path is None:
        return "interrupted; no progress saved (pass --state-dir DIR or --report to make an evaluation resumable)"
    return f"interrupted: progress saved to '{store.path}'; rerun the same command with --resume"


def _attack(loaded, ds, ecfg: E.EvalConfig, device, reference, surrogate, world, kw: dict, store: EvalStore):
    """The evaluation itself: attacks, sanity checks, eps sweep, progress kept in `store`."""
    with ProgressView(kw["quiet"]) as progress:
        return E.evaluate(loaded.patched, ds, ecfg, device, has_patches=loaded.has_patches, progress=progress,
                          store=store, reference=reference,
                          base_cache=Path(kw["base_cache"]) if kw["base_cache"] else None, surrogate=surrogate,
                          world=world)


def _report(model: str, model_sha: str, loaded, ds, ecfg: E.EvalConfig, result: dict, thresholds: dict, world,
            device, kw: dict, how: dict | None, written: list) -> dict:
    """The report, with its gates: rendered on stderr, written to each --report (each listed in `written` first)."""
    extra = {"checkpoint": model, "checkpoint_sha256": model_sha, "eps": ecfg.eps, "norm": kw["norm"],
             "invocation": how}
    if world.active:
        extra["processes"] = world.size
    if kw["surrogate"]:
        extra["surrogate"] = {"checkpoint": kw["surrogate"], "sha256": sha256_file(Path(kw["surrogate"]))}
    if result.get("base_cache"):
        extra["base_cache"] = result["base_cache"]
    if loaded.manifest is not None:
        extra["patches"] = loaded.manifest.patches
        extra["training"] = loaded.manifest.training
        extra["base_modified"] = loaded.manifest.base_modified
        if loaded.patched.has_auxbn:
            extra["route"] = loaded.patched.current_route
    env = R.environment(str(device), kw["seed"], kw["deterministic"])
    notes = list(loaded.warnings)
    if kw["precision"] != "fp32":
        notes.append(f"attacks ran in {kw['precision']} (autocast): low-precision gradients can weaken attacks, so "
                     "robust accuracy may be overstated; rerun with --precision fp32 for the verdict")
    extra["precision"] = kw["precision"]
    rep = R.build("eval", result, R.data_record(ds, notes), R.attack_settings(result), env, extra)
    missed = R.gate(rep, thresholds)
    rep["gates"] = {"thresholds": thresholds, "missed": missed}
    R.summarise(rep)
    R.render_table(rep, err_console)
    if thresholds and not missed:
        err_console.print(R.gates_passed_line(rep, thresholds), highlight=False)
    for p in kw["report_paths"]:
        written.append(p)  # before the write: an interrupt just as the file lands removes it too
        R.write(rep, p)
    return rep
