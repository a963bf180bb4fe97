"""The library: what `harden patch` and `harden eval` do, from Python, in a few lines.

    import hardener
    patched = hardener.patch(net, (x, y), mean=[0.286], std=[0.353], eps=0.1, epochs=2)
    report = hardener.evaluate(patched, (x_test, y_test), attacks="apgd-ce", eps=0.1)
    print(report.clean, report.robust)
    patched.save("model.hardened.safetensors")
    again = hardener.load("model.hardened.safetensors", arch="mypkg.models:net")

`model` is an `nn.Module` (taking normalised inputs; harden wraps `mean`/`std` inside; harden works on a deep copy,
so the module itself stays as it was: weights, `requires_grad` flags, train/eval mode, hooks) or a checkpoint path;
`data` is a harden `Dataset`, an `(images, labels)` pair of tensors, a torch `Dataset` of `(image, label)` items,
a `DataLoader`, or a data spec string (`folder/`, `file.npz`, `fashion-mnist:train`). Images are NCHW pixels in
[0, 1] (float) or 0-255 (uint8). Errors are `hardener.errors.InputError` (bad input) and `RunError` (a failed run).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import attacks as A
from . import data as hdata
from .certification import run as CR
from .certification import smoothing
from .certification.run import Certification
from .data import as_dataset
from .errors import InputError, Interrupted
from .evaluation import run as EV
from .evaluation import threats as E
from .io.checkpoint import sha256_file, tensor_digest
from .io.resume import StopFlag, state_folder
from .io.session import Loaded, finish_spec
from .io.session import pick_device as _pick
from .model import archspec
from .model.classifier import Classifier, InputSpec, parse_floats
from .options import owners
from .options import validate as V
from .options.defaults import CERTIFY, EVAL
from .options.patch_options import PatchOptions
from .options.recipe import DEFAULT_PRESET
from .options.validate import check_arg, check_range
from .options.wording import python_words, speaking_python
from .patches import PatchedModel, suggest
from .patches.attach import carries_patches
from .patches import cost as C
from .reports import report as R
from .runtime.console import library_voice
from .training import fit as F
from .training import report as TR
from .training import run as RUN


def as_patched(model: Any, arch: str | None = None, mean=None, std=None, logits: str | None = None,
               trust_pickle: bool = False, arch_kwargs: str | None = None,
               preprocessor: str | None = None) -> PatchedModel:
    """A `PatchedModel` (no patches yet) around an `nn.Module` or the checkpoint at a path; `preprocessor`, a
    Hugging Face preprocessor_config.json, gives mean and std instead."""
    if isinstance(model, PatchedModel):
        return model
    if isinstance(model, (str, Path)):
        from .io.session import ModelOptions, load_model

        loaded = load_model(str(model), ModelOptions(arch=arch, trust_pickle=trust_pickle, logits=logits,
                                                     arch_kwargs=arch_kwargs, mean=_csv(mean), std=_csv(std),
                                                     preprocessor=preprocessor),
                            allow_patched=False)
        loaded.patched.arch, loaded.patched.arch_kwargs = loaded.base.arch, loaded.base.arch_kwargs
        loaded.patched.base_sha256 = loaded.base.sha256
        return loaded.patched
    if isinstance(model, nn.Module):
        from .model.classifier import hf_normalisation

        if carries_patches(model):
            raise InputError("the module carries the patches of a PatchedModel (hardener.load(path, model=...) hooks "
                             "the module it is given): evaluate or certify that PatchedModel itself, and patch a "
                             "fresh base module")

        m, sd = hf_normalisation(preprocessor, _csv(mean), _csv(std))
        spec = InputSpec(mean=parse_floats(m, "mean"), std=parse_floats(sd, "std"), logits=logits)
        patched = PatchedModel(Classifier(_own_copy(model).eval(), spec))
        patched.arch = arch  # recorded by `save` (the module itself cannot say how it was built)
        patched.arch_kwargs = archspec.parse_kwargs(arch_kwargs, "arch_kwargs") if arch_kwargs else None
        return patched
    raise InputError(f"cannot patch {type(model).__name__}: pass an nn.Module or a checkpoint path")


def _own_copy(model: nn.Module) -> nn.Module:
    """A deep copy of the caller's module for harden to freeze, put in eval mode and hook patches onto: the caller's
    own module keeps its parameters, `requires_grad` flags, train/eval mode and hooks, and its logits."""
    import copy

    try:
        return copy.deepcopy(model)
    except Exception as e:  # noqa: BLE001 - whatever the module's own __deepcopy__ raises
        raise InputError(f"cannot copy the model ({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
                         "): harden patches a deep copy so that your module stays as it was; pass a deep-copyable "
                         "module, or a checkpoint path") from None


def _csv(v) -> str | None:
    return None if v is None else ",".join(str(t) for t in (v if isinstance(v, (list, tuple)) else [v]))


def finish(patched: PatchedModel, ds: hdata.Dataset | None, device: torch.device) -> list:
    """Dry-run the model on the data: record its input shape and class count; the layer table."""
    return finish_spec(Loaded(patched, None, None), ds, device)


def model_to_run(model: Any, arch: str | None, mean, std, logits: str | None = None
                 ) -> tuple[PatchedModel, bool, str | None]:
    """The model `hardener.evaluate` and `hardener.certify` run, whether it carries patches, and the sha256 of a plain
    checkpoint file (loading computed it; None for a patched file and for a module): a checkpoint path (plain or
    patched) loaded, or a module (`as_patched`)."""
    if isinstance(model, (str, Path)):
        from .io.session import ModelOptions, load_model

        loaded = load_model(str(model), ModelOptions(arch=arch, mean=_csv(mean), std=_csv(std), logits=logits))
        return loaded.patched, loaded.has_patches, loaded.base.sha256 if loaded.base is not None else None
    patched = as_patched(model, arch, mean, std, logits)
    return patched, bool(patched.sites), None


def pick_device(name: str | torch.device) -> torch.device:
    return name if isinstance(name, torch.device) else _pick(str(name))


def _keywords(fn, *more: dict[str, Any]) -> dict[str, Any]:
    """A library function's keywords with their defaults (and `more`): the words its errors use."""
    import inspect

    out = {n: p.default for n, p in inspect.signature(fn).parameters.items() if p.kind is not p.VAR_KEYWORD}
    for extra in more:
        out.update(extra)
    return out


