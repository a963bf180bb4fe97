"""The certification table of bench/certify_fmnist.sh (issue 32): certified accuracy per radius with 95% Wilson
intervals, abstention, noisy forwards and CPU seconds per image, and the side-by-side of sequential and fixed-N
CERTIFY on the same images. Reads OUT_DIR/*.json (harden certify reports) and *.log (/usr/bin/time's CPU time, summed over the runs
of a resumed row); with several folders, a row comes from the last folder that has it (a rerun with a later rule).
`--previous TABLE.json` (the committed table) keeps the rows, side-by-side pairs and CPU times that no folder holds
any more (the run folders do not outlive a machine; the table is the bench's record), so a session adds its rows to
it and replaces those it reran:
    python bench/certify_table.py OUT_DIR [OUT_DIR ...] [--previous bench/results/certify/table.json] \
        [--json bench/results/certify/table.json] > table.md"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import hardener  # noqa: E402
from hardener.stats import wilson  # noqa: E402

RADII = ("0", "0.25", "0.5", "0.75", "1")
TIME_LINE = re.compile(r"([\d.]+) s wall, ([\d.]+) s user")  # /usr/bin/time's line, one per (resumed) run
NAMES = {"a_base": "(a) base, smoothed", "b_denoiser": "(b) base + harden denoiser", "c_noise_ft": "(c) noise fine-tuned"}


def load(folders: list[Path], name: str) -> dict | None:
    """A row's report from the last of `folders` that has one (see `load_one`)."""
    for folder in reversed(folders):
        rep = load_one(folder, name)
        if rep is not None:
            return rep
    return None


def rule(rep: dict) -> str:
    """The stopping rule a sequential run used, read from its rows (an interrupted run's summary is rebuilt by
    today's code): the out-of-reach rule (a sample stops once the radii it can still reach are decided: stop reason
    "reach") or the decided-only rule of its first version; "+ cap look" when its report says the confidence
    sequence kept a share of alpha for one fixed-n look at the cap (`cap_share`, stop 46). An interrupted run's
    summary is rebuilt by today's code, so only finished reports can say it."""
    if rep["summary"].get("method") != "sequential":
        return "fixed N"
    name = "reach rule" if any(r.get("stop") == "reach" for r in rep["rows"]) else "decided only"
    return name + (" + cap look" if rep["summary"].get("cap_share") and not rep.get("partial") else "")


def load_one(folder: Path, name: str) -> dict | None:
    """A row's report, or (`partial: true`) the rows an interrupted run saved, summarised the same way."""
    path, log = folder / f"{name}.json", folder / f"{name}.log"
    text = log.read_text(errors="replace") if log.exists() else ""
    runs = TIME_LINE.findall(text)  # one line per (resumed) run: their sum
    if path.exists():
        rep = json.loads(path.read_text())
    else:
        states = saved_states(text)
        if not states:
            return None
        import torch

        rows, config = {}, None
        for path in states:  # one per process of a sharded run (PROCS=2): each holds its own samples
            state = torch.load(path, weights_only=True)["data"]["rows"]
            rows.update({r["idx"]: r for r in state["rows"]})
            config = config or state.get("config")
        # states written before they carried their config: the bench's own settings
        config = config or {"sigma": float(name.split("_s")[-1].split(".seq")[0].split(".fixed")[0]),
                            "n0": 100, "n": 100_000, "alpha": 0.001, "batch_size": 200,
                            "sequential": ".fixed" not in name}
        rep = {**hardener.Certification.from_rows([rows[i] for i in sorted(rows)], config).to_dict(),
               "partial": True}
    rep["cpu_s"] = sum(float(user) for _, user in runs) if runs else None
    # a run killed outright (a session's end) writes no time line: its CPU seconds are missing when the rows' own
    # wall times add up to more than the runs' recorded wall time
    tsv = folder / f"{name}.tsv"
    if runs and tsv.exists():
        rows_wall = sum(float(line.split("\t")[5]) for line in tsv.read_text().splitlines()[1:] if line.strip())
        procs = rep.get("processes") or 1  # a sharded run's processes certify side by side: their rows' times add up
        rep["cpu_s_incomplete"] = rows_wall / procs > 1.05 * sum(float(wall) for wall, _ in runs)
    return rep


def saved_states(log: str) -> list[Path]:
    """The state files of an interrupted row: the last one its log names ("N samples saved to 'PATH'"), and for a
    sharded run (PATH's name holds -rank<r>of<N>) every process's file, whichever process's line the log kept."""
    named = re.findall(r"samples saved to '([^']+)'", log)
    if not named:
        return []
    last = Path(named[-1])
    shard = re.fullmatch(r"(.*)-rank\d+of(\d+)(.*)", last.name)
    paths = [last] if not shard else \
        [last.with_name(f"{shard[1]}-rank{r}of{shard[2]}{shard[3]}") for r in range(int(shard[2]))]
    return [p for p in paths if p.exists()]


