"""`harden layers`: the named layers of a model (type, output shape, parameters, whether each is a valid patch site,
a feature map or tokens, and why not) and the suggested sites, with the stem and the valid sites the suggestion
passed over."""
from __future__ import annotations

import json

from ...io.session import finish_spec, load_data, load_model, pick_device
from ...patches import cost as C
from ...patches import suggest
from ...runtime.console import err_console, out
from . import Call, data_options, model_arg, model_options


def run(call: Call) -> None:
    kw = call.params
    call.check_run([], False)
    loaded = load_model(model_arg(kw["model"]), model_options(kw))
    device = pick_device(kw["device"])
    ds = load_data(loaded, kw["data"], data_options(kw)) if kw["data"] else None
    infos = finish_spec(loaded, ds, device)
    sug = suggest(loaded.patched.net, infos)
    base_macs, fixer_macs = C.count(loaded.patched).macs_base, C.site_fixer_macs(loaded.patched.net, infos)
    if kw["as_json"]:
        out(json.dumps({"layers": [{**i.to_json(), "fixer_macs": fixer_macs.get(i.name)} for i in infos],
                        "base_macs": base_macs, "suggested_sites": sug.sites, "stem": sug.stem,
                        "why": sug.why, "passed_over": sug.skipped, "note": sug.note}, indent=2))
        return
    from rich.table import Table

    table = Table(title=f"{kw['model']}: input {tuple(loaded.spec.shape)}")
    for col in ("name", "type", "output shape", "params", "site", "fixer"):
        table.add_column(col)
    table.add_column("why", min_width=16)  # its reasons stay readable beside the other columns in 80 characters
    for i in infos:
        why = i.reason or (f"not suggested: {sug.skipped[i.name]}" if i.name in sug.skipped else "")
        m = fixer_macs.get(i.name)
        table.add_row(i.name, i.type, "×".join(map(str, i.shape)) if i.shape else "—", f"{i.params:,}",
                      (i.layout or "map") if i.site else "no",
                      "" if m is None else f"{C.fmt(m)} {100 * m / max(1, base_macs):.0f}%", why)
    err_console.print(table)
    err_console.print(f"fixer: the multiply-adds per image a fixer at the default --rho would add at the site, and "
                      f"% of the base's {C.fmt(base_macs)}")
    if sug.stem:
        err_console.print(f"stem: {sug.stem} ({sug.why[sug.stem]})")
    if sug.sites:
        err_console.print("suggested sites (about 3 blocks by depth): "
                          + "; ".join(f"{s} ({sug.why[s]})" for s in sug.sites))
    else:
        err_console.print(f"suggested sites: none: {sug.note}")
    out(",".join(sug.sites))
