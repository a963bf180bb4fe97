"""Where patches go: `--at` / `--at-regex` parsed and checked against the dry run, the suggested sites, `--bn`.

Every name is resolved before anything is attached (a bad name leaves the model untouched); unknown names list the
closest existing ones.
"""
from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass
from typing import Any, Callable, Collection, Iterable

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

from ..errors import InputError
from .base import DEFAULT_SITE_KIND, INPUT_SITE, KINDS, LAYOUT_WORDS, MAP, TOKENS
from .lora import layer_ok

AUTO = "auto"  # in --at: the suggested sites (about three blocks by depth)
STEM = "stem"  # in --at: the outermost site around the first convolution that is not a trunk container


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


def select_sites(net: nn.Module, infos: list, at: str | None, at_regex: str | None, options: Any = None,
                 default_kind: str = DEFAULT_SITE_KIND, avoid: Iterable[str] = (),
                 say: Callable[[str], None] = lambda s: None) -> list[tuple[str, str]]:
    """The (kind, site) pairs to patch: named ones, checked against the dry run, or suggested ones. `options` (the
    run's options) go to each kind's `check_site`; `avoid`: layers the suggestion must not pick (norm layers that
    get twins); `say` hears what `stem` and `auto` resolved to, and why. `auto` and `stem` look for sites of the
    layouts their kind serves (a fixer: feature maps and tokens; a denoise block: feature maps only)."""
    entries = [e.strip() for e in (at or "").split(",") if e.strip()]
    heard: dict[tuple[str, ...], tuple[Suggestion, list[str]]] = {}  # by layouts: the suggestion, the words asking

    def consult(kind: str, word: str) -> Suggestion:
        if kind not in KINDS:
            raise InputError(f"unknown patch kind '{kind}' in '{kind}:{word}' (available: {', '.join(KINDS)})")
        layouts = KINDS[kind].layouts
        if layouts not in heard:
            heard[layouts] = (suggest(net, infos, avoid=avoid, layouts=layouts), [])
        heard[layouts][1].append(word)
        return heard[layouts][0]

    if entries or at_regex:
        named = [e for e in entries if e.split(":")[-1] not in (AUTO, STEM)]
        sites = parse_sites(",".join(named), at_regex, [i.name for i in infos], default_kind)
        for e in entries:
            word = e.split(":")[-1]
            if word in (AUTO, STEM):  # `auto`: the suggested sites; `stem`: the module around the first conv
                kind = e.split(":")[0] if ":" in e else default_kind
                if kind in KINDS and KINDS[kind].placement == "layer":  # every layer it serves; `stem`: the first
                    picked = layer_sites(net, infos, KINDS[kind].layer_types)[:1 if word == STEM else None]
                    shown = ", ".join(picked[:4]) + (", ..." if len(picked) > 4 else "")
                    say(f"--at {e}: {len(picked)} layer(s) ({shown})" if picked else
                        f"--at {e}: no site (no {kind} layer runs in the forward)")
                    sites += [(kind, s) for s in picked if s not in {x for _, x in sites}]
                    continue
                sug = consult(kind, word)
                picked = sug.sites if word == AUTO else [sug.stem] if sug.stem else []
                if not picked:
                    why = sug.note if word == AUTO else "none of this kind around the first convolution"
                    say(f"--at {e}: no site ({why})")
                sites += [(kind, s) for s in picked if s not in {x for _, x in sites}]
        if not sites:
            notes = [sug.note for sug, _ in heard.values()]
            raise InputError(f"--at {at}: no site to patch ({notes[0] if notes else 'nothing named'})")
    elif default_kind in KINDS and KINDS[default_kind].placement == "layer":
        sites = [(default_kind, s) for s in layer_sites(net, infos, KINDS[default_kind].layer_types)]
        if not sites:
            raise InputError(f"no {default_kind} layer runs in the model's forward: nothing to patch")
    else:
        sug = consult(default_kind, AUTO)
        if not sug.sites:
            raise InputError(sug.note)
        sites = [(default_kind, s) for s in sug.sites]
    for sug, words in heard.values():
        for line in sug.explain(words):
            say(line)
    _check_sites(sites, infos, options, net)
    return sites


def layer_sites(net: nn.Module, infos: list, types: tuple[type, ...]) -> list[str]:
    """The layers of `types` that the eval-mode forward runs (the dry run's `infos`), in the order they finish."""
    modules = dict(net.named_modules())
    ran = sorted((i for i in infos if i.calls and i.name in modules and isinstance(modules[i.name], types)),
                 key=lambda i: i.order if i.order is not None else 1 << 30)
    return [i.name for i in ran]