def _words(keywords: dict[str, Any], aliases: dict[str, str] | None = None):
    """Text -> the same text in the library's words (`wording.python_words`)."""
    return lambda text: python_words(text, keywords, aliases)


def _patch_keywords() -> dict[str, Any]:
    """`hardener.patch`'s keywords: its own, the `PatchOptions` fields and the options of every patch kind and
    method (their flag spellings too: `loss` for `loss_name`)."""
    from dataclasses import MISSING, fields

    opts = {f.name: f.default for f in fields(PatchOptions) if f.default is not MISSING}
    owned = {n: spec.default for n, (_, spec) in owners.owned().items()}
    spelled = {a: {**opts, **owned}.get(n) for a, n in {**PatchOptions.ALIASES, **owners.aliases()}.items()}
    return _keywords(patch, opts, owned, spelled)


# `--preset robust` is `recipe="robust"`, `--report-budget` `report=`; `--report` (a file) has no keyword here
PATCH_ALIASES = {"preset": "recipe", "report-budget": "report", "report": "report_path"}


def patch(model: Any, data: Any, recipe: str | None = "auto", *, arch: str | None = None, mean=None,
          std=None, logits: str | None = None, device: str | torch.device = "auto",
          progress: bool | F.Progress | None = True, report: str | None = None, eval_data: Any = None,
          eval_samples: int | None = None, eval_steps: int | None = None, state: str | Path | None = None,
          resume: bool = False, **overrides: Any) -> PatchedModel:
    """Splice patches into a frozen `model` and train them on `data`; returns the `PatchedModel`.

    `recipe` names a preset (`"robust"`: white-box robustness; `"transfer"`: the fixer paper's transfer-only
    recipe; `"certify"`: a denoiser for `harden certify`; `None`: the built-in defaults of `PatchOptions`; `"auto"`,
    the default: `"robust"` unless `method` (or `patch`, `train`), `at`, `at_regex` or `adversary` is given);
    `overrides` are fields (`eps=0.1`, `epochs=5`, `at="layer1"`, ...) and the options of the patch kinds and
    methods (`rho=2`, `phi=0.6`, those of a kind registered from outside), and win over the recipe;
    `loss="rslad", teacher=...` distils a robust teacher (a patched checkpoint path of the same base, a
    `PatchedModel` on it, or a module taking the same pixels). When `data` leaves nothing aside, a stratified part is
    held out for model selection, as the CLI does. The run is the command line's (`hardener.training.run.patch_run`):
    `progress=True` shows progress, the plan and the notes on stderr (`False`: nothing;
    a callable of fit's `Progress` gets the progress, the plan and notes go to the logger only); the plan and the
    notes go to the `logging` logger "hardener" too, warnings (too few optimiser steps, ...) are `UserWarning`s.
    `report="quick"` (`harden patch`'s: white-box APGD-CE at 20 steps or `eval_steps`, then its transfer from the
    base; a check, not a verdict) or `"full"` (the training attack at its reference budget) attacks the trained
    model after training, on `eval_data` or else on held-out images of `data` outside the training and validation
    images (`eval_samples` of them: 500 quick, 1,000 full; 0: all), and its cost is part of the plan's estimate;
    `None`, the default, runs none and keeps no images of `data` aside for one.
    `state="run.partial"` keeps the training's state in that file (at each epoch's end, and when interrupted:
    Ctrl-C stops at the next step, saves and raises `hardener.errors.Interrupted`); the same call with `resume=True`
    continues from it as if never stopped. It is removed once `patch` returns.
    The base's weights and statistics are bit-identical afterwards. The returned model carries `.training_record`
    (the record the checkpoint stores), `.history` (one `EpochLog` per epoch), `.cost` (a `cost.Cost`:
    multiply-adds counted, latency measured on `device`, against the base; the checkpoint's `cost` holds the
    counted part) and `.report` (a `Report`, with `report=`; else None)."""
    keywords = _patch_keywords()  # the library's words for the flags of every message below
    with speaking_python(keywords, PATCH_ALIASES):
        opts, preset = PatchOptions.build(recipe, overrides)
        for what, v, kinds in (("report", report, "str | None"), ("eval_samples", eval_samples, "int | None"),
                               ("eval_steps", eval_steps, "int | None"), ("resume", resume, "bool")):
            check_arg(what, v, kinds)
        _check_state(state, resume)
        check_range("eval_samples", eval_samples)
        check_range("eval_steps", eval_steps)
        if report is None and (eval_data is not None or eval_samples is not None or eval_steps is not None):
            raise InputError("eval_data, eval_samples and eval_steps are the report's: pass report='quick' or 'full'")
        post = None if report is None else TR.PostReport(report, _eval_data(eval_data), eval_samples, eval_steps)
        dev = pick_device(device)
        torch.manual_seed(opts.seed)
        patched = as_patched(model, arch, mean, std, logits)
        if patched.sites:
            raise InputError("the model already carries patches: patch its base instead")
        ds = as_dataset(data)
        infos = finish(patched, ds, dev)
        _warn_class_count(ds, patched)
        A.check_eps(A.parse_eps(str(opts.eps)), opts.norm, math.prod(patched.model.spec.shape))
        words = _words(keywords, PATCH_ALIASES)
        hooks = RUN.library_hooks(progress, words)
        hooks.keep_parent = post is not None  # a method that fine-tunes the base: the report's base is the original
        if state is not None:  # resumable, as harden patch is beside --out: Ctrl-C saves at the next step
            _keep_state(hooks, Path(state), resume, _digest(model, patched, patched.base_sha256))
        run = RUN.patch_run(RUN.PatchRun(patched, ds, opts, preset, dev, hooks, post_report=post,
                                         given=frozenset(PatchOptions.canonical(k) for k in overrides)), infos)
        try:  # after training: the state stays until the model is the caller's (the report)
            if run.inference is not None and run.inference.sizing:  # what the budget chose, in the same words
                run.inference.sizing = words(run.inference.sizing)
            patched.cost = run.inference
            patched.training_record = run.record
            patched.train_seconds = run.train_seconds
            patched.history = run.logs
            if post is not None:
                view = library_voice(progress)[2]  # a view of its own, as `harden patch` shows the report's progress
                full = (f"hardener.evaluate(model, TEST_DATA, attacks='apgd-ce,apgd-dlr,square', "
                        f"eps={run.spec.eps!r}, norm={run.spec.norm!r}, threat='all')")
                patched.report = Report(TR.build(run, view, extra={"report_budget": {"full_evaluation": full}}))
        except KeyboardInterrupt:
            if run.saver is None or not run.saver.path.exists():
                raise
            raise Interrupted(f"interrupted after training: the trained state is kept in '{run.saver.path}'; call "
                              "again with resume=True to finish without training again") from None
        if run.saver is not None:
            run.saver.clear()  # the model is the caller's now
        return patched


