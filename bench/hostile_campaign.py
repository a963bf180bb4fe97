"""Hostile-input campaign (issue 20): ~500 bad or malicious inputs through the real CLI, tallied.

Builds everything in a temporary folder (a tiny model, its checkpoint, toy data, one patched file made by
`harden patch`), then runs each case as `python -m hardener ...` in a subprocess (OMP_NUM_THREADS=1) in a
fresh working directory holding an `evil.py`, and records per case: exit code, traceback yes/no, payload
executed yes/no (payloads `touch` a marker file), leftover files yes/no (anything new besides the declared
outputs), inputs changed yes/no, hang (timeout) yes/no, and for a case whose numbers would lie whether it
was refused (exit 2 or 3). Read-only folders are made real by running those cases without CAP_DAC_OVERRIDE
(setpriv) when run as root; a full disk by RLIMIT_FSIZE. The `r2/` cases (issue 35) add trust checks through
/proc and symlinks, Pillow formats that run Ghostscript (a fake `gs` on PATH leaves the marker), declared
shapes past memory, sparse/meta/non-finite tensors in data files, edited state/cache/adversarial-example files
(made by the real CLI in `_states`), outputs onto inputs, options out of physical range and weak gates.

    python bench/hostile_campaign.py [--jobs 2] [--out bench/results/hostile_campaign.json] [--only SUBSTR,... [--merge]]
"""
from __future__ import annotations

import argparse
import collections
import concurrent.futures as cf
import hashlib
import json
import os
import platform
import resource
import shutil
import stat
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

REPO = Path(__file__).resolve().parent.parent
TINY_ARCH = '''
import torch
from torch import nn


class Tiny(nn.Module):
    def __init__(self, num_classes=3, width=4):
        super().__init__()
        w = width
        self.features = nn.Sequential(nn.Conv2d(1, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(),
                                      nn.Conv2d(w, 2 * w, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(2 * w),
                                      nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.BatchNorm2d(2 * w))
        self.head = nn.Sequential(nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * w, num_classes))

    def forward(self, x):
        h = self.features(x)
        return self.head(self.block(h) + h)


def tiny(num_classes=3, width=4):
    return Tiny(num_classes, width)
'''


@dataclass
class Case:
    name: str
    category: str
    argv: list[str]
    setup: object = None  # callable(case_dir) -> None, run before the command
    outputs: tuple[str, ...] = ()  # declared outputs (names in the case dir) that may appear
    expect: tuple[int, ...] = (2,)
    env: dict = field(default_factory=dict)
    nobody: bool = False  # run without CAP_DAC_OVERRIDE when root (read-only folders are real then)
    fsize: int | None = None  # RLIMIT_FSIZE in bytes (a full disk)
    inputs: tuple[str, ...] = ()  # extra input paths (absolute) that must not change
    lying: bool = False  # a run that would report numbers that lie: it must be refused (exit 2 or 3)
    forbidden_output: str = ""  # text on stdout/stderr that means a program (a module's import) ran


def make_data(n, seed=0, size=8, classes=3):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % classes
    x = torch.rand(n, 1, size, size, generator=g) * 0.3
    band = size // classes
    for i, c in enumerate(labels.tolist()):
        x[i, :, c * band:(c + 1) * band] += 0.6
    return (x.clamp(0, 1) * 255).round().to(torch.uint8).numpy(), labels.numpy()


def png_header(width, height):
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


class Pwn:
    """A pickle whose loading runs a command (what weights_only=True must refuse)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def digest(sd):
    from hardener.io.checkpoint import tensor_digest
    return tensor_digest(sd)


class World:
    """The shared, read-only inputs of every case."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.marker = root / "MARKER"
        (root / "tinyarch.py").write_text(TINY_ARCH)
        self.arch = f"{root / 'tinyarch.py'}:tiny"
        sys.path.insert(0, str(root))
        import tinyarch

        torch.manual_seed(0)
        m = tinyarch.tiny()
        imgs, labels = make_data(150, seed=1)
        x = torch.from_numpy(imgs).float() / 255
        opt = torch.optim.Adam(m.parameters(), lr=0.02)
        for _ in range(40):
            loss = torch.nn.functional.cross_entropy(m(x), torch.from_numpy(labels))
            opt.zero_grad()
            loss.backward()
            opt.step()
        m.eval()
        self.base = root / "base.safetensors"
        save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(self.base))
        self.data = root / "train.npz"
        np.savez(self.data, images=imgs, labels=labels)
        timgs, tlabels = make_data(30, seed=7)
        self.test = root / "test.npz"
        np.savez(self.test, images=timgs, labels=tlabels)
        self.patched = root / "patched.safetensors"
        r = run_cli(["patch", str(self.base), "--arch", self.arch, "--data", str(self.data), "--subset", "60",
                     "--at", "features,block", "--epochs", "1", "--steps", "1", "--eps", "0.1", "--eval-samples",
                     "10", "--eval-steps", "1", "--batch-size", "32", "--quiet", "--out", str(self.patched)], root)
        assert r.returncode == 0, r.stderr
        with safe_open(str(self.patched), framework="pt") as f:
            self.manifest = json.loads(f.metadata()["harden"])
        self.tensors = load_file(str(self.patched))
        self.classes = root / "classes.json"
        self.classes.write_text('["0", "1", "2"]')
        self.fakebin = root / "fakebin"  # a `gs` (Ghostscript) that leaves the marker if anything runs it
        self.fakebin.mkdir()
        for tool in ("gs", "gsx", "gswin64c"):
            (self.fakebin / tool).write_text(FAKE_GS.format(marker=self.marker))
            (self.fakebin / tool).chmod(0o755)
        self.states = _states(self)
        for p in root.iterdir():
            if p.is_file():
                p.chmod(0o644)
        root.chmod(0o755)

    def crafted(self, d: Path, manifest=None, tensors=None, redigest=True, name="crafted.safetensors") -> Path:
        m = json.loads(json.dumps(self.manifest)) if manifest is None else manifest
        t = dict(self.tensors) if tensors is None else tensors
        if redigest and isinstance(m, dict):
            if isinstance(m.get("tensors_sha256"), str):
                m["tensors_sha256"] = digest(t)
            if isinstance(m.get("base_tensors_sha256"), str):
                m["base_tensors_sha256"] = digest({k: v for k, v in t.items() if not k.startswith("harden.")})
        f = d / name
        save_file(t, str(f), metadata={"harden": m if isinstance(m, str) else json.dumps(m)})
        return f

    def patch_state_args(self, out: str) -> list[str]:
        return ["patch", str(self.base), "--arch", self.arch, "--data", str(self.data), "--subset", "60", "--at",
                "block", "--epochs", "4", "--steps", "1", "--eps", "0.1", "--eval-samples", "10", "--eval-steps", "1",
                "--batch-size", "16", "--adversary", "base", "--quiet", "--out", out]

    def eval_state_args(self) -> list[str]:
        return ["eval", str(self.patched), "--arch", self.arch, "--data", str(self.test), "--attack", "pgd,fgsm",
                "--eps", "0.15", "--steps", "3", "--batch-size", "8", "--no-checks", "--quiet"]

    def certify_state_args(self) -> list[str]:
        return ["certify", str(self.patched), "--arch", self.arch, "--data", str(self.test), "--sigma", "0.12",
                "--n0", "10", "--n", "50", "--max-samples", "8", "--quiet"]

    def cache_args(self) -> list[str]:
        return ["eval", str(self.patched), "--arch", self.arch, "--data", str(self.test), "--attack", "pgd", "--steps",
                "2", "--eps", "0.2", "--threat", "whitebox,transfer", "--batch-size", "8", "--no-checks", "--quiet"]

    def inputs(self) -> list[Path]:
        return [self.base, self.data, self.test, self.patched, self.classes, self.root / "tinyarch.py"]


