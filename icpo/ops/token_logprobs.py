"""``token_logprobs``: per-token log-prob of the label and softmax entropy, fused and memory-lean.

The compiled ops (``torch.ops.icpo.token_logprobs_fwd`` / ``_bwd``, schemas in ``csrc/ops.cpp``)
read each row of logits once, with an online max / sum-exp, and never materialize a ``T x V``
log-softmax; the backward writes ``grad_logits`` directly. This module validates inputs, flattens
``[B, L, V]`` to ``[B*L, V]`` without copying, and attaches fake kernels and autograd.
"""

from __future__ import annotations

import math

import torch

from icpo.ops._checks import check_float_tensor, check_tensor


@torch.library.register_fake("icpo::token_logprobs_fwd")
def _fwd_fake(logits, labels, inv_temperature, ignore_index):
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    t = logits.shape[0]
    return (logits.new_empty((t,), dtype=acc), logits.new_empty((t,), dtype=acc),
            logits.new_empty((t,), dtype=acc))


@torch.library.register_fake("icpo::token_logprobs_bwd")
def _bwd_fake(grad_logp, grad_entropy, logits, labels, lse, entropy, inv_temperature,
              ignore_index):
    return logits.new_empty(logits.shape)


def _setup_context(ctx, inputs, output):
    logits, labels, inv_temperature, ignore_index = inputs
    _, entropy, lse = output
    ctx.save_for_backward(logits, labels, lse, entropy)
    ctx.inv_temperature = inv_temperature
    ctx.ignore_index = ignore_index
    # lse is an internal by-product (for the backward and the NaN check), not differentiated.
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_logp, grad_entropy, _grad_lse):
    logits, labels, lse, entropy = ctx.saved_tensors
    if not ctx.needs_input_grad[0]:
        return None, None, None, None
    # A loss may use only one of the two outputs; the other's gradient then arrives as None.
    if grad_logp is None:
        grad_logp = torch.zeros_like(lse)
    if grad_entropy is None:
        grad_entropy = torch.zeros_like(lse)
    grad_logits = torch.ops.icpo.token_logprobs_bwd(
        grad_logp, grad_entropy, logits, labels, lse, entropy, ctx.inv_temperature,
        ctx.ignore_index)
    return grad_logits, None, None, None


torch.library.register_autograd("icpo::token_logprobs_fwd", _backward,
                                setup_context=_setup_context)


MIN_TEMPERATURE = 1e-3
"""Smallest temperature accepted. Below it ``logits / temperature`` leaves float range for
ordinary logits (1e-30 gave +inf / NaN); a colder softmax is greedy decoding, which has no
log-probs to train on. ``icpo.config`` holds the same bound for ``rollout.temperature``."""


def _check_args(logits: torch.Tensor, labels: torch.Tensor, temperature: float) -> None:
    """Shape / dtype / device / scalar checks, raising with the offending argument's name."""
    check_float_tensor(logits, "logits", dims=(2, 3), shape="[T, V] or [B, L, V]")
    check_tensor(labels, "labels")
    if logits.shape[-1] < 1:
        raise ValueError(f"logits must have a vocabulary dimension >= 1, got shape "
                         f"{tuple(logits.shape)}")
    if labels.dtype != torch.int64:
        raise TypeError(f"labels must be int64, got {labels.dtype}")
    if labels.shape != logits.shape[:-1]:
        raise ValueError(f"labels must have shape {tuple(logits.shape[:-1])} (logits' leading "
                         f"dims), got {tuple(labels.shape)}")
    if labels.device != logits.device:
        raise ValueError(f"labels must be on logits' device {logits.device}, got {labels.device}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a float, got {type(temperature).__name__}")
    if not (math.isfinite(temperature) and temperature >= MIN_TEMPERATURE):
        raise ValueError(f"temperature must be finite and >= {MIN_TEMPERATURE}, got {temperature}")


def _check_labels_range(labels: torch.Tensor, vocab: int, ignore_index: int) -> None:
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
    if bool(bad.any()):
        pos = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(f"labels{list(pos)} = {int(labels[pos])} is outside [0, {vocab}) and is "
                         f"not ignore_index ({ignore_index})")


def _check_finite(lse: torch.Tensor, leading: torch.Size) -> None:
    # The kernel makes a row's lse NaN exactly when that row holds NaN or +-inf.
    bad = torch.isnan(lse)
    if bool(bad.any()):
        flat = int(bad.nonzero()[0, 0])
        pos = list(torch.unravel_index(torch.tensor(flat), leading)) if len(leading) > 1 else [flat]
        raise ValueError(f"logits must be finite: row {[int(p) for p in pos]} holds NaN or inf "
                         f"({int(bad.sum())} bad rows in all)")


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor, *, temperature: float = 1.0,
                   return_entropy: bool = True, ignore_index: int = -100
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-prob of each label and entropy of ``softmax(logits / temperature)``, per position.

    Args:
        logits: ``[T, V]`` (packed) or ``[B, L, V]``; float32, bfloat16 or float16 (float64 is
            accepted too, for gradcheck). Any row stride; a ``[B, L, V]`` tensor whose leading
            dims merge into one is read in place. A non-unit vocabulary stride costs a copy.
        labels: int64, logits' leading shape (``[T]`` or ``[B, L]``), same device; each in
            ``[0, V)`` or equal to ``ignore_index``.
        temperature: >= MIN_TEMPERATURE (1e-3); logits are divided by it before the softmax.
        return_entropy: when False the second output is None.
        ignore_index: label marking positions that get 0 for both outputs and no gradient.

    Returns:
        ``(logp, entropy)``, float32 (float64 for float64 logits) with labels' shape;
        differentiable with respect to ``logits`` through both. Accumulation is in fp32 whatever
        the input dtype, and ``logits`` is never modified.

    Raises:
        TypeError / ValueError naming the argument: wrong dtype, shape or device, a label out of
        range, ``temperature < MIN_TEMPERATURE``, or a row of logits holding NaN or inf.
    """
    _check_args(logits, labels, temperature)
    leading, vocab = logits.shape[:-1], logits.shape[-1]
    compiling = torch.compiler.is_compiling()
    if not compiling:
        _check_labels_range(labels, vocab, ignore_index)
    flat = logits.reshape(-1, vocab)  # a view whenever the leading dims merge
    if flat.stride(-1) != 1 and vocab > 1:
        flat = flat.contiguous()
    logp, entropy, lse = torch.ops.icpo.token_logprobs_fwd(
        flat, labels.reshape(-1), 1.0 / float(temperature), int(ignore_index))
    if not compiling:
        _check_finite(lse, leading)
    logp = logp.reshape(leading)
    return logp, (entropy.reshape(leading) if return_entropy else None)
