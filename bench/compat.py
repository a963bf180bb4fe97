"""Compatibility bench (issue 21, item 4; issue 34, item 6): harden's pipeline on real torchvision, timm and Hugging
Face architectures.

For each model: random-init weights (seeded, num_classes=10, no network) saved as a state dict (a Hugging Face model:
with `save_pretrained` into a folder beside its `preprocessor_config.json`, run through the README's route: the folder,
`--preprocessor`, no `--arch`), then
`harden layers` -> `harden patch` (the default recipe; and `--method fixer,auxbn --bn auto` where the model has
BatchNorm) -> a check that the base tensors came back bit-identical -> `harden eval` -> `harden export` (formats
`export` and `onnx`), each step timed and recorded as ok/failed with its one-line error. Accuracy is meaningless
here (random weights, synthetic data): this bench is about mechanics and timing.

Run through bench/compat.sh, which makes the separate venv (torch + torchvision + timm + transformers + onnx) this
needs:

    python bench/compat.py run   [--models a,b] [--force]   # results in bench/results/compat/<model>.json
    python bench/compat.py table                             # bench/results/compat/table.md

A model whose results file exists is skipped unless --force (or named with --models and --force).
Heavy files (base and patched checkpoints, exports) go to --work (default bench/.compat-work, git-ignored).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "compat"
WORK = ROOT / "bench" / ".compat-work"

SIZE = 32  # input height and width, unless SIZES says otherwise
N_IMAGES = 320  # synthetic data: 32 per class
MEAN = "0.485,0.456,0.406"  # ImageNet's, as a user of these architectures would pass them
STD = "0.229,0.224,0.225"

TV = "torchvision.models"


def _timm(name: str, **kw) -> tuple[str, dict]:
    return "timm:create_model", {"model_name": name, "num_classes": 10, "pretrained": False, **kw}


def _hf(cls: str, **config) -> tuple[str, dict]:
    """A transformers image classifier as harden's manifest names it (`hf:CLASS`, `{"config": ...}`); the bench
    builds it from the config, saves it with `save_pretrained` and hands harden the folder."""
    return f"hf:{cls}", {"config": {**config, "num_channels": 3, "num_labels": 10}}


# name -> (--arch, --arch-kwargs); torchvision's vit_b_16 takes image_size, timm's ViTs img_size.
MODELS: dict[str, tuple[str, dict]] = {
    "tv_resnet18": (f"{TV}:resnet18", {"num_classes": 10}),
    "tv_mobilenet_v3_small": (f"{TV}:mobilenet_v3_small", {"num_classes": 10}),
    "tv_efficientnet_b0": (f"{TV}:efficientnet_b0", {"num_classes": 10}),
    "tv_convnext_tiny": (f"{TV}:convnext_tiny", {"num_classes": 10}),
    "tv_densenet121": (f"{TV}:densenet121", {"num_classes": 10}),
    "tv_vit_b_16": (f"{TV}:vit_b_16", {"num_classes": 10, "image_size": SIZE}),
    "timm_resnet18": ("timm:create_model", {"model_name": "resnet18", "num_classes": 10, "pretrained": False}),
    "timm_efficientnet_b0": ("timm:create_model",
                             {"model_name": "efficientnet_b0", "num_classes": 10, "pretrained": False}),
    "timm_convnext_atto": ("timm:create_model",
                           {"model_name": "convnext_atto", "num_classes": 10, "pretrained": False}),
    "timm_vit_tiny_patch16_224": ("timm:create_model", {"model_name": "vit_tiny_patch16_224", "num_classes": 10,
                                                        "pretrained": False, "img_size": SIZE}),
    # issue 34: auxiliary heads, windowed attention, channels-last blocks, BatchNorm1d over tokens, HF as saved
    "tv_googlenet": (f"{TV}:googlenet", {"num_classes": 10, "aux_logits": True, "init_weights": True}),
    "tv_swin_t": (f"{TV}:swin_t", {"num_classes": 10}),
    "tv_maxvit_t": (f"{TV}.maxvit:MaxVit", {"num_classes": 10, "input_size": [64, 64], "partition_size": 2,
                                             "stem_channels": 64, "block_channels": [64, 128, 256, 512],
                                             "block_layers": [2, 2, 5, 2], "head_dim": 32,
                                             "stochastic_depth_prob": 0.2}),
    "tv_regnet_y_400mf": (f"{TV}:regnet_y_400mf", {"num_classes": 10}),
    "tv_shufflenet_v2_x0_5": (f"{TV}:shufflenet_v2_x0_5", {"num_classes": 10}),
    "timm_levit_128s": _timm("levit_128s", img_size=SIZE),
    "timm_swin_tiny_patch4_window7_224": _timm("swin_tiny_patch4_window7_224", img_size=SIZE, window_size=4),
    "timm_maxvit_rmlp_pico_rw_256": _timm("maxvit_rmlp_pico_rw_256", img_size=SIZE),
    "timm_deit_tiny_distilled_patch16_224": _timm("deit_tiny_distilled_patch16_224", img_size=SIZE),
    "timm_mobilevit_xxs": _timm("mobilevit_xxs"),
    "hf_vit": _hf("ViTForImageClassification", image_size=SIZE, patch_size=4, hidden_size=64, num_hidden_layers=4,
                  num_attention_heads=4, intermediate_size=128),
    "hf_deit": _hf("DeiTForImageClassification", image_size=SIZE, patch_size=4, hidden_size=64, num_hidden_layers=4,
                   num_attention_heads=4, intermediate_size=128),
    "hf_swin": _hf("SwinForImageClassification", image_size=SIZE, patch_size=2, embed_dim=32, depths=[2, 2, 2],
                   num_heads=[2, 4, 8], window_size=4),
    "hf_convnext": _hf("ConvNextForImageClassification", hidden_sizes=[24, 48, 96, 192], depths=[1, 1, 3, 1]),
    "hf_resnet": _hf("ResNetForImageClassification", embedding_size=32, hidden_sizes=[32, 64, 128, 256],
                     depths=[1, 1, 2, 1], layer_type="basic"),
}
# maxvit_t's own 7x7 partitions need 224x224 (five halvings to 7x7), minutes a step on one thread: the bench builds
# its MaxVit with maxvit_t's configuration but 2x2 partitions, at 64x64 (maps 16, 8, 4, 2)
SIZES = {"tv_maxvit_t": 64}

# Small budgets: mechanics, not accuracy. Random weights are at chance, where harden stops unless told to go on.
PATCH_BUDGET = ["--epochs", "1", "--subset", "128", "--steps", "1", "--select-on", "32", "--eval-samples", "32",
                "--eval-steps", "5", "--allow-low-accuracy"]
EVAL_BUDGET = ["--attack", "apgd-ce", "--steps", "5", "--max-samples", "32", "--allow-low-accuracy"]
RECIPES = {"robust": [], "auxbn": ["--method", "fixer,auxbn", "--bn", "auto"]}
EXPORTS = {"export": ".pt2", "onnx": ".onnx"}
STEP_TIMEOUT = 3600
OLD_COMMIT = "8d5be55"  # what a results file from before the model files recorded their environment was measured at


def is_hf(arch: str) -> bool:
    return arch.startswith("hf:")


def hf_class(arch: str):
    """transformers' class and config class of an `hf:CLASS` arch."""
    import transformers

    name = arch[3:]
    return getattr(transformers, name), getattr(transformers, name.removesuffix("ForImageClassification") + "Config")


