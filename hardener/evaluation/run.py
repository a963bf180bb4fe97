"""One `harden eval` run, for the library and the command line alike: the clean-accuracy check and the notes about
the model and the data, the samples (a seeded stratified subset), the batch size (`auto`: the largest that fits),
the attacks in each threat model (with a resumable store, torchrun's world, a surrogate, a fine-tuned model's parent
as the reference, a base cache) and the report. `hardener.evaluate` and `cli/commands/evaluate.py` both call `eval_run`;
what differs between them is in `Hooks` (where the notes, the warnings and the progress go, the resumable store,
the wording of messages) and in the fields the caller adds to the report (`EvalRun.extra`). The command line keeps
its gates, its renderings and MLflow."""
from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .. import attacks as A
from .. import data as hdata
from ..errors import InputError
from ..io.resume import EvalStore, fingerprint
from ..io.session import check_accuracy
from ..patches import PatchedModel
from ..patches import cost as C
from ..patches.attach import Disabled
from ..reports import report as R
from ..runtime import distributed as D
from ..runtime.console import data_lines, library_voice, silent
from . import threats as E


@dataclass
class Hooks:
    """Where an evaluation's output goes, and what its caller adds (`training.run.Hooks`' pattern, for evaluation)."""

    say: Callable[[str], None] = silent  # the notes: the data's classes and preprocessing, the batch size chosen
    warn: Callable[[str], None] = silent  # each warning about the model and the data, once (the report keeps them)
    progress: Any = None  # evaluation's progress callback; one that is a context manager (ProgressView) is entered
    world: D.World = field(default_factory=D.World)  # the processes of a torchrun launch: each attacks its shard
    store: Callable[["EvalRun"], EvalStore] | None = None  # the resumable state, once the configuration is settled
    words: Callable[[str], str] = str  # the caller's words for the report's notes (the library's: `options.wording`)


@dataclass
class EvalRun:
    """An evaluation: its inputs (a finished `PatchedModel`, its data, the configuration), then what it made of
    them. `cfg.batch_size` may be "auto" until the run settles it."""

    patched: PatchedModel
    ds: hdata.Dataset
    cfg: E.EvalConfig
    device: torch.device
    has_patches: bool  # patches, or a fine-tuned base: the base is evaluated beside it
    hooks: Hooks = field(default_factory=Hooks)
    subset: int | float | None = None  # the samples: a count or a share of `ds` (data.parse_subset), seeded
    max_samples: int | None = None  # at most this many samples (wins over `subset` when smaller than the data)
    allow_low_accuracy: bool = False
    reference: nn.Module | None = None  # a fine-tuned model's parent: the base rows and transfer source
    surrogate: nn.Module | None = None  # a model of [0, 1] pixels to transfer attacks from
    base_cache: Path | None = None  # where the base's rows and transfer examples are kept for later evaluations
    deterministic: bool = False  # the report's environment says so
    notes: list[str] = field(default_factory=list)  # the report's: the caller's (model, data; shown by it), the run's
    extra: dict = field(default_factory=dict)  # the caller's fields of the report (checkpoint, invocation, ...)
    store: EvalStore | None = None
    result: E.EvalResult | None = None  # evaluation's; None on another rank of a sharded run (rank 0 reports)
    report: dict | None = None


def config(attacks: str | list[str] | tuple[str, ...], eps: float | str, **fields: Any) -> E.EvalConfig:
    """The evaluation's configuration: the attacks (names, suites, comma lists; the settings suites fix), the budget
    (a number or a fraction such as "8/255") and `EvalConfig`'s other fields as they are."""
    names = [attacks] if isinstance(attacks, str) else list(attacks)
    precision = fields.get("precision", "fp32")
    if precision not in E.PRECISIONS:
        raise InputError(f"--precision must be one of {', '.join(E.PRECISIONS)}, got '{precision}'")
    return E.EvalConfig(attacks=A.parse_attack_list(names), eps=A.parse_eps(str(eps)),
                        overrides=A.suite_settings(names), **fields)


def eval_run(run: EvalRun) -> EvalRun:
    """The whole evaluation of `run`'s model on its data: returns it with `result` and `report` (both None on a rank
    other than 0 of a sharded run)."""
    prepare(run)
    attack(run)
    if run.result is not None:
        run.report = report(run)
    return run


def prepare(run: EvalRun) -> None:
    """Before the attacks: the clean-accuracy check (near chance: an error, or a warning and a note with
    `allow_low_accuracy`), the data said, the samples chosen."""
    h = run.hooks
    pixels = math.prod(run.patched.model.spec.shape)  # L2 budgets against the image size, once it is known
    for e in [run.cfg.eps, *(run.cfg.eps_sweep or [])]:
        A.check_eps(e, run.cfg.norm, pixels, what="--eps", zero=e is not run.cfg.eps)
    low = check_accuracy(Disabled(run.patched), run.ds, run.patched.model.spec.num_classes, run.device,
                         run.allow_low_accuracy)
    if low:
        run.notes.append(low)
        h.warn(low)
    for line in data_lines(run.ds):
        h.say(line)
    run.ds = hdata.samples(run.ds, run.subset, run.max_samples, run.cfg.seed)


def attack(run: EvalRun) -> None:
    """The batch size settled, the store opened, the attacks, the sanity checks and the eps sweep."""
    h = run.hooks
    if run.cfg.batch_size == "auto":
        run.cfg.batch_size = auto_batch(run)
    run.store = h.store(run) if h.store else None
    view = h.progress if hasattr(h.progress, "__enter__") else contextlib.nullcontext(h.progress)
    if run.surrogate is not None:
        run.surrogate = run.surrogate.to(run.device).eval()
    if run.reference is not None:
        run.reference.to(run.device)
    with view as progress:
        run.result = E.evaluate(run.patched, run.ds, run.cfg, run.device, has_patches=run.has_patches,
                                progress=progress, store=run.store, reference=run.reference,
                                base_cache=run.base_cache, surrogate=run.surrogate, world=h.world)


