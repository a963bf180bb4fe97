"""Issue 18's table: every recipe that was evaluated on test, side by side, from the reports the benches wrote.

    python bench/recipe_table.py [--json FILE]

Rows are (run, what it is, patch or training report, test report) of bench/results/; a run whose test report is
missing is listed with its validation figures only (recipes were chosen on validation; test reports were made after).
Test: the same 1,000 seeded stratified images of fashion-mnist:test, eps 0.1 Linf, white-box APGD-CE -> APGD-DLR
(100 steps each, per-sample worst case), BPDA through the pre-filter on what they left (patches with a pre-filter),
transfer from the base. Costs from the patch report: trainable parameters, multiply-adds the patches add per image,
training wall seconds (harden's; on the shared 2-core machine, so an upper bound) and, where the bench recorded them,
CPU seconds of the whole run (/usr/bin/time -v: user + system).
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

RES = Path(__file__).resolve().parent / "results"

# run, labels, description, patch (or training) report, test report, time log (/usr/bin/time -v), epochs
ROWS = [
    ("r4 (the default recipe until 2026-12-01)", "10%", "pre-filter 64 + fixers, PGD-5, 10 epochs, μ = 1",
     "robust/r4_pre64_fix3_mu1.val.json", "robust/r4.test.json", None, 10),  # its report predates patch_cost:
    # the multiply-adds are q3's (the same patches), from cheap/step_cost.json
    ("q3", "10%", "r4 with `--epochs 5`", "cheap/q3_pgd5_ep5.json", "cheap/q3_pgd5_ep5.test.json",
     "cheap/q3_pgd5_ep5.log", 5),
    ("q2", "10%", "r4 with `--steps 2 --epochs 3`", "cheap/q2_pgd2_ep3.json", "cheap/q2_pgd2_ep3.test.json",
     "cheap/q2_pgd2_ep3.log", 3),
    ("u1", "1% + pseudo", "r4 with `--subset 1% --unlabeled rest --pseudo-ratio 9`", "cheap/u1_1pct_rest9.json",
     "cheap/u1_1pct_rest9.test.json", "cheap/u1_1pct_rest9.log", 10),
    ("r4 μ 2 (the default recipe on 2026-12-01 until μ 2.5)", "10%", "r4 with `--mu 2` (`--batch-size auto` is 128 here)",
     "cheap/r4_mu2.json", "cheap/r4_mu2.test.json", "cheap/r4_mu2.log", 10),
    ("r4 μ 2.5 (the default recipe since 2026-12-01)", "10%", "r4 with `--mu 2.5` (`--batch-size auto` is 128 here)",
     "cheap/r4_mu25.json", "cheap/r4_mu25.test.json", "cheap/r4_mu25.log", 10),
    # u2 was stopped at epoch 5 and resumed: its log's CPU seconds are the resumed half's only (not shown)
    ("u2", "10% + pseudo", "r4 with `--unlabeled rest --pseudo-ratio 1`", "cheap/u2_10pct_rest1.json",
     "cheap/u2_10pct_rest1.test.json", None, 10),
    ("m4 (full adversarial fine-tuning)", "10%", "every weight, PGD-5, 10 epochs, lr 1e-3",
     "methods/m4_advtrain.patch.json", "robust/m4_advtrain.test.json", None, 10),
    ("m4u (full adversarial fine-tuning)", "1% + pseudo", "m4 with `--subset 1% --unlabeled rest --pseudo-ratio 9`",
     "cheap/m4u_advtrain_1pct_rest9.json", "cheap/m4u_advtrain_1pct_rest9.test.json",
     "cheap/m4u_advtrain_1pct_rest9.log", 10),
]


SAME_PATCHES_AS_Q3 = {"macs": 35825664, "base_macs": 15154368}


def _load(rel: str | None) -> dict | None:
    if rel is None or not (RES / rel).is_file():
        return None
    return json.loads((RES / rel).read_text())


def _pct(a: dict | None, ci: bool = True) -> str:
    if not a:
        return "–"
    lo, hi = a["ci95"]
    return f"{100 * a['accuracy']:.1f} [{100 * lo:.1f}–{100 * hi:.1f}]" if ci else f"{100 * a['accuracy']:.1f}"


def _n(v) -> str:
    return f"{v:,.0f}" if v else "–"


def _cpu(rel: str | None) -> float | None:
    if rel is None or not (RES / rel).is_file():
        return None
    text = (RES / rel).read_text(errors="replace")
    u = re.search(r"User time \(seconds\): ([\d.]+)", text)
    s = re.search(r"System time \(seconds\): ([\d.]+)", text)
    return float(u.group(1)) + float(s.group(1)) if u and s else None


def row(run: str, labels: str, what: str, patch_rel: str, test_rel: str, log_rel: str | None, epochs: int) -> dict:
    patch, test = _load(patch_rel), _load(test_rel)
    out = {"run": run, "labels": labels, "what": what, "epochs": epochs, "patch_report": patch_rel,
           "test_report": test_rel if test else None}
    if patch:
        cost = patch.get("patch_cost") or (SAME_PATCHES_AS_Q3 if run.startswith("r4") else {})
        out.update(parameters=patch.get("trainable_parameters"), macs=cost.get("macs"), base_macs=cost.get("base_macs"),
                   train_seconds=patch.get("train_seconds"), cpu_seconds=_cpu(log_rel),
                   validation=((patch.get("training") or {}).get("validation") or {}).get("selected_epoch"))
    if test:
        m = test["models"]["patched"]
        th = m["threats"]
        out.update(n=m["clean"]["n"], clean=m["clean"], base_clean=test["models"]["base"]["clean"],
                   whitebox=m.get("worst_whitebox") or th.get("whitebox", {}).get("robust"),
                   adaptive=th.get("adaptive", {}).get("robust"), transfer=th.get("transfer", {}).get("robust"),
                   worst=m["worst_case"])
        if out["transfer"] is None:  # a transfer-only evaluation of the same 1,000 images, run afterwards
            extra = _load(test_rel.replace(".test.json", ".transfer.json"))
            if extra:
                out["transfer"] = extra["models"]["patched"]["threats"]["transfer"]["robust"]
    return out


def table(rows: list[dict]) -> str:
    head = ("| run | labels | recipe | clean [95% CI] | white-box worst case [95% CI] | + BPDA | transfer | "
            "trainable params | multiply-adds added | train s (wall) | CPU s |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        macs = (f"{r['macs'] / 1e6:.1f}M ({100 * r['macs'] / r['base_macs']:.0f}%)" if r.get("macs") else
                "– (trains the base)" if "parameters" in r else "–")
        bpda = _pct(r.get("adaptive"), ci=False) if r.get("adaptive") else "–"
        cpu = f"{r['cpu_seconds']:,.0f}" if r.get("cpu_seconds") else "–"
        lines.append(
            f"| {r['run']} | {r['labels']} | {r['what']} | {_pct(r.get('clean'))} | {_pct(r.get('whitebox'))} | "
            f"{bpda} | {_pct(r.get('transfer'), ci=False)} | {_n(r.get('parameters'))} | {macs} | "
            f"{_n(r.get('train_seconds'))} | {cpu} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", type=Path, help="also write the rows here")
    a = ap.parse_args()
    rows = [row(*r) for r in ROWS]
    print(table(rows))
    if a.json:
        a.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
