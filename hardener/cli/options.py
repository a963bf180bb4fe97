"""The options of every `harden` command, as data: `cli/app.py` turns each `Opt` into a click option (this module does
not import click, nor torch: `harden --help` stays fast). The defaults of `harden patch`'s training options come from
`PatchOptions`, where each is stated once; the options of patch kinds and training methods are generated from their
configs' declarations (`optspec`, `owned_opts`); choices from `hardener.options.choices` and the presets folder.

Order matters: `--help` lists options in the order given here.
"""
from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields
from typing import Any

from ..options import defaults as DEFAULTS
from ..options import optspec, owners
from ..options.choices import ADVERSARY_CHOICES, NORMS, PRECISIONS, REPORT_BUDGETS, SUITE_VERSIONS, TWIN_STATS
from ..options.patch_options import PatchOptions
from ..options.recipe import DEFAULT_PRESET, preset_names


class Choice(tuple):
    """One of these strings (click.Choice)."""


@dataclass(frozen=True)
class PathType:
    """A path (click.Path) with these constraints."""

    exists: bool = False
    file_okay: bool = True
    dir_okay: bool = True


class BatchSize:
    """A positive integer, or `auto` (the largest power of two that fits, probed before the evaluation)."""

    name = "N|auto"

    @staticmethod
    def parse(value: Any) -> int | str:
        """The value, or ValueError with the requirement."""
        if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
            return value
        if str(value).strip().lower() == "auto":
            return "auto"
        try:
            v = int(str(value).strip())
        except ValueError:
            v = 0
        if v < 1:
            raise ValueError(f"must be a positive integer or auto, got '{value}'")
        return v


class PixelLevel:
    """A number in pixel units, or a fraction like 64/255 (`validate.parse_level`)."""

    name = "X|A/B"

    @staticmethod
    def parse(value: Any) -> float:
        from ..options.validate import parse_level

        return parse_level(value)


PIXEL_LEVEL = PixelLevel()
FILE = PathType(dir_okay=False)
FOLDER = PathType(file_okay=False)
EXISTING_FILE = PathType(exists=True, dir_okay=False)


@dataclass(frozen=True)
class Opt:
    """One option: its declarations (flags, then the parameter name if it differs) and click's keyword arguments,
    with `type` a Python type, a `Choice` or a `PathType`."""

    decls: tuple[str, ...]
    kwargs: dict = field(default_factory=dict)


def opt(*decls: str, **kwargs: Any) -> Opt:
    return Opt(decls, kwargs)


_PATCH_DEFAULTS = {f.name: f.default for f in fields(PatchOptions) if f.default is not MISSING}


def popt(*decls: str, **kwargs: Any) -> Opt:
    """An option of `harden patch` that is a field of `PatchOptions`: its default comes from there."""
    name = decls[1] if len(decls) > 1 else decls[0].split("/")[0].lstrip("-").replace("-", "_")
    return Opt(decls, {"default": _PATCH_DEFAULTS[name], **kwargs})