def _check_state(state: Any, resume: bool) -> None:
    """`hardener.patch`'s `state=` (a file, in a folder that exists) and `resume=`, before any work."""
    if state is not None and not isinstance(state, (str, Path)):
        raise InputError(f"state must be a file path (the training's resumable state), got {type(state).__name__}")
    if resume and state is None:
        raise InputError("resume=True needs state=: the file the interrupted run kept its state in")
    if state is not None and not Path(state).parent.is_dir():
        raise InputError(f"state '{state}': the folder '{Path(state).parent}' does not exist")
    if state is not None and Path(state).is_dir():
        raise InputError(f"state '{state}' is a folder: give a file for the training's state, e.g. "
                         f"'{Path(state) / 'run.partial'}'")


def _keep_state(hooks: RUN.Hooks, state: Path, resume: bool, base: str) -> None:
    """A patch run kept resumable in `state`: the saver (for this base, `base`'s digest, and the run's settings),
    and a stop flag that SIGINT/SIGTERM set so that training saves at the next step."""
    hooks.saver = lambda r: RUN.saver_at(state, r, base, resume)
    hooks.stop, hooks.cache_dir = StopFlag(), state.parent


def _eval_data(eval_data: Any) -> hdata.Dataset | None:
    """`hardener.patch`'s `eval_data` as a `Dataset`; its errors name it (`as_dataset`'s say `data`)."""
    if eval_data is None:
        return None
    try:
        return as_dataset(eval_data)
    except InputError as e:
        text = e.message[len("data"):] if e.message.startswith("data ") else f": {e.message}"
        raise InputError(f"eval_data{text}", e.hint) from None