def _check_sites(sites: list[tuple[str, str]], infos: list, options: Any, net: nn.Module) -> None:
    by_name = {i.name: i for i in infos}
    for kind, site in sites:
        cls = KINDS[kind]
        if cls.placement == "bn":
            raise InputError(f"'{kind}' patches are twins of BatchNorm layers: name those with --bn, not --at")
        if cls.placement == "layer":
            _check_layer_site(kind, site, by_name, net)
            continue
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
        layout = info.layout or MAP
        if layout not in cls.layouts:
            takers = [n for n, k in KINDS.items() if k.placement == "output" and layout in k.layouts]
            raise InputError(f"'{site}' outputs {LAYOUT_WORDS[layout]}, which {kind} patches do not take (they take "
                             f"{' or '.join(LAYOUT_WORDS[w] for w in cls.layouts)})"
                             + (f": put {' or '.join(takers)} patches there" if takers else ""))
        cls.check_site(info, cls.make_config(options))


def _check_layer_site(kind: str, site: str, by_name: dict, net: nn.Module) -> None:
    """A site of a kind that replaces its layer (lora): a layer of the kind's types that the forward runs."""
    if site == INPUT_SITE:
        raise InputError(f"'{kind}' patches go on a layer's weight, not at the model input: name a layer")
    why = layer_ok(net.get_submodule(site))
    if why:
        raise InputError(f"--at {kind}:{site}: '{site}' {why}")
    if not by_name[site].calls:
        raise InputError(f"--at {kind}:{site}: '{site}' never runs in the model's forward (eval mode), so its "
                         "patch would never be used")


def suggest_sites(model: nn.Module, infos: list, parts: int = 3, avoid: Iterable[str] = (),
                  layouts: tuple[str, ...] = (MAP, TOKENS)) -> list[str]:
    """Sites that split the network into about `parts` blocks by depth (the paper's b = 3): `suggest(...).sites`,
    an `InputError` saying why when there is none."""
    sug = suggest(model, infos, parts, avoid, layouts)
    if not sug.sites:
        raise InputError(sug.note)
    return sug.sites


@dataclass
class Suggestion:
    """What `auto` and `stem` resolve to, and why: the chosen sites, the stem, the valid sites the search met and
    passed over with why (stem, trunk container, 1x1 map, a BN that gets a twin), a note when nothing was chosen."""

    sites: list[str]
    stem: str | None
    why: dict[str, str]
    skipped: dict[str, str]
    note: str = ""

    def explain(self, words: list[str]) -> list[str]:
        """Lines for stderr: what each of `words` (auto, stem, or the sites named) resolved to, and why."""
        lines = []
        if self.stem and any(w.split(":")[-1] == STEM for w in words):
            lines.append(f"site stem -> {self.stem} ({self.why[self.stem]})")
        if any(w.split(":")[-1] == AUTO for w in words) and self.sites:
            lines.append("sites auto -> " + "; ".join(f"{s} ({self.why[s]})" for s in self.sites))
            passed = [f"{n} ({why})" for n, why in self.skipped.items()]
            if passed:
                lines.append("  passed over: " + "; ".join(passed[:6]) + ("; ..." if len(passed) > 6 else ""))
        return lines