def build(name: str):
    import torch

    arch, kwargs = MODELS[name]
    torch.manual_seed(0)
    if is_hf(arch):
        cls, config = hf_class(arch)
        net = cls(config(**kwargs["config"]))
    else:
        net = build_from(arch, kwargs)
    head = zero_head(net)
    if head is not None:  # torchvision's ViT zero-initialises its head: constant logits, zero gradients everywhere
        torch.nn.init.normal_(dict(net.named_modules())[head].weight, std=0.02)
    net.head_reinitialised = head
    return net.eval()


def zero_head(net) -> str | None:
    """The name of the last Linear layer when its weights are all zero, else None."""
    import torch

    last = [(n, m) for n, m in net.named_modules() if isinstance(m, torch.nn.Linear)][-1:]
    return last[0][0] if last and not bool(last[0][1].weight.any()) else None


def has_batchnorm(net) -> bool:
    from torch.nn.modules.batchnorm import _BatchNorm

    return any(isinstance(m, _BatchNorm) for m in net.modules())


def make_data(path: Path, size: int) -> None:
    """Synthetic size x size RGB images, seeded: each class a smooth colour pattern plus noise (accuracy is not the
    point)."""
    import numpy as np

    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(10), N_IMAGES // 10)
    rng.shuffle(labels)
    yy, xx = np.mgrid[0:size, 0:size] / size
    images = np.empty((N_IMAGES, 3, size, size), dtype=np.uint8)
    for i, c in enumerate(labels):
        base = np.stack([np.sin(2 * np.pi * ((c + 1) * xx + k * yy) / 3 + k) for k in range(3)])
        img = 0.5 + 0.3 * base + 0.2 * rng.standard_normal((3, size, size))
        images[i] = np.clip(img * 255, 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, images=images, labels=labels.astype(np.int64))


