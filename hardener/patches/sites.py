"""Where patches go: `--at` / `--at-regex` parsed and checked against the dry run, the suggested sites, `--bn`.

Every name is resolved before anything is attached (a bad name leaves the model untouched); unknown names list the
closest existing ones.
"""
from __future__ import annotations

import difflib
import re
from typing import Any

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..errors import InputError
from .base import DEFAULT_SITE_KIND, INPUT_SITE, KINDS

AUTO = "auto"  # in --at: the suggested sites (about three blocks by depth)
STEM = "stem"  # in --at: the first valid site among the top-level modules (the network's stem)


def parse_sites(at: str | None, at_regex: str | None, names: list[str],
                default_kind: str = DEFAULT_SITE_KIND) -> list[tuple[str, str]]:
    """Resolve `--at` (comma list, `KIND:SITE` entries) and `--at-regex` to (kind, site) pairs.

    Every name is checked before anything is attached; unknown names list the closest ones.
    """
    out: list[tuple[str, str]] = []
    for entry in [e.strip() for e in (at or "").split(",") if e.strip()]:
        kind, site = entry.split(":", 1) if ":" in entry else (default_kind, entry)
        if kind not in KINDS:
            raise InputError(f"unknown patch kind '{kind}' in '{entry}' (available: {', '.join(KINDS)})")
        if site not in names and site != INPUT_SITE:
            close = difflib.get_close_matches(site, names, n=5, cutoff=0.3) or names[:5]
            raise InputError(f"--at '{site}' matches no layer of the model; closest names: {', '.join(close)} "
                             "(see `harden layers`)")
        out.append((kind, site))
    if at_regex:
        try:
            rx = re.compile(at_regex)
        except re.error as e:
            raise InputError(f"--at-regex '{at_regex}' is not a valid regular expression: {e}") from None
        hits = [n for n in names if n and rx.fullmatch(n)]
        if not hits:
            raise InputError(f"--at-regex '{at_regex}' matches no layer name (it must match a whole name; "
                             f"names look like: {', '.join(names[1:6])})")
        out.extend((default_kind, n) for n in hits if (default_kind, n) not in out)
    seen = set()
    for _, site in out:
        if site in seen:
            raise InputError(f"site '{site}' is named twice")
        seen.add(site)
    return out


def _stem(infos: list) -> list[str]:
    top = [i.name for i in infos if i.site and "." not in i.name]
    return top[:1]


def select_sites(net: nn.Module, infos: list, at: str | None, at_regex: str | None, options: Any = None,
                 default_kind: str = DEFAULT_SITE_KIND) -> list[tuple[str, str]]:
    """The (kind, site) pairs to patch: named ones, checked against the dry run, or suggested ones. `options` (the
    run's options) go to each kind's `check_site`."""
    entries = [e.strip() for e in (at or "").split(",") if e.strip()]
    if entries or at_regex:
        named = [e for e in entries if e.split(":")[-1] not in (AUTO, STEM)]
        sites = parse_sites(",".join(named), at_regex, [i.name for i in infos], default_kind)
        for e in entries:
            word = e.split(":")[-1]
            if word in (AUTO, STEM):  # `auto`: the suggested sites; `stem`: the first one in the forward
                kind = e.split(":")[0] if ":" in e else default_kind
                picked = suggest_sites(net, infos) if word == AUTO else _stem(infos)
                sites += [(kind, s) for s in picked if s not in {x for _, x in sites}]
    else:
        sites = [(default_kind, s) for s in suggest_sites(net, infos)]
    by_name = {i.name: i for i in infos}
    for kind, site in sites:
        cls = KINDS[kind]
        if cls.placement == "bn":
            raise InputError(f"'{kind}' patches are twins of BatchNorm layers: name those with --bn, not --at")
        wants_input = cls.placement == "input"
        if (site == INPUT_SITE) != wants_input:
            raise InputError(f"'{kind}' patches go {'only' if wants_input else 'never'} at the model input "
                             f"(site '{INPUT_SITE}'): " + (f"use --at {kind}:{INPUT_SITE}" if wants_input else
                                                          "use the prefilter kind there"))
        if site == INPUT_SITE:
            continue
        info = by_name[site]
        if not info.site:
            raise InputError(f"'{site}' is not a valid {kind} site: {info.reason}")
        cls.check_site(info, cls.make_config(options))
    return sites


