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
    # sequential CERTIFY (anytime-valid, stops each sample once decided), not fixed n: on the smoothed example base
    # at sigma 0.25 / 0.5 it certified what fixed n = 100,000 certifies on the same 50 images at every reported radius
    # with 35x / 12.5x fewer noisy forwards (bench/RESULTS.md, "Certified robustness on a CPU")
    "sequential": True,
}
