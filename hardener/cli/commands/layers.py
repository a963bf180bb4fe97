"""`harden layers`: the library's `hardener.layers` (`api.layer_table`), rendered: the named layers of a model (type,
output shape, parameters, whether each is a valid patch site, a feature map or tokens, and why not) and the suggested
sites, with the stem and the valid sites the suggestion passed over."""
from __future__ import annotations

import json

from ... import api
from ...io.session import load_data, load_model, pick_device
from ...patches import cost as C
from ...runtime.console import err_console, out
from . import Call, data_options, model_arg, model_options


def run(call: Call) -> None:
    kw = call.params
    call.check_run([], False)
    loaded = load_model(model_arg(kw["model"]), model_options(kw))
    device = pick_device(kw["device"])
    ds = load_data(loaded, kw["data"], data_options(kw)) if kw["data"] else None
    lay = api.layer_table(loaded.patched, ds, device)  # `hardener.layers`' table, rendered here
    if kw["as_json"]:
        out(json.dumps(lay.to_dict(), indent=2))
        return
    from rich.table import Table

    table = Table(title=f"{kw['model']}: input {lay.input_shape}")
    widest = max((len(i["name"]) for i in lay.rows), default=4)
    # wrapped past 30 characters, never cut: a site name is what the user types next
    table.add_column("name", overflow="fold", min_width=min(30, widest))
    for col in ("type", "output shape", "params", "site", "fixer"):
        table.add_column(col)
    table.add_column("why", min_width=16)  # its reasons stay readable beside the other columns in 80 characters
    for i in lay.rows:
        why = i["reason"] or (f"not suggested: {lay.passed_over[i['name']]}" if i["name"] in lay.passed_over else "")
        m = i["fixer_macs"]
        shape = "×".join(map(str, i["shape"])) if i["shape"] else "—"
        table.add_row(i["name"], i["type"], shape, f"{i['params']:,}", (i["layout"] or "map") if i["site"] else "no",
                      "" if m is None else f"{C.fmt(m)} {100 * m / max(1, lay.base_macs):.0f}%", why)
    err_console.print(table)
    rec = lay.recipe
    err_console.print(f"fixer: the multiply-adds per image a fixer of the default recipe (--rho {rec['rho']:g}) would "
                      f"add at the site, and % of the base's {C.fmt(lay.base_macs)}")
    if lay.prefilter_macs is not None:
        err_console.print(f"pre-filter at the input (the default recipe's, --width {rec['width']}): "
                          f"{C.fmt(lay.prefilter_macs)} {100 * lay.prefilter_macs / max(1, lay.base_macs):.0f}%; "
                          "--budget sizes both to fit")
    if lay.stem:
        err_console.print(f"stem: {lay.stem} ({lay.why[lay.stem]})")
    if lay.suggested_sites:
        err_console.print("suggested sites (about 3 blocks by depth): "
                          + "; ".join(f"{s} ({lay.why[s]})" for s in lay.suggested_sites))
    else:
        err_console.print(f"suggested sites: none: {lay.note}")
    out(",".join(lay.suggested_sites))
