"""What `harden patch --method ... [--preset ...]` asks for, checked before anything is loaded."""
from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import InputError
from .choices import PRESET_DIR, PRESETS

if TYPE_CHECKING:
    import torch


def method_choices() -> tuple[str, ...]:
    """What --method takes: the patch kinds --at places, the BatchNorm kinds --bn places, the training methods (as
    registered now, in registration order)."""
    from .. import methods
    from ..patches import bn_kinds, site_kinds

    return (*site_kinds(), *bn_kinds(), *(n for n in methods.names() if n != methods.DEFAULT_METHOD))


@dataclass
class Methods:
    site_kind: str | None  # fixer | denoise | prefilter: the kind of --at sites without a KIND: prefix
    auxbn: bool  # BatchNorm twins (`bn_kind`) on the --bn layers
    train: str | None  # the training method --method names (None: the default, patches on a frozen base)
    bn_kind: str = "auxbn"

    @property
    def fit_method(self) -> str:
        from ..methods import DEFAULT_METHOD

        return self.train or DEFAULT_METHOD

    @property
    def full(self) -> str | None:
        """The training method when it fine-tunes every base weight (adv-train, advprop, advamd: not a patch)."""
        from .. import methods

        return self.train if self.train and methods.get(self.train).trains_base else None


def parse_methods(text: str, bn: str | None, at: str | None) -> Methods:
    from .. import methods
    from ..patches import DEFAULT_BN_KIND, DEFAULT_SITE_KIND, bn_kinds, site_kinds

    parts = [p.strip().lower() for p in text.split(",") if p.strip()]
    choices = method_choices()
    unknown = [p for p in parts if p not in choices]
    if unknown or not parts:
        raise InputError(f"unknown --method '{', '.join(unknown) or text}' (choose from {', '.join(choices)}; "
                         "combine patch kinds with commas, e.g. fixer,auxbn)")
    trains = [p for p in parts if p in methods.REGISTRY]
    full = [p for p in trains if methods.get(p).trains_base]
    kinds = [p for p in parts if p in site_kinds()]
    twins = [p for p in parts if p in bn_kinds()]
    if full and (len(parts) > 1 + len(twins)):
        raise InputError(f"--method {full[0]} fine-tunes the whole model and cannot be combined with "
                         f"{', '.join(p for p in parts if p not in full and p not in twins)}")
    for what, named in (("training methods", trains), ("site kinds", kinds), ("BatchNorm kinds", twins)):
        if len(named) > 1:
            raise InputError(f"--method names two {what} ({', '.join(named)}): give one"
                             + (", and put others on --at as KIND:SITE" if what == "site kinds" else ""))
    train = methods.get(trains[0]) if trains else None
    auxbn = bool(twins) or bn is not None or (train is not None and train.auxbn == "required")
    if train is not None and train.auxbn == "forbidden" and auxbn:
        raise InputError(f"--method {train.name} fine-tunes the base's own BNs: drop auxbn / --bn")
    if full and at:
        raise InputError(f"--method {full[0]} fine-tunes the whole model: --at sites do not apply")
    site_kind = kinds[0] if kinds else (DEFAULT_SITE_KIND if not full and not auxbn else None)
    if site_kind is None and at and not full:
        site_kind = DEFAULT_SITE_KIND  # --at without a site kind in --method: fixers, as before
    return Methods(site_kind, auxbn, trains[0] if trains else None, twins[0] if twins else DEFAULT_BN_KIND)


def split_recipe(method: str, patch: str | None, train: str | None, at: str | None,
                 method_given: bool) -> tuple[str, str | None]:
    """`--patch KIND[:SITE],...` (what is patched) and `--train METHOD` (what trains) as `--method` and `--at` say
    them, which the run reads: the bare kinds and the method in `method`, the KIND:SITE entries added to `at`; a run
    spelled either way is the same run. `--method` (kinds and a method in one list) stays as an alias: giving it
    with --patch or --train is an error. Neither given: `method` and `at` as they are. Errors name the flags (the
    library's entry points say them as keywords: `options.wording`)."""
    from .. import methods
    from ..patches import DEFAULT_SITE_KIND, KINDS

    if patch is None and train is None:
        return method, at
    m_, p_, t_ = "--method", "--patch", "--train"
    if method_given:
        raise InputError(f"{m_} names patch kinds and a training method in one list, {p_} and {t_} name them "
                         "apart: give one spelling")
    entries = []  # KIND or KIND:SITE; kinds are case-insensitive, site names are the model's own (Mixed_5b)
    for p in (patch or "").split(","):
        kind, sep, site = p.strip().partition(":")
        if kind or site:
            entries.append(f"{kind.strip().lower()}{sep}{site.strip()}")
    kinds = [p for p in entries if ":" not in p]
    for kind in kinds + [p.split(":", 1)[0] for p in entries if ":" in p]:
        if kind not in KINDS:
            raise InputError(f"{p_} '{kind}' is not a patch kind (choose from {', '.join(KINDS)}; a training "
                             f"method goes to {t_})")
    train = (train or "").strip().lower() or None
    if train is not None and (train not in methods.REGISTRY):
        raise InputError(f"{t_} '{train}' is not a training method (choose from {', '.join(methods.names())}; a "
                         f"patch kind goes to {p_})")
    parts = [*kinds, *([train] if train and train != methods.DEFAULT_METHOD else [])]
    sited = [p for p in entries if ":" in p]
    return ",".join(parts or [DEFAULT_SITE_KIND]), ",".join([*([at] if at else []), *sited]) or None


