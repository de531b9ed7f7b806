"""LoRA for RL through PEFT: adapters on a causal LM, the base model's outputs from the same
weights (the reference policy with no second copy), merged weights for vLLM, and adapter
checkpoints in PEFT's format.

Names follow verl (``lora_rank``, ``lora_alpha``, ``target_modules``). Torch, PEFT and DeepSpeed
are imported inside the functions, so the command line can check its arguments without them.

ZeRO: stages 0-2 leave every parameter whole on every rank. Under ZeRO-3 the base weights *and*
the adapters are partitioned (DeepSpeed partitions the LoRA factors PEFT created at
``deepspeed.initialize``); forward passes gather them as usual, so training and
:func:`adapters_disabled` work unchanged, while anything reading weights directly must gather
them: :func:`iter_merged_parameters` and :func:`save_adapters` do, one module at a time, in the
same order on every rank. PEFT's own ``merge_adapter()`` would fail there (it adds into the
empty partitions) and, elsewhere, would change the trainer's weights in place.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from icpo.errors import UserError
from icpo.models import resolve_model_path

if TYPE_CHECKING:
    import torch
    from peft import PeftModel
    from torch import nn

ADAPTER_CONFIG = "adapter_config.json"
_TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json")


def apply_lora(model: nn.Module, lora_rank: int, lora_alpha: float = 16.0,
               lora_dropout: float = 0.0, target_modules: str | Sequence[str] = "all-linear",
               use_rslora: bool = False) -> PeftModel:
    """Wrap a Hugging Face causal LM in PEFT LoRA adapters of rank ``lora_rank``.

    Only the adapters require grad afterwards (see :func:`trainable_parameters`); B starts at
    zero, so the wrapped model computes what the base model did. ``target_modules`` is PEFT's:
    ``"all-linear"`` (every linear layer but the output head), a module-name regex, or a list of
    module names. The scaling of B·A is ``lora_alpha / lora_rank`` (``/ sqrt(lora_rank)`` with
    ``use_rslora``). Apply it after ``gradient_checkpointing_enable()`` and before building the
    optimizer; transformers' default non-reentrant checkpointing needs no input-grad hook.
    """
    if isinstance(lora_rank, bool) or not isinstance(lora_rank, int) or lora_rank <= 0:
        raise ValueError(f"lora_rank: expected a positive integer, got {lora_rank!r}")
    if not lora_alpha > 0:
        raise ValueError(f"lora_alpha: expected a positive number, got {lora_alpha!r}")
    if not 0.0 <= lora_dropout < 1.0:
        raise ValueError(f"lora_dropout: expected a number in [0, 1), got {lora_dropout!r}")
    if isinstance(target_modules, str):
        targets: str | list[str] = target_modules
    else:
        targets = list(target_modules)
        if not all(isinstance(t, str) and t for t in targets):
            raise ValueError(f"target_modules: expected module names, got {target_modules!r}")
    if not targets:
        raise ValueError("target_modules: expected 'all-linear', a regex or module names, got "
                         "nothing")
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=lora_rank, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                        target_modules=targets, use_rslora=use_rslora, bias="none",
                        task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def peft_model(model: nn.Module) -> PeftModel:
    """The PEFT model inside a DeepSpeed / DDP / torch.compile wrapper (or ``model`` itself)."""
    from peft import PeftModel
    from torch import nn

    inner = model
    while not isinstance(inner, PeftModel):
        nxt = getattr(inner, "_orig_mod", None)
        if nxt is None:
            nxt = getattr(inner, "module", None)
        if not isinstance(nxt, nn.Module) or nxt is inner:
            raise TypeError(f"expected a PEFT model (see apply_lora), got {type(model).__name__}")
        inner = nxt
    return inner


def is_peft_model(model: nn.Module) -> bool:
    """Whether ``model`` is, or wraps, a PEFT model."""
    try:
        peft_model(model)
    except TypeError:
        return False
    return True


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters to hand to the optimizer: the adapters (PEFT froze the base weights)."""
    return [p for p in peft_model(model).parameters() if p.requires_grad]


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """Inside, ``model`` (or the DeepSpeed engine wrapping it) computes the base model's
    outputs: the reference log-probs without a second copy of the base weights. Run the
    forward under ``torch.no_grad()``; the adapters are back on when the block ends."""
    with peft_model(model).disable_adapter():
        yield


