"""Hostile-input campaign (issue 20): ~500 bad or malicious inputs through the real CLI, tallied.

Builds everything in a temporary folder (a tiny model, its checkpoint, toy data, one patched file made by
`harden patch`), then runs each case as `python -m hardener ...` in a subprocess (OMP_NUM_THREADS=1) in a
fresh working directory holding an `evil.py`, and records per case: exit code, traceback yes/no, payload
executed yes/no (payloads `touch` a marker file), leftover files yes/no (anything new besides the declared
outputs), inputs changed yes/no, hang (timeout) yes/no. Read-only folders are made real by running those
cases without CAP_DAC_OVERRIDE (setpriv) when run as root; a full disk by RLIMIT_FSIZE.

    python bench/hostile_campaign.py [--jobs 2] [--out bench/results/hostile_campaign.json] [--only SUBSTR]
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
    from hardener.checkpoint import tensor_digest
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
        r = run_cli(c.argv, d, c.env, nobody=c.nobody and os.geteuid() == 0, fsize=c.fsize, timeout=60)
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
    payload = w.marker.exists()
    if payload:
        w.marker.unlink()
    traceback = "Traceback" in err or (code is not None and code not in (0, 1, 2, 3, 130))
    errors = [line for line in err.splitlines() if line.startswith("Error:")]
    res = {"name": c.name, "category": c.category, "argv": c.argv, "exit": code, "expected_exit": list(c.expect),
           "traceback": traceback, "payload_executed": payload, "leftover_files": new, "inputs_changed": changed_inputs,
           "hang": hang, "seconds": round(seconds, 2), "error_lines": len(errors),
           "message": (errors[-1] if errors else err.strip().splitlines()[-1] if err.strip() else "")[:300]}
    res["clean"] = (code in (0, 2, 3) and not traceback and not payload and not new and not changed_inputs
                    and not hang and (code == 0 or len(errors) == 1))
    res["as_expected"] = res["clean"] and code in c.expect
    shutil.rmtree(d, ignore_errors=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "hostile_campaign.json"))
    ap.add_argument("--only", default="")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="harden-hostile-"))
    root.chmod(0o755)
    t0 = time.time()
    try:
        w = World(root)
        todo = [c for c in cases(w) if args.only in c.name]
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
    doc = {"schema": "harden.hostile-campaign/1", "python": platform.python_version(), "torch": torch.__version__,
           "run_as_root": os.geteuid() == 0, "jobs": args.jobs, "tally": tally,
           "not_as_expected": [r for r in results if not r["as_expected"]], "cases": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=1, sort_keys=False) + "\n")
    print(json.dumps(tally, indent=1))


if __name__ == "__main__":
    main()
