"""Labelled image data: image folders, tensor files, built-in Fashion-MNIST; subsets; augmentation.

Images are held as uint8 NCHW tensors (or float in [0, 1] when the source was float) and
converted to float [0, 1] batch by batch.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import math
import os
import re
import warnings
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .errors import InputError, RunError

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"}
# The decoders Pillow may use, whatever a file's name: never EPS/PS (Ghostscript runs on them) or any format that
# shells out or that harden does not read (Pillow's JPEG decoder also opens multi-picture camera JPEGs).
PIL_FORMATS = ("PNG", "JPEG", "BMP", "GIF", "WEBP")
MAX_PIXELS = 1 << 26  # 64 megapixels per image: larger ones are refused before decoding (decompression bombs)


@dataclass
class Dataset:
    images: torch.Tensor  # N,C,H,W uint8 (0-255) or float32 (0-1)
    labels: torch.Tensor  # N int64
    classes: list[str] | None = None
    source: str = ""
    notes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    def batch(self, idx: torch.Tensor | slice) -> tuple[torch.Tensor, torch.Tensor]:
        return to_float(self.images[idx]), self.labels[idx]

    def take(self, idx: torch.Tensor) -> "Dataset":
        return Dataset(self.images[idx], self.labels[idx], self.classes, self.source, list(self.notes))

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        h.update(self.images.contiguous().numpy().tobytes())
        h.update(self.labels.contiguous().numpy().tobytes())
        return h.hexdigest()


def to_float(images: torch.Tensor) -> torch.Tensor:
    if images.dtype == torch.uint8:
        return images.float().div_(255.0)
    return images.float()


# ---------------------------------------------------------------- loading


UNLABELLED = -1  # label of inputs loaded without labels (harden predict)


def memory_budget() -> int:
    """Bytes that one data set may take once decoded: half the machine's memory (or of the address-space limit)."""
    import resource

    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    soft = resource.getrlimit(resource.RLIMIT_AS)[0]
    return min(total, soft if soft != resource.RLIM_INFINITY else total) // 2


def check_budget(nbytes: int, what: str) -> None:
    budget = memory_budget()
    if nbytes > budget:
        raise InputError(f"{what} would take {nbytes / 2 ** 30:,.1f} GiB in memory, more than harden allows for "
                         f"data ({budget / 2 ** 30:,.1f} GiB, half the memory): use a smaller file or --subset")


def load(spec: str, resize: tuple[int, int] | None = None, labels_required: bool = True) -> Dataset:
    """Load `spec`: `fashion-mnist:train|test`, an image folder, or a tensor file.

    `resize` applies while decoding an image folder, so that images of mixed sizes can load. With
    `labels_required=False` a tensor file may hold images only; their labels are UNLABELLED. A file the system
    will not read (permissions, a name too long) is exit 2; memory that runs out while loading, exit 3."""
    try:
        return _load(spec, resize, labels_required)
    except MemoryError:
        raise RunError(f"out of memory while loading data '{spec}': free memory or use a smaller file") from None
    except RuntimeError as e:  # torch's allocator: "DefaultCPUAllocator: can't allocate memory"
        if "allocate" not in str(e):
            raise
        raise RunError(f"out of memory while loading data '{spec}': free memory or use a smaller file") from None
    except OSError as e:
        raise InputError(f"cannot read data '{str(spec)[:200]}': {e.strerror or _first_line(e)}"
                         + (f" ('{str(e.filename)[:200]}')" if e.filename and str(e.filename) != spec else "")
                         ) from None


