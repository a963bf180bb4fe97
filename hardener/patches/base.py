"""The patch-kind contract, and the registry of kinds by name.

A patch kind is an `nn.Module` class registered with `@register_patch_kind("name", placement=..., config_cls=...)`:

- `placement`: where it goes. "output": on a layer's output, `h -> patch(h)` (placed with --at); "input": on the
  model input after normalisation, site `input` (placed with --at KIND:input); "bn": the twin of a norm layer
  (BatchNorm, LayerNorm), `patch(out, inp)` on route adv only, in place of the layer (placed with --bn; its class
  attribute `norm_types` names the layer classes it copies, checked on loading); `out`, the layer's own output, is
  computed only when the patch's `uses_base` is true (absent: always), else it is None.
  "layer": a layer's replacement on route adv (a lora weight delta), `patch(out, inp, layer, *args, **kwargs)` (args
  and kwargs: the layer's other arguments) in place of the layer, placed with --at like an "output" kind, on the
  layer types its class attribute `layer_types` names; `out` as for "bn".
- `layouts` (class attribute, "output" kinds): the site layouts it serves, "map" (N,C,H,W feature maps, the
  default) and/or "tokens" (N,L,D token tensors of transformer blocks); sites of other layouts are refused, and
  `auto`/`stem` look for sites of these layouts only. A kind serving both picks its variant in `build`.
- `config_cls`: a dataclass of its options. A field declared with `optspec.option(default, lo=..., help=...)` is a
  user option (of `hardener.patch`, `harden patch` and harden.toml; its default, range, help and flag stated there
  once, `name=` for an option name other than the field's); other fields keep their defaults. `make_config(options)`
  reads the fields by option name from the run's options (`api.PatchOptions`, a dict, ...) and checks them; options
  that are None or absent keep the field's default.
- `build(site, config)`: a new patch for `site` (a `Site`: its name, module and output shape, C,H,W or L,D) that
  starts as the identity (a zero-initialised last layer): the freshly patched model equals the base exactly.
- `extra_spec()`: what the manifest stores beside kind and site; `from_spec(spec)` rebuilds the patch from it;
  `restore(spec, module)` is what loading calls, with the base's layer at the site (None at the input): by default
  `from_spec(spec)`; a kind that copies its layer (auxbn) copies it again there.
- `spec_fields()`: manifest field -> (check, requirement[, default]), applied to a stored spec before anything is
  built (checkpoints may be hostile); `numel(spec)`: the elements its tensors will take, without allocating them.
- `check_site(info, config)`: refuse a site it cannot serve (`layers.LayerInfo` of the dry run).
- `may_mask`: the patch may mask gradients (an input transform, a denoising filter): evaluation also attacks it
  with BPDA (identity in the backward pass).

The defaults below serve a kind whose constructor is `cls(channels, config)` and that keeps `self.config`.
"""
from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass, fields
from typing import Any, Callable, ClassVar

import torch
from torch import nn

from ..errors import InputError
from ..options import optspec, owners
from ..options import validate as V

INPUT_SITE = "input"  # the model's input (after normalisation): the site of "input" kinds
PLACEMENTS = ("output", "input", "bn", "layer")
REPLACING = ("bn", "layer")  # placements that run instead of their layer on route adv (`attach.PatchedModel`)
DEFAULT_SITE_KIND = "fixer"  # the kind of --at sites when --method names none
DEFAULT_BN_KIND = "auxbn"  # the kind --bn places
MAP, TOKENS = "map", "tokens"  # the layouts of a site's output: N,C,H,W feature maps, N,L,D token tensors
LAYOUT_WORDS = {MAP: "a channels-first feature map (N,C,H,W)", TOKENS: "tokens (N,L,D)"}

CHANNELS = (V.int_in(1, V.MAX_CHANNELS), f"must be an integer in 1..{V.MAX_CHANNELS}")
BOOL = (lambda v: isinstance(v, bool), "must be true or false")
FINITE = (V.number(-1e6, 1e6), "must be a finite number")


def choice(values) -> tuple[Callable[[Any], bool], str]:
    """A spec-field rule: one of `values` (strings)."""
    values = tuple(values)
    return (lambda v: isinstance(v, str) and v in values), f"must be one of {', '.join(values)}"


@dataclass
class Site:
    """Where a patch goes: the layer's name (`input` for the model input), its module, its output shape without the
    batch axis (C,H,W for a feature map, L,D for tokens)."""

    name: str
    module: nn.Module
    shape: list[int]