def one_line_error(stderr: str, rc: int) -> str:
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("Error:")]
    if errors:
        return errors[-1][:400]
    if any(line.startswith("Traceback") for line in lines):
        return lines[-1][:400]
    if rc in (124, -9, 137):
        return f"timed out after {STEP_TIMEOUT} s"
    return (lines[-1] if lines else f"exit {rc}")[:400]


def harden(args: list[str], cwd: Path, log: Path) -> dict:
    """Run `python -m hardener ARGS` in `cwd`, timed; stdout and stderr go to `log` (.out / .err)."""
    cmd = [sys.executable, "-m", "hardener", *args]
    t0 = time.monotonic()
    try:
        p = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=STEP_TIMEOUT)
        rc, out, err = p.returncode, p.stdout, p.stderr
    except subprocess.TimeoutExpired as e:
        rc, out, err = 124, e.stdout or "", (e.stderr or "") + f"\ntimed out after {STEP_TIMEOUT} s"
        out = out.decode() if isinstance(out, bytes) else out
        err = err.decode() if isinstance(err, bytes) else err
    seconds = round(time.monotonic() - t0, 1)
    log.with_suffix(".out").write_text(out)
    log.with_suffix(".err").write_text(f"$ harden {' '.join(args)}\n(cwd {cwd}, exit {rc}, {seconds} s)\n\n{err}")
    rec = {"ok": rc == 0, "rc": rc, "seconds": seconds, "command": "harden " + " ".join(_quote(a) for a in args)}
    if rc != 0:
        rec["error"] = one_line_error(err, rc)
    rec["_stdout"], rec["_stderr"] = out, err
    return rec


def _quote(a: str) -> str:
    return f"'{a}'" if re.search(r"[\s{}\"*]", a) else a


def stderr_sites(err: str) -> list[str]:
    """The lines where harden says which sites it chose and why, and what the patches cost."""
    keep = ("site ", "sites ", "  passed over", "patch cost:", "bn ", "twins", "auxiliary")
    return [line.rstrip() for line in err.splitlines() if line.startswith(keep)]