def _load(spec: str, resize: tuple[int, int] | None, labels_required: bool) -> Dataset:
    if spec.startswith("fashion-mnist:"):
        return load_fashion_mnist(spec.split(":", 1)[1])
    path = Path(spec)
    if not path.exists():
        raise InputError(f"data '{spec}' does not exist (expected an image folder, a "
                         ".safetensors/.npz/.pt tensor file, or fashion-mnist:train|test)")
    if path.is_dir():
        return load_image_folder(path, resize)
    if not path.is_file():
        raise InputError(f"data '{spec}' is not a regular file (a pipe or device?): harden reads image folders "
                         "and tensor files")
    loaders = {".safetensors": _load_safetensors, ".npz": _load_npz, ".pt": _load_pt, ".pth": _load_pt}
    loader = loaders.get(path.suffix.lower())
    if loader is None:
        raise InputError(f"data '{spec}': unsupported file type '{path.suffix}' "
                         "(use an image folder or a .safetensors/.npz/.pt file with 'images' and 'labels')")
    if loader is not _load_npz:  # safetensors and torch.save store tensors uncompressed (npz: its members' sizes)
        check_budget(path.stat().st_size, f"data '{spec}'")
    images, labels, classes = loader(path)
    if labels is None and images is not None and not labels_required:
        labels = np.full(len(images), UNLABELLED, dtype=np.int64)
    return _from_arrays(images, labels, classes, str(path))


