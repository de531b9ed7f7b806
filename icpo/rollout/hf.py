"""Rollouts with transformers models on the live training model (CPU, GPU, ZeRO-3).

Slower than vLLM but runs anywhere and needs no weight sync: it samples from the very module
being trained. Under ZeRO-3 every parameter is gathered for the duration of sampling
(``deepspeed.zero.GatheredParameters``), so the full model must fit on each rank.

Two decoders. For models whose every layer attends to the whole sequence (Llama, Qwen2 without
sliding window, Mistral-style models up to their window...), a sampling loop of ours over the
model's forward and a transformers ``DynamicCache``: each distinct prompt is prefilled once and
its cache repeated for its ``n`` samples, and rows that finished are dropped from the batch
(and the cache) as they accumulate, so late steps run only the rows still writing. Same
distribution as ``generate`` (temperature, then top-k, then top-p, as transformers' warpers
apply them; one uniform number per row, see :mod:`icpo.rollout.sampling`), which also gives
each sampled token's log-prob under that distribution (``RolloutBatch.rollout_logprobs``). Any
other model goes through ``model.generate``, which gives no log-probs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from icpo.models.loading import kv_cache_shareable
from icpo.rollout.base import (
    RolloutBatch,
    RolloutEngine,
    SamplingParams,
    check_prompts,
    resolve_special_ids,
    truncate_at_eos,
    unwrap_model,
)
from icpo.rollout.sampling import sample_next


class HFRolloutEngine(RolloutEngine):
    """Samples with ``model.generate``; needs only the pad and EOS token ids, not a tokenizer.

    Args:
        model: a transformers causal LM, possibly inside a DeepSpeed / DDP wrapper.
        tokenizer: optional; only its ``eos_token_id`` / ``pad_token_id`` are read.
        pad_token_id, eos_token_id: override the tokenizer / generation_config values.
        zero_stage: DeepSpeed ZeRO stage the model is trained with (3 => gather parameters).
        batch_size: prompts per ``generate`` call (each expanded to n rows).
        decoder: ``"auto"`` (our sampling loop where the model allows it, else ``generate``),
            ``"icpo"`` or ``"generate"``.
    """

    shares_weights = True  # it samples from the module being trained

    def __init__(self, model: nn.Module, tokenizer: Any = None, *, pad_token_id: int | None = None,
                 eos_token_id: int | Iterable[int] | None = None, zero_stage: int = 0,
                 batch_size: int = 8, decoder: str = "auto") -> None:
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        if decoder not in ("auto", "icpo", "generate"):
            raise ValueError(f"decoder must be 'auto', 'icpo' or 'generate', got {decoder!r}")
        if zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"zero_stage must be 0, 1, 2 or 3, got {zero_stage!r}")
        self.model = unwrap_model(model)
        self.pad_token_id, self.eos_token_ids = resolve_special_ids(
            self.model, tokenizer, pad_token_id, eos_token_id)
        self.zero_stage = zero_stage
        self.batch_size = batch_size
        if decoder == "icpo" and not kv_cache_shareable(self.model.config):
            raise ValueError(f"decoder='icpo' needs full attention in every layer; "
                             f"{type(self.model).__name__} has sliding-window or hybrid layers")
        self._decoder = decoder
        self.on_batch = None
        """Optional callback, called with the number of prompts done after each ``generate``
        batch (``icpo eval`` drives its progress bar with it)."""
        embeddings = self.model.get_input_embeddings()
        self.vocab_size = getattr(embeddings, "num_embeddings", None)

    def generate(self, prompt_ids: list[list[int]], params: SamplingParams) -> RolloutBatch:
        """Sample ``params.n`` responses per prompt, groups consecutive (see RolloutBatch)."""
        check_prompts(prompt_ids, self.vocab_size)
        was_training = self.model.training
        self.model.eval()
        prompts, responses, reasons = [], [], []
        logprobs: list[list[float]] | None = [] if self.gives_logprobs(params) else None
        try:
            with torch.no_grad(), self._gathered(), self._seeded(params.seed):
                for start in range(0, len(prompt_ids), self.batch_size):
                    chunk = [list(p) for p in prompt_ids[start:start + self.batch_size]]
                    rows = [p for p in chunk for _ in range(params.n)]
                    sampled_logp = None
                    if self.decoder == "icpo":
                        sampled, sampled_logp = self._decode(chunk, params)
                    else:
                        sampled = self._generate_rows(rows, params)
                    for i, (row, generated) in enumerate(zip(rows, sampled)):
                        response, reason = truncate_at_eos(generated, self.eos_token_ids,
                                                           params.max_new_tokens)
                        prompts.append(row)
                        responses.append(response)
                        reasons.append(reason)
                        if logprobs is not None:
                            logprobs.append(sampled_logp[i][:len(response)])
                    if self.on_batch is not None:
                        self.on_batch(len(chunk))
        finally:
            self.model.train(was_training)
        return RolloutBatch(prompts, responses, reasons, rollout_logprobs=logprobs)

    def gives_logprobs(self, params: SamplingParams) -> bool:
        """Whether :meth:`generate` returns sampling log-probs for ``params``: when it samples
        (not greedy) with its own decoder (not ``model.generate``)."""
        return not params.greedy and self.decoder == "icpo"

    @property
    def decoder(self) -> str:
        """``"icpo"`` (our sampling loop) when the model's KV cache can be shared and pruned,
        else ``"generate"``."""
        if self._decoder != "auto":
            return self._decoder
        return "icpo" if kv_cache_shareable(self.model.config) else "generate"

    def _decode(self, prompts: list[list[int]], params: SamplingParams
                ) -> tuple[list[list[int]], list[list[float]] | None]:
        """``params.n`` samples of each prompt (rows grouped by prompt): the tokens each row
        generated, up to and including its first EOS or ``max_new_tokens`` of them, and their
        log-probs under the distribution each was drawn from (None when greedy)."""
        from transformers import DynamicCache

        model, n = self.model, params.n
        device = next(model.parameters()).device
        as_long = lambda x: torch.tensor(  # noqa: E731  (a one-line helper)
            x, dtype=torch.long, device=device)
        # 1. Prefill each distinct prompt once, left-padded so that every row's last prompt
        #    token sits in the last column; then repeat its cache for its n samples.
        width = max(len(p) for p in prompts)
        ids = as_long([[self.pad_token_id] * (width - len(p)) + p for p in prompts])
        mask = as_long([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        cache = DynamicCache(config=model.config)
        out = model(input_ids=ids, attention_mask=mask,
                    position_ids=(mask.cumsum(1) - 1).clamp(min=0), past_key_values=cache,
                    use_cache=True, logits_to_keep=1)
        logits = out.logits[:, -1].repeat_interleave(n, 0)
        if n > 1:
            cache.batch_repeat_interleave(n)
        mask = mask.repeat_interleave(n, 0)
        pos = as_long([len(p) for p in prompts]).repeat_interleave(n)  # next token's position
        num_rows, steps = len(prompts) * n, params.max_new_tokens
        tokens = torch.full((num_rows, steps), self.pad_token_id, dtype=torch.long, device=device)
        token_logp = torch.zeros((num_rows, steps), dtype=torch.float32, device=device)
        lengths = torch.full((num_rows,), steps, dtype=torch.long, device=device)
        rows = torch.arange(num_rows, device=device)  # the output row of each batch row
        alive = torch.ones(num_rows, dtype=torch.bool, device=device)
        eos = as_long(self.eos_token_ids)
        # 2. Decode. A finished row stays in the batch (its samples ignored) until a quarter of
        #    the batch has finished; then all finished rows leave it, cache rows included.
        for t in range(steps):
            nxt, logp = sample_next(logits, params, with_logprobs=True)
            tokens[rows[alive], t] = nxt[alive]
            if logp is not None:
                token_logp[rows[alive], t] = logp[alive]
            ended = alive & torch.isin(nxt, eos)
            lengths[rows[ended]] = t + 1
            alive &= ~ended
            remaining = int(alive.sum())
            if remaining == 0 or t == steps - 1:
                break
            if 4 * (alive.numel() - remaining) >= alive.numel():
                keep = alive.nonzero().squeeze(1)
                cache.batch_select_indices(keep)
                mask, pos, rows, nxt, alive = (t[keep] for t in (mask, pos, rows, nxt, alive))
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
            out = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=pos[:, None],
                        past_key_values=cache, use_cache=True)
            logits = out.logits[:, -1]
            pos = pos + 1
        lengths = lengths.tolist()
        sampled = [row[:k] for row, k in zip(tokens.tolist(), lengths)]
        if params.greedy:
            return sampled, None
        return sampled, [row[:k] for row, k in zip(token_logp.tolist(), lengths)]

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
