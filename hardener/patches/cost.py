"""What a patched model costs at inference, against its base: multiply-adds counted by torch, latency measured.

Multiply-adds (MACs) per image: torch's own `FlopCounterMode` over one forward of a single image at the model's
input shape, MACs = flops / 2, so functional ops (`F.linear`, `matmul`, `F.scaled_dot_product_attention`) count as
much as modules do. Two traps, both measured: under `torch.no_grad()` (or with nothing requiring grad, as in a
frozen base) `nn.MultiheadAttention` and `nn.TransformerEncoderLayer` take a fused fast path the counter has no
formula for (a small ViT read 1.16M MACs instead of 2.28M), so the count runs with grad enabled on an input that
requires grad; and on the CPU `F.scaled_dot_product_attention` runs `_scaled_dot_product_flash_attention_for_cpu`,
which the counter does not know either (it counted 0), so that kernel gets the formula of the other SDPA kernels.

Latency: the base (patches disabled) and the patched model on the same random pixels, forwards interleaved in one
process on the run's device with the threads the run has, at batch 1 and a large batch, the median of repeats;
the repeats fit a time budget, and the large batch shrinks when one forward pair alone would overrun it.
"""
from __future__ import annotations

import contextlib
import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.utils.flop_counter as _fc
from torch import nn

from ..errors import InputError
from . import INPUT_SITE, KINDS, Site
from .base import REPLACING
from .fixer import hidden_width
from .prefilter import lighter_settings

LATENCY_BATCHES = (1, 256)  # batch 1 (one request) and a large batch (throughput)
LATENCY_BUDGET_S = 1.0  # wall time the measurement may take, warm-up included (about; one pair at least)
MIN_REPEATS, MAX_REPEATS = 3, 50
# A measurement is marked noisy when the interquartile range of the repeats' own patched/base ratios exceeds this
# share of the median ratio, or when the patched model measured faster than its base (it runs the whole base: only
# noise does that)
NOISY_SPREAD, NOISY_BELOW = 0.25, 0.95
MIN_HIDDEN = 4  # --budget names the fixers it squeezed below this many hidden channels


def _sdpa_cpu_flop(q, k, v, *args, out_shape=None, **kwargs) -> int:
    return _fc.sdpa_flop_count(q, k, v)


def _custom_formulas() -> dict:
    aten = torch.ops.aten
    op = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    return {op: _sdpa_cpu_flop} if op is not None and op not in _fc.flop_registry else {}


def counter() -> _fc.FlopCounterMode:
    """torch's flop counter, with the formulas it lacks (see the module docstring)."""
    return _fc.FlopCounterMode(display=False, custom_mapping=_custom_formulas())


def macs(fn: Callable[[torch.Tensor], Any], x: torch.Tensor) -> int:
    """Multiply-adds of `fn(x)` (a batch of one for a per-image count), counted with grad enabled on an `x` that
    requires grad, so no fused inference fast path hides operations from the counter."""
    x = x.detach().clone().requires_grad_(x.is_floating_point())
    with torch.enable_grad(), counter() as fc:
        fn(x)
    return fc.get_total_flops() // 2


def module_macs(module: nn.Module, shape: list[int] | tuple[int, ...], device: torch.device | str = "cpu") -> int:
    """Multiply-adds per image of `module` on an input of `shape` (without the batch axis), in eval mode."""
    was = module.training
    module.eval()
    try:
        return macs(module, torch.rand(1, *shape, device=device))
    finally:
        module.train(was)


def _device(model: nn.Module) -> torch.device:
    return next((t.device for t in [*model.parameters(), *model.buffers()]), torch.device("cpu"))