MODEL = (
    opt("--arch", help="Model constructor: package.module:callable or path/to/file.py:callable."),
    opt("--arch-kwargs", help="JSON object of keyword arguments for --arch."),
    opt("--trust-pickle", is_flag=True, help="Allow loading a whole pickled nn.Module (runs its code)."),
    opt("--trust-arch", is_flag=True,
        help="Use the architecture and kwargs a patched checkpoint records (else only --arch or a "
             "HARDEN_TRUSTED_ARCH module prefix; see docs/reliability.md, Security model)."),
    opt("--mean", help="Per-channel mean the model expects (comma list); normalisation is wrapped "
                       "inside the model, attacks work on [0,1] pixels."),
    opt("--std", help="Per-channel std the model expects (comma list)."),
    opt("--preprocessor", help="A Hugging Face preprocessor_config.json: --mean/--std from its image_mean/image_std."),
    opt("--logits", help="Key or index of the logits in a tuple/dict/object output."),
    opt("--input-shape", help="C,H,W where it cannot be inferred from the data."),
    opt("--device", default="auto", show_default=True,
        help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps."),
    opt("--deterministic", is_flag=True,
        help="Deterministic kernels (for GPU runs; CPU runs are deterministic for a thread count)."),
    opt("--seed", default=0, show_default=True, type=int),
    opt("--quiet", is_flag=True,
        help="No progress bars; patch, eval and certify also leave out their plan and notes (warnings, errors and "
             "the summary stay)."),
    opt("--config", type=FILE, help="TOML config file (default: ./harden.toml)."),
)

DATA = (
    opt("--subset", help="Fraction (0.1 or 10%) or count (600) of --data, stratified and seeded."),
    opt("--classes", type=EXISTING_FILE, help="Class names in model order (JSON list/object or one per line)."),
    opt("--resize", help="Resize images to H,W."),
    opt("--crop", help="Centre-crop images to H,W (after --resize)."),
)

ALLOW_LOW_ACCURACY = opt(
    "--allow-low-accuracy", is_flag=True,
    help="Go on when the model's clean accuracy on the labelled data is near chance (by default a stop: the input "
         "is then usually not what it was trained on: --mean/--std, --input-shape or the class map).")
ADAPTIVE_EPS = opt("--eps", "adaptive_eps", default="8/255", show_default=True,
                   help="Perturbation budget of the neighbour search and the post-training attacks.")
ADAPTIVE = (
    opt("--reference-data", help="Labelled training data the adaptive post-training samples from."),
    opt("--neighbour", default="pgd", show_default=True, type=Choice(["pgd", "targeted"]),
        help="pgd: untargeted PGD from the input; targeted: every other class, keep the most confident."),
    opt("--neighbour-steps", default=20, show_default=True, type=int, help="Steps L of that search."),
    opt("--post-train", default="fixed", show_default=True, type=Choice(["fixed", "fast", "pgd"]),
        help="fixed: δ = x'' − x' (paper eq. 5); fast: FGSM with random start; pgd: PGD with random start."),
    opt("--iterations", default=10, show_default=True, type=int, help="Post-training iterations K."),
    opt("--post-batch", default=128, show_default=True, type=int,
        help="Reference samples per iteration M (M/2 of each class)."),
    opt("--adapt", default="patches", show_default=True, type=Choice(["patches", "all"]),
        help="Post-train only the patches (frozen base) or every weight."),
    opt("--post-lr", default=1e-3, show_default=True, type=float, help="SGD learning rate (momentum 0.9)."),
)

LAYERS = (
    opt("--data", help="Data to take one batch from (instead of --input-shape)."),
    *MODEL, *DATA,
    opt("--json", "as_json", is_flag=True, help="Print the table as JSON on stdout."),
)

def owned_opt(name: str, spec: optspec.Option) -> Opt:
    """The `harden patch` option of an option a patch kind or method declares (`optspec.Option`)."""
    flag = optspec.flag(name, spec)
    decls = (flag,) if flag.lstrip("-").replace("-", "_") == name else (flag, name)
    d, t = spec.default, spec.value_type
    if t is bool:
        return Opt(decls, {"default": d, "is_flag": True, "help": spec.help})
    kwargs: dict[str, Any] = {"default": ",".join(f"{v:g}" for v in d) if isinstance(d, tuple) else d,
                              "show_default": d is not None, "help": spec.help}
    if spec.choices is not None:
        kwargs["type"] = Choice(spec.choices)
    elif t in (int, float):
        kwargs["type"] = t
    return Opt(decls, kwargs)


def owned_opts() -> tuple[Opt, ...]:
    """The options of the patch kinds and methods known now (`owners.owned()`), in their owners' order: the command
    line builds them when a command runs, so a kind or method registered from outside brings its own."""
    return tuple(owned_opt(name, spec) for name, (_, spec) in owners.owned().items())


def patch_specs() -> tuple[Opt, ...]:
    """`harden patch`'s options: its own (`PATCH_CORE`), those of the kinds and methods after `--preset`."""
    at = next(i for i, s in enumerate(PATCH_CORE) if s.decls[0] == "--preset") + 1
    return (*PATCH_CORE[:at], *owned_opts(), *PATCH_CORE[at:])


PATCH_CORE = (
    opt("--data", help="Training data: image folder, tensor file, or fashion-mnist:train."),
    popt("--at", help="Sites, comma-separated (KIND:SITE allowed). Default: chosen automatically."),
    popt("--at-regex", help="Regex matching whole site names."),
    popt("--method", show_default=True,
         help="fixer, token-fixer, denoise or prefilter (the kind of --at sites; a fixer at a transformer's token "
              "site is a token fixer), auxbn (twins of the --bn layers), "
              "combined with commas (fixer,auxbn); or one full fine-tuning method that changes every base "
              "weight: adv-train, advprop, advamd. --patch and --train say the same apart."),
    popt("--patch", help="What is patched: patch kinds, comma-separated: fixer, token-fixer, denoise or prefilter (the "
                         "kind of --at sites), auxbn (twins of the --bn layers), or KIND:SITE (a kind at one site, as "
                         "in --at). With --train, the two-part spelling of --method."),
    popt("--train", help="What trains: patch (the patches alone, on a frozen base: the default), or a full fine-tuning "
                         "method that changes every base weight: adv-train, advprop, advamd."),
    popt("--bn", help="Norm layers that get auxiliary twins: names, a regex, all (every BatchNorm; on a model "
                      "without, every LayerNorm), or auto (all if the model has any, else none); implies auxbn."),
    popt("--route", type=Choice(["adv", "main"]),
         help="Default inference route of auxiliary BNs stored in the checkpoint (default: adv for auxbn "
              "patches, main for advprop/advamd)."),
    opt("--preset", type=Choice(preset_names()),
        help=f"A measured recipe (a file in hardener/presets/); options given explicitly win over it. Default: "
             f"{DEFAULT_PRESET} when none of --method/--patch/--train/--at/--at-regex/--adversary is given (see "
             "docs/methods.md)."),
    popt("--smooth-grad", help="softplus:ALPHA — attacks in training see the base's ReLUs with a "
                               "parametric-softplus backward (forward unchanged)."),
    popt("--budget", help="Inference multiply-adds of the patched model relative to the base (e.g. 1.25), or none: "
                           "the recipe is sized to fit before training (pre-filter width and design, --rho, sites); "
                           "a measured latency past it is a warning in the plan."),
    popt("--unlabeled", help="Images without labels for robust self-training: the frozen base labels them and they join "
                             "training (a folder, a tensor file, or `rest`: the images of --data outside the training, "
                             "validation and report images, their labels ignored)."),
    popt("--pseudo-threshold", type=float, show_default=True,
         help="Keep --unlabeled images the base is at least this confident on (softmax)."),
    popt("--pseudo-ratio", type=float, show_default=True,
         help="Pseudo-labelled images per labelled image in each epoch (taken in turn from all of them)."),
    popt("--attack", "attack_name", show_default=True, help="Training attack."),
    popt("--eps", show_default=True, help="Perturbation budget in pixel units (8/255, 0.1)."),
    popt("--norm", show_default=True, type=Choice(list(NORMS))),
    popt("--steps", type=int, show_default=True, help="Training attack steps."),
    popt("--alpha", type=float, help="Step size of the pgd training attack (default 2.5·eps/steps)."),
    popt("--eps-warmup", show_default=True, type=float,
         help="Epochs over which the training eps ramps up from 0 (adaptive adversary)."),
    popt("--ema", show_default=True, type=float,
         help="Decay of an exponential moving average of the trained weights (e.g. 0.99; 0 = off): validation, "
              "--select-on and the written patch use the average."),
    popt("--twin-stats", show_default=True, type=Choice(TWIN_STATS),
         help="How BN twins normalise while training: batch (each input by its own batch's statistics); joint (the "
              "clean and adversarial inputs in one batch, as the running statistics serve both); frozen (the "
              "base's running statistics throughout: the twins learn only their affine parameters). LayerNorm twins "
              "normalise each input alone: unchanged."),
    popt("--teacher", type=FILE,
         help="Robust distillation (--loss rslad): a checkpoint harden patched from the same base (e.g. a heavier, "
              "robust patch) whose soft labels on the clean input are the targets; frozen, never saved."),
    popt("--select-on", type=int, show_default=True,
         help="Hold out N images of --data outside the subset; keep the epoch with the best white-box "
              "accuracy on them (PGD-10)."),
    popt("--validate", type=int, show_default=True,
         help="Hold out N images of --data outside the subset and log clean, white-box and transfer accuracy "
              "on them after every epoch (without choosing an epoch: see --select-on)."),
    popt("--validate-every", show_default=True, type=int,
         help="Validate (--select-on, --validate) after every K-th epoch and the last only."),
    popt("--adversary", show_default=True, type=Choice(ADVERSARY_CHOICES),
         help="base: examples of the frozen base (transfer, the paper); patched: regenerated against "
              "the patched model every step (adaptive; always so for adv-train and advprop)."),
    popt("--epochs", show_default=True, type=int),
    popt("--batch-size", show_default=True, type=BatchSize(),
         help="Training batch; auto: 128, or 64 or 32 where 128 would give fewer than 400 optimiser steps (small "
              "data underfits in few steps)."),
    popt("--lr", type=float, help="Adam learning rate (default 3e-3 for patches, 1e-3 for full fine-tuning)."),
    popt("--lam", show_default=True, type=float, help="Feature distillation weight λ."),
    popt("--mu", show_default=True, type=float,
         help="Logit distillation weight: KL to the base logits on clean inputs (0 = the paper's loss)."),
    popt("--gamma", show_default=True, type=float, help="Focal CE γ (0 = cross-entropy)."),
    popt("--augment", is_flag=True, help="Pad + random crop + flip, applied before the attack."),
    popt("--cache/--no-cache", show_default=True,
         help="Transfer training without augmentation: cache the frozen base's answers (adversarial examples, "
              "distillation targets, the output before the first site) instead of recomputing them."),
    popt("--cache-limit", show_default=True,
         help="Memory for those caches (e.g. 512MiB, 8GiB); beyond it they spill to disk in fp16."),
    opt("--out", "out_path", type=FILE, help="Default: <stem>.hardened.safetensors."),
    opt("--force", is_flag=True, help="Overwrite an existing --out."),
    opt("--resume", is_flag=True, help="Continue the interrupted run saved in <out>.partial."),
    opt("--save-every", type=int, default=0, show_default=True,
        help="Also save resumable state every N steps (state is always saved each epoch and on SIGINT/SIGTERM)."),
    opt("--eval-data", help="Report data (default: the part of --data outside the subset)."),
    opt("--eval-samples", type=int, default=None,
        help="Seeded stratified subset of the report data (0 = all; default 500 quick, 1000 full)."),
    opt("--eval-steps", type=int, default=None,
        help="Report attack steps (default 20 quick, each attack's reference budget full)."),
    opt("--report-budget", type=Choice(list(REPORT_BUDGETS)), default="quick", show_default=True,
        help="quick: white-box APGD-CE (20 steps) and its transfer on up to 500 held-out images, a check that "
             "costs a few percent of training, not a verdict; full: the training attack with its reference "
             "budget on up to 1,000 images."),
    popt("--precision", show_default=True, type=Choice(PRECISIONS),
         help="Precision of training's forward passes, training attack and per-epoch validation attack (autocast; "
              "losses in fp32, loss scaling for fp16 on CUDA). Faster on GPUs and on CPUs with native bf16 "
              "(bench/RESULTS.md); the checkpoint is fp32 and the report's attacks run in fp32."),
    popt("--noise-sigma", type=PIXEL_LEVEL, show_default=True,
         help="Denoised smoothing (for harden certify): train on x + N(0, σ²) with the stability objective "
              "CE(f(D(x+δ)), f(x)'s class) instead of adversarial examples; --preset certify sets it."),
    popt("--holdout", show_default=True,
         help="When --data is all there is (no --subset leaves images aside, no --eval-data), hold out this "
              "stratified, seeded part of it (fraction or count, at most 1,000 images by default) for model "
              "selection and the report."),
    opt("--report", "report_path", type=FILE, help="Write the report (.json/.md/.html)."),
    opt("--mlflow", is_flag=True,
        help="Log parameters, the report's metrics, the report and the checkpoint to a new MLflow run (a child of "
             "the caller's run, if any) at MLFLOW_TRACKING_URI, else ./mlruns (needs harden[mlflow])."),
    ALLOW_LOW_ACCURACY, *MODEL, *DATA,
)

PATCH = patch_specs()  # with the built-in kinds' and methods' options (a later registration: `patch_specs()`)

EVAL = (
    opt("--data", help="Evaluation data (or `eval_data` in harden.toml)."),
    opt("--eval-data", hidden=True),
    opt("--attack", "attack_names", multiple=True,
        help=f"Attack(s): repeat or comma list. Default: {DEFAULTS.EVAL['attack']}."),
    opt("--precision", type=Choice(PRECISIONS), default=DEFAULTS.EVAL["precision"], show_default=True,
        help="Precision of the attacks' passes (autocast); examples are scored in fp32. Lower precision is "
             "faster on GPUs but its gradients can weaken attacks: the report says so."),
    opt("--suite", type=Choice(SUITE_VERSIONS),
        help="AutoAttack as the reference code runs it: standard (= --attack autoattack), plus, rand."),
    opt("--eps", default=DEFAULTS.EVAL["eps"], show_default=True),
    opt("--norm", default=DEFAULTS.EVAL["norm"], show_default=True, type=Choice(list(NORMS))),
    opt("--steps", type=int, help="Steps of iterative attacks (default: each one's reference budget)."),
    opt("--restarts", type=int, default=DEFAULTS.EVAL["restarts"], show_default=True),
    opt("--queries", type=int, default=DEFAULTS.EVAL["queries"], show_default=True, help="Square's query budget."),
    opt("--threat", default=DEFAULTS.EVAL["threat"], show_default=True,
        help="Threat models: whitebox, adaptive (BPDA through patches that may mask gradients), surrogate "
             "(transfer from --surrogate), transfer (from the base), blackbox (Square), a comma list, or all."),
    opt("--surrogate", type=FILE,
        help="A checkpoint to transfer attacks from (e.g. an adversarially fine-tuned copy of the base, "
             "`harden patch --method adv-train`): attacks computed on it, scored on the model (same --arch)."),
    opt("--max-samples", type=int, help="Seeded stratified subset of the data."),
    opt("--eps-sweep", help="Comma list of eps for a robustness curve (first iterative attack, white-box)."),
    opt("--fail-under", help="Gates, e.g. clean=0.85,robust=0.60 (robust = white-box worst case; needs an "
                             "iterative white-box attack in the run)."),
    opt("--allow-weak-gate", is_flag=True,
        help="Let --fail-under robust/transfer gate on a run without an iterative attack in that threat "
             "model (e.g. FGSM only)."),
    opt("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout."),
    opt("--report", "report_paths", multiple=True, type=FILE,
        help="Write the report: .json, .md or .html (repeatable)."),
    opt("--mlflow", is_flag=True,
        help="Log parameters, the report's metrics and the report file(s) to a new MLflow run (a child of the "
             "caller's run, if any) at MLFLOW_TRACKING_URI, else ./mlruns (needs harden[mlflow])."),
    opt("--batch-size", default=DEFAULTS.EVAL["batch_size"], show_default=True, type=BatchSize(),
        help="Images per attack batch, or auto: the largest power of two that fits in memory (probed)."),
    opt("--no-checks", is_flag=True, help="Skip the sanity checks (they cost a few extra attacks)."),
    opt("--resume", is_flag=True, help="Continue an interrupted evaluation with the same settings."),
    opt("--force", is_flag=True, help="Overwrite existing --report files."),
    opt("--state-dir", type=FOLDER,
        help="Folder for resumable evaluation state (default: $HARDEN_CACHE_DIR, else beside the first "
             "--report; with neither, nothing is saved and nothing can be resumed)."),
    opt("--smooth-grad", help="softplus:ALPHA — gradient attacks see the ReLUs with a parametric-softplus "
                              "backward (probes ReLU-induced gradient masking)."),
    opt("--route", type=Choice(["adv", "main"]),
        help="Auxiliary-BN route to evaluate (default: the one stored in the checkpoint)."),
    opt("--parent", type=FILE,
        help="The original checkpoint of a fully fine-tuned model (adv-train, advprop, advamd): the base "
             "rows and transfer attacks use it."),
    opt("--base-cache", type=FOLDER,
        help="Folder that keeps what depends on the base alone (its attack rows, the transfer examples) "
             "and reuses it when another model on the same base is evaluated with the same data and "
             "attack settings: evaluating many variants of one base costs the base's share once."),
    opt("--defense", default="static", show_default=True, type=Choice(["static", "adaptive"]),
        help="adaptive: evaluate inference-time post-training (harden predict --adaptive) instead: clean and "
             "robust accuracy on adversarial examples of the static model, plus an end-to-end attack on "
             "--e2e-samples inputs. Uses the first --attack and --eps."),
    opt("--e2e-samples", default=20, show_default=True, type=int,
        help="Inputs attacked end to end through the adaptive procedure (0 = none; each costs minutes)."),
    opt("--e2e-steps", default=10, show_default=True, type=int, help="PGD steps of that end-to-end attack."),
    ALLOW_LOW_ACCURACY, *ADAPTIVE, *MODEL, *DATA,
)

CERTIFY = (
    opt("--data", help="Labelled images to certify (folder, tensor file, fashion-mnist:test)."),
    opt("--sigma", type=PIXEL_LEVEL, default=DEFAULTS.CERTIFY["sigma"], show_default=True,
        help="Noise level σ (pixel units, or a fraction like 64/255)."),
    opt("--n0", type=int, default=DEFAULTS.CERTIFY["n0"], show_default=True, help="Noise draws that select the class."),
    opt("--n", "n_samples", "--draws", type=int, default=DEFAULTS.CERTIFY["n"], show_default=True,
        help="Noise draws that bound its probability (independent of the first; a sequential run's cap). Under "
             "torchrun give --draws: torchrun's own parser takes --n for an abbreviation of its --nnodes."),
    opt("--alpha", type=float, default=DEFAULTS.CERTIFY["alpha"], show_default=True,
        help="Failure probability of a certificate."),
    opt("--sequential/--fixed", default=DEFAULTS.CERTIFY["sequential"], show_default=True,
        help="Sequential CERTIFY draws in growing batches and stops each sample once its certificate is decided, "
             "with an anytime-valid bound (same guarantee; --n becomes the cap); --fixed is Cohen et al.'s CERTIFY, "
             "--n draws per sample, the reference, whose radii are not capped at --max-radius."),
    opt("--max-radius", type=float,
        help="The largest radius a sequential run certifies (default 2σ); a sample stops once it is reached."),
    opt("--batch-size", type=int, default=DEFAULTS.CERTIFY["batch_size"], show_default=True,
        help="Noisy copies per forward pass."),
    opt("--max-samples", type=int, help="Seeded stratified subset of the data."),
    opt("--tsv", "tsv_path", type=FILE,
        help="Per-sample rows: idx, label, predict, radius, correct, time (locuslab/smoothing's format), and draws "
             "when sequential."),
    opt("--report", "report_path", type=FILE, help="Report: .json or .md."),
    opt("--force", is_flag=True, help="Overwrite existing --tsv/--report files."),
    opt("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout."),
    opt("--resume", is_flag=True, help="Continue an interrupted certification with the same settings."),
    opt("--state-dir", type=FOLDER,
        help="Folder for resumable state (default: $HARDEN_CACHE_DIR, else beside --report or --tsv)."),
    *MODEL, *DATA,
)

PREDICT = (
    opt("--data", help="Inputs: an image folder or a tensor file (labels optional)."),
    opt("--json", "as_json", is_flag=True, help="One JSON object per input on stdout (JSON lines)."),
    opt("--max-samples", type=int, help="Only the first N inputs."),
    opt("--adaptive", is_flag=True, help="Inference-time post-training per input (slow: seconds per image)."),
    opt("--smooth", "smooth_sigma", type=PIXEL_LEVEL,
        help="Predict with the smoothed model at noise σ (randomized smoothing's PREDICT: abstains unless a "
             "binomial test separates the top two classes at --smooth-alpha)."),
    opt("--smooth-n", type=int, default=10_000, show_default=True, help="Noise draws per input for --smooth."),
    opt("--smooth-alpha", type=float, default=DEFAULTS.CERTIFY["alpha"], show_default=True,
        help="Test level of --smooth."),
    ADAPTIVE[0], ADAPTIVE_EPS, *ADAPTIVE[1:], *MODEL, *DATA,
)

EXPORT = (
    opt("--format", "fmt", default="torchscript", show_default=True, type=Choice(["torchscript", "export", "onnx"]),
        help="torchscript (torch.jit), export (a torch.export program, .pt2), onnx (needs the onnx package)."),
    opt("--out", "out_path", type=FILE, help="Default: <stem>.ts.pt, <stem>.pt2 or <stem>.onnx."),
    opt("--no-check", is_flag=True, help="Skip loading the file in a fresh interpreter to compare its logits."),
    opt("--force", is_flag=True),
    *MODEL,
)

# `--help` shows a command's options in these groups, in this order (each in the order of its command's tuple above).
GROUPS = {"data": "Data", "model": "Model", "recipe": "Recipe", "attack": "Attack", "training": "Training",
          "adaptive": "Adaptive defence", "smoothing": "Randomized smoothing", "output": "Output", "run": "Run"}
_GROUP_OF = {group: names.split() for group, names in {
    "data": "data subset holdout classes resize crop unlabeled pseudo_threshold pseudo_ratio eval_data max_samples",
    "model": "arch arch_kwargs trust_pickle trust_arch mean std preprocessor logits input_shape route parent "
             "allow_low_accuracy",
    "recipe": "preset method patch train at at_regex bn budget",
    "attack": "attack_name attack_names suite eps norm steps alpha restarts queries adversary eps_warmup smooth_grad "
              "threat surrogate eps_sweep precision no_checks",
    "training": "epochs batch_size lr teacher lam mu gamma augment ema twin_stats select_on validate validate_every "
                "noise_sigma cache cache_limit",
    "adaptive": "defense e2e_samples e2e_steps adaptive reference_data adaptive_eps neighbour neighbour_steps "
                "post_train iterations post_batch adapt post_lr",
    "smoothing": "n0 n_samples smooth_sigma smooth_n smooth_alpha sequential max_radius",
    "output": "out_path report_path report_paths report_budget eval_samples eval_steps tsv_path fail_under "
              "allow_weak_gate as_json fmt no_check force mlflow",
    "run": "device deterministic seed quiet config resume save_every state_dir base_cache help",
}.items()}
GROUP_OF = {name: group for group, names in _GROUP_OF.items() for name in names}
# Where one name means something else in a command.
COMMAND_GROUP_OF = {"patch": {"precision": "training", "route": "recipe"},
                    "eval": {"batch_size": "run"},
                    "certify": {"sigma": "smoothing", "alpha": "smoothing", "batch_size": "run"}}


def group_of(command: str, name: str) -> str:
    """The `--help` group of option `name` (a parameter name) of `command` (a key of `GROUPS`; "" for none: a test
    checks every option has one). Options of patch kinds and methods: their declaration's (`owners.owned`)."""
    owned = owners.owned().get(name) if command == "patch" else None
    return COMMAND_GROUP_OF.get(command, {}).get(name) or GROUP_OF.get(name) or (owned[0] if owned else "")


# `--help`'s Examples block: (what it does, the command).
EXAMPLES = {
    "layers": [("the layers of a model and the suggested patch sites",
                "harden layers model.safetensors --arch mypkg.models:resnet18 --input-shape 3,224,224")],
    "patch": [("the default recipe (white-box robust) on 10% of a labelled folder",
               "harden patch model.safetensors --arch mypkg.models:resnet18 --data train/ --subset 10%"),
              ("fixers at two sites trained on the frozen base's examples, a full report",
               "harden patch model.safetensors --arch mypkg.models:resnet18 --data train/ --method fixer "
               "--at layer2,layer3 --adversary base --report-budget full --report patch.html"),
              ("in examples/ (its harden.toml sets --arch, --mean, --std and --eps)",
               "harden patch fmnist_base.safetensors --data data/fashion-mnist-train-2000.npz")],
    "eval": [("APGD-CE at 8/255 on 1,000 test images, a JSON report on stdout",
              "harden eval model.hardened.safetensors --arch mypkg.models:resnet18 --data test/ --max-samples 1000 "
              "--json > report.json"),
             ("AutoAttack (standard), an HTML report, and a gate for CI: exit 1 below it",
              "harden eval model.hardened.safetensors --arch mypkg.models:resnet18 --data test/ --suite standard "
              "--report eval.html --fail-under clean=0.85,robust=0.50")],
    "certify": [("certified L2 radii at σ = 0.25 on 500 test images",
                 "harden certify model.hardened.safetensors --arch mypkg.models:resnet18 --data test/ --sigma 0.25 "
                 "--max-samples 500 --report certify.md")],
    "predict": [("classes of a folder of images, one JSON line each",
                 "harden predict model.hardened.safetensors --arch mypkg.models:resnet18 --data images/ --json")],
    "export": [("a TorchScript file that runs without harden, checked against the model",
                "harden export model.hardened.safetensors --arch mypkg.models:resnet18 --format torchscript")],
}
