"""Combine the verdict runs of bench/verdict_fmnist.sh per sample (same seeded 1,000 test images in each run).

    python bench/verdict_table.py DIR [--baseline M4.test.json]   ->  DIR/verdict.json and a Markdown table

Per sample, a run's `per_sample_broken_by` is None where no attack of that run broke the sample. The standard
AutoAttack is the AND of aa-white (APGD-CE, APGD-T, FAB-T) and aa-square (Square 5,000); the worst case of
everything is the AND over every run and threat model.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from hardener.stats import wilson


def robust_mask(model: dict) -> list[bool]:
    return [b is None for b in model["per_sample_broken_by"]]


def fmt(k: int, n: int) -> str:
    lo, hi = wilson(k, n)
    return f"{100 * k / n:.1f} [{100 * lo:.1f}–{100 * hi:.1f}]"


def from_state(name: str, path: str) -> tuple[str, tuple[list[bool], str, list]]:
    """The patched model's white-box chain in a harden eval state file: the robust mask after the last attack that
    finished, or after the blocks the running one finished (samples beyond them not yet attacked by it)."""
    import torch

    data = torch.load(path, map_location="cpu", weights_only=True)["data"]
    keys = sorted((k for k in data if k.startswith("patched whitebox/")), key=lambda k: int(k.split("/")[1].split(":")[0]))
    last = data[keys[-1]]
    done = [k.split(":")[1] for k in keys if data[k]["row"] is not None]
    label = "finished: " + ", ".join(done)
    if last["row"] is None:
        attack = keys[-1].split(":")[1]
        label += f"; {attack} on {last['j']} of its {len(last['idx'])} samples"
    info = [(name, "whitebox", k.split(":")[1], data[k]["row"]["attacked"] if data[k]["row"] else last["j"],
             data[k]["row"]["broken"] if data[k]["row"] else last["broken"],
             round(data[k]["row"]["seconds"] if data[k]["row"] else last["seconds"], 1)) for k in keys]
    return name, ([bool(v) for v in last["robust"].tolist()], label, info)


def from_continued(name: str, path: str) -> tuple[str, tuple[list[bool], str, list]]:
    """A bench/verdict_continue.py run: its OUT.json (finished), or its OUT.json.state (stopped: the blocks it
    finished; a sample of a block not yet reached counts as robust, so the row is an upper bound)."""
    p = Path(path)
    if p.suffix == ".json":
        r = json.loads(p.read_text())
        info = [(name, "continued", r["attack"], r["attacked"], r["broken"], round(r["seconds"], 1))]
        return name, ([bool(v) for v in r["robust"]], f"finished: {r['attack']} on {r['attacked']}", info)
    import torch

    data = torch.load(p, map_location="cpu", weights_only=True)["data"]
    (key, v), = data.items()
    attack = key.split(":")[1]
    done = v["k"] * 64 if "k" in v else None
    label = (f"stopped: {attack} on the samples of its first {v['k']} blocks of 64 (sample order up to {done}); "
             "later samples not attacked by it" if done is not None else f"finished: {attack}")
    info = [(name, "continued", attack, "–", v.get("broken", v.get("row", {}) and v["row"]["broken"]),
             round(v.get("seconds", 0), 1))]
    return name, ([bool(x) for x in v["robust"].tolist()], label, info)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("dir", type=Path)
    ap.add_argument("--baseline", type=Path, help="harden eval JSON of full adversarial fine-tuning (m4)")
    ap.add_argument("--state", action="append", default=[], metavar="NAME=FILE",
                    help="an evaluation stopped before its report: its resumable state (the per-sample robust mask "
                         "after each finished attack, and how far the running one got)")
    ap.add_argument("--continued", action="append", default=[], metavar="NAME=FILE",
                    help="a bench/verdict_continue.py run (OUT.json, or OUT.json.state when stopped) continuing "
                         "aa-white's chain: fab-t, square")
    a = ap.parse_args()
    runs = {p.stem: json.loads(p.read_text()) for p in sorted(a.dir.glob("*.json")) if p.stem != "verdict"}
    runs = {k: v for k, v in runs.items() if "per_sample_broken_by" in v.get("models", {}).get("patched", {})}
    partial = dict(from_state(*item.split("=", 1)) for item in a.state)
    partial.update(dict(from_continued(*item.split("=", 1)) for item in a.continued))
    first = next(iter(runs.values()))
    n = first["models"]["patched"]["clean"]["n"]
    clean = first["models"]["patched"]["clean"]["correct"]
    rows, cost = [], []
    every = [True] * n
    masks: dict[str, list[bool]] = {}
    for name, rep in runs.items():
        m = rep["models"]["patched"]
        assert len(m["per_sample_broken_by"]) == n, f"{name}: not the same samples"
        cm = [b != "clean_error" for b in m["per_sample_broken_by"]]
        assert sum(cm) == clean, f"{name}: clean accuracy differs: not the same model or samples"
        masks[name] = robust_mask(m)
        every = [x and y for x, y in zip(every, masks[name])]
        for t, th in m["threats"].items():
            for r in th["attacks"]:
                cost.append((name, t, r["attack"], r["attacked"], r["broken"], round(r["seconds"], 1)))
            rows.append((f"{name}: {t} ({', '.join(r['attack'] for r in th['attacks'])})",
                         th["robust"]["correct"]))
    for name, (mask, label, info) in partial.items():
        assert len(mask) == n, f"{name}: not the same samples"
        masks[name] = mask
        every = [x and y for x, y in zip(every, mask)]
        rows.append((f"{name} (from its state: {label})", sum(mask)))
        cost += info
    out = {"n": n, "clean": clean, "runs": list(runs) + list(partial), "rows": {}, "cost": cost}
    gradient = [m for name, m in masks.items() if name in ("aa-white", "aa-fab")]
    if len(gradient) == 2 or "aa-white" in runs and "fab-t" in str(runs["aa-white"]["attack_settings"]):
        both = [all(v) for v in zip(*gradient)]
        unfinished = [n for n in ("aa-white", "aa-fab") if n in partial and " on " in partial[n][1]]
        note = f"; {', '.join(unfinished)} not finished: see its row" if unfinished else ""
        rows.append((f"AutoAttack's gradient attacks (APGD-CE, APGD-T, FAB-T; per-sample AND{note})", sum(both)))
        if "aa-square" in masks:
            aa = sum(x and y for x, y in zip(both, masks["aa-square"]))
            rows.append(("standard AutoAttack (APGD-CE, APGD-T, FAB-T, Square 5,000; per-sample AND)", aa))
    if {"aa-white", "fab-t", "square"} <= set(masks):
        aa = [all(v) for v in zip(masks["aa-white"], masks["fab-t"], masks["square"])]
        unfinished = [k for k in ("fab-t", "square") if partial[k][1].startswith("stopped")]
        note = f"; {', '.join(unfinished)} stopped early: an upper bound" if unfinished else ""
        rows.append((f"standard AutoAttack: APGD-CE → APGD-T → FAB-T → Square 5,000, each on what the ones before "
                     f"left (per-sample AND{note})", sum(aa)))
    rows.append((f"worst case of everything above (per-sample AND over {len(masks)} runs)", sum(every)))
    print(f"| patched, {n} test images, eps 0.1 | accuracy [95% CI] |\n|---|---|")
    print(f"| clean | {fmt(clean, n)} |")
    for label, k in rows:
        print(f"| {label} | {fmt(k, n)} |")
        out["rows"][label] = {"correct": k, "accuracy": k / n, "ci95": wilson(k, n)}
    if a.baseline and a.baseline.exists():
        b = json.loads(a.baseline.read_text())["models"]["patched"]
        out["baseline"] = {"clean": b["clean"], "worst_case": b["worst_case"],
                           "threats": {t: th["robust"] for t, th in b["threats"].items()}}
        print(f"| full adversarial fine-tuning: clean | {fmt(b['clean']['correct'], b['clean']['n'])} |")
        print(f"| full adversarial fine-tuning: worst case of its run | "
              f"{fmt(b['worst_case']['correct'], b['worst_case']['n'])} |")
    print("\n| run | threat | attack | attacked | broken | seconds |\n|---|---|---|---|---|---|")
    for c in cost:
        print("| " + " | ".join(str(v) for v in c) + " |")
    (a.dir / "verdict.json").write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
