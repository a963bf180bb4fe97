"""How well issue 30's validation figures predicted test (bench/RESULTS.md, "Light patches", stop 49).

For every run of `results/light/` with a test verdict (`RUN.test.json`: 1,000 fashion-mnist:test images, white-box
APGD-CE -> APGD-DLR at 100 steps, BPDA where the threat ran), its validation figures side by side:
- train-split validation (`RUN.json`, the patch report's quick check): 500 held-out images of fashion-mnist:train,
  which the bases trained on; white-box APGD-CE, 20 steps;
- val2k (`RUN.val2k.json`, bench/light_val2k.sh): 2,000 fashion-mnist:test images outside the verdict's 1,000;
  white-box APGD-CE -> APGD-DLR, 20 steps each.
Then, for every pair of runs on the same base, the difference each set measured: what a choice on validation would
have predicted against what test found.

    python bench/light_calibration.py [RESULTS_DIR] [--json OUT.json]   # markdown on stdout
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _patched(path: Path) -> dict | None:
    return json.loads(path.read_text())["models"]["patched"] if path.exists() else None


def _robust(p: dict) -> float:
    """The worst case over the white-box threats that ran (white-box, BPDA), in percent."""
    return 100 * min(t["robust"]["accuracy"] for k, t in p["threats"].items() if k in ("whitebox", "adaptive"))


def figures(results: Path) -> dict[str, dict[str, float | None]]:
    """Per run with a test verdict: clean and white-box (%) on train-split validation, val2k and test."""
    out: dict[str, dict[str, float | None]] = {}
    for test in sorted(results.glob("*.test.json")):
        run = test.name[: -len(".test.json")]
        row: dict[str, float | None] = {}
        for name, path in (("val", results / f"{run}.json"), ("val2k", results / f"{run}.val2k.json"),
                           ("test", test)):
            p = _patched(path)
            row[f"{name}_clean"] = None if p is None else 100 * p["clean"]["accuracy"]
            row[f"{name}_robust"] = None if p is None else _robust(p)
        out[run] = row
    return out


def _fmt(v: float | None, sign: bool = False) -> str:
    return "—" if v is None else (f"{v:+.1f}" if sign else f"{v:.1f}")


def _diff(a: dict, b: dict, key: str) -> float | None:
    return None if a[key] is None or b[key] is None else a[key] - b[key]


def table(rows: dict[str, dict[str, float | None]]) -> str:
    keys = [f"{s}_{m}" for s in ("val", "val2k", "test") for m in ("clean", "robust")]
    lines = ["| run | val clean | val white-box | val2k clean | val2k white-box | test clean | test white-box |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r} | " + " | ".join(_fmt(x[k]) for k in keys) + " |" for r, x in rows.items()]
    lines += ["", "Pairs on the same base, A − B (points): what each set measured.", "",
              "| A − B | clean: val / val2k / test | white-box: val / val2k / test |", "|---|---|---|"]
    for a, b in itertools.combinations(rows, 2):
        if a.split("-")[0] != b.split("-")[0]:
            continue
        A, B = rows[a], rows[b]
        clean = " / ".join(_fmt(_diff(A, B, f"{s}_clean"), True) for s in ("val", "val2k", "test"))
        robust = " / ".join(_fmt(_diff(A, B, f"{s}_robust"), True) for s in ("val", "val2k", "test"))
        lines.append(f"| {a} − {b} | {clean} | {robust} |")
    return "\n".join(lines)


def val2k_table(results: Path) -> str:
    """Every run measured on val2k, against its base's heavy default (A-default) there."""
    runs = {p.name[: -len(".val2k.json")]: _patched(p) for p in sorted(results.glob("*.val2k.json"))}
    lines = ["| run | val2k clean | val2k white-box | against the heavy default: clean / white-box |", "|---|---|---|---|"]
    for run, p in runs.items():
        ref = runs.get(run.split("-")[0] + "-default")
        clean, robust = 100 * p["clean"]["accuracy"], _robust(p)
        vs = "—" if ref is None or run.endswith("-default") else \
            f"{clean - 100 * ref['clean']['accuracy']:+.2f} / {robust - _robust(ref):+.2f}"
        lines.append(f"| {run} | {clean:.2f} | {robust:.2f} | {vs} |")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description="issue 30: validation figures against test, per run and per pair")
    parser.add_argument("results", nargs="?", default=str(HERE / "results" / "light"))
    parser.add_argument("--json", help="also write the per-run figures here")
    args = parser.parse_args(argv)
    rows = figures(Path(args.results))
    print(table(rows) + "\n\nEvery run on val2k (2,000 images; white-box APGD-CE -> APGD-DLR, 20 steps each).\n")
    print(val2k_table(Path(args.results)))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
