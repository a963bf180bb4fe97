"""Caches of what a frozen base computes the same way every epoch (transfer training, no augmentation).

With `--adversary base` and no augmentation the training inputs (clean and adversarial) never change,
and the base before the first patch site never changes either. `FrozenPrefix` finds that prefix from
the call order of a dry run, and replaces it during training: the modules that run before the first
site return placeholders, and the first site returns its cached output, so an epoch costs the forward
and backward of the model *after* the first site. The replacement is checked on real data before it
is used (outputs must be bit-identical to the full forward); where a model's forward reuses a prefix
output after the site (a skip connection around it), the check fails and training runs uncached.

`CacheStore` keeps arrays in memory up to a byte limit and spills the rest to disk in fp16.

A site's features are stored one row per sample whatever axis holds the batch: `BatchLayout` finds it from two
probe batches (timm LeViT's BatchNorm1d sees its tokens as one (B·N, C) tensor; a sequence-first model's (N, B, C)).
A model whose answers cannot be stored so (`Uncacheable`) trains uncached: the trainer computes them every step.
"""
from __future__ import annotations

import contextlib
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import numpy as np
import torch
from torch import nn

from .. import data as hdata
from ..errors import InputError
from ..patches import INPUT_SITE, PatchedModel

if TYPE_CHECKING:
    from ..data import Dataset
    from .fit import FitConfig


class SpilledArray:
    """An (N, ...) fp16 array in a .npy file on disk, read as fp32 tensors by index or slice."""

    def __init__(self, path: Path, shape: tuple[int, ...] | None = None) -> None:
        self.path = path
        mode = "r+" if shape is None else "w+"
        self.array = np.lib.format.open_memmap(path, mode=mode, dtype=np.float16, shape=shape)

    def __len__(self) -> int:
        return int(self.array.shape[0])

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape)

    def __getitem__(self, idx) -> torch.Tensor:
        key = idx.numpy() if isinstance(idx, torch.Tensor) else idx
        return torch.from_numpy(np.asarray(self.array[key])).float()

    def __setitem__(self, idx, value: torch.Tensor) -> None:
        self.array[idx] = value.detach().cpu().to(torch.float16).numpy()

    def flush(self) -> None:
        self.array.flush()


class CacheStore:
    """Named (N, ...) arrays: fp32 in memory while the total stays under `limit` bytes, else fp16 on disk."""

    def __init__(self, limit: int, folder: Path | None = None) -> None:
        self.limit, self.used = int(limit), 0
        self.folder = folder
        self._tmp: Path | None = None
        self.arrays: dict[str, torch.Tensor | SpilledArray] = {}
        self.spilled: list[str] = []

    def create(self, name: str, shape: tuple[int, ...]) -> None:
        nbytes = int(np.prod(shape)) * 4
        if self.used + nbytes <= self.limit:
            self.arrays[name] = torch.empty(shape, dtype=torch.float32)
            self.used += nbytes
            return
        if self._tmp is None:
            self._tmp = Path(tempfile.mkdtemp(prefix=".harden-cache-", dir=str(self.folder or tempfile.gettempdir())))
        self.arrays[name] = SpilledArray(self._tmp / f"{len(self.spilled)}.npy", shape)
        self.spilled.append(name)

    def put(self, name: str, sl: slice, value: torch.Tensor) -> None:
        self.arrays[name][sl] = value.detach().cpu()

    def get(self, name: str, idx: torch.Tensor, device: torch.device) -> torch.Tensor:
        return self.arrays[name][idx].to(device)

    def close(self) -> None:
        self.arrays.clear()
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None


def _call_order(net: nn.Module, x: torch.Tensor) -> tuple[dict[str, int], dict[str, int], dict[str, list[int]]]:
    """Start and end positions of every named module's (first) call in one forward, and its output shape."""
    starts: dict[str, int] = {}
    ends: dict[str, int] = {}
    shapes: dict[str, list[int]] = {}
    counter = [0]
    handles = []

    def pre(name):
        def hook(_m, _inp):
            counter[0] += 1
            starts.setdefault(name, counter[0])
        return hook

    def post(name):
        def hook(_m, _inp, out):
            counter[0] += 1
            ends.setdefault(name, counter[0])
            if isinstance(out, torch.Tensor):
                shapes.setdefault(name, list(out.shape[1:]))
        return hook

    for name, m in net.named_modules():
        if name:
            handles += [m.register_forward_pre_hook(pre(name)), m.register_forward_hook(post(name))]
    try:
        with torch.no_grad():
            net(x)
    finally:
        for h in handles:
            h.remove()
    return starts, ends, shapes


class Uncacheable(Exception):
    """The base's answers at some site cannot be stored one row per sample: training computes them every step."""