def _warn_class_count(ds: hdata.Dataset, patched: PatchedModel) -> None:
    """The model's output size against the data's classes (`data.class_count_warning`), as a Python warning."""
    _warn(hdata.class_count_warning(ds, patched.model.spec.num_classes), stacklevel=4)


def _warn(text: str | None, stacklevel: int = 3) -> None:
    """A warning about the model or the data, as a Python warning (none for None)."""
    if text:
        warnings.warn(text, UserWarning, stacklevel=stacklevel)


@dataclass
class Report:
    """A robustness report: attribute access to the headline numbers of the evaluated model (`clean`, `robust` =
    white-box per-sample worst case, `transfer`, `blackbox`, `worst_case` over every threat model that ran; None
    where it did not run), the base's (`base_clean`, `base_robust`), `.summary` (the flat numeric dict: name ->
    number, ready for `mlflow.log_metrics`), `.to_dict()` (the whole report, as its JSON file holds it) and
    `.to_json()/.to_markdown()/.to_html()`; a notebook shows the HTML report."""

    data: dict = field(repr=False)

    def _model(self, name: str | None = None) -> dict:
        models = self.data["models"]
        return models[name] if name else models.get("patched", models["base"])

    def _threat(self, threat: str, name: str | None = None) -> float | None:
        t = self._model(name)["threats"].get(threat)
        return None if t is None else t["robust"]["accuracy"]

    @property
    def clean(self) -> float:
        return self._model()["clean"]["accuracy"]

    def _robust(self, name: str | None = None) -> float | None:
        """The worst case of the attacks that know the model (white-box and BPDA), as the summary and gates."""
        return R.robust_accuracy(self._model(name))

    @property
    def robust(self) -> float | None:
        return self._robust()

    @property
    def adaptive(self) -> float | None:
        return self._threat("adaptive")

    @property
    def transfer(self) -> float | None:
        return self._threat("transfer")

    @property
    def blackbox(self) -> float | None:
        return self._threat("blackbox")

    @property
    def worst_case(self) -> float:
        return self._model()["worst_case"]["accuracy"]

    @property
    def base_clean(self) -> float:
        return self._model("base")["clean"]["accuracy"]

    @property
    def base_robust(self) -> float | None:
        return self._robust("base")

    @property
    def checks(self) -> list[dict]:
        return self.data.get("checks", [])

    @property
    def summary(self) -> dict[str, float]:
        return dict(self.data["summary"])

    def to_dict(self) -> dict:
        return json.loads(self.to_json())  # standard JSON types only: a copy the caller may change

    def _repr_html_(self) -> str:
        return self.to_html()

    def to_json(self) -> str:
        return R.json_text(self.data)

    def to_markdown(self) -> str:
        return R.to_markdown(self.data)

    def to_html(self) -> str:
        return R.to_html(self.data)

    def save(self, path: str | Path) -> None:
        """Write the report (.json, .md or .html by suffix), atomically."""
        R.write(self.data, path)

    def __repr__(self) -> str:
        def p(v):
            return "—" if v is None else f"{100 * v:.1f}%"

        return (f"Report(n={self.data['data']['n']}, eps={self.data.get('eps')}, clean={p(self.clean)}, "
                f"robust (white-box)={p(self.robust)}, transfer={p(self.transfer)}, blackbox={p(self.blackbox)})")