def cell(acc: float, n: int) -> str:
    """A certified accuracy with its 95% Wilson interval; k = acc·n exactly (summaries round to 4 digits, n is at
    most 10,000)."""
    k = round(acc * n)
    lo, hi = wilson(k, n)
    return f"{100 * k / n:.1f} [{100 * lo:.0f}–{100 * hi:.0f}]"


def main_table(folder: list[Path], previous: dict | None = None) -> tuple[list[str], list[dict]]:
    lines = ["| model | σ | images | " + " | ".join(f"r = {r}" for r in RADII) + " | abstained | forwards / image "
             "(mean, median, max) | CPU s / image | stopping |", "|" + "---|" * (len(RADII) + 7)]
    out = []
    kept = {(r["model"], f"{r['sigma']:g}"): r for r in (previous or {}).get("table", [])}
    for key, label in NAMES.items():
        for sigma in ("0.25", "0.5"):
            rep = load(folder, f"{key}_s{sigma}")
            if rep is not None:
                s = rep["summary"]
                row = {"model": key, "sigma": float(sigma), "summary": s,
                       "cpu_s_per_image": rep["cpu_s"] / s["n"] if rep["cpu_s"] else None,
                       "cpu_s_incomplete": bool(rep.get("cpu_s_incomplete")), "partial": bool(rep.get("partial")),
                       "rule": rule(rep)}
            elif (key, sigma) in kept:  # a row of an earlier session, from the table it left
                row = kept[(key, sigma)]
            else:
                continue
            s, cpu = row["summary"], row["cpu_s_per_image"]
            cells = [cell(s["certified_accuracy"][r], s["n"]) if r in s["certified_accuracy"] else "beyond max radius"
                     for r in RADII]
            d = s["draws_per_sample"]
            cpu_text = (f"≥ {cpu:.2f} (a run's time not recorded)" if row["cpu_s_incomplete"] else f"{cpu:.2f}") \
                if cpu else "–"
            n_text = f"{s['n']} (interrupted)" if row["partial"] else str(s["n"])
            lines.append(f"| {label} | {sigma} | {n_text} | " + " | ".join(cells) + f" | {100 * s['abstention_rate']:.1f}%"
                         f" | {d['mean']:,.0f} / {d['median']:,} / {d['max']:,} | {cpu_text} | {row['rule']} |")
            out.append(row)
    return lines, out


def fixed_from_tsv(path: Path) -> dict | None:
    """A finished fixed-N run's rows from its committed TSV (locuslab/smoothing's columns), when no folder holds its
    report any more: the rows a pair needs, and the bench's fixed draws per image (n0 100 + N 100,000)."""
    if not path.exists():
        return None
    lines = [line.split("\t") for line in path.read_text().splitlines()[1:] if line.strip()]
    rows = [{"idx": int(c[0]), "label": int(c[1]), "predict": int(c[2]), "radius": float(c[3]), "correct": c[4] == "1"}
            for c in lines]
    return {"rows": rows, "summary": {"draws_per_sample": {"mean": 100_100.0}}, "from_tsv": str(path)}


def side_by_side(folder: list[Path], previous: dict | None = None,
                 tsvs: Path | None = None) -> tuple[list[str], list[dict]]:
    """Per pair and reported radius: fixed-N and sequential certified accuracy, the images they decide alike, the
    mean noisy forwards of each, the sequential run's stopping rule; a fixed-N run no folder holds is read from its
    TSV in `tsvs` (the committed results), and pairs no folder holds come from `previous`."""
    pairs: dict[tuple[str, int], list[dict]] = {}
    for seq_path in sorted({p.name: p for f in folder for p in f.glob("*.seq*.json")}.values(), key=lambda p: p.name):
        row, n = seq_path.name.split(".seq")[0], seq_path.name.split(".seq")[1].split(".")[0]
        seq, fixed = load(folder, f"{row}.seq{n}"), load(folder, f"{row}.fixed{n}")
        if fixed is None and tsvs is not None:
            fixed = fixed_from_tsv(tsvs / f"{row}.fixed{n}.tsv")
        if fixed is None or fixed.get("partial") or seq.get("partial"):  # a pair compares finished runs only
            continue
        if [r["idx"] for r in fixed["rows"]] != [r["idx"] for r in seq["rows"]]:
            raise SystemExit(f"{row}: the fixed-N and sequential runs certified different images")
        key, sigma = row.rsplit("_s", 1)
        ds, df = seq["summary"]["draws_per_sample"]["mean"], fixed["summary"]["draws_per_sample"]["mean"]
        for r in seq["summary"]["certified_accuracy"]:
            def ok(x, r=float(r)):
                return x["correct"] and x["radius"] >= r
            same = sum(ok(a) == ok(b) for a, b in zip(fixed["rows"], seq["rows"]))
            pairs.setdefault((row, int(n)), []).append(
                {"model": key, "sigma": float(sigma), "images": int(n), "radius": float(r),
                 "fixed": sum(map(ok, fixed["rows"])) / len(fixed["rows"]),
                 "sequential": seq["summary"]["certified_accuracy"][r], "same_verdict": same,
                 "forwards_fixed": df, "forwards_sequential": ds, "rule": rule(seq)})
    ran = set(pairs)
    for p in (previous or {}).get("side_by_side", []):  # pairs of earlier sessions, from the table they left
        key = (f"{p['model']}_s{p['sigma']:g}", p["images"])
        if key not in ran:
            pairs.setdefault(key, []).append(p)
    lines = ["| model | σ | images | r | fixed N | sequential | same verdict | forwards / image: fixed, sequential | "
             "fewer forwards | sequential stopping |", "|---|---|---|---|---|---|---|---|---|---|"]
    out = [p for _, ps in sorted(pairs.items()) for p in ps]
    for p in out:
        n, df, ds = p["images"], p["forwards_fixed"], p["forwards_sequential"]
        lines.append(f"| {NAMES[p['model']]} | {p['sigma']:g} | {n} | {p['radius']:g} | {cell(p['fixed'], n)} | "
                     f"{cell(p['sequential'], n)} | {p['same_verdict']}/{n} | {df:,.0f}, {ds:,.0f} | {df / ds:.1f}x | "
                     f"{p.get('rule', 'reach rule')} |")
    return lines, out


