"""``linear_token_logprobs``: the LM head and ``token_logprobs`` fused, logits never held whole.

``logits = hidden @ weight.T + bias`` is a ``[T, V]`` tensor of GBs at real vocabularies
(151936 x 4096 tokens: 2.4 GB in fp32), and its gradient another. The compiled ops
(``torch.ops.icpo.linear_token_logprobs_fwd`` / ``_bwd``, schemas in ``csrc/ops.cpp``, design in
``csrc/linear_token_logprobs.cpp``) make the logits one vocabulary slice at a time in a reused
buffer, merging the slices' softmax statistics, and the backward recomputes them the same way.
This module validates inputs, flattens ``[B, L, H]`` to ``[B*L, H]``, and attaches fake kernels
and autograd (to ``hidden``, ``weight`` and ``bias``).
"""

from __future__ import annotations

import math

import torch

from icpo.ops._checks import check_float_tensor, check_tensor
from icpo.ops.token_logprobs import MIN_TEMPERATURE

_OP = "linear_token_logprobs"


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.register_fake("icpo::linear_token_logprobs_fwd")
def _fwd_fake(hidden, weight, bias, labels, inv_temperature, ignore_index, chunk_size):
    t, acc = hidden.shape[0], _acc(hidden.dtype)
    return tuple(hidden.new_empty((t,), dtype=acc) for _ in range(3))


@torch.library.register_fake("icpo::linear_token_logprobs_bwd")
def _bwd_fake(grad_logp, grad_entropy, hidden, weight, bias, labels, lse, entropy,
              inv_temperature, ignore_index, chunk_size, output_mask):
    need_h, need_w, need_b = output_mask
    return (hidden.new_empty(hidden.shape if need_h else (0,)),
            hidden.new_empty(weight.shape if need_w else (0,)),
            hidden.new_empty(bias.shape if (need_b and bias is not None) else (0,)))


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, labels, inv_temperature, ignore_index, chunk_size = inputs
    _, entropy, lse = output
    # The logits are not saved: the backward recomputes them (that is the point of the op).
    ctx.save_for_backward(hidden, weight, bias, labels, lse, entropy)
    ctx.inv_temperature = inv_temperature
    ctx.ignore_index = ignore_index
    ctx.chunk_size = chunk_size
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_logp, grad_entropy, _grad_lse):
    hidden, weight, bias, labels, lse, entropy = ctx.saved_tensors
    mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1],
            bias is not None and ctx.needs_input_grad[2]]
    if not any(mask):
        return (None,) * 7
    # A loss may use only one of the two outputs; the other's gradient then arrives as None.
    if grad_logp is None:
        grad_logp = torch.zeros_like(lse)
    if grad_entropy is None:
        grad_entropy = torch.zeros_like(lse)
    d_hidden, d_weight, d_bias = torch.ops.icpo.linear_token_logprobs_bwd(
        grad_logp, grad_entropy, hidden, weight, bias, labels, lse, entropy,
        ctx.inv_temperature, ctx.ignore_index, ctx.chunk_size, mask)
    return (d_hidden if mask[0] else None, d_weight if mask[1] else None,
            d_bias if mask[2] else None, None, None, None, None)


torch.library.register_autograd("icpo::linear_token_logprobs_fwd", _backward,
                                setup_context=_setup_context)