def base_identity(base_file: Path, patched_file: Path, arch: str, kwargs: dict, data: Path, folder: Path | None
                  ) -> dict:
    """Are the base tensors in the patched file bit-identical to the original state dict, and does
    `hardener.load(...)` with `patches_disabled()` give exactly the base's logits? A Hugging Face model (`folder`, its
    save_pretrained folder) is loaded without --arch, as its manifest says, and compared with transformers'
    `from_pretrained` of the folder."""
    import numpy as np
    import torch
    from safetensors.torch import load_file

    import hardener

    orig = torch.load(base_file, map_location="cpu", weights_only=True)
    stored = load_file(str(patched_file))
    base_part = {k: v for k, v in stored.items() if not k.startswith("harden.")}
    out: dict = {"base_tensors": len(orig), "patch_tensors": len(stored) - len(base_part)}
    missing = sorted(set(orig) - set(base_part))
    extra = sorted(set(base_part) - set(orig))
    differ = [k for k in orig if k in base_part and not (orig[k].dtype == base_part[k].dtype
                                                          and orig[k].shape == base_part[k].shape
                                                          and torch.equal(orig[k], base_part[k]))]
    out["tensors_identical"] = not missing and not extra and not differ
    if missing or extra or differ:
        out["tensor_mismatch"] = {"missing": missing[:5], "extra": extra[:5], "differ": differ[:5],
                                  "counts": [len(missing), len(extra), len(differ)]}
    if folder is not None:
        model = hardener.load(str(patched_file))
        out["manifest_arch"] = model.manifest.arch
        hf = hf_class(arch)[0].from_pretrained(str(folder), local_files_only=True).eval()
        net = lambda v: hf(v).logits  # noqa: E731
    else:
        model = hardener.load(str(patched_file), arch=arch, arch_kwargs=kwargs)
        net = build_from(arch, kwargs)
        net.load_state_dict(orig)
    out["manifest_base_modified"] = bool(getattr(model.manifest, "base_modified", False))
    x = torch.from_numpy(np.load(data)["images"][:16]).float() / 255
    mean = torch.tensor(floats(MEAN)).view(1, 3, 1, 1)
    std = torch.tensor(floats(STD)).view(1, 3, 1, 1)
    with torch.no_grad():
        ref = net((x - mean) / std)
        model.eval()
        with model.patches_disabled():
            got = model(x)
        patched = model(x)
    out["disabled_logits_equal"] = bool(torch.equal(ref, got))
    out["disabled_logits_max_diff"] = float((ref - got).abs().max())
    out["patched_logits_differ_from_base"] = not bool(torch.equal(ref, patched))
    out["ok"] = out["tensors_identical"] and out["disabled_logits_equal"]
    return out


def floats(csv: str) -> list[float]:
    return [float(v) for v in csv.split(",")]


def build_from(arch: str, kwargs: dict):
    import importlib

    mod, fn = arch.split(":")
    return getattr(importlib.import_module(mod), fn)(**kwargs).eval()