def suggest(model: nn.Module, infos: list, parts: int = 3, avoid: Iterable[str] = (),
            layouts: tuple[str, ...] = (MAP, TOKENS)) -> Suggestion:
    """Block outputs that split the network into about `parts` parts by depth, and the stem.

    Never a stem (the first conv/norm/activation group, or the module `stem` names), a whole-trunk container (one
    holding more than half of the network's layers: torchvision's `features` or ViT `encoder.layers`, timm's
    `blocks` or `stages`; its stages are looked at instead), a 1x1 map or a single token, an attention module's own
    output, anything `avoid` names or inside it; invalid sites (attention internals, channels-last tensors) never
    are, nor sites whose layout is not in `layouts` ("map": N,C,H,W feature maps; "tokens": N,L,D, a transformer
    block's output). Candidates are the outermost remaining sites (a container that is passed over is looked into);
    we take the ones closest to the 1/parts, 2/parts, ... depth quantiles (by the position of their last layer),
    never the last layer.
    """
    tree = _Tree(model, infos, layouts)
    stem = tree.stem()
    skipped = {n: why for n in tree.order if tree.ok(n) for why in [tree.skip(n, stem, set(avoid))] if why}
    cands = tree.frontier(tree.top, skipped, stem)
    passed = {n: why for n, why in skipped.items() if n in tree.seen}
    while 0 < len(cands) < parts:
        finer = [c for n in cands for c in (tree.frontier(tree.children[n], skipped, stem) or [n])]
        if finer == cands:
            break
        cands = finer
    chosen: list[str] = []
    for q in [k / parts for k in range(1, parts)]:
        best = min((c for c in cands if c not in chosen and tree.pos(c) < 0.999), key=lambda c: abs(tree.pos(c) - q),
                   default=None)
        if best is not None:
            chosen.append(best)
    chosen.sort(key=tree.order.index)
    why = {c: f"block output at {100 * tree.pos(c):.0f}% depth, {_shape(tree.by_name[c])}" for c in chosen}
    if stem:
        why[stem] = (f"the outermost module around the first convolution that is not a trunk container, "
                     f"{_shape(tree.by_name[stem])}")
    note = "" if chosen else (
        f"the model has no {' or '.join({MAP: 'feature-map', TOKENS: 'token'}[w] for w in layouts)} site to suggest"
        + (f" besides the stem ('{stem}')" if stem else "") + " (a site is a module whose output is "
        + " or ".join(LAYOUT_WORDS[w] for w in layouts) + ", computed once per forward; "
        "`harden layers` says why each module is not)")
    if not chosen and stem and tree.skip(stem, None, set(avoid)) in ("", "stem"):
        chosen = [stem]  # the last resort (a one-conv model, a ViT for a map-only kind): the only site there is
        what = " or ".join({MAP: "a feature map", TOKENS: "tokens"}[w] for w in layouts)
        why = {stem: f"the stem: no other module outputs {what}; {why[stem]}"}
        passed.pop(stem, None)  # chosen after all: not "passed over" too (torchvision's ViT, whose conv_proj is seen)
    elif not chosen:
        note += ": name sites with --at"
    return Suggestion(chosen, stem, why, passed, note)


def _shape(info) -> str:
    if info.layout == TOKENS and len(info.shape) == 3:  # a channels-last trunk's map: tokens on an H,W grid
        return f"{info.shape[0]}x{info.shape[1]} tokens x {info.shape[2]} (channels-last)"
    if info.layout == TOKENS:
        return f"{info.shape[0]} tokens x {info.shape[1]}"
    return "x".join(map(str, info.shape))