# Presets are declarative files shipped with the package (hardener/presets/NAME.toml): a description, the
# threat model the recipe is meant to withstand, an optional warning for its reports, and [options] whose keys
# are `harden patch` option names. Options given on the command line or in harden.toml win over them.
DEFAULT_PRESET = "robust"
# Options that shape the recipe: with none of them given (command line or config file), `harden patch` uses
# DEFAULT_PRESET; with any of them, the built-in defaults, so an explicit recipe is never silently mixed.
RECIPE_OPTIONS = ("method", "patch", "train", "at", "at_regex", "adversary")
_PRESET_KEYS = {"description", "threat_model", "warning", "options"}
THREAT_MODELS = ("white-box", "transfer", "certified")


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    threat_model: str  # what the recipe is meant to withstand: white-box or transfer
    options: dict
    warning: str = ""

    def record(self) -> dict:
        return {"name": self.name, "threat_model": self.threat_model, "description": self.description}


def resolve_preset(name: str | None, given, known_options: set[str] | None = None) -> tuple[Preset | None, dict]:
    """The preset a `harden patch` run uses, and the options it contributes. `name` is a preset name, None (no
    preset), or "auto": DEFAULT_PRESET unless an option in `given` (the names the user set) shapes the recipe, so an
    explicit recipe is never mixed with a preset. The user's --validate split replaces the preset's --select-on."""
    if name == "auto":
        name = None if any(k in given for k in RECIPE_OPTIONS) else DEFAULT_PRESET
    if name is None:
        return None, {}
    preset = load_preset(name, known_options)
    options = dict(preset.options)
    if "validate" in given:
        options.pop("select_on", None)
    return preset, options


def preset_names() -> list[str]:
    return list(PRESETS)


def preset_help(flags: dict[str, str], builtin: dict[str, object]) -> str:
    """`harden patch --help`'s epilog: the [default: ...] values shown are a plain run's (DEFAULT_PRESET's where it
    sets them); what each preset sets, and what a custom recipe starts from instead. `flags` maps option names to
    their flags (attack_name -> --attack), `builtin` holds the built-in defaults."""
    def show(opts: dict) -> str:
        def one(k, v) -> str:
            flag = flags.get(k, "--" + k.replace("_", "-"))
            if v is None and k == "at":
                return f"{flag} (the suggested sites, no pre-filter)"
            if isinstance(v, bool):
                return flag if v else f"--no-{flag[2:]}"
            return f"{flag} {','.join(map(str, v)) if isinstance(v, (list, tuple)) else v}"
        return " ".join(one(k, v) for k, v in opts.items())

    lines, custom = [], {}
    for name in preset_names():
        try:
            p = load_preset(name)
        except InputError:  # a broken preset file: its own error comes when it is used
            continue
        lines.append(f"{name} ({p.threat_model}{', the default' if name == DEFAULT_PRESET else ''}): {show(p.options)}")
        if name == DEFAULT_PRESET:
            custom = {k: builtin.get(k) for k in p.options if (builtin.get(k) is not None or k == "at")
                      and builtin.get(k) != p.options[k]}
    head = (f"Values marked [default: ...] are those of a plain `harden patch`, which runs --preset {DEFAULT_PRESET}. "
            "Given --method (or --patch, --train), --at, --at-regex or --adversary, the recipe is custom and starts "
            f"from the built-in defaults instead{': ' + show(custom) if custom else ''}. Options you give win over a "
            "preset's. Presets:")
    return "\n\n".join([head, *lines])