def evaluate(model: Any, data: Any, attacks: str | list[str] = EVAL["attack"], *, eps: float | str = EVAL["eps"],
             norm: str = EVAL["norm"], threat: str | tuple[str, ...] = EVAL["threat"], steps: int | None = None,
             max_samples: int | None = None, batch_size: int | str = EVAL["batch_size"], seed: int = EVAL["seed"],
             checks: bool = True, arch: str | None = None, mean=None, std=None, logits: str | None = None,
             device: str | torch.device = "auto",
             progress: bool | F.Progress | None = True, surrogate: nn.Module | None = None,
             precision: str = EVAL["precision"], allow_low_accuracy: bool = False,
             state_dir: str | Path | None = None, resume: bool = False) -> Report:
    """Attack `model` (a `PatchedModel`, an `nn.Module`, or a checkpoint path) on `data` and report: clean accuracy,
    each threat model's robust accuracy (white-box on the model itself; BPDA through the patches that may mask
    gradients; transfer from `surrogate`, a model taking [0, 1] pixels, when given; transfer from the base;
    black-box Square), the per-sample worst case and which attack broke each sample, the base side by side when
    the model carries patches, and the sanity checks. The run is the command line's (`hardener.evaluation.run`):
    `progress=True` shows progress and the notes on stderr (`False`: nothing; a callable of evaluation's `Progress`
    gets the progress), the notes go to the `logging` logger "hardener" too; a near-chance clean accuracy let through
    by `allow_low_accuracy=True` is a `UserWarning`, and it and the notes about the data (an output size that does
    not fit its classes) are the report's `data.warnings`. `batch_size="auto"`: the largest that fits. `arch`, `mean`,
    `std`, `logits` (the key or index of the logits in a dict or tuple output) as for `hardener.patch`. With
    `state_dir`, the finished attacks and batches are kept in a state file there (as `harden eval --state-dir`
    keeps them): an interrupt (Ctrl-C) raises `hardener.errors.Interrupted`, and the same call with `resume=True`
    goes on from there; the file is removed once the report is made."""
    keywords, aliases = _keywords(evaluate), {"attack": "attacks"}
    with speaking_python(keywords, aliases):
        for what, v, kinds in (("batch_size", batch_size, "int | str"), ("steps", steps, "int | None"),
                               ("max_samples", max_samples, "int | None"), ("eps", eps, "float | str"),
                               ("norm", norm, "str"), ("seed", seed, "int"), ("checks", checks, "bool"),
                               ("precision", precision, "str"), ("arch", arch, "str | None"),
                               ("logits", logits, "str | None"),
                               ("threat", threat, "str | tuple"), ("resume", resume, "bool")):
            check_arg(what, v, kinds)
        folder = _state_dir(state_dir)
        if resume and folder is None:
            raise InputError("resume=True needs state_dir=: the folder the interrupted evaluation kept its state in")
        if isinstance(batch_size, str) and batch_size != "auto":
            raise InputError(f"batch_size must be an integer or 'auto', got {batch_size!r}")
        for what, v in (("batch_size", batch_size), ("steps", steps), ("max_samples", max_samples), ("seed", seed)):
            check_range(what, v)  # the command line's range of each, stated once (validate.OPTION_RULES)
        if surrogate is not None and not isinstance(surrogate, nn.Module):
            raise InputError(f"surrogate must be an nn.Module taking [0, 1] pixels, got {type(surrogate).__name__}")
        if not (isinstance(attacks, str) or isinstance(attacks, (list, tuple)) and attacks
                and all(isinstance(a, str) for a in attacks)):
            raise InputError(f"attacks must be an attack name, a comma list or a list of names, got {attacks!r}")
        threats = parse_threats(",".join(str(t) for t in threat) if isinstance(threat, tuple) else threat)
        cfg = EV.config(attacks, eps, norm=norm, steps=steps, threats=threats, batch_size=batch_size, seed=seed,
                        checks=checks, precision=precision)
        dev = pick_device(device)
        patched, has_patches, sha = model_to_run(model, arch, mean, std, logits)
        ds = as_dataset(data)
        finish(patched, ds, dev)
        notes = [w for w in [hdata.class_count_warning(ds, patched.model.spec.num_classes)] if w]
        hooks = EV.library_hooks(progress, _words(keywords, aliases))
        if folder is not None:
            name = _digest(model, patched, sha)
            hooks.store = lambda r: EV.state_store(
                r, name, folder, resume, surrogate_sha=None if surrogate is None else
                tensor_digest(surrogate.state_dict()), beside=None)
        run = EV.EvalRun(patched, ds, cfg, dev, has_patches, hooks, max_samples=max_samples,
                         allow_low_accuracy=allow_low_accuracy, surrogate=surrogate, notes=notes)
        try:
            EV.eval_run(run)
        except KeyboardInterrupt:
            if folder is None:  # nothing kept: Python's own interrupt
                raise
            raise Interrupted(EV.stopped(run.store, "call again with resume=True")) from None
        if run.store is not None:
            run.store.clear()
        return Report(run.report)


