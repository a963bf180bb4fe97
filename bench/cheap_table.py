"""The issue-18 search table from bench/cheap_fmnist.sh's outputs (validation data only).

    python bench/cheap_table.py OUT_DIR [NAME ...]      # default: every NAME.json in OUT_DIR

Per run: the patch report's quick check on 500 held-out training images (clean, white-box APGD-CE 20 steps,
transfer), the best per-epoch validation PGD-10 on the --select-on images (and its epoch), trainable parameters,
multiply-adds the patches add per image (and the base's), training wall seconds (harden's) and CPU seconds
(/usr/bin/time -v: user + system of the whole run, a fairer measure on a shared machine), and whether the
catastrophic-overfitting guard fired.
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path


def pct(a: dict | None) -> str:
    if not a:
        return "–"
    lo, hi = a["ci95"]
    return f"{100 * a['accuracy']:.1f} [{100 * lo:.1f}–{100 * hi:.1f}]"


def cpu_seconds(log: Path) -> str:
    if not log.exists():
        return "–"
    text = log.read_text(errors="replace")
    u = re.search(r"User time \(seconds\): ([\d.]+)", text)
    s = re.search(r"System time \(seconds\): ([\d.]+)", text)
    return f"{float(u.group(1)) + float(s.group(1)):.0f}" if u and s else "–"


def row(out: Path, name: str) -> str:
    r = json.loads((out / f"{name}.json").read_text())
    m = r["models"]["patched"]
    th = m["threats"]
    wb = th.get("whitebox", {}).get("robust")
    tr = th.get("transfer", {}).get("robust")
    logs = r.get("epoch_log", [])
    val = [(e["val_robust"], e["epoch"]) for e in logs if e.get("val_robust") is not None]
    best = max(val) if val else None
    cost = r.get("patch_cost") or {}
    macs = (f"{cost['macs'] / 1e6:.1f}M ({100 * cost['macs'] / cost['base_macs']:.0f}%)"
            if cost.get("base_macs") else "–")
    fb = next((f"epoch {e['epoch']} → {e['fallback']}" for e in logs if e.get("fallback")), "–")
    return (f"| {name} | {pct(m['clean'])} | {pct(wb)} | {pct(tr)} | "
            f"{f'{100 * best[0]:.1f} (epoch {best[1]})' if best else '–'} | {r.get('trainable_parameters', 0):,} | "
            f"{macs} | {r.get('train_seconds', 0):.0f} | {cpu_seconds(out / f'{name}.log')} | {fb} |")


def main() -> None:
    out = Path(sys.argv[1])
    names = sys.argv[2:] or sorted(p.stem for p in out.glob("*.json") if "." not in p.stem)
    print("| run | clean | white-box APGD-CE-20 | transfer | best val. PGD-10 | trainable params | MACs added "
          "(% of base) | train s (wall) | CPU s | CO guard |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for n in names:
        print(row(out, n))


if __name__ == "__main__":
    main()
