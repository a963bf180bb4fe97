"""One certification, for the library and the command line alike: `hardener.certify` and `harden certify` both run
`certify_run` (the memory check, the sample selection, CERTIFY or the sequential one, the report) and render what it
returns; what differs is where progress goes and whether finished rows are kept for a resume (`keep`)."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from .. import data as hdata
from ..errors import InputError
from ..io.checkpoint import atomic_write
from ..io.resume import EvalStore, fingerprint
from ..options import validate as V
from ..reports import report as R
from ..runtime import distributed as D
from ..version import __version__
from . import smoothing as C


@dataclass
class Certification:
    """A certification's report: `summary` (certified accuracy per radius, abstention, noisy forwards per sample),
    `rows` (one per sample: class, radius, draws, why it stopped), `to_dict()` (the JSON report), `to_tsv()`
    (locuslab/smoothing's columns), `to_markdown()`; shown as its Markdown table in a notebook."""

    data: dict
    result: C.CertifyResult

    @property
    def summary(self) -> dict:
        return self.data["summary"]

    @property
    def rows(self) -> list[dict]:
        return self.result.rows

    @classmethod
    def from_rows(cls, rows: list[dict], config: dict) -> "Certification":
        """The summary of certified `rows` (a resumable state's, or a report's) under `config` (SmoothingConfig's
        fields, as a report's `config` or a state holds them); `to_dict()` has `summary` and `rows` only."""
        res = C.CertifyResult(config=dict(config), rows=list(rows))
        return cls({"summary": res.summary(), "rows": res.rows}, res)

    def certified_accuracy(self, radius: float) -> float:
        return self.result.certified_accuracy(radius)

    def to_dict(self) -> dict:
        return self.data

    def to_tsv(self) -> str:
        return self.result.to_tsv()

    def to_markdown(self) -> str:
        return to_markdown(self.data)

    def save(self, path: str | Path) -> None:
        """Write the report by suffix, atomically: .json (the JSON report), .md (its Markdown) or .tsv (one row per
        sample, locuslab/smoothing's columns)."""
        path = Path(path)
        kinds = {".json": lambda: json.dumps(self.data, indent=2, sort_keys=True), ".md": self.to_markdown,
                 ".tsv": self.to_tsv}
        if path.suffix.lower() not in kinds:
            raise InputError(f"'{path}': a certification is saved as .json, .md or .tsv")
        text = kinds[path.suffix.lower()]()
        atomic_write(path, lambda tmp: Path(tmp).write_text(text))

    def _repr_markdown_(self) -> str:
        return self.to_markdown()

    def __repr__(self) -> str:
        s = self.summary
        radii = ", ".join(f"{r}: {100 * v:.1f}%" for r, v in s["certified_accuracy"].items())
        return f"Certification(n={s['n']}, sigma={s['sigma']:g}, {s['method']}, certified accuracy at radius {radii})"


def certify_run(patched: torch.nn.Module, ds: hdata.Dataset, cfg: C.SmoothingConfig, device: torch.device, *,
                n_classes: int, model_name: str, model_sha: str | None, max_samples: int | None = None,
                progress: Any = None, done: list[dict] | None = None, keep: Callable[[dict], None] | None = None,
                deterministic: bool = False, world: D.World | None = None) -> Certification | None:
    """Certify `max_samples` seeded stratified samples of `ds` (all without it) with `cfg`; `done` rows (a resumed
    run) are kept, `keep(row)` sees each new one. Returns the report. Callers check the memory first
    (`check_memory`), before any other work. With the `world` of a torchrun launch each process certifies every
    size-th sample (sample i on rank i mod size: costs vary by sample, so neighbours are spread), rank 0 gathers the
    rows and returns the report, the other ranks None; a sample's noise is seeded by its position, so the rows are
    those of one process."""
    ds = hdata.samples(ds, None, max_samples, cfg.seed)
    shard = world is not None and world.active
    positions = D.shard(len(ds), 1, world).tolist() if shard else None
    res = C.certify(patched, hdata.to_float(ds.images), ds.labels, cfg, n_classes, device, progress,
                    done=list(done or []), on_row=keep, positions=positions)
    if shard:
        parts = D.gather(res.rows, world)
        if parts is None:
            return None
        res = C.CertifyResult(config=res.config, rows=sorted((r for p in parts for r in p), key=lambda r: r["idx"]))
    rep = {"schema": "harden.certify-report/1", "harden_version": __version__, "checkpoint": model_name,
           "checkpoint_sha256": model_sha, "data": R.data_record(ds, []),
           "threat_model": f"certified: L2 radius of the smoothed model (σ = {cfg.sigma:g}), with probability "
                           f"{1 - cfg.alpha:g} over the noise", "summary": res.summary(), "rows": res.rows,
           "environment": R.environment(str(device), cfg.seed, deterministic),
           **({"processes": world.size} if shard else {})}
    return Certification(rep, res)


def state_store(ds: hdata.Dataset, cfg: C.SmoothingConfig, device: torch.device, world: D.World | None,
                model_sha: str | None, folder: Path | None, resume: bool, spec: dict | None = None,
                beside: str | None = None) -> tuple[EvalStore, list[dict]]:
    """A certification's resumable state in `folder` (None: kept in memory only, nothing to resume; one file per
    process of a sharded run), named by a fingerprint of the model, the selected samples and the settings, and the
    rows it already holds (`resume`); `beside`: the outputs it is kept beside too (the command line's)."""
    rules = {"stops": C.STOPS, "reach_z": C.REACH_Z, "cap_share": C.CAP_SHARE, "reach": "sequence"} \
        if cfg.sequential else {}  # a rule change is another run
    fp = fingerprint({"model": model_sha, "data": ds.fingerprint(), "certify": asdict(cfg), "device": device.type,
                      "input": spec, **rules})  # spec: the input's normalisation (--mean/--std too)
    suffix = D.state_suffix(world) if world is not None else ""
    state = folder / f".harden-certify-{fp[:16]}{suffix}.partial" if folder is not None else None
    store = EvalStore(state, fp, resume, what="certification", others=".harden-certify-*.partial", beside=beside)
    return store, list((store.get("rows") or {}).get("rows", []))


def keeper(store: EvalStore, rows: list[dict], cfg: C.SmoothingConfig) -> Callable[[dict], None]:
    """`certify_run`'s `keep`: each certified row added to `rows` and to the state (with the settings, so that a
    reader can summarise a partial state)."""
    def keep(row: dict) -> None:
        rows.append(row)
        store.put("rows", {"rows": list(rows), "config": asdict(cfg)})
    return keep


def stopped(store: EvalStore, rows: list, again: str, keep: str = "") -> str:
    """Interrupted: the certified rows saved for a resume, said in a line (`again`: how to go on; `keep`: how to
    make a run resumable that kept nothing)."""
    store.flush()
    if not rows:
        return "interrupted before the first sample was certified: nothing to resume"
    if store.path is None:
        return f"interrupted; no progress saved ({keep})"
    return f"interrupted: {len(rows)} samples saved to '{store.path}'; {again}"


def check_memory(cfg: C.SmoothingConfig, shape, flag: str = "--batch-size") -> None:
    """A batch of noisy copies of one image (the noise, the noisy input, the model's first activations) must fit."""
    V.check_batch_memory(min(cfg.batch_size, max(cfg.n0, cfg.n)), shape, 3, flag)


def summary_line(s: dict) -> str:
    """The certification in a line (the command's stderr)."""
    d = s["draws_per_sample"]
    return (f"{s['n']} samples, σ {s['sigma']:g}, {method_line(s)}, α {s['alpha']:g}: smoothed clean "
            f"{100 * s['clean_accuracy_smoothed']:.1f}%, abstained {100 * s['abstention_rate']:.1f}%; certified at "
            "radius " + ", ".join(f"{r}: {100 * v:.1f}%" for r, v in s["certified_accuracy"].items())
            + f" (largest radius N allows: {s['max_certifiable_radius']:g}); noisy forwards per sample: "
            f"mean {d['mean']:,.0f}, median {d['median']:,}, max {d['max']:,}")


def method_line(s: dict) -> str:
    if s.get("method") == "sequential":
        return f"sequential CERTIFY up to radius {s['max_radius']:g} (cap N {s['N']:,})"
    return f"N {s['N']:,}"


def stops_text(s: dict) -> str:
    """Why sequential samples stopped, e.g. ' Stopped: 41 at the largest radius, 2 next radius out of reach.'"""
    if not s.get("stops") or s.get("method") != "sequential":
        return ""
    names = {"radius": "at the largest radius", "abstain": "abstained", "decided": "decided between radii",
             "reach": f"next radius out of reach (z {s['out_of_reach_z']:g})", "cap": "at the cap"}
    return " Stopped: " + ", ".join(f"{k} {names[w]}" for w, k in s["stops"].items() if k) + "."


def to_markdown(rep: dict) -> str:
    s = rep["summary"]
    d = s["draws_per_sample"]
    sha = f" (sha256 `{rep['checkpoint_sha256'][:16]}…`)" if rep.get("checkpoint_sha256") else ""
    lines = ["## harden certify report", "", f"Model `{Path(rep['checkpoint']).name}`{sha}, data "
             f"`{rep['data']['source']}` ({s['n']} samples).", "",
             f"Threat model: {rep['threat_model']}. {method_line(s)}, n0 {s['n0']}, α {s['alpha']}, seed "
             f"{s['seed']}; bound: {s['bound']}; largest certifiable radius with "
             f"this N: {s['max_certifiable_radius']}.", "",
             f"Noisy forwards per sample (selection included): mean {d['mean']}, median {d['median']}, "
             f"max {d['max']}." + stops_text(s), "",
             f"Smoothed clean accuracy {100 * s['clean_accuracy_smoothed']:.1f}%, abstention "
             f"{100 * s['abstention_rate']:.1f}%.", "", "| radius | certified accuracy | 95% interval (Wilson) |",
             "|---|---|---|"]
    ci = s.get("certified_accuracy_ci95", {})
    span = {r: f"{100 * lo:.1f}–{100 * hi:.1f}%" for r, (lo, hi) in ci.items()}
    lines += [f"| {r} | {100 * v:.1f}% | {span.get(r, '–')} |" for r, v in s["certified_accuracy"].items()]
    return "\n".join(lines) + "\n"
