"""The accuracy rule of the op tests (flash-attention's) and their seed.

On the same inputs, a kernel's error against a float64 reference is at most twice the error of
plain PyTorch computing at the kernel's precision, plus a small absolute floor: for outputs plain
PyTorch gets exactly (a group of equal rewards, a length-1 segment, an ignored row), and for
rounding the kernel cannot avoid (each test says which). Errors are max-abs, so one wrong
element shows.

Randomized inputs come from ``SEED`` (0; ``ICPO_TEST_SEED=N`` reruns the op tests on other
inputs), and every failure message names it.
"""

from __future__ import annotations

import os

import torch

SEED = int(os.environ.get("ICPO_TEST_SEED", "0"))
EPS32 = torch.finfo(torch.float32).eps


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| in float64, on the CPU (0 for empty tensors)."""
    if a.numel() == 0:
        return 0.0
    return (a.detach().double().cpu() - b.detach().double().cpu()).abs().max().item()


def rounding_floor(dtype: torch.dtype, scale: float, n: int = 1) -> float:
    """A floor for kernels whose outputs are sums: a few roundings, in the kernels' accumulation
    precision (float64 for float64 inputs, else float32), of a value of size ``scale``, growing
    with the square root of the ``n`` terms summed into it. (For float64 inputs there is no
    more precise plain PyTorch to compare with: plain is the reference, and this is the bound.)"""
    eps = torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps
    return 4 * eps * n ** 0.5 * scale


def assert_within_2x_plain(got: torch.Tensor, plain: torch.Tensor, truth: torch.Tensor, *,
                           floor: float, what: str, seed: int = SEED) -> None:
    """``max_err(got, truth) <= 2 * max_err(plain, truth) + floor``; the message says by how much
    it missed, and with which seed."""
    assert got.shape == truth.shape, (what, tuple(got.shape), tuple(truth.shape))
    assert bool(torch.isfinite(got).all()), f"{what}: non-finite output (seed {seed})"
    err, plain_err = max_err(got, truth), max_err(plain, truth)
    assert err <= 2 * plain_err + floor, (
        f"{what}: error {err:.3g} > 2 x plain PyTorch's {plain_err:.3g} + floor {floor:.3g} "
        f"(seed {seed}; ICPO_TEST_SEED={seed} reruns it)")
