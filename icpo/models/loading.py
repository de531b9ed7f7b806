"""Loading a causal LM and its tokenizer (bundled ids like ``icpo/tiny`` resolved first), and
what a model's architecture allows (:func:`kv_cache_shareable`).

Used by the trainer, ``icpo eval`` and the coarse data filter alike. A module of its own, not
re-exported by :mod:`icpo.models`, which stays free of torch for the command line's checks.
"""

from __future__ import annotations

from typing import Any

import torch

from icpo.models import resolve_model_path
from icpo.models.check import check_finite

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto`` is bf16 on CUDA and fp32 on CPU (CPU bf16 matmuls are slow and imprecise)."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[name]


def load_tokenizer(path: str):
    """The tokenizer at ``path``, padding on the left (generation) with a pad token set."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve_model_path(path))
    tok.padding_side = "left"
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_causal_lm(path: str, dtype: torch.dtype, device: torch.device,
                   attn_implementation: str | None = None) -> torch.nn.Module:
    """The transformers causal LM at ``path`` in ``dtype`` on ``device``."""
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"dtype": dtype}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    model = AutoModelForCausalLM.from_pretrained(resolve_model_path(path), **kwargs)
    check_finite(model, path)  # before any work: NaN weights would surface steps later
    return model.to(device)


def kv_cache_shareable(config: Any) -> bool:
    """Whether every attention layer of a transformers model with ``config`` sees the whole
    sequence (no sliding window, no hybrid / linear-attention layers), so that a prompt's KV
    cache can be computed once, repeated for several continuations and pruned by rows."""
    config = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return all(t == "full_attention" for t in layer_types)
    windowed = getattr(config, "sliding_window", None)
    return not (windowed and getattr(config, "use_sliding_window", True))
