from __future__ import annotations

import os
import sys
from pathlib import Path

# Parallel workers (pytest-xdist, `make test`) share the cores: each takes its share of them as threads, and so do
# the processes the tests start (OMP_NUM_THREADS), so that workers do not thrash each other's OpenMP threads.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    _share = max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    os.environ.setdefault("OMP_NUM_THREADS", str(_share))

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from hypothesis import settings as _hyp  # noqa: E402

import tiny_model  # noqa: E402

# Property tests draw the same examples on every run (CI must be deterministic); explicit
# @example cases carry the inputs that once failed.
_hyp.register_profile("deterministic", derandomize=True)
_hyp.load_profile("deterministic")

ARCH = f"{HERE / 'tiny_model.py'}:tiny"


def make_data(n: int = 90, classes: int = 3, size: int = 8, channels: int = 1, seed: int = 0):
    """Learnable toy images: class c is a bright band at rows c*size/classes, plus noise."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % classes
    x = torch.rand(n, channels, size, size, generator=g) * 0.3
    band = size // classes
    for i, c in enumerate(labels.tolist()):
        x[i, :, c * band:(c + 1) * band] += 0.6
    return (x.clamp(0, 1) * 255).round().to(torch.uint8), labels


def trained_tiny(seed: int = 0, steps: int = 60, **kw) -> torch.nn.Module:
    """A tiny model trained briefly, so it classifies the toy data and its BN statistics are non-trivial."""
    torch.manual_seed(seed)
    m = tiny_model.tiny(**kw)
    imgs, labels = make_data(n=150, seed=seed + 1)
    x = imgs.float() / 255
    opt = torch.optim.Adam(m.parameters(), lr=0.02)
    m.train()
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(m(x), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return m.eval()


def fresh_fixed(base: torch.nn.Module):
    """A copy of the tiny `base` with a seeded fixer after `block`: the same starting point for every training run."""
    from hardener.model.classifier import Classifier, InputSpec
    from hardener.patches import Fixer, FixerConfig, PatchedModel

    torch.manual_seed(0)
    net = type(base)()
    net.load_state_dict(base.state_dict())
    p = PatchedModel(Classifier(net.eval(), InputSpec(shape=[1, 8, 8])))
    p.attach("block", Fixer(8, FixerConfig()))
    return p


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    m = trained_tiny()
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(path))
    return path


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "toy.npz"
    imgs, labels = make_data()
    np.savez(path, images=imgs.numpy(), labels=labels.numpy())
    return path


@pytest.fixture(scope="session")
def tiny_test_data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "toy_test.npz"
    imgs, labels = make_data(n=45, seed=7)
    np.savez(path, images=imgs.numpy(), labels=labels.numpy())
    return path


@pytest.fixture()
def runner() -> CliRunner:
    return CliRunner()


FAST_PATCH = ["--epochs", "2", "--steps", "2", "--eps", "0.1", "--eval-samples", "15", "--eval-steps", "2",
              "--batch-size", "32", "--quiet"]


@pytest.fixture(scope="session")
def patched_ckpt(tmp_path_factory, tiny_ckpt, tiny_data) -> Path:
    from hardener.cli.app import main

    out = tmp_path_factory.mktemp("patched") / "tiny.hardened.safetensors"
    r = CliRunner().invoke(main, ["patch", str(tiny_ckpt), "--arch", ARCH, "--data", str(tiny_data),
                                  "--subset", "0.5", "--at", "features,block", "--out", str(out), *FAST_PATCH])
    assert r.exit_code == 0, r.output
    return out


def assert_input_error(result, *needles: str) -> None:
    """Exit 2, one clear 'Error:' line, no traceback."""
    assert_error(result, 2, *needles)


def assert_run_error(result, *needles: str) -> None:
    """Exit 3 (a failed run), one clear 'Error:' line, no traceback."""
    assert_error(result, 3, *needles)


def assert_error(result, code: int, *needles: str) -> None:
    text = result.output
    assert result.exit_code == code, text
    assert "Traceback" not in text, text
    errors = [line for line in text.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, text
    for n in needles:
        assert n.lower() in errors[0].lower(), errors[0]


@pytest.fixture()
def registries():
    """Patch kinds and training methods a test registers end with it."""
    from hardener import methods as M
    from hardener import patches as P

    kinds, trainers = dict(P.KINDS), dict(M.REGISTRY)
    yield
    P.KINDS.clear()
    P.KINDS.update(kinds)
    M.REGISTRY.clear()
    M.REGISTRY.update(trainers)


def tiny_with_a_fixer():
    """The tiny trained model with a fixer at `block` whose last layer is not zero: a patch that changes the model."""
    import torch

    from hardener.model.classifier import Classifier, InputSpec
    from hardener.patches import Fixer, FixerConfig, PatchedModel

    p = PatchedModel(Classifier(trained_tiny(), InputSpec(shape=[1, 8, 8])))
    fx = Fixer(8, FixerConfig())
    torch.nn.init.normal_(fx.conv2.weight, std=0.3)
    p.attach("block", fx)
    return p
