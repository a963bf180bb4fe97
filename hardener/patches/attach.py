"""Attach patches to named layers of a frozen base through forward hooks.

The base module tree, its names and buffers are never edited; a patch receives the output
of its site and returns a new output. `PatchedModel.train()` only ever trains the patches.

A norm layer's twin (placement "bn") is no hook, nor is a lora weight delta (placement "layer"): each replaces its
layer's computation, through an instance attribute `forward` that shadows the layer's own method (`_twin_forward`),
so that route adv runs the patch *instead of* the base layer (a hook would run the base layer first and throw its
output away: in issue 30's profile of a light patch at batch 256, batch norm went from 4% to 10% of the patched
forward's op time). The attribute holds no tensors (state_dict and named_modules are the base's) and copies of the
base drop it (`_bare_copy`, `auxbn.twin_of`).
"""
from __future__ import annotations

import contextlib
import copy
import inspect
from typing import Any, Iterator

import torch
from torch import nn

from ..errors import InputError
from ..model.classifier import Classifier
from .base import INPUT_SITE, REPLACING

ROUTES = ("adv", "main")


def _key(site: str) -> str:
    return site.replace(".", "__")


FUSED = (nn.TransformerEncoderLayer,)  # layers whose fused fast path reads their sublayers' weights itself


def _fused_parents(net: nn.Module, site: str) -> list[str]:
    """The layers around `site` (the net itself included, as "") whose fused inference path would skip a patch that
    replaces the layer at `site`: torch runs nn.TransformerEncoderLayer as one kernel in eval mode unless a forward
    hook sits on it or inside it (`_no_fast_path`)."""
    parts = site.split(".")
    names = [".".join(parts[:i]) for i in range(len(parts))]
    return [n for n in names if isinstance(net.get_submodule(n), FUSED)]


def _no_fast_path(_module, _inp):
    """A forward pre-hook that does nothing: on a nn.TransformerEncoderLayer, it turns off the fused path (torch
    checks for hooks), so that the layer runs its sublayers, and with them the patches replacing them."""


_no_fast_path.harden_patch = True


def drop_twin_forward(module: nn.Module) -> None:
    """Remove a twin's forward (`PatchedModel._twin_forward`) from a copy of a norm layer: its own method again."""
    if getattr(module.__dict__.get("forward"), "harden_patch", False):
        del module.forward


RUN_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
             "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks")  # what runs with a forward
STATE_HOOKS = ("_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
               "_load_state_dict_post_hooks")


def copy_without_hooks(module: nn.Module, memo: dict | None = None, hooks: tuple[str, ...] = RUN_HOOKS) -> nn.Module:
    """A deep copy of `module` (`memo`: objects to share instead of copying, as for `copy.deepcopy`) whose modules
    carry none of the `hooks` the original's do, harden's own among them, nor a twin's forward. The hooks are left
    out of the copy, not copied and cleared: a hook's owner (a method's object) would be deep-copied with it."""
    memo = dict(memo or {})
    for m in module.modules():
        for name in hooks:
            found = getattr(m, name, None)
            if found is not None:
                memo[id(found)] = type(found)()
    copied = copy.deepcopy(module, memo)
    for m in copied.modules():
        drop_twin_forward(m)  # a layer copied from a patched model carries its twin's forward
    return copied