def run_model(name: str, work: Path, only_recipes: list[str] | None) -> dict:
    import torch

    arch, kwargs = MODELS[name]
    size = SIZES.get(name, SIZE)
    data = work / f"synthetic-{size}.npz"
    if not data.is_file():
        make_data(data, size)
    wd = work / name
    wd.mkdir(parents=True, exist_ok=True)
    logs = RESULTS / "logs" / name
    logs.mkdir(parents=True, exist_ok=True)
    res: dict = {"model": name, "arch": arch, "arch_kwargs": kwargs, "input": [3, size, size], "steps": {},
                 "env": environment()}
    t0 = time.monotonic()
    net = build(name)
    res["has_batchnorm"] = has_batchnorm(net)
    res["head_reinitialised"] = net.head_reinitialised
    res["base_parameters"] = sum(p.numel() for p in net.parameters())
    base_file = wd / "base.pth"  # the reference the base check compares with
    torch.save(net.state_dict(), base_file)
    folder = None
    if is_hf(arch):  # the README's route: the save_pretrained folder, its preprocessor config, no --arch
        import transformers

        transformers.utils.logging.disable_progress_bar()
        folder = wd / "hf"
        shutil.rmtree(folder, ignore_errors=True)
        net.save_pretrained(folder)
        transformers.ViTImageProcessor(size={"height": size, "width": size}, image_mean=floats(MEAN),
                                       image_std=floats(STD)).save_pretrained(folder)
        model, common, norm = str(folder), [], ["--preprocessor", str(folder / "preprocessor_config.json")]
    else:
        model, common, norm = str(base_file), ["--arch", arch, "--arch-kwargs", json.dumps(kwargs)], \
            ["--mean", MEAN, "--std", STD]
    res["build_seconds"] = round(time.monotonic() - t0, 1)
    del net
    steps = res["steps"]

    def record(step: str, rec: dict) -> dict:
        rec.pop("_stdout", None)
        rec.pop("_stderr", None)
        steps[step] = rec
        status = "ok" if rec.get("ok") else f"FAILED: {rec.get('error', '')}"
        print(f"  {name} {step}: {status} ({rec.get('seconds', 0)} s)", flush=True)
        return rec

    rec = harden(["layers", model, *common, *norm, "--input-shape", f"3,{size},{size}", "--json"],
                 wd, logs / "layers")
    if rec["ok"]:
        try:
            table = json.loads(rec["_stdout"])
            rec["suggested_sites"] = table.get("suggested_sites")
            rec["stem"] = table.get("stem")
            rec["valid_sites"] = sum(1 for r in table.get("layers", []) if r.get("site"))
            rec["layers"] = len(table.get("layers", []))
            rec["passed_over"] = table.get("passed_over")
        except json.JSONDecodeError as e:
            rec["ok"], rec["error"] = False, f"--json output is not JSON: {e}"
    record("layers", rec)

    recipes = [r for r in RECIPES if r == "robust" or res["has_batchnorm"]]
    res["recipes"] = recipes
    for recipe in recipes:
        if only_recipes and recipe not in only_recipes:
            continue
        out = wd / f"{recipe}.hardened.safetensors"
        rep = RESULTS / "reports" / f"{name}.{recipe}.patch.json"
        rep.parent.mkdir(parents=True, exist_ok=True)
        rec = harden(["patch", model, *common, *norm, "--data", str(data), *RECIPES[recipe], *PATCH_BUDGET,
                      "--out", str(out), "--report", str(rep), "--force"], wd, logs / f"patch-{recipe}")
        rec["stderr_sites"] = stderr_sites(rec["_stderr"])
        if rep.is_file():
            r = json.loads(rep.read_text())
            rec["patches"] = [f"{p['kind']}:{p['site']}" for p in r.get("patches", [])]
            rec["patch_cost"] = r.get("patch_cost")
            rec["base_modified"] = r.get("base_modified")
            rec["preset"] = r.get("preset")
            rec["train_seconds"] = r.get("train_seconds")
            rec["report_seconds"] = r.get("report_seconds")
            rec["cost_line"] = next((s for s in rec["stderr_sites"] if s.startswith("patch cost:")), None)
        record(f"patch-{recipe}", rec)
        if not rec["ok"] or not out.is_file():
            continue
        t1 = time.monotonic()
        try:
            ident = base_identity(base_file, out, arch, kwargs, data, folder)
        except Exception as e:  # noqa: BLE001 - recorded, the bench goes on
            ident = {"ok": False, "error": f"{type(e).__name__}: {e}".splitlines()[0][:400]}
        ident["seconds"] = round(time.monotonic() - t1, 1)
        record(f"identity-{recipe}", ident)
        erep = RESULTS / "reports" / f"{name}.{recipe}.eval.json"
        state = wd / f"eval-state-{recipe}"  # harden eval's resumable state: a bench run that was stopped leaves
        shutil.rmtree(state, ignore_errors=True)  # one, which the same command then refuses without --resume
        rec = harden(["eval", str(out), *common, "--data", str(data), *EVAL_BUDGET, "--report", str(erep), "--force",
                      "--state-dir", str(state)], wd, logs / f"eval-{recipe}")
        if erep.is_file():
            r = json.loads(erep.read_text())
            rec["summary"] = r.get("summary")
            rec["checks"] = {c.get("name"): c.get("status") for c in r.get("checks", []) if isinstance(c, dict)}
        record(f"eval-{recipe}", rec)
        for fmt, ext in EXPORTS.items():
            f = wd / f"{recipe}{ext}"
            rec = harden(["export", str(out), *common, "--format", fmt, "--out", str(f), "--force"], wd,
                         logs / f"export-{fmt}-{recipe}")
            if f.is_file():
                rec["bytes"] = f.stat().st_size
            record(f"{fmt}-{recipe}", rec)
    res["seconds"] = round(time.monotonic() - t0, 1)
    return res


