"""Reports: JSON (versioned schema), Markdown, self-contained HTML, rich tables; --fail-under gates."""
from __future__ import annotations

import html
import json
import platform
from pathlib import Path
from typing import Any

from . import __version__
from .errors import InputError

SCHEMAS = {"eval": "harden.eval-report/2", "patch": "harden.patch-report/2"}  # one id per kind of report
SCHEMA = SCHEMAS["eval"]
SCHEMA_FILE = Path(__file__).parent / "schemas" / "report-2.schema.json"  # JSON Schema of both (shipped)
THREAT_TEXT = {
    "whitebox": "white-box: attacks computed on this model end to end (patches included)",
    "adaptive": "white-box BPDA: the same attacks with each patch that may mask gradients (pre-filter, denoising "
                "block) replaced by the identity in the backward pass, run on what the white-box attacks left",
    "surrogate": "transfer from a surrogate model (--surrogate), scored on this model, run on what the white-box "
                 "attacks left",
    "transfer": "transfer: attacks computed on the base, scored on this model (attacker unaware of the patch)",
    "blackbox": "black-box: Square query attack on this model",
}
SCHEMA_REQUIRED = {
    "schema": str, "harden_version": str, "command": str, "data": dict, "threat_models": dict,
    "attack_settings": list, "models": dict, "checks": list, "environment": dict,
}


def environment(device: str, seed: int, deterministic: bool = False) -> dict:
    import torch
    import torchattacks

    return {"torch": torch.__version__, "torchattacks": torchattacks.__version__, "python": platform.python_version(),
            "device": device, "machine": platform.machine(), "seed": seed, "threads": torch.get_num_threads(),
            "deterministic": deterministic or torch.are_deterministic_algorithms_enabled()}


def strip_private(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: strip_private(v) for k, v in obj.items() if not str(k).startswith("_")}
    if isinstance(obj, list):
        return [strip_private(v) for v in obj]
    return obj


