"""Shared plumbing of the commands: load a model and data, conform them, pick a device.

The CLI only parses options and renders; everything it needs to build lives here.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import data as hdata
from ..errors import InputError
from ..model import archspec, hf
from ..model.classifier import (
    Classifier,
    InputSpec,
    hf_normalisation,
    normalisation,
    parse_floats,
    parse_shape,
)
from ..options.validate import regular_input
from ..patches import PatchedModel
from ..patches.layers import probe
from .checkpoint import (
    LoadedBase,
    Manifest,
    arch_for_manifest,
    load_base,
    load_patched,
    read_manifest,
    sha256_file,
)


@dataclass
class ModelOptions:
    arch: str | None = None
    arch_kwargs: str | None = None
    trust_pickle: bool = False
    trust_arch: bool = False
    mean: str | None = None
    std: str | None = None
    logits: str | None = None
    input_shape: str | None = None
    preprocessor: str | None = None


@dataclass
class DataOptions:
    subset: str | None = None
    classes: str | None = None
    resize: str | None = None
    crop: str | None = None


@dataclass
class Loaded:
    patched: PatchedModel
    manifest: Manifest | None  # set for a harden-patched checkpoint
    base: LoadedBase | None  # set for a plain checkpoint
    warnings: list[str] = field(default_factory=list)  # about the model and the data, for stderr and the report

    @property
    def has_patches(self) -> bool:
        """True when there is something to compare with the base: patches, or a fine-tuned base."""
        return bool(self.patched.sites) or (self.manifest is not None and self.manifest.base_modified)

    @property
    def spec(self) -> InputSpec:
        return self.patched.model.spec


def set_deterministic(on: bool) -> None:
    """--deterministic: deterministic kernels (matters on GPU; CPU runs are deterministic per thread count)."""
    if not on:
        return
    import os

    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=False)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True


def pick_device(name: str) -> torch.device:
    """`auto`: CUDA, then Apple's MPS, then the CPU; `cuda`, `cuda:N`, `mps` and `cpu` when available."""
    mps = getattr(torch.backends, "mps", None)
    has_mps = bool(mps is not None and mps.is_available())
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if has_mps else "cpu")
    kind, _, index = str(name).partition(":")
    if kind not in ("cpu", "cuda", "mps") or (index and (kind != "cuda" or not index.isdigit())):
        raise InputError(f"--device must be auto, cpu, cuda, cuda:N or mps, got '{name}'")
    if kind == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {name}: no CUDA device is available (use --device cpu or auto)")
    if kind == "cuda" and index and int(index) >= torch.cuda.device_count():
        raise InputError(f"--device {name}: there are {torch.cuda.device_count()} CUDA devices")
    if kind == "mps" and not has_mps:
        raise InputError("--device mps: no Apple MPS device is available (use --device cpu or auto)")
    return torch.device(name)


def load_model(path: str, opts: ModelOptions, allow_patched: bool = True) -> Loaded:
    folder = hf.pretrained_folder(path, opts.arch)  # a Hugging Face save_pretrained folder: transformers loads it
    p = Path(path) if folder is not None and Path(path).is_dir() else regular_input(path, "checkpoint")
    manifest = read_manifest(p) if p.is_file() else None
    mean, std = hf_normalisation(opts.preprocessor, opts.mean, opts.std)
    for name, values in (("mean", mean), ("std", std)):  # checked even where a patched file's own input spec wins
        normalisation(name, parse_floats(values, f"--{name}"))
    if manifest is not None:
        if not allow_patched:
            raise InputError(f"'{path}' is already a harden-patched checkpoint; patch its base instead "
                             "(patching a patched model is not supported)")
        patched, manifest = load_patched(p, arch=opts.arch, trust_arch=opts.trust_arch,
                                         arch_kwargs=archspec.parse_kwargs(opts.arch_kwargs)
                                         if opts.arch_kwargs else None, trust_pickle=opts.trust_pickle)
        patched.manifest = manifest  # as `hardener.load` keeps it: `cost.measure` reads the budget it was sized to
        return Loaded(patched, manifest, None)
    if folder is not None:
        base = _load_pretrained(folder)
    else:
        base = load_base(p, opts.arch, archspec.parse_kwargs(opts.arch_kwargs), opts.trust_pickle)
    spec = InputSpec(shape=parse_shape(opts.input_shape), mean=parse_floats(mean, "--mean"),
                     std=parse_floats(std, "--std"), logits=opts.logits or None)
    return Loaded(PatchedModel(Classifier(base.net, spec)), None, base)


