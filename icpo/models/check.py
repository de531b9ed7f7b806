"""Checks of a model folder that need no model load: run by the trainer's preflight (every rank,
before any process group), ``icpo eval`` and ``icpo filter-coarse`` before they load weights, so a
broken folder costs seconds and one line rather than minutes of loading and a traceback.

What can only be seen in the loaded weights (NaN / inf values) is :func:`check_finite`, called
by :func:`icpo.models.loading.load_causal_lm` right after the load.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any

from icpo.errors import UserError

# Weight layouts transformers loads, most preferred first: (single file, sharded index).
_WEIGHTS = (("model.safetensors", "model.safetensors.index.json"),
            ("pytorch_model.bin", "pytorch_model.bin.index.json"))


def _fail(name: str, folder: Path, problem: str) -> UserError:
    return UserError(f"{name}: model folder {str(folder)!r}: {problem}")


def _read_config(name: str, folder: Path) -> Any:
    path = folder / "config.json"
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _fail(name, folder, f"config.json is not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise _fail(name, folder, f"config.json holds a {type(raw).__name__}; expected an object")
    from transformers import CONFIG_MAPPING, AutoConfig

    model_type = raw.get("model_type")
    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
        raise _fail(name, folder, f"config.json's model_type {model_type!r} is not one this "
                    "transformers knows (a newer transformers, or a model needing "
                    "trust_remote_code, which icpo does not run)")
    try:
        return AutoConfig.from_pretrained(str(folder))
    except Exception as e:  # noqa: BLE001 (transformers raises many types for a bad config)
        raise _fail(name, folder, f"config.json cannot be read as a {model_type} config "
                    f"({type(e).__name__}: {_first_line(e)})") from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _check_safetensors(name: str, folder: Path, path: Path) -> None:
    from safetensors import safe_open

    try:  # reads the header only and checks it against the file's length
        with safe_open(str(path), framework="pt") as f:
            f.keys()
    except Exception as e:  # noqa: BLE001 (safetensors raises its own SafetensorError)
        raise _fail(name, folder, f"{path.name} is not a readable safetensors file "
                    f"(truncated or corrupt: {_first_line(e)})") from None


def _check_bin(name: str, folder: Path, path: Path) -> None:
    # torch.save's zip format keeps its directory at the end, so a truncated file has none;
    # the legacy format is a pickle (first byte 0x80), which only a load can check.
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic == b"PK\x03\x04":
        try:
            with zipfile.ZipFile(path) as z:
                z.namelist()
            return
        except (OSError, zipfile.BadZipFile) as e:
            raise _fail(name, folder, f"{path.name} is truncated or corrupt ({e})") from None
    if not magic.startswith(b"\x80"):
        raise _fail(name, folder, f"{path.name} is not a torch weight file (truncated or "
                    "corrupt)")


def _check_weight_file(name: str, folder: Path, path: Path) -> None:
    if not path.is_file():
        raise _fail(name, folder, f"weight file {path.name} is missing")
    if path.name.endswith(".safetensors"):
        _check_safetensors(name, folder, path)
    else:
        _check_bin(name, folder, path)


def _check_weights(name: str, folder: Path) -> None:
    for single, index in _WEIGHTS:
        if (folder / index).is_file():
            try:
                weight_map = json.loads((folder / index).read_text(encoding="utf-8"))["weight_map"]
                files = sorted(set(weight_map.values()))
            except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError,
                    AttributeError) as e:
                raise _fail(name, folder, f"{index} is not a valid shard index ({e!r})") from None
            if not files or not all(isinstance(f, str) for f in files):
                raise _fail(name, folder, f"{index} names no weight files")
            for f in files:
                _check_weight_file(name, folder, folder / f)
            return
        if (folder / single).exists():
            _check_weight_file(name, folder, folder / single)
            return
    raise _fail(name, folder, "no weight files (model.safetensors, pytorch_model.bin or a "
                "sharded *.index.json); is the download complete?")


def check_attn_implementation(name: str, value: str | None) -> None:
    """``value`` is an attention implementation transformers knows (or a hub kernel id)."""
    if value is None or "/" in value:  # "kernels-community/...": fetched by transformers
        return
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    known = {"eager"} | {k for key in ALL_ATTENTION_FUNCTIONS.valid_keys() for k in key.split("|")}
    if value not in known:
        raise UserError(f"{name}: got {value!r}; expected one of {', '.join(sorted(known))}")


def check_model_folder(folder: str | Path, name: str = "model.path",
                       attn_implementation: str | None = None) -> None:
    """Refuse a model folder that cannot load, in one line naming ``name``, the folder and the
    problem: config.json unreadable or of an unknown model_type, a tokenizer that does not
    load, weight files missing or with unreadable headers (a sharded index checked shard by
    shard), a model vocabulary smaller than the tokenizer's. Reads headers only, no weights."""
    folder = Path(folder)
    config = _read_config(name, folder)
    check_attn_implementation("model.attn_implementation" if name == "model.path"
                              else f"{name} attn_implementation", attn_implementation)
    _check_weights(name, folder)
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
    except Exception as e:  # noqa: BLE001 (missing files, bad JSON, a missing package, ...)
        raise _fail(name, folder, f"the tokenizer does not load ({type(e).__name__}: "
                    f"{_first_line(e)})") from None
    if isinstance(tokenizer, bool) or not hasattr(tokenizer, "__len__"):
        raise _fail(name, folder, "holds no usable tokenizer")
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    vocab = getattr(text, "vocab_size", None)
    if isinstance(vocab, int) and vocab < len(tokenizer):
        raise _fail(name, folder, f"the model's vocabulary (config.json vocab_size {vocab}) is "
                    f"smaller than the tokenizer's ({len(tokenizer)} tokens); they are from "
                    "different models")


def check_finite(model: Any, path: str) -> None:
    """One pass over the loaded parameters: a NaN or inf weight is a corrupt checkpoint, which
    would otherwise surface steps later as a NaN loss (or a skipped step)."""
    import torch

    for pname, p in model.named_parameters():
        if p.is_floating_point() and not bool(torch.isfinite(p).all()):
            raise UserError(f"model {path!r}: parameter {pname!r} holds NaN or inf values; the "
                            "weights are corrupt (re-download or re-export them)")