def certify(model: Any, data: Any, *, sigma: float | str = CERTIFY["sigma"], n: int = CERTIFY["n"],
            n0: int = CERTIFY["n0"], alpha: float = CERTIFY["alpha"], sequential: bool = CERTIFY["sequential"],
            max_radius: float | None = None,
            max_samples: int | None = None, batch_size: int = CERTIFY["batch_size"], seed: int = CERTIFY["seed"],
            arch: str | None = None, mean=None, std=None, logits: str | None = None,
            device: str | torch.device = "auto", progress: bool | Any = True, state_dir: str | Path | None = None,
            resume: bool = False) -> Certification:
    """Certified L2 radii of the smoothed `model` (randomized smoothing, Cohen et al. 2019) on `data`: a
    `PatchedModel`, an `nn.Module` taking [0, 1] pixels, or a checkpoint path (`arch`, `mean`, `std`, `logits` as for
    `hardener.patch`). `sequential=True`, the default as for `harden certify`, stops drawing noisy copies of a sample
    once its certificate is decided (an anytime-valid confidence sequence: the same guarantee as fixed-n CERTIFY,
    whose `n` draws per sample `sequential=False` spends); `max_radius` (default 2 `sigma`) is the largest radius it
    tries to certify; `sigma` in pixel units, or a fraction like "64/255". A `max_radius` beyond what `n` draws can
    certify is a `UserWarning`, an `n` that can certify nothing an `InputError`. Progress goes to stderr
    (`progress=False`: none, a callable gets it). `.save(path)` writes the report (.json, .md) or its samples (.tsv).
    With `state_dir`, each certified sample is kept in a state file there (named by the model's tensors, the samples
    and the settings, as `harden certify --state-dir` keeps it); an interrupt (Ctrl-C) raises
    `hardener.errors.Interrupted` saying how many were saved, and the same call with `resume=True` certifies only
    the rest. The state file is removed once the certification returns."""
    keywords = _keywords(certify)
    with speaking_python(keywords):
        for what, v, kinds in (("n", n, "int"), ("n0", n0, "int"), ("batch_size", batch_size, "int"),
                               ("max_samples", max_samples, "int | None"), ("sigma", sigma, "float | str"),
                               ("alpha", alpha, "float"), ("sequential", sequential, "bool"),
                               ("max_radius", max_radius, "float | None"), ("seed", seed, "int"),
                               ("logits", logits, "str | None"), ("resume", resume, "bool")):
            check_arg(what, v, kinds)
        for what, v, rule in (("n", n, "n_samples"), ("n0", n0, None), ("batch_size", batch_size, None),
                              ("max_samples", max_samples, None), ("seed", seed, None)):
            check_range(what, v, rule)  # the command line's ranges, stated once (validate.OPTION_RULES)
        if max_radius is not None and not sequential:
            raise InputError("max_radius applies to sequential certification: drop sequential=False (fixed-n CERTIFY "
                             "draws n copies whatever the radius) or drop max_radius")
        folder = _state_dir(state_dir)
        if resume and folder is None:
            raise InputError("resume=True needs state_dir=: the folder the interrupted certification kept its state "
                             "in")
        try:
            sigma = V.parse_level(sigma)  # 0.25, or a fraction like "64/255"
        except ValueError as e:
            raise InputError(f"sigma {e}") from None
        # the ranges of sigma, alpha and max_radius: SmoothingConfig's, checked before the model loads
        cfg = smoothing.SmoothingConfig(sigma=sigma, n0=n0, n=n, alpha=float(alpha), batch_size=batch_size,
                                        seed=seed, sequential=sequential,
                                        max_radius=None if max_radius is None else float(max_radius))
        note = cfg.check_reach()  # n too small to certify anything: an error; too small for max_radius: a warning
        say, _, view = library_voice(progress)  # as hardener.patch and hardener.evaluate speak (checked here)
        _warn(note and _words(keywords)(note))
        patched, _, sha = model_to_run(model, arch, mean, std, logits)  # a plain file: hashed once, as it loads
        if isinstance(model, (str, Path)):
            name, sha = str(model), sha or sha256_file(Path(model))  # a patched file: its own digest, here
        else:
            name = type(model).__name__
        dev = pick_device(device)
        ds = as_dataset(data)
        finish(patched, ds, dev)
        spec = patched.model.spec
        CR.check_memory(cfg, spec.shape, "batch_size")
        ds = hdata.samples(ds, None, max_samples, cfg.seed)  # the samples, before the state that names them
        store, rows = CR.state_store(ds, cfg, dev, None, _digest(model, patched, sha), folder, resume,
                                     spec.to_json())
        if rows:
            say(f"resuming: {len(rows)} of {len(ds)} samples already certified")
        try:
            with view if hasattr(view, "__enter__") else contextlib.nullcontext():
                cert = CR.certify_run(patched, ds, cfg, dev, n_classes=spec.num_classes, model_name=name,
                                      model_sha=sha, progress=view, done=list(rows),
                                      keep=CR.keeper(store, rows, cfg))
        except KeyboardInterrupt:
            if folder is None:  # nothing kept: Python's own interrupt
                raise
            raise Interrupted(CR.stopped(store, rows, "call again with resume=True")) from None
        store.clear()
        return cert


