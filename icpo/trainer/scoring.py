"""Per-token log-probs and entropy of response tokens for packed micro-batches.

The decoder body runs on the micro-batch, but the LM head only on the positions that score a
response token, so no ``[T, V]`` logits are ever built for prompt tokens; the fused
``icpo.ops.token_logprobs`` kernel then reads those logits once.

With flash-attention the micro-batch runs as one packed row (varlen kernels, no padding). Other
attention implementations (SDPA, eager: CPU) would need a dense ``T x T`` block-diagonal mask for
a packed row, quadratic in the micro-batch's tokens, so there the samples run as right-padded
``[b, L]`` batches of similar lengths (:func:`length_buckets`, so little compute goes to padding)
and the hidden states are re-packed in the micro-batch's order; the results are the same.
"""

from __future__ import annotations

import math

import torch

from icpo import ops
from icpo.trainer.batching import PackedBatch, segment_positions


def _body_and_head(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The decoder stack and LM head of a transformers causal LM (Qwen2, Llama, Mistral, ...)."""
    head = model.get_output_embeddings()
    body = getattr(model, model.base_model_prefix, None)
    if head is None or body is None or getattr(model.config, "final_logit_softcapping", None):
        raise TypeError(f"{type(model).__name__}: icpo needs a causal LM with a separate decoder "
                        "body and LM head and no logit soft-capping")
    return body, head


def response_logprobs(model: torch.nn.Module, batch: PackedBatch, temperature: float,
                      with_entropy: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-prob (and entropy) of every response token in ``batch``: fp32 ``[T_resp]`` each.

    ``temperature`` is the sampling temperature: the confidence and the ratio in the loss are
    taken under the distribution the responses were drawn from (SPEC step 3).
    """
    body, head = _body_and_head(model)
    if str(getattr(model.config, "_attn_implementation", "")).startswith("flash"):
        hidden = body(input_ids=batch.input_ids[None], position_ids=batch.position_ids[None],
                      use_cache=False).last_hidden_state[0]
    else:
        hidden = _padded_hidden(body, batch)
    logits = head(hidden.index_select(0, batch.score_positions))
    return ops.token_logprobs(logits, batch.labels, temperature=temperature,
                              return_entropy=with_entropy)


#: What one more forward call costs, in padded tokens' worth of compute (CPU, small models):
#: the bucketing below only splits a batch when that saves more padding than this.
BUCKET_CALL_TOKENS = 128


def length_buckets(lengths: list[int], call_tokens: int = BUCKET_CALL_TOKENS) -> list[list[int]]:
    """Group sample indices into buckets of similar length, minimizing the padded compute
    ``sum(rows * longest) + call_tokens * buckets`` (exact DP over the distinct lengths).

    Returns the buckets, each a list of indices into ``lengths``, longest first; every index
    appears once. Small O(distinct lengths ** 2), independent of the number of samples.
    """
    by_len: dict[int, list[int]] = {}
    for i, n in enumerate(lengths):
        by_len.setdefault(n, []).append(i)
    values = sorted(by_len, reverse=True)
    counts = [len(by_len[v]) for v in values]
    # best[j]: cheapest split of the j longest distinct lengths; cut[j]: where its last bucket starts.
    best, cut = [0.0] + [math.inf] * len(values), [0] * (len(values) + 1)
    for j in range(1, len(values) + 1):
        rows = 0
        for i in range(j - 1, -1, -1):  # last bucket = distinct lengths i..j-1, padded to values[i]
            rows += counts[i]
            cost = best[i] + rows * values[i] + call_tokens
            if cost < best[j]:
                best[j], cut[j] = cost, i
    buckets, j = [], len(values)
    while j > 0:
        buckets.append([k for v in values[cut[j]:j] for k in by_len[v]])
        j = cut[j]
    return buckets[::-1]


def _padded_hidden(body: torch.nn.Module, batch: PackedBatch) -> torch.Tensor:
    """Hidden states ``[T, H]`` in packed order, computed on right-padded ``[b, L]`` batches of
    samples of similar length (one per :func:`length_buckets` bucket)."""
    cu = batch.seq_cu_seqlens
    lengths = cu.diff()
    parts, token_idx = [], []
    for rows in length_buckets(lengths.tolist()):
        lens = lengths[torch.tensor(rows, dtype=torch.int64, device=cu.device)]
        sub_cu = torch.zeros(len(rows) + 1, dtype=torch.int64, device=cu.device)
        sub_cu[1:] = lens.cumsum(0)
        idx = segment_positions(cu, rows)  # this bucket's tokens in the packed row
        padded, mask = ops.unpack_to_padded(batch.input_ids.index_select(0, idx), sub_cu)
        mask = mask.to(torch.long)
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        hidden = body(input_ids=padded, attention_mask=mask, position_ids=positions,
                      use_cache=False).last_hidden_state
        parts.append(hidden[mask.bool()])
        token_idx.append(idx)
    order = torch.cat(token_idx)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    return torch.cat(parts).index_select(0, inverse)


@torch.no_grad()
def score_all(model: torch.nn.Module, batches: list[PackedBatch], temperature: float,
              with_entropy: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Concatenated response log-probs (and entropies) of ``batches`` in order, no gradient
    (empty tensors for no batches: a rank whose groups the coarse filter dropped)."""
    if not batches:
        return torch.zeros(0), (torch.zeros(0) if with_entropy else None)
    logps, ents = [], []
    for batch in batches:
        logp, ent = response_logprobs(model, batch, temperature, with_entropy)
        logps.append(logp)
        ents.append(ent)
    logp = torch.cat(logps)
    return logp, (torch.cat(ents) if with_entropy else None)
