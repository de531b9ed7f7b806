"""Overlong shaping (DAPO, arXiv 2503.14476 Eq. 13): a soft length penalty on the reward, and
no loss on responses the length cap cut off.

Soft penalty, as verl's DAPO reward manager computes it (``DAPORewardManager.__call__``,
``reward.overlong_buffer.{enable,len,penalty_factor}`` here, verl's
``reward_model.overlong_buffer`` / ``reward_kwargs.overlong_buffer_cfg``): with M the response
cap (``rollout.max_response_length``, verl's ``max_resp_len``), l = ``len``, f =
``penalty_factor`` and L a response's length in tokens (its EOS included, as verl's
``valid_response_length`` and TRL's ``len(completion_ids)`` count it)::

    penalty = min(-(L - (M - l)) / l * f, 0)

0 up to L = M - l, then falling linearly by f / l per token to -f at L = M; it is added to the
score. OpenRLHF (``apply_overlong_penalty``) is the same for L <= M. TRL's
``get_soft_overlong_punishment(max_completion_len=M, soft_punish_cache=l)`` is a reward
function giving ``(M - l - L) / l`` for M - l < L <= M, 0 below, -1 above M: the same numbers
with f = 1, and with f as its reward weight (``reward_weights``) the same shaped reward.

Masking truncated responses (``actor.mask_truncated``; TRL's ``mask_truncated_completions``):
TRL calls a completion truncated when its last token is neither an EOS id nor the pad id, i.e.
it ended because it reached ``max_completion_length``; its tokens then leave the loss
(``completion_mask`` set to 0). :func:`truncated_mask` decides it from icpo's finish reasons
(``"length"``: no EOS in the first ``max_new_tokens`` tokens), :func:`truncated_mask_from_tokens`
from the tokens as TRL does; the two agree on icpo's rollouts (see the latter's docstring).
"""

from __future__ import annotations

from typing import Iterable, NamedTuple, Sequence

import torch


class OverlongPenalty(NamedTuple):
    penalty: torch.Tensor
    """float32 ``[B]``, <= 0: add it to the score."""
    num_penalized: int
    """Responses with a negative penalty (L > M - l)."""


class TruncatedMask(NamedTuple):
    truncated: torch.Tensor
    """bool ``[B]``: True for responses that get no loss."""
    num_truncated: int


def _lengths(lengths: torch.Tensor | Sequence[int], max_response_length: int) -> torch.Tensor:
    t = torch.as_tensor(lengths)
    if t.dim() == 1 and t.numel() == 0:  # torch.as_tensor([]) is float32
        return t.long()
    if t.dim() != 1 or t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise ValueError("lengths must be a 1-D integer tensor or list [B] of response lengths")
    if t.numel() and (int(t.min()) < 0 or int(t.max()) > max_response_length):
        raise ValueError(f"lengths must be in [0, rollout.max_response_length="
                         f"{max_response_length}], got {int(t.min())} ... {int(t.max())}")
    return t.long()


def overlong_penalty(lengths: torch.Tensor | Sequence[int], max_response_length: int,
                     buffer_len: int, penalty_factor: float = 1.0) -> OverlongPenalty:
    """DAPO's soft overlong penalty of each response (verl's arithmetic, in float32 as there).

    Args:
        lengths: ``[B]`` response lengths in tokens, EOS included, each <= max_response_length.
        max_response_length: M, the generation cap.
        buffer_len: l = ``reward.overlong_buffer.len``, 1 <= l <= M.
        penalty_factor: f = ``reward.overlong_buffer.penalty_factor`` >= 0, the penalty at L = M.

    Boundary: L = M - l gets exactly 0, L = M - l + 1 gets -f / l, L = M gets -f.
    """
    if not isinstance(max_response_length, int) or max_response_length < 1:
        raise ValueError(f"max_response_length must be an int >= 1, got {max_response_length!r}")
    if (not isinstance(buffer_len, int) or isinstance(buffer_len, bool)
            or not 1 <= buffer_len <= max_response_length):
        raise ValueError(f"reward.overlong_buffer.len must be an int in [1, "
                         f"rollout.max_response_length={max_response_length}], got {buffer_len!r}")
    if not float(penalty_factor) >= 0.0:
        raise ValueError(f"reward.overlong_buffer.penalty_factor must be >= 0, "
                         f"got {penalty_factor!r}")
    t = _lengths(lengths, max_response_length)
    exceed = t - (max_response_length - buffer_len)
    # verl's order of operations: (-exceed) / l, then * f, in float32 (torch's true division of
    # an int tensor), so the shaped reward is the same float32 number.
    penalty = ((-exceed).to(torch.float32) / buffer_len * float(penalty_factor)).clamp(max=0.0)
    return OverlongPenalty(penalty, int((penalty < 0).sum()))


def truncated_mask(finish_reasons: Sequence[str]) -> TruncatedMask:
    """Responses the length cap cut off: finish reason ``"length"`` (icpo's engines; vLLM's
    ``CompletionOutput.finish_reason``), as opposed to ``"stop"`` (ended by an EOS)."""
    if isinstance(finish_reasons, str):
        raise ValueError("finish_reasons must be a sequence of strings, one per response")
    bad = sorted(set(finish_reasons) - {"stop", "length"})
    if bad:
        raise ValueError(f"finish_reasons must be 'stop' or 'length', got {bad}")
    mask = torch.tensor([r == "length" for r in finish_reasons], dtype=torch.bool)
    return TruncatedMask(mask, int(mask.sum()))


def truncated_mask_from_tokens(response_ids: Sequence[Sequence[int]], stop_ids: Iterable[int]
                               ) -> TruncatedMask:
    """TRL's rule: truncated when the last token is not in ``stop_ids`` (TRL: its EOS ids and
    the pad id). icpo's responses end right after their first EOS or at ``max_new_tokens``
    tokens, so this equals :func:`truncated_mask` of their finish reasons, except when a model
    samples the pad id (not an EOS) as its last allowed token, which TRL counts as finished.
    An empty response (which TRL cannot index) is refused."""
    stop = {int(s) for s in stop_ids}
    if not stop:
        raise ValueError("stop_ids must name at least one token id (the EOS ids, and the pad id "
                         "for TRL's rule)")
    out = []
    for i, ids in enumerate(response_ids):
        if len(ids) == 0:
            raise ValueError(f"response {i} is empty: every response has at least one token "
                             "(docs/compat.md, empty responses)")
        out.append(int(ids[-1]) not in stop)
    mask = torch.tensor(out, dtype=torch.bool)
    return TruncatedMask(mask, int(mask.sum()))


def loss_token_weights(truncated: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """float32 ``[T]``: 0 on every token of a truncated response, 1 elsewhere.

    How TRL's mask enters the loss (``GRPOTrainer._compute_loss`` with ``completion_mask`` 0 on
    truncated completions): the per-token loss (policy term *and* KL term) and the entropy bonus
    are multiplied by it; token counts (``token-mean``/``dapo``'s N, ``bnpo``'s per-micro-batch
    count) count only weighted tokens; response counts (``grpo``/``seq-mean-token-mean``'s and
    ``dr_grpo``'s B) still count the masked responses, each with loss 0. Their rewards still
    enter their group's advantage statistics (TRL masks after computing advantages).
    """
    if truncated.dim() != 1 or truncated.numel() != cu_seqlens.numel() - 1:
        raise ValueError(f"truncated must be bool [B={cu_seqlens.numel() - 1}], "
                         f"got {tuple(truncated.shape)}")
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long().to(truncated.device)
    return torch.repeat_interleave((~truncated.bool()).to(torch.float32), lengths)