def _state_dir(state_dir: Any) -> Path | None:
    """The library's `state_dir=`: a folder made if missing (None: no state kept)."""
    if state_dir is None:
        return None
    if not isinstance(state_dir, (str, Path)):
        raise InputError(f"state_dir must be a folder path, got {type(state_dir).__name__}")
    return state_folder(str(state_dir), [], env=False)


def _digest(model: Any, patched: PatchedModel, sha: str | None = None) -> str:
    """What names the model in a resumable state: a checkpoint file's digest (`sha`, when its load computed it) or,
    for a module in memory, its tensors (patches included); with what neither holds: the input normalisation (a
    `mean=`/`std=` given with the call), the logits' key and the route."""
    if not sha:
        sha = sha256_file(Path(model)) if isinstance(model, (str, Path)) else tensor_digest(patched.state_dict())
    rest = json.dumps({"spec": patched.model.spec.to_json(), "route": patched.current_route}, sort_keys=True,
                      default=str)
    return hashlib.sha256((sha + rest).encode()).hexdigest()


@dataclass
class Layers:
    """The named layers of a model, as `harden layers` shows them: `rows` (one dict per module: name, type, output
    shape, parameters, whether it is a patch site and why not, and `fixer_macs`: what a fixer of the default
    recipe (`recipe`: `rho`) would add there, per image), the suggested sites with the stem and why (`why`), the valid
    sites the suggestion passed over (`passed_over`), the base's multiply-adds per image and what the default recipe's
    pre-filter would add (`prefilter_macs`, at `recipe`'s `width`); `to_dict()` is `harden layers --json`."""

    input_shape: tuple
    rows: list[dict]
    base_macs: int
    suggested_sites: list[str]
    stem: str | None
    why: dict
    passed_over: dict
    note: str
    prefilter_macs: int | None = None
    recipe: dict = field(default_factory=dict)  # the default recipe's sizes the costs assume

    def to_dict(self) -> dict:
        return {"layers": self.rows, "base_macs": self.base_macs, "suggested_sites": self.suggested_sites,
                "stem": self.stem, "why": self.why, "passed_over": self.passed_over, "note": self.note,
                "prefilter_macs": self.prefilter_macs, "recipe": self.recipe}

    def __repr__(self) -> str:
        sites = [r["name"] for r in self.rows if r["site"]]
        return (f"Layers(input {self.input_shape}: {len(self.rows)} modules, {len(sites)} sites; suggested "
                f"{', '.join(self.suggested_sites) or 'none'}; stem {self.stem})")


