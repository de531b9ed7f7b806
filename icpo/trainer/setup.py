"""The models the trainer trains and scores with: the policy wrapped in a DeepSpeed engine (with
its optimizer and lr schedule) and the frozen reference model (loading: icpo/models/loading.py).

With ``model.lora_rank > 0`` the policy is a PEFT model (icpo/models/lora.py): only its adapters
go to the optimizer, and the reference is that same model with its adapters off unless
``model.ref_path`` names another one, so no second copy of the base weights is loaded.
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass
from typing import Any

import torch

from icpo.models import resolve_model_path
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
    lora: bool = False
    """The actor is a PEFT model whose LoRA adapters alone are trained."""
    reference_is_base: bool = False
    """``reference`` is the actor's own module: score it inside :meth:`reference_mode`."""

    def reference_mode(self) -> contextlib.AbstractContextManager:
        """The context to compute the reference log-probs in: the actor's adapters disabled
        when the reference is the LoRA policy's base model, else nothing."""
        if not self.reference_is_base:
            return contextlib.nullcontext()
        from icpo.models.lora import adapters_disabled

        return adapters_disabled(self.actor)


def build_training_models(cfg, device: torch.device, optimizer_steps: int) -> TrainingModels:
    """Load the policy (and the reference when ``actor.kl_coef > 0``) and wrap them in DeepSpeed."""
    import deepspeed

    dtype = resolve_dtype(cfg.model.dtype, device)
    ds_train = deepspeed_config(cfg.trainer.zero_stage, dtype, cfg.actor.grad_clip)
    keep_alive = None
    if cfg.trainer.zero_stage == 3:
        # Shard at load time instead of materializing the full model on every rank.
        from transformers.integrations import HfDeepSpeedConfig

        keep_alive = HfDeepSpeedConfig(ds_train)
    policy = load_causal_lm(cfg.model.path, dtype, device, cfg.model.attn_implementation)
    num_params = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel()
                     for p in policy.parameters())
    if cfg.model.gradient_checkpointing:
        policy.gradient_checkpointing_enable()
    policy.config.use_cache = False
    lora = cfg.model.lora_rank > 0
    params = policy.parameters()
    if lora:
        from icpo.models.lora import trainable_parameters

        policy = _with_adapters(policy, cfg.model)
        params = trainable_parameters(policy)
    optimizer = torch.optim.AdamW(params, lr=cfg.actor.lr,
                                  betas=tuple(cfg.actor.betas), weight_decay=cfg.actor.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(cfg.actor.lr_warmup_steps, optimizer_steps, cfg.actor.lr_schedule))
    actor, optimizer, _, scheduler = deepspeed.initialize(
        model=policy, optimizer=optimizer, lr_scheduler=scheduler, config=ds_train)
    reference, reference_is_base = None, False
    if cfg.actor.kl_coef > 0 and lora and cfg.model.ref_path is None:
        reference, reference_is_base = actor.module, True  # scored with the adapters off
    elif cfg.actor.kl_coef > 0:
        ref = load_causal_lm(cfg.model.ref_path or cfg.model.path, dtype, device,
                             cfg.model.attn_implementation)
        ref.requires_grad_(False).eval()
        if cfg.trainer.zero_stage == 3:
            ref, *_ = deepspeed.initialize(
                model=ref, config=deepspeed_config(3, dtype, 0.0, train=False))
            ref = ref.module
        reference = ref
    del keep_alive
    return TrainingModels(actor, optimizer, scheduler, reference, num_params, lora,
                          reference_is_base)


def _with_adapters(policy: torch.nn.Module, model_cfg) -> torch.nn.Module:
    """``policy`` wrapped in PEFT LoRA adapters; the adapter records the base model as an
    absolute folder (or the hub id), so ``PeftModel.from_pretrained`` finds it from anywhere."""
    from icpo.errors import UserError
    from icpo.models.lora import apply_lora

    targets = model_cfg.target_modules
    try:
        peft = apply_lora(policy, model_cfg.lora_rank, model_cfg.lora_alpha,
                          model_cfg.lora_dropout,
                          targets if isinstance(targets, str) else list(targets))
    except ValueError as e:  # the config checked the numbers: PEFT refused the layers
        raise UserError(f"model.target_modules: {targets!r}: {e}") from None
    local = resolve_model_path(model_cfg.path)
    if os.path.isdir(local):
        peft.peft_config[peft.active_adapter].base_model_name_or_path = os.path.abspath(local)
    return peft