def _load_pretrained(folder: Path) -> LoadedBase:
    """A `save_pretrained` folder's model, loaded by transformers (`hf.load_pretrained`), frozen; its sha256 is the
    weights file's (the shard index's for a sharded model)."""
    net, arch, kwargs = hf.load_pretrained(folder)
    for q in net.parameters():
        q.requires_grad_(False)
    weights = next(folder / w for w in hf.WEIGHTS if (folder / w).is_file())
    return LoadedBase(net, weights, sha256_file(weights), arch, kwargs, {})


def load_parent(loaded: Loaded, parent: str | None, opts: ModelOptions):
    """The original checkpoint of a fully fine-tuned model, checked against the manifest (None otherwise)."""
    modified = loaded.manifest is not None and loaded.manifest.base_modified
    if not modified:
        if parent:
            raise InputError("--parent applies only to fully fine-tuned checkpoints (adv-train, advprop, advamd); "
                             "a patched checkpoint carries its base")
        return None
    if not parent:
        raise InputError("this checkpoint's base weights were fine-tuned (method "
                         f"{loaded.manifest.training.get('config', {}).get('method', '?')}): pass --parent ORIGINAL "
                         "so that the base rows and transfer attacks use the model it started from")

    regular_input(parent, "--parent")
    if sha256_file(Path(parent)) != loaded.manifest.parent_sha256:
        raise InputError(f"--parent '{parent}' is not the checkpoint this model was fine-tuned from (sha256 differs "
                         "from the manifest's parent_sha256)")

    choice = arch_for_manifest(loaded.manifest, opts.arch, opts.trust_arch,
                               archspec.parse_kwargs(opts.arch_kwargs) if opts.arch_kwargs else None)
    base = load_base(parent, choice.spec, choice.kwargs, opts.trust_pickle)
    return Classifier(base.net, InputSpec.from_json(loaded.manifest.input)).eval()


def load_data(loaded: Loaded, spec_text: str, opts: DataOptions, labels_required: bool = True) -> hdata.Dataset:
    """Load data and conform it to the model: channels, size, labels; fills in the input spec."""
    resize = hdata.parse_pair(opts.resize, "--resize")
    ds = hdata.load(spec_text, resize, labels_required)
    ds = hdata.apply_class_map(ds, opts.classes)
    spec = loaded.spec
    channels = spec.shape[0] if spec.shape else stem_channels(loaded.patched.net)
    crop = hdata.parse_pair(opts.crop, "--crop")
    ds = hdata.conform(ds, channels, resize, crop)
    if spec.shape is not None and list(ds.shape) != list(spec.shape):
        raise InputError(f"images of '{ds.source}' are {tuple(ds.shape)} (C,H,W) but the model takes "
                         f"{tuple(spec.shape)}: pass --resize {spec.shape[1]},{spec.shape[2]}")
    return ds


def stem_channels(net: torch.nn.Module) -> int | None:
    """The channel count a model without a recorded input shape takes: its first 2-D convolution's (the stem of a
    CNN, the patch embedding of a ViT), so that grayscale and RGB data are converted to it; None without one, or
    where that count is neither 1 nor 3 (then the first convolution registered is not the stem)."""
    conv = next((m for m in net.modules() if isinstance(m, torch.nn.Conv2d)), None)
    return int(conv.in_channels) if conv is not None and conv.in_channels in (1, 3) else None


def _channel_mismatch(error: str, x: torch.Tensor) -> None:
    """A model's failure on images of the wrong channel count, as the one line that says which shape it takes."""
    want = re.search(r"expected input\[[^\]]*\] to have (\d+) channels", error)
    if want:  # the data's channels are not the model's
        c = int(want.group(1))
        raise InputError(f"the images have {x.shape[1]} channels but the model takes {c}: expected input shape "
                         f"({c}, H, W); {_channel_fix(c, x)}") from None


def _channel_fix(c: int, x: torch.Tensor) -> str:
    """What turns images `x` into the `c` channels a model takes: the conversion --input-shape makes, where there is
    one."""
    h, w = x.shape[2:]
    return (f"pass --input-shape {c},{h},{w} to convert them" if c in (1, 3) and x.shape[1] in (1, 3, 4)
            else f"give images with {c} channels")


def _check_normalisation(spec, x: torch.Tensor, model_channels: int | None) -> None:
    """The normalisation has one value for all channels or one per channel of the images: 3 values on 1-channel images
    would broadcast them to 3 channels, and the model's channel error would then blame the wrong thing. Where the
    values count the model's own channels (a checkpoint's or a preprocessor's normalisation), the images are what
    is wrong; else the values are."""
    channels = x.shape[1]
    for name, values in (("mean", spec.mean), ("std", spec.std)):
        if values is None or len(values) in (1, channels):
            continue
        if len(values) == model_channels:
            raise InputError(f"the images have {channels} channel{'s' if channels != 1 else ''} but the model takes "
                             f"{model_channels} (its normalisation has {len(values)} values): "
                             f"{_channel_fix(model_channels, x)}")
        raise InputError(f"--{name} has {len(values)} values but the images have {channels} channel"
                         f"{'s' if channels != 1 else ''}: give one value, or one per channel ({channels})")


