"""Robustness evaluation: threat models, per-sample worst case, correct-by-base subset, checks.

Threat models (named in every result):
  whitebox  attacks computed on the evaluated model end to end (patches included)
  adaptive  white-box BPDA: the same attacks with every patch that may mask gradients (a pre-filter, a
            denoising block) replaced by the identity in the backward pass; run on what `whitebox` left
  surrogate transfer from a surrogate the user gives (e.g. an adversarially fine-tuned copy of the base):
            attacks computed on it, scored on the patched model; run on what `whitebox` left
  transfer  attacks computed on the base, scored on the patched model (the fixer paper's setting)
  blackbox  Square (query attack) on the evaluated model
Within one threat model each attack runs only on samples still unbroken (AutoAttack style), so
its final mask is the per-sample worst case over its attacks; gradient attacks run first, then
FGSM, then Square, so that a single-step or query attack breaking what iterative attacks left is
visible as a warning. Every broken sample is credited to the first attack that broke it, in the order
whitebox, adaptive, surrogate, transfer, blackbox (`broken_by`): the counts sum to clean − worst case.

Transfer examples depend on the base alone: they are computed for fixed batches of the whole set
(`TransferBank`), only where some sample of a batch needs one, so they do not depend on the
evaluated model. With a `BaseCache` they and the base's own rows are kept on disk and reused by
every later evaluation of a model on the same base, data and attack settings.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .. import attacks as A
from .. import data as hdata
from ..errors import InputError, RunError
from ..io import integrity as I
from ..io.checkpoint import tensor_digest, write_torch
from ..io.resume import EvalStore, fingerprint
from ..options.defaults import EVAL
from ..patches import PatchedModel
from ..patches.attach import Disabled, StraightThrough
from ..reports.results import THREATS, AttackRow, EvalResult, ModelResult, ThreatResult
from ..runtime import distributed as D
from ..stats import wilson
from ..version import __version__

WHITEBOX_KNOWLEDGE = ("whitebox", "adaptive")  # attacks that know the patched model: the `robust` figure
LAST_KINDS = ("single-step", "query")  # run after the iterative attacks (on what they left)
Progress = Callable[[str, int, int, dict], None]


@dataclass
class EvalConfig:
    attacks: list[str] = field(default_factory=lambda: EVAL["attack"].split(","))
    eps: float = A.parse_eps(EVAL["eps"])
    norm: str = EVAL["norm"]
    steps: int | None = None  # None: each attack's reference budget
    restarts: int = EVAL["restarts"]
    queries: int = EVAL["queries"]
    threats: tuple[str, ...] = THREATS  # every threat model: what EVAL["threat"] asks for
    batch_size: int = EVAL["batch_size"]
    seed: int = EVAL["seed"]
    eps_sweep: list[float] | None = None
    checks: bool = True
    check_samples: int | None = None  # samples the costlier checks use; None: check_sample_count(evaluated samples)
    smooth_grad: float | None = None  # parametric-softplus backward through ReLUs for gradient attacks
    overrides: dict = field(default_factory=dict)  # {attack: {field: value}} fixed by a suite (attacks.SUITE_SETTINGS)
    precision: str = EVAL["precision"]  # of the attacks' forward/backward passes (autocast); examples are always scored in fp32
    min_batch_size: int = 1  # out of memory: the batch halves down to this, then the run fails (exit 3)
    oom: list = field(default_factory=list)  # what out-of-memory halvings happened (recorded in the report)


PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class Autocast(nn.Module):
    """A view of a model whose forward runs under autocast at a lower precision (logits returned in fp32): what the
    attacks of `--precision bf16|fp16` differentiate. Low-precision gradients can weaken attacks."""

    def __init__(self, model: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.model, self.dtype = model, dtype

    def train(self, mode: bool = True) -> "Autocast":
        self.training = False
        self.model.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, dtype=self.dtype):
            out = self.model(x)
        return out.float()


def attack_view(model: nn.Module, cfg: "EvalConfig") -> nn.Module:
    if cfg.precision not in PRECISIONS:
        raise InputError(f"--precision must be one of {', '.join(PRECISIONS)}, got '{cfg.precision}'")
    dtype = PRECISIONS[cfg.precision]
    return model if dtype is None else Autocast(model, dtype)


def halve_on_oom(cfg: EvalConfig, bs: int, where: str) -> int:
    """The batch size after an out-of-memory error at `bs`: half of it, logged and recorded in `cfg.oom`; below
    `cfg.min_batch_size`, a RunError (exit 3) that says what to do."""
    import sys

    if bs // 2 < max(1, cfg.min_batch_size):
        raise RunError(f"out of memory in {where} even at batch size {bs}: use a smaller model input, another "
                       "device (--device), or free memory")
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    print(f"warning: out of memory in {where} at batch size {bs}: going on with {bs // 2}", file=sys.stderr)
    cfg.oom.append({"where": where, "from": bs, "to": bs // 2})
    return bs // 2


def halving(lo: int, hi: int, bs: int, cfg: EvalConfig | None, where: str,
            fn: Callable[[slice], torch.Tensor]) -> tuple[list[torch.Tensor], int]:
    """`fn` over slices of [lo, hi) of `bs` items; out of memory halves `bs` (`halve_on_oom`) and retries the slice
    (without `cfg`, the error propagates). Returns the results and the batch size it ended with."""
    if bs < 1:
        raise InputError(f"batch size must be at least 1, got {bs}")
    out, i = [], lo
    while i < hi:
        sl = slice(i, min(hi, i + bs))
        try:
            out.append(fn(sl))
        except torch.OutOfMemoryError:
            if cfg is None:
                raise
            bs = halve_on_oom(cfg, bs, where)
            continue
        i = sl.stop
    return out, bs


def find_batch_size(model: nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device,
                    cap: int | None = None) -> int:
    """`--batch-size auto`: the largest power of two (up to `cap`: 4096 on CUDA, 256 elsewhere, where memory is not
    the limit) whose forward and backward pass, as an attack step does it, fits in memory."""
    cap = cap or (4096 if device.type == "cuda" else 256)
    best, bs = None, 1
    while bs <= cap:
        idx = torch.arange(bs) % len(x)
        try:
            xb = x[idx].to(device).requires_grad_(True)
            loss = F.cross_entropy(model(xb), y[idx].to(device))
            torch.autograd.grad(loss, xb)
        except torch.OutOfMemoryError:
            break
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()
        best, bs = bs, bs * 2
    if best is None:
        raise RunError("--batch-size auto: out of memory even for one image: use another device (--device) or a "
                       "smaller input")
    return best


def acc(mask: torch.Tensor) -> dict:
    n, k = int(mask.numel()), int(mask.sum())
    lo, hi = wilson(k, n)
    return {"accuracy": k / n if n else 0.0, "correct": k, "n": n, "ci95": [lo, hi]}


def finite_logits(logits: torch.Tensor, what: str = "inputs") -> torch.Tensor:
    """Logits that are NaN or inf make every accuracy meaningless (argmax of NaN can land on the label):
    an error (exit 3), never a "robust" sample."""
    ok = torch.isfinite(logits).all(1) if logits.ndim == 2 else torch.isfinite(logits)
    if not bool(ok.all()):
        raise RunError(f"the model's outputs are NaN or inf on {int((~ok).sum())} of {len(ok)} {what}: "
                       "its weights or patches are damaged, or it overflows; no accuracy can be reported")
    return logits


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int, device: torch.device,
            cfg: EvalConfig | None = None) -> torch.Tensor:
    """Logits in batches; with `cfg`, an out-of-memory error halves the batch (`halve_on_oom`) and goes on."""
    out, _ = halving(0, len(x), batch_size, cfg, "prediction", lambda sl: model(x[sl].to(device)).float().cpu())
    return finite_logits(torch.cat(out)) if out else torch.empty(0)


def _spec(cfg: EvalConfig, name: str, n_classes: int, eps: float | None = None,
          steps: int | None = None) -> A.AttackSpec:
    kind = A.info(name).kind
    s = steps if steps is not None else (cfg.steps if kind not in LAST_KINDS else None)
    fixed = dict(cfg.overrides.get(name, {}))
    return A.AttackSpec(name=name, eps=cfg.eps if eps is None else eps, norm=cfg.norm, steps=s,
                        restarts=max(cfg.restarts, fixed.pop("restarts", 1)), queries=cfg.queries, seed=cfg.seed,
                        n_classes=n_classes, smooth_grad=cfg.smooth_grad if kind != "query" else None, **fixed)


def ordered(names: list[str]) -> list[str]:
    kinds = {n: A.info(n).kind for n in names}
    last = [n for k in LAST_KINDS for n in names if kinds[n] == k]
    return [n for n in names if n not in last] + last


class TransferBank:
    """Adversarial examples computed on `source`, per attack, for fixed batches of the whole set.

    Batch k always holds samples [k*B, (k+1)*B) and each attack call is seeded, so an example does
    not depend on which model asked for it or in which order. A batch is computed the first time
    any of its samples is needed; with `directory` it is saved there (and read back by later runs),
    without one only the batches still ahead of the chain are kept in memory."""

    def __init__(self, source: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int,
                 device: torch.device, directory: Path | None = None, cfg: "EvalConfig | None" = None,
                 key: str = "") -> None:
        """`key`: the `BaseCache`'s key, which (with the attack and batch) seals each file saved in `directory`."""
        self.source, self.x, self.y, self.bs, self.device = source, x, y, batch_size, device
        self.cfg, self.key = cfg, key
        self.step = batch_size  # attack sub-batch: halves on out of memory (the bank's layout stays)
        self.directory = directory
        self._mem: dict[tuple[str, int], torch.Tensor] = {}
        self._attacks: dict[str, Callable] = {}
        self.computed = self.reused = 0  # batches

    def _file(self, key: str, k: int) -> Path:
        return self.directory / f"transfer-{key.replace('/', '_').replace(':', '_')}-{k:06d}.safetensors"

    def _batch(self, key: str, spec: A.AttackSpec, k: int) -> torch.Tensor:
        if (key, k) in self._mem:
            return self._mem[(key, k)]
        f = self._file(key, k) if self.directory is not None else None
        seal = f"{self.key}|{key}|{k}"  # a file renamed from another batch or attack does not match
        if f is not None and f.exists():
            from ..io import integrity as I

            adv = I.read_safetensors(f, seal, "--base-cache entry", CACHE_TODO).get("adv")
            if adv is None or len(adv) != min((k + 1) * self.bs, len(self.y)) - k * self.bs:
                raise I.refuse(f, "--base-cache entry", "is not a file harden wrote", CACHE_TODO)
            self.reused += 1
        else:
            if key not in self._attacks:
                self._attacks[key] = A.build(attack_view(self.source, self.cfg or EvalConfig()), spec)
            adv = self._attack_range(key, k * self.bs, min((k + 1) * self.bs, len(self.y)))
            self.computed += 1
            if f is not None:
                from ..io import integrity as I
                from ..io.checkpoint import write_safetensors

                tensors = {"adv": adv.contiguous()}
                write_safetensors(f, tensors, I.safetensors_metadata(seal, tensors))
        self._mem[(key, k)] = adv
        return adv

    def _attack_range(self, key: str, lo: int, hi: int) -> torch.Tensor:
        parts, self.step = halving(lo, hi, self.step, self.cfg, f"transfer examples {key}",
                                   lambda sl: self._attacks[key](self.x[sl].to(self.device),
                                                                 self.y[sl].to(self.device)).detach().cpu())
        return torch.cat(parts)

    def get(self, key: str, spec: A.AttackSpec, idx: torch.Tensor) -> torch.Tensor:
        """The examples of samples `idx` (ascending, as a chain walks them) under attack `key`."""
        ks = idx // self.bs
        lo = int(ks.min())
        for old in [m for m in self._mem if m[0] == key and m[1] < lo]:
            del self._mem[old]  # a chain walks its samples in order: earlier batches are done with
        out = [self._batch(key, spec, k)[idx[ks == k] - k * self.bs] for k in torch.unique(ks).tolist()]
        return torch.cat(out).to(self.device)