def load_preset(name: str, known_options: set[str] | None = None, path: Path | None = None) -> Preset:
    """Read and validate a preset file; unknown keys (top level or under [options]) are input errors."""
    path = path or PRESET_DIR / f"{name}.toml"
    if path == PRESET_DIR / f"{name}.toml" and name not in preset_names():
        raise InputError(f"unknown --preset '{name}' (choose from {', '.join(preset_names())})")
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise InputError(f"preset file '{path}' is not valid TOML: {e}") from None
    unknown = sorted(set(doc) - _PRESET_KEYS)
    if unknown:
        raise InputError(f"preset file '{path}' has unknown key '{unknown[0]}' (allowed: "
                         f"{', '.join(sorted(_PRESET_KEYS))})")
    options = doc.get("options", {})
    if not isinstance(options, dict):
        raise InputError(f"preset file '{path}': [options] must be a table")
    if known_options is not None:
        bad = sorted(k for k in options if k.replace("-", "_") not in known_options)
        if bad:
            raise InputError(f"preset file '{path}': [options] has unknown key '{bad[0]}' (keys are `harden patch` "
                             "option names)")
    threat = doc.get("threat_model")
    if threat not in THREAT_MODELS:
        raise InputError(f"preset file '{path}': threat_model must be one of {', '.join(THREAT_MODELS)}, "
                         f"got {threat!r}")
    for key in ("description", "warning"):
        if not isinstance(doc.get(key, ""), str):
            raise InputError(f"preset file '{path}': {key} must be a string")
    return Preset(name=name, description=doc.get("description", ""), threat_model=threat,
                  options={k.replace("-", "_"): v for k, v in options.items()}, warning=doc.get("warning", ""))


# Held-out split of `harden patch` when --data is all the user has.
MIN_SPLIT_IMAGES = 50
MAX_HOLDOUT = 1000


@dataclass
class Split:
    train: "torch.Tensor"
    val: "torch.Tensor | None"  # model selection / validation images
    rest: "torch.Tensor"  # the pool of the report data (when no --eval-data)
    record: dict
    notes: list[str]


def holdout_size(text: str, n: int) -> int:
    from ..data import parse_subset

    try:
        size = parse_subset(text)
    except InputError:
        size = None
    if size is None or (isinstance(size, float) and not 0 < size < 1) or (isinstance(size, int) and size < 1):
        raise InputError(f"--holdout must be a fraction in (0, 1), a percentage or a count >= 1, got '{text}'")
    count = min(MAX_HOLDOUT, round(size * n)) if isinstance(size, float) else size
    return max(1, count)


def split_for_training(labels: "torch.Tensor", subset, has_eval_data: bool, n_val: int, holdout: str,
                       seed: int) -> Split:
    """Training, validation and report-pool indices of --data. When nothing is left outside the training subset and
    the run needs held-out images (model selection, or a report without --eval-data), a stratified, seeded part of
    --data is held out (`holdout`), and the notes say so. Too little data to split is an input error."""
    import torch

    from ..data import stratified_split

    n = int(labels.shape[0])
    record: dict = {"n": n, "seed": seed, "subset": subset, "carved": None}
    notes: list[str] = []
    if subset is not None:
        train, rest = stratified_split(labels, subset, seed)
    else:
        train, rest = torch.arange(n), torch.empty(0, dtype=torch.int64)
    if len(rest) == 0 and (n_val or not has_eval_data):
        counts = torch.bincount(labels)
        present = counts[counts > 0]
        if n < MIN_SPLIT_IMAGES or int(present.min()) < 2:
            small = int(torch.nonzero(counts == present.min()).flatten()[0])
            raise InputError(f"--data has {n} images (class {small} has {int(present.min())}): too few to hold out "
                             f"images for model selection and the report (needs at least {MIN_SPLIT_IMAGES} images "
                             "and 2 per class); add images, or pass --eval-data with other labelled images and "
                             "--select-on 0")
        size = min(holdout_size(holdout, n), n - len(present))
        train, rest = stratified_split(labels, n - size, seed)
        record["carved"] = {"held_out": size, "holdout": holdout}
        notes.append(f"held out {size:,} of {n:,} images (stratified, seed {seed}, --holdout {holdout}) for model "
                     f"selection and the report; training on the other {n - size:,}")
    val = None
    if n_val:
        avail = len(rest) if has_eval_data else len(rest) // 2
        if avail < 1:
            how = "a larger --holdout or --eval-data" if record["carved"] else "a smaller --subset"
            raise InputError(f"--select-on/--validate {n_val}: no images of --data are left outside the training "
                             f"images to validate on; give {how}")
        if n_val > avail:
            notes.append(f"--select-on/--validate {n_val}: only {avail:,} held-out images are available for it"
                         f"{'' if has_eval_data else ' (the other half is the report data)'}; validating on {avail:,}")
            n_val = avail
        pick, keep = stratified_split(labels[rest], n_val, seed + 1)
        val, rest = rest[pick], rest[keep]
    record.update(train=len(train), validation=0 if val is None else len(val),
                  report_pool=0 if has_eval_data else len(rest))
    return Split(train, val, rest, record, notes)