def _check_args(hidden, weight, labels, bias, temperature, chunk_size) -> None:
    """Shape / dtype / device / scalar checks, raising with the offending argument's name."""
    check_float_tensor(hidden, "hidden", _OP, dims=(2, 3), shape="[T, H] or [B, L, H]")
    check_float_tensor(weight, "weight", _OP, dims=(2,), shape="[V, H]")
    check_tensor(labels, "labels", _OP)
    pre = f"{_OP}: "
    if hidden.shape[-1] < 1:
        raise ValueError(f"{pre}hidden must have a hidden dimension >= 1, got shape "
                         f"{tuple(hidden.shape)}")
    if weight.shape[0] < 1 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"{pre}weight must be [V, {hidden.shape[-1]}] with V >= 1 (hidden's last "
                         f"dim), got shape {tuple(weight.shape)}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"{pre}weight must have hidden's dtype {hidden.dtype}, got {weight.dtype}")
    if weight.device != hidden.device:
        raise ValueError(f"{pre}weight must be on hidden's device {hidden.device}, got "
                         f"{weight.device}")
    if bias is not None:
        check_tensor(bias, "bias", _OP)
        if bias.shape != weight.shape[:1]:
            raise ValueError(f"{pre}bias must be None or [{weight.shape[0]}] (weight's rows), got "
                             f"shape {tuple(bias.shape)}")
        if bias.dtype != hidden.dtype:
            raise TypeError(f"{pre}bias must have hidden's dtype {hidden.dtype}, got {bias.dtype}")
        if bias.device != hidden.device:
            raise ValueError(f"{pre}bias must be on hidden's device {hidden.device}, got "
                             f"{bias.device}")
    if labels.dtype != torch.int64:
        raise TypeError(f"{pre}labels must be int64, got {labels.dtype}")
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(f"{pre}labels must have shape {tuple(hidden.shape[:-1])} (hidden's "
                         f"leading dims), got {tuple(labels.shape)}")
    if labels.device != hidden.device:
        raise ValueError(f"{pre}labels must be on hidden's device {hidden.device}, got "
                         f"{labels.device}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"{pre}temperature must be a float, got {type(temperature).__name__}")
    if not (math.isfinite(temperature) and temperature >= MIN_TEMPERATURE):
        raise ValueError(f"{pre}temperature must be finite and >= {MIN_TEMPERATURE}, got "
                         f"{temperature}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                   or chunk_size < 1):
        raise ValueError(f"{pre}chunk_size must be None or an int >= 1, got {chunk_size!r}")


def _where(flat: int, leading: torch.Size) -> list[int]:
    if len(leading) <= 1:
        return [flat]
    return [int(i) for i in torch.unravel_index(torch.tensor(flat), leading)]


def _check_labels_range(labels: torch.Tensor, vocab: int, ignore_index: int,
                        leading: torch.Size) -> None:
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
    if bool(bad.any()):
        flat = int(bad.nonzero()[0, 0])
        raise ValueError(f"{_OP}: labels{_where(flat, leading)} = {int(labels[flat])} is outside "
                         f"[0, {vocab}) (weight's rows) and is not ignore_index ({ignore_index})")


def _check_finite(lse: torch.Tensor, leading: torch.Size) -> None:
    # The row pass makes a row's lse NaN exactly when that row of logits holds NaN or +-inf.
    bad = torch.isnan(lse)
    if bool(bad.any()):
        flat = int(bad.nonzero()[0, 0])
        raise ValueError(f"{_OP}: logits (hidden @ weight.T + bias) must be finite: token "
                         f"{_where(flat, leading)} has NaN or inf ({int(bad.sum())} such tokens "
                         f"in all); check hidden, weight and bias")


def linear_token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                          temperature: float = 1.0, bias: torch.Tensor | None = None,
                          ignore_index: int = -100, return_entropy: bool = True,
                          chunk_size: int | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``token_logprobs(hidden @ weight.T + bias, labels)`` without building the ``[T, V]`` logits.

    Args:
        hidden: ``[T, H]`` (packed) or ``[B, L, H]``; float32, bfloat16 or float16 (float64 for
            gradcheck). The last hidden states, before the LM head.
        weight: ``[V, H]``, hidden's dtype and device (an ``nn.Linear``'s weight; tied
            embeddings are fine, their gradients add up).
        labels: int64, hidden's leading shape; each in ``[0, V)`` or ``ignore_index``.
        temperature: >= MIN_TEMPERATURE (1e-3); logits are divided by it before the softmax.
        bias: None or ``[V]``, hidden's dtype.
        ignore_index: label marking positions that get 0 for both outputs and no gradient.
        return_entropy: when False the second output is None.
        chunk_size: size of the one reused logits buffer, in rows of V: it holds
            ``chunk_size * V`` logits, made as tiles of all tokens x a slice of the vocabulary
            (``chunk_size * V / T`` wide, at least 128). None: 32 MiB on CPU, 256 MiB on CUDA.

    Returns:
        ``(logp, entropy)``, float32 (float64 for float64 inputs) with labels' shape,
        differentiable with respect to ``hidden``, ``weight`` and ``bias``. GEMMs accumulate in
        fp32 (bf16 logits are rounded to bf16, as ``hidden @ weight.T`` gives them); the
        softmax statistics are fp32.

    Raises:
        TypeError / ValueError naming the argument: wrong dtype, shape or device, a label out of
        range, ``temperature < MIN_TEMPERATURE``, a bad ``chunk_size``, or logits holding NaN or
        inf.
    """
    _check_args(hidden, weight, labels, bias, temperature, chunk_size)
    leading = hidden.shape[:-1]
    compiling = torch.compiler.is_compiling()
    if not compiling:
        _check_labels_range(labels.reshape(-1), weight.shape[0], ignore_index, leading)
    logp, entropy, lse = torch.ops.icpo.linear_token_logprobs_fwd(
        hidden.reshape(-1, hidden.shape[-1]), weight, bias, labels.reshape(-1),
        1.0 / float(temperature), int(ignore_index), int(chunk_size or 0))
    if not compiling:
        _check_finite(lse, leading)
    logp = logp.reshape(leading)
    return logp, (entropy.reshape(leading) if return_entropy else None)
