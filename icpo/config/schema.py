"""Run configuration: one dataclass per concern, loaded from YAML plus dotted overrides.

``load_config("run.yaml", ["actor.lr=1e-5", "data.train_files=[a.jsonl,b.jsonl]"])`` starts
from the defaults below (the paper's Table 6 values where the paper gives one), merges the YAML
mapping onto them recursively, applies the overrides (each value read as YAML), then
:func:`~icpo.config.load.validate` checks every field's type and range and the cross-field
rules. Every failure is a :class:`ConfigError` naming the dotted field, the bad value and what is
allowed, raised before any work starts. Unknown keys are errors too, with a close-match
suggestion.

This module is the bottom of :mod:`icpo.config`: the dataclasses, the ``Literal`` aliases of the
names a field allows (the lower layers take their tuples of allowed names from these with
``typing.get_args``, so each list is written once) and :func:`describe`. It imports nothing from
icpo; ``load.py`` (reading, checking, saving) and ``doc.py`` (the generated reference) import it.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Union

Algorithm = Literal["icpo", "grpo"]
Confidence = Literal["mean_logprob", "log_mean_prob"]
StdScope = Literal["group", "batch"]
GroupOfOne = Literal["zero", "reward"]
OmegaSchedule = Literal["warmup_decay", "warmup_retention", "linear_decay", "constant"]
AggMode = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum",
                  "seq-mean-token-sum-norm", "grpo", "bnpo", "dr_grpo", "dapo"]
KLEstimator = Literal["k3", "k1", "k2"]
ISLevel = Literal["token", "sequence"]
FilterMetric = Literal["acc", "score", "seq_reward"]
RolloutISMode = Literal["truncate", "mask"]
Engine = Literal["auto", "hf", "vllm"]
FusedLinear = Literal["auto", "on", "off"]


class ConfigError(ValueError):
    """An invalid, mistyped or unknown config entry; the message names the dotted field."""


@dataclass
class ModelConfig:
    path: str = "icpo/tiny"
    """Hugging Face model folder or hub-style id; "icpo/tiny" is the bundled tiny model."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Weights dtype; "auto" = bfloat16 on CUDA, float32 on CPU."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward to save memory."""
    attn_implementation: str | None = None
    """Passed to ``from_pretrained`` (e.g. "sdpa", "flash_attention_2"); None = library default."""
    ref_path: str | None = None
    """Frozen reference model for the KL term; None = same as ``path`` (with LoRA: the policy
    with its adapters off, no second copy loaded)."""
    lora_rank: int = 0
    """Rank of the LoRA adapters trained through PEFT instead of every weight (verl's
    model.lora_rank; TRL's peft_config); 0 = full fine-tuning (docs/lora.md)."""
    lora_alpha: float = 16.0
    """LoRA scale: the update B·A is multiplied by lora_alpha / lora_rank (verl's default)."""
    lora_dropout: float = 0.0
    """Dropout on the adapters' input while training, in [0, 1)."""
    target_modules: str | list[str] = "all-linear"
    """Layers that get adapters: "all-linear" (every linear layer but the LM head), a regex
    matched against module names, or a list of module names (e.g. [q_proj, v_proj])."""


@dataclass
class DataConfig:
    train_files: list[str] = field(default_factory=list)
    """Training prompts: .jsonl/.json/.parquet files in verl's schema."""
    val_files: list[str] = field(default_factory=list)
    """Held-out prompts for ``val/accuracy``; empty = no evaluation."""
    prompt_key: str = "prompt"
    """Dotted path of the prompt (chat messages or text) in each record."""
    answer_key: str = "reward_model.ground_truth"
    """Dotted path of the ground-truth answer in each record."""
    max_prompt_length: int = 2048
    """Longest prompt in tokens, after the template is applied."""
    overlong_prompts: Literal["skip", "error"] = "skip"
    """Over-long prompts are skipped and counted, or raise an error."""
    template: Literal["r1", "none"] = "r1"
    """"r1" adds the Table 5 system prompt; "none" uses the prompt as given."""
    shuffle: bool = True
    """Shuffle the training prompts each epoch."""
    seed: int = 1
    """Seed of the prompt order."""
    val_max_samples: int | None = None
    """Evaluate on at most this many held-out prompts; None = all."""


@dataclass
class RolloutConfig:
    engine: Engine = "auto"
    """Generation backend; "auto" = vLLM when CUDA is present and vllm imports, else HF generate."""
    n: int = 5
    """Group size G: responses sampled per prompt."""
    allow_single_sample: bool = False
    """Allow n = 1. Group-relative advantages (GRPO, ICPO) of a group of one are 0, so such a
    run learns nothing from rewards; refused unless this is set."""
    temperature: float = 1.0
    """Sampling temperature for training rollouts (also used for the confidence log-probs);
    >= 1e-3 (colder is greedy decoding, which has no log-probs to train on)."""
    top_p: float = 1.0
    """Nucleus sampling threshold; 1.0 = off."""
    top_k: int = -1
    """Top-k sampling; -1 = off."""
    max_response_length: int = 3072
    """Longest response in tokens."""
    gpu_memory_utilization: float = 0.5
    """Fraction of GPU memory vLLM may take."""
    enable_sleep_mode: bool = True
    """Let vLLM release its memory while the trainer updates the weights."""
    val_n: int = 1
    """Responses per held-out prompt (mean@k accuracy)."""
    val_temperature: float = 0.0
    """Temperature for held-out evaluation; 0 = greedy."""
    seed: int | None = None
    """Sampling seed; None = derived from trainer.seed."""
    hf_batch_size: int = 64
    """Prompts per ``generate`` call on the HF engine."""


@dataclass
class OverlongBufferConfig:
    enable: bool = False
    """DAPO's soft overlong penalty (verl's reward_model.overlong_buffer): responses longer
    than rollout.max_response_length - len tokens (EOS included) get a penalty added to their
    reward, after the noise: min(-(L - (M - len)) / len * penalty_factor, 0)."""
    len: int = 0
    """Width of the buffer: the last len tokens before rollout.max_response_length; must be
    in [1, rollout.max_response_length] when enabled."""
    penalty_factor: float = 1.0
    """The penalty at the cap (falling linearly from 0 at M - len); >= 0."""


@dataclass
class RewardConfig:
    function: str = "icpo.rewards.verifiable:compute_score"
    """Reward function with verl's signature, as "pkg.mod:fn", "pkg.mod.fn" or "file.py:fn"."""
    answer_weight: float = 0.9
    """Weight of the answer reward in R_verif (Eq. 10)."""
    format_weight: float = 0.1
    """Weight of the format reward in R_verif (Eq. 10)."""
    noise_fraction: float = 0.0
    """Noisy-reward setting: fraction of responses per step given +-noise_magnitude (paper: 0.4)."""
    noise_magnitude: float = 0.3
    """Size of the reward noise (paper: 0.3)."""
    noise_seed: int = 0
    """Seed of the reward-noise generator."""
    drop_mixed_groups: bool = False
    """At every step, train only on the groups whose G rewards are all equal (a harsher setting
    than the paper's coarse-grained one, which filters the data once: ``icpo filter-coarse``)."""
    timeout_s: float = 60.0
    """Deadline of one reward call, in seconds (0 = none). The calls run in a forked child
    process that is killed at the deadline, so even a function stuck in C code ends; the run
    then stops with an error naming the sample, after saving the last finished step. 0 runs
    the function in the training process (for one that uses CUDA, threads or clients it
    started at import, which a fork does not carry over)."""
    overlong_buffer: OverlongBufferConfig = field(default_factory=OverlongBufferConfig)
    """Soft length penalty near the response cap (DAPO; docs/compat.md)."""


@dataclass
class OmegaConfig:
    schedule: OmegaSchedule = "warmup_decay"
    """Schedule of the preference-score weight omega (docs/algorithm.md, "omega over training")."""
    omega_max: float = 1.0
    """Peak omega."""
    omega_min: float = 0.0
    """Omega at the start (warm-up schedules) and at the last step (decay schedules)."""
    peak_fraction: float = 0.4
    """Fraction of training at which the warm-up schedules peak."""


@dataclass
class FilterGroupsConfig:
    enable: bool = False
    """Dynamic sampling (DAPO; verl's algorithm.filter_groups): drop the groups whose metric
    is the same for all rollout.n responses and generate further prompts until
    trainer.train_batch_size groups remain (the surplus of the last batch is dropped)."""
    metric: FilterMetric = "acc"
    """"acc": the answer is right (0/1); "score": the reward function's score; "seq_reward":
    the reward the advantages start from (score + noise + overlong penalty)."""
    max_num_gen_batches: int = 0
    """Most generation batches per step; 0 = no limit. Reaching it without a full batch stops
    the run with an error."""


@dataclass
class RolloutCorrectionConfig:
    rollout_is: ISLevel | None = None
    """Rollout correction (TIS; verl's algorithm.rollout_correction): weights
    pi_old / pi_rollout between the trainer's log-probs and the engine's sampling log-probs
    multiply the policy-gradient term, per "token" or per "sequence" (the product over the
    response); null = off (the mismatch metrics are logged anyway)."""
    rollout_is_threshold: float = 2.0
    """Upper bound of the weights (verl 2.0; TRL's vllm_importance_sampling_clip_max 3.0)."""
    rollout_is_mode: RolloutISMode = "truncate"
    """"truncate": weights clamped to the bounds (verl); "mask": weights outside the bounds
    set to 0 (TRL's *_mask modes)."""
    rollout_is_threshold_lower: float | None = None
    """Lower bound of the weights (TRL's vllm_importance_sampling_clip_min); null = none."""


@dataclass
class AlgorithmConfig:
    name: Algorithm = "icpo"
    """Advantage estimator; ICPO with omega = 0 equals GRPO."""
    delta: float | None = None
    """Eq. 9 scale; None = from the parameter count (0.5 < 4B, 0.4 4-8B, 0.3 > 8B)."""
    tau: float = 2.0
    """Eq. 11 clip: the bonus is at most |R_verif| / tau."""
    omega: OmegaConfig = field(default_factory=OmegaConfig)
    """Schedule of omega, the weight of the preference score."""
    scale_advantages: bool = True
    """Divide group-centred rewards by the std (Eq. 5; verl's norm_adv_by_std_in_grpo);
    False = Dr. GRPO style (TRL's scale_rewards="none")."""
    std_scope: StdScope = "group"
    """Std of each group (verl; TRL's scale_rewards="group") or of the whole batch (TRL's
    scale_rewards="batch"); the mean is always the group's."""
    unbiased_std: bool = False
    """Std with n - 1 (verl/TRL) instead of n (the paper's worked numbers)."""
    eps: float = 1e-6
    """Added to the std before dividing (verl 1e-6, TRL 1e-4)."""
    group_of_one: GroupOfOne = "zero"
    """Advantage of a group of one response: 0 (icpo, TRL) or R / (1 + eps) (verl)."""
    compat: Literal["verl", "trl"] | None = None
    """Start from a peer's conventions (std, eps, group of one, loss mode, dual-clip, entropy
    aggregation; docs/compat.md); explicit settings still win. None = icpo's defaults."""
    confidence: Confidence = "mean_logprob"
    """Confidence c_i: mean token log-prob or log of mean token prob (docs/algorithm.md step 3)."""
    filter_groups: FilterGroupsConfig = field(default_factory=FilterGroupsConfig)
    """Dynamic sampling (DAPO; docs/compat.md)."""
    rollout_correction: RolloutCorrectionConfig = field(default_factory=RolloutCorrectionConfig)
    """Importance weights between the rollout engine and the trainer (TIS; docs/compat.md)."""


@dataclass
class ActorConfig:
    lr: float = 1e-6
    """Peak learning rate (AdamW)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    lr_warmup_steps: int = 0
    """Linear learning-rate warm-up, in optimizer steps."""
    lr_schedule: Literal["constant", "cosine"] = "constant"
    """Learning rate after warm-up."""
    clip_low: float = 0.2
    """PPO clip: ratio >= 1 - clip_low; in [0, 1)."""
    clip_high: float = 0.2
    """PPO clip: ratio <= 1 + clip_high; above clip_low = clip-higher."""
    kl_coef: float = 0.001
    """beta of the KL penalty in the loss; 0 = no reference model loaded."""
    kl_estimator: KLEstimator = "k3"
    """KL estimator between policy and reference."""
    entropy_coef: float = 0.0
    """Entropy bonus coefficient (subtracted from the loss)."""
    loss_agg_mode: AggMode = "token-mean"
    """How per-token losses become one scalar: verl's agg_loss modes or TRL's loss types, each
    with its peer's arithmetic (docs/compat.md)."""
    entropy_agg_mode: str | None = None
    """Aggregation of the entropy bonus; None = loss_agg_mode (verl); "bnpo" = TRL's."""
    clip_ratio_c: float | None = None
    """Dual-clip (verl's clip_ratio_c, verl default 3): negative-advantage token losses capped
    at -A * clip_ratio_c; None = off."""
    importance_sampling_level: ISLevel = "token"
    """Ratio per token (PPO/GRPO) or per response from its mean log-ratio (GSPO; TRL's
    importance_sampling_level)."""
    mask_truncated: bool = False
    """No loss on responses the length cap cut off (TRL's mask_truncated_completions); they
    still count in their group's advantages and in the response count of the seq-mean modes."""
    ppo_mini_batch_size: int = 192
    """Prompts per optimizer step (train_batch_size / this = updates per rollout batch)."""
    ppo_epochs: int = 1
    """Passes over each rollout batch."""
    max_tokens_per_micro_batch: int = 16384
    """Token budget of one forward/backward over packed sequences."""
    grad_clip: float = 1.0
    """Global gradient-norm clip; 0 = off."""
    fused_linear: FusedLinear = "auto"
    """Log-probs and entropy straight from the last hidden states and the LM head's weight
    (icpo.ops.linear_token_logprobs: the [tokens, vocab] logits never exist, in scoring or the
    update). "auto" = where the head is a plain linear layer (tied or not, bias or not), else
    the full logits with a one-line note (e.g. logit soft-capping); "on" = an error for another
    head; "off" = always the full logits."""


@dataclass
class TrainerConfig:
    total_steps: int = 500
    """Rollout + update steps."""
    train_batch_size: int = 768
    """Prompts per step."""
    seed: int = 42
    """Seed of model init, sampling and dropout."""
    output_dir: str = "outputs/run"
    """Where metrics.jsonl, checkpoints and config.yaml go."""
    save_every: int = 50
    """Checkpoint every N steps; 0 = only at the end."""
    eval_every: int = 25
    """Held-out evaluation every N steps; 0 = off (also off without data.val_files)."""
    log_every: int = 1
    """Progress-bar figures, TensorBoard and W&B every N steps and at every evaluation
    (metrics.jsonl gets every step)."""
    zero_stage: Literal[0, 1, 2, 3] = 0
    """DeepSpeed ZeRO stage."""
    tensorboard: bool = False
    """Also log to TensorBoard under output_dir."""
    wandb_project: str | None = None
    """Also log to this W&B project; None = off."""
    progress_bar: bool = True
    """Show a progress bar on the console."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """"auto" = CUDA when available, else CPU."""
    max_skipped_steps: int = 3
    """Stop the run after this many consecutive optimizer steps skipped for a non-finite loss or
    gradient norm (docs/failure_behaviour.md)."""
    collapse_entropy_frac: float = 0.99
    """Stop the run when a step's mean token entropy reaches this fraction of log(vocab size),
    i.e. the policy has become uniform (after having been below it); 0 = off."""
    resume_total_steps: Literal["refuse", "rescale"] = "refuse"
    """On --resume with a different total_steps: "refuse", or "rescale" the omega and lr
    schedules to the new length (their value at the current step jumps)."""
    num_threads: int | None = None
    """torch intra-op CPU threads; None = OMP_NUM_THREADS if set, else a quarter of this
    process's share of the cores, at least 1 (see docs/install.md, "Threads")."""
    save_on_interrupt: bool = True
    """On Ctrl-C, write a checkpoint of the last finished step before exiting (code 130)."""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    """Policy and reference model."""
    data: DataConfig = field(default_factory=DataConfig)
    """Prompt datasets and template."""
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    """Sampling and the generation engine."""
    reward: RewardConfig = field(default_factory=RewardConfig)
    """Reward function, noise and the per-step mixed-group filter."""
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    """ICPO/GRPO advantage settings."""
    actor: ActorConfig = field(default_factory=ActorConfig)
    """Optimizer and policy loss."""
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    """Loop, logging, checkpoints, DeepSpeed."""

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (tuples as lists), safe for ``yaml.safe_dump`` and JSON."""
        return _plain(dataclasses.asdict(self))


def _plain(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


def describe(tp: Any) -> str:
    """What annotation ``tp`` allows, in words: the type column of docs/config.md and the
    "expected ..." of every type error."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (Union, types.UnionType):
        return " or ".join(describe(a) for a in args)
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return getattr(tp, "__name__", None) if origin is None else str(tp).replace("typing.", "")
