"""The names the command line offers as choices for options backed by a table of implementations, stated without
importing torch so that `harden --help` shows them fast (`cli/options.py`). The data-only ones live here and are imported
by their modules; a test checks the implementations' tables (`patches.ACTIVATIONS`, `evaluation.threats.PRECISIONS`,
`methods.patch.LOSSES`) against the names here."""
from __future__ import annotations

from enum import StrEnum
from pathlib import Path


class Adversary(StrEnum):
    """Where the second input of each training step comes from, with one meaning everywhere: `--adversary` chooses
    between the first two (`ADVERSARY_CHOICES`); a training method's `adversary()` answers with any of them."""

    BASE = "base"  # adversarial examples of the frozen base (made once for the whole set when the inputs do not change)
    PATCHED = "patched"  # of the model being trained (patched, or fully fine-tuned), every step: adaptive
    ONCE = "once"  # of the original model, made once before training, always (AdvAmd's stage 1)
    NOISE = "noise"  # Gaussian noise (--noise-sigma: denoised smoothing)


ADVERSARY_CHOICES = (Adversary.BASE.value, Adversary.PATCHED.value)  # what --adversary takes

# AutoAttack's versions as `--suite` names them -> the suite (`attacks.SUITES`).
SUITE_VERSIONS = {"standard": "autoattack", "plus": "autoattack-plus", "rand": "autoattack-rand"}
DENOISE_OPS = ("nonlocal-gaussian", "nonlocal-dot", "mean", "median", "bilateral")  # of denoise patches
ACTIVATIONS = ("linear", "tanh", "silu", "softplus", "gelu")  # of fixers (patches.fixer.ACTIVATIONS)
PRECISIONS = ("fp32", "bf16", "fp16")  # autocast of training and attacks (evaluation.threats.PRECISIONS)
LOSSES = ("fixer", "trades", "rslad")  # --loss (methods.patch.LOSSES)
PREFILTER_DESIGNS = ("plain", "separable", "shuffle")  # of the input pre-filter (patches.prefilter.DESIGNS)
TWIN_STATS = ("batch", "joint", "frozen")  # how BN twins normalise while training (--twin-stats; training.fit)
NORMS = ("Linf", "L2")  # the threat model's norm (--norm)
REPORT_BUDGETS = ("quick", "full")  # of harden patch's report after training (--report-budget; training.report)
CONFIG_FILE = "harden.toml"  # read from the working directory when there is no --config (config.DEFAULT_FILE)

# The recipes `--preset` names: the files shipped in hardener/presets/ (`recipe.load_preset` reads them)
PRESET_DIR = Path(__file__).resolve().parent.parent / "presets"
PRESETS = tuple(sorted(p.stem for p in PRESET_DIR.glob("*.toml")))
