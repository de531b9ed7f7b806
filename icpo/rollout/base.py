"""The rollout interface: sampling parameters, the batch of sampled responses, the engine API.

Every engine returns the ``n`` samples of a prompt consecutively (prompt j's samples are rows
``j*n ... j*n + n - 1``), each response cut right after its first EOS token (the EOS kept),
with finish reason ``"stop"`` (ended by EOS) or ``"length"`` (hit ``max_new_tokens``), and,
when it samples (temperature > 0), the log-prob of every response token under the
distribution it was drawn from (``rollout_logprobs``: what rollout correction compares the
trainer's log-probs with).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch
from torch import nn

FINISH_REASONS = ("stop", "length")


@dataclass(frozen=True)
class SamplingParams:
    """How to sample: one object per ``generate`` call."""

    n: int = 1
    """Samples per prompt (the group size G)."""
    temperature: float = 1.0
    """Softmax temperature; 0 means greedy decoding."""
    top_p: float = 1.0
    """Nucleus sampling mass in (0, 1]; 1 = off."""
    top_k: int = -1
    """Keep the k most likely tokens; -1 (or 0) = off."""
    max_new_tokens: int = 3072
    """Length cap of each response, in tokens."""
    seed: int | None = None
    """Seed for sampling; None uses the engine's ongoing random state."""

    def __post_init__(self) -> None:
        if isinstance(self.n, bool) or not isinstance(self.n, int) or self.n < 1:
            raise ValueError(f"SamplingParams.n must be an int >= 1, got {self.n!r}")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"SamplingParams.temperature must be >= 0, got {self.temperature!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < -1:
            raise ValueError(f"SamplingParams.top_k must be -1/0 (off) or >= 1, got {self.top_k!r}")
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError("SamplingParams.max_new_tokens must be an int >= 1, "
                             f"got {self.max_new_tokens!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or self.seed < 0):
            raise ValueError(f"SamplingParams.seed must be None or an int >= 0, got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        """True when decoding is greedy (temperature 0)."""
        return self.temperature == 0.0

    @classmethod
    def from_config(cls, rollout_cfg: Any, *, validation: bool = False,
                    seed: int | None = None) -> SamplingParams:
        """A training step's sampling from a RolloutConfig-like (``n``, ``temperature``,
        ``top_p``, ``top_k``), or with ``validation`` held-out evaluation's: ``val_n`` samples
        at ``val_temperature`` from the whole distribution (top-p and top-k off, as verl's
        validation defaults). Either way at most ``max_response_length`` tokens."""
        if validation:
            return cls(n=rollout_cfg.val_n, temperature=rollout_cfg.val_temperature, top_p=1.0,
                       top_k=-1, max_new_tokens=rollout_cfg.max_response_length, seed=seed)
        return cls(n=rollout_cfg.n, temperature=rollout_cfg.temperature,
                   top_p=rollout_cfg.top_p, top_k=rollout_cfg.top_k,
                   max_new_tokens=rollout_cfg.max_response_length, seed=seed)


@dataclass
class RolloutBatch:
    """Sampled responses, one row per sample (``B * n`` rows, each prompt's n consecutive).

    Every field but ``extras`` holds one entry per sample (or is None), so :meth:`select`
    carries any field added here along."""

    prompt_ids: list[list[int]]
    """The prompt of each sample (repeated n times per prompt)."""
    response_ids: list[list[int]]
    """The response tokens, ending with EOS when finish reason is ``stop``."""
    finish_reasons: list[str]
    """``"stop"`` (EOS generated) or ``"length"`` (max_new_tokens reached)."""
    records: list[Any] | None = None
    """What each sample answers (its dataset record, for the reward); engines leave it None and
    the trainer sets it."""
    rollout_logprobs: list[list[float]] | None = None
    """Per response, the engine's log-prob of each of its tokens as sampled: temperature
    applied and renormalized over what top-k / top-p kept (vLLM's ``processed_logprobs``);
    None when the engine gives none (greedy decoding, HF ``generate``)."""
    extras: dict[str, Any] = field(default_factory=dict)
    """Engine-specific per-call information (e.g. timings); never needed for training."""

    def __post_init__(self) -> None:
        n = len(self.prompt_ids)
        lengths = [len(getattr(self, name)) for name in self._per_sample()]
        if any(k != n for k in lengths):
            raise ValueError(f"RolloutBatch fields {self._per_sample()} must have equal lengths, "
                             f"got {lengths}")
        bad = set(self.finish_reasons) - set(FINISH_REASONS)
        if bad:
            raise ValueError(f"finish_reasons must be in {FINISH_REASONS}, got {sorted(bad)}")
        if self.rollout_logprobs is not None:
            wrong = [i for i, (lp, r) in enumerate(zip(self.rollout_logprobs, self.response_ids))
                     if len(lp) != len(r)]
            if wrong:
                raise ValueError(f"rollout_logprobs must hold one value per response token; "
                                 f"samples {wrong[:8]} differ")

    def __len__(self) -> int:
        return len(self.response_ids)

    def _per_sample(self) -> list[str]:
        return [f.name for f in fields(self)
                if f.name != "extras" and getattr(self, f.name) is not None]

    def select(self, rows: Sequence[int]) -> RolloutBatch:
        """The samples ``rows``, in that order, as a batch of their own."""
        picked = {name: [getattr(self, name)[i] for i in rows] for name in self._per_sample()}
        return replace(self, **picked, extras=dict(self.extras))

    @classmethod
    def concat(cls, batches: Sequence[RolloutBatch]) -> RolloutBatch:
        """The samples of ``batches``, in order, as one batch; a per-sample field is kept when
        every batch has it (else None), ``extras`` are the first batch's."""
        if not batches:
            raise ValueError("RolloutBatch.concat needs at least one batch")
        joined = {}
        for f in fields(cls):
            if f.name == "extras":
                continue
            parts = [getattr(b, f.name) for b in batches]
            joined[f.name] = (None if any(p is None for p in parts)
                              else [x for p in parts for x in p])
        return cls(**joined, extras=dict(batches[0].extras))


def truncate_at_eos(tokens: Sequence[int], eos_ids: Iterable[int],
                    max_new_tokens: int) -> tuple[list[int], str]:
    """Cut a generated sequence right after its first EOS (kept) and name the finish reason.

    tokens: generated ids (may carry padding after EOS). Returns ``(response, reason)``:
    ``"stop"`` if an EOS occurs within the first ``max_new_tokens`` tokens, else the first
    ``max_new_tokens`` tokens and ``"length"``.
    """
    eos = set(eos_ids)
    head = list(tokens[:max_new_tokens])
    for i, tok in enumerate(head):
        if tok in eos:
            return head[:i + 1], "stop"
    return head, "length"


def check_prompts(prompt_ids: Sequence[Sequence[int]], vocab_size: int | None = None) -> None:
    """Refuse an empty batch, an empty prompt or a non-int / out-of-vocabulary token id."""
    if len(prompt_ids) == 0:
        raise ValueError("prompt_ids must hold at least one prompt")
    for j, prompt in enumerate(prompt_ids):
        if len(prompt) == 0:
            raise ValueError(f"prompt_ids[{j}] is empty")
        for tok in prompt:
            if isinstance(tok, bool) or not isinstance(tok, int) or tok < 0 or (
                    vocab_size is not None and tok >= vocab_size):
                raise ValueError(f"prompt_ids[{j}] holds an invalid token id {tok!r}"
                                 + (f" (vocabulary size {vocab_size})" if vocab_size else ""))


#: Wrappers whose wrapped model lives in ``.module`` (or ``._orig_mod`` for torch.compile).
_WRAPPERS = {"DeepSpeedEngine", "PipelineEngine", "DistributedDataParallel", "OptimizedModule"}


def unwrap_model(model: nn.Module) -> nn.Module:
    """The Hugging Face model inside DeepSpeed / DDP / torch.compile wrappers."""
    while type(model).__name__ in _WRAPPERS:
        inner = getattr(model, "_orig_mod", None)
        if inner is None:
            inner = getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            break
        model = inner
    return model


def _as_id_list(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]


def resolve_special_ids(model: nn.Module, tokenizer: Any = None, pad_token_id: int | None = None,
                        eos_token_id: int | Iterable[int] | None = None) -> tuple[int, list[int]]:
    """``(pad_id, eos_ids)``: explicit values first, else the tokenizer's EOS plus the model's
    ``generation_config.eos_token_id`` (chat models often stop on several), pad falling back
    to the tokenizer's pad token, then to the first EOS."""
    eos = _as_id_list(eos_token_id)
    if not eos:
        eos = _as_id_list(getattr(tokenizer, "eos_token_id", None))
        gen_cfg = getattr(model, "generation_config", None)
        eos += [e for e in _as_id_list(getattr(gen_cfg, "eos_token_id", None)) if e not in eos]
    if not eos:
        raise ValueError("no EOS token id: pass eos_token_id, or a tokenizer / model "
                         "generation_config that defines one")
    if pad_token_id is None:
        pad_token_id = getattr(tokenizer, "pad_token_id", None)
    return (eos[0] if pad_token_id is None else int(pad_token_id)), eos


class RolloutEngine(ABC):
    """Samples responses for token-id prompts with the current policy.

    How the trainer drives an engine (icpo/trainer/trainer.py): every step ``wake_up()`` ->
    ``generate(...)`` -> ``sleep()``, and once the update has run (also after loading a
    checkpoint) ``sync_from(model, zero_stage)``; evaluation runs ``wake_up()`` -> ``generate``
    -> ``sleep()`` too. An engine with weights of its own (vLLM) takes the new ones in
    :meth:`sync_from` through :meth:`load_weights`, which also drops the prefix cache computed
    with the old ones (:meth:`reset_cache`). An engine that samples from the live training
    model (HF, ``shares_weights``) has nothing to sync, and its memory methods are no-ops.
    """

    shares_weights: bool = False
    """True when the engine samples from the training model itself: :meth:`sync_from` is a
    no-op."""

    @abstractmethod
    def generate(self, prompt_ids: list[list[int]], params: SamplingParams) -> RolloutBatch:
        """Sample ``params.n`` responses per prompt; returns ``len(prompt_ids) * n`` rows."""

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy the trainer's current weights (HF parameter names) into the engine."""

    def sleep(self) -> None:
        """Release the engine's accelerator memory while the trainer runs."""

    def wake_up(self) -> None:
        """Take the memory back before the next ``load_weights`` / ``generate``."""

    def reset_cache(self) -> None:
        """Drop cached prefixes computed with outdated weights."""

    def sync_from(self, model: nn.Module, zero_stage: int = 0, *,
                  parameters: Callable[[nn.Module, int], Iterable[tuple[str, torch.Tensor]]]
                  | None = None) -> None:
        """Bring the engine's weights up to ``model``'s; every rank calls it, since under ZeRO-3
        the gather is collective. ``parameters(model, zero_stage)`` reads the ``(name, full
        tensor)`` pairs to push (default :func:`iter_full_parameters`; e.g. merged LoRA
        weights instead)."""
        if not self.shares_weights:
            self.load_weights((parameters or iter_full_parameters)(model, zero_stage))


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