# ------------------------------------------------------------------------- merged weights
@contextlib.contextmanager
def _gathered(params: list[nn.Parameter], zero_stage: int) -> Iterator[None]:
    if zero_stage == 3 and params:
        import deepspeed

        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            yield
    else:
        yield


def _merged_layer(layer: Any, prefix: str) -> Iterator[tuple[str, torch.Tensor]]:
    """The base layer's parameters with every active adapter's B·A·scaling added, in float32
    and rounded once to the weight's dtype; new tensors, the live ones are left alone."""
    import torch
    from peft.tuners.lora import Embedding, Linear

    where = prefix.rstrip(".")
    if not isinstance(layer, (Linear, Embedding)):
        raise NotImplementedError(f"{where}: merged weights of a LoRA {type(layer).__name__} "
                                  "layer are not supported (Linear and Embedding are)")
    active = [] if layer.disable_adapters or layer.merged else [
        a for a in layer.active_adapters if a in layer.lora_A or a in layer.lora_embedding_A]
    for a in active:
        if a in layer.lora_variant:  # DoRA and the other variants merge differently
            raise NotImplementedError(f"{where}: merged weights of the LoRA variant "
                                      f"{type(layer.lora_variant[a]).__name__} are not supported")
    for name, param in layer.get_base_layer().named_parameters(recurse=False):
        tensor = param.data
        # Local no_grad: a grad mode held across the yield would leak into the consumer.
        with torch.no_grad():
            if name == "weight" and active:
                merged = tensor.float()
                for a in active:
                    merged = merged + layer.get_delta_weight(a).float()
                tensor = merged.to(tensor.dtype)
            elif name == "bias" and any(layer.lora_bias.get(a) for a in active):
                merged = tensor.float()
                for a in active:
                    if layer.lora_bias.get(a):
                        merged = merged + layer.lora_B[a].bias.float() * layer.scaling[a]
                tensor = merged.to(tensor.dtype)
        yield prefix + name, tensor


def _walk(module: nn.Module, prefix: str, zero_stage: int, seen: set[int]
          ) -> Iterator[tuple[str, torch.Tensor]]:
    from peft.tuners.lora import LoraLayer
    from peft.utils.other import AuxiliaryTrainingWrapper

    if isinstance(module, AuxiliaryTrainingWrapper):  # modules_to_save, trainable tokens
        raise NotImplementedError(f"{prefix.rstrip('.')}: {type(module).__name__} is not "
                                  "supported by merged weights; train LoRA adapters only")
    if isinstance(module, LoraLayer):
        params = [p for p in module.parameters() if id(p) not in seen]
        seen.update(id(p) for p in params)
        with _gathered(params, zero_stage):
            yield from _merged_layer(module, prefix)
        return
    own = [(n, p) for n, p in module.named_parameters(recurse=False) if id(p) not in seen]
    seen.update(id(p) for _, p in own)  # a tied weight comes once, under its first name
    with _gathered([p for _, p in own], zero_stage):
        for name, param in own:
            yield prefix + name, param.data
    for name, child in module.named_children():
        yield from _walk(child, f"{prefix}{name}.", zero_stage, seen)


