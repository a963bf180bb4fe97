"""The fixer paper's comparison (Table 1 / Figure 5) on Fashion-MNIST, plus cost: one command, seeded.

    python bench/compare_fmnist.py                     # everything below, results in bench/results/compare/
    python bench/compare_fmnist.py --quick --out-dir /tmp/q   # tiny and fast: CI runs it so the script cannot rot
    python bench/compare_fmnist.py --methods fx-a,adv-train --fractions 0.1

For each data fraction (10% and 1% of fashion-mnist:train, stratified, seed 0) and each method, it runs
`harden patch` (eps 0.1 Linf) and then `harden eval` on a seeded stratified subset of fashion-mnist:test:
clean; white-box APGD-CE + APGD-DLR (100 steps each) + FGSM; transfer (same attacks computed on the
base); black-box Square (--square-queries, 1,000 by default: at 5,000 it costs about 1.4 s per robust
image on one core for the adversarially fine-tuned model and 6 s for the pre-filtered one); with the
sanity checks. All evaluations share one `--base-cache`, so the base's rows and transfer examples are
computed once. The run resumes: a row whose reports exist with the same command is not run again
(--rerun forces it), and the tables always cover every row finished in --out-dir. Runs on smaller
fractions train for proportionally more epochs (100 at 1%, validated every 10th), so that every
fraction gets the same number of optimiser steps: at 10 epochs, 1% is 50 steps and fixers underfit.
Every run's wall time and peak memory (os.wait4 of the child) are recorded; every report is kept
as JSON. Then it writes RESULTS-compare.md (table + accuracy-vs-fraction SVG plot) and the cost
comparison: how long full adversarial fine-tuning needs to reach the transfer accuracy of
`--adversary base` fixers and the white-box accuracy of `--adversary patched` fixers (per-epoch
validation on 500 held-out training images, PGD-10), as ratios of wall times.

The base is examples/fmnist_base.safetensors, made by examples/train_base.py on all 60k training
images; --train-base retrains it first (about 3 minutes an epoch on 2 CPU cores).
"""
from __future__ import annotations

import argparse
import html
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ARCH = "examples/fmnist_model.py:resnet9_small"
NORM = ["--mean", "0.2860", "--std", "0.3530"]
APGD10 = ["--attack", "apgd-ce", "--steps", "10"]
PGD5 = ["--attack", "pgd", "--steps", "5"]

# name -> (description, harden patch arguments)
METHODS: dict[str, tuple[str, list[str]]] = {
    "fx-a": ("fixers after layer1+layer2, linear ζ, δ=1, λ=1, μ=0 (paper fx-a), base's APGD-10 examples",
             ["--at", "layer1,layer2", "--act", "linear", "--delta", "1", "--lam", "1", "--mu", "0", *APGD10]),
    "fx-b": ("fixers after layer1+layer2, tanh ζ, δ=0.1, λ=1, μ=0 (paper fx-b), base's APGD-10 examples",
             ["--at", "layer1,layer2", "--act", "tanh", "--delta", "0.1", "--lam", "1", "--mu", "0", *APGD10]),
    "fixer-patched": ("fixers after prep+layer1+layer2 (ρ=1), PGD-5 against the patched model, μ=λ=0",
                      ["--at", "prep,layer1,layer2", "--rho", "1", "--adversary", "patched", "--mu", "0",
                       "--lam", "0", *PGD5]),
    "denoise": ("non-local Gaussian denoise blocks after layer1+layer2, base's APGD-10 examples",
                ["--method", "denoise", "--at", "layer1,layer2", *APGD10]),
    "auxbn": ("auxiliary BN twins of all BNs, PGD-5 against the patched model, μ=λ=0",
              ["--method", "auxbn", "--bn", "all", "--adversary", "patched", "--mu", "0", "--lam", "0", *PGD5]),
    "adv-train": ("full adversarial fine-tuning (every weight), PGD-5 against the model, lr 1e-3",
                  ["--method", "adv-train", "--lr", "1e-3", "--mu", "0", *PGD5]),
    "robust": ("--preset robust", ["--preset", "robust"]),
}
COST_RUNS = {"fx-a": "transfer", "fixer-patched": "whitebox"}  # patch runs whose accuracy adv-train must reach


