"""The names the command line offers as choices for options backed by a table of implementations, stated without
importing torch so that `harden --help` shows them fast (`options.py`). The data-only ones live here and are imported
by their modules; a test checks the implementations' tables (`patches.ACTIVATIONS`, `evaluation.PRECISIONS`,
`methods.patch.LOSSES`) against the names here."""
from __future__ import annotations

# AutoAttack's versions as `--suite` names them -> the suite (`attacks.SUITES`).
SUITE_VERSIONS = {"standard": "autoattack", "plus": "autoattack-plus", "rand": "autoattack-rand"}
DENOISE_OPS = ("nonlocal-gaussian", "nonlocal-dot", "mean", "median", "bilateral")  # of denoise patches
ACTIVATIONS = ("linear", "tanh", "silu", "softplus", "gelu")  # of fixers (patches.fixer.ACTIVATIONS)
PRECISIONS = ("fp32", "bf16", "fp16")  # autocast of training and attacks (evaluation.PRECISIONS)
LOSSES = ("fixer", "trades", "rslad")  # --loss (methods.patch.LOSSES)
PREFILTER_DESIGNS = ("plain", "separable", "shuffle")  # of the input pre-filter (patches.prefilter.DESIGNS)
CONFIG_FILE = "harden.toml"  # read from the working directory when there is no --config (config.DEFAULT_FILE)