def iter_merged_parameters(model: nn.Module, zero_stage: int = 0
                           ) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` of the model the adapters make, for vLLM's ``load_weights``.

    Names are the base Hugging Face model's (``model.layers.0.self_attn.q_proj.weight``, as
    ``named_parameters()`` of the model without PEFT gives them, in that order); each LoRA
    layer's weight is ``W + B @ A * scaling`` (PEFT's scaling, so rsLoRA included) in a new
    tensor, any other parameter is the live one. Under ZeRO-3 one module's parameters are
    gathered at a time, so consume each tensor before asking for the next, and iterate on every
    rank in step. ``model`` may be the PEFT model or a DeepSpeed engine wrapping it.
    """
    yield from _walk(peft_model(model).get_base_model(), "", zero_stage, set())


def merged_state(model: nn.Module, zero_stage: int = 0) -> dict[str, torch.Tensor]:
    """:func:`iter_merged_parameters` as a dict of copies (a snapshot: it holds the whole model;
    stream the iterator instead where memory matters)."""
    return {name: t.detach().clone() for name, t in iter_merged_parameters(model, zero_stage)}


# ------------------------------------------------------------------------- checkpoints
def _adapter_params(model: PeftModel) -> list[tuple[str, nn.Parameter]]:
    # By name, not requires_grad: PeftModel.from_pretrained loads adapters frozen.
    return [(n, p) for n, p in model.named_parameters() if ".lora_" in n]


def save_adapters(model: nn.Module, folder: str | os.PathLike, zero_stage: int = 0,
                  write: bool = True) -> None:
    """Write the adapters in PEFT's format (``adapter_config.json``, ``adapter_model.safetensors``;
    ``PeftModel.from_pretrained(base, folder)`` loads them). Under ZeRO-3 every rank must call
    it (the adapters are gathered); only those with ``write`` write."""
    peft = peft_model(model)
    state_dict = None
    if zero_stage == 3:
        named = _adapter_params(peft)
        with _gathered([p for _, p in named], zero_stage):
            state_dict = {n: p.detach().cpu().clone() for n, p in named}
    if write:
        peft.save_pretrained(os.fspath(folder), state_dict=state_dict, safe_serialization=True)


def load_adapters(model: nn.Module, folder: str | os.PathLike, zero_stage: int = 0) -> None:
    """Copy the adapters saved in ``folder`` (:func:`save_adapters`, or any PEFT LoRA adapter of
    the same shape) into ``model``'s, bit for bit. Refuses an adapter whose rank, alpha or rsLoRA
    setting differs (its scaling would silently change) or that misses a factor."""
    from peft.utils import load_peft_weights, set_peft_model_state_dict

    peft = peft_model(model)
    path = find_adapter_folder(folder, "folder")
    saved = json.loads((path / ADAPTER_CONFIG).read_text())
    live = peft.peft_config[peft.active_adapter]
    for key in ("r", "lora_alpha", "use_rslora"):
        if key in saved and saved[key] != getattr(live, key):
            raise UserError(f"{path}: the adapter has {key}={saved[key]!r}, the model "
                            f"{key}={getattr(live, key)!r}")
    weights = load_peft_weights(str(path), device="cpu")
    named = _adapter_params(peft)
    params = [p for _, p in named]
    with _gathered_for_write(params) if zero_stage == 3 else contextlib.nullcontext():
        result = set_peft_model_state_dict(peft, weights)
    missing = sorted({n for n, _ in named} & set(result.missing_keys))
    if missing or result.unexpected_keys:
        raise UserError(f"{path}: the adapter does not match the model (missing "
                        f"{missing[:3]}, unexpected {list(result.unexpected_keys)[:3]})")


@contextlib.contextmanager
def _gathered_for_write(params: list[nn.Parameter]) -> Iterator[None]:
    import deepspeed

    # Rank 0's values are re-partitioned to all ranks when the block ends.
    with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
        yield


def find_adapter_folder(path: str | os.PathLike, name: str = "--adapter") -> Path:
    """The folder holding ``adapter_config.json``: ``path`` itself, or the ``model/`` folder of a
    LoRA checkpoint (``checkpoints/step_N``). ``name`` starts the error (the flag or argument)."""
    folder = Path(path)
    for candidate in (folder, folder / "model"):
        if (candidate / ADAPTER_CONFIG).is_file():
            return candidate
    if not folder.is_dir():
        raise UserError(f"{name}: {os.fspath(path)!r} is not a folder")
    raise UserError(f"{name}: {os.fspath(path)!r} holds no {ADAPTER_CONFIG} (nor model/"
                    f"{ADAPTER_CONFIG}); expected a PEFT adapter folder or a LoRA checkpoint")


def adapter_base_model(adapter_folder: str | os.PathLike) -> str | None:
    """The base model an adapter was trained on (its ``base_model_name_or_path``), if recorded."""
    config = json.loads((Path(adapter_folder) / ADAPTER_CONFIG).read_text())
    return config.get("base_model_name_or_path") or None


def check_base_model(path: str | os.PathLike, name: str = "--model") -> str:
    """The local folder of base model ``path``: a folder with ``config.json``, a bundled id
    (``icpo/tiny``) or a hub id already in the Hugging Face cache (no network lookup)."""
    text = os.fspath(path)
    local = Path(resolve_model_path(text))
    if (local / "config.json").is_file():
        return str(local)
    if not local.exists() and text.count("/") == 1 and not text.startswith((".", "/")):
        from huggingface_hub import try_to_load_from_cache

        try:
            cached = try_to_load_from_cache(text, "config.json")
        except Exception:  # noqa: BLE001 (an id the hub library refuses is simply not cached)
            cached = None
        if isinstance(cached, str):
            return str(Path(cached).parent)
    raise UserError(f"{name}: {text!r} is neither a Hugging Face model folder (with config.json) "
                    "nor a model in the local Hugging Face cache")


def check_export_out(out_folder: str | os.PathLike, overwrite: bool, name: str = "--out") -> Path:
    """Refuse an existing non-empty folder unless ``overwrite``, and a file in any case."""
    out = Path(out_folder)
    if out.exists() and not out.is_dir():
        raise UserError(f"{name}: {os.fspath(out_folder)!r} is a file; expected a folder")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise UserError(f"{name}: {os.fspath(out_folder)!r} already exists and is not "
                        "empty; pass --overwrite to replace it")
    return out


def load_merged(adapter_folder: str | os.PathLike, base_path: str | os.PathLike | None = None,
                dtype: str | torch.dtype | None = None) -> tuple[nn.Module, str]:
    """``(model, base folder)``: the base model with the adapters of ``adapter_folder`` (a PEFT
    adapter folder or a LoRA checkpoint) merged in, a plain transformers model on the CPU.
    ``base_path`` None takes the adapter's recorded base model; ``dtype`` None the base's."""
    adapter = find_adapter_folder(adapter_folder, "adapter_folder")
    base = base_path if base_path is not None else adapter_base_model(adapter)
    if base is None:
        raise UserError(f"adapter_folder: {adapter} records no base model; pass base_path")
    base = check_base_model(base, "base_path")
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype or "auto")
    return PeftModel.from_pretrained(model, str(adapter)).merge_and_unload(), base


def tokenizer_folder(adapter_folder: str | os.PathLike, base_path: str | os.PathLike
                     ) -> str | None:
    """Where the tokenizer of an adapter's model is: the adapter folder when it has one (a
    LoRA checkpoint does), else the base model's folder when that has one, else None."""
    for source in (Path(adapter_folder), Path(base_path)):
        if any((source / f).is_file() for f in _TOKENIZER_FILES):
            return str(source)
    return None


def export_merged(base_path: str | os.PathLike | None, adapter_folder: str | os.PathLike,
                  out_folder: str | os.PathLike, dtype: str | torch.dtype | None = None,
                  overwrite: bool = False) -> Path:
    """Write base + adapters as a plain Hugging Face model folder (no PEFT needed to load it).

    ``base_path`` None takes the adapter's recorded base model. ``dtype`` None keeps the
    checkpoint's own. The tokenizer comes from the adapter folder when it has one (a LoRA
    checkpoint does), else from the base model. Written to a temporary sibling and renamed,
    so a failed export leaves no half-written ``out_folder``.
    """
    adapter = find_adapter_folder(adapter_folder, "adapter_folder")
    out = check_export_out(out_folder, overwrite, "out_folder")
    merged, base = load_merged(adapter, base_path, dtype)
    from transformers import AutoTokenizer

    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    merged.save_pretrained(tmp)
    tokenizer = tokenizer_folder(adapter, base)
    if tokenizer is not None:
        AutoTokenizer.from_pretrained(tokenizer).save_pretrained(tmp)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


__all__ = ["apply_lora", "adapters_disabled", "adapter_base_model", "check_base_model",
           "check_export_out",
           "export_merged", "find_adapter_folder", "is_peft_model", "iter_merged_parameters",
           "load_adapters", "load_merged", "merged_state", "peft_model", "save_adapters",
           "tokenizer_folder", "trainable_parameters"]