def suggest_sites(model: nn.Module, infos: list, parts: int = 3) -> list[str]:
    """Sites that split the network into about `parts` blocks by depth (the paper's b = 3).

    Candidates are the valid sites among the top-level children (or, if fewer than `parts`
    exist there, the shallowest level that has enough); we take the ones closest to the
    1/parts, 2/parts, ... depth quantiles, never the last layer.
    """
    valid = {i.name for i in infos if i.site}
    order = [i.name for i in infos]
    for depth in range(1, 6):
        cands = [n for n in order if n in valid and n.count(".") == depth - 1]
        if len(cands) >= parts:
            break
    else:
        cands = [n for n in order if n in valid]
    if not cands:
        raise InputError("the model has no valid fixer site (no module outputs a 4-D feature map once per forward)")
    # Position by depth in the module order (forward order approximated by registration order).
    leafs = [n for n, m in model.named_modules() if n and not list(m.children())]
    pos = {}
    for c in cands:
        idx = [k for k, leaf in enumerate(leafs) if leaf == c or leaf.startswith(c + ".")]
        pos[c] = (max(idx) + 1) / max(1, len(leafs)) if idx else 0.0
    chosen: list[str] = []
    for q in [k / parts for k in range(1, parts)]:
        best = min((c for c in cands if c not in chosen and pos[c] < 0.999), key=lambda c: abs(pos[c] - q),
                   default=None)
        if best is not None:
            chosen.append(best)
    return sorted(chosen, key=order.index)


def bn_names(net: nn.Module) -> list[str]:
    return [n for n, m in net.named_modules() if isinstance(m, _BatchNorm)]


def select_bn_sites(net: nn.Module, spec: str) -> list[str]:
    """`--bn NAMES|REGEX|all|auto`: BatchNorm layers with running statistics, checked one by one. `auto` is
    `all` on a model that has such layers and none (no error) on one that has not."""
    names = bn_names(net)
    if spec.strip() == "auto":
        return names
    frozen = [n for n, m in net.named_modules() if "batchnorm" in type(m).__name__.lower() and n not in names]
    if not names:
        extra = f" ({len(frozen)} frozen/fused norm layers such as '{frozen[0]}' cannot get twins)" if frozen else ""
        raise InputError(f"the model has no BatchNorm layers with running statistics{extra}: auxiliary BNs need "
                         "them; use fixer or denoise patches instead")
    spec = spec.strip()
    if spec == "all":
        chosen = names
    elif all(p.strip() in dict(net.named_modules()) for p in spec.split(",")):
        chosen = [p.strip() for p in spec.split(",")]
    else:
        try:
            rx = re.compile(spec)
        except re.error as e:
            raise InputError(f"--bn '{spec}' is neither a list of layer names nor a valid regex: {e}") from None
        chosen = [n for n in names if rx.fullmatch(n)]
        if not chosen:
            raise InputError(f"--bn '{spec}' matches no BatchNorm layer (they are named like: "
                             f"{', '.join(names[:5])}); pass names, a regex matching whole names, or 'all'")
    modules = dict(net.named_modules())
    for n in chosen:
        m = modules[n]
        if not isinstance(m, _BatchNorm):
            raise InputError(f"--bn '{n}' is a {type(m).__name__}, not a BatchNorm layer (BatchNorm layers: "
                             f"{', '.join(names[:5])}{', ...' if len(names) > 5 else ''})")
        if not m.track_running_stats or m.running_mean is None:
            raise InputError(f"--bn '{n}' keeps no running statistics (track_running_stats=False): "
                             "it cannot get an auxiliary twin")
    return chosen

