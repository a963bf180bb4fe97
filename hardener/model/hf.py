"""Hugging Face checkpoints as `save_pretrained` leaves them, loaded by transformers itself.

A folder holding `config.json` and the weights (`model.safetensors`, or shards with their index), or that
`model.safetensors` named directly, with no `--arch`: transformers' own `from_pretrained` loads it from the local
path, offline and without remote code, so the key renames of its versions, tied weights and the config are handled
by the library that owns them. The model class is the config's `architectures[0]`, taken only from transformers'
own namespace and only if it is an image classifier (`...ForImageClassification`).

A patched checkpoint records `hf:CLASS` as its architecture and the config as its arch kwargs (`{"config": {...}}`),
never code: loading rebuilds that transformers class from the config (the same checks) and loads the stored base
tensors into it.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from ..errors import InputError

PREFIX = "hf:"  # the manifest's arch of a Hugging Face model: hf:CLASS
WEIGHTS = ("model.safetensors", "model.safetensors.index.json")


def pretrained_folder(path: str | Path, arch: str | None) -> Path | None:
    """The `save_pretrained` folder `path` names (the folder, or its `model.safetensors`), when no --arch is given and
    it holds a Hugging Face `config.json` (one with a `model_type`); None otherwise."""
    p = Path(path)
    if arch:
        return None
    folder = p if p.is_dir() else p.parent if p.name == WEIGHTS[0] and p.is_file() else None
    if folder is None or not (folder / "config.json").is_file():
        return None
    try:
        cfg = json.loads((folder / "config.json").read_text(encoding="utf-8")[: 1 << 22])
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(cfg, dict) or "model_type" not in cfg:
        return None
    if not any((folder / w).is_file() for w in WEIGHTS):
        raise InputError(f"'{path}' holds a Hugging Face config.json but no model.safetensors (save the model with "
                         "save_pretrained, safetensors format)")
    return folder


def _transformers():
    try:
        import transformers
    except ImportError:
        raise InputError("a Hugging Face save_pretrained folder is loaded by transformers, which is not installed: "
                         "pip install transformers (or pass --arch with a constructor and the state dict)") from None
    return transformers


def model_class(name: Any) -> type[nn.Module]:
    """transformers' own image-classifier class called `name` (never a class from elsewhere)."""
    tf = _transformers()
    cls = getattr(tf, name, None) if isinstance(name, str) and name.isidentifier() else None
    if not (isinstance(cls, type) and issubclass(cls, tf.PreTrainedModel) and "ForImageClassification" in name):
        raise InputError(f"the Hugging Face architecture '{str(name)[:100]}' is not an image classifier of "
                         "transformers (a ...ForImageClassification class): harden patches image classifiers")
    return cls


def load_pretrained(folder: Path) -> tuple[nn.Module, str, dict[str, Any]]:
    """The model of a `save_pretrained` folder, loaded by transformers (local files only, no remote code), with the
    arch and arch kwargs a patched checkpoint records: `hf:CLASS` and `{"config": ...}`."""
    tf = _transformers()
    bars = tf.utils.logging.is_progress_bar_enabled()
    tf.utils.logging.disable_progress_bar()  # harden's console shows its own progress
    try:
        config = tf.AutoConfig.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
        names = getattr(config, "architectures", None) or []
        cls = model_class(names[0] if names else f"{type(config).__name__.removesuffix('Config')}ForImageClassification")
        net = cls.from_pretrained(str(folder), config=config, local_files_only=True, trust_remote_code=False)
    except InputError:
        raise
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds on a broken folder
        raise InputError(f"transformers cannot load '{folder}': {type(e).__name__}: "
                         f"{str(e).splitlines()[0][:200] if str(e) else ''}") from None
    finally:
        if bars:
            tf.utils.logging.enable_progress_bar()
    recorded = {k: v for k, v in json.loads(config.to_json_string(use_diff=False)).items() if k != "_name_or_path"}
    return net.float().eval(), PREFIX + cls.__name__, {"config": recorded}


def build(arch: str, kwargs: dict[str, Any], budget: int | None = None) -> nn.Module:
    """A patched checkpoint's base skeleton from its manifest (`hf:CLASS`, `{"config": ...}`): the transformers
    class built from the config; its weights are the checkpoint's. `budget`: the values the checkpoint's base tensors
    hold; a config asking for more is refused before anything is allocated (built on the meta device first)."""
    import torch

    cls = model_class(arch[len(PREFIX):])
    config = kwargs.get("config") if isinstance(kwargs, dict) else None
    if not isinstance(config, dict):
        raise InputError(f"the checkpoint's arch '{arch[:100]}' needs its config in arch_kwargs ('config': {{...}})")
    try:
        if budget is not None:
            with torch.device("meta"):
                need = sum(t.numel() for t in cls(cls.config_class.from_dict(config)).state_dict().values())
            if need > budget + (1 << 20):
                raise InputError(f"the checkpoint's {cls.__name__} config asks for {need:,} values but the file holds "
                                 f"{budget:,} base values")
        return cls(cls.config_class.from_dict(config)).float().eval()
    except InputError:
        raise
    except Exception as e:  # noqa: BLE001 - a config transformers refuses
        raise InputError(f"the checkpoint's {cls.__name__} config is refused by transformers: {type(e).__name__}: "
                         f"{str(e).splitlines()[0][:200] if str(e) else ''}") from None


def is_hf_arch(arch: str | None) -> bool:
    return isinstance(arch, str) and arch.startswith(PREFIX)