def run_cli(argv, cwd, env_extra=None, nobody=False, fsize=None, timeout=60):
    env = {k: v for k, v in os.environ.items() if k not in ("HARDEN_TRUSTED_ARCH", "HARDEN_CACHE_DIR")}
    env.update({"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "PYTHONDONTWRITEBYTECODE": "1"})
    env.update(env_extra or {})

    def pre():
        if fsize is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
    # As root, folder permissions bind only without CAP_DAC_OVERRIDE: drop it (and its kin) for that run.
    prefix = ["setpriv", "--bounding-set=-dac_override,-dac_read_search,-fowner", "--"] if nobody else []
    return subprocess.run([*prefix, sys.executable, "-m", "hardener", *argv], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout, preexec_fn=pre, stdin=subprocess.DEVNULL)


# ---------------------------------------------------------------- the cases


EVIL_PY = "import os\nos.system('touch {marker}')\n\ndef net(**kw):\n    os.system('touch {marker}')\n"
PAYLOAD_ARCHS = [
    ("os:system", {"command": "touch {marker}"}), ("posix:system", {"command": "touch {marker}"}),
    ("subprocess:run", {"args": ["touch", "{marker}"]}), ("subprocess:Popen", {"args": ["touch", "{marker}"]}),
    ("subprocess:check_call", {"args": ["touch", "{marker}"]}), ("os:popen", {"cmd": "touch {marker}"}),
    ("builtins:exec", {"source": "open('{marker}', 'w')"}), ("evil:net", {}),
    ("pty:spawn", {"argv": ["touch", "{marker}"]}), ("torch.hub:load", {"repo_or_dir": "x", "model": "y"}),
    ("runpy:run_path", {"path_name": "evil.py"}), ("importlib:import_module", {"name": "evil"}),
    ("evil.py:net", {}), ("./evil.py:net", {}),
]


def _fmt(obj, marker):
    return json.loads(json.dumps(obj).replace("{marker}", str(marker)))


def cases(w: World) -> list[Case]:
    out: list[Case] = []
    A = w.arch
    cmd_args = {
        "predict": ["--data", str(w.test)],
        "eval": ["--data", str(w.test), "--attack", "fgsm", "--max-samples", "6", "--no-checks"],
        "layers": [],
        "export": ["--out", "x.ts.pt"],
    }

    # A. code execution through the manifest's arch
    for arch, kwargs in PAYLOAD_ARCHS:
        for cmd, extra in cmd_args.items():
            for trust, flags, env in (("none", [], {}), ("flag", ["--trust-arch"], {}),
                                      ("env", [], {"HARDEN_TRUSTED_ARCH": arch.split(":")[0].split(".")[0]})):
                def setup(d, arch=arch, kwargs=kwargs):
                    m = json.loads(json.dumps(w.manifest))
                    m["arch"], m["arch_kwargs"] = arch, _fmt(kwargs, w.marker)
                    w.crafted(d, m)
                out.append(Case(f"code-exec/{arch}/{cmd}/{trust}", "code-exec",
                                [cmd, "crafted.safetensors", *extra, "--quiet", *flags], setup, env=env,
                                outputs=("x.ts.pt",)))
    # user's --arch with hostile manifest kwargs (ignored unless trusted)
    for cmd, extra in cmd_args.items():
        def setup(d):
            m = json.loads(json.dumps(w.manifest))
            m["arch_kwargs"] = {"width": 4, "num_classes": 3}
            w.crafted(d, m)
        out.append(Case(f"code-exec/user-arch-manifest-kwargs/{cmd}", "code-exec",
                        [cmd, "crafted.safetensors", "--arch", A, *extra, "--quiet"], setup, expect=(0,),
                        outputs=("x.ts.pt",)))
    # pickles
    for cmd in ("layers", "patch", "predict"):
        def setup(d):
            torch.save({"state_dict": Pwn(w.marker)}, d / "model.pt")
        extra = {"layers": ["--input-shape", "1,8,8"], "patch": ["--data", str(w.data), "--epochs", "1"],
                 "predict": ["--data", str(w.test)]}[cmd]
        out.append(Case(f"code-exec/pickle-checkpoint/{cmd}", "code-exec", [cmd, "model.pt", "--arch", A, *extra,
                                                                             "--quiet"], setup))
    def pt_data(d):
        torch.save({"images": Pwn(w.marker), "labels": [0]}, d / "data.pt")
    out.append(Case("code-exec/pickle-data-pt", "code-exec", ["predict", str(w.patched), "--arch", A, "--data",
                                                              "data.pt"], pt_data))
    def npz_pickle(d):
        np.savez(d / "data.npz", images=np.array([Pwn(w.marker)], dtype=object), labels=np.zeros(1, np.int64))
    out.append(Case("code-exec/pickle-data-npz", "code-exec", ["predict", str(w.patched), "--arch", A, "--data",
                                                               "data.npz"], npz_pickle))
    # config files
    for key in ("trust_pickle = true", "trust-arch = true", "force = true", "[eval]\ntrust_pickle = true"):
        def setup(d, key=key):
            (d / "harden.toml").write_text(key + "\n")
        out.append(Case(f"config/{key.splitlines()[-1]}", "code-exec", ["predict", str(w.patched), "--arch", A,
                                                                         "--data", str(w.test)], setup))
    def cfg_module(d):
        (d / "harden.toml").write_text('arch = "evil:net"\n')
    out.append(Case("config/arch-module-in-cwd", "code-exec", ["predict", str(w.patched), "--data", str(w.test)],
                    cfg_module))
    def stray_module(d):
        (d / "safetensors.py").write_text(EVIL_PY.format(marker=w.marker))
        (d / "rich.py").write_text(EVIL_PY.format(marker=w.marker))
    out.append(Case("code-exec/stray-modules-in-cwd", "code-exec", ["predict", str(w.patched), "--arch", A, "--data",
                                                                    str(w.test), "--quiet"], stray_module,
                    expect=(0,)))

    # B. crafted manifests
    def mut(name, fn, redigest=True, tensors_fn=None, expect=(2,)):
        def setup(d):
            m = json.loads(json.dumps(w.manifest))
            t = dict(w.tensors)
            m = fn(m)
            if tensors_fn:
                t = tensors_fn(t)
            w.crafted(d, m, t, redigest=redigest)
        out.append(Case(f"manifest/{name}", "manifest", ["predict", "crafted.safetensors", "--arch", A, "--data",
                                                         str(w.test), "--quiet"], setup, expect=expect))

    def setk(path, value):
        def f(m):
            o = m
            for k in path[:-1]:
                o = o[k]
            o[path[-1]] = value
            return m
        return f

    def delk(path):
        def f(m):
            o = m
            for k in path[:-1]:
                o = o[k]
            del o[path[-1]]
            return m
        return f
    mut("not-json", lambda m: "{not json")
    mut("list", lambda m: "[]")
    mut("string", lambda m: '"harden"')
    mut("deep-nesting", lambda m: "[" * 100000 + "]" * 100000)
    mut("empty", lambda m: "")
    hostile = {"str": "x", "neg": -1, "null": None, "huge": 10 ** 14, "nan": float("nan"), "list": [1], "obj": {},
               "bool": True}
    for field_ in ("channels", "rho", "delta", "act", "final_relu", "site", "kind"):
        for vname, v in hostile.items():
            valid = (field_, vname) in (("delta", "neg"), ("final_relu", "bool"))  # legal values
            mut(f"patch.{field_}={vname}", setk(("patches", 0, field_), v), expect=(0,) if valid else (2,))
    for field_ in ("arch", "arch_kwargs", "input", "patches", "format_version", "route", "base_modified",
                   "tensors_sha256", "base_tensors_sha256", "base_sha256"):
        for vname in ("str", "neg", "null", "list", "obj"):
            # legal: no arch / a string arch (the user's --arch wins), empty kwargs, an empty input spec
            ok = (field_ == "arch" and vname in ("null", "str")) or (field_ in ("arch_kwargs", "input")
                                                                       and vname == "obj") \
                or (field_ == "base_sha256" and vname == "str")  # the source file's sha256: recorded, not checked
            mut(f"{field_}={vname}", setk((field_,), hostile[vname]), expect=(0,) if ok else (2,),
                redigest=not field_.endswith("tensors_sha256"))
    for field_ in ("shape", "mean", "std", "num_classes", "classes", "logits"):
        for vname in ("str", "neg", "huge", "list", "nan"):
            ok = field_ in ("mean", "std") and vname == "list"  # [1] is a legal mean and std
            mut(f"input.{field_}={vname}", setk(("input", field_), hostile[vname]), expect=(0,) if ok else (2,))
    for k in ("site", "kind", "channels"):
        mut(f"patch-without-{k}", delk(("patches", 0, k)))
    for k in ("patches", "input", "base_sha256", "arch"):
        mut(f"manifest-without-{k}", delk((k,)))
    mut("site=__class__", setk(("patches", 0, "site"), "__class__"))
    mut("site=features.0.weight", setk(("patches", 0, "site"), "features.0.weight"))
    mut("site=missing", setk(("patches", 0, "site"), "layer9"))
    mut("duplicate-site", lambda m: (m["patches"].__setitem__(1, dict(m["patches"][0])), m)[1])
    mut("10^14-bytes", lambda m: (m["patches"][0].update(channels=65536, rho=1e-9), m)[1])
    mut("huge-but-valid", lambda m: (m["patches"][0].update(channels=65536, rho=1.0), m)[1])
    mut("many-patches", setk(("patches",), [dict(kind="fixer", site="features", channels=8, rho=4.0, delta=1.0,
                                                  act="linear", final_relu=False)] * 5000))
    mut("unknown-field", setk(("exec",), "rm -rf /"))
    mut("unknown-patch-field", setk(("patches", 0, "exec"), "rm"))
    mut("newer-format", setk(("format_version",), 99))
    mut("channels-mismatch", setk(("patches", 0, "channels"), 4))
    mut("auxbn-on-conv", setk(("patches", 0), {"kind": "auxbn", "site": "features.0", "type": "BatchNorm2d",
                                               "features": 4, "eps": 1e-5, "momentum": 0.1, "affine": True}))
    mut("prefilter-inside", setk(("patches", 0), {"kind": "prefilter", "site": "features", "channels": 1,
                                                  "width": 2, "delta": 1.0}))
    mut("tensor-missing", lambda m: m, tensors_fn=lambda t: {k: v for k, v in t.items()
                                                            if k != "harden.block.conv1.weight"})
    mut("tensor-wrong-shape", lambda m: m, tensors_fn=lambda t: {**t, "harden.block.conv1.weight": torch.zeros(3, 8, 1, 1)})
    mut("tensor-int", lambda m: m, tensors_fn=lambda t: {**t, "harden.block.conv1.bias": torch.zeros(2, dtype=torch.int32)})
    mut("tensor-extra", lambda m: m, tensors_fn=lambda t: {**t, "harden.nowhere.x": torch.zeros(2)})
    nan_all = lambda t: {k: (torch.full_like(v, float("nan")) if k.startswith("harden.") and v.is_floating_point()
                             else v) for k, v in t.items()}
    mut("nan-patches-redigested", lambda m: m, tensors_fn=nan_all)
    mut("nan-patches-stale-digest", lambda m: m, tensors_fn=nan_all, redigest=False)
    mut("inf-patch", lambda m: m, tensors_fn=lambda t: {**t, "harden.block.conv2.bias": torch.full((8,), float("inf"))})
    mut("tampered-patch-stale-digest", lambda m: m, redigest=False,
        tensors_fn=lambda t: {**t, "harden.block.conv2.weight": t["harden.block.conv2.weight"] + 1})
    mut("tampered-base-stale-digest", lambda m: m, redigest=False,
        tensors_fn=lambda t: {**t, "block.0.bias": t["block.0.bias"] + 1})
    mut("old-file-no-new-digest", delk(("tensors_sha256",)), redigest=False, expect=(0,))
    # NaN patches through eval: the lying-numbers case of the issue
    def nan_eval(d):
        m = json.loads(json.dumps(w.manifest))
        w.crafted(d, m, nan_all(dict(w.tensors)))
    out.append(Case("lying/nan-patches-eval", "lying", ["eval", "crafted.safetensors", "--arch", A, "--data",
                                                        str(w.test), "--attack", "fgsm", "--no-checks", "--quiet"],
                    nan_eval))
    def huge_logits(d):
        t = dict(w.tensors)
        t["head.3.weight"] = t["head.3.weight"] * 1e38
        t["head.3.bias"] = t["head.3.bias"] + 3e38
        w.crafted(d, None, t)
    out.append(Case("lying/overflowing-logits-eval", "lying", ["eval", "crafted.safetensors", "--arch", A, "--data",
                                                               str(w.test), "--attack", "fgsm", "--no-checks",
                                                               "--quiet"], huge_logits, expect=(3,)))
    for args in (["--restarts", "0"], ["--steps", "-5"], ["--max-samples", "-1"], ["--max-samples", "0"],
                 ["--batch-size", "0"], ["--batch-size", "-1"], ["--queries", "0"], ["--eps", "nan"],
                 ["--eps", "-1"], ["--eps-sweep", "nan"], ["--fail-under", "clean=2"]):
        out.append(Case(f"lying/eval{''.join(args)}", "lying", ["eval", str(w.patched), "--arch", A, "--data",
                                                               str(w.test), "--attack", "fgsm", "--quiet", *args]))

    # C. data files
    def data_case(name, make, fname="d.npz", cmd="predict", expect=(2,)):
        def setup(d):
            make(d / fname)
        model = str(w.patched) if cmd != "patch" else str(w.base)
        extra = ["--epochs", "1", "--steps", "1", "--subset", "30"] if cmd == "patch" else []
        out.append(Case(f"data/{name}/{cmd}", "data", [cmd, model, "--arch", A, "--data", fname, "--quiet", *extra],
                        setup, expect=expect))
    rng = np.random.default_rng(0)
    makers = {
        "empty-npz": lambda p: p.write_bytes(b""),
        "random-bytes-npz": lambda p: p.write_bytes(rng.bytes(512)),
        "string-labels": lambda p: np.savez(p, images=np.zeros((4, 1, 8, 8), np.uint8), labels=np.array(list("abab"))),
        "npy-renamed": lambda p: np.save(open(p, "wb"), np.zeros((4, 1, 8, 8), np.uint8)),
        "no-images": lambda p: np.savez(p, images=np.zeros((0, 1, 8, 8), np.uint8), labels=np.zeros(0, np.int64)),
        "no-labels-key": lambda p: np.savez(p, images=np.zeros((4, 1, 8, 8), np.uint8)),
        "nan-images": lambda p: np.savez(p, images=np.full((4, 1, 8, 8), np.nan, np.float32), labels=np.zeros(4, int)),
        "complex-images": lambda p: np.savez(p, images=np.zeros((4, 1, 8, 8), np.complex64), labels=np.zeros(4, int)),
        "huge-label": lambda p: np.savez(p, images=np.zeros((4, 1, 8, 8), np.uint8), labels=np.full(4, 2 ** 62)),
        "negative-label": lambda p: np.savez(p, images=np.zeros((4, 1, 8, 8), np.uint8), labels=np.full(4, -5)),
        "5d-images": lambda p: np.savez(p, images=np.zeros((4, 1, 1, 8, 8), np.uint8), labels=np.zeros(4, int)),
        "1x1-images": lambda p: np.savez(p, images=np.zeros((4, 1, 1, 1), np.uint8), labels=np.zeros(4, int)),
        "truncated-npz": lambda p: (np.savez(p, images=np.zeros((40, 1, 8, 8), np.uint8), labels=np.zeros(40, int)),
                                    p.write_bytes(p.read_bytes()[:300])),
        "html-page": lambda p: p.write_text("<!doctype html><html>Sign in</html>"),
    }
    for name, make in makers.items():
        data_case(name, make, expect=(0,) if name == "no-labels-key" else (2,))  # predict: labels optional
    for name in ("empty-npz", "string-labels", "npy-renamed", "nan-images", "1x1-images"):
        data_case(name, makers[name], cmd="patch")
        data_case(name, makers[name], cmd="eval")
    data_case("random-pt", lambda p: p.write_bytes(rng.bytes(300)), fname="d.pt")
    data_case("random-safetensors", lambda p: p.write_bytes(rng.bytes(300)), fname="d.safetensors")
    data_case("safetensors-huge-header", lambda p: p.write_bytes(struct.pack("<Q", 2 ** 60) + b"{}"),
              fname="d.safetensors")
    data_case("unknown-suffix", lambda p: p.write_bytes(b"x"), fname="d.csv")

    def bomb(d):
        for c in ("a", "b"):
            (d / "imgs" / c).mkdir(parents=True)
            from PIL import Image
            Image.fromarray(np.zeros((8, 8), np.uint8)).save(d / "imgs" / c / "ok.png")
        (d / "imgs" / "a" / "bomb.png").write_bytes(png_header(20000, 20000))
    out.append(Case("data/400-megapixel-png", "data", ["predict", str(w.patched), "--arch", A, "--data", "imgs"],
                    bomb))
    def fifo(d):
        os.mkfifo(d / "pipe.npz")
    for cmd, flag in (("predict", "--data"), ("eval", "--data"), ("patch", "--data"), ("predict", "--classes"),
                      ("predict", "MODEL"), ("predict", "--config")):
        argv = [cmd, str(w.base if cmd == "patch" else w.patched), "--arch", A, "--data", str(w.test), "--quiet"]
        if flag == "MODEL":
            argv[1] = "pipe.npz"
        elif flag == "--data":
            argv[argv.index("--data") + 1] = "pipe.npz"
        else:
            argv += [flag, "pipe.npz"]
        out.append(Case(f"data/fifo-as-{flag.strip('-')}/{cmd}", "data", argv, fifo))
    for name, content in (("bad-json", b'["0", "1"'), ("non-utf8", b"\xff\xfe\x00\x81"), ("bad-values", b'{"0": "x"}'),
                          ("empty-list", b"[]"), ("deep", b"[" * 50000)):
        def setup(d, content=content):
            for c in ("0", "1", "2"):
                (d / "imgs" / c).mkdir(parents=True)
                from PIL import Image
                Image.fromarray(np.zeros((8, 8), np.uint8)).save(d / "imgs" / c / "x.png")
            (d / "classes.json").write_bytes(content)
        out.append(Case(f"data/classes-{name}", "data", ["predict", str(w.patched), "--arch", A, "--data", "imgs",
                                                         "--classes", "classes.json", "--quiet"], setup))

    # D. option values
    base_patch = ["patch", str(w.base), "--arch", A, "--data", str(w.data), "--subset", "30", "--epochs", "1",
                  "--steps", "1", "--eval-samples", "6", "--eval-steps", "1", "--quiet", "--out", "o.safetensors"]
    for args in (["--lr", "nan"], ["--lr", "-1"], ["--lr", "inf"], ["--lr", "0"], ["--steps", "-1"],
                 ["--steps", "0"], ["--epochs", "0"], ["--epochs", "-1"], ["--batch-size", "0"], ["--batch-size", "-1"],
                 ["--rho", "0"], ["--rho", "nan"], ["--delta", "inf"], ["--width", "0"], ["--beta", "-1"],
                 ["--lam", "nan"], ["--mu", "-1"], ["--gamma", "inf"], ["--eps-warmup", "-1"], ["--eval-samples", "-1"],
                 ["--eval-steps", "0"], ["--save-every", "-1"], ["--alpha", "0"], ["--phi", "2"], ["--sigma", "nan"],
                 ["--validate-every", "0"], ["--select-on", "-1"], ["--subset", "0"], ["--subset", "200%"],
                 ["--eps", "nan"], ["--cache-limit", "-5"], ["--resize", "0,0"], ["--crop", "0,0"],
                 ["--arch-kwargs", "not json"], ["--arch-kwargs", "[1]"], ["--device", "tpu"], ["--seed", "-1"],
                 ["--at", "__class__"], ["--at", "features.0.weight"], ["--at-regex", "("]):
        out.append(Case(f"option/patch{''.join(args)}", "option", base_patch + args))
    for args in (["--max-samples", "-1"], ["--max-samples", "0"], ["--resize", "0,0"], ["--resize", "99999,99999"],
                 ["--crop", "0,1"], ["--post-lr", "nan"], ["--iterations", "0"], ["--neighbour-steps", "-1"]):
        out.append(Case(f"option/predict{''.join(args)}", "option", ["predict", str(w.patched), "--arch", A, "--data",
                                                                    str(w.test), "--quiet", *args]))

    # E. outputs that are inputs, or exist
    def copy_data(d):
        shutil.copy(w.data, d / "train.npz")
        shutil.copy(w.patched, d / "model.safetensors")
        shutil.copy(w.classes, d / "classes.json")
        (d / "exists.json").write_text("keep")
    p_io = ["patch", str(w.base), "--arch", A, "--subset", "30", "--epochs", "1", "--steps", "1", "--eval-samples",
            "6", "--eval-steps", "1", "--quiet"]
    e_io = ["eval", "model.safetensors", "--arch", A, "--data", str(w.test), "--attack", "fgsm", "--max-samples", "6",
            "--no-checks", "--quiet"]
    io_cases = {
        "patch-out=data": p_io + ["--data", "train.npz", "--out", "train.npz", "--force"],
        "patch-out=model": ["patch", "train.npz"],  # placeholder replaced below
        "patch-report=data": p_io + ["--data", "train.npz", "--out", "o.safetensors", "--report", "train.json",
                                     "--force"],
        "patch-report=out": p_io + ["--data", "train.npz", "--out", "o.json", "--report", "o.json"],
        "export-out=input": ["export", "model.safetensors", "--arch", A, "--out", "model.safetensors", "--force"],
        "export-out=classes-symlink": ["export", "model.safetensors", "--arch", A, "--out", "link.ts.pt", "--force"],
        "eval-report-exists": e_io + ["--report", "exists.json"],
        "eval-report=classes": e_io + ["--report", "classes.json", "--force", "--classes", "classes.json"],
        "eval-report=model-hardlink": e_io + ["--report", "hard.json", "--force"],
        "eval-report-missing-dir": e_io + ["--report", "nodir/r.json"],
        "export-out=/dev/null": ["export", "model.safetensors", "--arch", A, "--out", "/dev/null", "--force"],
        "export-out=folder": ["export", "model.safetensors", "--arch", A, "--out", ".", "--force"],
        "eval-report-bad-suffix": e_io + ["--report", "r.exe"],
    }
    io_cases["patch-out=model"] = ["patch", "model.safetensors", "--arch", A, "--data", "train.npz", "--out",
                                   "model.safetensors", "--force"]
    for name, argv in io_cases.items():
        def setup(d, name=name):
            copy_data(d)
            if name == "export-out=classes-symlink":
                os.symlink(d / "model.safetensors", d / "link.ts.pt")
            if name == "eval-report=model-hardlink":
                os.link(d / "model.safetensors", d / "hard.json")
            if name == "patch-report=data":
                os.link(d / "train.npz", d / "train.json")
        out.append(Case(f"output/{name}", "output", argv, setup, outputs=("o.safetensors", "o.json")))
    out.append(Case("output/eval-report-force-ok", "output", e_io + ["--report", "exists.json", "--force"], copy_data,
                    expect=(0,), outputs=("exists.json", ".harden-eval-*")))

    # F. faults
    def ro_dir(d):
        copy_data(d)
        (d / "ro").mkdir()
        (d / "ro").chmod(0o555)
    out.append(Case("fault/read-only-out-dir/export", "fault", ["export", "model.safetensors", "--arch", A, "--out",
                                                                "ro/x.ts.pt"], ro_dir, expect=(3,), nobody=True))
    out.append(Case("fault/read-only-report-dir/eval", "fault", e_io + ["--report", "ro/r.json"], ro_dir,
                    expect=(3,), nobody=True))
    out.append(Case("fault/read-only-out-dir/patch", "fault", p_io + ["--data", "train.npz", "--out",
                                                                      "ro/o.safetensors"], ro_dir, expect=(3,),
                    nobody=True))
    def ro_cwd(d):
        copy_data(d)
        d.chmod(0o555)
    out.append(Case("fault/read-only-cwd/eval", "fault", e_io, ro_cwd, expect=(0,), nobody=True))
    out.append(Case("fault/read-only-cwd/predict", "fault", ["predict", "model.safetensors", "--arch", A, "--data",
                                                             str(w.test), "--quiet"], ro_cwd, expect=(0,), nobody=True))
    for name, argv in (("export", ["export", "model.safetensors", "--arch", A, "--out", "x.ts.pt"]),
                       ("eval-report", e_io + ["--report", "r.json"]),
                       ("patch-checkpoint", p_io + ["--data", "train.npz", "--out", "o.safetensors"])):
        out.append(Case(f"fault/disk-full/{name}", "fault", argv, copy_data, expect=(3,), fsize=1024))
    def stale(d):
        copy_data(d)
        (d / ".x.ts.pt.999999999.abcd.tmp").write_bytes(b"")
    out.append(Case("fault/stale-temp-of-dead-writer", "fault", ["export", "model.safetensors", "--arch", A, "--out",
                                                                 "x.ts.pt"], stale, expect=(0,),
                    outputs=("x.ts.pt", ".x.ts.pt.999999999.abcd.tmp")))
    out.append(Case("fault/nan-loss", "fault", p_io + ["--data", "train.npz", "--out", "o.safetensors", "--lr", "1e30",
                                                        "--epochs", "3", "--no-cache"], copy_data, expect=(3,),
                    outputs=("o.safetensors.partial", "o.safetensors.partial.adv.safetensors")))
    # G. model files
    def model_case(name, make, fname="m.safetensors", cmd="layers", expect=(2,)):
        def setup(d):
            make(d / fname)
        out.append(Case(f"model/{name}/{cmd}", "model", [cmd, fname, "--arch", A, "--input-shape", "1,8,8"], setup,
                        expect=expect))
    model_case("empty", lambda p: p.write_bytes(b""))
    model_case("random", lambda p: p.write_bytes(rng.bytes(256)))
    model_case("huge-header", lambda p: p.write_bytes(struct.pack("<Q", 2 ** 40) + b"{}"))
    model_case("html-pt", lambda p: p.write_text("<html>login</html>"), fname="m.pt")
    model_case("zip-pt", lambda p: p.write_bytes(b"PK\x03\x04" + rng.bytes(100)), fname="m.pt")
    model_case("folder", lambda p: p.mkdir())
    model_case("int-weights", lambda p: save_file({k: v.to(torch.int32) if v.is_floating_point() else v
                                                   for k, v in load_file(str(w.base)).items()}, str(p)))
    model_case("wrong-keys", lambda p: save_file({"x": torch.zeros(2)}, str(p)))
    nan_base = lambda p: save_file({k: torch.full_like(v, float("nan")) if v.is_floating_point() else v  # noqa
                                    for k, v in load_file(str(w.base)).items()}, str(p))
    model_case("nan-weights", nan_base, expect=(0,))  # listing layers computes no accuracy
    def nan_predict(d):
        nan_base(d / "m.safetensors")
    out.append(Case("model/nan-weights/predict", "model", ["predict", "m.safetensors", "--arch", A, "--data",
                                                           str(w.test)], nan_predict, expect=(3,)))
    out.append(Case("model/nan-weights/eval", "model", ["eval", "m.safetensors", "--arch", A, "--data", str(w.test),
                                                        "--attack", "fgsm", "--no-checks"], nan_predict, expect=(3,)))
    def cfg(name, text, expect=(2,)):
        def setup(d):
            (d / "c.toml").write_text(text)
        out.append(Case(f"config/{name}", "config", ["eval", str(w.patched), "--arch", A, "--data", str(w.test),
                                                     "--config", "c.toml", "--quiet", "--attack", "fgsm",
                                                     "--no-checks"], setup, expect=expect))
    cfg("invalid-toml", "= = =")
    cfg("section-not-table", "predict = 3\neval = 4\n", expect=(0,))
    cfg("unknown-key", "[eval]\nbogus = 1\n")
    cfg("bad-type", "max_samples = 'many'\n")
    cfg("negative", "max_samples = -4\n")
    return round_two(w) + out  # the newest cases first (results are sorted by name)


# ---------------------------------------------------------------- round two (issue 35)

FAKE_GS = "#!/bin/sh\ntouch {marker}\necho ran > {marker}.gs\nexit 0\n"
EPS_BODY = (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n%%EndComments\n"
            b"(harden) print 0 0 moveto 8 8 lineto stroke showpage\n%%EOF\n")


def _states(w: "World") -> dict[str, Path]:
    """Files harden writes for itself, made once by the real command line (in this process, with Ctrl-C emulated
    as the tests do): an interrupted patch run (state and adversarial examples, in memory and spilled), an
    interrupted evaluation and certification, and a --base-cache folder. {name: folder}."""
    from click.testing import CliRunner

    from hardener.certification import smoothing as C
    from hardener.cli.app import main as cli
    from hardener.evaluation import threats as E
    from hardener.io import resume

    torch.set_num_threads(1)
    made = {}
    for name, extra in (("patch", []), ("spill", ["--cache-limit", "1000"])):
        d = made[name] = w.root / "states" / name
        d.mkdir(parents=True)
        partial = d / "o.safetensors.partial"
        real = resume.StopFlag.__bool__
        resume.StopFlag.__bool__ = lambda self: partial.exists()  # Ctrl-C once the first epoch is saved
        try:
            r = CliRunner().invoke(cli, [*w.patch_state_args(str(d / "o.safetensors")), *extra])
        finally:
            resume.StopFlag.__bool__ = real
        assert r.exit_code == 130 and partial.exists(), r.output
    for name, args, owner, method in (("eval", w.eval_state_args(), E.A.Attack, "__call__"),
                                      ("certify", w.certify_state_args(), C.Smoothed, "certify_row")):
        d = made[name] = w.root / "states" / name
        d.mkdir(parents=True)
        real, calls = getattr(owner, method), []

        def flaky(*a, real=real, calls=calls):
            calls.append(1)
            if len(calls) == 4:
                raise KeyboardInterrupt
            return real(*a)
        setattr(owner, method, flaky)
        try:
            r = CliRunner().invoke(cli, [*args, "--state-dir", str(d / "st")])
        finally:
            setattr(owner, method, real)
        assert r.exit_code == 130 and list((d / "st").iterdir()), r.output
    d = made["cache"] = w.root / "states" / "cache"
    d.mkdir(parents=True)
    r = CliRunner().invoke(cli, [*w.cache_args(), "--base-cache", str(d / "bc")])
    assert r.exit_code == 0, r.output
    for p in (w.root / "states").rglob("*"):
        p.chmod(0o755 if p.is_dir() else 0o644)
    return made


def _edit_torch(path: Path, change) -> None:
    st = torch.load(path, weights_only=True)
    change(st)
    torch.save(st, path)


def _edit_st(path: Path, change_tensors=None, change_meta=None) -> None:
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
    t = load_file(str(path))
    t = change_tensors(t) if change_tensors else t
    meta = change_meta(meta) if change_meta else meta
    save_file({k: v.contiguous() for k, v in t.items()}, str(path), metadata=meta)


def _round_two_trust(w: "World", out: list) -> None:
    def arch_case(name, arch_of, extra_setup=None, env=None, forbidden="", flags=("--trust-arch",)):
        for cmd in ("predict", "layers"):
            def setup(d, arch_of=arch_of, extra_setup=extra_setup):
                if extra_setup:
                    extra_setup(d)
                m = json.loads(json.dumps(w.manifest))
                m["arch"], m["arch_kwargs"] = arch_of(d), {}
                w.crafted(d, m)
            extra = ["--data", str(w.test)] if cmd == "predict" else []
            out.append(Case(f"r2/trust/{name}/{cmd}", "trust", [cmd, "crafted.safetensors", *extra, "--quiet", *flags],
                            setup, env=env or {}, forbidden_output=forbidden))
    arch_case("proc-thread-self-cwd", lambda d: "/proc/thread-self/cwd/evil.py:net")
    arch_case("proc-self-root", lambda d: f"/proc/self/root{d}/evil.py:net")
    arch_case("symlink-to-proc-cwd", lambda d: f"{d}/portal/evil.py:net",
              lambda d: os.symlink("/proc/self/cwd", d / "portal"))
    arch_case("symlink-chain-to-proc", lambda d: f"{d}/hop1/evil.py:net",
              lambda d: (os.symlink("hop2", d / "hop1"), os.symlink("/proc/1/../self/cwd", d / "hop2")))
    arch_case("symlink-loop", lambda d: f"{d}/loopa/evil.py:net",
              lambda d: (os.symlink("loopb", d / "loopa"), os.symlink("loopa", d / "loopb")))
    arch_case("dev-fd-cwd", lambda d: "/dev/fd/../../proc/self/cwd/evil.py:net")
    # a denied (standard library) module whose import prints: refused before it is imported, trusted or not
    arch_case("stdlib-import-side-effect", lambda d: "__hello__:main", forbidden="Hello world",
              env={"HARDEN_TRUSTED_ARCH": "__hello__"})
    # a trusted package whose constructor ends the process: an error, never exit 0
    for name, body in (("exit0", "raise SystemExit(0)"), ("exit-none", "import sys; sys.exit()"),
                       ("base-exception-kin", "raise GeneratorExit('bye')")):
        arch_case(f"trusted-constructor-{name}", lambda d: "quitpkg.models:net",
                  lambda d, body=body: ((d / "pkgs" / "quitpkg").mkdir(parents=True),
                                        (d / "pkgs" / "quitpkg" / "__init__.py").write_text(""),
                                        (d / "pkgs" / "quitpkg" / "models.py").write_text(
                                            f"def net(**kw):\n    {body}\n")),
                  env={"HARDEN_TRUSTED_ARCH": "quitpkg", "PYTHONPATH": f"{REPO}:{{dir}}/pkgs"}, flags=())


def _round_two_pillow(w: "World", out: list) -> None:
    env = {"PATH": f"{w.fakebin}:{os.environ.get('PATH', '/usr/bin:/bin')}"}
    for suffix, body in ((".png", EPS_BODY), (".jpg", EPS_BODY), (".bmp", b"%!PS-Adobe-2.0\n" + EPS_BODY[24:]),
                         (".gif", b"\xc5\xd0\xd3\xc6" + struct.pack("<IIIIIIH", 30, len(EPS_BODY), 0, 0, 0, 0, 0xFFFF)
                          + EPS_BODY)):
        for cmd in ("predict", "eval", "patch"):
            def setup(d, suffix=suffix, body=body):
                from PIL import Image
                for c in ("0", "1", "2"):
                    (d / "imgs" / c).mkdir(parents=True)
                    for i in range(4):
                        Image.fromarray(np.full((8, 8), 40 * i, np.uint8)).save(d / "imgs" / c / f"{i}.png")
                (d / "imgs" / "1" / f"scan{suffix}").write_bytes(body)
            model = str(w.base if cmd == "patch" else w.patched)
            extra = {"predict": [], "eval": ["--attack", "fgsm", "--no-checks"],
                     "patch": ["--epochs", "1", "--steps", "1", "--out", "o.safetensors"]}[cmd]
            out.append(Case(f"r2/pillow/eps-as{suffix}/{cmd}", "pillow",
                            [cmd, model, "--arch", w.arch, "--data", "imgs", "--quiet", *extra], setup, env=env,
                            outputs=("o.safetensors",)))


def _npz_with_header(p: Path, shape: tuple, dtype: str = "<f4", payload: bytes = b"\0" * 64) -> None:
    """An npz whose images.npy declares `shape` but holds only `payload`."""
    import zipfile
    header = "{'descr': '%s', 'fortran_order': False, 'shape': %r, }" % (dtype, shape)
    header += " " * (118 - len(header)) + "\n"
    npy = b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode() + payload
    buf = __import__("io").BytesIO()
    np.save(buf, np.zeros(4, np.int64))
    with zipfile.ZipFile(p, "w") as z:
        z.writestr("images.npy", npy)
        z.writestr("labels.npy", buf.getvalue())


def _round_two_shapes(w: "World", out: list) -> None:
    def data(name, make, fname="d.npz", cmd="predict", env=None, spec=None):
        model = str(w.base if cmd == "patch" else w.patched)
        extra = ["--epochs", "1", "--steps", "1", "--out", "o.safetensors"] if cmd == "patch" else []
        out.append(Case(f"r2/shape/{name}/{cmd}", "shape", [cmd, model, "--arch", w.arch, "--data", spec or fname,
                                                             "--quiet", *extra], lambda d: make(d / fname),
                        env=env or {}, outputs=("o.safetensors",)))
    data("npz-declares-4e12-floats", lambda p: _npz_with_header(p, (100000, 3, 2000, 2000)))
    data("npz-declares-2^62-rows", lambda p: _npz_with_header(p, (2 ** 62, 1, 8, 8)), cmd="patch")
    data("npz-negative-dim", lambda p: _npz_with_header(p, (4, 1, -8, 8)))
    data("npz-object-dtype-header", lambda p: _npz_with_header(p, (4, 1, 8, 8), "|O"))
    data("npz-fortran-huge", lambda p: _npz_with_header(p, (8, 1, 65536, 65536)), cmd="eval")
    data("pt-huge-expand", lambda p: torch.save({"images": torch.zeros(1, 1, 1, 1).expand(10 ** 6, 3, 1024, 1024),
                                                 "labels": torch.zeros(10 ** 6, dtype=torch.long)}, p), fname="d.pt")
    data("safetensors-lying-offsets", lambda p: p.write_bytes(
        (lambda h: struct.pack("<Q", len(h)) + h)(json.dumps({"images": {"dtype": "F32", "shape": [10 ** 9, 1, 8, 8],
                                                                         "data_offsets": [0, 256]}}).encode())
        + b"\0" * 256), fname="d.safetensors")
    mnist = lambda p: (p.mkdir(), (p / "train-images-idx3-ubyte").write_bytes(  # noqa: E731
        b"\0\0\x08\x03" + struct.pack(">III", 60000, 30000, 30000) + b"\0" * 64),
        (p / "train-labels-idx1-ubyte").write_bytes(b"\0\0\x08\x01" + struct.pack(">I", 60000) + b"\0" * 60000))
    data("idx-declares-54e12-bytes", mnist, fname="fm", spec="fashion-mnist:train",
         env={"HARDEN_FASHION_MNIST_DIR": "{dir}/fm"})
    mnist_gz = lambda p: (p.mkdir(), (p / "train-images-idx3-ubyte.gz").write_bytes(  # noqa: E731
        __import__("gzip").compress(b"\0\0\x08\x03" + struct.pack(">III", 4, 8, 8) + b"\0" * 255)),
        (p / "train-labels-idx1-ubyte.gz").write_bytes(__import__("gzip").compress(b"\0\0\x08\x01\0\0\0\x04" + b"\0" * 4)))
    data("idx-gz-one-byte-short", mnist_gz, fname="fm", spec="fashion-mnist:train",
         env={"HARDEN_FASHION_MNIST_DIR": "{dir}/fm"})
    for name, cmd, args, expect in (
            ("input-shape-3x70000x70000", "layers", ["--input-shape", "3,70000,70000"], (2, 3)),
            ("input-shape-5d", "layers", ["--input-shape", "1,8,8,8,8"], (2,)),
            ("resize-40000", "predict", ["--data", str(w.test), "--resize", "40000,40000"], (2, 3)),
            ("prefilter-width-2^40", "patch", ["--data", str(w.data), "--width", str(2 ** 40), "--method", "prefilter",
                                               "--epochs", "1", "--out", "o.safetensors"], (2, 3)),
            ("batch-size-2^40", "eval", ["--data", str(w.test), "--batch-size", str(2 ** 40), "--attack", "fgsm",
                                         "--no-checks"], (0, 2))):
        model = str(w.base if cmd in ("patch", "layers") else w.patched)
        out.append(Case(f"r2/shape/{name}/{cmd}", "shape", [cmd, model, "--arch", w.arch, *args, "--quiet"],
                        outputs=("o.safetensors",), expect=expect))


def _round_two_tensors(w: "World", out: list) -> None:
    imgs, labels = make_data(6, seed=3)
    x = torch.from_numpy(imgs).float() / 255
    y = torch.from_numpy(labels)
    makers = {
        "pt-sparse-coo": ("d.pt", lambda p: torch.save({"images": x.to_sparse(), "labels": y}, p)),
        "pt-sparse-labels": ("d.pt", lambda p: torch.save({"images": x, "labels": y.to_sparse()}, p)),
        "pt-requires-grad": ("d.pt", lambda p: torch.save({"images": x.clone().requires_grad_(), "labels": y}, p)),
        "pt-meta": ("d.pt", lambda p: torch.save({"images": torch.empty(6, 1, 8, 8, device="meta"), "labels": y}, p)),
        "pt-list-of-images": ("d.pt", lambda p: torch.save({"images": list(x), "labels": y}, p)),
        "pt-complex": ("d.pt", lambda p: torch.save({"images": x.to(torch.complex64), "labels": y}, p)),
        "pt-half-nan": ("d.pt", lambda p: torch.save({"images": x.half().index_fill_(0, torch.tensor([2]),
                                                                                     float("nan")), "labels": y}, p)),
        "pt-quantized": ("d.pt", lambda p: torch.save({"images": torch.quantize_per_tensor(x, 0.01, 0, torch.quint8),
                                                       "labels": y}, p)),
        "safetensors-inf": ("d.safetensors", lambda p: save_file({"images": x.index_fill(0, torch.tensor([1]),
                                                                                        float("inf")),
                                                                  "labels": y}, str(p))),
        "safetensors-bf16-neg-inf": ("d.safetensors", lambda p: save_file({"images": x.bfloat16().index_fill(
            0, torch.tensor([0]), float("-inf")), "labels": y}, str(p))),
        "npz-float64-1e308": ("d.npz", lambda p: np.savez(p, images=np.full((6, 1, 8, 8), 1e308), labels=labels)),
        "npz-float32-neg-nan": ("d.npz", lambda p: np.savez(p, images=-np.full((6, 1, 8, 8), np.nan, np.float32),
                                                            labels=labels)),
        "npz-inf-labels": ("d.npz", lambda p: np.savez(p, images=imgs, labels=np.full(6, np.inf))),
        "npz-structured": ("d.npz", lambda p: np.savez(p, images=np.zeros((6, 1, 8, 8), dtype=[("a", "f4")]),
                                                       labels=labels)),
    }
    for name, (fname, make) in makers.items():
        plain = name in ("pt-requires-grad", "pt-list-of-images")  # dense finite numbers: may be read as they are
        for cmd in ("predict", "eval"):
            extra = ["--attack", "fgsm", "--no-checks"] if cmd == "eval" else []
            out.append(Case(f"r2/tensor/{name}/{cmd}", "tensor", [cmd, str(w.patched), "--arch", w.arch, "--data",
                                                                   fname, "--quiet", *extra],
                            lambda d, make=make, fname=fname: make(d / fname),
                            # numbers that are not there (NaN, inf, sparse zeros) must not become an accuracy
                            lying=cmd == "eval" and not plain,
                            expect=(0, 2) if plain else (2,)))


def _round_two_states(w: "World", out: list) -> None:
    """Edited, truncated, foreign or digest-less state, cache and adversarial-example files (item 2): refused."""
    s = w.states

    def copy(name):
        def setup(d):
            for p in s[name].iterdir():
                (shutil.copytree if p.is_dir() else shutil.copy)(p, d / p.name)
        return setup

    def case(name, src, argv, edit=None, expect=(2,), lying=True, outputs=()):
        def setup(d):
            copy(src)(d)
            if edit:
                edit(d)
        out.append(Case(f"r2/state/{name}", "state", argv, setup, expect=expect, lying=lying and expect == (2,),
                        outputs=outputs))
    patch, spill = w.patch_state_args("o.safetensors"), [*w.patch_state_args("o.safetensors"), "--cache-limit", "1000"]
    part = lambda d: d / "o.safetensors.partial"  # noqa: E731
    adv = lambda d: d / "o.safetensors.partial.adv.safetensors"  # noqa: E731

    def first_float(st):
        return next(v for v in st["model"].values() if v.is_floating_point())
    case("patch-resume/patch-weights-nudged", "patch", [*patch, "--resume"],
         lambda d: _edit_torch(part(d), lambda st: first_float(st).mul_(1.01)))
    case("patch-resume/epoch-counter-advanced", "patch", [*patch, "--resume"],
         lambda d: _edit_torch(part(d), lambda st: st.update(epoch=st["epoch"] + 2)))
    case("patch-resume/state-cut-in-half", "patch", [*patch, "--resume"],
         lambda d: part(d).write_bytes(part(d).read_bytes()[: part(d).stat().st_size // 2]))
    case("patch-resume/state-without-digest", "patch", [*patch, "--resume"],
         lambda d: _edit_torch(part(d), lambda st: (st.pop("harden_digest"), st.update(version=3))))
    case("patch-resume/state-of-other-lr", "patch", [*patch, "--resume", "--lr", "0.0031"], lying=False)
    case("patch-resume/state-of-other-subset", "patch", [*patch, "--resume", "--subset", "59"], lying=False)
    case("patch-resume/adv-pulled-toward-grey", "patch", [*patch, "--resume"],
         lambda d: _edit_st(adv(d), lambda t: {"adv": t["adv"] * 0.5 + 0.25}))
    case("patch-resume/adv-rows-rolled", "patch", [*patch, "--resume"],
         lambda d: _edit_st(adv(d), lambda t: {"adv": t["adv"].roll(1, 0)}))
    case("patch-resume/adv-relabelled-as-other-run", "patch", [*patch, "--resume"],
         lambda d: _edit_st(adv(d), change_meta=lambda m: {**m, "fingerprint": "0" * 64}))
    case("patch-resume/adv-digest-stripped", "patch", [*patch, "--resume"],
         lambda d: _edit_st(adv(d), change_meta=lambda m: {"fingerprint": m["fingerprint"]}))
    case("patch-fresh/stale-adv-of-other-settings", "patch", [*patch, "--lr", "0.0031"],
         lambda d: part(d).unlink(), lying=False)

    def npy_edit(d):
        a = np.load(d / "o.safetensors.partial.adv.npy", mmap_mode="r+")
        a[-1] = a[0]
        a.flush()
    case("spill-resume/npy-row-copied", "spill", [*spill, "--resume"], npy_edit)
    case("spill-resume/npy-cut", "spill", [*spill, "--resume"], lambda d: (d / "o.safetensors.partial.adv.npy")
         .write_bytes((d / "o.safetensors.partial.adv.npy").read_bytes()[:200]))
    case("spill-resume/tag-of-other-run", "spill", [*spill, "--resume"],
         lambda d: (d / "o.safetensors.partial.adv.npy.done").write_text(
             (d / "o.safetensors.partial.adv.npy.done").read_text().replace('"fingerprint": "', '"fingerprint": "f')))
    case("spill-resume/old-plain-tag", "spill", [*spill, "--resume"],
         lambda d: (d / "o.safetensors.partial.adv.npy.done").write_text("0" * 64))
    resumed_outputs = ("o.safetensors", "o.safetensors.partial*", ".o.safetensors.lock")
    case("patch-resume/untouched", "patch", [*patch, "--resume"], expect=(0,), outputs=resumed_outputs)
    case("spill-resume/untouched", "spill", [*spill, "--resume"], expect=(0,), outputs=resumed_outputs)

    ev, cert = [*w.eval_state_args(), "--state-dir", "st", "--resume"], [*w.certify_state_args(), "--state-dir", "st",
                                                                          "--resume"]
    one = lambda d: next((d / "st").iterdir())  # noqa: E731

    def every_sample_robust(st):
        for v in st["data"].values():
            if isinstance(v, dict) and "robust" in v:
                v["robust"].fill_(True)
    case("eval-resume/every-sample-robust", "eval", ev, lambda d: _edit_torch(one(d), every_sample_robust))
    case("eval-resume/state-without-digest", "eval", ev,
         lambda d: _edit_torch(one(d), lambda st: (st.pop("harden_digest"), st.update(version=3))))
    case("eval-resume/state-zero-bytes", "eval", ev, lambda d: one(d).write_bytes(b""))
    case("eval-resume/untouched", "eval", ev, expect=(0,), outputs=(".harden-eval-*",))

    def radii_doubled(st):
        for row in st["data"]["rows"]["rows"]:
            row["radius"] = 2 * float(row.get("radius") or 0) + 1
    case("certify-resume/radii-inflated", "certify", cert, lambda d: _edit_torch(one(d), radii_doubled))
    case("certify-resume/state-tail-cut", "certify", cert,
         lambda d: one(d).write_bytes(one(d).read_bytes()[:-64]))
    case("certify-resume/untouched", "certify", cert, expect=(0,), outputs=(".harden-certify-*",))

    cache = [*w.cache_args(), "--base-cache", "bc"]
    entry = lambda d: next((d / "bc").iterdir())  # noqa: E731
    transfer = lambda d: sorted(entry(d).glob("transfer-*.safetensors"))  # noqa: E731

    def half_perturbation(d):
        f = transfer(d)[0]
        clean = torch.from_numpy(np.load(w.test)["images"][:8]).float() / 255
        _edit_st(f, lambda t: {"adv": clean + (t["adv"] - clean) * 0.5})
    case("base-cache/transfer-perturbation-halved", "cache", cache, half_perturbation)
    case("base-cache/transfer-batches-swapped", "cache", cache,
         lambda d: (lambda a, b: (a.rename(d / "tmp"), b.rename(a), (d / "tmp").rename(b)))(*transfer(d)[:2]))
    case("base-cache/base-rows-all-correct", "cache", cache,
         lambda d: _edit_torch(entry(d) / "base.pt", lambda st: [m.fill_(True) for m in
                                                                   st["result"]["_masks"].values()]))
    case("base-cache/entry-without-digest", "cache", cache,
         lambda d: _edit_torch(entry(d) / "base.pt", lambda st: (st.pop("harden_digest"),
                                                                 st.update(st.pop("result")))))
    case("base-cache/untouched", "cache", cache, expect=(0,))


def _round_two_outputs(w: "World", out: list) -> None:
    """Outputs onto inputs harden reads, and user files under harden's side-file names: refused, nothing changed."""
    def setup(d):
        shutil.copy(w.data, d / "train.npz")
        shutil.copy(w.test, d / "test.npz")
        shutil.copy(w.patched, d / "model.safetensors")
        shutil.copy(w.root / "tinyarch.py", d / "arch.py")
        (d / "c.toml").write_text("quiet = true\n")
        (d / "pre.json").write_text('{"image_mean": [0.0], "image_std": [1.0]}')
        (d / "o.safetensors.partial.adv.npy.done").write_text("my notes")
        (d / "o.safetensors.partial").write_text("my notes")
        os.symlink(d / "arch.py", d / "arch-link.safetensors")
        os.symlink(d / "test.npz", d / "test-link.json")
        os.link(d / "c.toml", d / "c-hard.json")
        os.link(d / "model.safetensors", d / "model-hard.json")
        os.link(d / "pre.json", d / "r.json")
    p = ["patch", str(w.base), "--arch", "arch.py:tiny", "--data", "train.npz", "--subset", "30", "--epochs", "1",
         "--steps", "1", "--eval-samples", "6", "--eval-steps", "1", "--quiet"]
    e = ["eval", "model.safetensors", "--arch", "arch.py:tiny", "--data", "test.npz", "--attack", "fgsm",
         "--max-samples", "6", "--no-checks", "--quiet"]
    cases_ = {
        "patch-out=eval-data": p + ["--eval-data", "test.npz", "--out", "test.npz", "--force"],
        "patch-out=arch-via-symlink": p + ["--out", "arch-link.safetensors", "--force"],
        "patch-report=config-hardlink": p + ["--config", "c.toml", "--out", "x.safetensors", "--report", "c-hard.json",
                                             "--force"],
        "patch-side-file-is-users": p + ["--out", "o.safetensors", "--force"],
        "eval-report=data-via-symlink": e + ["--report", "test-link.json", "--force"],
        "eval-report=surrogate-hardlink": e + ["--surrogate", "model.safetensors", "--threat", "surrogate",
                                               "--report", "model-hard.json", "--force"],
        "eval-report=preprocessor-hardlink": e + ["--preprocessor", "pre.json", "--report", "r.json", "--force"],
        "certify-report=data": ["certify", "model.safetensors", "--arch", "arch.py:tiny", "--data", "test.npz",
                                "--n0", "10", "--n", "20", "--max-samples", "3", "--quiet", "--report",
                                "test-link.json", "--force"],
        "export-out=arch-symlink": ["export", "model.safetensors", "--arch", "arch.py:tiny", "--out",
                                    "arch-link.safetensors", "--force"],
    }
    for name, argv in cases_.items():
        out.append(Case(f"r2/output/{name}", "output", argv, setup))


def _round_two_ranges(w: "World", out: list) -> None:
    """Options outside their physical range: std 0, 64-bit seeds, NaN and infinite counts."""
    A = w.arch
    ev = ["eval", str(w.patched), "--arch", A, "--data", str(w.test), "--attack", "fgsm", "--no-checks", "--quiet"]
    pa = ["patch", str(w.base), "--arch", A, "--data", str(w.data), "--subset", "30", "--epochs", "1", "--steps", "1",
          "--eval-samples", "6", "--eval-steps", "1", "--quiet", "--out", "o.safetensors"]
    ce = ["certify", str(w.patched), "--arch", A, "--data", str(w.test), "--n0", "10", "--n", "20",
          "--max-samples", "3", "--quiet"]
    pr = ["predict", str(w.patched), "--arch", A, "--data", str(w.test), "--quiet"]
    for base, args in ((ev, ["--mean", "0", "--std", "0"]), (ev, ["--mean", "0", "--std", "-0.0"]),
                       (pr, ["--mean", "0", "--std", "1e-320"]), (pa, ["--mean", "0", "--std", "0.0"]),
                       (ev, ["--mean", "inf", "--std", "1"]), (ce, ["--mean", "0", "--std", "nan"]),
                       (ev, ["--seed", str(2 ** 64)]), (pa, ["--seed", str(2 ** 63)]),
                       (ce, ["--seed", str(-2 ** 63 - 1)]), (pr, ["--seed", "1" + "0" * 30]),
                       (ce, ["--n", "nan"]), (ce, ["--n0", "inf"]), (ce, ["--sigma", "0"]), (ce, ["--sigma", "inf"]),
                       (ce, ["--alpha", "nan"]), (pa, ["--eval-samples", "nan"]), (pa, ["--cache-limit", "nan"]),
                       (pa, ["--cache-limit", "infGiB"]), (pa, ["--subset", "0.0001"]), (pa, ["--holdout", "nan"]),
                       (ev, ["--eps-sweep", "0.1,nan"]), (ev, ["--queries", "1e99"]), (ev, ["--max-samples", "nan"]),
                       (pa, ["--save-every", "inf"]), (pa, ["--epochs", "1e400"])):
        lying = "--std" in args or "--mean" in args  # inputs zeroed or blown up: accuracies that mean nothing
        out.append(Case(f"r2/range/{base[0]}{''.join(args)[:60]}", "range", base + args, lying=lying,
                        outputs=("o.safetensors",)))


def _round_two_gates(w: "World", out: list) -> None:
    """A --fail-under gate on an attack too weak to mean anything: refused (exit 2), never passed."""
    ev = ["eval", str(w.patched), "--arch", w.arch, "--data", str(w.test), "--no-checks", "--quiet", "--max-samples",
          "12"]
    for name, args in (("deepfool-linf", ["--attack", "deepfool", "--norm", "linf", "--fail-under", "robust=0.01"]),
                       ("pgd-1-step", ["--attack", "pgd", "--steps", "1", "--fail-under", "robust=0.01"]),
                       ("apgd-1-step", ["--attack", "apgd-ce", "--steps", "1", "--fail-under", "robust=0"]),
                       ("n-fgsm", ["--attack", "n-fgsm", "--fail-under", "robust=0.01"]),
                       ("fgsm-and-square", ["--attack", "fgsm,square", "--threat", "whitebox,blackbox",
                                            "--fail-under", "robust=0.01"]),
                       ("smooth-grad-nan", ["--attack", "apgd-ce", "--steps", "3", "--smooth-grad", "nan",
                                            "--fail-under", "robust=0.01"]),
                       ("transfer-gate-whitebox-only", ["--attack", "pgd", "--steps", "3", "--threat", "whitebox",
                                                        "--fail-under", "transfer=0.01"]),
                       ("transfer-gate-fgsm", ["--attack", "fgsm", "--threat", "transfer",
                                               "--fail-under", "transfer=0.01"])):
        out.append(Case(f"r2/gate/{name}", "gate", ev + args, lying=True))
    out.append(Case("r2/gate/apgd-3-steps-ok", "gate", ev + ["--attack", "apgd-ce", "--steps", "3", "--fail-under",
                                                              "robust=0"], expect=(0,)))


def round_two(w: "World") -> list[Case]:
    out: list[Case] = []
    for part in (_round_two_trust, _round_two_pillow, _round_two_shapes, _round_two_tensors, _round_two_states,
                 _round_two_outputs, _round_two_ranges, _round_two_gates):
        part(w, out)
    return out


# ---------------------------------------------------------------- running


def snapshot(d: Path) -> dict[str, str]:
    out = {}
    for p in d.rglob("*"):
        rel = str(p.relative_to(d))
        try:
            st_ = p.lstat()
        except OSError:
            continue
        if stat.S_ISREG(st_.st_mode):
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest() if st_.st_size < 50 << 20 else str(st_.st_size)
        else:
            out[rel] = "dir" if stat.S_ISDIR(st_.st_mode) else stat.filemode(st_.st_mode)[0]
    return out


def run_case(w: World, c: Case, base: Path) -> dict:
    d = base / c.name.replace("/", "__").replace(" ", "_")[:150]
    d.mkdir(parents=True)
    (d / "evil.py").write_text(EVIL_PY.format(marker=w.marker))
    if c.setup:
        c.setup(d)
    before = snapshot(d)
    shared = {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in w.inputs()}
    t0 = time.time()
    hang = False
    try:
        env = {k: v.replace("{dir}", str(d)) for k, v in c.env.items()}  # paths inside the case's folder
        r = run_cli(c.argv, d, env, nobody=c.nobody and os.geteuid() == 0, fsize=c.fsize, timeout=60)
        code, err, outp = r.returncode, r.stderr, r.stdout
    except subprocess.TimeoutExpired as e:
        code, err, outp, hang = None, (e.stderr or b"").decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or ""), "", True
    seconds = time.time() - t0
    if c.nobody or d.stat().st_mode & 0o200 == 0:
        for p in [d, *d.rglob("*")]:
            if p.is_dir() and not p.is_symlink():
                p.chmod(0o755)
    after = snapshot(d)
    import fnmatch
    new = sorted(k for k in set(after) - set(before)
                 if not any(fnmatch.fnmatch(Path(k).name, pat) for pat in c.outputs))
    declared = lambda k: any(fnmatch.fnmatch(Path(k).name, pat) for pat in c.outputs)  # noqa: E731
    changed_inputs = sorted(k for k in before if not declared(k) and (k not in after or after[k] != before[k]))
    changed_inputs += [p for p, h in shared.items() if hashlib.sha256(Path(p).read_bytes()).hexdigest() != h]
    payload = w.marker.exists() or bool(c.forbidden_output and c.forbidden_output in outp + err)
    for p in (w.marker, w.marker.with_name(w.marker.name + ".gs")):
        p.unlink(missing_ok=True)
    traceback = "Traceback" in err or (code is not None and code not in (0, 1, 2, 3, 130))
    errors = [line for line in err.splitlines() if line.startswith("Error:")]
    res = {"name": c.name, "category": c.category, "argv": c.argv, "exit": code, "expected_exit": list(c.expect),
           "traceback": traceback, "payload_executed": payload, "leftover_files": new, "inputs_changed": changed_inputs,
           "hang": hang, "seconds": round(seconds, 2), "error_lines": len(errors),
           "message": (errors[-1] if errors else err.strip().splitlines()[-1] if err.strip() else "")[:300]}
    res["clean"] = (code in (0, 2, 3) and not traceback and not payload and not new and not changed_inputs
                    and not hang and (code == 0 or len(errors) == 1))
    # a lying-number case: a run whose numbers would mean nothing, which must end in exit 2 or 3
    res["lying"] = c.lying or c.category == "lying"
    res["refused"] = code in (2, 3) if res["lying"] else None
    res["as_expected"] = res["clean"] and code in c.expect and res["refused"] is not False
    shutil.rmtree(d, ignore_errors=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "hostile_campaign.json"))
    ap.add_argument("--only", default="", help="run the cases whose name contains one of these (comma list)")
    ap.add_argument("--merge", action="store_true",
                    help="with --only: replace those cases in the existing --out file, keep the others' records")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="harden-hostile-"))
    root.chmod(0o755)
    t0 = time.time()
    try:
        w = World(root)
        todo = [c for c in cases(w) if any(part in c.name for part in args.only.split(","))]
        base = root / "cases"
        base.mkdir()
        base.chmod(0o755)
        results = []
        with cf.ThreadPoolExecutor(args.jobs) as pool:
            futs = {pool.submit(run_case, w, c, base): c for c in todo}
            for i, f in enumerate(cf.as_completed(futs), 1):
                r = f.result()
                results.append(r)
                flag = "ok " if r["as_expected"] else "BAD"
                print(f"[{i:3d}/{len(todo)}] {flag} exit={r['exit']} {r['seconds']:5.1f}s {r['name']}: {r['message'][:90]}",
                      flush=True)
    finally:
        for p in [root, *root.rglob("*")]:
            try:
                if p.is_dir() and not p.is_symlink():
                    p.chmod(0o755)
            except OSError:
                pass
        shutil.rmtree(root, ignore_errors=True)
    if args.merge and Path(args.out).exists():
        ran = {r["name"] for r in results}
        results += [r for r in json.loads(Path(args.out).read_text())["cases"] if r["name"] not in ran]
    results.sort(key=lambda r: r["name"])
    tally = {
        "cases": len(results),
        "by_exit_code": dict(sorted(collections.Counter(str(r["exit"]) for r in results).items())),
        "traceback": sum(r["traceback"] for r in results),
        "payload_executed": sum(r["payload_executed"] for r in results),
        "leftover_files": sum(bool(r["leftover_files"]) for r in results),
        "inputs_changed": sum(bool(r["inputs_changed"]) for r in results),
        "hang": sum(r["hang"] for r in results),
        "clean": sum(r["clean"] for r in results),
        "as_expected": sum(r["as_expected"] for r in results),
        "by_category": {cat: dict(collections.Counter(str(r["exit"]) for r in results if r["category"] == cat))
                        for cat in sorted({r["category"] for r in results})},
        "seconds_total": round(time.time() - t0, 1),
        "seconds_max_case": max((r["seconds"] for r in results), default=0),
    }
    for r in results:  # records of an earlier run (--merge) say whether a lying case was refused as well
        if r.get("lying") is None:
            r["lying"] = r["category"] == "lying"
            r["refused"] = r["exit"] in (2, 3) if r["lying"] else None
    tally["lying_cases"] = sum(r["lying"] for r in results)
    tally["lying_not_refused"] = sum(r["refused"] is False for r in results)
    doc = {"schema": "harden.hostile-campaign/1", "python": platform.python_version(), "torch": torch.__version__,
           "run_as_root": os.geteuid() == 0, "jobs": args.jobs, "tally": tally,
           "not_as_expected": [r for r in results if not r["as_expected"]], "cases": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=1, sort_keys=False) + "\n")
    print(json.dumps(tally, indent=1))


if __name__ == "__main__":
    main()
