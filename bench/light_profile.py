"""Where a light patch's extra inference time goes (issue 30): a patched checkpoint against its base, one thread.

    OMP_NUM_THREADS=1 python bench/light_profile.py CHECKPOINT ARCH [--json J] [--repeats N] > profile.md
    python bench/light_profile.py --compare BEFORE.json,... AFTER.json,...   # medians over runs, before/after

Per batch (1 and 256): the forward's time, base (the patched model with its patches disabled, as `measure_cost`
times it; and a bare copy of the base, no hooks) and patched, interleaved, median of repeats, in wall and in this
thread's CPU seconds (the CPU time is what a shared machine perturbs least); then torch.profiler's self CPU time by
op category (share of the patched forward, op counts per forward), and each patch module timed alone on the input
it sees in the patched forward (its share of the patched forward), and each convolution alone (picoseconds per
multiply-add: thin convolutions, one channel in or out, cost far more per multiply-add than the base's). Whatever the
ops and the patches' own times do not account for is dispatch: Python, hooks, module calls."""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import hardener  # noqa: E402

# kernels by category (their calls are counted); the ops that only dispatch to them are "op wrappers"
CATEGORIES = {"conv": ("_slow_conv2d_forward", "mkldnn_convolution", "_nnpack_spatial_convolution"),
              "batch norm": ("native_batch_norm",), "pooling": ("max_pool2d_with_indices", "adaptive_max_pool2d"),
              "elementwise": ("add", "sub", "mul", "div", "clamp_min", "clamp_min_"),
              "memory": ("empty", "copy_", "clone", "resize_")}
WRAPPERS = ("convolution", "_convolution", "conv2d", "thnn_conv2d", "_convolution_mode", "batch_norm",
            "_batch_norm_impl_index", "max_pool2d", "adaptive_max_pool2d", "relu", "relu_")


def category(op: str) -> str:
    name = op.removeprefix("aten::")
    if name in WRAPPERS and not any(name in keys for keys in CATEGORIES.values()):
        return "op wrappers"
    return next((c for c, keys in CATEGORIES.items() if name in keys), "other ops")


def timed(f, x) -> tuple[float, float]:
    w, c = time.perf_counter(), time.thread_time()
    f(x)
    return time.perf_counter() - w, time.thread_time() - c


def latency(runs: dict, x: torch.Tensor, repeats: int) -> dict:
    """Median wall and CPU seconds per forward of each of `runs`, interleaved."""
    got: dict = {k: ([], []) for k in runs}
    for f in runs.values():  # warm-up
        f(x)
    for _ in range(repeats):
        for k, f in runs.items():
            w, c = timed(f, x)
            got[k][0].append(w)
            got[k][1].append(c)
    return {k: {"wall": statistics.median(w), "cpu": statistics.median(c)} for k, (w, c) in got.items()}


def op_profile(f, x, n: int) -> dict:
    """Self CPU seconds per forward and calls per forward by op category, under torch.profiler."""
    f(x)
    with profile(activities=[ProfilerActivity.CPU]) as p:
        for _ in range(n):
            f(x)
    out: dict = {}
    for e in p.key_averages():
        c = out.setdefault(category(e.key), {"self_s": 0.0, "calls": 0})
        c["self_s"] += e.self_cpu_time_total / 1e6 / n
        c["calls"] += e.count // n
    return out