def count_macs(patched) -> tuple[int, int, dict[str, int]]:
    """Multiply-adds per image of a `PatchedModel` at its recorded input shape, in eval mode, as served: the base's
    (patches disabled), the patched model's, and each patch's own (site -> MACs). A patch that runs instead of its
    layer (a BN twin, a lora delta) adds its own less the layer's; patch parameters count as not trained (a lora
    delta serves its merged weight, computed once: no multiply-adds per image)."""
    x = torch.rand(1, *patched.model.spec.shape, device=_device(patched))
    per_site: dict[str, int] = {}
    mode: list = []

    def tally(modules: dict[str, nn.Module], sign: int) -> list:
        """Hooks adding `sign` times each module's multiply-adds to its site's count."""
        def pre(site):
            def hook(_m, _inp):
                per_site[site] = per_site.get(site, 0) - sign * mode[-1].get_total_flops()
            return hook

        def post(site):
            def hook(_m, _inp, _out):
                per_site[site] += sign * mode[-1].get_total_flops()
            return hook
        return [h for site, m in modules.items()
                for h in (m.register_forward_pre_hook(pre(site)), m.register_forward_hook(post(site)))]

    def run(handles: list, disabled: bool) -> int:
        try:
            with torch.enable_grad(), counter() as fc, \
                    patched.patches_disabled() if disabled else contextlib.nullcontext():
                mode.append(fc)
                patched(x.clone().requires_grad_(True))
        finally:
            for h in handles:
                h.remove()
        return fc.get_total_flops() // 2

    replaced = {site: patched.net.get_submodule(site) for site, key in patched.sites.items()
                if getattr(patched.patches[key], "placement", "output") in REPLACING}
    was, grads = patched.training, {p: p.requires_grad for p in patched.patch_parameters()}
    patched.eval()
    try:
        base = run(tally(replaced, -1), disabled=True)  # the replaced layers' own multiply-adds, taken off
        for p in grads:
            p.requires_grad_(False)
        with torch.no_grad():
            patched(x)  # a lora delta merges its weight here, outside the count
        total = run(tally({site: patched.patches[key] for site, key in patched.sites.items()}, 1), disabled=False)
    finally:
        for p, g in grads.items():
            p.requires_grad_(g)
        patched.train(was)
    return base, total, {s: v // 2 for s, v in per_site.items()}


def kind_macs(cls, site, config) -> int:
    """Multiply-adds per image a patch of kind `cls` would add at `site` (a `patches.Site`, shape C,H,W or L,D),
    built and run on the meta device (no memory, no weights)."""
    with torch.device("meta"):
        patch = cls.build(site, config)
    return macs(patch.eval(), torch.empty(1, *site.shape, device="meta"))


def site_fixer_macs(net: nn.Module, infos: list, options: Any = None) -> dict[str, int]:
    """Site name -> multiply-adds per image a fixer built with `options` (a run's options; None: the kind's
    defaults) would add there (`harden layers`, at the default recipe's)."""
    fixer = KINDS["fixer"]
    config = fixer.make_config(options)
    return {i.name: kind_macs(fixer, Site(i.name, net.get_submodule(i.name), i.shape), config)
            for i in infos if i.site and i.layout in fixer.layouts}


def prefilter_macs(net: nn.Module, shape, options: Any = None) -> int | None:
    """Multiply-adds per image a pre-filter built with `options` would add at the input (None: no image input)."""
    if shape is None or len(shape) != 3:
        return None
    pre = KINDS["prefilter"]
    return kind_macs(pre, Site(INPUT_SITE, net, tuple(shape)), pre.make_config(options))


@dataclass
class Cost:
    """A patched model's inference cost against its base: multiply-adds per image (counted), parameters, and the
    measured latency (None until measured: `measure_latency`)."""

    macs_base: int
    macs_patched: int
    macs_per_patch: dict[str, int] = field(default_factory=dict)
    parameters_base: int = 0
    parameters_patches: int = 0
    latency: dict | None = None  # device, threads, budget, and per batch: base_ms, patched_ms, ratio, repeats
    budget: float | None = None  # the --budget the recipe was sized to (None: unconstrained)
    sizing: str | None = None  # what the budget chose (`fit_budget`'s line)

    @property
    def macs_ratio(self) -> float:
        return self.macs_patched / self.macs_base if self.macs_base else math.inf

    @property
    def worst_batch(self) -> dict | None:
        """The measured batch with the worst patched/base ratio (None before measuring)."""
        if not self.latency:
            return None
        return max(self.latency["batches"].values(), key=lambda b: b["ratio"])

    @property
    def latency_ratio(self) -> float | None:
        """The worst ratio over the measured batches (None before measuring)."""
        return None if self.worst_batch is None else self.worst_batch["ratio"]

    def added(self) -> dict[str, int]:
        """What the patches add, beside the base's (the report's `patch_cost`)."""
        return {"parameters": self.parameters_patches, "base_parameters": self.parameters_base,
                "macs": self.macs_patched - self.macs_base, "base_macs": self.macs_base}

    def to_dict(self, latency: bool = True) -> dict:
        """The JSON record, a dict (as `Report.to_dict()`); `latency=False` leaves the measurement out (the
        checkpoint's manifest: a model's cost, not one machine's timing, and the same bytes for the same seed)."""
        return self.to_json(latency)

    @classmethod
    def from_json(cls, rec: dict) -> Cost:
        """The `Cost` a JSON record (`to_json`) describes: a report's or a manifest's `cost`."""
        return cls(int(rec.get("macs_base") or 0), int(rec.get("macs_patched") or 0),
                   dict(rec.get("macs_per_patch") or {}), int(rec.get("parameters_base") or 0),
                   int(rec.get("parameters_patches") or 0), rec.get("latency"), rec.get("budget"), rec.get("sizing"))

    def to_json(self, latency: bool = True) -> dict:
        """The JSON record (a dict: `to_dict`, the name the library's other results use)."""
        if not latency:
            return {k: v for k, v in self.to_json().items() if not k.startswith("latency")}
        return {"budget": self.budget, **({"sizing": self.sizing} if self.sizing else {}),
                "macs_base": self.macs_base, "macs_patched": self.macs_patched,
                "macs_ratio": round(self.macs_ratio, 4) if self.macs_base else None,
                "macs_per_patch": dict(self.macs_per_patch), "parameters_base": self.parameters_base,
                "parameters_patches": self.parameters_patches,
                "latency_ratio": None if self.latency_ratio is None else round(self.latency_ratio, 4),
                "latency": self.latency}


def count(patched) -> Cost:
    """The counted part of a `PatchedModel`'s cost (multiply-adds and parameters; no latency yet)."""
    base, total, per = count_macs(patched)
    return Cost(base, total, per, sum(p.numel() for p in patched.model.parameters()),
                sum(p.numel() for p in patched.patch_parameters()))


def _sync(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":  # this device's work, not the current one's (cuda:1 without set_device)
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def measure_latency(patched, batches: tuple[int, ...] = LATENCY_BATCHES, budget_s: float = LATENCY_BUDGET_S,
                    seed: int = 0) -> dict:
    """Forward latency of the base (patches disabled) and the patched model, interleaved, on the model's device
    with the current threads: per batch (smallest first), the median over repeats (at least MIN_REPEATS) that fit
    `budget_s` split evenly over the batches, warm-up included. A large batch starts no larger than the per-image
    time of the batch before says fits (at 4x its throughput per image), and is halved (down to 2) while one
    base+patched pair would not fit MIN_REPEATS times in what is left of its share, or runs out of memory; the batch
    used is recorded."""
    device = _device(patched)
    sync = _sync(device)
    g = torch.Generator().manual_seed(seed)
    share = budget_s / max(1, len(batches))
    was = patched.training
    patched.eval()

    def pair(x: torch.Tensor) -> tuple[float, float]:
        times = []
        for disabled in (True, False):
            sync()
            t = time.perf_counter()
            with patched.patches_disabled() if disabled else contextlib.nullcontext():
                patched(x)
            sync()
            times.append(time.perf_counter() - t)
        return times[0], times[1]

    out: dict[str, dict] = {}
    per_image = 0.0
    try:
        with torch.no_grad():
            for b in sorted(batches):
                start = time.perf_counter()
                if b > 1 and per_image:
                    fits = int(4 * share / ((MIN_REPEATS + 1) * per_image))
                    b = min(b, 1 << max(1, fits.bit_length() - 1))
                x = torch.rand(b, *patched.model.spec.shape, generator=g).to(device)
                while True:  # out of memory at a large batch: half of it (an evaluation's report must not be lost)
                    try:
                        first = pair(x)  # warm-up (allocations, kernels), also the estimate of one pair
                        break
                    except torch.OutOfMemoryError:
                        if b == 1:
                            raise
                        b //= 2
                        x = x[:b]
                        if device.type == "cuda":
                            torch.cuda.empty_cache()
                while b > 2 and sum(first) * MIN_REPEATS > share - (time.perf_counter() - start):
                    b //= 2
                    x = x[:b]
                    first = pair(x)
                left = share - (time.perf_counter() - start)
                repeats = max(MIN_REPEATS, min(MAX_REPEATS, int(left / max(sum(first), 1e-6))))
                runs = [pair(x) for _ in range(repeats)]
                base_s, patched_s = (statistics.median(r[i] for r in runs) for i in (0, 1))
                per_image = (base_s + patched_s) / b  # the median pair's, not the warm-up's (a cold start's first)
                ratio = patched_s / max(base_s, 1e-9)
                # how much the repeats' own ratios vary: their interquartile range over the median ratio (not the
                # range: it grows with the number of repeats, and batch 1 gets many)
                q1, _, q3 = statistics.quantiles([p / max(b_, 1e-9) for b_, p in runs], n=4)
                spread = (q3 - q1) / max(ratio, 1e-9)
                out[str(b)] = {"base_ms": round(1e3 * base_s, 4), "patched_ms": round(1e3 * patched_s, 4),
                               "ratio": round(ratio, 4), "repeats": repeats, "spread": round(spread, 4),
                               "noisy": spread > NOISY_SPREAD or ratio < NOISY_BELOW}
    finally:
        patched.train(was)
    rec = {"device": str(device), "threads": torch.get_num_threads(), "budget_s": budget_s,
           "statistic": "median of interleaved base/patched forwards, no grad, eval mode; latency_ratio is the worst "
                        "batch's", "batches": out}
    rec["noisy"] = any(v["noisy"] for v in out.values())
    if rec["noisy"]:
        rec["noisy_note"] = (f"the repeats' ratios varied by more than {NOISY_SPREAD:.0%} of the median (spread), or "
                             "the patched model measured faster than its base, which it runs whole: a busy machine? "
                             "Time it on a quiet one")
    return rec


def measure(patched, latency: bool = True, **latency_kw: Any) -> Cost:
    """`hardener.measure_cost`: a `PatchedModel`'s inference cost against its base: multiply-adds per image and
    parameters (counted by torch at the recorded input shape), and with `latency` the measured latency (base and
    patched interleaved in this process, batch 1 and a large batch, the median of repeats; `budget_s` bounds the
    time it takes). `.macs_ratio`, `.latency_ratio`, `.added()`, `.to_dict()`."""
    cost = count(patched)
    recorded = getattr(getattr(patched, "manifest", None), "cost", None) or {}  # a loaded checkpoint's, as trained
    trained = getattr(patched, "cost", None)  # `hardener.patch`'s model: the cost its run recorded
    if not recorded and isinstance(trained, Cost):
        recorded = {"budget": trained.budget, "sizing": trained.sizing}
    cost.budget, cost.sizing = recorded.get("budget"), recorded.get("sizing")
    if latency:
        cost.latency = measure_latency(patched, **latency_kw)
    return cost


def fmt(v: float) -> str:
    """A count with a unit: 15.2M, 1.3G, 880k."""
    return next((f"{v / d:.{1 if v >= 10 * d else 2}f}{u}" for d, u in ((1e9, "G"), (1e6, "M"), (1e3, "k"))
                 if v >= d), f"{v:.0f}")


def describe_macs(cost: Cost) -> str:
    """The counted cost in a line: the patched model's multiply-adds against the base's."""
    return (f"{cost.macs_ratio:.2f}x the base's multiply-adds per image ({fmt(cost.macs_patched)} against "
            f"{fmt(cost.macs_base)}, counted by torch at the input shape)")


def describe(cost: Cost) -> str:
    """The whole cost in a line: the counted multiply-adds, and the latency where it was measured."""
    return describe_macs(cost) + (f"; {describe_latency(cost)}" if cost.latency else "")


def describe_latency(cost: Cost) -> str:
    """The measured latency in a line (batch: ratio, base and patched milliseconds)."""
    lat = cost.latency or {}
    def noise(v: dict) -> str:
        if not v.get("noisy"):
            return ""
        return (", noisy: faster than its base" if v["ratio"] < NOISY_BELOW
                else f", noisy: the repeats' ratios spread {v['spread']:.0%}")
    parts = [f"batch {b} {v['ratio']:.2f}x ({v['base_ms']:.2f} -> {v['patched_ms']:.2f} ms{noise(v)})"
             for b, v in lat.get("batches", {}).items()]
    return (f"latency {'; '.join(parts)}, median of interleaved forwards on {lat.get('device')}, "
            f"{lat.get('threads')} thread(s)")


def parse_budget(value: Any) -> float | None:
    """`--budget`: inference multiply-adds relative to the base (a number >= 1), or None/"none" (unconstrained)."""
    if value is None or (isinstance(value, str) and value.strip().lower() == "none"):
        return None
    try:
        budget = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        budget = math.nan
    if not math.isfinite(budget):
        raise InputError(f"--budget must be a number (inference multiply-adds relative to the base, e.g. 1.25) or "
                         f"none, got {value!r}")
    if budget < 1.0:
        raise InputError(f"--budget must be 1.0 or more, or none, got {value}: the patched model runs the whole base "
                         "too, so it costs at least 1.0x the base's multiply-adds")
    return budget


def _nothing_fits(budget: float, base: int, cheapest: tuple[int, str] | None) -> str:
    """The refusal of a budget that fits no patch: the room it leaves, the cheapest patch (multiply-adds, site) and
    the smallest budget, to 2 decimals, that fits it by `fit_budget`'s own test (cost <= (budget - 1) base)."""
    what = "; raise --budget"
    if cheapest:
        least = math.ceil(100 * (1 + cheapest[0] / max(1, base)) - 1e-9) / 100
        while (least - 1.0) * base < cheapest[0]:
            least = round(least + 0.01, 2)
        what = (f"; the cheapest, at '{cheapest[1]}', adds {100 * cheapest[0] / max(1, base):.1f}%: --budget "
                f"{least:.2f} or more fits it")
    room = f"{100 * (budget - 1):.2f}".rstrip("0").rstrip(".")  # 0.01, not 0.0
    return (f"--budget {budget:g}: no patch of the recipe fits in {room}% of the base's {fmt(base)} "
            f"multiply-adds{what}, or give none")


def fit_budget(patched, sites: list[tuple[str, str]], shapes: dict, opts: Any, budget: float,
               twins: bool) -> tuple[list[tuple[str, str]], Any, str]:
    """Size a recipe to `budget` (the patched model's multiply-adds over the base's) before anything is built: BN
    twins and lora deltas stay (no multiply-adds); then the pre-filter, resolution before width
    (`prefilter.lighter_settings`: the recipe's own design first, at the largest width that fits, then the lighter
    designs, as measured); then the other site patches with what is left: at the smallest multiple of `rho` (x2 each
    try) that keeps the most of them, cheapest sites first. Returns the sites kept, the options to build them with,
    and a line saying what it chose. Nothing fitting (and no twins or lora deltas) is an `InputError`."""
    base = count_macs(patched)[0]
    left = (budget - 1.0) * base

    memo: dict[tuple, int] = {}

    def cost_of(kind: str, site: str, o: Any) -> int:
        cls = KINDS[kind]
        config = cls.make_config(o)
        if (kind, site, repr(config)) not in memo:
            module = patched.net if site == INPUT_SITE else patched.net.get_submodule(site)
            memo[kind, site, repr(config)] = kind_macs(cls, Site(site, module, shapes.get(site)), config)
        return memo[kind, site, repr(config)]

    pre = [(k, s) for k, s in sites if k == "prefilter"][:1]
    free = [(k, s) for k, s in sites if KINDS[k].placement == "layer"]  # lora deltas: merged, no multiply-adds
    rest = [(k, s) for k, s in sites if (k, s) not in pre and (k, s) not in free]
    o, kept_pre, said = opts, [], []
    for settings in (lighter_settings(opts.width, opts.prefilter_stride, opts.prefilter_design) if pre else []):
        fits = [(c, t) for t in settings for c in [cost_of(*pre[0], opts.replace(**t))] if c <= left]
        if fits:
            c, t = max(fits, key=lambda f: f[0])
            o, kept_pre, left = opts.replace(**t), pre, left - c
            said.append(f"pre-filter width {t['width']}, {t['prefilter_design']}, stride {t['prefilter_stride']}")
            break
    best: tuple[float, list[int], int] | None = None
    before = None
    for i in range(12):  # rho, 2 rho, 4 rho, ... (a fixer's hidden width halves each time, down to 1)
        trial = o.replace(rho=opts.rho * 2 ** i)
        costs = sorted((cost_of(k, s, trial), j) for j, (k, s) in enumerate(rest))
        if costs == before:  # no cheaper any more
            break
        kept, used, before = [], 0, costs
        for c, j in costs:
            if used + c <= left:
                kept.append(j)
                used += c
        if best is None or len(kept) > len(best[1]):
            best = (trial.rho, kept, used)
        if len(kept) == len(rest):
            break
    rho, kept, used = best if best else (opts.rho, [], 0)
    if not kept_pre and not kept and not twins and not free and sites:
        options = [(c, rest[j][1]) for c, j in before or []]  # the site patches at their thinnest
        options += [(cost_of(*pre[0], opts.replace(**t)), pre[0][1])  # the pre-filter at its lightest settings
                    for settings in (lighter_settings(opts.width, opts.prefilter_stride, opts.prefilter_design)
                                     if pre else []) for t in settings]
        raise InputError(_nothing_fits(budget, base, min(options) if options else None))
    o = o.replace(rho=rho)
    chosen = [rest[j] for j in sorted(kept)]
    if rest:
        dropped = [s for j, (_, s) in enumerate(rest) if j not in kept]
        # a fixer the budget squeezed to fewer than MIN_HIDDEN channels is named: a larger budget can buy a wider
        # pre-filter and leave the fixers thinner than a smaller one did (the pre-filter is sized first)
        widths = {s: hidden_width(shapes.get(s), rho) for k, s in chosen if k == "fixer"} if rho > opts.rho else {}
        thin = [f"{w} at {s}" for s, w in widths.items() if w is not None and w < MIN_HIDDEN]
        said.append((f"--rho {rho:g} at {', '.join(s for _, s in chosen)}" if chosen else "no site patch")
                    + (f" (left out: {', '.join(dropped)})" if dropped else "")
                    + (f" (thin: hidden channels {', '.join(thin)}; fewer --at sites"
                       + (" or a narrower --width" if kept_pre else "") + " leave them wider)" if thin else ""))
    if pre and not kept_pre:
        said.append("no pre-filter (none fits)")
    if free:
        said.append(f"{len(free)} lora delta(s) kept (merged into their layers' weights: no multiply-adds)")
    if twins:
        said.append("BN twins kept (no multiply-adds)")
    spent = (budget - 1.0) * base - left + used
    keep = set(kept_pre + chosen + free)
    return [x for x in sites if x in keep], o, (f"--budget {budget:g}: {'; '.join(said)}: {1 + spent / max(1, base):.3f}x the "
                                  f"base's multiply-adds ({fmt(base)})")