def run(cmd: list[str], log: Path) -> dict:
    """Run a command; its wall time, peak RSS (this child only) and exit status."""
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {"cmd": cmd, "seconds": time.perf_counter() - t0, "peak_rss_mb": usage.ru_maxrss / 1024,
            "cpu_seconds": usage.ru_utime + usage.ru_stime, "exit": proc.returncode}


def harden() -> list[str]:
    exe = shutil.which("harden")
    return [exe] if exe else [sys.executable, "-m", "hardener"]


def settings(quick: bool, eval_samples: int, queries: int) -> dict:
    if quick:
        return {"train": ["--epochs", "1", "--batch-size", "32", "--eval-samples", "20", "--eval-steps", "2"],
                "eval": ["--max-samples", "30", "--steps", "3", "--queries", "20", "--no-checks"],
                "validate": "30", "fractions": [0.002]}
    return {"train": ["--epochs", "10", "--eval-samples", "200", "--eval-steps", "10"],
            "eval": ["--max-samples", str(eval_samples), "--queries", str(queries)],
            "validate": "500", "fractions": [0.1, 0.01]}


def data_specs(quick: bool) -> tuple[str, str]:
    from hardener import data as hdata

    try:
        hdata.load("fashion-mnist:test")
        return "fashion-mnist:train", "fashion-mnist:test"
    except Exception:  # noqa: BLE001 - Debian package missing: the shipped subset (quick mode only)
        if not quick:
            raise
        return "examples/data/fashion-mnist-train-2000.npz", "examples/data/fashion-mnist-test-1000.npz"


def done(previous: dict | None, step: str, cmd: list[str], report: Path) -> dict | None:
    """The earlier record of this step when it finished with the same command and left its report."""
    rec = (previous or {}).get(step)
    def args(c):  # from the subcommand on: `harden patch ...` and `python -m hardener patch ...` are the same
        return c[c.index(step):] if step in c else c
    if rec and rec.get("exit") == 0 and args(rec["cmd"]) == args(cmd) and report.exists():
        return rec
    return None


def one(name: str, frac: float, out: Path, cfg: dict, train: str, test: str, quick: bool, evaluate: bool,
        previous: dict | None = None) -> dict:
    desc, args = METHODS[name]
    tag = f"{name}-{frac:g}"
    ckpt = out / f"{tag}.safetensors"
    validate = ["--validate", cfg["validate"]] if name in (*COST_RUNS, "adv-train") else []
    if name == "robust" and quick:
        args = [*args, "--select-on", "30", "--eps-warmup", "0"]  # the preset holds out 500, warms up 2 epochs
    if quick and "--steps" in args:
        args = list(args)
        args[args.index("--steps") + 1] = "2"
    train_args = list(cfg["train"])
    scale = 1 if quick else max(1, round(0.1 / frac))
    if scale > 1:  # smaller subsets train for more epochs: every fraction gets the same number of optimiser steps
        i = train_args.index("--epochs")
        train_args[i + 1] = str(int(train_args[i + 1]) * scale)
        train_args += ["--validate-every", str(scale)]
    patch_cmd = [*harden(), "patch", "examples/fmnist_base.safetensors", "--arch", ARCH, *NORM, "--data", train,
                 "--subset", f"{frac:g}", "--eps", "0.1", "--seed", "0", "--force", "--quiet", "--out", str(ckpt),
                 "--report", str(out / f"{tag}.patch.json"), *train_args, *args, *validate]
    parent = ["--parent", "examples/fmnist_base.safetensors"] if name == "adv-train" else []
    eval_cmd = [*harden(), "eval", str(ckpt), "--arch", ARCH, *parent, "--data", test, "--eps", "0.1",
                "--attack", "apgd-ce,apgd-dlr,fgsm,square", "--threat", "all", "--seed", "0", "--quiet",
                "--base-cache", str(out / "base-cache"), "--report", str(out / f"{tag}.eval.json"), *cfg["eval"]]
    evaluated = done(previous, "eval", eval_cmd, out / f"{tag}.eval.json") if evaluate else None
    patch = done(previous, "patch", patch_cmd, out / f"{tag}.patch.json")
    if patch is None or (evaluate and evaluated is None and not ckpt.exists()):
        patch, evaluated = run(patch_cmd, out / f"{tag}.patch.log"), None
    row = {"method": name, "description": desc, "fraction": frac, "patch": patch}
    if evaluated is not None:
        row["eval"] = evaluated
    if patch["exit"] != 0 or not evaluate or evaluated is not None:
        return row
    row["eval"] = run(eval_cmd, out / f"{tag}.eval.log")
    if not quick and row["eval"]["exit"] == 0:
        ckpt.unlink(missing_ok=True)  # checkpoints are reproducible from the command; keep the reports
    return row


