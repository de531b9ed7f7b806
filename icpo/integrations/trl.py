"""ICPO inside TRL: :class:`ICPOTrainer` is ``trl.GRPOTrainer`` with ICPO's advantages.

A TRL user swaps ``GRPOConfig`` / ``GRPOTrainer`` for :class:`ICPOConfig` / :class:`ICPOTrainer`;
everything else (model, reward functions, dataset, generation, loss types, logging) is TRL's.
After TRL generates and scores a batch, the trainer

1. takes the log-probs of the completions under the policy that sampled them, at the sampling
   temperature: TRL's ``old_per_token_logps`` when TRL computed them, else vLLM's
   ``sampling_per_token_logps`` when all finite, else one no-grad forward whose LM head runs
   at the completion positions only, through :func:`icpo.ops.linear_token_logprobs` (no
   logits) where it is a plain linear layer;
2. confidence = :func:`icpo.ops.segment_mean` of them per completion (docs/algorithm.md step 3);
3. gathers confidences and rewards from all processes (TRL normalizes over the whole batch),
   computes :func:`icpo.ops.icpo_advantages` with TRL's conventions (Bessel std, eps 1e-4,
   ``scale_rewards`` group / batch / none) and keeps this process's slice, as TRL does.

With omega = 0 the advantages are TRL's GRPO advantages; the loss is TRL's unchanged.
ICPO's Eq. 9 delta is ``icpo_delta`` here: ``GRPOConfig.delta`` is TRL's two-sided clip.
A completion with no scored token (``mask_truncated_completions``) gets confidence 0: it earns
no exploration bonus.

Tested with trl==1.16.0 (``pip install 'icpo[trl]'``); other versions are refused at import,
since the trainer hooks TRL internals (``_calculate_rewards``, ``_generate_and_score_completions``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, Callable

import torch

from icpo import ops
from icpo.algorithms import SCHEDULES, compute_advantages, default_delta, omega_at
from icpo.trainer.scoring import decoder_body, lm_head_logprobs

TESTED_TRL_VERSIONS = ("1.16.0",)

try:
    import trl
except ImportError as err:  # pragma: no cover - exercised only without TRL
    raise ImportError("icpo.integrations.trl needs TRL: pip install 'icpo[trl]' "
                      f"(trl=={TESTED_TRL_VERSIONS[-1]})") from err
if trl.__version__ not in TESTED_TRL_VERSIONS:
    raise ImportError(f"icpo.integrations.trl is tested with trl {', '.join(TESTED_TRL_VERSIONS)} "
                      f"and hooks its internals; found trl {trl.__version__}. Install "
                      f"trl=={TESTED_TRL_VERSIONS[-1]} (pip install 'icpo[trl]').")

from trl import GRPOConfig, GRPOTrainer  # noqa: E402  (after the TRL version check)


@dataclass
class ICPOConfig(GRPOConfig):
    """``GRPOConfig`` plus ICPO's fields (paper Table 6 defaults; docs/algorithm.md, "omega over
    training")."""

    icpo_delta: float | None = field(default=None, metadata={
        "help": "ICPO Eq. 9 scale; None = from the parameter count "
                "(0.5 < 4B, 0.4 4-8B, 0.3 > 8B)."})
    icpo_tau: float = field(default=2.0, metadata={
        "help": "ICPO Eq. 11 clip: the bonus is at most |R| / tau."})
    omega_schedule: str = field(default="warmup_decay", metadata={
        "help": f"Schedule of omega, the weight of the preference score: one of {SCHEDULES}."})
    omega_max: float = field(default=1.0, metadata={"help": "Peak omega (0 = plain GRPO)."})
    omega_min: float = field(default=0.0, metadata={
        "help": "Omega at the start (warm-up schedules) and at the last step (decay schedules)."})
    omega_peak_fraction: float = field(default=0.4, metadata={
        "help": "Fraction of training at which the warm-up schedules peak."})

    def __post_init__(self):
        super().__post_init__()
        if self.icpo_delta is not None and not self.icpo_delta > 0:
            raise ValueError(f"icpo_delta must be > 0 or None, got {self.icpo_delta!r}")
        if not self.icpo_tau > 0:
            raise ValueError(f"icpo_tau must be > 0, got {self.icpo_tau!r}")
        if self.omega_schedule not in SCHEDULES:
            raise ValueError(f"omega_schedule must be one of {SCHEDULES}, "
                             f"got {self.omega_schedule!r}")
        if not 0 <= self.omega_min <= self.omega_max:
            raise ValueError(f"need 0 <= omega_min <= omega_max, got {self.omega_min!r}, "
                             f"{self.omega_max!r}")
        if not 0 <= self.omega_peak_fraction <= 1:
            raise ValueError("omega_peak_fraction must be in [0, 1], "
                             f"got {self.omega_peak_fraction!r}")
        if self.multi_objective_aggregation != "sum_then_normalize":
            raise ValueError("ICPOTrainer needs multi_objective_aggregation='sum_then_normalize' "
                             "(ICPO adds its bonus to the summed reward)")


