"""Per-segment means of packed tensors, and packing helpers between padded and packed layouts.

Packed layout (flash-attention's varlen convention): a ``[T, ...]`` tensor holding B sequences
back to back, plus ``cu_seqlens`` ``[B + 1]`` (int32 or int64) with ``cu_seqlens[0] == 0``,
non-decreasing, ``cu_seqlens[B] == T``; sequence b is ``packed[cu_seqlens[b]:cu_seqlens[b+1]]``.
"""

from __future__ import annotations

import torch

from icpo.ops._checks import check_float_tensor, check_index_tensor, check_offsets

__all__ = ["pack_padded", "segment_mean", "unpack_to_padded"]


def segment_mean(values: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Mean of each segment of a packed tensor.

    values: ``[T]`` float32/float64/float16/bfloat16. cu_seqlens: int32/int64 ``[B + 1]``, starting
    at 0, non-decreasing, ending at T, no empty segment. Returns ``[B]`` in ``values``' dtype,
    accumulated in float32 (float64 for float64). Differentiable with respect to ``values``.
    """
    check_float_tensor(values, "values", "segment_mean", shape="1-D (packed [T])")
    check_index_tensor(cu_seqlens, "cu_seqlens", "segment_mean", device=values.device)
    check_offsets(cu_seqlens, values.shape[0], op="segment_mean", name="cu_seqlens",
                  part="segment", total_name="T = values.numel()")
    return torch.ops.icpo.segment_mean(values.contiguous(), cu_seqlens.contiguous())


@torch.library.register_fake("icpo::segment_mean")
def _segment_mean_fake(values: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    return values.new_empty(cu_seqlens.shape[0] - 1)


@torch.library.register_fake("icpo::segment_mean_bwd")
def _segment_mean_bwd_fake(grad: torch.Tensor, cu_seqlens: torch.Tensor, total) -> torch.Tensor:
    return grad.new_empty(total)


def _segment_mean_setup(ctx, inputs, output) -> None:
    values, cu_seqlens = inputs
    ctx.save_for_backward(cu_seqlens)
    ctx.total = values.shape[0]


def _segment_mean_backward(ctx, grad):
    (cu_seqlens,) = ctx.saved_tensors
    # grad may be an expanded view (e.g. from .sum()); the kernels read flat memory.
    return torch.ops.icpo.segment_mean_bwd(grad.contiguous(), cu_seqlens, ctx.total), None


def _segment_mean_bwd_setup(ctx, inputs, output) -> None:
    ctx.save_for_backward(inputs[1])


def _segment_mean_bwd_backward(ctx, grad_values):
    # segment_mean_bwd is linear in grad, and its adjoint is segment_mean: double backward works.
    (cu_seqlens,) = ctx.saved_tensors
    return torch.ops.icpo.segment_mean(grad_values.contiguous(), cu_seqlens), None, None


torch.library.register_autograd("icpo::segment_mean", _segment_mean_backward,
                                setup_context=_segment_mean_setup)
torch.library.register_autograd("icpo::segment_mean_bwd", _segment_mean_bwd_backward,
                                setup_context=_segment_mean_bwd_setup)


def pack_padded(padded: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pack the masked-in positions of a padded batch, row by row, in order.

    padded: ``[B, L, ...]`` any dtype. mask: ``[B, L]`` bool, or integer/float holding only 0/1;
    need not be left- or right-aligned. Returns ``(packed [T, ...], cu_seqlens int32 [B + 1])``
    with T the number of masked-in positions; a row with no masked-in position gives an empty
    segment (fine here, refused by :func:`segment_mean`).
    """
    if not isinstance(padded, torch.Tensor) or not isinstance(mask, torch.Tensor):
        raise TypeError("pack_padded: padded and mask must be torch.Tensors")
    if padded.dim() < 2:
        raise ValueError("pack_padded: padded must be [B, L, ...], got shape "
                         f"{tuple(padded.shape)}")
    if mask.shape != padded.shape[:2]:
        raise ValueError(f"pack_padded: mask must have shape [B, L] = "
                         f"{tuple(padded.shape[:2])}, got {tuple(mask.shape)}")
    if mask.device != padded.device:
        raise ValueError(f"pack_padded: mask must be on {padded.device} (padded's device), "
                         f"got {mask.device}")
    if mask.dtype != torch.bool:
        if mask.is_complex():
            raise TypeError(f"pack_padded: mask must be bool or hold 0/1, got {mask.dtype}")
        if not torch.compiler.is_compiling() and not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError("pack_padded: mask must hold only 0 and 1 (or be bool)")
        mask = mask != 0
    packed = padded[mask]
    if packed.shape[0] >= 2**31:
        raise ValueError("pack_padded: too many masked-in positions for int32 cu_seqlens: "
                         f"{packed.shape[0]}")
    cu_seqlens = torch.zeros(mask.shape[0] + 1, dtype=torch.int32, device=mask.device)
    cu_seqlens[1:] = mask.sum(1).cumsum(0)
    return packed, cu_seqlens


def unpack_to_padded(packed: torch.Tensor, cu_seqlens: torch.Tensor,
                     padding_value: float = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`pack_padded`, left-aligned (padding on the right).

    packed: ``[T, ...]``. cu_seqlens: int32/int64 ``[B + 1]`` (empty segments allowed).
    Returns ``(padded [B, Lmax, ...] filled with padding_value, mask bool [B, Lmax])``, with
    Lmax the longest segment.
    """
    if not isinstance(packed, torch.Tensor):
        raise TypeError("unpack_to_padded: packed must be a torch.Tensor, got "
                        f"{type(packed).__name__}")
    if packed.dim() < 1:
        raise ValueError("unpack_to_padded: packed must be [T, ...], got a 0-d tensor")
    check_index_tensor(cu_seqlens, "cu_seqlens", "unpack_to_padded", device=packed.device)
    total = packed.shape[0]
    check_offsets(cu_seqlens, total, op="unpack_to_padded", name="cu_seqlens", part="segment",
                  total_name="T = packed.shape[0]", allow_empty=True)
    lengths = cu_seqlens.diff().long()
    batch = lengths.numel()
    max_len = int(lengths.max()) if batch > 0 else 0
    # Row of each packed position, then its column = position - start of its row.
    rows = torch.repeat_interleave(torch.arange(batch, device=packed.device), lengths,
                                   output_size=total)
    cols = torch.arange(total, device=packed.device) - cu_seqlens[:-1].long()[rows]
    padded = packed.new_full((batch, max_len, *packed.shape[1:]), padding_value)
    padded[rows, cols] = packed
    mask = torch.arange(max_len, device=packed.device)[None, :] < lengths[:, None]
    return padded, mask
