"""The models the trainer trains and scores with: the policy wrapped in a DeepSpeed engine (with
its optimizer and lr schedule) and the frozen reference model (loading: icpo/models/loading.py)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from icpo.models.loading import load_causal_lm, resolve_dtype


def deepspeed_config(zero_stage: int, dtype: torch.dtype, grad_clip: float,
                     train: bool = True) -> dict[str, Any]:
    """DeepSpeed config for the actor (``train``) or a frozen, forward-only reference model.

    Gradient accumulation is unmanaged: the trainer backpropagates a variable number of
    token-budget micro-batches and ``step()`` closes the accumulation, so micro/GAS are 1.
    """
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": zero_stage},
        "bf16": {"enabled": dtype == torch.bfloat16},
        "fp16": {"enabled": dtype == torch.float16},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if train:
        cfg["managed_gradient_accumulation"] = False
        cfg["gradient_clipping"] = grad_clip if grad_clip > 0 else 0.0
    if zero_stage == 3:
        cfg["zero_optimization"].update(stage3_gather_16bit_weights_on_model_save=True)
    return cfg


def lr_lambda(warmup: int, total: int, schedule: str):
    """Multiplier of the base lr at optimizer step ``s``: linear warmup, then constant or cosine."""
    def fn(s: int) -> float:
        if warmup > 0 and s < warmup:
            return (s + 1) / warmup
        if schedule == "cosine":
            progress = min(1.0, (s - warmup) / max(1, total - warmup))
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0
    return fn


@dataclass
class TrainingModels:
    """The DeepSpeed-wrapped actor, its optimizer and schedule, and the reference model (not the
    rollout engine, which only samples: icpo/rollout)."""

    actor: Any
    optimizer: torch.optim.Optimizer
    scheduler: Any
    reference: torch.nn.Module | None
    num_params: int


def build_training_models(cfg, device: torch.device, optimizer_steps: int) -> TrainingModels:
    """Load the policy (and the reference when ``actor.kl_coef > 0``) and wrap them in DeepSpeed."""
    import deepspeed

    dtype = resolve_dtype(cfg.model.dtype, device)
    ds_train = deepspeed_config(cfg.trainer.zero_stage, dtype, cfg.actor.grad_clip)
    keep_alive = None
    if cfg.trainer.zero_stage == 3:
        # Shard at load time instead of materializing the full model on every rank.
        from transformers.integrations import HfDeepSpeedConfig

        keep_alive = HfDeepSpeedConfig(ds_train)  # noqa: F841
    policy = load_causal_lm(cfg.model.path, dtype, device, cfg.model.attn_implementation)
    num_params = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel()
                     for p in policy.parameters())
    if cfg.model.gradient_checkpointing:
        policy.gradient_checkpointing_enable()
    policy.config.use_cache = False
    optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.actor.lr,
                                  betas=tuple(cfg.actor.betas), weight_decay=cfg.actor.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(cfg.actor.lr_warmup_steps, optimizer_steps, cfg.actor.lr_schedule))
    actor, optimizer, _, scheduler = deepspeed.initialize(
        model=policy, optimizer=optimizer, lr_scheduler=scheduler, config=ds_train)
    reference = None
    if cfg.actor.kl_coef > 0:
        ref = load_causal_lm(cfg.model.ref_path or cfg.model.path, dtype, device,
                             cfg.model.attn_implementation)
        ref.requires_grad_(False).eval()
        if cfg.trainer.zero_stage == 3:
            ref, *_ = deepspeed.initialize(
                model=ref, config=deepspeed_config(3, dtype, 0.0, train=False))
            ref = ref.module
        reference = ref
    del keep_alive
    return TrainingModels(actor, optimizer, scheduler, reference, num_params)