def read_runs(path: Path) -> dict:
    """The rows of runs.json by (method, fraction); empty when there is none."""
    if not path.exists():
        return {}
    return {(r["method"], r["fraction"]): r for r in json.loads(path.read_text())["runs"]}


def save_runs(path: Path, meta: dict, rows_by: dict, mine: list) -> dict:
    """Write runs.json, keeping rows that another invocation sharing the folder finished meanwhile."""
    import fcntl

    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        rows_by.update({k: r for k, r in read_runs(path).items() if k not in mine})
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps({"meta": meta, "runs": list(rows_by.values())}, indent=2))
        os.replace(tmp, path)
    return rows_by


def summarise(row: dict, out: Path) -> dict:
    tag = f"{row['method']}-{row['fraction']:g}"
    s = {"method": row["method"], "fraction": row["fraction"], "patch_seconds": row["patch"]["seconds"],
         "patch_peak_rss_mb": row["patch"]["peak_rss_mb"]}
    pj = out / f"{tag}.patch.json"
    if pj.exists():
        p = json.loads(pj.read_text())
        s["train_seconds"] = p.get("train_seconds")
        s["trainable_parameters"] = p.get("trainable_parameters")
        s["epochs"] = p["epoch_log"]
    ej = out / f"{tag}.eval.json"
    if ej.exists():
        e = json.loads(ej.read_text())
        m = e["models"]["patched"]
        s["clean"] = m["clean"]["accuracy"]
        s["n"] = m["clean"]["n"]
        for t, th in m["threats"].items():
            s[t] = th["robust"]["accuracy"]
            s[f"{t}_ci95"] = th["robust"]["ci95"]
            for a in th["attacks"]:
                s[f"{t}:{a['attack']}"] = a["robust_after"]["accuracy"]
        s["worst_case"] = m["worst_case"]["accuracy"]
        s["base_clean"] = e["models"]["base"]["clean"]["accuracy"]
        s["checks_warn"] = [c["name"] for c in e.get("checks", []) if c["status"] == "warn"]
    return s


def cost(rows: list[dict]) -> list[dict]:
    """Wall time of adv-train to reach each patch run's final validation accuracy, as a ratio."""
    by = {(r["method"], r["fraction"]): r for r in rows}
    out = []
    for name, threat in COST_RUNS.items():
        for frac in sorted({r["fraction"] for r in rows}):
            p, a = by.get((name, frac)), by.get(("adv-train", frac))
            if not p or not a or "epochs" not in p or "epochs" not in a:
                continue
            key = "val_transfer" if threat == "transfer" else "val_robust"
            if p["epochs"][-1].get(key) is None:
                continue
            target = p["epochs"][-1][key]
            patch_s = p["train_seconds"] - sum(e.get("val_seconds") or 0 for e in p["epochs"])
            spent, reached = 0.0, None
            for e in a["epochs"]:
                spent += e["seconds"]
                if e.get(key) is not None and e[key] >= target:
                    reached = e["epoch"]
                    break
            out.append({"patch_method": name, "threat": threat, "fraction": frac, "target": target,
                        "patch_seconds": patch_s, "adv_train_epoch": reached,
                        "adv_train_seconds": spent if reached else None,
                        "adv_train_seconds_all": sum(e["seconds"] for e in a["epochs"]),
                        "adv_train_best": max(e.get(key) or 0 for e in a["epochs"]),
                        "ratio": spent / patch_s if reached else None})
    return out


