"""Rollouts with transformers' ``generate`` on the live training model (CPU, GPU, ZeRO-3).

Slower than vLLM but runs anywhere and needs no weight sync: it samples from the very module
being trained. Under ZeRO-3 every parameter is gathered for the duration of ``generate``
(``deepspeed.zero.GatheredParameters``), so the full model must fit on each rank.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from icpo.rollout.base import (
    RolloutBatch,
    RolloutEngine,
    SamplingParams,
    check_prompts,
    resolve_special_ids,
    truncate_at_eos,
    unwrap_model,
)


class HFRolloutEngine(RolloutEngine):
    """Samples with ``model.generate``; needs only the pad and EOS token ids, not a tokenizer.

    Args:
        model: a transformers causal LM, possibly inside a DeepSpeed / DDP wrapper.
        tokenizer: optional; only its ``eos_token_id`` / ``pad_token_id`` are read.
        pad_token_id, eos_token_id: override the tokenizer / generation_config values.
        zero_stage: DeepSpeed ZeRO stage the model is trained with (3 => gather parameters).
        batch_size: prompts per ``generate`` call (each expanded to n rows).
    """

    def __init__(self, model: nn.Module, tokenizer: Any = None, *, pad_token_id: int | None = None,
                 eos_token_id: int | Iterable[int] | None = None, zero_stage: int = 0,
                 batch_size: int = 8) -> None:
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        if zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"zero_stage must be 0, 1, 2 or 3, got {zero_stage!r}")
        self.model = unwrap_model(model)
        self.pad_token_id, self.eos_token_ids = resolve_special_ids(
            self.model, tokenizer, pad_token_id, eos_token_id)
        self.zero_stage = zero_stage
        self.batch_size = batch_size
        embeddings = self.model.get_input_embeddings()
        self.vocab_size = getattr(embeddings, "num_embeddings", None)

    def generate(self, prompt_ids: list[list[int]], params: SamplingParams) -> RolloutBatch:
        """Sample ``params.n`` responses per prompt, groups consecutive (see RolloutBatch)."""
        check_prompts(prompt_ids, self.vocab_size)
        was_training = self.model.training
        self.model.eval()
        prompts, responses, reasons = [], [], []
        try:
            with torch.no_grad(), self._gathered(), self._seeded(params.seed):
                for start in range(0, len(prompt_ids), self.batch_size):
                    chunk = prompt_ids[start:start + self.batch_size]
                    rows = [list(p) for p in chunk for _ in range(params.n)]
                    for row, generated in zip(rows, self._generate_rows(rows, params)):
                        response, reason = truncate_at_eos(generated, self.eos_token_ids,
                                                           params.max_new_tokens)
                        prompts.append(row)
                        responses.append(response)
                        reasons.append(reason)
        finally:
            self.model.train(was_training)
        return RolloutBatch(prompts, responses, reasons)

    def _generate_rows(self, rows: Sequence[Sequence[int]],
                       params: SamplingParams) -> list[list[int]]:
        """Left-pad ``rows``, run ``generate``, return the new tokens of each row."""
        device = next(self.model.parameters()).device
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            # Left padding: every row's last prompt token sits at column width-1, so the
            # generated tokens line up and position ids come from the attention mask.
            input_ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
            attention_mask[i, width - len(row):] = 1
        out = self.model.generate(input_ids=input_ids.to(device),
                                  attention_mask=attention_mask.to(device),
                                  generation_config=self._generation_config(params))
        return out[:, width:].tolist()

    def _generation_config(self, params: SamplingParams):
        """A complete GenerationConfig: every knob that alters the distribution is set, so
        values from the checkpoint's generation_config.json (repetition_penalty, top_k, ...)
        cannot leak into the policy's samples."""
        from transformers import GenerationConfig

        knobs = dict(do_sample=False)
        if not params.greedy:
            knobs = dict(do_sample=True, temperature=params.temperature, top_p=params.top_p,
                         top_k=max(params.top_k, 0), min_p=0.0, typical_p=1.0,
                         epsilon_cutoff=0.0, eta_cutoff=0.0)
        return GenerationConfig(
            **knobs, num_beams=1, max_new_tokens=params.max_new_tokens, min_new_tokens=0,
            repetition_penalty=1.0, no_repeat_ngram_size=0, pad_token_id=self.pad_token_id,
            eos_token_id=list(self.eos_token_ids), use_cache=True)

    def _gathered(self):
        if self.zero_stage != 3:
            return contextlib.nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(self.model.parameters()), modifier_rank=None)

    @contextlib.contextmanager
    def _seeded(self, seed: int | None):
        """Sample from ``seed`` without disturbing the caller's global RNG streams."""
        if seed is None:
            yield
            return
        device = next(self.model.parameters()).device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            yield