def _read_idx(path: Path) -> np.ndarray:
    """An IDX file of unsigned bytes (MNIST's format), its header checked against the data before allocating."""
    if path.suffix == ".gz":
        with open(path, "rb") as f:
            if f.read(2) != b"\x1f\x8b":
                raise InputError(f"'{path}' is named .gz but is not gzip-compressed")
    try:
        with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
            head = f.read(4)
            if len(head) < 4 or head[:3] != b"\0\0\x08" or not 1 <= head[3] <= 4:
                raise InputError(f"'{path}' is not an IDX file of unsigned bytes (header {head!r})")
            raw_dims = f.read(4 * head[3])
            dims = [int.from_bytes(raw_dims[4 * i: 4 * i + 4], "big") for i in range(len(raw_dims) // 4)]
            need = math.prod(dims)
            if len(dims) != head[3] or need == 0:
                raise InputError(f"'{path}': truncated or empty IDX header")
            check_budget(need, f"'{path}'")
            if path.suffix != ".gz" and path.stat().st_size != 4 + 4 * len(dims) + need:
                raise InputError(f"'{path}': the IDX header declares {need:,} bytes of data but the file holds "
                                 f"{path.stat().st_size - 4 - 4 * len(dims):,}")
            raw = f.read(need + 1)
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise InputError(f"'{path}': damaged gzip data ({_first_line(e)})") from None
    if len(raw) != need:
        raise InputError(f"'{path}': the IDX header declares {need:,} bytes of data but the file holds "
                         f"{'more' if len(raw) > need else f'{len(raw):,}'}")
    return np.frombuffer(raw, dtype=np.uint8).reshape(dims)


def load_fashion_mnist(split: str) -> Dataset:
    prefix = {"train": "train", "test": "t10k"}.get(split)
    if prefix is None:
        raise InputError(f"unknown split 'fashion-mnist:{split}' (use fashion-mnist:train or fashion-mnist:test)")
    root = Path(os.environ.get("HARDEN_FASHION_MNIST_DIR", FASHION_MNIST_DIR))
    found = {}
    for kind in ("images-idx3-ubyte", "labels-idx1-ubyte"):
        for name in (f"{prefix}-{kind}.gz", f"{prefix}-{kind}"):
            if (root / name).exists():
                found[kind] = root / name
                break
        else:
            raise InputError(f"Fashion-MNIST not found under {root}: install Debian's package "
                             "(apt-get install dataset-fashion-mnist) or set HARDEN_FASHION_MNIST_DIR")
    images = torch.from_numpy(_read_idx(found["images-idx3-ubyte"]).copy()).unsqueeze(1)
    labels = torch.from_numpy(_read_idx(found["labels-idx1-ubyte"]).astype(np.int64))
    return Dataset(images, labels, list(FASHION_MNIST_CLASSES), f"fashion-mnist:{split}")


def load_image_folder(root: Path, resize: tuple[int, int] | None = None) -> Dataset:
    from PIL import Image, UnidentifiedImageError

    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(class_dirs) < 2:
        raise InputError(f"image folder '{root}' has {len(class_dirs)} class subfolder(s); "
                         "it needs one subfolder per class and at least two classes")
    arrays, labels, shapes = [], [], {}
    notes: list[str] = []
    resized = total = 0
    budget = memory_budget()
    for label, d in enumerate(class_dirs):
        files = sorted(p for p in d.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not files:
            raise InputError(f"class folder '{d}' holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        for p in files:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("error", Image.DecompressionBombWarning)
                    im_cm = Image.open(p, formats=PIL_FORMATS)
                with im_cm as im:
                    if im.width * im.height > MAX_PIXELS:
                        raise InputError(f"image '{p}' is {im.width}x{im.height} pixels, more than harden decodes "
                                         f"({MAX_PIXELS:,}); shrink it first")
                    mode = "L" if im.mode in ("L", "1", "I;16", "I") else "RGB"
                    im = im.convert(mode)
                    if resize is not None and im.size != (resize[1], resize[0]):
                        im = im.resize((resize[1], resize[0]), Image.BILINEAR)
                        resized += 1
                    arr = np.asarray(im)
            except UnidentifiedImageError:
                raise InputError(f"cannot read image '{p}': not a {', '.join(PIL_FORMATS[:-1])} or WebP image "
                                 "(the formats harden decodes, whatever the file's name)") from None
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError,
                    Image.DecompressionBombWarning) as e:
                raise InputError(f"cannot read image '{p}': {str(e).splitlines()[0] if str(e) else type(e).__name__}"
                                 ) from None
            if arr.ndim == 2:
                arr = arr[:, :, None]
            shapes.setdefault(arr.shape, p)
            total += arr.nbytes
            if total > budget:  # many images of the allowed size, or a large --resize
                check_budget(total, f"image folder '{root}' (decoded up to '{p.name}')")
            arrays.append(arr)
            labels.append(label)
    channels = max(a.shape[2] for a in arrays)
    if channels == 3 and any(a.shape[2] == 1 for a in arrays):  # mixed grayscale and colour: promote to RGB
        notes.append(f"{sum(a.shape[2] == 1 for a in arrays)} grayscale images converted to RGB (mixed folder)")
        arrays = [np.repeat(a, 3, axis=2) if a.shape[2] == 1 else a for a in arrays]
    if resized:
        notes.append(f"{resized} images resized to {resize} while decoding (bilinear)")
    sizes = {a.shape[:2] for a in arrays}
    if len(sizes) > 1:
        (s1, s2) = sorted(sizes)[:2]
        raise InputError(f"images in '{root}' have different sizes ({s1[0]}x{s1[1]}, {s2[0]}x{s2[1]}, ...): "
                         "pass --resize H,W")
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    return Dataset(images, torch.tensor(labels, dtype=torch.int64), [d.name for d in class_dirs], str(root), notes)


def _load_safetensors(path: Path):
    from safetensors.torch import load_file

    try:
        t = load_file(str(path))
    except MemoryError:
        raise  # exit 3 (a failed run), not a bad file
    except Exception as e:  # noqa: BLE001 - safetensors raises its own types for damaged files
        raise InputError(f"cannot read '{path}' as safetensors: {_first_line(e)}") from None
    return t.get("images"), t.get("labels"), None


def _first_line(e: BaseException) -> str:
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    return text[:200]


def _load_npz(path: Path):
    import zipfile

    with open(path, "rb") as f:
        head = f.read(4)
    if not head.startswith(b"PK"):
        what = "empty" if not head else ("a .npy array, not an .npz archive" if head.startswith(b"\x93NUM")
                                         else f"not a zip archive (starts with {head!r})")
        raise InputError(f"cannot read '{path}' as .npz: the file is {what}; save with numpy.savez(images=..., "
                         "labels=...)")
    try:
        _check_npz_members(path)
        with np.load(path, allow_pickle=False) as z:
            images = z["images"] if "images" in z else None
            labels = z["labels"] if "labels" in z else None
            classes = z["classes"] if "classes" in z else None
    except (ValueError, OSError, EOFError, KeyError, zipfile.BadZipFile, RuntimeError, NotImplementedError) as e:
        raise InputError(f"cannot read '{path}' as .npz: {_first_line(e)}") from None
    if classes is not None:
        if classes.ndim != 1 or classes.dtype.kind not in "USi":
            raise InputError(f"'{path}': 'classes' must be a 1-D array of names")
        classes = [str(c) for c in classes]
    return images, labels, classes


def _check_npz_members(path: Path) -> None:
    """The arrays harden reads from an npz, sized by their headers before any is decompressed: each must fit its
    zip member (a header that lies) and together the memory budget (a zip bomb)."""
    total = 0
    with zipfile.ZipFile(path) as zf:
        for info in zf.infolist():
            if info.filename not in ("images.npy", "labels.npy", "classes.npy"):
                continue
            with zf.open(info) as f:
                version = np.lib.format.read_magic(f)
                read = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                    np.lib.format.read_array_header_2_0
                shape, _, dtype = read(f)
            need = math.prod(shape) * dtype.itemsize
            if need > info.file_size:
                raise InputError(f"'{path}': '{info.filename[:-4]}' declares shape {shape} ({need:,} bytes) but its "
                                 f"member holds {info.file_size:,} bytes (a damaged or crafted file)")
            total += need
    check_budget(total, f"'{path}'")


def _load_pt(path: Path):
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except MemoryError:
        raise  # exit 3 (a failed run), not a bad file
    except Exception as e:  # noqa: BLE001 - torch raises many types for bad files
        raise InputError(f"cannot read '{path}' as a tensor file: {str(e).splitlines()[0]}") from None
    if not isinstance(obj, dict):
        raise InputError(f"'{path}' must hold a dict with 'images' and 'labels'")
    classes = obj.get("classes")
    if classes is not None and not (isinstance(classes, (list, tuple)) and all(isinstance(c, str) for c in classes)):
        raise InputError(f"'{path}': 'classes' must be a list of names")
    return obj.get("images"), obj.get("labels"), classes


def _from_arrays(images, labels, classes, source: str) -> Dataset:
    if images is None or labels is None:
        raise InputError(f"'{source}' must contain both 'images' and 'labels'")
    images, labels = _as_tensor(images, "images", source), _as_tensor(labels, "labels", source)
    if labels.numel() == 0 or images.numel() == 0:
        raise InputError(f"'{source}' holds no images")
    labels = labels.reshape(-1)
    if labels.dtype.is_floating_point or labels.is_complex() or labels.dtype == torch.bool:
        raise InputError(f"'{source}': labels must be integers, got {labels.dtype}")
    labels = labels.to(torch.int64)
    if images.ndim == 3:
        images = images.unsqueeze(1)
    if images.ndim != 4:
        raise InputError(f"'{source}': images must be NCHW or NHWC, got shape {tuple(images.shape)}")
    # NCHW unless the channel axis is clearly last (1 or 3 channels first win; 4 = RGBA only if unambiguous)
    if images.shape[1] not in (1, 3) and (images.shape[3] in (1, 3) or
                                          (images.shape[3] == 4 and images.shape[1] != 4)):
        images = images.permute(0, 3, 1, 2).contiguous()
    if images.shape[0] != labels.shape[0]:
        raise InputError(f"'{source}': {images.shape[0]} images but {labels.shape[0]} labels")
    if images.dtype != torch.uint8:
        if not images.is_floating_point():
            raise InputError(f"'{source}': images have dtype {images.dtype}; store uint8 0-255 or float 0-1")
        images = images.float()
        if not bool(torch.isfinite(images).all()):
            raise InputError(f"'{source}': images contain NaN or inf values")
        lo, hi = float(images.min()), float(images.max())
        if lo < 0 or hi > 1:
            raise InputError(f"'{source}': float images must lie in [0, 1] (found {lo:g}..{hi:g}); "
                             "store uint8 0-255 or scale to [0, 1]")
    return Dataset(images, labels, list(classes) if classes is not None else None, source)


# ---------------------------------------------------------------- conforming to the model


def _as_tensor(v, what: str, source: str) -> torch.Tensor:
    """An array of numbers as a tensor; strings, objects and nested lists are named as such."""
    if isinstance(v, torch.Tensor):  # from a .pt file: dense numbers on the CPU, nothing attached
        if v.layout != torch.strided or v.is_nested or v.is_quantized or v.device.type != "cpu":
            kind = "nested" if v.is_nested else "quantized" if v.is_quantized else \
                str(v.layout).replace("torch.", "") if v.layout != torch.strided else f"{v.device.type} device"
            raise InputError(f"'{source}': {what} is a {kind} tensor; store a dense CPU tensor (.to_dense().cpu())")
        # its shape, not its storage: a stride-0 view (x.expand) declares far more than the file holds
        check_budget(v.numel() * v.element_size(), f"'{source}': {what} of shape {tuple(v.shape)}")
        return v.detach()
    try:
        arr = np.asarray(v)
    except (ValueError, TypeError) as e:
        raise InputError(f"'{source}': {what} is not an array ({_first_line(e)})") from None
    if arr.dtype.kind not in "biuf":
        raise InputError(f"'{source}': {what} must be numbers, got dtype {arr.dtype}"
                         + (" (labels are class indices 0..K-1; names go in 'classes')" if what == "labels" else ""))
    if arr.dtype.kind == "f" and arr.dtype.itemsize > 8 or arr.dtype == np.float16:
        arr = arr.astype(np.float32)
    try:
        return torch.as_tensor(arr)
    except (TypeError, ValueError, RuntimeError) as e:
        raise InputError(f"'{source}': {what} have an unsupported dtype {arr.dtype} ({_first_line(e)})") from None


def parse_pair(text: str | None, what: str) -> tuple[int, int] | None:
    if text is None or text == "":
        return None
    m = re.fullmatch(r"\s*(\d{1,6})\s*[,x]\s*(\d{1,6})\s*", str(text))
    if not m:
        raise InputError(f"{what} must be H,W (for example 28,28), got '{text}'")
    h, w = int(m.group(1)), int(m.group(2))
    if h < 1 or w < 1 or h * w > MAX_PIXELS:
        raise InputError(f"{what} must be two positive sizes H,W of at most {MAX_PIXELS:,} pixels, got '{text}'")
    return h, w


def conform(ds: Dataset, channels: int | None, resize: tuple[int, int] | None,
            crop: tuple[int, int] | None) -> Dataset:
    """Resize, centre-crop and convert channels; every step is recorded in ds.notes."""
    images = ds.images
    notes = list(ds.notes)
    if resize is not None and tuple(images.shape[2:]) != resize:
        was_uint8 = images.dtype == torch.uint8
        check_budget(2 * 4 * images.shape[0] * images.shape[1] * resize[0] * resize[1],  # float32, twice
                     f"resizing {images.shape[0]:,} images to {resize[0]}x{resize[1]}")
        x = F.interpolate(to_float(images), size=resize, mode="bilinear", antialias=True, align_corners=False)
        x = x.clamp_(0, 1)
        images = (x * 255).round_().to(torch.uint8) if was_uint8 else x
        notes.append(f"resized {tuple(ds.images.shape[2:])} -> {resize} (bilinear, antialiased)")
    if crop is not None:
        h, w = images.shape[2:]
        ch, cw = crop
        if ch > h or cw > w:
            raise InputError(f"--crop {ch},{cw} is larger than the images ({h}x{w})")
        top, left = (h - ch) // 2, (w - cw) // 2
        images = images[:, :, top:top + ch, left:left + cw].contiguous()
        notes.append(f"centre-cropped to {crop}")
    if channels is not None and images.shape[1] != channels:
        c = images.shape[1]
        if c == 4:
            images, c = images[:, :3], 3
            notes.append("dropped alpha channel")
        if c == 1 and channels == 3:
            images = images.expand(-1, 3, -1, -1).contiguous()
            notes.append("grayscale -> RGB (channel copied)")
        elif c == 3 and channels == 1:
            wts = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
            x = (to_float(images) * wts).sum(1, keepdim=True)
            images = (x * 255).round_().to(torch.uint8) if ds.images.dtype == torch.uint8 else x
            notes.append("RGB -> grayscale (ITU-R 601 luma)")
        elif c != channels:
            raise InputError(f"images have {c} channels but the model expects {channels}")
    return Dataset(images, ds.labels, ds.classes, ds.source, notes)


def apply_class_map(ds: Dataset, classes_file: str | None) -> Dataset:
    """Map folder class names to model indices with --classes (JSON list/dict or one name per line)."""
    if classes_file is None:
        return ds
    path = Path(classes_file)
    if not path.is_file():
        raise InputError(f"--classes '{classes_file}' is not a regular file")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"--classes {classes_file}: not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise InputError(f"cannot read --classes {classes_file}: {e.strerror}") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        if text.lstrip().startswith(("[", "{", '"')):
            raise InputError(f"--classes {classes_file}: invalid JSON ({e.msg}, line {e.lineno})") from None
        obj = [line.strip() for line in text.splitlines() if line.strip()]
    except RecursionError:
        raise InputError(f"--classes {classes_file}: JSON nested too deeply") from None
    if isinstance(obj, dict):
        if not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 1 << 20 for v in obj.values()):
            raise InputError(f"--classes {classes_file}: a JSON object must map names to indices 0, 1, ...")
        mapping = {str(k): int(v) for k, v in obj.items()}
    elif isinstance(obj, list):
        if not all(isinstance(name, (str, int, float)) and not isinstance(name, bool) for name in obj):
            raise InputError(f"--classes {classes_file}: a JSON list must hold class names")
        mapping = {str(name): i for i, name in enumerate(obj)}
    else:
        raise InputError(f"--classes {classes_file}: expected a JSON list or object, or one name per line")
    if not mapping:
        raise InputError(f"--classes {classes_file} names no classes")
    if ds.classes is None:
        raise InputError("--classes applies to image folders (or tensor files that store 'classes')")
    missing = [c for c in ds.classes if c not in mapping]
    if missing:
        raise InputError(f"--classes {classes_file} does not name the data's class(es) {missing[:5]}")
    remap = torch.tensor([mapping[c] for c in ds.classes], dtype=torch.int64)
    names = [""] * (max(mapping.values()) + 1)
    for name, i in mapping.items():
        names[i] = name
    notes = ds.notes + [f"class names mapped to model indices by {classes_file}"]
    return Dataset(ds.images, remap[ds.labels], names, ds.source, notes)


def check_labels(ds: Dataset, num_classes: int) -> None:
    lo, hi = int(ds.labels.min()), int(ds.labels.max())
    if lo < 0 or hi >= num_classes:
        raise InputError(f"labels in '{ds.source}' range over {lo}..{hi} but the model has {num_classes} "
                         f"outputs (0..{num_classes - 1}); fix the labels or map classes with --classes")


def class_count_warning(ds: Dataset, num_classes: int) -> str | None:
    """A warning when the model's output size does not fit the data's classes: the data names K classes (and no
    --classes map says which model outputs they are) and the model has N != K outputs, or, unnamed, its labels span
    K classes and the model has more than twice as many outputs (an output that is not the logits, such as a
    feature vector, or a model of other classes). None when they fit, or when nothing is labelled."""
    labelled = ds.labels[ds.labels != UNLABELLED]
    if not len(labelled) or any(n.startswith("class names mapped") for n in ds.notes):
        return None
    if ds.classes:
        if len(ds.classes) == num_classes:
            return None
        what = f"'{ds.source}' names {len(ds.classes)} classes"
    else:
        span = int(labelled.max()) + 1
        if num_classes <= 2 * span:
            return None
        what = f"the labels of '{ds.source}' span only {span} classes (0..{span - 1})"
    return (f"the model outputs {num_classes} scores per image but {what}: if that output is not the logits, pick "
            "them with --logits; if the model's classes are other than the data's, map them with --classes")


# ---------------------------------------------------------------- subsets and augmentation


def samples(ds: "Dataset", subset: float | int | None, max_samples: int | None, seed: int) -> "Dataset":
    """The samples a run covers (`harden eval`, `harden certify`): `max_samples` seeded stratified ones when fewer
    than the data holds, else `subset` (a count or a share, `parse_subset`), else all of `ds`."""
    if max_samples and max_samples < len(ds):
        subset = max_samples
    if subset is None:
        return ds
    return ds.take(stratified_split(ds.labels, subset, seed)[0])


def parse_subset(text: str | float | int | None) -> float | int | None:
    """'10%' or '0.1' -> fraction; '600' -> count."""
    if text is None or text == "":
        return None
    s = str(text).strip()
    try:
        if s.endswith("%"):
            v: float | int = float(s[:-1]) / 100
        elif re.fullmatch(r"\d+", s):
            v = int(s)
        else:
            v = float(s)
    except ValueError:
        raise InputError(f"--subset must be a fraction (0.1 or 10%) or a count (600), got '{text}'") from None
    if isinstance(v, float) and not 0 < v <= 1:
        raise InputError(f"--subset fraction must be in (0, 1], got '{text}'")
    if isinstance(v, int) and v < 1:
        raise InputError(f"--subset count must be at least 1, got '{text}'")
    return v


def stratified_split(labels: torch.Tensor, size: float | int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded stratified subset: returns (chosen, rest) sorted index tensors."""
    n = labels.shape[0]
    count = int(round(size * n)) if isinstance(size, float) else int(size)
    if count > n:
        raise InputError(f"--subset {size} asks for {count} samples but the data has only {n}")
    if count < 1:
        raise InputError(f"--subset {size} of {n:,} samples leaves none: give a larger --subset")
    g = torch.Generator().manual_seed(seed)
    classes = torch.unique(labels)
    chosen = []
    per_class = {int(c): torch.nonzero(labels == c).flatten() for c in classes}
    # proportional allocation with largest remainders, so the total is exact
    quotas = {c: count * len(ix) / n for c, ix in per_class.items()}
    alloc = {c: int(q) for c, q in quotas.items()}
    short = count - sum(alloc.values())
    for c in sorted(quotas, key=lambda c: (-(quotas[c] - alloc[c]), c))[:short]:
        alloc[c] += 1
    for c, ix in per_class.items():
        perm = ix[torch.randperm(len(ix), generator=g)]
        chosen.append(perm[: alloc[c]])
    chosen_t = torch.sort(torch.cat(chosen)).values
    mask = torch.ones(n, dtype=torch.bool)
    mask[chosen_t] = False
    return chosen_t, torch.nonzero(mask).flatten()


def augment(x: torch.Tensor, generator: torch.Generator, pad: int = 4, hflip: bool = True) -> torch.Tensor:
    """Pad (reflect) + random crop back to size + random horizontal flip (paper Table 3, first rows)."""
    n, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    rows = (dy.view(n, 1) + torch.arange(h).view(1, h))  # n,h
    cols = (dx.view(n, 1) + torch.arange(w).view(1, w))  # n,w
    idx_n = torch.arange(n).view(n, 1, 1)
    out = padded.permute(0, 2, 3, 1)[idx_n, rows.view(n, h, 1), cols.view(n, 1, w)].permute(0, 3, 1, 2)
    if hflip:
        flip = torch.rand(n, generator=generator) < 0.5
        out[flip] = out[flip].flip(-1)
    return out.contiguous()


def _array_like(t: Any) -> bool:
    """A tensor, or an array torch reads as one (numpy's: `__array_interface__`)."""
    return torch.is_tensor(t) or hasattr(t, "__array_interface__")


def _tensor(t: Any, what: str) -> torch.Tensor:
    """A tensor, or a numpy array as one (copied when its strides are negative, as after np.flip); an array torch
    cannot hold (object or string dtype) is an `InputError`."""
    if torch.is_tensor(t):
        return t
    import numpy as np

    try:
        return torch.as_tensor(np.ascontiguousarray(t))
    except (TypeError, ValueError, RuntimeError) as e:
        raise InputError(f"{what}: an array of dtype {getattr(t, 'dtype', type(t).__name__)} torch cannot hold "
                         f"({str(e).splitlines()[0][:100]}); pass numbers (uint8 or float pixels, integer labels)"
                         ) from None


def as_dataset(data: Any, labels_required: bool = True) -> Dataset:
    """A harden `Dataset` from what a notebook has at hand: a `Dataset`, a data spec (folder, tensor file,
    `fashion-mnist:train`), `(images, labels)` tensors or numpy arrays (NCHW, float pixels in [0, 1] or uint8),
    images alone when `labels_required` is False, a torch `Dataset` of `(image, label)` items or a `DataLoader`
    (`hardener.as_dataset`)."""
    if isinstance(data, Dataset):
        return data
    if isinstance(data, (str, Path)):
        return load(str(data), None, labels_required)
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(_array_like(t) for t in data):
        return _from_tensors(_tensor(data[0], "images"), _tensor(data[1], "labels"), "tensors")
    if _array_like(data) and not isinstance(data, (tuple, list)) and not labels_required:  # images alone
        data = _tensor(data, "images")
        return _from_tensors(data, torch.full((len(data),), UNLABELLED), "tensors", unlabelled=True)
    from torch.utils.data import DataLoader
    from torch.utils.data import Dataset as TorchDataset

    if isinstance(data, DataLoader):
        xs, ys = [], []
        for batch in data:
            if not isinstance(batch, (tuple, list)) or len(batch) < 2:
                raise InputError("a DataLoader must yield (images, labels) batches")
            xs.append(torch.as_tensor(batch[0]))
            ys.append(torch.as_tensor(batch[1]))
        if not xs:
            raise InputError("the DataLoader yielded no batches")
        return _from_tensors(torch.cat(xs), torch.cat(ys), "DataLoader")
    if isinstance(data, TorchDataset):
        try:
            items = [data[i] for i in range(len(data))]  # type: ignore[arg-type]
        except TypeError:
            raise InputError("a torch Dataset must have a length and return (image, label) items") from None
        if not items:
            raise InputError("the torch Dataset is empty")
        return _from_tensors(torch.stack([torch.as_tensor(i[0]) for i in items]),
                             torch.as_tensor([int(i[1]) for i in items]), "torch Dataset")
    raise InputError(f"cannot use {type(data).__name__} as data: pass a harden Dataset, (images, labels) tensors, a "
                     "torch Dataset, a DataLoader or a data spec (folder, tensor file, fashion-mnist:train)")


def _from_tensors(x: torch.Tensor, y: torch.Tensor, source: str, unlabelled: bool = False) -> Dataset:
    if x.ndim != 4:
        raise InputError(f"images must be N,C,H,W, got shape {tuple(x.shape)}")
    if x.dtype != torch.uint8:
        x = x.float()
        if x.numel() and (not torch.isfinite(x).all() or x.min() < 0 or x.max() > 1):
            raise InputError("float images must be finite pixels in [0, 1] (uint8 images 0-255 are fine too)")
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise InputError(f"labels must be integer class indices, got {y.dtype} (a float label 1.5 is no class)")
    y = y.long().flatten()
    if len(y) != len(x):
        raise InputError(f"{len(x)} images but {len(y)} labels")
    if len(y) and int(y.min()) < 0 and not unlabelled:
        raise InputError("labels must be class indices >= 0")
    return Dataset(x, y, None, source)
