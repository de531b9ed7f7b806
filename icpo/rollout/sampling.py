"""Drawing the next token: temperature, top-k and top-p as transformers' warpers apply them, then
an inverse-CDF draw with one uniform number per row.

``torch.multinomial`` draws one exponential per vocabulary entry (the ``argmax(p / E)`` trick):
at V = 151936 and 64 rows, ~10M random numbers and 224 ms of CPU per decode step, against 3 ms
for this draw (``bench/bench_sampling.py``). One uniform per row, located in the cumulative
distribution, gives the same distribution. The cumulative sum is two-level so that no second
``[b, V]`` tensor is built and no probability is rounded against the whole row's mass: blocks of
``block`` entries are summed in fp32 (one read of the probabilities, each block's mass to fp32's
relative precision), the uniform picks a block from their fp64 running sum, and then an entry
from that one block's fp64 running sum. A token's probability is thus exact to fp32 rounding
*relative to its own block*, also for tokens far below one ulp of 1. The row masses are the
finiteness check: for non-negative entries a block sum is NaN or inf iff one of its entries is,
so no separate ``isfinite`` pass over ``[b, V]`` (43 ms there) is needed.

The draws differ from ``torch.multinomial``'s for the same seed (docs/architecture.md, "Sampling").
"""

from __future__ import annotations

import torch

from icpo.rollout.base import SamplingParams

BLOCK = 1024
"""Entries per block of the two-level cumulative sum (V / BLOCK block sums per row)."""

_NON_FINITE = "sampling: the model produced NaN or inf logits"


def sample_next(logits: torch.Tensor, params: SamplingParams,
                generator: torch.Generator | None = None, *, with_logprobs: bool = False
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor | None]:
    """One token per row of ``logits`` ``[b, V]``: argmax when greedy, else a draw from
    softmax(logits / temperature) restricted to the ``top_k`` most likely tokens and then to the
    smallest set holding ``top_p`` of the mass (transformers' TopK / TopP warpers' rules).
    Random numbers come from ``generator`` (torch's default generator when None).

    ``with_logprobs``: return ``(tokens, logprobs)``, the fp32 ``[b]`` log-probability of each
    drawn token under the distribution it was drawn from (temperature applied, renormalized
    over what top-k / top-p kept: vLLM's ``processed_logprobs``); None when greedy. The draws
    are the same either way."""
    if params.greedy:
        tokens = logits.float().argmax(dim=-1)
        return (tokens, None) if with_logprobs else tokens
    # softmax(x / T) = exp((x - max x) / T) / mass, and the draw divides by the row mass itself:
    # one [b, V] buffer, written in place, carries everything (each fresh multi-MB buffer costs
    # its page faults). NaN or +inf logits, or a row of -inf, make the whole row NaN here, which
    # sample_categorical refuses.
    scaled = logits.float()
    peak = scaled.amax(dim=-1, keepdim=True)
    scaled = scaled - peak if scaled is logits else scaled.sub_(peak)  # the caller's stays as is
    if params.temperature != 1.0:
        scaled.div_(params.temperature)
    if 0 < params.top_k < scaled.shape[-1]:
        kth = torch.topk(scaled, params.top_k, dim=-1).values[:, -1:]
        scaled.masked_fill_(scaled < kth, float("-inf"))
    if params.top_p < 1.0:
        ascending, order = torch.sort(scaled, dim=-1)
        mass = ascending.softmax(dim=-1).cumsum(dim=-1)
        drop = mass <= 1.0 - params.top_p
        drop[:, -1] = False  # the most likely token always stays
        scaled.scatter_(-1, order, ascending.masked_fill(drop, float("-inf")))
    probs = scaled.exp_()
    if not with_logprobs:
        return sample_categorical(probs, generator)
    tokens, total = _draw(probs, generator, BLOCK)
    # log p = log(exp(x_tok - max)) - log(row mass): the mass is the draw's own fp64 sum
    rows = torch.arange(probs.shape[0], device=probs.device)
    logp = probs[rows, tokens].double().log() - total.log()
    return tokens, logp.float()


def sample_categorical(probs: torch.Tensor, generator: torch.Generator | None = None, *,
                       block: int = BLOCK) -> torch.Tensor:
    """One index per row of ``probs`` ``[b, V]`` (non-negative, any float dtype, rows need not
    sum to 1), drawn with probability ``probs[i, j] / probs[i].sum()``: ``[b]`` int64.

    Raises ValueError when a row holds NaN or inf or sums to zero.
    """
    return _draw(probs, generator, block)[0]


def _draw(probs: torch.Tensor, generator: torch.Generator | None, block: int
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`sample_categorical`'s draw and each row's mass (fp64 ``[b]``)."""
    if probs.dim() != 2 or probs.shape[1] == 0:
        raise ValueError(f"probs: expected [batch, vocab] with vocab >= 1, "
                         f"got {tuple(probs.shape)}")
    uniforms = torch.rand(probs.shape[0], dtype=torch.float64, device=probs.device,
                          generator=generator)
    return inverse_cdf(probs, uniforms, block=block, return_total=True)


def inverse_cdf(probs: torch.Tensor, uniforms: torch.Tensor, *, block: int = BLOCK,
                return_total: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The index ``j`` of each row with ``cdf[j-1] <= u * total < cdf[j]``, for ``uniforms``
    ``[b]`` fp64 in [0, 1); an entry of probability 0 is never returned. ``return_total``:
    also each row's mass ``total`` (fp64 ``[b]``, the sum of fp32 block sums)."""
    b, vocab = probs.shape
    full = vocab // block
    masses = []
    if full:
        masses.append(probs[:, :full * block].reshape(b, full, block).sum(-1, dtype=torch.float32))
    if vocab % block:
        masses.append(probs[:, full * block:].sum(-1, keepdim=True, dtype=torch.float32))
    mass = torch.cat(masses, dim=1).double()
    cdf = mass.cumsum(dim=1)  # [b, blocks]
    total = cdf[:, -1]
    bad = ~(torch.isfinite(total) & (total > 0))
    if bad.any():
        rows = bad.nonzero().flatten().tolist()
        raise ValueError(f"{_NON_FINITE} (rows {rows[:8]}{' ...' if len(rows) > 8 else ''} "
                         "have non-finite or all-zero probabilities)")
    rows = torch.arange(b, device=probs.device)
    # u * total can round up to total itself; below it, the first cdf entry above u (right=True
    # skips entries equal to u) always follows a step up, i.e. a block / token of mass > 0.
    target = torch.minimum(uniforms * total, torch.nextafter(total, torch.zeros_like(total)))
    k = torch.searchsorted(cdf, target[:, None], right=True).squeeze(1)  # block of each row
    before = torch.where(k > 0, cdf[rows, (k - 1).clamp(min=0)], torch.zeros_like(total))
    # Where u falls inside its block, as a fraction of the block's (fp32-summed) mass, rescaled
    # to the in-block fp64 sum: no token inherits the few-ulp difference between the two sums.
    frac = ((target - before) / mass[rows, k]).clamp(max=1.0)
    cols = k[:, None] * block + torch.arange(min(block, vocab), device=probs.device)
    inside = cols < vocab
    local = probs[rows[:, None], cols.clamp(max=vocab - 1)].double().masked_fill(~inside, 0.0)
    local_cdf = local.cumsum(dim=1)
    local_total = local_cdf[:, -1]
    local_target = torch.minimum(frac * local_total,
                                 torch.nextafter(local_total, torch.zeros_like(local_total)))
    j = torch.searchsorted(local_cdf, local_target[:, None], right=True).squeeze(1)
    return (k * block + j, total) if return_total else k * block + j