def svg_plot(summary: list[dict]) -> str:
    """Accuracy vs data fraction (log x), per method: clean (solid), white-box (dashed), transfer (dotted) worst
    cases."""
    fr = sorted({s["fraction"] for s in summary})
    if len(fr) < 2:
        return ""
    import math

    w, h, pad = 560, 320, 50
    lx = [math.log10(f) for f in fr]

    def xy(f, a):
        x = pad + (math.log10(f) - lx[0]) / (lx[-1] - lx[0]) * (w - 2 * pad)
        return x, h - pad - a * (h - 2 * pad)
    colours = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"]
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h + 20 * len(METHODS)}" role="img">',
             f'<line x1="{pad}" y1="{h - pad}" x2="{w - pad}" y2="{h - pad}" stroke="black"/>',
             f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{h - pad}" stroke="black"/>']
    for a in (0, 0.25, 0.5, 0.75, 1):
        y = h - pad - a * (h - 2 * pad)
        parts.append(f'<text x="{pad - 6}" y="{y + 4}" font-size="11" text-anchor="end">{a:.0%}</text>')
    for f in fr:
        x, _ = xy(f, 0)
        parts.append(f'<text x="{x}" y="{h - pad + 16}" font-size="11" text-anchor="middle">{f:.0%}</text>')
    parts.append(f'<text x="{w / 2}" y="{h - 8}" font-size="12" text-anchor="middle">fraction of the training '
                 "data (log scale)</text>")
    names = [m for m in METHODS if any(s["method"] == m for s in summary)]
    for i, m in enumerate(names):
        c = colours[i % len(colours)]
        pts = sorted((s for s in summary if s["method"] == m and "clean" in s), key=lambda s: s["fraction"])
        styles = (("clean", ""), ("whitebox", ' stroke-dasharray="5,4"'), ("transfer", ' stroke-dasharray="1,3"'))
        for key, dash in styles:
            coords = " ".join(f"{xy(s['fraction'], s.get(key, 0))[0]:.1f},{xy(s['fraction'], s.get(key, 0))[1]:.1f}"
                              for s in pts)
            if coords:
                parts.append(f'<polyline points="{coords}" fill="none" stroke="{c}" stroke-width="2"{dash}/>')
        parts.append(f'<text x="{pad}" y="{h + 14 + 20 * i}" font-size="12" fill="{c}">{html.escape(m)}: clean '
                     "(solid), white-box (dashed), transfer (dotted)</text>")
    parts.append("</svg>")
    return "\n".join(parts)


