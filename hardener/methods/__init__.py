"""Training methods, looked up by name: one module each, behind the `Method` contract of `base.py`.

The order of the imports below is the order of the `--method` choices.
"""
from . import adv_train, advamd, advprop, patch  # noqa: F401  (they register themselves)
from .base import (
    DEFAULT_METHOD,
    REGISTRY,
    Batch,
    Method,
    NoOptions,
    build,
    check_options,
    get,
    names,
    register_method,
    with_distillation,
)

__all__ = ["Batch", "DEFAULT_METHOD", "Method", "NoOptions", "REGISTRY", "build", "check_options", "get", "names",
           "register_method", "with_distillation"]