class _Tree:
    """The module tree as the dry run saw it: called leaves in order, each module's span of them."""

    def __init__(self, model: nn.Module, infos: list, layouts: tuple[str, ...] = (MAP, TOKENS)) -> None:
        self.layouts = layouts
        self.by_name = {i.name: i for i in infos}
        self.attention = {i.reason.split("'")[1] for i in infos if i.reason.startswith("inside attention '")}
        self.order = [i.name for i in infos]
        mods = dict(model.named_modules())
        self.modules = mods
        self.children = {n: [f"{n}.{c}" if n else c for c, _ in m.named_children()] for n, m in mods.items()}
        self.top = self.children.get("", [])
        self.leaves = [n for n in self.order if not self.children.get(n) and self.by_name[n].calls > 0]
        self.span: dict[str, tuple[int, int, int]] = {}  # name -> (first leaf, last leaf, leaves)
        for k, leaf in enumerate(self.leaves):
            parts = leaf.split(".")
            for d in range(1, len(parts) + 1):
                n = ".".join(parts[:d])
                first, _, count = self.span.get(n, (k, k, 0))
                self.span[n] = (first, k, count + 1)
        self.stem_end = self._stem_group()
        self.seen: set[str] = set()  # the sites `frontier` met

    def ok(self, name: str) -> bool:
        """A valid site of one of the layouts looked for."""
        info = self.by_name.get(name)
        return bool(info is not None and info.site and (info.layout or MAP) in self.layouts)

    def pos(self, name: str) -> float:
        """Depth of a module's output: the fraction of the network's layers that have run when it is computed."""
        return (self.span[name][1] + 1) / max(1, len(self.leaves)) if name in self.span else 0.0

    def trunk(self, name: str) -> bool:
        return bool(self.children.get(name)) and self.span.get(name, (0, 0, 0))[2] > len(self.leaves) / 2

    def _stem_group(self) -> int:
        """Index of the last leaf of the first conv -> norm -> activation group (-1 without a convolution)."""
        first = next((k for k, n in enumerate(self.leaves) if isinstance(self.modules[n], _ConvNd)), None)
        if first is None:
            return -1
        end, seen = first, set()
        for k in range(first + 1, len(self.leaves)):
            kind = _role(self.modules[self.leaves[k]])
            if kind is None or kind in seen:
                break
            if kind != "pass":
                seen.add(kind)
            end = k
        return end

    def in_stem_group(self, name: str) -> bool:
        return name in self.span and self.span[name][1] <= self.stem_end

    def stem(self) -> str | None:
        """The outermost valid site around the network's first convolution that is not a trunk container (the first
        valid top-level site on a model without convolutions)."""
        first = next((n for n in self.leaves if isinstance(self.modules[n], _ConvNd)), None)
        if first is None:
            return next((n for n in self.top if self.ok(n)), None)
        around = [n for n in self.order if (first == n or first.startswith(n + ".")) and self.ok(n)
                  and not self.trunk(n)]
        return min(around, key=lambda n: n.count("."), default=None)

    def skip(self, name: str, stem: str | None, avoid: set[str]) -> str:
        """Why a valid site is never suggested ('' if it may be)."""
        info = self.by_name[name]
        if name == stem or self.in_stem_group(name):
            return "stem"
        if self.trunk(name):
            return f"trunk container ({100 * self.span[name][2] / len(self.leaves):.0f}% of the network's layers)"
        if info.layout == TOKENS and math.prod(info.shape[:-1]) == 1:
            return "a single token (a pooled vector)"
        if _role(self.modules[name]) == "pass" and "drop" in name.rsplit(".", 1)[-1].lower():
            return "a drop-path or dropout layer (a branch before its residual sum)"
        if info.layout != TOKENS and info.shape[1] * info.shape[2] == 1:
            return "1x1 map (no spatial extent left)"
        if name in self.attention:
            return "an attention module's own output (the branch before its residual sum)"
        twin = next((a for a in avoid if name == a or name.startswith(a + ".")), None)
        if twin is not None:
            norm = "LayerNorm" if isinstance(self.modules.get(twin), nn.LayerNorm) else "BatchNorm layer"
            return f"a {norm} that gets an auxiliary twin"
        return ""

    def frontier(self, names: list[str], skipped: dict[str, str], stem: str | None) -> list[str]:
        """The outermost sites under `names` that may be suggested: a site passed over as a trunk or the stem, or a
        module that is no site of the layouts looked for (a tuple output, tokens for a map-only kind), is looked
        into (a block with a tuple output offers the site it computes last), as are the members of a ModuleList;
        attention internals, 1x1 maps and avoided layers are not."""
        out = []
        for n in names:
            info = self.by_name.get(n)
            if info is None or info.calls == 0:
                if isinstance(self.modules.get(n), (nn.ModuleList, nn.ModuleDict)):  # never called: its members are
                    out += self.frontier(self.children.get(n, []), skipped, stem)
                continue
            self.seen.add(n)
            if self.ok(n) and n not in skipped:
                out.append(n)
            elif (n == stem or self.trunk(n) or (not self.ok(n) and not info.reason.startswith("inside attention"))) \
                    and not self.in_stem_group(n):
                inner = self.frontier(self.children.get(n, []), skipped, stem)
                if inner and info.shape is None and n != stem and not self.trunk(n):
                    # a block whose output is no tensor (Hugging Face layers return tuples): the site it computes last
                    # (its residual sum, not the norms and branches inside) stands for its output
                    inner = [max(inner, key=lambda c: self.by_name[c].order or 0)]
                out += inner
        return out


def _role(m: nn.Module) -> str | None:
    """A layer's role in a conv -> norm -> activation group: norm, act, pass (identity, dropout) or None."""
    cls = type(m).__name__.lower()
    if isinstance(m, (nn.Identity, nn.modules.dropout._DropoutNd)):
        return "pass"
    if isinstance(m, (_BatchNorm, nn.LayerNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm)) or "norm" in cls:
        return "norm"
    if type(m).__module__ == "torch.nn.modules.activation" or any(w in cls for w in ACT_WORDS):
        return "act"
    return None


ACT_WORDS = ("relu", "silu", "swish", "gelu", "mish", "sigmoid", "tanh", "act")


def bn_names(net: nn.Module) -> list[str]:
    return [n for n, m in net.named_modules() if isinstance(m, _BatchNorm)]


def ln_names(net: nn.Module) -> list[str]:
    """LayerNorm layers with affine parameters (the twin of one without would have nothing to train)."""
    return [n for n, m in net.named_modules() if isinstance(m, nn.LayerNorm) and m.elementwise_affine]