def layers(model: Any, data: Any = None, *, arch: str | None = None, mean=None, std=None, logits: str | None = None,
           device: str | torch.device = "auto") -> Layers:
    """The named layers of `model` (an `nn.Module`, a `PatchedModel` or a checkpoint path, plain or patched)
    on one forward of `data` (or of random images of its recorded input shape): where patches can go, what a fixer
    would cost at each site, and the sites `hardener.patch` would suggest. `harden layers` shows the same."""
    with speaking_python(_keywords(layers)):
        patched = model_to_run(model, arch, mean, std, logits)[0]  # patched checkpoints too, as harden layers
        return layer_table(patched, None if data is None else as_dataset(data), pick_device(device))


def layer_table(patched: PatchedModel, ds: hdata.Dataset | None, device: torch.device) -> Layers:
    """`hardener.layers` of a loaded model, in the command line's words (`harden layers` renders it)."""
    infos = finish(patched, ds, device)
    sug = suggest(patched.net, infos)
    recipe = PatchOptions.build(DEFAULT_PRESET, {})[0]  # the default recipe's sizes (a plain `harden patch`)
    fixer = C.site_fixer_macs(patched.net, infos, recipe)
    shape = tuple(patched.model.spec.shape)
    return Layers(shape, [{**i.to_json(), "fixer_macs": fixer.get(i.name)} for i in infos],
                  C.count(patched).macs_base, sug.sites, sug.stem, sug.why, sug.skipped, sug.note,
                  C.prefilter_macs(patched.net, shape, recipe),
                  {"preset": DEFAULT_PRESET, "rho": recipe.rho, "width": recipe.width})


def parse_threats(text: str, what: str = "threat") -> tuple[str, ...]:
    parts = [t.strip().lower() for t in str(text).split(",") if t.strip()]
    if parts == ["all"]:
        return E.THREATS
    bad = [t for t in parts if t not in E.THREATS]
    if bad or not parts:
        raise InputError(f"{what} '{text}': choose {', '.join(E.THREATS)}, a comma list of them, or all")
    return tuple(t for t in E.THREATS if t in parts)


__all__ = ["Layers", "PatchOptions", "Report", "as_dataset", "evaluate", "layers", "patch"]