def markdown(summary: list[dict], costs: list[dict], meta: dict) -> str:
    def pct(v):
        return "–" if v is None else f"{100 * v:.1f}"
    lines = ["# Fashion-MNIST comparison — `bench/compare_fmnist.py`", "",
             f"Machine: {meta['machine']}. Commit {meta['commit'][:10]}. Evaluation: {meta['eval']}.",
             "Transfer = attacks computed on the base, scored on the model; white-box = computed on the model "
             "itself (APGD-CE → APGD-DLR → FGSM, per-sample worst case); black-box = Square. "
             "Worst case = over all three threat models. Every fraction gets the same number of optimiser "
             "steps: 10 epochs at 10%, 100 at 1% (validated every 10th).", "",
             "| fraction | method | clean | white-box | transfer | transfer APGD-CE alone | black-box Square "
             "| worst case | trainable params | patch run s | peak RSS MB | checks warned |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in sorted(summary, key=lambda s: (-s["fraction"], list(METHODS).index(s["method"]))):
        lines.append(f"| {s['fraction']:.1%} | {s['method']} | {pct(s.get('clean'))} | {pct(s.get('whitebox'))} | "
                     f"{pct(s.get('transfer'))} | {pct(s.get('transfer:apgd-ce'))} | {pct(s.get('blackbox'))} | "
                     f"{pct(s.get('worst_case'))} | "
                     f"{s.get('trainable_parameters', '–'):,} | {s['patch_seconds']:.0f} | "
                     f"{s['patch_peak_rss_mb']:.0f} | {', '.join(s.get('checks_warn') or []) or '–'} |")
    if summary and "base_clean" in summary[0]:
        lines += ["", f"Base clean accuracy on the same samples: {pct(summary[0]['base_clean'])}; the base has 0.0 "
                      "white-box robust accuracy."]
    lines += ["", "Methods:", ""] + [f"- **{m}**: {d}" for m, (d, _) in METHODS.items()]
    if costs:
        lines += ["", "## Cost: full adversarial fine-tuning to the same accuracy", "",
                  "| target (patch run) | threat | fraction | target val. acc. | patch s | adv-train s to reach | "
                  "adv-train epoch | ratio adv-train / patch | adv-train best |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for c in costs:
            reached = f"{c['adv_train_seconds']:.0f}" if c["adv_train_seconds"] else \
                f"not reached (> {c['adv_train_seconds_all']:.0f})"
            lines.append(f"| {c['patch_method']} | {c['threat']} | {c['fraction']:.1%} | {pct(c['target'])} | "
                         f"{c['patch_seconds']:.0f} | {reached} | {c['adv_train_epoch'] or '–'} | "
                         f"{'%.2f' % c['ratio'] if c['ratio'] else '–'} | {pct(c['adv_train_best'])} |")
    plot = meta.get("plot")
    if plot:
        lines += ["", "## Accuracy vs data fraction (cf. the fixer paper's Figure 5)", "", f"![plot]({plot})"]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--fractions", help="comma list (default 0.1,0.01)")
    ap.add_argument("--eval-samples", type=int, default=2000)
    ap.add_argument("--square-queries", type=int, default=1000)
    ap.add_argument("--rerun", action="store_true", help="run every row again, even those finished before")
    ap.add_argument("--tables-only", action="store_true",
                    help="run nothing: rewrite the tables and plot from the rows finished in --out-dir")
    ap.add_argument("--out-dir", default=str(ROOT / "bench/results/compare"))
    ap.add_argument("--train-base", action="store_true", help="retrain examples/fmnist_base.safetensors first")
    ap.add_argument("--jobs", type=int, default=1,
                    help="rows run at once, one thread each (CI's quick run: 2 on 2 cores; timings then share the CPU)")
    ap.add_argument("--no-eval", action="store_true",
                    help="patch runs only (enough for the cost comparison, which uses per-epoch validation)")
    args = ap.parse_args()
    out = Path(args.out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    cfg = settings(args.quick, args.eval_samples, args.square_queries)
    fractions = [float(f) for f in args.fractions.split(",")] if args.fractions else cfg["fractions"]
    methods = [m.strip() for m in args.methods.split(",")]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        sys.exit(f"unknown method(s) {unknown}; choose from {list(METHODS)}")
    train, test = data_specs(args.quick)
    meta = {"machine": f"{platform.platform()}, {os.cpu_count()} CPUs",
            "commit": subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                                     text=True).stdout.strip() or "unknown",
            "eval": " ".join(cfg["eval"]), "quick": args.quick, "fractions": fractions, "methods": methods}
    if args.train_base:
        meta["train_base"] = run([sys.executable, "examples/train_base.py", "--epochs", "5", "--out",
                                  "examples/fmnist_base.safetensors"], out / "train_base.log")
    runs_file = out / "runs.json"
    # every row finished here before, by (method, fraction); this invocation's rows replace theirs
    rows_by = read_runs(runs_file) if args.tables_only or not args.rerun else {}
    this: list[tuple[str, float]] = []
    lock = threading.Lock()

    def row(key: tuple[str, float]) -> None:
        print(f"[compare] {key[0]} at {key[1]:g}", file=sys.stderr, flush=True)
        done_row = one(*key, out, cfg, train, test, args.quick, not args.no_eval, rows_by.get(key))
        with lock:  # save_runs updates rows_by in place
            rows_by[key] = done_row
            this.append(key)
            save_runs(runs_file, meta, rows_by, this)

    todo = [] if args.tables_only else [(m, frac) for frac in fractions for m in methods]
    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        list(pool.map(row, todo))
    rows = sorted(rows_by.values(), key=lambda r: (-r["fraction"], list(METHODS).index(r["method"])))
    failed = [f"{m}-{f:g}" for m, f in this
              if rows_by[(m, f)]["patch"]["exit"] != 0 or rows_by[(m, f)].get("eval", {}).get("exit", 0) != 0]
    summary = [summarise(r, out) for r in rows]
    costs = cost(summary)
    plot = svg_plot(summary)
    if plot:
        (out / "accuracy_vs_fraction.svg").write_text(plot)
        meta["plot"] = "accuracy_vs_fraction.svg"
    (out / "summary.json").write_text(json.dumps({"meta": meta, "summary": summary, "cost": costs}, indent=2))
    (out / "RESULTS-compare.md").write_text(markdown(summary, costs, meta))
    print(out / "RESULTS-compare.md")
    if failed:
        sys.exit(f"failed runs: {', '.join(failed)} (see the .log files in {out})")


if __name__ == "__main__":
    main()
