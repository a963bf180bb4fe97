"""Markdown table rows from harden reports (bench/RESULTS.md is assembled from these).

    python bench/table.py [--val] [--attack NAME] OUT_DIR NAME [NAME ...]

For each NAME it reads OUT_DIR/NAME.test.json (a `harden eval` report on test data) and, when present,
OUT_DIR/NAME.patch.json or OUT_DIR/NAME.json (the `harden patch` report: trainable parameters, training
time) and OUT_DIR/NAME.patch.log (/usr/bin/time -v: wall time, peak RSS of the patch run). With --val it
reads the patch report's own evaluation (validation data) instead of a test report.
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


def wall(log: Path) -> tuple[str, str]:
    if not log.exists():
        return "–", "–"
    text = log.read_text(errors="replace")
    m = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", text)
    r = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
    secs = "–"
    if m:
        parts = [float(p) for p in m.group(1).split(":")]
        secs = f"{sum(p * 60 ** i for i, p in enumerate(reversed(parts))):.0f}"
    return secs, (f"{int(r.group(1)) / 1024:.0f}" if r else "–")


def after(th: dict | None, attack: str | None) -> dict | None:
    """The threat's robust accuracy: after its whole chain, or right after `attack` when given."""
    if not th:
        return None
    if attack is None:
        return th["robust"]
    return next((a["robust_after"] for a in th["attacks"] if a["attack"] == attack), None)


def row(out: Path, name: str, val: bool, attack: str | None = None) -> str:
    patch = next((out / f for f in (f"{name}.patch.json", f"{name}.json") if (out / f).exists()), None)
    p = json.loads(patch.read_text()) if patch else {}
    rep = p if val else json.loads((out / f"{name}.test.json").read_text())
    m = rep["models"]["patched"]
    th = m["threats"]
    params = p.get("trainable_parameters", "–")
    train_s = f"{p['train_seconds']:.0f}" if "train_seconds" in p else "–"
    secs, rss = wall(out / (f"{name}.patch.log" if (out / f"{name}.patch.log").exists() else f"{name}.log"))
    sel = p.get("training", {}).get("validation", {}).get("selected_epoch")
    cells = [name, f"{m['clean']['n']}", pct(rep["models"]["base"]["clean"]), pct(m["clean"]),
             pct(after(th.get("whitebox"), attack)), pct(after(th.get("transfer"), attack)),
             pct(after(th.get("blackbox"), None)), pct(m["worst_case"]) if attack is None else "–",
             f"{params:,}" if isinstance(params, int) else str(params), train_s, secs, rss, str(sel or "–")]
    return "| " + " | ".join(cells) + " |"


def main() -> None:
    args = sys.argv[1:]
    val = "--val" in args
    attack = None
    if "--attack" in args:  # robust accuracy right after this attack of each chain (same budget for all rows)
        attack = args[args.index("--attack") + 1]
        del args[args.index("--attack"):args.index("--attack") + 2]
    args = [a for a in args if a != "--val"]
    out, names = Path(args[0]), args[1:]
    print("| run | n | base clean | clean | white-box | transfer | black-box | worst case | trainable params "
          "| train s | patch run s | peak RSS MB | kept epoch |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for n in names:
        print(row(out, n, val, attack))


if __name__ == "__main__":
    main()