def environment() -> dict:
    import importlib.metadata as md

    env = {"python": platform.python_version(), "machine": platform.machine(),
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")}
    for pkg in ("torch", "torchvision", "timm", "transformers", "onnx", "onnxruntime", "onnxscript", "torchattacks",
                "harden"):
        try:
            env[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            env[pkg] = None
    try:
        env["harden_commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                              text=True).stdout.strip()
    except OSError:
        pass
    return env


def cmd_run(a) -> None:
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    RESULTS.mkdir(parents=True, exist_ok=True)
    work = Path(a.work)
    names = a.models.split(",") if a.models else list(MODELS)
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        sys.exit(f"unknown model(s) {unknown}; known: {', '.join(MODELS)}")
    (RESULTS / "env.json").write_text(json.dumps(environment(), indent=2) + "\n")
    t0 = time.monotonic()
    for name in names:
        dest = RESULTS / f"{name}.json"
        if dest.is_file() and not a.force:
            print(f"{name}: done before ({dest.relative_to(ROOT)}); --force to rerun", flush=True)
            continue
        print(f"{name}: {MODELS[name][0]} {json.dumps(MODELS[name][1])}", flush=True)
        res = run_model(name, work, a.recipes.split(",") if a.recipes else None)
        dest.write_text(json.dumps(res, indent=2) + "\n")
        print(f"{name}: {res['seconds']} s", flush=True)
        if not a.keep:
            shutil.rmtree(work / name / "hf", ignore_errors=True)
            for f in (work / name).glob("*"):
                if f.suffix in (".pt2", ".onnx", ".data") or f.name.endswith(".safetensors"):
                    f.unlink()
    print(f"total {time.monotonic() - t0:.0f} s", flush=True)
    cmd_table(a)


def _cell(rec: dict | None) -> str:
    if rec is None:
        return "–"
    if rec.get("ok"):
        return f"ok {rec.get('seconds', 0):.0f}s"
    return f"**FAILED** {rec.get('seconds', 0):.0f}s"


def _n(v: float) -> str:
    return next((f"{v / d:.1f}{u}" for d, u in ((1e9, "G"), (1e6, "M"), (1e3, "k")) if v >= d), f"{v:.0f}")


def cmd_table(a) -> None:
    rows = [json.loads((RESULTS / f"{n}.json").read_text()) for n in MODELS if (RESULTS / f"{n}.json").is_file()]
    env = json.loads((RESULTS / "env.json").read_text()) if (RESULTS / "env.json").is_file() else {}
    out = [f"# Compatibility bench — `bench/compat.sh`", "",
           f"torch {env.get('torch')}, torchvision {env.get('torchvision')}, timm {env.get('timm')}, "
           f"transformers {env.get('transformers')}, onnx {env.get('onnx')}, onnxruntime {env.get('onnxruntime')}; "
           f"harden {env.get('harden_commit')} (the last run; each row's commit in its column); "
           f"OMP_NUM_THREADS={env.get('OMP_NUM_THREADS')}. Random-init weights (seed 0, 10 classes), "
           f"{N_IMAGES} synthetic RGB images at the row's input size; `harden patch {' '.join(PATCH_BUDGET)}`; "
           f"`harden eval {' '.join(EVAL_BUDGET)}`. Cells: ok/FAILED and wall seconds of the step (one process, "
           "from start to exit; model loading included). identical = the patched file's base tensors equal the "
           "original state dict bit for bit, and `hardener.load(...)` under `patches_disabled()` gives exactly "
           "the base's logits.", ""]
    steps = [("patch", "patch"), ("identity", "base identical"), ("eval", "eval"), ("export", "export"),
             ("onnx", "onnx")]
    out += ["Default recipe = `--preset robust` (no method options); auxbn = `--method fixer,auxbn --bn auto` "
            "(models with BatchNorm only; – elsewhere).", "",
            "| model | params | input | layers | " + " | ".join(t for _, t in steps) + " | "
            + " | ".join(f"auxbn {t}" for _, t in steps) + " | model total | harden |",
            "|---|---|---|---|" + "---|" * (2 * len(steps)) + "---|---|"]
    for r in rows:
        s = r["steps"]
        cells = [_cell(s.get(f"{k}-{recipe}")) for recipe in ("robust", "auxbn") for k, _ in steps]
        out.append(f"| {r['model']} | {_n(r['base_parameters'])} | {r['input'][1]}x{r['input'][2]} | "
                   f"{_cell(s.get('layers'))} | " + " | ".join(cells)
                   + f" | {r.get('seconds', 0):.0f}s | {r.get('env', {}).get('harden_commit', OLD_COMMIT)} |")
    out.append("")
    out += ["## Sites and patch cost", "",
            "| model | recipe | sites harden chose | patch parameters (of base) | patch multiply-adds (of base) |",
            "|---|---|---|---|---|"]
    for r in rows:
        for recipe in r.get("recipes", []):
            p = r["steps"].get(f"patch-{recipe}") or {}
            c = p.get("patch_cost")
            cost = ((f"{c['parameters']:,} ({100 * c['parameters'] / c['base_parameters']:.1f}%)",
                     f"{_n(c['macs'])} ({100 * c['macs'] / max(1, c['base_macs']):.1f}% of {_n(c['base_macs'])})")
                    if c else ("–", "–"))
            names = p.get("patches", [])
            twins = [n for n in names if n.startswith("auxbn:")]
            sites = ", ".join(f"`{n}`" for n in names if n not in twins)
            if twins:
                sites += f"{' + ' if sites else ''}{len(twins)} BN twins"
            sites = sites or "–"
            out.append(f"| {r['model']} | {recipe} | {sites} | {cost[0]} | {cost[1]} |")
    out.append("")
    fails = [(r["model"], step, rec.get("error", "")) for r in rows for step, rec in r["steps"].items()
             if not rec.get("ok")]
    out += ["## Failures", ""]
    out += [f"- {m} {step}: `{err}`" for m, step, err in fails] or ["None."]
    out.append("")
    notes = [f"- {r['model']}: its zero-initialised head `{r['head_reinitialised']}` was re-drawn from N(0, 0.02²) "
             "before saving (with it all logits are 0 whatever the input, so no gradient reaches input or patches)"
             for r in rows if r.get("head_reinitialised")]
    for r in rows:
        for recipe in r.get("recipes", []):
            ident = r["steps"].get(f"identity-{recipe}") or {}
            if ident.get("ok") and not ident.get("patched_logits_differ_from_base"):
                notes.append(f"- {r['model']} {recipe}: the patched model's logits equal the base's (the patches "
                             "did not move in one step)")
            ev = r["steps"].get(f"eval-{recipe}") or {}
            warned = [k for k, v in (ev.get("checks") or {}).items() if v != "pass"]
            if warned:
                notes.append(f"- {r['model']} {recipe}: `harden eval` sanity checks not passed: {', '.join(warned)}")
            if ev.get("summary"):
                e = ev["summary"]
                notes.append(f"- {r['model']} {recipe}: eval (n={e['n']}) base clean {e['base_clean']:.2f}, "
                             f"patched clean {e['clean']:.2f}, white-box {e['robust']:.2f}, transfer "
                             f"{e['transfer']:.2f} (random weights, synthetic data: meaningless but recorded)")
    out += ["## Notes", "", *(notes or ["None."]), ""]
    total = sum(r.get("seconds", 0) for r in rows)
    out += [f"Total wall time of the models' runs: {total:.0f} s ({total / 60:.1f} min).", ""]
    (RESULTS / "table.md").write_text("\n".join(out))
    print("\n".join(out))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--models", help="comma list (default: all): " + ", ".join(MODELS))
    r.add_argument("--recipes", help="comma list of robust, auxbn (default: both where they apply)")
    r.add_argument("--force", action="store_true", help="rerun models whose results exist")
    r.add_argument("--keep", action="store_true", help="keep checkpoints and exports in --work")
    r.add_argument("--work", default=str(WORK))
    r.set_defaults(fn=cmd_run)
    t = sub.add_parser("table")
    t.set_defaults(fn=cmd_table)
    a = ap.parse_args()
    a.fn(a)


if __name__ == "__main__":
    main()
