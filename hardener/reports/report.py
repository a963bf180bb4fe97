"""Reports: JSON (versioned schema), Markdown, self-contained HTML, rich tables; --fail-under gates."""
from __future__ import annotations

import html
import json
import math
import platform
import shlex
from dataclasses import is_dataclass
from pathlib import Path
from typing import Any

from .. import attacks as A
from ..attacks import info
from ..errors import InputError
from ..io.checkpoint import atomic_write
from ..patches import cost as C
from ..version import __version__
from .results import THREATS, EvalResult, ModelResult, public

SCHEMAS = {"eval": "harden.eval-report/3", "patch": "harden.patch-report/3"}  # one id per kind of report
SCHEMA = SCHEMAS["eval"]
SCHEMA_FILE = Path(__file__).parent / "schemas" / "report-3.schema.json"  # JSON Schema of both (shipped)
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


def as_json(obj: Any) -> Any:
    """A result (`results`: a model's, a threat model's, an attack's row) as the report's JSON holds it: its public
    fields (`results.public`: no masks), nested results converted alike."""
    if is_dataclass(obj):
        obj = public(obj)
    if isinstance(obj, dict):
        return {k: as_json(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [as_json(v) for v in obj]
    return obj


def build(command: str, result: EvalResult, data: dict, attack_settings: list, env: dict,
          extra: dict | None = None) -> dict:
    """The report of an evaluation (`harden eval`'s, or the one `harden patch` writes after training): the only place
    its JSON is made from the typed result."""
    rep = {
        "schema": SCHEMAS.get(command, SCHEMA),
        "harden_version": __version__,
        "command": command,
        "data": data,
        "threat_models": {t: THREAT_TEXT[t] for t in THREAT_TEXT
                          if any(t in m.threats for m in result.models.values())},
        "attack_settings": attack_settings,
        "models": as_json(result.models),
        "checks": result.checks,
        "eps_sweep": result.eps_sweep,
        "eps_sweep_base": result.eps_sweep_base,
        "out_of_memory": result.out_of_memory,
        "environment": env,
    }
    if extra:
        rep.update(extra)
    import datetime

    rep["created"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    rep["reduced_budgets"] = reduced_budgets(rep)
    rep["threats_not_run"] = threats_not_run(rep)
    summarise(rep)
    rep["robustbench"] = robustbench_entry(rep, result.models)
    return rep


def summarise(rep: dict) -> None:
    """`summary`, the headline figures as numbers alone (`mlflow.log_metrics(rep["summary"])`: gates_passed as 1/0,
    a threat model that did not run absent), and beside it `summary_context`, what they are of (model, norm,
    attacks)."""
    full = summary(rep)
    rep["summary"] = {k: int(v) if isinstance(v, bool) else v for k, v in full.items()
                      if isinstance(v, (int, float)) and math.isfinite(v)}
    rep["summary_context"] = {k: full[k] for k in ("model", "norm", "attacks")}


def threats_not_run(rep: dict) -> dict[str, str]:
    """The threat models that did not run on the evaluated model, each with why (`threats_not_run`: the reports
    list them on one line instead of giving them rows or figures)."""
    name = "patched" if "patched" in rep["models"] else "base"
    m = rep["models"][name]
    kinds = set()
    for s in rep.get("attack_settings", []):
        try:
            kinds.add(A.info(s.get("name", "")).kind)
        except InputError:  # a plug-in's attack that is gone
            pass
    out = {}
    for t in THREAT_TEXT:
        if t in m.get("threats", {}):
            continue
        if t in (m.get("threats_skipped") or {}):
            out[t] = m["threats_skipped"][t]
        elif rep.get("command") == "patch":
            out[t] = "left to the full verdict (harden eval)"
        elif t == "blackbox" and "query" not in kinds:
            out[t] = "needs a query attack, e.g. --attack square"
        elif t != "blackbox" and not kinds - {"query"}:
            out[t] = "needs a gradient attack, e.g. --attack apgd-ce"
        elif t in ("adaptive", "transfer") and name == "base":
            out[t] = "the model has no patches"
        else:
            out[t] = "not in --threat"
    return out


# A report on fewer images than this gets its sample size flagged (95% intervals wider than about +-7 points).
SMALL_N = 200
QUERIES = 5000  # Square's reference budget (AutoAttack's)
CARD_OF = {"whitebox": "robust", "adaptive": "robust", "transfer": "transfer", "blackbox": "blackbox"}


def reduced_budgets(rep: dict) -> dict[str, list[str]]:
    """What weakens the figures of the evaluated model, by the card (summary key) each affects: an attack run with
    fewer steps or queries than its reference budget, and a small sample (every card)."""
    m = rep["models"]["patched" if "patched" in rep["models"] else "base"]
    out: dict[str, list[str]] = {}
    for t, th in _in_order(m.get("threats", {})):
        for r in th["attacks"]:
            s = r["settings"]
            try:
                ref = A.info(s.get("name", r["attack"]))
            except InputError:  # an attack registered by a plug-in that is gone: no reference to compare with
                continue
            if ref.kind == "query" and s.get("queries", QUERIES) < QUERIES:
                note = f"{r['attack']} {s['queries']} queries (reference {QUERIES})"
            elif ref.iterative and s.get("steps") and ref.steps and s["steps"] < ref.steps:
                note = f"{r['attack']} {s['steps']} steps (reference {ref.steps})"
            else:
                continue
            for key in (CARD_OF.get(t), "worst_case"):
                if key and note not in out.setdefault(key, []):
                    out[key].append(note)
    n = m["clean"]["n"]
    if n < SMALL_N:
        lo, hi = m["clean"]["ci95"]
        for key in dict.fromkeys(["clean", *(CARD_OF[t] for t in m.get("threats", {}) if t in CARD_OF), "worst_case"]):
            out.setdefault(key, []).append(f"only {n} images (clean 95% CI {100 * lo:.0f}–{100 * hi:.0f}%)")
    return out


STANDARD_AA = ("apgd-ce", "apgd-t", "fab-t", "square")


def robustbench_entry(rep: dict, results: dict[str, ModelResult]) -> dict:
    """A RobustBench-style entry for the evaluated model: `autoattack_acc` only when the run was the standard
    AutoAttack (APGD-CE, APGD-T, FAB-T on the model itself, Square as its query attack: their per-sample AND), else
    None; `external` is harden's worst case over every threat model that ran (adaptive attacks included)."""
    models = rep["models"]
    name = "patched" if "patched" in models else "base"
    m = models[name]
    reason = standard_autoattack(m, rep)
    aa = None
    if reason is None and name in results:
        th = results[name].threats
        aa = float((th["whitebox"].mask & th["blackbox"].mask).float().mean())
    training = rep.get("training") or {}
    return {"clean_acc": round(100 * m["clean"]["accuracy"], 2),
            "autoattack_acc": None if aa is None else round(100 * aa, 2),
            "external": round(100 * m["worst_case"]["accuracy"], 2),
            "eps": rep.get("eps"), "threat_model": rep.get("norm"), "number_forward_passes": 1,
            "architecture": (rep.get("architecture") or training.get("arch") or ""),
            "n": m["clean"]["n"], "model": name,
            **({"autoattack_acc_missing": reason} if reason else {})}


def standard_autoattack(m: dict, rep: dict) -> str | None:
    """None when the run was AutoAttack's standard version exactly (white-box APGD-CE, APGD-T, FAB-T; Square as the
    black-box attack; reference budgets, one restart, fp32, no EOT or smoothed gradients), else what differs."""
    th = m.get("threats", {})
    names = {t: [r["attack"] for r in th[t]["attacks"]] for t in ("whitebox", "blackbox") if t in th}
    if sorted(names.get("whitebox", [])) != ["apgd-ce", "apgd-t", "fab-t"] or names.get("blackbox") != ["square"]:
        return "not the standard suite (--suite standard, --threat including whitebox and blackbox)"
    if rep.get("precision", "fp32") != "fp32":
        return f"attacks ran in {rep['precision']}"
    for t in ("whitebox", "blackbox"):
        for r in th[t]["attacks"]:
            s = r["settings"]
            if s.get("restarts", 1) != 1 or s.get("eot", 1) != 1 or s.get("smooth_grad") is not None:
                return f"{r['attack']}: restarts, EOT or smoothed gradients differ from the standard version"
            if r["attack"] != "square" and s.get("steps") != 100:
                return f"{r['attack']}: {s.get('steps')} steps, not 100"
            if r["attack"] == "square" and s.get("queries") != 5000:
                return f"square: {s.get('queries')} queries, not 5000"
            if r["attack"] in ("apgd-t", "fab-t") and s.get("n_target_classes") != min(9, s.get("n_classes", 10) - 1):
                return f"{r['attack']}: {s.get('n_target_classes')} target classes, not min(9, classes - 1)"
    return None


def data_record(ds, warnings: list[str]) -> dict:
    """The report's `data` block for a harden `Dataset`."""
    return {"source": ds.source, "n": len(ds), "classes": ds.classes, "preprocessing": ds.notes,
            "fingerprint": ds.fingerprint(), "warnings": warnings}


def attack_settings(result: EvalResult) -> list[dict]:
    """Every distinct attack setting of an evaluation result, in the order the chains ran them."""
    seen, out = set(), []
    for m in result.models.values():
        for th in m.threats.values():
            for r in th.attacks:
                key = json.dumps(r.settings, sort_keys=True)
                if key not in seen:
                    seen.add(key)
                    out.append(r.settings)
    return out


def robust_accuracy(m: dict) -> float | None:
    """A model's `robust` figure: the per-sample worst case of the attacks that know it (white-box and BPDA), the
    white-box chain's when only that ran, None when neither did."""
    w = m.get("worst_whitebox") or m.get("threats", {}).get("whitebox", {}).get("robust")
    return w["accuracy"] if w else None


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
        return r4(robust_accuracy(mm))

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


THREAT_LABEL = {"whitebox": "white-box", "adaptive": "BPDA", "surrogate": "surrogate transfer",
                "transfer": "transfer", "blackbox": "black-box"}


def headline(rep: dict) -> list[str]:
    """The first lines of a Markdown/HTML report: what was evaluated, and the verdict per threat model that ran."""
    s = summary(rep)

    def p(v):
        return f"{100 * v:.1f}%"

    lines = []
    budget = rep.get("report_budget") or {}
    if budget.get("verdict") is False:
        note = str(budget.get("note", "")).removeprefix("quick check: ")
        lines.append(f"**Quick check, not a verdict**: {note}. Full verdict: `{budget.get('full_evaluation', '')}`")
    ck = rep.get("checkpoint")
    if ck:
        sha = rep.get("checkpoint_sha256", "")
        lines.append(f"Model `{Path(ck).name}`" + (f" (sha256 `{sha[:16]}…`)" if sha else "")
                     + f", data `{rep['data'].get('source')}` ({s['n']} samples, fingerprint "
                     f"`{str(rep['data'].get('fingerprint', ''))[:12]}`), {rep.get('created', '')}.")
    wb = (rep["models"][s["model"]].get("threats", {}).get("whitebox") or {}).get("robust")
    figures = [f"clean {p(s['clean'])}"]
    if s.get("robust") is not None:
        figures.append(f"white-box {p(wb['accuracy'])}, with BPDA too {p(s['robust'])}"
                       if s.get("adaptive") is not None and wb is not None else f"white-box {p(s['robust'])}")
    figures += [f"{label} {p(s[t])}" for t, label in (("surrogate", "after surrogate transfer too"),
                                                        ("transfer", "transfer"), ("blackbox", "black-box"))
                if s.get(t) is not None]
    not_run = not_run_line(rep)
    lines.append(f"**{s['model']}**: {', '.join(figures)}; worst case over the threat models that ran "
                 f"{p(s['worst_case'])} (eps {s['eps']} {s['norm'] or ''})." + (f" {not_run}." if not_run else ""))
    if "delta_clean" in s:
        base_wb = f", white-box {p(s['base_robust'])}" if s.get("base_robust") is not None else ""
        lines.append(f"Base: clean {p(s['base_clean'])}{base_wb}; clean accuracy "
                     f"{100 * s['delta_clean']:+.1f} points against the base.")
    if "gates_passed" in s:
        missed = rep["gates"].get("missed") or []
        lines.append(f"Gates: **passed** ({_thresholds(rep)})" if s["gates_passed"] else
                     f"Gates: **missed** ({_thresholds(rep)}): " + "; ".join(missed))
    notes = _budget_notes(rep)
    if notes:
        lines.append("**Reduced budget**, the figures are upper bounds: " + "; ".join(notes) + ".")
    cost = cost_line(rep)
    if cost:
        lines.append(cost + ".")
    return lines


def cost_line(rep: dict) -> str | None:
    """"Inference cost: 1.13x the base's multiply-adds ...; latency batch 1 1.27x ...": what the patches cost at
    inference (a patch run's or an evaluation's `cost`), None where the report has none."""
    rec = rep.get("cost")
    if not rec or not rec.get("macs_base"):
        return None
    budget = rec.get("budget")
    return (f"Inference cost: {C.describe(C.Cost.from_json(rec))}"
            + (f" (sized to a budget of {budget:g}x)" if isinstance(budget, (int, float)) else ""))


def not_run_line(rep: dict) -> str:
    """"Not run: transfer, black-box — why": the threat models that did not run, on one line, grouped by the reason
    ("" when all ran)."""
    missing = rep.get("threats_not_run")
    if missing is None:  # a report written before it was recorded
        missing = threats_not_run(rep)
    why: dict[str, list[str]] = {}
    for t, reason in missing.items():
        why.setdefault(reason, []).append(THREAT_LABEL.get(t, t))
    return ("Not run: " + "; ".join(f"{', '.join(ts)} — {reason}" for reason, ts in why.items())) if why else ""


def _thresholds(rep: dict) -> str:
    return ", ".join(f"{k} >= {100 * v:.1f}%" for k, v in ((rep.get("gates") or {}).get("thresholds") or {}).items())


def _budget_notes(rep: dict) -> list[str]:
    """Every reduced-budget note of the report once, in card order."""
    out: list[str] = []
    for notes in (rep.get("reduced_budgets") or {}).values():
        out += [n for n in notes if n not in out]
    return out


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


MIN_GATE_STEPS = 2  # an iterative attack with one step is FGSM


def check_gate_attacks(thresholds: dict[str, float], attacks: list[str], threats: tuple[str, ...],
                       allow_weak: bool, steps: int | None = None) -> None:
    """A `robust`/`transfer` gate needs an iterative gradient attack in that threat model: otherwise the gate would
    pass on an attack too weak to mean anything (input error, exit 2). Iterative means a loss maximised inside the
    threat model's ball (kind "gradient": not a minimum-norm search such as DeepFool, which leaves 60% where
    APGD-CE leaves 0%) for at least MIN_GATE_STEPS steps (`steps`, the run's --steps, else the attack's own budget).
    A gate on a threat model that did not run at all is reported as missed ("not measured", exit 1) by `gate`."""
    if allow_weak or not ({"robust", "transfer"} & set(thresholds)):
        return

    strong = [a for a in attacks if info(a).kind == "gradient"
              and (steps if steps is not None else info(a).steps) >= MIN_GATE_STEPS]
    for key, threat in (("robust", "whitebox"), ("transfer", "transfer")):
        if key in thresholds and (not strong or threat not in threats):
            budget = f" at --steps {steps}" if steps is not None and steps < MIN_GATE_STEPS else ""
            raise InputError(f"--fail-under {key}= needs an iterative {threat} attack of at least {MIN_GATE_STEPS} "
                             f"steps (e.g. --attack apgd-ce with --threat {threat} or all); with only "
                             f"{', '.join(attacks) or 'none'}{budget} the gate would pass on a weak attack (FGSM "
                             "leaves 34% where APGD leaves 0%); add one, or pass --allow-weak-gate")


def gate(rep: dict, thresholds: dict[str, float]) -> list[str]:
    """Missed thresholds, as sentences (empty = all met)."""
    if not thresholds:
        return []
    values = gate_values(rep)
    missed = []
    for key, th in thresholds.items():
        if key not in values:
            missed.append(f"{key}: not measured (no {key} attack ran)")
        elif values[key] < th:
            missed.append(f"{key} accuracy {values[key]:.4f} < {th:.4f}")
    return missed


def gate_values(rep: dict) -> dict[str, float]:
    """What the gates compare: the evaluated model's clean accuracy, white-box worst case, transfer and black-box."""
    m = rep["models"]["patched" if "patched" in rep["models"] else "base"]
    values = {"clean": m["clean"]["accuracy"]}
    if "worst_whitebox" in m:
        values["robust"] = m["worst_whitebox"]["accuracy"]
    for t in ("transfer", "blackbox"):
        if t in m["threats"]:
            values[t] = m["threats"][t]["robust"]["accuracy"]
    return values


def gates_passed_line(rep: dict, thresholds: dict[str, float]) -> str:
    """The line a run whose gates all passed prints: each value against its threshold."""
    values = gate_values(rep)
    return "gates passed (--fail-under): " + ", ".join(f"{k} {100 * values[k]:.1f}% >= {100 * th:.1f}%"
                                                       for k, th in thresholds.items())


# ---------------------------------------------------------------- rendering


def pct(a: dict | None) -> str:
    if not a:
        return "—"
    lo, hi = a["ci95"]
    return f"{100 * a['accuracy']:.1f}% [{100 * lo:.1f}–{100 * hi:.1f}]"


def accuracy_tables(rep: dict) -> list[tuple[str, list[str], list[list[str]]]]:
    """One accuracy table per model, (model, header, rows): a row per threat model that ran (the attacks of its chain
    with the accuracy left after each), its accuracy, and where recorded the same on the images the base classifies
    correctly, as a column. Threat models that did not run get no row (`not_run_line`)."""
    out = []
    for name, m in rep["models"].items():
        cb = m.get("correct_by_base") or {}
        head = ["threat model", "attacks (accuracy after each)", "accuracy [95% CI]"]
        if cb:
            head.append(f"on the {cb['clean']['n']} images the base gets right" if "clean" in cb else
                        "on the images the base gets right")
        rows_ = [["clean", "no attack", pct(m["clean"]), pct(cb.get("clean"))]]
        threats = _in_order(m["threats"])
        for t, th in threats:
            chain = th["attacks"]
            attacks = chain[0]["attack"] if len(chain) == 1 else " → ".join(
                f"{r['attack']} {100 * r['robust_after']['accuracy']:.1f}%" for r in chain)
            rows_.append([THREAT_LABEL.get(t, t), attacks, pct(th["robust"]), pct(cb.get(t))])
        if "adaptive" in m["threats"] and m.get("worst_whitebox"):
            rows_.append(["white-box and BPDA", "per sample, both", pct(m["worst_whitebox"]), "—"])
        if len(threats) > 1:
            rows_.append(["worst case", "per sample, every threat model that ran", pct(m["worst_case"]),
                          pct(cb.get("worst"))])
        out.append((name, head, [r[:len(head)] for r in rows_]))
    return out


SETTING_COLUMNS = (("name", "attack"), ("norm", "norm"), ("eps", "eps"), ("steps", "steps"), ("queries", "queries"),
                   ("restarts", "restarts"), ("eot", "EOT samples"), ("loss", "loss"), ("seed", "seed"))


def settings_table(rep: dict) -> tuple[list[str], list[list[str]]]:
    """The attack settings as a table: the common settings as columns (those any attack has), the rest as `key=value`
    in one column (true flags by name), and where each setting ran (model and threat model)."""
    settings = rep.get("attack_settings") or []
    cols = [(k, label) for k, label in SETTING_COLUMNS if any(k in s for s in settings)]
    where: dict[str, list[str]] = {}
    for m, t, r in attack_rows(rep):
        where.setdefault(json.dumps(r["settings"], sort_keys=True), []).append(f"{m} {THREAT_LABEL.get(t, t)}")

    def cell(v) -> str:
        return f"{v:g}" if isinstance(v, float) else str(v)
    rows_ = []
    for s in settings:
        known = {k for k, _ in cols}
        other = [k if v is True else f"{k}={cell(v)}" for k, v in sorted(s.items())
                 if k not in known and v is not False and v is not None]
        rows_.append([cell(s[k]) if k in s else "—" for k, _ in cols]
                     + [", ".join(other) or "—", ", ".join(where.get(json.dumps(s, sort_keys=True), [])) or "—"])
    return [label for _, label in cols] + ["other", "run in"], rows_


def sweep_points(rep: dict, key: str) -> list[dict]:
    """An eps sweep (`eps_sweep` of the evaluated model, `eps_sweep_base` of the base) from eps 0: the model's clean
    accuracy is the eps-0 point where the sweep did not measure it."""
    sweep = sorted(rep.get(key) or [], key=lambda p: p["eps"])
    if not sweep or sweep[0]["eps"] == 0:
        return sweep
    models = rep["models"]
    m = models["base"] if key == "eps_sweep_base" else models.get("patched", models["base"])
    return [{"eps": 0.0, "attack": sweep[0]["attack"], **m["clean"]}, *sweep]


ORDER = THREATS  # as the chains run (JSON files sort their keys)


def _in_order(threats: dict) -> list[tuple[str, dict]]:
    return sorted(threats.items(), key=lambda kv: ORDER.index(kv[0]) if kv[0] in ORDER else len(ORDER))


def attack_rows(rep: dict) -> list[tuple[str, str, dict]]:
    return [(name, t, r) for name, m in rep["models"].items() for t, th in _in_order(m["threats"])
            for r in th["attacks"]]


def render_table(rep: dict, console) -> None:
    from rich.table import Table

    console.print(f"harden {rep['command']}: {rep['data'].get('n')} samples of {rep['data'].get('source')}",
                  highlight=False, markup=False)
    for name, head, rows_ in accuracy_tables(rep):
        table = Table(title=name, title_justify="left")
        for col in head:
            table.add_column(col)
        for r in rows_:
            table.add_row(*r)
        console.print(table)
    not_run = not_run_line(rep)
    if not_run:
        console.print(not_run, highlight=False, markup=False)
    cost = cost_line(rep)
    if cost:
        console.print(cost, highlight=False, markup=False)
    notes = _budget_notes(rep)
    if notes:
        console.print("[yellow]reduced budget[/] (upper bounds): " + "; ".join(notes), highlight=False)
    for c in rep.get("checks", []):
        style = {"pass": "green", "warn": "yellow", "skip": "dim"}[c["status"]]
        console.print(f"[{style}]{c['status']:>4}[/] {c['name']}: {c['detail']}" +
                      (f" — {c['hint']}" if c["hint"] else ""), highlight=False)


def _md_table(head: list[str], rows_: list) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + \
        ["| " + " | ".join(str(c) for c in r) + " |" for r in rows_]


def to_markdown(rep: dict) -> str:
    lines = [f"## harden {rep['command']} report", "", *[f"{h}  " for h in headline(rep)], "",
             f"Data: `{rep['data'].get('source')}`, {rep['data'].get('n')} samples. "
             f"harden {rep['harden_version']}, torch {rep['environment']['torch']}, "
             f"torchattacks {rep['environment']['torchattacks']}, seed {rep['environment']['seed']}.", ""]
    lines += [f"{k}: `{v}`  " for k, v in invocation_lines(rep)]
    for w in rep["data"].get("warnings", []):
        lines.append(f"> **Warning:** {w}")
    for name, head, rows_ in accuracy_tables(rep):
        lines += ["", f"Accuracy of **{name}**:", "", *_md_table(head, rows_)]
    not_run = not_run_line(rep)
    lines += ["", "Threat models:", ""] + [f"- **{k}** — {v}" for k, v in rep["threat_models"].items()]
    lines += [f"- {not_run}"] if not_run else []
    lines += ["", "Attack costs:", "", *_md_table(
        ["model", "threat model", "attack", "attacked", "broken", "seconds", "images/s"],
        [(m, t, r["attack"], r["attacked"], r["broken"], f"{r['seconds']:.1f}", f"{r['images_per_s'] or 0:.1f}")
         for m, t, r in attack_rows(rep)])]
    lines += ["", "Attack settings:", "", *_md_table(*settings_table(rep))]
    if rep.get("checks"):
        lines += ["", *_md_table(["check", "status", "detail"], [
            (c["name"], c["status"], c["detail"] + (" — " + c["hint"] if c["hint"] else "")) for c in rep["checks"]])]
    pc = per_class_rows(rep)
    if pc:
        lines += ["", *_md_table(["class", "n", "clean", "worst case"], pc)]
    prov = provenance_rows(rep)
    if prov:
        lines += ["", "Which attack broke what (each sample credited to the first attack that broke it):", "",
                  *_md_table(["model", "broken by", "samples"], prov)]
    if rep.get("eps_sweep"):
        base = {s["eps"]: s for s in sweep_points(rep, "eps_sweep_base")}
        lines += ["", "Robustness curve (eps 0: clean accuracy):", "", *_md_table(
            ["eps", "attack", "accuracy [95% CI]", "base"],
            [(f"{s['eps']:g}", s["attack"] if s["eps"] else "none", pct(s), pct(base.get(s["eps"])))
             for s in sweep_points(rep, "eps_sweep")])]
    return "\n".join(lines) + "\n"


def invocation_lines(rep: dict) -> list[tuple[str, str]]:
    """How the run was started (`invocation`, CLI runs): the command line, and a command that reproduces it."""
    inv = rep.get("invocation")
    if not inv:
        return []
    return [("Command", inv["command_line"]),
            ("Reproduce", f"cd {shlex.quote(inv['working_directory'])} && {inv['reproduce']}")]


def provenance_rows(rep: dict) -> list[tuple[str, str, int]]:
    """(model, first attack that broke the samples or robust/clean_error, count), in the chains' order."""
    out = []
    for name, m in rep["models"].items():
        counts = m.get("broken_by") or {}
        for k in sorted(counts, key=lambda k: (ORDER.index(k.split("/")[0]) if k.split("/")[0] in ORDER else 9,
                                               k == "robust")):
            out.append((name, k, counts[k]))
    return out


def _svg_curve(curves: list[tuple[str, str, list[dict]]], mark: float | None = None, norm: str = "") -> str:
    """Robust accuracy against eps from eps 0, one line per (label, colour, sweep) with its 95% interval as a band,
    the report's own eps dashed; drawn to the page's full width (a viewBox, scaled)."""
    w, h, left, right, top, bottom = 960, 300, 56, 20, 34, 40
    pts_all = [s for _, _, c in curves for s in c]
    emax = max([s["eps"] for s in pts_all] + [mark or 0]) or 1.0

    def xy(e, a):
        return left + (w - left - right) * e / emax, h - bottom - (h - top - bottom) * a

    parts = []
    for a in (0, 0.25, 0.5, 0.75, 1):
        y = xy(0, a)[1]
        parts.append(f'<line x1="{left}" y1="{y:.1f}" x2="{w - right}" y2="{y:.1f}" stroke="#e5e5e5"/>'
                     f'<text x="{left - 6}" y="{y + 4:.1f}" font-size="12" text-anchor="end">{int(a * 100)}%</text>')
    parts.append(f'<line x1="{left}" y1="{h - bottom}" x2="{w - right}" y2="{h - bottom}" stroke="#333"/>'
                 f'<line x1="{left}" y1="{top}" x2="{left}" y2="{h - bottom}" stroke="#333"/>')
    for e in sorted({s["eps"] for s in pts_all}):
        parts.append(f'<text x="{xy(e, 0)[0]:.1f}" y="{h - bottom + 16}" font-size="12" text-anchor="middle">'
                     f'{e:g}</text>')
    if mark:
        x = xy(mark, 0)[0]
        parts.append(f'<line x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{h - bottom}" stroke="#888" '
                     f'stroke-dasharray="4 4"/><text x="{x + 4:.1f}" y="{top + 12}" font-size="12" fill="#555">'
                     f'this report\'s eps</text>')
    for k, (label, colour, sweep) in enumerate(curves):
        pts = sorted(sweep, key=lambda s: s["eps"])
        if any("ci95" in s for s in pts):
            upper = [xy(s["eps"], s.get("ci95", [s["accuracy"]] * 2)[1]) for s in pts]
            lower = [xy(s["eps"], s.get("ci95", [s["accuracy"]] * 2)[0]) for s in reversed(pts)]
            band = " ".join(f"{'M' if i == 0 else 'L'}{x:.1f},{y:.1f}" for i, (x, y) in enumerate(upper + lower))
            parts.append(f'<path d="{band} Z" fill="{colour}" opacity="0.15"/>')
        path = " ".join(f"{'M' if i == 0 else 'L'}{xy(s['eps'], s['accuracy'])[0]:.1f},"
                        f"{xy(s['eps'], s['accuracy'])[1]:.1f}" for i, s in enumerate(pts))
        parts.append(f'<path d="{path}" fill="none" stroke="{colour}" stroke-width="2"/>')
        parts += [f'<circle cx="{xy(s["eps"], s["accuracy"])[0]:.1f}" cy="{xy(s["eps"], s["accuracy"])[1]:.1f}" '
                  f'r="3.5" fill="{colour}"><title>{html.escape(label)}, eps {s["eps"]:g}: '
                  f'{100 * s["accuracy"]:.1f}%</title></circle>' for s in pts]
        parts.append(f'<rect x="{w - right - 120}" y="{top + 4 + 18 * k}" width="12" height="12" fill="{colour}"/>'
                     f'<text x="{w - right - 102}" y="{top + 15 + 18 * k}" font-size="13">{html.escape(label)}</text>')
    attack = html.escape(pts_all[-1]["attack"]) if pts_all else ""
    parts.append(f'<text x="{(left + w - right) / 2}" y="{h - 6}" font-size="13" text-anchor="middle">eps '
                 f'{html.escape(norm)} (0: no attack, the clean accuracy)</text>'
                 f'<text x="{left}" y="{top - 14}" font-size="13">accuracy under white-box {attack}, with its 95% '
                 'interval</text>')
    return (f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {w} {h}" width="100%" role="img" '
            f'style="display:block">{"".join(parts)}</svg>')


CARDS = (("clean", "clean", "no attack"), ("robust", "white-box", "worst of the attacks that know the model"),
         ("transfer", "transfer", "attacks computed on the base"), ("blackbox", "black-box", "Square queries"),
         ("worst_case", "worst case", "per sample, every threat model that ran"))


def _cards(rep: dict) -> str:
    """The verdict at a glance: one card per figure of the summary, the base's value beside the patched one."""
    s = summary(rep)
    base = rep["models"].get("base", {}) if s["model"] == "patched" else {}

    def base_of(key: str):
        if not base:
            return None
        if key == "clean":
            return base["clean"]["accuracy"]
        if key == "robust":
            return robust_accuracy(base)
        if key == "worst_case":
            return base["worst_case"]["accuracy"]
        t = base.get("threats", {}).get(key)
        return t["robust"]["accuracy"] if t else None

    out = []
    for key, label, note in CARDS:
        v = s.get(key)
        if v is None:
            continue
        b = base_of(key)
        tone = "good" if v >= 0.5 else ("mid" if v >= 0.2 else "bad")
        sub = f"base {100 * b:.1f}%" if b is not None else ""
        reduced = (rep.get("reduced_budgets") or {}).get(key) or []
        out.append(f"<div class='card {tone}'><div class=lab>{html.escape(label)}</div>"
                   f"<div class=val>{100 * v:.1f}%</div><div class=sub>{html.escape(sub)}</div>"
                   f"<div class=note>{html.escape(note)}</div>"
                   + "".join(f"<div class=reduced>reduced: {html.escape(r)}</div>" for r in reduced) + "</div>")
    if "gates_passed" in s:
        ok = s["gates_passed"]
        out.append(f"<div class='card {'good' if ok else 'bad'}'><div class=lab>gates</div>"
                   f"<div class=val>{'passed' if ok else 'missed'}</div>"
                   f"<div class=sub>{html.escape(_thresholds(rep))}</div>"
                   f"<div class=note>{html.escape('; '.join(rep['gates'].get('missed') or []) or 'all met')}</div>"
                   "</div>")
    return "<div class=cards>" + "".join(out) + "</div>"


STYLE = ("body{font-family:system-ui,sans-serif;max-width:64em;margin:2em auto;padding:0 1em;color:#222}"
         "h1{font-size:1.5em;margin-bottom:.3em}h2{font-size:1.15em;margin-top:1.6em;border-bottom:1px solid #ddd}"
         "h3{font-size:1em;margin:1em 0 .3em}"
         "table{border-collapse:collapse;font-size:.92em}td,th{border:1px solid #ddd;padding:3px 8px;"
         "text-align:left}th{background:#f5f5f5}tr.warn td{background:#fff3cd}tr.pass td:nth-child(2){color:#2e7d32}"
         "table.acc{width:100%;table-layout:fixed}table.acc th:nth-child(1){width:12em}table.acc th:nth-child(3)"
         "{width:11em}table.acc th:nth-child(4){width:16em}table.acc td:nth-child(n+3){font-variant-numeric:tabular-nums}"
         "table.acc tr.worst td{font-weight:600}.notrun{color:#666}"
         ".cards{display:flex;flex-wrap:wrap;gap:.7em;margin:1em 0}.card{border:1px solid #ddd;border-radius:8px;"
         "padding:.6em .9em;min-width:9em;max-width:13em}.card .lab{font-size:.8em;text-transform:uppercase;"
         "color:#666}.card .val{font-size:1.8em;font-weight:600}.card .sub{font-size:.85em;color:#555}"
         ".card .note{font-size:.75em;color:#888}.card .reduced{font-size:.75em;color:#b26a00;font-weight:600}"
         ".good{border-left:6px solid #2e7d32}.mid{border-left:6px solid"
         " #f9a825}.bad{border-left:6px solid #c62828}.alert{background:#fff8e1;border:1px solid #f0d58c;"
         "padding:.5em 1em;border-radius:6px}.warnline{color:#8a6d3b}.foot{color:#777;font-size:.85em;"
         "margin-top:2em}code{background:#f3f3f3;padding:0 3px}")


def _html_table(head: list[str], rows_: list, cls: list[str] | None = None, table_cls: str = "") -> str:
    esc = html.escape
    trs = "".join(f"<tr{f' class={cls[i]}' if cls and cls[i] else ''}>" + "".join(f"<td>{esc(str(c))}</td>" for c in r)
                  + "</tr>" for i, r in enumerate(rows_))
    return (f"<table{f' class={table_cls}' if table_cls else ''}><tr>" + "".join(f"<th>{esc(h)}</th>" for h in head)
            + f"</tr>{trs}</table>")


def _html_results(rep: dict) -> list[str]:
    """The accuracy tables (one per model), the threat models that did not run, and the robustness curve."""
    body = ["<h2>Accuracy by threat model</h2>"]
    for name, head, rows_ in accuracy_tables(rep):
        cls = ["worst" if r[0] == "worst case" else "" for r in rows_]
        body.append(f"<h3>{html.escape(name)}</h3>" + _html_table(head, rows_, cls, "acc"))
    not_run = not_run_line(rep)
    if not_run:
        body.append(f"<p class=notrun>{html.escape(not_run)}.</p>")
    if rep.get("eps_sweep"):
        curves = [("patched" if rep.get("eps_sweep_base") else "model", "#1f77b4", sweep_points(rep, "eps_sweep"))]
        if rep.get("eps_sweep_base"):
            curves.append(("base", "#d62728", sweep_points(rep, "eps_sweep_base")))
        body.append("<h2>Robustness curve</h2>" + _svg_curve(curves, rep.get("eps"), rep.get("norm") or ""))
    return body


def to_html(rep: dict) -> str:
    esc = html.escape
    import re as _re

    def md(t: str) -> str:  # the headline's **bold** and `code`, escaped
        t = esc(t)
        return _re.sub(r"`([^`]*)`", r"<code>\1</code>", _re.sub(r"\*\*([^*]*)\*\*", r"<b>\1</b>", t))

    table = _html_table
    quick = " (quick check, not a verdict)" if (rep.get("report_budget") or {}).get("verdict") is False else ""
    title = f"harden {rep['command']} — {Path(str(rep.get('checkpoint') or 'model')).name}{quick}"
    body = [f"<h1>{esc(title)}</h1>", "<div class=headline>" + "".join(f"<p>{md(h)}</p>" for h in headline(rep))
            + "</div>", _cards(rep)]
    body += [f"<p class=warnline><b>Warning:</b> {esc(w)}</p>" for w in rep["data"].get("warnings", [])]
    warned = [c for c in rep.get("checks", []) if c["status"] == "warn"]
    if warned:
        body.append("<div class=alert><b>Sanity checks that warn</b> (signs to look into, each with what was seen):"
                    "<ul>" + "".join(f"<li><b>{esc(c['name'])}</b>: {esc(c['detail'])} — {esc(c['hint'])}</li>"
                                     for c in warned) + "</ul></div>")
    body += _html_results(rep)
    prov = provenance_rows(rep)
    if prov:
        body.append("<h2>Which attack broke what</h2><p>Each sample is credited to the first attack that broke it, "
                    "in the order white-box, adaptive, surrogate, transfer, black-box; the counts sum to the "
                    "samples.</p>" + table(["model", "broken by", "samples"], prov))
    pc = per_class_rows(rep)
    if pc:
        body.append("<h2>Per class</h2>" + table(["class", "n", "clean", "worst case"], pc))
    body.append("<h2>Attack settings</h2>" + table(*settings_table(rep)))
    body.append("<h2>Attack costs</h2>" + table(
        ["model", "threat model", "attack", "attacked", "broken", "seconds", "images/s"],
        [(m, t, r["attack"], r["attacked"], r["broken"], f"{r['seconds']:.1f}", f"{r['images_per_s'] or 0:.1f}")
         for m, t, r in attack_rows(rep)]))
    if rep.get("checks"):
        body.append("<h2>Sanity checks</h2>" + table(
            ["check", "status", "detail"], [(c["name"], c["status"], c["detail"] + (f" — {c['hint']}" if c["hint"]
                                                                                    else "")) for c in rep["checks"]],
            [c["status"] for c in rep["checks"]]))
    body.append("<h2>Threat models</h2><ul>" + "".join(f"<li><b>{esc(k)}</b> — {esc(v)}</li>"
                                                      for k, v in rep["threat_models"].items()) + "</ul>")
    env = rep["environment"]
    body.append(f"<p class=foot>harden {esc(rep['harden_version'])}, torch {esc(env['torch'])}, torchattacks "
                f"{esc(env['torchattacks'])}, device {esc(str(env['device']))}, seed {env['seed']}; data "
                f"<code>{esc(str(rep['data'].get('source')))}</code>, fingerprint "
                f"<code>{esc(str(rep['data'].get('fingerprint', ''))[:16])}</code>; schema {esc(rep['schema'])}.</p>")
    body += [f"<p class=foot>{esc(k)}: <code>{esc(v)}</code></p>" for k, v in invocation_lines(rep)]
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{esc(title)}</title>"
            f"<style>{STYLE}</style></head><body>{''.join(body)}</body></html>\n")


def standard(obj: Any) -> Any:
    """`obj` with every NaN or infinity as None (null): JSON has no such numbers (Python would write `NaN`)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: standard(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [standard(v) for v in obj]
    return obj


def json_text(rep: Any) -> str:
    """A report as standard JSON (NaN and infinities written as null)."""
    return json.dumps(standard(rep), indent=2, sort_keys=True, allow_nan=False)


RENDERERS = {".json": lambda r: json_text(r) + "\n", ".md": to_markdown,
             ".html": to_html}


def check_path(path: str | Path) -> Path:
    """A report path with a known format; checked before any work is done."""
    path = Path(path)
    if path.suffix.lower() not in RENDERERS:
        raise InputError(f"--report '{path}': use a .json, .md or .html file name")
    return path


def write(rep: dict, path: str | Path) -> None:
    path = check_path(path)
    text = RENDERERS[path.suffix.lower()](rep)

    def _w(tmp: str) -> None:
        Path(tmp).write_text(text)
    atomic_write(path, _w)