CACHE_TODO = "delete it (the cache entry is computed again) or run without --base-cache"


class BaseCache:
    """The base's share of an evaluation, kept in a folder and reused across evaluations.

    The key covers the base's tensors, its logits on the first batch (so preprocessing counts too),
    the data, every attack setting, the device and the harden version: any change gives a new
    sub-folder, never a stale answer. Each file is sealed by a digest over its content and the key (`integrity`):
    an edited, damaged or moved file is an InputError, never numbers used unchecked."""

    def __init__(self, root: Path, base: nn.Module, base_tensors: dict[str, torch.Tensor], x: torch.Tensor,
                 data_fingerprint: str, cfg: EvalConfig, device: torch.device) -> None:
        probe = predict(base, x[:cfg.batch_size], cfg.batch_size, device)
        self.key = fingerprint({
            "base": tensor_digest(base_tensors), "probe": tensor_digest({"logits": probe}),
            "data": data_fingerprint, "device": device.type, "version": __version__, "apgd": "stop-early",
            "eval": {k: getattr(cfg, k) for k in ("attacks", "eps", "norm", "steps", "restarts", "queries",
                                                  "threats", "batch_size", "seed", "smooth_grad", "overrides",
                                                  "precision")}})
        self.dir = Path(root) / self.key[:16]
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise InputError(f"--base-cache: cannot create '{self.dir}' ({e.strerror or e})") from None
        self.reused_base = False

    def load_base(self) -> dict | None:
        """The base's results saved by an earlier evaluation, checked against their digest; None if absent."""
        f = self.dir / "base.pt"
        if not f.exists():
            return None
        try:
            saved = torch.load(f, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - a damaged file comes in many forms
            why = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
            raise I.refuse(f, "--base-cache entry", f"cannot be read ({why})", CACHE_TODO) from None
        res = I.check(saved, f, self.key, "--base-cache entry", CACHE_TODO).get("result")
        if not isinstance(res, dict):
            raise I.refuse(f, "--base-cache entry", "is not a file harden wrote", CACHE_TODO)
        self.reused_base = True
        return res

    def load_result(self) -> ModelResult | None:
        """`load_base` typed: the saved dict (the format every version writes) converted here, at the boundary; a
        sealed dict of another shape is refused as one harden did not write."""
        saved = self.load_base()
        try:
            return None if saved is None else ModelResult.from_state(saved)
        except (KeyError, TypeError, AttributeError):
            raise I.refuse(self.dir / "base.pt", "--base-cache entry", "is not a file harden wrote",
                           CACHE_TODO) from None

    def save_base(self, res: dict) -> None:
        write_torch(self.dir / "base.pt", I.seal({"fingerprint": self.key, "result": res}, self.key))

    def record(self, bank: TransferBank | None) -> dict:
        return {"dir": str(self.dir), "key": self.key, "base_rows_reused": self.reused_base,
                "transfer_batches_reused": bank.reused if bank else 0,
                "transfer_batches_computed": bank.computed if bank else 0}


@dataclass
class ChainResult:
    threat: str
    rows: list[AttackRow]
    robust: torch.Tensor  # per-sample: still correct after every attack of the chain
    violations: int
    broken_by: torch.Tensor | None = None  # per-sample: index of the attack (row) that broke it, -1 for none


def _scores_as_it_attacks(source: nn.Module, target: nn.Module, cfg: EvalConfig, spec: A.AttackSpec,
                          x: torch.Tensor, device: torch.device) -> bool:
    """Whether APGD may stop on a sample the moment it is misclassified and keep the verdict: the attacker sees the
    very logits the chain scores (the model itself, or its BPDA view, whose forward is the model's), at full
    precision, with no EOT, and the model is deterministic and answers each sample alone (a model that draws noise or
    uses batch statistics would see its batch change as samples leave)."""
    same = source is target or (isinstance(source, StraightThrough) and source.patched is target)
    if not same or spec.eot != 1 or attack_view(source, cfg) is not source or len(x) == 0:
        return False
    _, same, alone = answers_alone(target, x[:8], 8, device, atol=1e-5)
    return same and alone


def answers_alone(model: nn.Module, xs: torch.Tensor, batch_size: int, device: torch.device,
                  atol: float = 1e-4) -> tuple[torch.Tensor, bool, bool]:
    """(logits; the same logits twice, to the bit; the same within rtol 1e-4 / `atol` in batches of 1, or of 7 for
    more than 64 samples): whether the model is deterministic and answers a sample regardless of its batch."""
    l1 = predict(model, xs, batch_size, device)
    l2 = predict(model, xs, batch_size, device)
    l3 = predict(model, xs, 1 if len(xs) <= 64 else 7, device)
    return l1, torch.equal(l1, l2), bool(torch.allclose(l1, l3, atol=atol, rtol=1e-4))


def _attacks(spec: A.AttackSpec, source: nn.Module, target: nn.Module, cfg: EvalConfig, x: torch.Tensor,
             device: torch.device):
    """(spec, attack, recheck): APGD drops a sample once broken where that keeps the verdict (the same answer,
    sooner); then `recheck`, the attack without the stop, takes on any sample it called broken that the score calls
    correct (a rounding difference at the boundary). Other attacks: (spec, attack, None)."""
    view = attack_view(source, cfg)
    if spec.name in A.STOPS_EARLY and _scores_as_it_attacks(source, target, cfg, spec, x, device):
        fast = replace(spec, stop_early=True)
        return fast, A.build(view, fast), A.build(view, spec)
    return spec, A.build(view, spec), None


def _recheck(attack, target: nn.Module, xb: torch.Tensor, yb: torch.Tensor, adv: torch.Tensor,
             ok: torch.Tensor) -> torch.Tensor:
    """The scores of a block after an early-stopping APGD, with the samples it called broken but the score calls
    correct attacked again without the stop (in place in `adv`)."""
    moved = (adv != xb).flatten(1).any(1).cpu()
    again = torch.nonzero(ok & moved).flatten()
    if len(again) == 0:
        return ok
    d = again.to(xb.device)
    adv[d] = A.project(xb[d], attack(xb[d], yb[d]), attack.spec.eps, attack.spec.norm)
    with torch.no_grad():
        ok[again] = (finite_logits(target(adv[d]), "adversarial examples").argmax(1) == yb[d]).cpu()
    return ok


def run_chain(threat: str, source: nn.Module, target: nn.Module, x: torch.Tensor, y: torch.Tensor,
              start: torch.Tensor, specs: list[A.AttackSpec], cfg: EvalConfig, device: torch.device,
              progress: Progress | None = None, label: str = "", store: EvalStore | None = None,
              bank: TransferBank | None = None) -> ChainResult:
    """Attacks computed on `source`, scored on `target`, each only on the still-robust samples.

    With a `store`, progress is recorded per batch and a resumed run skips what was done; with a
    `bank` (whose source is `source`), the examples come from it instead of a fresh attack."""
    robust = start.clone()
    rows, violations = [], 0
    broken_by = torch.full((len(y),), -1, dtype=torch.int16)
    for i, spec in enumerate(specs):
        key = f"{label}{threat}/{i}:{spec.label}"
        saved = store.get(key) if store is not None else None
        before = robust.clone()
        if saved is not None and saved["row"] is not None:  # finished before the interruption
            robust, violations = saved["robust"].clone(), violations + saved["violations"]
            broken_by[before & ~robust] = i
            rows.append(AttackRow.from_state(saved["row"]))
            continue
        spec, attack, recheck = _attacks(spec, source, target, cfg, x, device) if bank is None else (spec, None, None)
        attacked = int(before.sum())
        if saved is not None and "k" in saved:  # resumed inside this attack, after block k
            robust, k0 = saved["robust"].clone(), saved["k"]
            broken, spent, viol = saved["broken"], saved["seconds"], saved["violations"]
        else:
            k0, broken, spent, viol = 0, 0, 0.0, 0
        t0 = time.time()
        # Fixed blocks of the sample order (block k = samples [kB, (k+1)B), the still-robust ones attacked together):
        # what an attack does to a sample depends on its block alone, so shards made of whole blocks (several
        # processes) give the same answers as one process.
        B = cfg.batch_size
        done = int(before[:k0 * B].sum())
        bs = max(1, min([B, *(o["to"] for o in cfg.oom)]))
        if progress:  # the phase starts now (a bar, a heartbeat that names it), not at its first batch's end
            progress(f"{label}{threat} {spec.label}", done, attacked, {})
        for k in range(k0, -(-len(y) // B)):
            block = torch.nonzero(before[k * B:(k + 1) * B]).flatten() + k * B
            s = 0
            while s < len(block):
                bi = block[s:s + bs]
                xb, yb = x[bi].to(device), y[bi].to(device)
                try:
                    adv = attack(xb, yb) if bank is None else bank.get(f"{i}:{spec.label}", spec, bi)
                    # Check the returned examples: inside [0, 1] and the eps-ball, else project and count.
                    tol = 1e-6 + spec.eps * 1e-5
                    bad = (A.perturbation_norm(xb, adv, spec.norm) > spec.eps + tol) | \
                          (adv.flatten(1).min(1).values < -tol) | (adv.flatten(1).max(1).values > 1 + tol)
                    if bool(bad.any()):
                        adv = A.project(xb, adv, spec.eps, spec.norm)
                    with torch.no_grad():
                        ok = finite_logits(target(adv), "adversarial examples").argmax(1).cpu() == yb.cpu()
                    if recheck is not None:
                        ok = _recheck(recheck, target, xb, yb, adv, ok)
                except torch.OutOfMemoryError:
                    bs = halve_on_oom(cfg, bs, f"{label}{threat} {spec.label}")
                    continue
                s += len(bi)
                done += len(bi)
                viol += int(bad.sum())
                robust[bi] = ok
                broken += int((~ok).sum())
                if progress:
                    progress(f"{label}{threat} {spec.label}", done, attacked, {})
            if store is not None and len(block):
                store.put(key, {"robust": robust.clone(), "k": k + 1, "broken": broken,
                                "seconds": spent + time.time() - t0, "violations": viol, "row": None})
        seconds = spent + time.time() - t0
        violations += viol
        row = AttackRow(spec.label, spec.record(), attacked, broken, acc(robust), seconds,
                        attacked / seconds if seconds > 0 and attacked else None, robust.clone())
        rows.append(row)
        broken_by[before & ~robust] = i
        if store is not None:
            store.put(key, {"robust": robust.clone(), "violations": viol, "row": row.to_state()}, force=True)
    return ChainResult(threat, rows, robust, violations, broken_by)


def evaluate_model(name: str, model: nn.Module, base: nn.Module | None, x: torch.Tensor, y: torch.Tensor,
                   cfg: EvalConfig, n_classes: int, device: torch.device,
                   progress: Progress | None = None, store: EvalStore | None = None,
                   bank: TransferBank | None = None, surrogate: nn.Module | None = None) -> ModelResult:
    """All threat models for one model. `base` is None when the model is the base itself; `bank`
    holds (or computes) the transfer examples of `base`; `surrogate` is a model to transfer from."""
    logits = predict(model, x, cfg.batch_size, device, cfg)
    clean = logits.argmax(1) == y
    names = ordered(cfg.attacks)
    grad_specs = [_spec(cfg, n, n_classes) for n in names if A.info(n).kind != "query"]
    query_specs = [_spec(cfg, n, n_classes) for n in names if A.info(n).kind == "query"]
    chains: dict[str, ChainResult] = {}
    skipped: dict[str, str] = {}

    def chain(threat: str, source: nn.Module, start: torch.Tensor, specs: list, bank_=None) -> None:
        chains[threat] = run_chain(threat, source, model, x, y, start, specs, cfg, device, progress, f"{name} ",
                                   store, bank_)
    if "whitebox" in cfg.threats and grad_specs:
        chain("whitebox", model, clean, grad_specs)
    after_wb = chains["whitebox"].robust if "whitebox" in chains else clean
    if "adaptive" in cfg.threats and grad_specs and base is not None:
        maskable = model.maskable if isinstance(model, PatchedModel) else []
        if maskable:
            chain("adaptive", StraightThrough(model), after_wb, grad_specs)
        else:
            skipped["adaptive"] = "no patch that could mask gradients (pre-filter, denoising block): BPDA would " \
                                  "repeat the white-box attacks"
    if "surrogate" in cfg.threats and grad_specs and (base is not None or surrogate is not None):
        if surrogate is not None:
            chain("surrogate", surrogate, after_wb, grad_specs)
        else:
            skipped["surrogate"] = "no surrogate model given (--surrogate)"
    if "transfer" in cfg.threats and grad_specs and base is not None:
        chain("transfer", base, clean, grad_specs, bank)
    if "blackbox" in cfg.threats and query_specs:
        chain("blackbox", model, clean, query_specs)
    worst = clean.clone()
    for c in chains.values():
        worst &= c.robust
    counts, per_sample = provenance(clean, chains)
    threats = {t: ThreatResult(c.rows, acc(c.robust), c.violations, mask=c.robust) for t, c in chains.items()}
    result = ModelResult(acc(clean), threats, acc(worst), counts, per_sample, per_class(y, clean, worst, n_classes),
                         clean_mask=clean, worst_mask=worst, threats_skipped=skipped or None)
    wb = [chains[t].robust for t in WHITEBOX_KNOWLEDGE if t in chains]
    if wb:
        m = clean.clone()
        for r in wb:
            m &= r
        result.worst_whitebox, result.worst_whitebox_mask = acc(m), m
    return result


def provenance(clean: torch.Tensor, chains: dict[str, ChainResult]) -> tuple[dict, list[str | None]]:
    """Which attack broke each sample: the first, in the order of THREATS and then of each chain's attacks.
    Returns the counts (`threat/attack` -> n, plus `clean_error` and `robust`) and the per-sample labels (None for
    a sample no attack broke, "clean_error" for one misclassified without attack)."""
    labels: list[str | None] = ["clean_error" if not bool(c) else None for c in clean]
    for t in THREATS:
        c = chains.get(t)
        if c is None or c.broken_by is None:
            continue
        for i in torch.nonzero(c.broken_by >= 0).flatten().tolist():
            if labels[i] is None:
                labels[i] = f"{t}/{c.rows[int(c.broken_by[i])].attack}"
    return count_labels(labels), labels


def count_labels(labels: list[str | None]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for lab in labels:
        counts[lab or "robust"] = counts.get(lab or "robust", 0) + 1
    return counts


def per_class(y: torch.Tensor, clean: torch.Tensor, worst: torch.Tensor, n_classes: int) -> list[dict]:
    out = []
    for c in range(n_classes):
        m = y == c
        if int(m.sum()):
            out.append({"class": c, "n": int(m.sum()), "clean": round(float(clean[m].float().mean()), 4),
                        "worst_case": round(float(worst[m].float().mean()), 4)})
    return out


def subset_metrics(res: ModelResult, mask: torch.Tensor) -> dict:
    return {k: acc(v[mask]) for k, v in res.masks().items()}


def evaluate(patched: PatchedModel, ds: hdata.Dataset, cfg: EvalConfig, device: torch.device,
             has_patches: bool, progress: Progress | None = None, store: EvalStore | None = None,
             reference: nn.Module | None = None, base_cache: Path | None = None,
             surrogate: nn.Module | None = None, world=None) -> EvalResult | None:
    """Evaluate the base (and the patched model, when it has patches) on `ds`.

    `reference` is the base to compare with and to transfer from when the patched model's own base
    was fine-tuned (full fine-tuning methods): the parent checkpoint. `base_cache` is a folder where
    the base's rows and transfer examples are kept for later evaluations on the same base. With a `world`
    of several processes (`distributed.World`), each evaluates its shard and rank 0 returns the whole result
    (the other ranks return None)."""
    x, y = hdata.to_float(ds.images), ds.labels
    n_classes = int(patched(x[:1].to(device)).shape[1])
    base = reference if reference is not None else Disabled(patched)
    cache = bank = None
    if world is not None and world.active:
        if base_cache is not None:
            raise InputError("--base-cache is not supported with several processes yet: run without it")
        idx = D.shard(len(y), cfg.batch_size, world)
        part = _models(patched, base, x[idx], y[idx], cfg, n_classes, device, has_patches, progress, store,
                       None, surrogate)[0] if len(idx) else None
        parts = D.gather((idx, part, list(cfg.oom)), world)
        if not world.main:
            return None
        models = merge_shards([(i, m) for i, m, _ in parts if m is not None], y, n_classes)
        cfg.oom[:] = [o for _, _, oom in parts for o in oom]
    else:
        if base_cache is not None:
            # the bare network's tensors either way, so a parent checkpoint and a patched file's base match
            tensors = getattr(reference, "net", reference).state_dict() if reference is not None \
                else patched.base_state_dict()
            cache = BaseCache(base_cache, base, tensors, x, ds.fingerprint(), cfg, device)
        models, bank = _models(patched, base, x, y, cfg, n_classes, device, has_patches, progress, store, cache,
                               surrogate)
    base_correct = models["base"].clean_mask
    for res in models.values():
        res.correct_by_base = subset_metrics(res, base_correct)
    primary = models["patched" if has_patches else "base"]
    primary_model = patched if has_patches else base
    if progress and cfg.checks:
        progress("sanity checks", 0, 1, {})
    checks = run_checks(primary_model, primary, x, y, cfg, n_classes, device) if cfg.checks else []
    if progress and cfg.checks:
        progress("sanity checks", 1, 1, {})
    sweep = eps_sweep(primary_model, x, y, cfg, n_classes, device, progress) if cfg.eps_sweep else None
    sweep_base = eps_sweep(base, x, y, cfg, n_classes, device, progress) if cfg.eps_sweep and has_patches else None
    if sweep is not None and cfg.checks:
        checks.append(_check_sweep(sweep, n_classes))
    if cfg.checks:
        checks += _check_adaptive(primary)
    return EvalResult(models, checks, sweep, sweep_base, len(y), n_classes,
                      cache.record(bank) if cache is not None else None, list(cfg.oom))


def _models(patched, base, x, y, cfg, n_classes, device, has_patches, progress, store, cache, surrogate):
    """Every threat model for the base and (with patches) the patched model: ({name: result}, transfer bank)."""
    models: dict[str, ModelResult] = {}
    cached = cache.load_result() if cache is not None else None
    if cached is not None:
        models["base"] = cached
    else:
        models["base"] = evaluate_model("base", base, None, x, y, cfg, n_classes, device, progress, store,
                                        surrogate=None if has_patches else surrogate)
        if cache is not None:
            cache.save_base(models["base"].to_state())
    bank = None
    if has_patches and "transfer" in cfg.threats:
        bank = TransferBank(base, x, y, cfg.batch_size, device, cache.dir if cache is not None else None, cfg,
                            cache.key if cache is not None else "")
    if has_patches:
        models["patched"] = evaluate_model("patched", patched, base, x, y, cfg, n_classes, device, progress, store,
                                           bank, surrogate)
    return models, bank


def merge_shards(parts: list[tuple[torch.Tensor, dict[str, ModelResult]]], y: torch.Tensor,
                 n_classes: int) -> dict[str, ModelResult]:
    """The models' results of several shards ((sample positions, {name: result}) each) as one result in the
    sample order: masks scattered back, attack rows summed (seconds: the slowest shard's), accuracies recomputed."""
    n = len(y)
    out = {}
    for name, m0 in parts[0][1].items():
        per = [(idx, models[name]) for idx, models in parts]

        def glob(get) -> torch.Tensor:
            g = torch.zeros(n, dtype=torch.bool)
            for idx, m in per:
                g[idx] = get(m)
            return g
        threats = {}
        for t, th0 in m0.threats.items():
            rows = []
            for i, r0 in enumerate(th0.attacks):
                rs = [m.threats[t].attacks[i] for _, m in per]
                after = glob(lambda m, t=t, i=i: m.threats[t].attacks[i].after)
                attacked, secs = sum(r.attacked for r in rs), max(r.seconds for r in rs)
                rows.append(AttackRow(r0.attack, r0.settings, attacked, sum(r.broken for r in rs), acc(after), secs,
                                      attacked / secs if secs > 0 and attacked else None, after))
            mask = glob(lambda m, t=t: m.threats[t].mask)
            threats[t] = ThreatResult(rows, acc(mask), sum(m.threats[t].eps_violations for _, m in per), mask=mask)
        labels: list[str | None] = [None] * n
        for idx, m in per:
            for j, lab in zip(idx.tolist(), m.per_sample_broken_by):
                labels[j] = lab
        clean, worst = glob(lambda m: m.clean_mask), glob(lambda m: m.worst_mask)
        res = ModelResult(acc(clean), threats, acc(worst), count_labels(labels), labels,
                          per_class(y, clean, worst, n_classes), clean_mask=clean, worst_mask=worst,
                          threats_skipped=m0.threats_skipped)
        if m0.worst_whitebox_mask is not None:
            res.worst_whitebox_mask = glob(lambda m: m.worst_whitebox_mask)
            res.worst_whitebox = acc(res.worst_whitebox_mask)
        out[name] = res
    return out


# ---------------------------------------------------------------- sanity checks


def _check(name: str, ok: bool | None, detail: str, hint: str) -> dict:
    status = "skip" if ok is None else ("pass" if ok else "warn")
    return {"name": name, "status": status, "detail": detail, "hint": hint if status == "warn" else ""}


LARGE_EPS_SAMPLES = 100  # the eps=0.5 check: every sample should fall, so a hundred tell


def check_sample_count(n: int) -> int:
    """Samples the sanity checks look at, by default: a quarter of the evaluation, at least 50 and at most 200 (never
    more than there are), so that the checks (the convergence one attacks them with twice the steps) cost a bounded
    share of a small evaluation and keep 200 samples' power on a reference-sized one."""
    return min(n, max(50, min(200, n // 4)))


def _first_iterative(cfg: EvalConfig) -> str | None:
    return next((n for n in ordered(cfg.attacks) if A.info(n).iterative), None)


def run_checks(model: nn.Module, res: ModelResult, x: torch.Tensor, y: torch.Tensor, cfg: EvalConfig,
               n_classes: int, device: torch.device) -> list[dict]:
    n = min(cfg.check_samples, len(y)) if cfg.check_samples else check_sample_count(len(y))
    g = torch.Generator().manual_seed(cfg.seed)
    sel = torch.randperm(len(y), generator=g)[:n]
    xs, ys = x[sel], y[sel]
    checks = _model_checks(model, res, x, xs, cfg, device)
    checks += _attack_order_checks(res)
    checks.append(_gradient_check(model, xs, ys, device))
    checks += _convergence_checks(model, res, sel, xs, ys, cfg, n_classes, device)
    return checks


def _model_checks(model: nn.Module, res: ModelResult, x: torch.Tensor, xs: torch.Tensor, cfg: EvalConfig,
                  device: torch.device) -> list[dict]:
    """1. eval mode, deterministic, batch-size independent; 2. logits, not probabilities; 3. inputs in [0, 1] and
    perturbations within eps."""
    n = len(xs)
    l1, same, bsi = answers_alone(model, xs, cfg.batch_size, device)
    checks = [_check("deterministic", same and bsi and not model.training,
                     f"same logits twice: {same}; batch-size independent: {bsi}; eval mode: {not model.training}",
                     "randomness or batch-dependent layers (BN in train mode) make attacks and numbers unreliable")]
    probs_like = bool((l1 >= 0).all() and (l1 <= 1).all() and torch.allclose(l1.sum(1), torch.ones(n), atol=1e-3))
    checks.append(_check("outputs_are_logits", not probs_like,
                         "outputs look like probabilities" if probs_like else "outputs are unnormalised scores",
                         "attacks on softmax outputs saturate and understate robustness: return logits"))
    in_range = bool(x.min() >= 0 and x.max() <= 1)
    viol = sum(t.eps_violations for t in res.threats.values())
    checks.append(_check("perturbations_within_eps", in_range and viol == 0,
                         f"inputs in [0,1]: {in_range}; returned examples outside eps or [0,1]: {viol} "
                         "(projected before scoring)",
                         "an attack returned examples outside the threat model; its numbers were recomputed "
                         "after projection"))
    return checks


def _attack_order_checks(res: ModelResult) -> list[dict]:
    """4. iterative attacks not weaker than FGSM / square not stronger than white-box / transfer vs white-box."""
    checks = []
    wb = res.threats.get("whitebox")
    if wb:
        fg = next((r for r in wb.attacks if A.info(r.attack).kind == "single-step"), None)
        has_iter = any(A.info(r.attack).iterative for r in wb.attacks)
        if fg and has_iter:
            left = fg.attacked
            checks.append(_check("iterative_not_weaker_than_fgsm", fg.broken == 0,
                                 f"FGSM broke {_seen(fg.broken, left)} of the samples the iterative attacks left",
                                 "single-step beat multi-step on these samples: a sign of gradient masking or of too "
                                 "small a budget (not proof of either); raise --steps and compare with Square"))
    masks = res.masks()
    if "blackbox" in masks and "whitebox" in masks:
        left = int(masks["whitebox"].sum())
        extra = int((masks["whitebox"] & ~masks["blackbox"]).sum())
        checks.append(_check("square_not_stronger_than_whitebox", extra == 0,
                             f"Square broke {_seen(extra, left)} of the samples the white-box attacks left "
                             f"(white-box {float(masks['whitebox'].float().mean()):.4f}, "
                             f"Square {float(masks['blackbox'].float().mean()):.4f})",
                             "a gradient-free attack beat the gradient attacks on these samples: a sign that the "
                             "gradients may mislead (gradient masking); the per-sample worst case counts them"))
    if "transfer" in masks and "whitebox" in masks:
        left = int(masks["whitebox"].sum())
        extra = int((masks["whitebox"] & ~masks["transfer"]).sum())
        checks.append(_check("transfer_not_stronger_than_whitebox", extra == 0,
                             f"transfer attacks broke {_seen(extra, left)} of the samples the white-box attacks left",
                             "attacking the base beat attacking the model itself on these samples: a sign that its "
                             "gradients may be masked (not a verdict); the per-sample worst case counts them"))
    return checks


def _gradient_check(model: nn.Module, xs: torch.Tensor, ys: torch.Tensor, device: torch.device) -> dict:
    """5. zero input-gradients."""
    n = len(ys)
    xg = xs.to(device).clone().requires_grad_(True)
    loss = F.cross_entropy(model(xg), ys.to(device), reduction="sum")
    (grad,) = torch.autograd.grad(loss, xg)
    n_zero = int((grad.flatten(1).abs().max(1).values == 0).sum())
    zero = n_zero / max(1, n)
    return _check("nonzero_gradients", zero <= 0.01,
                  f"{_seen(n_zero, n)} of the checked samples have an all-zero input gradient",
                  "zero gradients stall gradient attacks (rounding, quantisation, saturation), so robust "
                  "accuracy may be overstated on such samples; compare with Square and transfer numbers")


def _convergence_checks(model: nn.Module, res: ModelResult, sel: torch.Tensor, xs: torch.Tensor, ys: torch.Tensor,
                        cfg: EvalConfig, n_classes: int, device: torch.device) -> list[dict]:
    """6. convergence: twice the steps, run on what the white-box chain left, breaks little more; 7. large eps gets
    near chance. `sel` are the positions of the checked samples `xs` in the evaluation."""
    name = _first_iterative(cfg)
    if name is None:
        return []
    n = len(ys)
    clean = model(xs.to(device)).argmax(1).cpu() == ys
    sp1 = _spec(cfg, name, n_classes)
    steps = int(sp1.steps or 1)
    sp2 = _spec(cfg, name, n_classes, steps=2 * steps)
    wb = res.threats.get("whitebox")
    row = next((r for r in (wb.attacks if wb else []) if r.attack == sp1.label and r.after is not None), None)
    if row is not None:
        # The evaluation's own result after this attack (and those before it in the chain): only what it left can
        # fall to more steps, so the doubled run attacks those alone — one run instead of two, on fewer samples.
        left = row.after[sel] & clean
        r1 = float(left.float().mean())
        r2 = float(run_chain("check", model, model, xs, ys, left, [sp2], cfg, device).robust.float().mean())
        first = row is wb.attacks[0]
        detail = (f"{name} with {steps} steps{'' if first else ' (after the attacks before it)'}: {r1:.4f}; then "
                  f"{2 * steps} steps on what it left: {r2:.4f} ({n} samples)")
    else:
        r1 = _robust_of(model, xs, ys, clean, sp1, cfg, device)
        r2 = _robust_of(model, xs, ys, clean, sp2, cfg, device)
        detail = f"{name} with {steps} steps: {r1:.4f}; with {2 * steps}: {r2:.4f} ({n} samples)"
    tol = max(0.02, 2 / n)
    checks = [_check("converged", r1 - r2 <= tol, detail,
                     "another run with more steps still breaks more samples: raise --steps (or --restarts)")]
    big = 0.5 if cfg.norm == "Linf" else 10.0
    m = min(n, LARGE_EPS_SAMPLES)
    rb = _robust_of(model, xs[:m], ys[:m], clean[:m], _spec(cfg, name, n_classes, eps=big), cfg, device)
    chance = 1 / n_classes
    checks.append(_check("large_eps_near_chance", rb <= chance + 0.1,
                         f"{name} at eps={big}: {rb:.4f} (chance {chance:.2f}; {m} samples)",
                         "an unbounded-enough attack should reach chance: the attack is failing, not the model "
                         "holding (gradient masking)"))
    return checks


def _seen(k: int, n: int) -> str:
    """`k of n (p%, 95% CI [lo-hi%])`: what a check saw and how sure it is."""
    if n <= 0:
        return f"{k} of 0"
    lo, hi = wilson(k, n)
    return f"{k} of {n} ({k / n:.1%}, 95% CI {lo:.1%}-{hi:.1%})"


def _robust_of(model, x, y, clean, spec, cfg, device) -> float:
    ch = run_chain("check", model, model, x, y, clean, [spec], cfg, device)
    return float(ch.robust.float().mean())


def eps_sweep(model, x, y, cfg: EvalConfig, n_classes: int, device, progress=None) -> list[dict]:
    name = _first_iterative(cfg) or "fgsm"
    clean = predict(model, x, cfg.batch_size, device).argmax(1) == y
    out = []
    for e in cfg.eps_sweep or []:
        if e == 0:
            out.append({"eps": 0.0, "attack": name, **acc(clean)})
            continue
        ch = run_chain("whitebox", model, model, x, y, clean, [_spec(cfg, name, n_classes, eps=e)], cfg, device,
                       progress, f"sweep eps={e:g} ")
        out.append({"eps": e, "attack": name, **acc(ch.robust)})
    return out


def _check_adaptive(res: ModelResult) -> list[dict]:
    """BPDA and surrogate transfer run on what the white-box attacks left: anything they break is a sample where
    the model's own gradients misled the attacker."""
    out = []
    wb = res.threats.get("whitebox")
    left = wb.robust["correct"] if wb else None
    for t, name, hint in (
            ("adaptive", "bpda_not_stronger_than_whitebox",
             "with the patches' backward replaced by the identity the attacks broke samples that the exact gradients "
             "could not: the patches obfuscate gradients, and the white-box figure alone overstates robustness"),
            ("surrogate", "surrogate_not_stronger_than_whitebox",
             "examples transferred from the surrogate broke samples the white-box attacks left: the model's "
             "gradients may mislead (gradient masking); the per-sample worst case counts them")):
        th = res.threats.get(t)
        if th is None or left is None:
            continue
        broken = sum(r.broken for r in th.attacks)
        out.append(_check(name, broken == 0, f"{t} attacks broke {_seen(broken, left)} of the samples the white-box "
                                             "attacks left", hint))
    return out


def _check_sweep(sweep: list[dict], n_classes: int) -> dict:
    vals = [s["accuracy"] for s in sorted(sweep, key=lambda s: s["eps"])]
    mono = all(b <= a + 1e-9 for a, b in zip(vals, vals[1:]))
    return _check("monotone_in_eps", mono, "robust accuracy over eps: " + ", ".join(f"{v:.3f}" for v in vals),
                  "accuracy rising with eps means the attack fails at larger eps: gradient masking")