class BatchLayout:
    """Where the batch sits in a site's output: the axis whose size grows with the batch (`rows` entries per
    sample, batch-major: a (B·N, C) reshape of (B, N, C) tokens has axis 0 and N rows), and how to store it as
    (B, rows, ...) and back."""

    def __init__(self, axis: int, rows: int) -> None:
        self.axis, self.rows = axis, rows

    @classmethod
    def find(cls, site: str, one: torch.Tensor, two: torch.Tensor) -> "BatchLayout":
        """The layout of `site` from its outputs on one sample and on two (that sample first), or `Uncacheable`."""
        grows = [a for a in range(one.ndim) if two.shape[a] == 2 * one.shape[a]]
        same = [a for a in range(one.ndim) if two.shape[a] == one.shape[a]]
        if one.ndim != two.ndim or len(grows) != 1 or len(same) != one.ndim - 1:
            raise Uncacheable(f"the output of '{site}' ({tuple(one.shape)} for one image, {tuple(two.shape)} for two) "
                              "has no axis that holds the batch")
        layout = cls(grows[0], one.shape[grows[0]])
        first = layout.store(two, 2)[:1]
        if not torch.allclose(layout.store(one, 1), first, rtol=1e-3, atol=1e-4 * float(first.abs().max()) + 1e-6):
            raise Uncacheable(f"the output of '{site}' mixes the samples of a batch along axis {grows[0]} (not one "
                              "block of rows per sample)")
        return layout

    @property
    def plain(self) -> bool:
        return self.axis == 0 and self.rows == 1

    def store(self, t: torch.Tensor, batch: int) -> torch.Tensor:
        """`t` (the site's output for `batch` samples) as (batch, ...): one entry per sample."""
        if self.plain:
            return t
        moved = t.movedim(self.axis, 0)
        if moved.shape[0] != batch * self.rows:
            raise Uncacheable(f"a site's output has {moved.shape[0]} rows along axis {self.axis} for {batch} images, "
                              f"not {self.rows} per image")
        return moved.reshape(batch, self.rows, *moved.shape[1:])

    def load(self, t: torch.Tensor) -> torch.Tensor:
        """Stored entries (B, ...) back in the site's own layout."""
        return t if self.plain else t.reshape(-1, *t.shape[2:]).movedim(0, self.axis)


class FrozenPrefix:
    """Skip the base before the first patch site, feeding that site's cached output instead."""

    def __init__(self, patched: PatchedModel, site: str, stubs: list[str], shapes: dict[str, list[int]]) -> None:
        self.patched, self.site, self.stubs, self.shapes = patched, site, stubs, shapes
        self._feed: torch.Tensor | None = None

    @classmethod
    def plan(cls, patched: PatchedModel, x: torch.Tensor) -> tuple["FrozenPrefix | None", str]:
        """The prefix to skip for these patches, checked on `x` (a batch in [0, 1]); None and the reason when
        it cannot be skipped."""
        kinds = {site: getattr(patched.patches[key], "placement", "output") for site, key in patched.sites.items()}
        if INPUT_SITE in kinds:
            return None, "a patch sits at the model input: there is no frozen prefix"
        with patched.patches_disabled():
            normalised = patched.model.normalise(x)
            starts, ends, shapes = _call_order(patched.net, normalised)
        site = min(kinds, key=lambda s: ends.get(s, 1 << 30))
        if kinds[site] in ("bn", "layer"):
            what = "an auxiliary BN" if kinds[site] == "bn" else "a layer's replacement (lora)"
            return None, f"the first site '{site}' is {what}, which needs its input: nothing to skip"
        ancestors = {site.rsplit(".", k)[0] for k in range(1, site.count(".") + 1)}
        inside = site + "."
        stubs = [n for n in starts if n not in ancestors and n != site and not n.startswith(inside)
                 and ends.get(n, 1 << 30) < starts[site] and n in shapes]
        stubs = [n for n in stubs if not any(n.startswith(o + ".") for o in stubs)]  # outermost only
        prefix = cls(patched, site, stubs, shapes)
        try:
            ok, why = prefix.check(x)
        except (RuntimeError, ValueError, IndexError, TypeError) as e:  # a stub's placeholder did not fit
            ok, why = False, (f"skipping the base before '{site}' fails ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:120]}): training runs uncached")
        return (prefix if ok else None), why

    @contextlib.contextmanager
    def feeding(self, site_output: torch.Tensor) -> Iterator[None]:
        """Forwards inside the block skip the prefix; the first site returns `site_output` (one row per input)."""
        net = self.patched.net
        n = site_output.shape[0]
        modules = {name: net.get_submodule(name) for name in [*self.stubs, self.site]}
        dev, dtype = site_output.device, site_output.dtype
        for name in self.stubs:
            shape = self.shapes[name]
            modules[name].forward = lambda *a, _s=shape, **k: torch.zeros(n, *_s, device=dev, dtype=dtype)
        modules[self.site].forward = lambda *a, **k: site_output
        try:
            yield
        finally:
            for m in modules.values():
                del m.forward

    def site_output(self, x: torch.Tensor) -> torch.Tensor:
        """The base's output at the first site for inputs `x` (patches off)."""
        with torch.no_grad(), self.patched.patches_disabled(), self.patched.capture() as feats:
            self.patched(x)
        return feats[self.site]

    def check(self, x: torch.Tensor) -> tuple[bool, str]:
        with torch.no_grad():
            feed = self.site_output(x)
            for enabled in (False, True):
                ctx = contextlib.nullcontext() if enabled else self.patched.patches_disabled()
                with ctx:
                    full = self.patched(x)
                    with self.feeding(feed):
                        short = self.patched(x)
                if not torch.equal(full, short):
                    return False, (f"skipping the base before '{self.site}' changes the outputs (the forward "
                                   "reuses an earlier result after the site): training runs uncached")
        skipped = ", ".join(self.stubs) or "nothing but the site itself"
        return True, f"base before '{self.site}' is cached ({skipped} skipped)"