def bench_time(folder: list[Path], table: list[dict], pairs: list[dict],
               previous: dict | None = None) -> tuple[list[str], dict]:
    """The whole bench's CPU time (user seconds, one thread per run, summed over resumed runs): the certification
    rows in the tables (their CPU time as `main_table` found it), the side-by-side runs and the trainings of (b) and
    (c), with `previous`'s record for runs no folder holds (a training rerun on a new machine counts once, as its
    last run). On a quiet core, one run at a time, wall time is about this CPU time; the bench's own runs shared the
    cores, so their wall times say less. Returns the line and the record (`cpu`: per run and per training, None
    where a time is missing)."""
    kept = (previous or {}).get("cpu", {"runs": {}, "trainings": {}})
    runs, short = {}, []
    for r in table:
        name, cpu = f"{r['model']}_s{r['sigma']:g}", r["cpu_s_per_image"]
        runs[name] = cpu * r["summary"]["n"] if cpu else None
        if not cpu or r["cpu_s_incomplete"]:
            short.append(name)
    pair_runs = {f"{p['model']}_s{p['sigma']:g}.{kind}{p['images']}" for p in pairs for kind in ("seq", "fixed")}
    for name in sorted(pair_runs):
        rep = load(folder, name)
        runs[name] = kept["runs"].get(name) if rep is None else rep.get("cpu_s")
        if not runs[name] or (rep is not None and rep.get("cpu_s_incomplete")):
            short.append(name)
    trainings = dict(kept["trainings"])
    seen = set()
    for f in reversed(folder):
        for log in f.glob("*.patch.log"):
            found = TIME_LINE.findall(log.read_text(errors="replace"))
            name = log.name.removesuffix(".patch.log")
            if found and name not in seen and name not in kept.get("covered", []):  # covered: in an earlier sum
                seen.add(name)
                trainings[name] = sum(float(user) for _, user in found)
    cert, train = sum(c or 0.0 for c in runs.values()), sum(trainings.values())
    note = f" (a lower bound: {', '.join(short)} without a complete time record)" if short else ""
    line = (f"Whole bench, CPU time (user, one thread per run): certification {cert / 3600:.1f} h over {len(runs)} "
            f"runs, trainings {train / 3600:.2f} h, **{(cert + train) / 3600:.1f} h in all**{note}.")
    return [line], {"runs": runs, "trainings": trainings, **({"covered": kept["covered"]} if "covered" in kept else {})}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("folder", type=Path, nargs="+")
    ap.add_argument("--previous", type=Path, help="the committed table.json: rows no folder holds are kept from it")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--tsvs", type=Path, help="the committed TSVs (default: beside --previous): fixed-N runs no "
                                               "folder holds, paired with sequential runs of a folder")
    a = ap.parse_args()
    previous = json.loads(a.previous.read_text()) if a.previous else None
    t1, j1 = main_table(a.folder, previous)
    t2, j2 = side_by_side(a.folder, previous, a.tsvs or (a.previous.parent if a.previous else None))
    t3, cpu = bench_time(a.folder, j1, j2, previous)
    print("\n".join(["### Certified accuracy (%, 95% Wilson interval), sequential CERTIFY", "", *t1, "",
                     "### Fixed N = 100,000 beside sequential, same images", "", *t2, "", *t3]))
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps({"table": j1, "side_by_side": j2, "cpu": cpu}, indent=1))


if __name__ == "__main__":
    main()
