"""Issue 30's frontier table from bench/light_fmnist.sh's outputs: per run, inference cost against its base
(multiply-adds counted by torch, latency measured at batch 1 and 256, one thread, base and patched interleaved in
this one process) beside what it buys on validation data (the quick check: clean, white-box APGD-CE-20, transfer;
the best per-epoch PGD-10 on the --select-on images) and, where run, on test (RUN.test.json: white-box APGD-CE ->
APGD-DLR, BPDA through the input patch, transfer).

    OMP_NUM_THREADS=1 python bench/light_table.py OUT_DIR [NAME=CHECKPOINT:ARCH ...] --json J > table.md

NAME=CHECKPOINT:ARCH adds a checkpoint that is not a run of OUT_DIR (e.g. today's heavy default). Latency is a
timing: run it on a quiet machine (the bench paused the background runs while it measured). `--previous J` (the
committed table.json) keeps the rows whose checkpoints are gone (run folders do not outlive a machine), marked †:
their latency ratios come from the run that wrote J, not this one, so compare ratios within one run only."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import hardener  # noqa: E402

ARCHS = {"r": "resnet9_small", "v": "vgg_silu_small", "t": "vit_small"}


def pct(a: dict | None) -> str:
    return "–" if not a else f"{100 * a['accuracy']:.1f}"


def figures(folder: Path, name: str) -> dict:
    out: dict = {}
    rep = folder / f"{name}.json"
    if rep.exists():
        r = json.loads(rep.read_text())
        m = r["models"]["patched"]
        val = [e["val_robust"] for e in r.get("epoch_log", []) if e.get("val_robust") is not None]
        out["val"] = {"clean": m["clean"]["accuracy"], "whitebox_apgd_ce20": m["threats"]["whitebox"]["robust"]["accuracy"],
                      "transfer": (m["threats"].get("transfer") or {}).get("robust", {}).get("accuracy"),
                      "best_pgd10": max(val) if val else None, "train_seconds": r.get("train_seconds")}
    test = folder / f"{name}.test.json"
    if test.exists():
        t = json.loads(test.read_text())
        m = t["models"]["patched"]
        th = m["threats"]
        out["test"] = {"n": t["summary"]["n"], "clean": m["clean"]["accuracy"],
                       "whitebox": th["whitebox"]["robust"]["accuracy"],
                       "bpda": (th.get("adaptive") or {}).get("robust", {}).get("accuracy"),
                       "worst_case": t["summary"].get("worst_case"),
                       "transfer": (th.get("transfer") or {}).get("robust", {}).get("accuracy")}
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("folder", type=Path)
    ap.add_argument("extra", nargs="*")
    ap.add_argument("--previous", type=Path, help="the committed table.json: rows no checkpoint here re-times")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    torch.manual_seed(0)
    runs = {p.stem: (p, ARCHS[p.stem.split("-")[0]]) for p in sorted(a.folder.glob("*-*.safetensors"))}
    for e in a.extra:
        name, rest = e.split("=", 1)
        ckpt, arch = rest.rsplit(":", 1)
        runs[name] = (Path(ckpt), arch)
    rows = []
    for name, (ckpt, arch) in runs.items():
        model = hardener.load(str(ckpt), arch=f"{ROOT / 'examples' / 'fmnist_model.py'}:{arch}").eval()
        cost = hardener.measure_cost(model, budget_s=20.0)
        lat = cost.latency["batches"]
        rows.append({"name": name, "arch": arch, "macs_base": cost.macs_base, "macs_patched": cost.macs_patched,
                     "macs_ratio": round(cost.macs_ratio, 3), "latency": {b: v["ratio"] for b, v in lat.items()},
                     "parameters_patches": cost.parameters_patches, **figures(a.folder, name)})
    timed = {r["name"] for r in rows}
    for r in json.loads(a.previous.read_text()) if a.previous else []:
        if r["name"] not in timed:  # a run of an earlier session: its figures and its run's timing, as recorded
            # its figures again from the reports committed beside J, where they are (a BPDA column added since)
            rows.append({**r, **figures(a.previous.parent, r["name"]), "timed_earlier": r.get("timed_earlier", True)})
    rows.sort(key=lambda r: ("-" not in r["name"], r["name"]))  # runs, then the named extras
    print("| run | arch | MACs ratio | latency ratio (batch 1, 256) | patch params | val clean | val APGD-CE-20 | "
          "val best PGD-10 | test clean | test white-box | test BPDA | test worst case |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        v, t = r.get("val", {}), r.get("test", {})
        f = lambda x: "–" if x is None else f"{100 * x:.1f}"  # noqa: E731
        print(f"| {r['name']}{' †' if r.get('timed_earlier') else ''} | {r['arch']} | {r['macs_ratio']:.2f} | "
              + ", ".join(f"{x:.2f}" for x in r["latency"].values()) + f" | {r['parameters_patches']:,} | "
              f"{f(v.get('clean'))} | {f(v.get('whitebox_apgd_ce20'))} | {f(v.get('best_pgd10'))} | "
              f"{f(t.get('clean'))} | {f(t.get('whitebox'))} | {f(t.get('bpda'))} | {f(t.get('worst_case'))} |")
    if any(r.get("timed_earlier") for r in rows):
        print("\n† timed in an earlier run of this table (its checkpoint is gone): compare its latency ratios with "
              "each other, not with the rows timed here.")
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