class PatchedModel(nn.Module):
    """A frozen `Classifier` plus patches attached at named layers of `model.net`."""

    def __init__(self, model: Classifier) -> None:
        super().__init__()
        self.model = model
        self.patches = nn.ModuleDict()
        self.sites: dict[str, str] = {}  # site -> key in self.patches
        self._handles: dict[str, torch.utils.hooks.RemovableHandle] = {}
        self._enabled = True
        self._capture: dict[str, torch.Tensor] | None = None
        self._route = "adv"  # which BNs serve inputs: the auxiliary twins (adv) or the base's (main)
        self._straight = False  # BPDA: patches that may mask gradients are identity in the backward pass
        # The constructor the base was built with (`package.module:callable`) and its kwargs, where known (a
        # checkpoint loaded with one, `hardener.patch(..., arch=)`): `save` records them.
        self.arch: str | None = None
        self.arch_kwargs: dict | None = None
        # What a run or a load leaves on the model (None until then): the base's tensor digest, the checkpoint's
        # manifest (`hardener.load`), and from `hardener.patch` the training record the checkpoint stores, one
        # `fit.EpochLog` per epoch, the training's seconds, the inference cost (a `cost.Cost`) and the report after
        # training (an `api.Report`, when one was asked).
        self.base_sha256: str | None = None
        self.manifest: Any = None
        self.training_record: Any = None  # a training.record.TrainingRecord
        self.history: list | None = None
        self.train_seconds: float | None = None
        self.cost: Any = None
        self.report: Any = None
        for p in model.parameters():
            p.requires_grad_(False)
        self.train(False)

    # -- structure
    @property
    def net(self) -> nn.Module:
        return self.model.net

    def attach(self, site: str, patch: nn.Module) -> None:
        if site in self.sites:
            raise InputError(f"site '{site}' already has a patch")
        key = _key(site)
        patch.train(self.training)  # a new patch follows the model's mode (a fresh BN twin starts in train)
        self.patches[key] = patch
        self.sites[site] = key
        if site == INPUT_SITE:
            self._handles[site] = self.net.register_forward_pre_hook(self._make_pre_hook(site, key))
            return
        module = self.net.get_submodule(site)
        if getattr(patch, "placement", "output") in REPLACING:
            module.forward = self._twin_forward(site, key, module)
            for parent in _fused_parents(self.net, site):  # their fused fast path would not call this forward
                if f"fastpath:{parent}" not in self._handles:
                    self._handles[f"fastpath:{parent}"] = self.net.get_submodule(parent).register_forward_pre_hook(
                        _no_fast_path)
            return
        self._handles[site] = module.register_forward_hook(self._make_hook(site, key))

    def _twin_forward(self, site: str, key: str, module: nn.Module):
        """The forward of a norm layer with a twin: its own on route main and with patches disabled; on route adv
        the twin's, `patch(out, x)`, where `out` is the layer's own output computed in eval mode (inputs routed to
        the twins never reach the base's running statistics, even when the base is trained), and only when the
        patch blends it in (`patch.uses_base`: strength below 1); at strength 1 the base layer does not run."""
        own = module.forward  # the layer's method, bound
        try:  # its input's name, for a call by keyword
            first = next(iter(inspect.signature(own).parameters), None)
        except (TypeError, ValueError):  # no signature to read: called positionally, as nearly every layer is
            first = None

        def forward(*args, **kwargs):
            if self._enabled and self._route == "adv":
                patch, out = self.patches[key], None
                if getattr(patch, "uses_base", True):
                    was, module.training = module.training, False
                    try:
                        out = own(*args, **kwargs)
                    finally:
                        module.training = was
                if args:
                    x, rest, more = args[0], args[1:], kwargs
                else:  # (attention called as attn(query=q, key=k, value=v))
                    more = dict(kwargs)
                    x, rest = more.pop(first), ()
                new = patch(out, x, module, *rest, **more) if patch.placement == "layer" else patch(out, x)
            else:
                new = own(*args, **kwargs)
            if self._capture is not None:  # an attention layer's output is a tuple: its first, the attention's
                self._capture[site] = (new if isinstance(new, torch.Tensor) else new[0]).clone()
            return new
        forward.harden_patch = True  # marks it for the copies that drop it, and for `carries_patches`
        return forward

    def _patch_output(self, key: str, out: torch.Tensor) -> torch.Tensor:
        if not self._enabled:
            return out
        patch = self.patches[key]
        new = patch(out)
        if self._straight and getattr(patch, "may_mask", False) and new.shape == out.shape:
            # forward: the patch's output, exactly (out - out is 0 for finite values; out + (new - out) would round);
            # backward: identity (BPDA, Athalye et al. 2018)
            return new.detach() + (out - out.detach())
        return new

    def _make_hook(self, site: str, key: str):
        def hook(module: nn.Module, inp, out):
            if not isinstance(out, torch.Tensor):
                raise InputError(f"site '{site}' returns {type(out).__name__}, not a tensor: choose another site")
            new = self._patch_output(key, out)
            if self._capture is not None:
                # clone: a later in-place op (ReLU(inplace=True)) must not rewrite the captured features
                self._capture[site] = new.clone()
            return new if new is not out else None
        hook.harden_patch = True
        return hook

    def _make_pre_hook(self, site: str, key: str):
        def hook(_module: nn.Module, inp):
            x = inp[0]
            new = self._patch_output(key, x)
            if self._capture is not None:
                self._capture[site] = new.clone()
            return (new, *inp[1:]) if new is not x else None
        hook.harden_patch = True
        return hook

    def patch_parameters(self) -> Iterator[nn.Parameter]:
        return self.patches.parameters()

    def summary(self) -> str:
        """One line, like PEFT's `print_trainable_parameters()`: patch parameters against the base's."""
        n_patch = sum(p.numel() for p in self.patch_parameters())
        n_base = sum(p.numel() for p in self.model.parameters())
        kinds = ", ".join(f"{getattr(self.patches[k], 'kind', '?')}@{s}" for s, k in self.sites.items()) or "none"
        return (f"patch parameters: {n_patch:,} || base parameters (frozen): {n_base:,} || trainable: "
                f"{100 * n_patch / max(1, n_patch + n_base):.2f}% || patches: {kinds}")

    def save(self, path, arch: str | None = None, arch_kwargs: dict | None = None) -> None:
        """Write the patched checkpoint (base tensors + patches + manifest), atomically, recording the constructor
        of the base (`package.module:callable`): `arch`, else the one the model was built with (`self.arch`);
        without either it warns, and the file loads with `hardener.load(path, model=base_module)` or an `arch`.
        Loading never runs the recorded constructor unless trusted (`hardener.load`)."""
        from ..io.checkpoint import save_patched_model

        save_patched_model(self, path, arch, arch_kwargs)

    # -- modes
    def train(self, mode: bool = True) -> "PatchedModel":
        self.training = mode
        self.patches.train(mode)
        self.model.train(mode)  # base modules stay in eval unless a full fine-tuning method owns them
        return self

    @property
    def finetune_base(self) -> bool:
        return self.model.trainable

    @finetune_base.setter
    def finetune_base(self, on: bool) -> None:
        self.model.trainable = bool(on)

    @property
    def current_route(self) -> str:
        return self._route

    def set_route(self, route: str) -> None:
        if route not in ROUTES:
            raise InputError(f"route must be one of {', '.join(ROUTES)}, got '{route}'")
        self._route = route

    @contextlib.contextmanager
    def route(self, route: str) -> Iterator["PatchedModel"]:
        """Inputs go through the auxiliary BN twins (adv) or the base's BNs (main) inside the block."""
        prev = self._route
        self.set_route(route)
        try:
            yield self
        finally:
            self._route = prev

    @property
    def has_auxbn(self) -> bool:
        return any(getattr(p, "placement", "output") == "bn" for p in self.patches.values())

    @contextlib.contextmanager
    def patches_disabled(self) -> Iterator["PatchedModel"]:
        prev, self._enabled = self._enabled, False
        try:
            yield self
        finally:
            self._enabled = prev

    @property
    def maskable(self) -> list[str]:
        """Sites whose patch may mask gradients (an input transform, a denoising filter): BPDA attacks them."""
        return [s for s, k in self.sites.items() if getattr(self.patches[k], "may_mask", False)]

    @contextlib.contextmanager
    def straight_through(self) -> Iterator["PatchedModel"]:
        """Inside the block, every patch of `maskable` is the identity in the backward pass (its forward unchanged):
        the gradient an attacker gets when approximating a non-differentiable or obfuscating patch by identity."""
        prev, self._straight = self._straight, True
        try:
            yield self
        finally:
            self._straight = prev

    @contextlib.contextmanager
    def capture(self) -> Iterator[dict[str, torch.Tensor]]:
        """Collect the features after each patch (or the base's, when disabled) during forwards."""
        prev, self._capture = self._capture, {}
        try:
            yield self._capture
        finally:
            self._capture = prev

    def set_strength(self, value: float) -> None:
        for p in self.patches.values():
            p.strength = float(value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def _bare_copy(self) -> Classifier:
        """A deep copy of the base without harden's hooks and twin forwards (copies would still call this model)."""
        ids = {h.id for h in self._handles.values()}
        copy_ = copy.deepcopy(self.model)
        for m in copy_.modules():
            for hid in ids:
                m._forward_hooks.pop(hid, None)
                m._forward_pre_hooks.pop(hid, None)
            drop_twin_forward(m)
        return copy_

    def base_copy(self) -> Classifier:
        """A frozen deep copy of the base as it is now (a fixed reference when the base itself is fine-tuned)."""
        copy_ = self._bare_copy()
        copy_.trainable = False
        for p in copy_.parameters():
            p.requires_grad_(False)
        return copy_.eval()

    def clone(self) -> "PatchedModel":
        """An independent copy: its own base copy, its own patches, same route and mode. (`copy.deepcopy` of a
        PatchedModel would keep hooks that call the original.)"""
        new = PatchedModel(self._bare_copy())
        for site, key in self.sites.items():
            new.attach(site, copy.deepcopy(self.patches[key]))
        new._route, new._enabled = self._route, self._enabled
        return new.train(self.training)

    def __deepcopy__(self, memo):
        return self.clone()

    # -- state
    def base_state_dict(self) -> dict[str, torch.Tensor]:
        return self.net.state_dict()

    def patch_state_dict(self) -> dict[str, torch.Tensor]:
        out = {}
        for site, key in self.sites.items():
            for name, t in self.patches[key].state_dict().items():
                out[f"harden.{site}.{name}"] = t
        return out

    def load_patch_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        for site, key in self.sites.items():
            # exact names: one site's name can prefix another's ('layer1' and 'layer1.conv.1')
            names = self.patches[key].state_dict().keys()
            sd = {n: tensors[f"harden.{site}.{n}"] for n in names if f"harden.{site}.{n}" in tensors}
            self.patches[key].load_state_dict(sd, strict=True)

    def patch_specs(self) -> list[dict]:
        return [{"kind": self.patches[key].kind, "site": site, **self.patches[key].extra_spec()}
                for site, key in self.sites.items()]


class _View(nn.Module):
    """A view of a PatchedModel, always in eval mode, whose forward runs inside one of its context managers."""

    mode = ""  # name of the PatchedModel context manager

    def __init__(self, patched: PatchedModel) -> None:
        super().__init__()
        self.patched = patched

    def train(self, mode: bool = True) -> "_View":
        self.training = False
        self.patched.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with getattr(self.patched, self.mode)():
            return self.patched(x)


class Disabled(_View):
    """A view of a PatchedModel with its patches switched off: the base, for attacks on it."""

    mode = "patches_disabled"


class StraightThrough(_View):
    """A view of a PatchedModel whose gradient-masking patches are identity in the backward pass (BPDA): the same
    logits as the model, the gradients of the model without those patches' Jacobians."""

    mode = "straight_through"


def carries_patches(module: nn.Module) -> bool:
    """Whether `module` is hooked by a `PatchedModel` (`hardener.load(path, model=module)` patches the module it is
    given in place): a copy of it would carry that model's patches, its hooks calling them."""
    for m in module.modules():
        hooks = (*m._forward_hooks.values(), *m._forward_pre_hooks.values(), m.__dict__.get("forward"))
        if any(getattr(h, "harden_patch", False) for h in hooks):
            return True
    return False