def patch_times(model, x: torch.Tensor, repeats: int) -> dict:
    """Each patch module's CPU seconds alone, on the input it sees in the patched forward (its site's output; a
    norm layer's twin: the layer's input), median of repeats."""
    inputs: dict = {}
    handles = []
    for site, key in model.sites.items():
        patch = model.patches[key]
        if site == "input":
            handles.append(model.net.register_forward_pre_hook(lambda _m, i, _s=site: inputs.setdefault(_s, i[0])))
        elif patch.placement == "bn":  # a pre-hook runs before the twin's forward: the layer's input
            handles.append(model.net.get_submodule(site).register_forward_pre_hook(
                lambda _m, i, _s=site: inputs.setdefault(_s, i[0].clone())))
        else:  # hooks registered after the patch's own see the patched output: run with patches off
            handles.append(model.net.get_submodule(site).register_forward_hook(
                lambda _m, _i, o, _s=site: inputs.setdefault(_s, o.clone())))
    with model.patches_disabled():  # the base's site outputs: the shapes (and near the values) the patches see
        model(x)
    for h in handles:
        h.remove()
    out = {}
    for site, key in model.sites.items():
        patch = model.patches[key]
        f = (lambda t, _p=patch: _p(None, t)) if patch.placement == "bn" else patch
        out[f"{patch.kind}@{site}"] = statistics.median(timed(f, inputs[site])[1] for _ in range(repeats))
    return out


def conv_times(model, x: torch.Tensor, repeats: int) -> list[dict]:
    """Every convolution of the base and the patches alone on the input it sees in the patched forward: CPU seconds
    (median of repeats) and picoseconds per multiply-add, the price the multiply-add count does not see."""
    convs = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)}
    inputs: dict = {}
    handles = [m.register_forward_pre_hook(lambda _m, i, _n=n: inputs.setdefault(_n, i[0].clone()))
               for n, m in convs.items()]
    model(x)
    for h in handles:
        h.remove()
    out = []
    for n, m in convs.items():
        t = inputs[n]
        macs = m(t).numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]
        s = statistics.median(timed(m, t)[1] for _ in range(repeats))
        out.append({"conv": n.removeprefix("model.net.").replace("patches.", "patch "), "in": list(t.shape[1:]),
                    "out": m.out_channels, "kernel": m.kernel_size[0], "macs_per_image": macs // t.shape[0],
                    "cpu_s": s, "ps_per_mac": 1e12 * s / macs})
    return out