def auto_batch(run: EvalRun) -> int:
    """Batch size "auto": the largest power of two whose attack step fits (the smallest over the ranks)."""
    x, y = hdata.to_float(run.ds.images[:64]), run.ds.labels[:64]
    bs = E.find_batch_size(run.patched, x, y, run.device)
    if run.hooks.world.active:  # one block layout for every rank: the smallest that fits everywhere
        import torch.distributed as dist

        t = torch.tensor([bs], device=run.device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        bs = int(t.item())
    run.hooks.say(f"batch size: auto -> {bs}")
    return bs


def report(run: EvalRun) -> dict:
    """The report (`report.build`): the result, the data and its notes, the attacks' settings, the environment, the
    budget and precision, what the run used (processes, base cache) and the caller's `extra`."""
    cfg, result = run.cfg, run.result
    extra = {**run.extra, "eps": cfg.eps, "norm": cfg.norm, "precision": cfg.precision}
    cost = inference_cost(run)
    if cost is not None:
        extra["cost"] = cost
    if run.hooks.world.active:
        extra["processes"] = run.hooks.world.size
    if result.base_cache:
        extra["base_cache"] = result.base_cache
    notes = list(run.notes)
    if cfg.precision != "fp32":
        notes.append(f"attacks ran in {cfg.precision} (autocast): low-precision gradients can weaken attacks, so "
                     "robust accuracy may be overstated; for the verdict, rerun with --precision fp32")
    notes = [run.hooks.words(n) for n in notes]
    env = R.environment(str(run.device), cfg.seed, run.deterministic)
    rep = R.build("eval", result, R.data_record(run.ds, notes), R.attack_settings(result), env, extra)
    return words_of_report(rep, run.hooks.words)


def inference_cost(run: EvalRun) -> dict | None:
    """What the evaluated patches cost at inference against the base (`cost.measure`): multiply-adds counted, and the
    latency measured here, on the run's device and threads, after the attacks (the machine this evaluation runs on,
    where a checkpoint's manifest keeps no timing: its bytes do not depend on the machine that trained it). The
    budget and what it sized are the training's (`cost.measure` reads them from the loaded checkpoint's manifest or
    `hardener.patch`'s record). None for a model without patches or a fine-tuned base (`reference`: no patches to
    switch off)."""
    if not run.has_patches or run.reference is not None or not run.patched.sites:
        return None
    try:
        return C.measure(run.patched).to_json()
    except Exception as e:  # noqa: BLE001 -- an extra: it never costs the finished evaluation its report
        run.notes.append(f"the inference cost was not measured after the attacks ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else 'no message'})")
        return run.extra.get("cost") or None  # the manifest's counted cost, as the caller gave it


def words_of_report(rep: dict, words: Callable[[str], str]) -> dict:
    """A report's advice in the caller's words (the library's: `options.wording`): why a threat model did not run
    and each check's hint (the data's notes are translated as they are gathered)."""
    if words is str:
        return rep
    rep["threats_not_run"] = {k: words(v) for k, v in rep.get("threats_not_run", {}).items()}
    for c in rep.get("checks", []):
        if c.get("hint"):
            c["hint"] = words(c["hint"])
    return rep


def state_store(run: EvalRun, model_sha: str | None, folder: Path | None, resume: bool, parent: str | None = None,
                surrogate_sha: str | None = None, beside: str | None = "a --report") -> EvalStore:
    """The evaluation's resumable state in `folder` (None: in memory only, nothing to resume; one file per process
    of a sharded run), named by a fingerprint of the model, the data, the configuration, the device, the route, the
    fine-tuned model's parent, the surrogate and the input's normalisation (given with the command or the call)."""
    fp = fingerprint({"model": model_sha, "data": run.ds.fingerprint(), "eval": asdict(run.cfg),
                      "device": run.device.type, "route": run.patched.current_route, "parent": parent,
                      "surrogate": surrogate_sha, "input": run.patched.model.spec.to_json()})  # --mean/--std too
    state = folder / f".harden-eval-{fp[:16]}{D.state_suffix(run.hooks.world)}.partial" if folder is not None else None
    return EvalStore(state, fp, resume, others=".harden-eval-*.partial", beside=beside)


def stopped(store: EvalStore | None, again: str, keep: str = "") -> str:
    """Interrupted (in an attack, the checks, the sweep or the report): the finished attacks saved for a resume, said
    in a line (`again`: how to go on; `keep`: how to make a run resumable that kept nothing)."""
    if store is None:  # before the attacks began (the accuracy check, the batch size): nothing to keep
        return "interrupted"
    store.flush()
    if store.path is None:
        return f"interrupted; no progress saved ({keep})"
    if not store.data:
        return "interrupted before the first batch was attacked: nothing to resume"
    return f"interrupted: progress saved to '{store.path}'; {again}"


def library_hooks(progress: Any = True, words: Callable[[str], str] | None = None) -> Hooks:
    """`hardener.evaluate`'s: the library's voice, as `hardener.patch` has it (`console.library_voice`): progress on
    stderr (`True`), none (`False`/None) or a callable of evaluation's; the notes to the "hardener" logger (and
    stderr with `progress=True`); warnings as `UserWarning`s at the caller's line; `words`: the library's words."""
    say, warn, view = library_voice(progress, words)
    return Hooks(say=say, warn=warn, progress=view, words=words or str)
