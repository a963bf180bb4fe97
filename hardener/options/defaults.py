"""The defaults of `harden eval` and `harden certify`, stated once and torch-free: the command line's options
(`cli.options.EVAL`/`CERTIFY`), the library's keywords (`hardener.evaluate`, `hardener.certify`) and the runs'
configs (`evaluation.threats.EvalConfig`, `certification.smoothing.SmoothingConfig`) all read them here
(`tests/test_option_registry.py` checks that none of them states its own). `harden patch`'s are `PatchOptions`'."""
from __future__ import annotations

EVAL = {
    "attack": "apgd-ce",  # the attacks: a comma list
    "eps": "8/255",  # in pixel units, as written (`attacks.parse_eps` reads it)
    "norm": "Linf",
    "restarts": 1,
    "queries": 5000,  # Square's query budget
    "threat": "all",
    "batch_size": 256,
    "seed": 0,
    "precision": "fp32",
}

CERTIFY = {
    "sigma": 0.25,  # the noise level, pixel units
    "n0": 100,  # draws that select the class
    "n": 100_000,  # draws that estimate its probability (the cap of a sequential run)
    "alpha": 0.001,  # the failure probability of a certificate
    "batch_size": 1000,  # noisy copies per forward pass
    "seed": 0,
}