def build(command: str, result: dict, data: dict, attack_settings: list, env: dict,
          extra: dict | None = None) -> dict:
    rep = {
        "schema": SCHEMAS.get(command, SCHEMA),
        "harden_version": __version__,
        "command": command,
        "data": data,
        "threat_models": {t: THREAT_TEXT[t] for t in THREAT_TEXT
                          if t in ("whitebox", "transfer", "blackbox")
                          or any(t in m.get("threats", {}) for m in result["models"].values())},
        "attack_settings": attack_settings,
        "models": strip_private(result["models"]),
        "checks": result.get("checks", []),
        "eps_sweep": result.get("eps_sweep"),
        "out_of_memory": result.get("out_of_memory") or [],
        "environment": env,
    }
    if extra:
        rep.update(extra)
    import datetime

    rep["created"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    rep["summary"] = summary(rep)
    rep["robustbench"] = robustbench_entry(rep, result["models"])
    return rep


STANDARD_AA = ("apgd-ce", "apgd-t", "fab-t", "square")


def robustbench_entry(rep: dict, raw_models: dict) -> dict:
    """A RobustBench-style entry for the evaluated model: `autoattack_acc` only when the run was the standard
    AutoAttack (APGD-CE, APGD-T, FAB-T on the model itself, Square as its query attack: their per-sample AND), else
    None; `external` is harden's worst case over every threat model that ran (adaptive attacks included)."""
    models = rep["models"]
    name = "patched" if "patched" in models else "base"
    m = models[name]
    ran = {(t, r["attack"]) for t, th in m.get("threats", {}).items() for r in th["attacks"]}
    standard = {("whitebox", "apgd-ce"), ("whitebox", "apgd-t"), ("whitebox", "fab-t"), ("blackbox", "square")}
    aa = None
    masks = raw_models.get(name, {}).get("_masks")
    if standard <= ran and masks is not None:
        aa = float((masks["whitebox"] & masks["blackbox"]).float().mean())
    training = rep.get("training") or {}
    return {"clean_acc": round(100 * m["clean"]["accuracy"], 2),
            "autoattack_acc": None if aa is None else round(100 * aa, 2),
            "external": round(100 * m["worst_case"]["accuracy"], 2),
            "eps": rep.get("eps"), "threat_model": rep.get("norm"), "number_forward_passes": 1,
            "architecture": (rep.get("architecture") or training.get("arch") or ""),
            "n": m["clean"]["n"], "model": name}


def data_record(ds, warnings: list[str]) -> dict:
    """The report's `data` block for a harden `Dataset`."""
    return {"source": ds.source, "n": len(ds), "classes": ds.classes, "preprocessing": ds.notes,
            "fingerprint": ds.fingerprint(), "warnings": warnings}


def attack_settings(result: dict) -> list[dict]:
    """Every distinct attack setting of an evaluation result, in the order the chains ran them."""
    seen, out = set(), []
    for m in result["models"].values():
        for th in m["threats"].values():
            for r in th["attacks"]:
                key = json.dumps(r["settings"], sort_keys=True)
                if key not in seen:
                    seen.add(key)
                    out.append(r["settings"])
    return out


def summary(rep: dict) -> dict:
    """A flat block of the headline numbers (for MLflow / W&B / a CI log): fractions rounded to 4 places, None where
    a threat model did not run. `robust` is the white-box per-sample worst case of the evaluated model."""
    models = rep["models"]
    name = "patched" if "patched" in models else "base"

    def r4(v):
        return None if v is None else round(float(v), 4)

    def threat(m: dict, t: str):
        return r4(m["threats"][t]["robust"]["accuracy"]) if t in m.get("threats", {}) else None

    def robust(mm: dict):
        w = mm.get("worst_whitebox")
        return r4(w["accuracy"]) if w else threat(mm, "whitebox")

    m, base = models[name], models.get("base", {})
    out = {"model": name, "n": rep["data"].get("n"), "eps": rep.get("eps"), "norm": rep.get("norm"),
           "clean": r4(m["clean"]["accuracy"]), "robust": robust(m), "adaptive": threat(m, "adaptive"),
           "surrogate": threat(m, "surrogate"), "transfer": threat(m, "transfer"),
           "blackbox": threat(m, "blackbox"), "worst_case": r4(m["worst_case"]["accuracy"]),
           "attacks": sorted({s.get("name", "") for s in rep.get("attack_settings", [])})}
    if name == "patched" and base:
        out.update(base_clean=r4(base["clean"]["accuracy"]), base_robust=robust(base),
                   delta_clean=r4(m["clean"]["accuracy"] - base["clean"]["accuracy"]))
    gates = rep.get("gates")
    if gates and gates.get("thresholds"):
        out["gates_passed"] = not gates.get("missed")
    return out


def per_class_rows(rep: dict) -> list[tuple[str, int, str, str]]:
    """Per-class clean and worst-case accuracy of the evaluated model, by class name where the data has names."""
    models = rep["models"]
    m = models.get("patched", models.get("base", {}))
    names = rep["data"].get("classes") or []

    def label(c: int) -> str:
        return f"{c} {names[c]}" if c < len(names) else str(c)
    return [(label(r["class"]), r["n"], f"{100 * r['clean']:.1f}%", f"{100 * r['worst_case']:.1f}%")
            for r in m.get("per_class", [])]


def headline(rep: dict) -> list[str]:
    """The first lines of a Markdown/HTML report: what was evaluated, and the verdict per threat model."""
    s = rep.get("summary") or summary(rep)

    def p(v):
        return "not run" if v is None else f"{100 * v:.1f}%"

    lines = []
    ck = rep.get("checkpoint")
    if ck:
        sha = rep.get("checkpoint_sha256", "")
        lines.append(f"Model `{Path(ck).name}`" + (f" (sha256 `{sha[:16]}…`)" if sha else "")
                     + f", data `{rep['data'].get('source')}` ({s['n']} samples, fingerprint "
                     f"`{str(rep['data'].get('fingerprint', ''))[:12]}`), {rep.get('created', '')}.")
    adaptive = "".join(f", {label} {p(s[k])}" for k, label in (("adaptive", "after BPDA"), ("surrogate", "after "
                       "surrogate transfer")) if s.get(k) is not None)
    verdict = (f"**{s['model']}**: clean {p(s['clean'])}, white-box {p(s['robust'])}{adaptive}, transfer "
               f"{p(s['transfer'])}, black-box {p(s['blackbox'])}; worst case over the threat models that ran "
               f"{p(s['worst_case'])} (eps {s['eps']} {s['norm'] or ''}).")
    lines.append(verdict)
    if "delta_clean" in s:
        lines.append(f"Base: clean {p(s['base_clean'])}, white-box {p(s['base_robust'])}; clean accuracy "
                     f"{100 * s['delta_clean']:+.1f} points against the base.")
    if "gates_passed" in s:
        missed = rep["gates"].get("missed") or []
        lines.append("Gates: **passed**" if s["gates_passed"] else "Gates: **missed**: " + "; ".join(missed))
    return lines


def validate(rep: dict) -> list[str]:
    """Errors against the report schema (empty when valid)."""
    errs = [f"missing or mistyped '{k}'" for k, t in SCHEMA_REQUIRED.items() if not isinstance(rep.get(k), t)]
    if rep.get("schema") not in SCHEMAS.values():
        errs.append(f"schema is {rep.get('schema')!r}, expected one of {', '.join(SCHEMAS.values())}")
    for name, m in (rep.get("models") or {}).items():
        for key in ("clean", "worst_case", "threats", "correct_by_base", "per_class"):
            if key not in m:
                errs.append(f"models.{name} lacks '{key}'")
        for acc in [m.get("clean"), m.get("worst_case")]:
            if isinstance(acc, dict) and not {"accuracy", "n", "ci95"} <= set(acc):
                errs.append(f"models.{name}: accuracy entries need accuracy, n, ci95")
    for c in rep.get("checks") or []:
        if c.get("status") not in ("pass", "warn", "skip"):
            errs.append(f"check {c.get('name')} has status {c.get('status')!r}")
    return errs


# ---------------------------------------------------------------- gates


def parse_fail_under(text: str | None) -> dict[str, float]:
    if not text:
        return {}
    out = {}
    for part in [p.strip() for p in str(text).split(",") if p.strip()]:
        key, _, val = part.partition("=")
        key = key.strip()
        if key not in ("clean", "robust", "transfer", "blackbox"):
            raise InputError(f"--fail-under: unknown key '{key}' (use clean, robust, transfer, blackbox)")
        val = val.strip()
        try:
            v = float(val[:-1]) / 100 if val.endswith("%") else float(val)
        except ValueError:
            v = -1.0
        if not 0 <= v <= 1:
            raise InputError(f"--fail-under {key}= needs a fraction in [0, 1] or a percentage (85%), got '{val}'")
        out[key] = v
    return out


# Attacks a robustness gate can trust are iterative ones (attack kinds gradient and min-norm): FGSM passes gates that
# APGD fails (34% vs 0.0% on one model), and a query attack alone is a black-box figure.


def check_gate_attacks(thresholds: dict[str, float], attacks: list[str], threats: tuple[str, ...],
                       allow_weak: bool) -> None:
    """A `robust`/`transfer` gate needs an iterative gradient attack in that threat model: otherwise the gate would
    pass on an attack too weak to mean anything (input error, exit 2). A gate on a threat model that did not run at
    all is reported as missed ("not measured", exit 1) by `gate`."""
    if allow_weak:
        return
    from .attacks import info

    strong = [a for a in attacks if info(a).iterative]
    for key, threat in (("robust", "whitebox"), ("transfer", "transfer")):
        if key in thresholds and (not strong or threat not in threats):
            raise InputError(f"--fail-under {key}= needs an iterative {threat} attack (e.g. --attack apgd-ce with "
                             f"--threat {threat} or all); with only {', '.join(attacks) or 'none'} the gate would pass "
                             "on a weak attack (FGSM leaves 34% where APGD leaves 0%); add one, or pass "
                             "--allow-weak-gate")


def gate(rep: dict, thresholds: dict[str, float]) -> list[str]:
    """Missed thresholds, as sentences (empty = all met)."""
    if not thresholds:
        return []
    name = "patched" if "patched" in rep["models"] else "base"
    m = rep["models"][name]
    values = {"clean": m["clean"]["accuracy"]}
    if "worst_whitebox" in m:
        values["robust"] = m["worst_whitebox"]["accuracy"]
    for t in ("transfer", "blackbox"):
        if t in m["threats"]:
            values[t] = m["threats"][t]["robust"]["accuracy"]
    missed = []
    for key, th in thresholds.items():
        if key not in values:
            missed.append(f"{key}: not measured (no {key} attack ran)")
        elif values[key] < th:
            missed.append(f"{key} accuracy {values[key]:.4f} < {th:.4f}")
    return missed


# ---------------------------------------------------------------- rendering


def pct(a: dict | None) -> str:
    if not a:
        return "—"
    lo, hi = a["ci95"]
    return f"{100 * a['accuracy']:.1f}% [{100 * lo:.1f}–{100 * hi:.1f}]"


def rows(rep: dict) -> list[tuple[str, str, str, str]]:
    """(model, measure, threat, accuracy) rows shared by the table, Markdown and HTML."""
    out = []
    for name, m in rep["models"].items():
        out.append((name, "clean", "—", pct(m["clean"])))
        for t, th in m["threats"].items():
            for r in th["attacks"]:
                out.append((name, f"after {r['attack']}", t, pct(r["robust_after"])))
            out.append((name, f"worst case ({t})", t, pct(th["robust"])))
        out.append((name, "worst case (all threats)", "all", pct(m["worst_case"])))
        cb = m.get("correct_by_base", {})
        for key, label, threat in (("clean", "clean", "—"), ("whitebox", "worst case (whitebox)", "whitebox"),
                                   ("adaptive", "worst case (adaptive)", "adaptive"),
                                   ("surrogate", "worst case (surrogate)", "surrogate"),
                                   ("transfer", "worst case (transfer)", "transfer"),
                                   ("blackbox", "worst case (blackbox)", "blackbox"),
                                   ("worst", "worst case (all threats)", "all")):
            if key in cb:
                out.append((name, f"{label}, base-correct subset", threat, pct(cb[key])))
    return out


def attack_rows(rep: dict) -> list[tuple[str, str, dict]]:
    return [(name, t, r) for name, m in rep["models"].items() for t, th in m["threats"].items()
            for r in th["attacks"]]


def render_table(rep: dict, console) -> None:
    from rich.table import Table

    table = Table(title=f"harden {rep['command']}: {rep['data'].get('n')} samples of {rep['data'].get('source')}")
    for col in ("model", "measure", "threat model", "accuracy [95% CI]"):
        table.add_column(col)
    for r in rows(rep):
        table.add_row(*r)
    console.print(table)
    for c in rep.get("checks", []):
        style = {"pass": "green", "warn": "yellow", "skip": "dim"}[c["status"]]
        console.print(f"[{style}]{c['status']:>4}[/] {c['name']}: {c['detail']}" +
                      (f" — {c['hint']}" if c["hint"] else ""), highlight=False)


def to_markdown(rep: dict) -> str:
    lines = [f"## harden {rep['command']} report", "", *[f"{h}  " for h in headline(rep)], "",
             f"Data: `{rep['data'].get('source')}`, {rep['data'].get('n')} samples. "
             f"harden {rep['harden_version']}, torch {rep['environment']['torch']}, "
             f"torchattacks {rep['environment']['torchattacks']}, seed {rep['environment']['seed']}.", ""]
    for w in rep["data"].get("warnings", []):
        lines.append(f"> **Warning:** {w}")
    lines += ["", "| model | measure | threat model | accuracy [95% CI] |", "|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows(rep)]
    lines += ["", "Threat models:", ""] + [f"- **{k}** — {v}" for k, v in rep["threat_models"].items()]
    lines += ["", "| model | threat model | attack | attacked | broken | seconds | images/s |",
              "|---|---|---|---|---|---|---|"]
    lines += [f"| {m} | {t} | {r['attack']} | {r['attacked']} | {r['broken']} | {r['seconds']:.1f} | "
              f"{r['images_per_s'] or 0:.1f} |" for m, t, r in attack_rows(rep)]
    lines += ["", "Attack settings:", ""]
    lines += [f"- `{json.dumps(s, sort_keys=True)}`" for s in rep["attack_settings"]]
    if rep.get("checks"):
        lines += ["", "| check | status | detail |", "|---|---|---|"]
        lines += [f"| {c['name']} | {c['status']} | {c['detail']}{' — ' + c['hint'] if c['hint'] else ''} |"
                  for c in rep["checks"]]
    pc = per_class_rows(rep)
    if pc:
        lines += ["", "| class | n | clean | worst case |", "|---|---|---|---|"]
        lines += [f"| {c} | {n} | {a} | {b} |" for c, n, a, b in pc]
    if rep.get("eps_sweep"):
        lines += ["", "| eps | attack | accuracy |", "|---|---|---|"]
        lines += [f"| {s['eps']:g} | {s['attack']} | {100 * s['accuracy']:.1f}% |" for s in rep["eps_sweep"]]
    return "\n".join(lines) + "\n"


def _svg_curve(sweep: list[dict]) -> str:
    w, h, pad = 420, 260, 40
    pts = sorted(sweep, key=lambda s: s["eps"])
    emax = max(s["eps"] for s in pts) or 1.0

    def xy(e, a):
        return pad + (w - 2 * pad) * e / emax, h - pad - (h - 2 * pad) * a

    path = " ".join(f"{'M' if i == 0 else 'L'}{xy(s['eps'], s['accuracy'])[0]:.1f},{xy(s['eps'], s['accuracy'])[1]:.1f}"
                    for i, s in enumerate(pts))
    dots = "".join(f'<circle cx="{xy(s["eps"], s["accuracy"])[0]:.1f}" cy="{xy(s["eps"], s["accuracy"])[1]:.1f}" '
                   f'r="3"><title>eps {s["eps"]:g}: {100 * s["accuracy"]:.1f}%</title></circle>' for s in pts)
    ticks = "".join(f'<text x="{xy(s["eps"], 0)[0]:.1f}" y="{h - pad + 15}" font-size="10" '
                    f'text-anchor="middle">{s["eps"]:g}</text>' for s in pts)
    yt = "".join(f'<text x="{pad - 5}" y="{xy(0, a)[1] + 3:.1f}" font-size="10" '
                 f'text-anchor="end">{int(a * 100)}%</text>' for a in (0, 0.5, 1))
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" role="img">'
            f'<line x1="{pad}" y1="{h - pad}" x2="{w - pad}" y2="{h - pad}" stroke="#333"/>'
            f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{h - pad}" stroke="#333"/>'
            f'<path d="{path}" fill="none" stroke="#1f77b4" stroke-width="2"/>{dots}{ticks}{yt}'
            f'<text x="{w / 2}" y="{h - 5}" font-size="11" text-anchor="middle">eps</text>'
            f'<text x="12" y="{h / 2}" font-size="11" transform="rotate(-90 12 {h / 2})" '
            f'text-anchor="middle">robust accuracy ({html.escape(pts[0]["attack"])}, white-box)</text></svg>')


def to_html(rep: dict) -> str:
    esc = html.escape
    import re as _re

    def md(t: str) -> str:  # the headline's **bold** and `code`, escaped
        t = esc(t)
        return _re.sub(r"`([^`]*)`", r"<code>\1</code>", _re.sub(r"\*\*([^*]*)\*\*", r"<b>\1</b>", t))

    body = [f"<h1>harden {esc(rep['command'])} report</h1>",
            "<div class=headline>" + "".join(f"<p>{md(h)}</p>" for h in headline(rep)) + "</div>",
            f"<p>Data: <code>{esc(str(rep['data'].get('source')))}</code>, {rep['data'].get('n')} samples. "
            f"harden {esc(rep['harden_version'])}, torch {esc(rep['environment']['torch'])}, "
            f"seed {rep['environment']['seed']}.</p>"]
    body += [f"<p class=warn><b>Warning:</b> {esc(w)}</p>" for w in rep["data"].get("warnings", [])]
    body.append("<table><tr><th>model</th><th>measure</th><th>threat model</th><th>accuracy [95% CI]</th></tr>")
    body += ["<tr>" + "".join(f"<td>{esc(c)}</td>" for c in r) + "</tr>" for r in rows(rep)]
    body.append("</table><h2>Attack costs</h2><table><tr><th>model</th><th>threat model</th><th>attack</th>"
                "<th>attacked</th><th>broken</th><th>seconds</th><th>images/s</th></tr>")
    body += [f"<tr><td>{esc(m)}</td><td>{esc(t)}</td><td>{esc(r['attack'])}</td><td>{r['attacked']}</td>"
             f"<td>{r['broken']}</td><td>{r['seconds']:.1f}</td><td>{r['images_per_s'] or 0:.1f}</td></tr>"
             for m, t, r in attack_rows(rep)]
    pc = per_class_rows(rep)
    if pc:
        body.append("</table><h2>Per class</h2><table>"
                    "<tr><th>class</th><th>n</th><th>clean</th><th>worst case</th></tr>")
        body += ["<tr>" + "".join(f"<td>{esc(str(v))}</td>" for v in r) + "</tr>" for r in pc]
    body.append("</table><h2>Threat models</h2><ul>")
    body += [f"<li><b>{esc(k)}</b> — {esc(v)}</li>" for k, v in rep["threat_models"].items()]
    body.append("</ul><h2>Attack settings</h2><ul>")
    body += [f"<li><code>{esc(json.dumps(s, sort_keys=True))}</code></li>" for s in rep["attack_settings"]]
    body.append("</ul>")
    if rep.get("checks"):
        body.append("<h2>Sanity checks</h2><table><tr><th>check</th><th>status</th><th>detail</th></tr>")
        body += [f"<tr class={c['status']}><td>{esc(c['name'])}</td><td>{c['status']}</td>"
                 f"<td>{esc(c['detail'])}{(' — ' + esc(c['hint'])) if c['hint'] else ''}</td></tr>"
                 for c in rep["checks"]]
        body.append("</table>")
    if rep.get("eps_sweep"):
        body.append("<h2>Robustness curve</h2>" + _svg_curve(rep["eps_sweep"]))
    style = ("body{font-family:sans-serif;max-width:60em;margin:2em auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:3px 8px}tr.warn td{background:#fff3cd}.warn{color:#8a6d3b}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>harden report</title>"
            f"<style>{style}</style></head><body>{''.join(body)}</body></html>\n")


RENDERERS = {".json": lambda r: json.dumps(r, indent=2, sort_keys=True) + "\n", ".md": to_markdown,
             ".html": to_html}


def check_path(path: str | Path) -> Path:
    """A report path with a known format; checked before any work is done."""
    path = Path(path)
    if path.suffix.lower() not in RENDERERS:
        raise InputError(f"--report '{path}': use a .json, .md or .html file name")
    return path


def write(rep: dict, path: str | Path) -> None:
    from .checkpoint import atomic_write

    path = check_path(path)
    text = RENDERERS[path.suffix.lower()](rep)

    def _w(tmp: str) -> None:
        Path(tmp).write_text(text)
    atomic_write(path, _w)