def parse_bytes(text: str, what: str) -> int:
    units = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "kib": 1 << 10, "m": 1e6, "mb": 1e6, "mib": 1 << 20,
             "g": 1e9, "gb": 1e9, "gib": 1 << 30, "t": 1e12, "tb": 1e12, "tib": 1 << 40}
    t = text.strip().lower()
    num = t.rstrip("abcdefghijklmnopqrstuvwxyz ")
    unit = t[len(num):].strip()
    try:
        value = float(num) * units[unit]
    except (ValueError, KeyError):
        raise InputError(f"{what} must be a size like 512MiB or 8GiB, got '{text}'") from None
    if value < 0:
        raise InputError(f"{what} must not be negative, got '{text}'")
    return int(value)


class BaseCache:
    """Answers of the frozen base for every training sample: logits and features at each site on the clean
    input (the distillation targets) and, with a skippable prefix, the first site's output for the clean
    and the adversarial input. `Uncacheable` where a site's features cannot be stored one entry per sample."""

    def __init__(self, patched: PatchedModel, ds: "Dataset", adv: torch.Tensor, cfg: "FitConfig",
                 device: torch.device, folder, progress=None) -> None:
        probe = hdata.to_float(ds.images[:8]).to(device)
        self.sites = list(patched.sites)
        self.layouts = self._layouts(patched, probe)
        self.prefix, self.note = FrozenPrefix.plan(patched, probe) if cfg.cache else (None, "caching off")
        self.store = CacheStore(cfg.cache_limit, folder)
        try:
            self._fill(patched, ds, adv, cfg.batch_size, device, progress)
        except BaseException:
            self.store.close()
            raise
        if self.store.spilled:
            self.note += f"; {len(self.store.spilled)} array(s) spilled to disk in fp16 (--cache-limit)"

    def _layouts(self, patched: PatchedModel, probe: torch.Tensor) -> dict[str, BatchLayout]:
        """Each site's `BatchLayout`, from its base features on one probe image and on two."""
        feats = []
        for k in (1, 2):
            with torch.no_grad(), patched.patches_disabled(), patched.capture() as f:
                patched(probe[:1].expand(k, *probe.shape[1:]) if len(probe) < 2 else probe[:k])
            feats.append(f)
        missing = [s for s in self.sites if s not in feats[0] or s not in feats[1]]
        if missing:
            raise Uncacheable(f"'{missing[0]}' does not run in the base's forward (eval mode)")
        return {s: BatchLayout.find(s, feats[0][s], feats[1][s]) for s in self.sites}

    def _fill(self, patched: PatchedModel, ds: "Dataset", adv: torch.Tensor, bs: int, device: torch.device,
              progress) -> None:
        n = len(ds)
        for i in range(0, n, bs):
            sl = slice(i, i + bs)
            x = hdata.to_float(ds.images[sl]).to(device)
            with torch.no_grad(), patched.patches_disabled(), patched.capture() as feats:
                logits = patched(x)
            rows = {f"t:{s}": self.layouts[s].store(feats[s], len(x)) for s in self.sites}
            if self.prefix is not None:
                layout = self.layouts[self.prefix.site]
                rows["clean_site"] = layout.store(feats[self.prefix.site], len(x))
                rows["adv_site"] = layout.store(self.prefix.site_output(adv[sl].to(device)), len(x))
            for name, value in {"logits": logits, **rows}.items():
                if i == 0:
                    self.store.create(name, (n, *value.shape[1:]))
                self.store.put(name, sl, value)
            if progress:
                progress("cache", min(i + bs, n), n, {})

    def targets(self, idx: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return (self.store.get("logits", idx, device),
                {s: self.layouts[s].load(self.store.get(f"t:{s}", idx, device)) for s in self.sites})

    def feeding(self, which: str, idx: torch.Tensor, device: torch.device):
        """Forwards skip the cached prefix and start from the site's output of input `which` (clean, adv, or joint:
        clean then adv, one batch of both)."""
        if self.prefix is None:
            return contextlib.nullcontext()
        layout = self.layouts[self.prefix.site]
        parts = ("clean", "adv") if which == "joint" else (which,)
        return self.prefix.feeding(torch.cat([layout.load(self.store.get(f"{w}_site", idx, device)) for w in parts]))
