"""Finish the standard AutoAttack of bench/verdict_fmnist.sh from where an interrupted aa-white run stopped.

    OMP_NUM_THREADS=1 python bench/verdict_continue.py PATCHED STATE ATTACK OUT.json [--after PREV.json]

The aa-white run (APGD-CE -> APGD-T -> FAB-T, white-box, 1,000 seeded test images) saved its per-sample robust mask
after APGD-T in STATE, but that state cannot be resumed by a later harden version (the fingerprint holds the version).
AutoAttack runs each attack only on what the attacks before it left, so this script continues the chain exactly:
the same images (fashion-mnist:test, seeded stratified 1,000, seed 0), the same model, the same settings (each
attack's reference budget, eps 0.1 Linf, seed 0), ATTACK (`fab-t`, `square`) on the samples robust after APGD-T
(and, with --after, after that earlier continuation too). Resumable: progress is kept in OUT.json.state.

OUT.json: {"attack", "settings", "attacked", "broken", "seconds", "robust": [per sample]} for verdict_table.py.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from hardener import attacks as A
from hardener import data as hdata
from hardener.evaluation import threats as E
from hardener.io.resume import EvalStore, fingerprint
from hardener.io.session import (
    DataOptions,
    ModelOptions,
    finish_spec,
    load_data,
    load_model,
)

ARCH = "examples/fmnist_model.py:resnet9_small"


def robust_after_state(path: str) -> torch.Tensor:
    """The patched model's white-box robust mask after the last attack the state finished."""
    data = torch.load(path, map_location="cpu", weights_only=True)["data"]
    keys = [k for k in data if k.startswith("patched whitebox/") and data[k]["row"] is not None]
    last = max(keys, key=lambda k: int(k.split("/")[1].split(":")[0]))
    print(f"{path}: robust after {last}", flush=True)
    return data[last]["robust"].bool()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("patched")
    ap.add_argument("state")
    ap.add_argument("attack")
    ap.add_argument("out", type=Path)
    ap.add_argument("--after", type=Path, help="an earlier continuation's OUT.json: attack only what it left")
    ap.add_argument("--batch-size", type=int, default=64)
    a = ap.parse_args()
    torch.manual_seed(0)
    device = torch.device("cpu")
    loaded = load_model(a.patched, ModelOptions(arch=ARCH))
    ds = load_data(loaded, "fashion-mnist:test", DataOptions())
    finish_spec(loaded, ds, device)
    idx, _ = hdata.stratified_split(ds.labels, 1000, 0)
    ds = ds.take(idx)
    x, y = hdata.to_float(ds.images), ds.labels
    model = loaded.patched.eval()
    start = robust_after_state(a.state)
    with torch.no_grad():
        clean = E.predict(model, x, 256, device).argmax(1) == y
    if bool((start & ~clean).any()):
        raise SystemExit("the state's robust mask is not inside this run's clean-correct mask: not the same images")
    if a.after is not None:
        start &= torch.tensor(json.loads(a.after.read_text())["robust"])
    print(f"clean {int(clean.sum())}/{len(y)}; attacking {int(start.sum())} with {a.attack}", flush=True)
    cfg = E.EvalConfig(attacks=[a.attack], eps=0.1, threats=("whitebox",), batch_size=a.batch_size, checks=False)
    spec = E._spec(cfg, a.attack, int(model(x[:1]).shape[1]))
    store = EvalStore(a.out.with_name(a.out.name + ".state"),
                      fingerprint({"patched": a.patched, "start": start.tolist(), "attack": a.attack,
                                   "bs": a.batch_size}), resume=a.out.with_name(a.out.name + ".state").exists())

    last = [0.0]

    def progress(label, done, total, _extra):
        if time.time() - last[0] > 60 or done == total:
            last[0] = time.time()
            print(f"{time.strftime('%H:%M:%S')} {label} {done}/{total}", flush=True)

    res = E.run_chain("whitebox" if A.info(a.attack).kind != "query" else "blackbox", model, model, x, y, start,
                      [spec], cfg, device, progress=progress, store=store)
    row = res.rows[0]
    out = {"attack": row.attack, "settings": row.settings, "attacked": row.attacked, "broken": row.broken,
           "seconds": row.seconds, "violations": res.violations, "robust": res.robust.tolist(),
           "start": start.tolist(), "clean": clean.tolist()}
    a.out.write_text(json.dumps(out))
    store.clear()
    print(json.dumps({k: v for k, v in out.items() if k not in ("robust", "start", "clean")}), flush=True)


if __name__ == "__main__":
    main()