def finish_spec(loaded: Loaded, ds: hdata.Dataset | None, device: torch.device) -> list:
    """Dry-run the model on the data's shape; record shape and class count; validate labels.

    Returns the layer table of that dry run (`layers.LayerInfo` list).
    """
    spec = loaded.spec
    if ds is not None:
        spec.shape = list(ds.shape)
        x = ds.batch(slice(0, 2))[0]
    elif spec.shape is not None:
        x = torch.rand(2, *spec.shape)
    else:
        raise InputError("cannot tell the model's input shape: pass --input-shape C,H,W or --data")
    _check_normalisation(spec, x, stem_channels(loaded.patched.net))
    loaded.patched.to(device)
    try:
        try:
            infos = probe(loaded.patched.model, x.to(device))
        except InputError as e:
            _channel_mismatch(e.message, x)
            raise
        with torch.no_grad():
            out = loaded.patched(x.to(device))
    except (RuntimeError, ValueError, IndexError, TypeError, AttributeError, KeyError) as e:
        if isinstance(e, torch.cuda.OutOfMemoryError):
            raise
        sites = f" with patches at {', '.join(loaded.patched.sites)}" if loaded.patched.sites else ""
        first = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        _channel_mismatch(first, x)
        raise InputError(f"the model{sites} fails on inputs of shape {tuple(x.shape[1:])} (C,H,W): {first}") from None
    if not isinstance(out, torch.Tensor):
        raise InputError(f"the model's output is a {type(out).__name__}, not a tensor of logits")
    if out.ndim != 2:
        raise InputError(f"the model's output has shape {tuple(out.shape)}, not (batch, classes): "
                         "pick the logits with --logits KEY|INDEX")
    num_classes = int(out.shape[1])
    if spec.num_classes not in (None, num_classes):
        raise InputError(f"the model has {num_classes} outputs but the checkpoint records {spec.num_classes}")
    spec.num_classes = num_classes
    if ds is not None and bool((ds.labels != hdata.UNLABELLED).any()):
        hdata.check_labels(ds, num_classes)
        loaded.warnings = [w for w in [hdata.class_count_warning(ds, num_classes)] if w]
        if ds.classes and spec.classes is None:
            spec.classes = list(ds.classes)
        spec.preprocessing = list(ds.notes)
    return infos


# The clean-accuracy check before patch and eval: one forward pass of the base on up to this many labelled images,
# spread over the data (folders load sorted by class); fewer than MIN_ACCURACY_SAMPLES cannot tell.
ACCURACY_SAMPLES = 256
MIN_ACCURACY_SAMPLES = 50


def check_accuracy(model: torch.nn.Module, ds: hdata.Dataset, num_classes: int, device: torch.device,
                   allow: bool = False) -> str | None:
    """Stop (InputError) when `model`'s clean accuracy on `ds` is near chance: within 3 standard errors (at least 5
    points) of the larger of 1/classes and the commonest label's share. Such a model is almost always fed inputs it
    was not trained on (missing normalisation, the wrong input size, a shuffled class map), and every number after
    would be meaningless. With `allow`, the warning to report instead (None when the accuracy is fine)."""
    labelled = torch.nonzero(ds.labels != hdata.UNLABELLED).flatten()
    if len(labelled) < MIN_ACCURACY_SAMPLES:
        return None
    idx = labelled[torch.linspace(0, len(labelled) - 1, min(ACCURACY_SAMPLES, len(labelled))).long()]
    x, y = ds.batch(idx)
    was = {m: m.training for m in model.modules()}  # a view's own flag is not its model's: each module's back
    model.eval()
    with torch.no_grad():
        pred = torch.cat([model(x[i:i + 64].to(device)).argmax(1).cpu() for i in range(0, len(x), 64)])
    for m, training in was.items():
        m.training = training
    n, acc = len(y), float((pred == y).float().mean())
    chance = max(1 / num_classes, float(torch.bincount(y).max()) / n)
    if acc > chance + max(0.05, 3 * math.sqrt(chance * (1 - chance) / n)) or chance >= 0.95:
        return None
    what = (f"the model's clean accuracy on {n} labelled images is {100 * acc:.1f}%, about chance ({100 * chance:.1f}%"
            f": {num_classes} classes, the commonest label {100 * float(torch.bincount(y).max()) / n:.1f}%)")
    if allow:
        return what + "; every number of this run is measured on inputs the model may not have been trained on"
    causes = ("--mean/--std (the normalisation the model expects), --input-shape/--resize and the class map (--classes"
              "); pass --allow-low-accuracy to go on")
    raise InputError(f"{what}: its input is probably not what it was trained on; check {causes}")