@dataclass
class NoOptions:
    """The options of a kind that has none."""


class PatchKind(nn.Module):
    """Base class of patch kinds: the contract's defaults (see the module docstring)."""

    kind: ClassVar[str] = ""
    placement: ClassVar[str] = "output"
    config_cls: ClassVar[type] = NoOptions
    may_mask: ClassVar[bool] = False
    layouts: ClassVar[tuple[str, ...]] = (MAP,)

    @classmethod
    def make_config(cls, options: Any = None) -> Any:
        """`config_cls` from the run's options (an object or a dict), field by field; None keeps the default."""
        return optspec.read(cls.config_cls, lambda _, name: options.get(name) if isinstance(options, dict)
                            else getattr(options, name, None))

    @classmethod
    def build(cls, site: Site, config: Any) -> "PatchKind":
        """A new patch for `site`, the identity until trained."""
        return cls(site.shape[0], config)

    @classmethod
    def check_site(cls, info: Any, config: Any) -> None:
        """Raise `InputError` when the dry run shows this kind cannot serve the site."""

    def extra_spec(self) -> dict[str, Any]:
        """What the manifest stores beside kind and site."""
        return {"channels": self.channels, **asdict(self.config)}

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> "PatchKind":
        """The patch a (validated) manifest spec describes, before its tensors are loaded."""
        names = {f.name for f in fields(cls.config_cls)}
        return cls(spec["channels"], cls.config_cls(**{k: v for k, v in spec.items() if k in names}))

    @classmethod
    def restore(cls, spec: dict[str, Any], module: nn.Module | None) -> "PatchKind":
        """The patch a (validated) manifest spec describes at `module`, the base's layer at its site (None at the
        input), before its tensors are loaded. By default `from_spec(spec)`."""
        return cls.from_spec(spec)

    @classmethod
    def spec_fields(cls) -> dict[str, tuple]:
        """By default: channels, then each config field checked by its type (bool, int, float, str)."""
        rules: dict[str, tuple] = {"channels": CHANNELS}
        by_type = {"bool": BOOL, "int": (V.int_in(-(1 << 30), 1 << 30), "must be an integer"), "float": FINITE,
                   "str": (V.text(), "must be a string")}
        for f in fields(cls.config_cls):
            t = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", "")
            if t not in by_type:
                raise TypeError(f"patch kind '{cls.kind}': give spec_fields() for config field '{f.name}' ({t})")
            rules[f.name] = (*by_type[t], ... if f.default is MISSING else f.default)
        return rules

    @classmethod
    def numel(cls, spec: dict[str, Any]) -> int:
        """By default: the patch built on the meta device (no memory), its parameters and buffers counted."""
        with torch.device("meta"):
            patch = cls.from_spec(spec)
        return sum(t.numel() for t in [*patch.parameters(), *patch.buffers()])


KINDS: dict[str, type[PatchKind]] = {}


def register_patch_kind(name: str, placement: str = "output",
                        config_cls: type = NoOptions) -> Callable[[type[PatchKind]], type[PatchKind]]:
    """Class decorator: register a patch kind under `name` (a `--method` choice, and KIND in `--at KIND:SITE`)."""
    if placement not in PLACEMENTS:
        raise ValueError(f"patch kind '{name}': placement must be one of {', '.join(PLACEMENTS)}")

    def wrap(cls: type[PatchKind]) -> type[PatchKind]:
        if not (isinstance(cls, type) and issubclass(cls, PatchKind)):
            raise TypeError(f"patch kind '{name}' must subclass hardener.patches.PatchKind")
        cls.kind, cls.placement, cls.config_cls = name, placement, config_cls
        owners.admit(KINDS, name, cls)
        return cls
    return wrap


def get(name: str) -> type[PatchKind]:
    """The kind registered as `name` (an `InputError` listing the others if there is none)."""
    if name not in KINDS:
        raise InputError(f"unknown patch kind '{name}' (available: {', '.join(KINDS)})")
    return KINDS[name]


def site_kinds() -> tuple[str, ...]:
    """Kinds placed with --at (on a layer's output or the model input), in registration order."""
    return tuple(n for n, k in KINDS.items() if k.placement != "bn")


def bn_kinds() -> tuple[str, ...]:
    """Kinds placed with --bn (twins of BatchNorm and LayerNorm layers)."""
    return tuple(n for n, k in KINDS.items() if k.placement == "bn")
