"""The paper's noisy-reward setting (Sec. 4.3, App. B.1; docs/algorithm.md) and the per-step
mixed-group filter.

Noisy: at every step, exactly ``round(fraction * N)`` of the N responses, chosen uniformly at
random, get ``+magnitude`` or ``-magnitude`` (random sign, each with probability 1/2) added to
their verifiable reward (paper: 40 % and 0.3). ``reward.drop_mixed_groups``: at every step, keep
only the prompts whose G responses all received the same reward (not the paper's coarse-grained
setting, which filters the training data once: :mod:`icpo.data.coarse`).
"""

from __future__ import annotations

import math

import torch


def num_noisy(n: int, fraction: float) -> int:
    """``round(fraction * n)`` with halves rounded up (Python's ``round`` would go to even)."""
    return min(n, int(math.floor(fraction * n + 0.5)))


def add_reward_noise(rewards: torch.Tensor, fraction: float, magnitude: float,
                     generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Add +-``magnitude`` to exactly ``num_noisy(N, fraction)`` randomly chosen rewards.

    Args:
        rewards: float ``[N]`` verifiable rewards (not modified).
        fraction: share of responses to perturb, in [0, 1].
        magnitude: size of the perturbation, >= 0.
        generator: CPU ``torch.Generator``; the choice depends only on its state and N.
    Returns:
        ``(noisy [N] same dtype/device as rewards, mask bool [N] True where noise was added)``.
    """
    if (not isinstance(rewards, torch.Tensor) or rewards.dim() != 1
            or not rewards.is_floating_point()):
        raise ValueError(f"rewards: expected a 1-D floating tensor, got {_describe(rewards)}")
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction: got {fraction!r}; expected a number in [0, 1]")
    if not magnitude >= 0.0 or math.isinf(magnitude):
        raise ValueError(f"magnitude: got {magnitude!r}; expected a finite number >= 0")
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator: expected torch.Generator, got {type(generator).__name__}")
    n = rewards.numel()
    k = num_noisy(n, fraction)
    # Draw on the generator's device so the stream is the same whatever device rewards live on.
    chosen = torch.randperm(n, generator=generator, device=generator.device)[:k]
    signs = torch.randint(0, 2, (k,), generator=generator, device=generator.device) * 2 - 1
    delta = torch.zeros(n, dtype=torch.float64, device=generator.device)
    delta[chosen] = signs.to(torch.float64) * magnitude
    mask = torch.zeros(n, dtype=torch.bool, device=generator.device)
    mask[chosen] = True
    noisy = rewards + delta.to(device=rewards.device, dtype=rewards.dtype)
    return noisy, mask.to(rewards.device)


def uniform_group_mask(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """bool ``[N / group_size]``: True for groups (consecutive ``group_size`` rewards) whose
    rewards are all exactly equal, the groups ``reward.drop_mixed_groups`` keeps."""
    if not isinstance(rewards, torch.Tensor) or rewards.dim() != 1:
        raise ValueError(f"rewards: expected a 1-D tensor, got {_describe(rewards)}")
    if not isinstance(group_size, int) or group_size < 1 or rewards.numel() % group_size:
        raise ValueError(f"group_size: got {group_size!r}; expected an int >= 1 dividing "
                         f"len(rewards) = {rewards.numel()}")
    groups = rewards.reshape(-1, group_size)
    return (groups == groups[:, :1]).all(dim=1)


def _describe(x: object) -> str:
    if isinstance(x, torch.Tensor):
        return f"tensor of shape {tuple(x.shape)} and dtype {x.dtype}"
    return type(x).__name__