def measure(model, batch: int, repeats: int, prof_n: int) -> dict:
    bare = model.base_copy()
    x = torch.rand(batch, *model.model.spec.shape)

    def disabled(t):
        with model.patches_disabled():
            return model(t)
    runs = {"bare base": bare, "base (patches disabled)": disabled, "patched": model}
    with torch.no_grad():
        lat = latency(runs, x, repeats)
        ops = {"base (patches disabled)": op_profile(disabled, x, prof_n), "patched": op_profile(model, x, prof_n)}
        patches = patch_times(model, x, max(5, repeats // 3))
        convs = conv_times(model, x, max(5, repeats // 3))
    return {"batch": batch, "latency": lat, "ops": ops, "patches": patches, "convs": convs}


def table(r: dict) -> str:
    lat, ops, pat = r["latency"], r["ops"], r["patches"]
    base, patched = lat["base (patches disabled)"], lat["patched"]
    lines = [f"### batch {r['batch']}", "",
             "| forward | wall ms | CPU ms | x base (wall) | x base (CPU) |", "|---|---|---|---|---|"]
    for k, v in lat.items():
        lines.append(f"| {k} | {1e3 * v['wall']:.3f} | {1e3 * v['cpu']:.3f} | {v['wall'] / base['wall']:.3f} | "
                     f"{v['cpu'] / base['cpu']:.3f} |")
    tot = {k: sum(c["self_s"] for c in v.values()) for k, v in ops.items()}
    lines += ["", "| op category (torch.profiler, self CPU) | base: share of patched, calls | "
              "patched: share of patched, calls |", "|---|---|---|"]
    for c in sorted(ops["patched"], key=lambda c: -ops["patched"][c]["self_s"]):
        b = ops["base (patches disabled)"].get(c, {"self_s": 0.0, "calls": 0})
        p = ops["patched"][c]
        lines.append(f"| {c} | {100 * b['self_s'] / tot['patched']:.1f}%, {b['calls']} | "
                     f"{100 * p['self_s'] / tot['patched']:.1f}%, {p['calls']} |")
    lines += ["", "| patch module alone | CPU ms | share of patched forward (CPU) |", "|---|---|---|"]
    for k, v in pat.items():
        lines.append(f"| {k} | {1e3 * v:.3f} | {100 * v / patched['cpu']:.1f}% |")
    lines += ["", "| convolution alone | in | out, kernel | MACs per image | CPU ms | ps per MAC |",
              "|---|---|---|---|---|---|"]
    for c in r["convs"]:
        lines.append(f"| {c['conv']} | {'x'.join(map(str, c['in']))} | {c['out']}, {c['kernel']}x{c['kernel']} | "
                     f"{c['macs_per_image']:,} | {1e3 * c['cpu_s']:.3f} | {c['ps_per_mac']:.0f} |")
    return "\n".join(lines) + "\n"


def _med(xs) -> float:
    return statistics.median(xs) if xs else 0.0


def _ratio(rows: list, clock: str, what: str = "patched") -> float:
    return _med([r["latency"][what][clock] / r["latency"]["base (patches disabled)"][clock] for r in rows])


def _share(rows: list, who: str, cat: str) -> float:
    """Median share of `cat`'s self time in `who`'s forward against the patched forward's op time."""
    return _med([r["ops"][who].get(cat, {"self_s": 0.0})["self_s"]
                 / sum(c["self_s"] for c in r["ops"]["patched"].values()) for r in rows])


def compare(before: list[Path], after: list[Path]) -> str:
    """Before/after, medians over the runs given (each run's own base and patched interleaved): the patched
    forward against the base's, and each op category's and patch module's share of the patched forward."""
    runs = {k: [json.loads(p.read_text()) for p in v] for k, v in (("before", before), ("after", after))}
    who = ("base (patches disabled)", "patched")
    lines = []
    for i, batch in enumerate(r["batch"] for r in runs["before"][0]):
        rows = {k: [run[i] for run in v] for k, v in runs.items()}
        b, a = rows["before"], rows["after"]
        lines += [f"### batch {batch} ({len(b)} runs before, {len(a)} after; medians)", "",
                  "| | before | after |", "|---|---|---|"]
        lines += [f"| patched / base ({c}) | {_ratio(b, c):.3f} | {_ratio(a, c):.3f} |" for c in ("cpu", "wall")]
        lines += [f"| bare base / base (cpu) | {_ratio(b, 'cpu', 'bare base'):.3f} | "
                  f"{_ratio(a, 'cpu', 'bare base'):.3f} |", "",
                  "| op category: share of the patched forward's op time (calls per forward) | base, before | "
                  "patched, before | base, after | patched, after |", "|---|---|---|---|---|"]
        for c in sorted({c for r in b for c in r["ops"]["patched"]}, key=lambda c: -_share(b, "patched", c)):
            cells = [f"{100 * _share(rows[k], w, c):.1f}% ({rows[k][0]['ops'][w].get(c, {'calls': 0})['calls']})"
                     for k in ("before", "after") for w in who]
            lines.append(f"| {c} | " + " | ".join(cells) + " |")
        lines += ["", "| patch module alone: share of the patched forward (CPU) | before | after |", "|---|---|---|"]
        for m in b[0]["patches"]:
            cells = [_med([r["patches"][m] / r["latency"]["patched"]["cpu"] for r in rows[k]]) for k in runs]
            lines.append(f"| {m} | {100 * cells[0]:.1f}% | {100 * cells[1]:.1f}% |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoint", nargs="?")
    ap.add_argument("arch", nargs="?")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--repeats", type=int, default=0, help="latency repeats (default: 300 at batch 1, 9 at 256)")
    ap.add_argument("--compare", nargs=2, metavar=("BEFORE", "AFTER"), help="comma-separated JSON files of runs")
    a = ap.parse_args()
    if a.compare:
        print(compare(*([Path(f) for f in v.split(",")] for v in a.compare)))
        return
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = hardener.load(a.checkpoint, arch=a.arch).eval()
    rows = [measure(model, b, a.repeats or n, p) for b, n, p in ((1, 300, 100), (256, 9, 3))]
    print(f"{a.checkpoint} ({a.arch}), torch {torch.__version__}, one thread\n")
    print("\n".join(table(r) for r in rows))
    if a.json:
        a.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        main()