def select_bn_sites(net: nn.Module, spec: str, ran: Collection[str] | None = None,
                    say: Callable[[str], None] = lambda s: None) -> list[str]:
    """`--bn NAMES|REGEX|all|auto`: the norm layers that get auxiliary twins, checked one by one: BatchNorm layers
    with running statistics, or LayerNorm layers with affine parameters. `all` is every BatchNorm, or every LayerNorm
    on a model without BatchNorm (a vision transformer); names and regexes may pick either; `auto` is `all` on a
    model that has such layers and none (no error) on one that has not. `ran`: the modules the eval-mode forward
    calls (the dry run's); a norm it never calls (GoogLeNet's auxiliary heads, which run in training only) gets no
    twin: `all`, `auto` and regexes leave it out (`say` hears which), a name is an error."""
    chosen = _pick_norms(net, spec.strip())
    if spec.strip() == "auto" and not chosen:  # squeezenet (no norms), PoolFormer (GroupNorms): said, not silent
        groups = sum(isinstance(m, nn.GroupNorm) for m in net.modules())
        say("--bn auto: the model has no BatchNorm with running statistics and no LayerNorm with affine parameters"
            + (f" (its {groups} GroupNorm layers get no twins)" if groups else "") + ": no twins; the site patches train")
    if ran is None:
        return chosen
    idle = [n for n in chosen if n not in ran]
    if idle and spec.strip() not in ("all", "auto") and all(p.strip() in chosen for p in spec.split(",")):
        raise InputError(f"--bn '{idle[0]}' never runs in the model's forward (eval mode), so its twin would never "
                         "be used: name norm layers that run")
    if idle:
        say(f"--bn {spec.strip()}: {len(idle)} norm layer(s) never run in the eval-mode forward and get no twin "
            f"({', '.join(idle[:3])}{', ...' if len(idle) > 3 else ''})")
    chosen = [n for n in chosen if n in ran]
    if not chosen and spec.strip() != "auto":
        raise InputError(f"--bn {spec.strip()}: none of the norm layers it names runs in the model's forward (eval "
                         "mode): no twin to train")
    return chosen


def _pick_norms(net: nn.Module, spec: str) -> list[str]:
    """The norm layers `--bn` names (`select_bn_sites`), before asking which run."""
    names = bn_names(net)
    family = names or ln_names(net)
    if spec == "auto":
        return family
    frozen = [n for n, m in net.named_modules() if "batchnorm" in type(m).__name__.lower() and n not in names]
    if not family:
        extra = f" ({len(frozen)} frozen/fused norm layers such as '{frozen[0]}' cannot get twins)" if frozen else ""
        raise InputError(f"the model has no BatchNorm layers with running statistics and no LayerNorm layers with "
                         f"affine parameters{extra}: auxiliary twins need them; use fixer or denoise patches instead")
    norms = names + ln_names(net)
    modules = dict(net.named_modules())
    if spec == "all":
        chosen = family
    elif all(p.strip() in modules for p in spec.split(",")):
        chosen = [p.strip() for p in spec.split(",")]
    else:
        try:
            rx = re.compile(spec)
        except re.error as e:
            raise InputError(f"--bn '{spec}' is neither a list of layer names nor a valid regex: {e}") from None
        chosen = [n for n in norms if rx.fullmatch(n)]
        if not chosen:
            raise InputError(f"--bn '{spec}' matches no BatchNorm or LayerNorm layer (they are named like: "
                             f"{', '.join(norms[:5])}); pass names, a regex matching whole names, or 'all'")
    for n in chosen:
        _check_norm(n, modules[n], norms)
    return chosen


def _check_norm(name: str, m: nn.Module, norms: list[str]) -> None:
    """A layer named in --bn can get an auxiliary twin (an `InputError` saying why not)."""
    if isinstance(m, nn.LayerNorm):
        if not m.elementwise_affine:
            raise InputError(f"--bn '{name}' is a LayerNorm without affine parameters: its twin would have nothing "
                             "to train")
        return
    if not isinstance(m, _BatchNorm):
        raise InputError(f"--bn '{name}' is a {type(m).__name__}, not a BatchNorm or LayerNorm layer (norm layers: "
                         f"{', '.join(norms[:5])}{', ...' if len(norms) > 5 else ''})")
    if not m.track_running_stats or m.running_mean is None:
        raise InputError(f"--bn '{name}' keeps no running statistics (track_running_stats=False): "
                         "it cannot get an auxiliary twin")
