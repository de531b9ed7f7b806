"""Colocated vLLM rollouts (``vllm==0.32.0``): one in-process engine per training rank.

Written against vLLM 0.32.0's source (the ``vllm-0.32.0`` wheel from PyPI, read, not run: vLLM
cannot run on the machines this was written on). The vLLM API relied on, and where it is:

- ``vllm.LLM(model, dtype, seed, gpu_memory_utilization, enable_sleep_mode, max_model_len,
  enable_prefix_caching, distributed_executor_backend, tensor_parallel_size)``
  (vllm/entrypoints/llm.py, vllm/engine/arg_utils.py ``EngineArgs``).
- ``LLM.generate(prompts: list[TokensPrompt], sampling_params: list[SamplingParams],
  use_tqdm=False) -> list[RequestOutput]`` in prompt order; ``TokensPrompt`` is a TypedDict
  ``{"prompt_token_ids": [...]}`` (vllm/inputs/llm.py). ``RequestOutput.prompt_token_ids``,
  ``.outputs: list[CompletionOutput]`` with ``.index``, ``.token_ids`` (the stop/EOS token
  included: vllm/v1/core/sched/utils.py ``check_stop`` tests the last *appended* token) and
  ``.finish_reason`` in "stop" | "length" | "abort" | "error" | "repetition"
  (vllm/outputs.py, vllm/v1/engine/__init__.py ``FinishReason``).
- ``SamplingParams(n, temperature, top_p, top_k (0 = off), max_tokens, seed, stop_token_ids,
  detokenize)`` (vllm/sampling_params.py). With a seed and n > 1, child i of a request gets
  seed + i (vllm/v1/engine/parallel_sampling.py), so request j is given seed + j * n here and
  no two samples share a stream.
- ``LLM.sleep(level=1)`` (1: weights to CPU, KV cache dropped; 2: both dropped; either also
  pauses scheduling and clears the prefix cache), ``LLM.wake_up(tags=None | ["weights"] |
  ["kv_cache"])`` (scheduling resumes once all memory is back: vllm/v1/engine/core.py),
  ``LLM.reset_prefix_cache()``.
- Weight push: ``LLM.apply_model(fn)`` -> ``collective_rpc("apply_model")`` -> ``fn(model)`` on
  the worker, where ``model.load_weights(iterable of (hf_name, tensor))`` is vLLM's own
  checkpoint loader (e.g. vllm/model_executor/models/qwen2.py), which fuses q/k/v and
  gate/up itself. The callable (and the tensors it captures) is called directly, not
  pickled, only when the engine core runs in this process: ``VLLM_ENABLE_V1_MULTIPROCESSING=0``
  (vllm/envs.py), set here before the engine is built, with the ``UniProcExecutor`` or,
  under torchrun/deepspeed launchers, ``distributed_executor_backend="external_launcher"``
  (vllm/v1/executor/uniproc_executor.py). TRL's ``vllm_mode="colocate"`` does the same
  through ``llm.llm_engine.model_executor.driver_worker.model_runner.model.load_weights``.

Everything vLLM-specific is in :class:`VLLMRolloutEngine`; the pure helpers
(:func:`build_requests`, :func:`parse_outputs`, :func:`map_weight_name`) are unit-tested with
fakes shaped like vLLM's objects.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from icpo.rollout.base import (
    RolloutBatch,
    RolloutEngine,
    SamplingParams,
    check_prompts,
    truncate_at_eos,
    unwrap_model,
)

#: Leading name parts added by wrappers (DeepSpeed/DDP ``module.``, torch.compile, PEFT).
_LEADING = (("module",), ("_orig_mod",), ("base_model", "model"))
#: Name parts added anywhere by wrappers: activation checkpointing, FSDP, torch.compile, PEFT.
_INNER = {"_checkpoint_wrapped_module", "_fsdp_wrapped_module", "_orig_mod", "base_layer"}


def map_weight_name(name: str) -> str | None:
    """The Hugging Face checkpoint name vLLM's ``load_weights`` expects, or None to skip.

    Strips ``module.`` (DeepSpeed, DDP), ``_orig_mod.`` (torch.compile),
    ``_checkpoint_wrapped_module.`` / ``_fsdp_wrapped_module.``, and PEFT's
    ``base_model.model.`` / ``.base_layer`` / ``.modules_to_save.default``. PEFT's LoRA factors
    (``lora_*``) and ``original_module`` copies return None: vLLM has no such weights, so merge
    adapters (``merge_adapter()``) before pushing.
    """
    parts = name.split(".")
    stripped = True
    while stripped:
        stripped = False
        for prefix in _LEADING:
            if tuple(parts[:len(prefix)]) == prefix and len(parts) > len(prefix):
                parts, stripped = parts[len(prefix):], True
    if any(p.startswith("lora_") or p == "original_module" for p in parts):
        return None
    out, i = [], 0
    while i < len(parts):
        if parts[i] == "modules_to_save" and i + 1 < len(parts) and parts[i + 1] == "default":
            i += 2
            continue
        if parts[i] not in _INNER:
            out.append(parts[i])
        i += 1
    return ".".join(out)


def map_weight_names(named_tensors: Iterable[tuple[str, torch.Tensor]]
                     ) -> Iterator[tuple[str, torch.Tensor]]:
    """Apply :func:`map_weight_name`, dropping the names it skips (LoRA factors)."""
    for name, tensor in named_tensors:
        mapped = map_weight_name(name)
        if mapped is not None:
            yield mapped, tensor


def iter_full_parameters(model: nn.Module, zero_stage: int = 0
                         ) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, full tensor)`` for every parameter of the (unwrapped) model.

    Under ZeRO-3 each parameter is gathered just for its turn (``GatheredParameters``), so
    consume each tensor before asking for the next; every rank must iterate in step.
    """
    model = unwrap_model(model)
    if zero_stage == 3:
        import deepspeed

        for name, param in model.named_parameters():
            with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
                yield name, param.data
    else:
        for name, param in model.named_parameters():
            yield name, param.data