class ICPOTrainer(GRPOTrainer):
    """``GRPOTrainer`` whose advantages are ICPO's (:func:`icpo.ops.icpo_advantages`)."""

    # GRPOTrainer's parameters (trl 1.16) spelled out, so IDEs and help() show them; anything
    # a later TRL adds goes through **kwargs.
    def __init__(self, model: Any, reward_funcs: Any = None, args: ICPOConfig | None = None,
                 train_dataset: Any = None, eval_dataset: Any = None,
                 processing_class: Any = None, reward_processing_classes: Any = None,
                 callbacks: list[Any] | None = None, optimizers: tuple[Any, Any] = (None, None),
                 quantization_config: Any = None, peft_config: Any = None,
                 tools: list[Callable] | None = None, rollout_func: Callable | None = None,
                 environment_factory: Any = None, **kwargs: Any):
        """As ``GRPOTrainer``'s; ``args`` must be an :class:`ICPOConfig` (None: the defaults,
        output in ``<model name>-ICPO``, as GRPOTrainer makes ``<model name>-GRPO``)."""
        if args is None:
            name = model if isinstance(model, str) else getattr(
                getattr(model, "config", None), "_name_or_path", None) or "model"
            args = ICPOConfig(f"{str(name).rstrip('/').split('/')[-1]}-ICPO")
        if not isinstance(args, ICPOConfig):  # before the model loads
            raise TypeError(f"ICPOTrainer needs args=ICPOConfig(...), got {type(args).__name__}")
        super().__init__(model, reward_funcs=reward_funcs, args=args, train_dataset=train_dataset,
                         eval_dataset=eval_dataset, processing_class=processing_class,
                         reward_processing_classes=reward_processing_classes,
                         callbacks=callbacks, optimizers=optimizers,
                         quantization_config=quantization_config, peft_config=peft_config,
                         tools=tools, rollout_func=rollout_func,
                         environment_factory=environment_factory, **kwargs)
        params = sum(p.numel() for p in self.accelerator.unwrap_model(self.model).parameters())
        self.icpo_delta = (self.args.icpo_delta if self.args.icpo_delta is not None
                           else default_delta(params))
        self._rewards_all = None

    def omega(self) -> float:
        """omega at the current optimizer step (0 outside training)."""
        a = self.args
        if not self.model.training or self.state.max_steps < 1:
            return 0.0
        sched = SimpleNamespace(schedule=a.omega_schedule, omega_max=a.omega_max,
                                omega_min=a.omega_min, peak_fraction=a.omega_peak_fraction)
        step = min(self.state.global_step, self.state.max_steps - 1)
        return omega_at(step, self.state.max_steps, sched)

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        # TRL returns the rewards of every process (gathered); keep them for the advantages.
        self._rewards_all = super()._calculate_rewards(inputs, prompts, completions,
                                                       completion_ids_list)
        return self._rewards_all

    def _generate_and_score_completions(self, inputs):
        out = super()._generate_and_score_completions(inputs)
        mode = "train" if self.model.training else "eval"
        per_func = self._rewards_all
        if torch.isnan(per_func).all(dim=1).any():
            raise ValueError("ICPOTrainer: every reward function returned None for some "
                             "completions; ICPO needs a reward for every completion")
        rewards = (per_func * self.reward_weights.to(per_func.device).unsqueeze(0)).nansum(dim=1)
        confidence = self.accelerator.gather(self._confidence(out).to(rewards.device))
        G = self.num_generations if mode == "train" else self.num_generations_eval
        omega = self.omega()
        # TRL's conventions: Bessel std, eps 1e-4, scale_rewards group / batch / none.
        conventions = SimpleNamespace(
            name="icpo", delta=self.icpo_delta, tau=self.args.icpo_tau, unbiased_std=True,
            eps=1e-4, scale_advantages=self.scale_rewards != "none", group_of_one="zero",
            std_scope="batch" if self.scale_rewards == "batch" else "group")
        res = compute_advantages(confidence, rewards, G, conventions, omega)
        adv = res.advantages
        n_local = out["completion_ids"].size(0)
        start = self.accelerator.process_index * n_local
        out["advantages"] = adv[start:start + n_local].to(out["advantages"])
        metrics = self._metrics[mode]
        metrics["icpo/omega"].append(omega)
        metrics["icpo/score_mean"].append(res.scores.mean().item())
        metrics["icpo/confidence_mean"].append(confidence.mean().item())
        return out

    @torch.no_grad()
    def _confidence(self, out) -> torch.Tensor:
        """Mean log-prob of each local completion under the sampling policy, fp32 ``[B]``."""
        mask = out["completion_mask"]
        if "tool_mask" in out:
            mask = mask * out["tool_mask"]
        logp = out.get("old_per_token_logps")
        sampled = out.get("sampling_per_token_logps")  # vLLM's; NaN where it could not score
        if logp is None and sampled is not None and torch.isfinite(sampled[mask.bool()]).all():
            logp = sampled
        if logp is None:
            logp = self._sampling_logps(out)
        lengths = mask.sum(dim=1)
        keep = lengths > 0
        conf = torch.zeros(mask.size(0), dtype=torch.float32, device=mask.device)
        if keep.any():
            cu = torch.zeros(int(keep.sum()) + 1, dtype=torch.int64, device=mask.device)
            cu[1:] = lengths[keep].long().cumsum(0)
            packed = logp[keep][mask[keep].bool()].float()
            conf[keep] = ops.segment_mean(packed, cu).clamp(max=0.0)
        return conf

    def _sampling_logps(self, out) -> torch.Tensor:
        """Completion-token log-probs ``[B, C]`` from the current (= sampling) model: its
        decoder body, then the LM head at the completion positions only, through
        ``icpo.ops.linear_token_logprobs`` where the head is a plain linear layer (no
        ``[B, C, V]`` logits; icpo.trainer.scoring.lm_head_logprobs)."""
        model = self.accelerator.unwrap_model(self.model)
        if callable(getattr(model, "get_base_model", None)):  # PEFT: adapters stay active
            model = model.get_base_model()
        body, head = decoder_body(model), model.get_output_embeddings()
        prompt_ids, completion_ids = out["prompt_ids"], out["completion_ids"]
        ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attn = torch.cat([out["prompt_mask"], out["completion_mask"]], dim=1)
        C = completion_ids.size(1)
        labels = completion_ids.masked_fill(out["completion_mask"] == 0, -100)
        chunk = self.args.per_device_train_batch_size
        rows = []
        for s in range(0, ids.size(0), chunk):
            hidden = body(input_ids=ids[s:s + chunk], attention_mask=attn[s:s + chunk],
                          use_cache=False).last_hidden_state[:, -C - 1:-1]
            # cast_lm_head_to_fp32 keeps the head in fp32 under a bf16 body
            logp, _ = lm_head_logprobs(model, hidden.to(head.weight.dtype), labels[s:s + chunk],
                                       self.temperature, with_entropy=False)
            rows.append(logp)
        return torch.cat(rows)


__all__ = ["ICPOConfig", "ICPOTrainer", "TESTED_TRL_VERSIONS"]
