"""Packing rollouts into flat token streams and splitting them into token-budget micro-batches.

A rollout sample is ``prompt + response``. Packed, a micro-batch is one row of concatenated
samples with ``position_ids`` restarting at 0 per sample, which transformers turns into a
block-diagonal causal mask (flash-attention varlen on GPU, a dense mask with SDPA on CPU).
Only response tokens are scored: the logits at position ``t`` predict token ``t + 1``, so the
response token ``r_i`` of a sample whose prompt has length P is scored at position ``P + i - 1``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PackedBatch:
    """Samples ``idx`` packed into one row.

    input_ids / position_ids: int64 ``[T]``. score_positions: int64 ``[T_resp]``, the positions
    whose logits score a response token; labels: int64 ``[T_resp]``, those tokens.
    resp_cu_seqlens: int64 ``[B+1]`` over the response tokens (packed response order).
    seq_cu_seqlens: int64 ``[B+1]`` over the whole samples (prompt + response) in the row.
    """

    idx: list[int]
    input_ids: torch.Tensor
    position_ids: torch.Tensor
    score_positions: torch.Tensor
    labels: torch.Tensor
    resp_cu_seqlens: torch.Tensor
    seq_cu_seqlens: torch.Tensor

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.numel())

    def to(self, device: torch.device) -> "PackedBatch":
        return PackedBatch(self.idx, *(t.to(device) for t in (
            self.input_ids, self.position_ids, self.score_positions, self.labels,
            self.resp_cu_seqlens, self.seq_cu_seqlens)))


def pack_samples(prompt_ids: list[list[int]], response_ids: list[list[int]],
                 idx: list[int]) -> PackedBatch:
    """Pack samples ``idx`` (each a non-empty response after its prompt) into one row."""
    ids, pos, score_pos, labels, resp_lens, seq_lens = [], [], [], [], [], []
    offset = 0
    for i in idx:
        prompt, response = prompt_ids[i], response_ids[i]
        if not prompt or not response:
            raise ValueError(f"sample {i} has an empty prompt or response; cannot score it")
        seq = prompt + response
        ids.extend(seq)
        pos.extend(range(len(seq)))
        start = offset + len(prompt) - 1
        score_pos.extend(range(start, start + len(response)))
        labels.extend(response)
        resp_lens.append(len(response))
        seq_lens.append(len(seq))
        offset += len(seq)
    as_long = lambda x: torch.tensor(x, dtype=torch.int64)  # noqa: E731  (a one-line helper)
    return PackedBatch(list(idx), as_long(ids), as_long(pos), as_long(score_pos), as_long(labels),
                       _cumsum0(resp_lens), _cumsum0(seq_lens))


def _cumsum0(lengths: list[int]) -> torch.Tensor:
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int64)
    cu[1:] = torch.tensor(lengths, dtype=torch.int64).cumsum(0)
    return cu


def segment_positions(cu_seqlens: torch.Tensor, segments: list[int] | torch.Tensor) -> torch.Tensor:
    """Positions, in a packed stream with offsets ``cu_seqlens`` (int64 ``[N+1]``), of the elements
    of ``segments`` (segment indices), segment after segment: int64 ``[sum of their lengths]``."""
    seg = torch.as_tensor(segments, dtype=torch.int64, device=cu_seqlens.device)
    starts = cu_seqlens[seg]
    lens = cu_seqlens[seg + 1] - starts
    out_starts = lens.cumsum(0) - lens
    total = int(lens.sum()) if lens.numel() else 0
    return (torch.arange(total, device=cu_seqlens.device)
            + torch.repeat_interleave(starts - out_starts, lens, output_size=total))


def token_budget_groups(lengths: list[int], max_tokens: int) -> list[list[int]]:
    """Split sample indices, in order, into consecutive micro-batches of at most ``max_tokens``.

    A sample longer than the budget gets a micro-batch of its own (it cannot be split without
    breaking its attention); nothing is dropped.
    """
    if max_tokens <= 0:
        raise ValueError(f"max_tokens must be > 0, got {max_tokens}")
    groups: list[list[int]] = []
    current: list[int] = []
    used = 0
    for i, n in enumerate(lengths):
        if current and used + n > max_tokens:
            groups.append(current)
            current, used = [], 0
        current.append(i)
        used += n
    if current:
        groups.append(current)
    return groups


def micro_batches(prompt_ids: list[list[int]], response_ids: list[list[int]], idx: list[int],
                  max_tokens: int) -> list[PackedBatch]:
    """Samples ``idx`` as packed micro-batches bounded by ``max_tokens`` tokens each."""
    lengths = [len(prompt_ids[i]) + len(response_ids[i]) for i in idx]
    return [pack_samples(prompt_ids, response_ids, [idx[j] for j in group])
            for group in token_budget_groups(lengths, max_tokens)]