def build_requests(prompt_ids: Sequence[Sequence[int]], params: SamplingParams,
                   stop_token_ids: Sequence[int] = ()) -> tuple[list[dict], list[dict]]:
    """vLLM inputs for ``LLM.generate``: a ``TokensPrompt`` dict and ``SamplingParams`` keyword
    arguments per prompt. Request j gets seed ``params.seed + j * n`` (see module docstring)."""
    check_prompts(prompt_ids)
    prompts, kwargs = [], []
    for j, ids in enumerate(prompt_ids):
        prompts.append({"prompt_token_ids": [int(t) for t in ids]})
        kwargs.append(dict(
            n=params.n, temperature=params.temperature,
            top_p=1.0 if params.greedy else params.top_p,
            top_k=0 if params.greedy else max(params.top_k, 0),
            max_tokens=params.max_new_tokens,
            seed=None if params.seed is None else params.seed + j * params.n,
            stop_token_ids=[int(t) for t in stop_token_ids],
            detokenize=False))   # icpo detokenizes for the reward itself
    return prompts, kwargs


def parse_outputs(outputs: Sequence[Any], n: int, eos_token_ids: Iterable[int],
                  max_new_tokens: int) -> RolloutBatch:
    """``RolloutBatch`` from vLLM's ``RequestOutput`` list (one per prompt, n completions each).

    Completions are ordered by their ``index``; each is cut after its first EOS (kept).
    "stop" means an EOS (or another stop token of the model) ended it, "length" the token
    cap or the context length. Aborted or failed requests raise RuntimeError.
    """
    eos = list(eos_token_ids)
    prompts, responses, reasons = [], [], []
    for j, request in enumerate(outputs):
        completions = sorted(request.outputs, key=lambda c: c.index)
        if len(completions) != n:
            raise RuntimeError(f"vLLM returned {len(completions)} completions for prompt {j}, "
                               f"expected n={n}")
        for c in completions:
            if c.finish_reason not in ("stop", "length"):
                raise RuntimeError(f"vLLM request for prompt {j} (sample {c.index}) ended with "
                                   f"finish_reason={c.finish_reason!r}")
            tokens = list(c.token_ids)
            if len(tokens) > max_new_tokens:
                raise RuntimeError(f"vLLM returned {len(tokens)} tokens for prompt {j}, more "
                                   f"than max_new_tokens={max_new_tokens}")
            response, derived = truncate_at_eos(tokens, eos, max_new_tokens)
            prompts.append(list(request.prompt_token_ids))
            responses.append(response)
            reasons.append("stop" if derived == "stop" else c.finish_reason)
    return RolloutBatch(prompts, responses, reasons)


def _vllm_sampling_params(kwargs: dict) -> Any:
    """``vllm.SamplingParams(**kwargs)`` (the one place generation imports vLLM)."""
    from vllm import SamplingParams as VLLMSamplingParams

    return VLLMSamplingParams(**kwargs)


def _launched_distributed() -> bool:
    """True under torchrun / deepspeed launchers (what vLLM's external_launcher needs)."""
    needed = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    return all(k in os.environ for k in needed) and torch.distributed.is_initialized()


class VLLMRolloutEngine(RolloutEngine):
    """vLLM engine colocated with the trainer in this process, on this rank's GPU.

    Args:
        model_path: Hugging Face directory of the policy's architecture and initial weights.
        eos_token_ids: ids that end a response (passed to vLLM as extra stop tokens, so
            both engines stop on the same set).
        gpu_memory_utilization: fraction of the GPU vLLM may take (weights + KV cache).
        enable_sleep_mode: allow :meth:`sleep` to free that memory while training.
        sleep_level: 1 keeps a CPU copy of the weights; 2 drops them (fine when
            :meth:`load_weights` runs after every wake-up, as in training).
        max_model_len: prompt + response token budget (None: the model's).
        dtype: "auto", "bfloat16", "float16" or "float32" (match the trainer's).
        seed: the engine's base sampling seed (the rank is added, so ranks differ).
        llm: an already built ``vllm.LLM`` (or a stand-in for tests); nothing is built then.
        **llm_kwargs: further ``vllm.LLM`` / ``EngineArgs`` arguments.
    """

    def __init__(self, model_path: str | None, *, eos_token_ids: Sequence[int],
                 gpu_memory_utilization: float = 0.5, enable_sleep_mode: bool = True,
                 sleep_level: int = 1, max_model_len: int | None = None, dtype: str = "auto",
                 seed: int = 0, llm: Any = None, **llm_kwargs: Any) -> None:
        if not eos_token_ids:
            raise ValueError("eos_token_ids must name at least one token id")
        if sleep_level not in (1, 2):
            raise ValueError(f"sleep_level must be 1 or 2, got {sleep_level!r}")
        if not 0.0 < gpu_memory_utilization <= 1.0:
            raise ValueError("gpu_memory_utilization must be in (0, 1], "
                             f"got {gpu_memory_utilization!r}")
        self.eos_token_ids = [int(t) for t in eos_token_ids]
        self.enable_sleep_mode = enable_sleep_mode
        self.sleep_level = sleep_level
        self._asleep: set[str] = set()
        if llm is None:
            llm = self._build_llm(model_path, gpu_memory_utilization, enable_sleep_mode,
                                  max_model_len, dtype, seed, llm_kwargs)
        self.llm = llm

    @staticmethod
    def _build_llm(model_path, gpu_memory_utilization, enable_sleep_mode, max_model_len, dtype,
                   seed, llm_kwargs):
        if model_path is None:
            raise ValueError("model_path is required to build a vLLM engine")
        # The engine core must live in this process for load_weights to reach the model.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        try:
            from vllm import LLM
        except ImportError as err:
            raise ImportError("rollout engine 'vllm' needs vllm==0.32.0 "
                              "(pip install 'icpo[gpu]')") from err
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        kwargs = dict(model=model_path, dtype=dtype, seed=seed + rank, tensor_parallel_size=1,
                      gpu_memory_utilization=gpu_memory_utilization,
                      enable_sleep_mode=enable_sleep_mode, max_model_len=max_model_len,
                      enable_prefix_caching=True)
        if _launched_distributed():
            kwargs["distributed_executor_backend"] = "external_launcher"
        kwargs.update(llm_kwargs)
        return LLM(**kwargs)

    def generate(self, prompt_ids: list[list[int]], params: SamplingParams) -> RolloutBatch:
        """Sample ``params.n`` responses per prompt in one ``LLM.generate`` call."""
        prompts, kwargs = build_requests(prompt_ids, params, self.eos_token_ids)
        self.wake_up()
        outputs = self.llm.generate(prompts, [_vllm_sampling_params(kw) for kw in kwargs],
                                    use_tqdm=False)
        if len(outputs) != len(prompts):
            raise RuntimeError(f"vLLM returned {len(outputs)} outputs for {len(prompts)} prompts")
        return parse_outputs(outputs, params.n, self.eos_token_ids, params.max_new_tokens)

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Push trainer weights (any wrapper's names; see :func:`map_weight_name`) into vLLM,
        one tensor at a time so a ZeRO-3 gather (:func:`iter_full_parameters`) stays small,
        then drop the prefix cache, which was computed with the old weights."""
        self.wake_up(tags=["weights"])

        def push(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
            model.load_weights([(name, tensor)])

        with torch.no_grad():
            for name, tensor in map_weight_names(named_tensors):
                self.llm.apply_model(lambda model, n=name, t=tensor: push(model, n, t))
        self.reset_cache()

    def sleep(self) -> None:
        """Free the GPU memory (level 1: weights to CPU; level 2: weights dropped)."""
        if self.enable_sleep_mode and not self._asleep:
            self.llm.sleep(level=self.sleep_level)
            self._asleep = {"weights", "kv_cache"}

    def wake_up(self, tags: Sequence[str] | None = None) -> None:
        """Re-allocate ``tags`` ("weights", "kv_cache"; None = all) that are asleep."""
        wanted = self._asleep if tags is None else self._asleep & set(tags)
        if wanted:
            if torch.cuda.is_available():
                # vLLM's sleep-mode allocator cannot reuse blocks cached by PyTorch's
                # allocator (the trainer's freed activations): hand them back first.
                torch.cuda.empty_cache()
            self.llm.wake_up(tags=sorted(wanted))
            self._asleep -= wanted

    def reset_cache(self) -> None:
        """Drop prefix-cache blocks computed with the previous weights."""
        self.llm.reset_prefix_cache()
