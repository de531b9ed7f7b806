"""The GRPO / ICPO training loop: rollout, score, advantages, PPO updates, sync, log, save.

One step (docs/architecture.md): sample G responses per prompt; verifiable rewards (+ optional
noise / overlong penalty / mixed-group drop; dynamic sampling draws further batches until
enough groups have reward spread: icpo/trainer/peer_features.py); old log-probs and entropy
with the fused kernel on packed sequences; confidence = segment mean of old log-probs;
reference log-probs; ICPO or GRPO advantages; ``ppo_epochs`` passes over mini-batches of
``ppo_mini_batch_size`` prompts, each a DeepSpeed step over token-budget micro-batches
(icpo/trainer/update.py; with per-token loss weights and rollout-correction weights when set);
weights pushed to the rollout engine.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path
from typing import Any

import torch

from icpo import ops
from icpo.algorithms import (
    broadcast_to_tokens,
    compute_advantages,
    confidence_from_logprobs,
    default_delta,
    omega_at,
)
from icpo.algorithms.premise import premise_metrics
from icpo.config import Config, save_config
from icpo.data import PromptDataset, PromptSampler
from icpo.errors import RewardError, UserError
from icpo.models import resolve_model_path
from icpo.models.loading import load_tokenizer
from icpo.rewards import RewardFn, add_reward_noise, uniform_group_mask
from icpo.rollout import RolloutBatch, SamplingParams, check_engine_available, make_rollout_engine
from icpo.runtime import apply_num_threads
from icpo.trainer import checkpoint as ckpt
from icpo.trainer import distributed as dist
from icpo.trainer.batching import micro_batches
from icpo.trainer.evaluate import evaluate
from icpo.trainer.guard import Guard
from icpo.trainer.interrupt import InterruptGuard, TrainingInterrupted, stop_report
from icpo.trainer.metrics import MetricsLogger, tensor_stats
from icpo.trainer.peer_features import Rewarded, draw_rollouts, loss_weights, overlong_penalty_of
from icpo.trainer.preflight import preflight
from icpo.trainer.run_folder import find_resumable
from icpo.trainer.scoring import response_logprobs, score_all, use_fused_linear
from icpo.trainer.setup import build_training_models
from icpo.trainer.update import PolicyUpdate, ScoredRollout


def step_seed(seed: int, step: int, rank: int, draw: int = 0) -> int:
    """A per-(step, rank) seed: every step's randomness is a function of where it is, so a
    resumed run draws exactly what an uninterrupted one would. ``draw``: the generation batch
    of the step (dynamic sampling draws several), so each gets its own."""
    return (seed * 1_000_003 + step * 7919 + rank * 104_729 + draw * 15_485_863) % (2**63 - 1)


class Trainer:
    """Trains ``cfg.model.path`` with ``cfg.algorithm.name`` (``icpo`` or ``grpo``).

    ``resume``: "auto" (newest checkpoint in ``output_dir``) or a checkpoint folder;
    ``overwrite``: replace the run files of another run in ``output_dir`` (else refused)."""

    def __init__(self, cfg: Config, resume: str | None = None, overwrite: bool = False):
        self.cfg = cfg
        # Before any set-up: a bad input ends every rank alike, before the model loads.
        pre = preflight(cfg, resume=resume, overwrite=overwrite)
        check_engine_available(cfg.rollout.engine)  # before any model or process group
        apply_num_threads(cfg.trainer.num_threads)
        self.rank, self.world, self.device = dist.init_distributed(cfg.trainer.device)
        ckpt.check_ranks_agree(pre.checkpoint, pre.trainer_state)
        self._updating = False  # the model is between two steps (see icpo/trainer/interrupt.py)
        self._step_start_sampler = None  # the sampler's state where the running step began
        self.output_dir = Path(cfg.trainer.output_dir)
        torch.manual_seed(cfg.trainer.seed)
        self.tokenizer = load_tokenizer(cfg.model.path)
        self.train_data = PromptDataset(pre.train_records, self.tokenizer, cfg.data)
        self.data_fingerprint = pre.data_fingerprint
        self.val_data = None
        if pre.val_records is not None:
            self.val_data = PromptDataset(pre.val_records, self.tokenizer, cfg.data)
        skipped = self.train_data.num_skipped + (self.val_data.num_skipped if self.val_data else 0)
        if skipped and self.rank == 0:
            print(f"icpo: warning: skipped {self.train_data.num_skipped} training and "
                  f"{skipped - self.train_data.num_skipped} held-out prompts longer than "
                  f"data.max_prompt_length={cfg.data.max_prompt_length} tokens "
                  "(data.overlong_prompts=error refuses them instead)", file=sys.stderr)
        if cfg.trainer.train_batch_size % self.world:
            raise UserError(f"trainer.train_batch_size={cfg.trainer.train_batch_size} must be "
                             f"divisible by the number of processes ({self.world})")
        self.local_prompts = cfg.trainer.train_batch_size // self.world
        # ZeRO-3 gathers parameters collectively in every forward: ranks run forwards in step.
        self.lockstep = self.world > 1 and cfg.trainer.zero_stage == 3
        self.mini_prompts = max(1, cfg.actor.ppo_mini_batch_size // self.world)
        minis = cfg.trainer.train_batch_size // cfg.actor.ppo_mini_batch_size
        self.models = build_training_models(cfg, self.device,
                                            cfg.trainer.total_steps * minis * cfg.actor.ppo_epochs)
        # actor.fused_linear=on with a head the op cannot fuse ends the run here, not at step 1
        use_fused_linear(self.models.actor.module, cfg.actor.fused_linear, cfg.rollout.temperature)
        self.delta = (cfg.algorithm.delta if cfg.algorithm.delta is not None
                      else default_delta(self.models.num_params))
        self.sampler = PromptSampler(len(self.train_data), cfg.trainer.train_batch_size,
                                     cfg.data.shuffle, cfg.data.seed)
        self.reward_fn = RewardFn(cfg.reward)
        self.rollout = make_rollout_engine(cfg, self.models.actor.module, self.tokenizer,
                                           zero_stage=cfg.trainer.zero_stage,
                                           model_path=resolve_model_path(cfg.model.path))
        self.step = 0
        self.guard = Guard(cfg.trainer.max_skipped_steps, cfg.trainer.collapse_entropy_frac,
                           self.models.actor.module.config.vocab_size)
        self.policy_update = PolicyUpdate(cfg, self.models, self.guard, self.device,
                                          self.tokenizer.pad_token_id, world=self.world,
                                          mini_prompts=self.mini_prompts, lockstep=self.lockstep)
        if pre.checkpoint is not None:
            state = ckpt.load_checkpoint(pre.checkpoint, self.models.actor)
            self.step = state["step"]
            self.sampler.load_state_dict(state["sampler"])
            self.guard.load_state_dict(state.get("guard", {}))
            self._sync_weights()
        self.logger = MetricsLogger(
            self.output_dir, enabled=self.rank == 0, total_steps=cfg.trainer.total_steps,
            start_step=self.step, tensorboard=cfg.trainer.tensorboard,
            wandb_project=cfg.trainer.wandb_project, progress_bar=cfg.trainer.progress_bar,
            log_every=cfg.trainer.log_every, resumed=pre.checkpoint is not None,
            config=cfg.to_dict())
        if self.rank == 0:
            save_config(cfg, self.output_dir / "config.yaml")

    # ---------------------------------------------------------------- phases of one step
    def _sampling(self, step: int, draw: int = 0) -> SamplingParams:
        return SamplingParams.from_config(
            self.cfg.rollout, seed=step_seed(self.sampling_seed, step, self.rank, draw))

    @property
    def sampling_seed(self) -> int:
        """rollout.seed when set, else trainer.seed."""
        seed = self.cfg.rollout.seed
        return self.cfg.trainer.seed if seed is None else seed

    def _generate(self, step: int, draw: int = 0) -> RolloutBatch:
        batch = self.sampler.next_batch()  # each draw its own prompts, in the sampler's state
        mine = batch[self.rank * self.local_prompts:(self.rank + 1) * self.local_prompts]
        items = [self.train_data.items[i] for i in mine]
        self.rollout.wake_up()
        out = self.rollout.generate([it.prompt_ids for it in items], self._sampling(step, draw))
        self.rollout.sleep()
        n = self.cfg.rollout.n
        return dataclasses.replace(out, records=[items[i // n].record for i in range(len(out))])

    def _rewards(self, ro: RolloutBatch, step: int, draw: int = 0) -> Rewarded:
        """Score, + noise, + the overlong penalty; counts become fractions over all ranks in
        float64, so the noised share reads exactly round(f * N) / N."""
        texts = self.tokenizer.batch_decode(ro.response_ids, skip_special_tokens=True)
        rb = self.reward_fn(ro.records, texts)
        rewards, counts = rb.score.float(), {}
        r = self.cfg.reward
        if r.noise_fraction > 0:
            gen = torch.Generator().manual_seed(step_seed(r.noise_seed, step, self.rank, draw))
            rewards, noised = add_reward_noise(rewards, r.noise_fraction, r.noise_magnitude, gen)
            counts["reward/noised_frac"] = (noised.sum().item(), noised.numel())
        if r.overlong_buffer.enable:  # after the noise, as verl adds it to the score
            penalty, num = overlong_penalty_of(self.cfg, ro)
            rewards = rewards + penalty
            counts["reward/overlong_penalized_frac"] = (num, len(ro))
        return Rewarded(rewards, rb.acc.float(), rb.score.float(), counts)

    def _keep_groups(self, ro: RolloutBatch, rewards: torch.Tensor, acc: torch.Tensor):
        """``reward.drop_mixed_groups``: keep only groups whose G rewards are all equal."""
        n = self.cfg.rollout.n
        keep = uniform_group_mask(rewards, n)
        idx = [i for g in torch.nonzero(keep).flatten().tolist() for i in range(g * n, (g + 1) * n)]
        kept = dist.all_reduce_sum(torch.tensor([keep.sum().item(), keep.numel()]))  # all ranks
        return ro.select(idx), rewards[idx], acc[idx], (kept[0] / kept[1]).item()

    def _update(self, scored: ScoredRollout, step: int) -> dict:
        """The PPO updates of this step (icpo/trainer/update.py)."""
        seed = step_seed(self.cfg.trainer.seed + 1, step, self.rank)  # mini-batch order
        return self.policy_update(scored, step, seed)

    def _sync_weights(self) -> None:
        """Bring the rollout engine up to the updated policy (a no-op for the HF engine, which
        samples from the live module, adapters on). With LoRA, vLLM gets W + B·A·alpha/r in new
        tensors under the base model's names; the trainer's weights stay as they are."""
        parameters = None
        if self.models.lora:
            from icpo.models.lora import iter_merged_parameters

            parameters = iter_merged_parameters
        self.rollout.sync_from(self.models.actor.module, self.cfg.trainer.zero_stage,
                               parameters=parameters)

    # ---------------------------------------------------------------- the step
    def train_step(self) -> dict[str, Any]:
        cfg, step, t = self.cfg, self.step, {}
        torch.manual_seed(step_seed(cfg.trainer.seed, step, self.rank))
        is_icpo = cfg.algorithm.name == "icpo"
        omega = omega_at(step, cfg.trainer.total_steps, cfg.algorithm.omega) if is_icpo else 0.0
        t0 = time.perf_counter()
        # one generation batch, or dynamic sampling's several; drop_mixed_groups' filter
        ro, rewards, acc, metrics = draw_rollouts(self, step, t)
        # All ranks learn or none: the update's collectives need every rank, also one whose
        # groups drop_mixed_groups dropped.
        if dist.all_reduce_sum(torch.tensor([float(len(ro.response_ids))])).item() > 0:
            metrics.update(self._learn(ro, rewards, acc, omega, t, step))
        t1 = time.perf_counter()
        self._sync_weights()
        t["time/sync"] = time.perf_counter() - t1  # vLLM's reload (ZeRO-3: with its gathers)
        t["time/step"] = time.perf_counter() - t0
        n_tokens = dist.all_reduce_sum(torch.tensor([float(sum(map(len, ro.response_ids)))]))
        metrics["perf/tokens_per_s"] = n_tokens.item() / t["time/step"]
        metrics["omega"], metrics["delta"] = omega, self.delta
        metrics["guard/skipped_total"] = float(self.guard.total)
        metrics["data/skipped_prompts"] = float(self.train_data.num_skipped)
        return {**metrics, **t}

    def _score(self, ro: RolloutBatch, rewards, omega: float, t: dict):
        """Old and reference log-probs, confidence and advantages of this rank's samples:
        ``(scored, confidence, entropy, advantages)`` (the last: compute_advantages' result)."""
        cfg, n = self.cfg, self.cfg.rollout.n
        batches = micro_batches(ro.prompt_ids, ro.response_ids, list(range(len(ro))),
                                cfg.actor.max_tokens_per_micro_batch)
        batches = [b.to(self.device) for b in batches]
        actor, temperature = self.models.actor.module, cfg.rollout.temperature
        fused = cfg.actor.fused_linear  # icpo.trainer.scoring.use_fused_linear
        t0 = time.perf_counter()
        reuse, most = self.policy_update.scoring_plan(len(ro), len(batches))
        forward = None
        if reuse:  # the update's own forward, run once with grad (PolicyUpdate.scoring_plan)
            forward = response_logprobs(actor, batches[0], temperature, lockstep=self.lockstep,
                                        fused_linear=fused)
            old_logp, entropy = forward[0].detach(), forward[1].detach()
        else:
            old_logp, entropy = score_all(actor, batches, temperature, lockstep_batches=most,
                                          fused_linear=fused)
        resp_cu = torch.zeros(len(ro) + 1, dtype=torch.int64)
        resp_cu[1:] = torch.tensor([len(r) for r in ro.response_ids]).cumsum(0)
        t["time/old_logprob"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        ref_logp = None
        if self.models.reference is not None:
            with self.models.reference_mode():  # LoRA: the policy itself, adapters off
                ref_logp, _ = score_all(self.models.reference, batches, temperature,
                                        with_entropy=False, lockstep_batches=most,
                                        fused_linear=fused)
            ref_logp = ref_logp.cpu()
        t["time/ref_logprob"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        old_logp, entropy = old_logp.cpu(), entropy.cpu()
        confidence = torch.zeros(0)  # a rank whose groups drop_mixed_groups all dropped
        if len(ro):
            confidence = confidence_from_logprobs(old_logp, resp_cu, cfg.algorithm.confidence)
        algo = dataclasses.replace(cfg.algorithm, delta=self.delta)
        adv = compute_advantages(confidence, rewards, n, algo, omega,
                                 gather=dist.all_gather_floats)
        scored = ScoredRollout(ro, old_logp, ref_logp, broadcast_to_tokens(adv.advantages, resp_cu),
                               resp_cu, forward)
        t["time/advantages"] = time.perf_counter() - t0
        return scored, confidence, entropy, adv

    def _learn(self, ro: RolloutBatch, rewards, acc, omega: float, t: dict, step: int) -> dict:
        cfg, n = self.cfg, self.cfg.rollout.n
        scored, confidence, entropy, adv = self._score(ro, rewards, omega, t)
        weight_metrics = loss_weights(cfg, scored)  # mask_truncated, rollout correction
        t0 = time.perf_counter()
        self._updating = True  # from here until the step is counted, Ctrl-C waits for it
        metrics = self._update(scored, step)
        metrics.update(weight_metrics)
        t["time/update"] = time.perf_counter() - t0
        metrics.update(tensor_stats("icpo/score", dist.all_gather_floats(adv.scores)))
        metrics.update(tensor_stats("reward/final", dist.all_gather_floats(adv.rewards)))
        metrics.update(tensor_stats("advantage", dist.all_gather_floats(adv.advantages)))
        all_conf = dist.all_gather_floats(confidence)
        metrics.update(tensor_stats("confidence", all_conf))
        # How far apart the confidences of one prompt's responses are: what ICPO's pairwise
        # scores see (the batch std above also counts differences between prompts).
        group_std = all_conf.view(-1, n).std(dim=1, correction=0)
        metrics["confidence/group_std"] = group_std.mean().item()
        ent = dist.all_reduce_sum(torch.tensor([entropy.double().sum().item(), entropy.numel()]))
        metrics["entropy"] = (ent[0] / ent[1]).item()
        # Does ICPO's premise hold here? (GRPO: the scores ICPO would use)
        scores = adv.scores if cfg.algorithm.name == "icpo" else ops.preference_scores(
            confidence, n, delta=self.delta)
        metrics.update(premise_metrics(
            all_conf, dist.all_gather_floats(acc) > 0.5, dist.all_gather_floats(rewards),
            dist.all_gather_floats(scores), n, cfg.algorithm.tau))
        return metrics

    def _rollout_metrics(self, ro: RolloutBatch, rewards, acc) -> dict[str, float]:
        n = self.cfg.rollout.n
        all_rewards = dist.all_gather_floats(rewards)
        per_sample = ([len(r) for r in ro.response_ids], [f == "length" for f in ro.finish_reasons])
        lengths, clipped = (dist.all_gather_floats(torch.tensor(xs, dtype=torch.float64))
                            for xs in per_sample)
        uniform = all_rewards.view(-1, n).std(dim=1, correction=0) == 0
        return {"reward/mean": all_rewards.mean().item(),
                "reward/std": all_rewards.std(correction=0).item(),
                "accuracy": dist.all_gather_floats(acc).mean().item(),
                "response_length/mean": lengths.mean().item(),
                "response_length/max": lengths.max().item(),
                "response_length/clip_ratio": clipped.mean().item(),
                "zero_std_group_frac": uniform.double().mean().item()}

    # ---------------------------------------------------------------- the run
    def evaluate(self) -> float:
        """mean@val_n accuracy of the current policy on the held-out prompts."""
        return evaluate(self.rollout, self.tokenizer, self.val_data, self.reward_fn,
                        self.cfg.rollout, rank=self.rank, world=self.world)

    def _probe_logits(self) -> torch.Tensor:
        """Logits (at the rollout temperature) of the policy on the start of a training prompt;
        every rank runs it, as ZeRO-3 gathers parameters collectively."""
        ids = torch.tensor([self.train_data.items[0].prompt_ids[:32]], device=self.device)
        with torch.no_grad():
            return self.models.actor.module(input_ids=ids).logits / self.cfg.rollout.temperature

    def save(self) -> Path:
        """Checkpoint the current step; refused (TrainingStopped, nothing written, ``latest``
        unchanged) when the policy's weights or outputs are non-finite or uniform."""
        self.guard.check_checkpointable(self.step, self.models.actor.module, self._probe_logits())
        state = {"step": self.step, "sampler": self.sampler.state_dict(),
                 "config": self.cfg.to_dict(),
                 "data_fingerprint": self.data_fingerprint, "guard": self.guard.state_dict(),
                 "world_size": self.world}
        return ckpt.save_checkpoint(self.output_dir / "checkpoints", self.step, self.models.actor,
                                    self.tokenizer, state)

    def close(self) -> None:
        """End of the run: leave the process group (every rank calls this once, last)."""
        dist.shutdown()

    def train(self) -> list[dict[str, Any]]:
        """Run to ``trainer.total_steps``; returns the logged metrics of the steps run here.
        Ctrl-C or SIGTERM raises :class:`TrainingInterrupted` after saving, a failing reward
        function its RewardError after saving (icpo/trainer/interrupt.py)."""
        cfg, history = self.cfg.trainer, []
        guard = InterruptGuard(lambda: self._updating, world=self.world, rank=self.rank)
        try:
            with guard:
                if self.step == 0 and self.val_data is not None and cfg.eval_every:
                    before = {"val/accuracy": self.evaluate()}
                    self.logger.log(0, before, advance=False)
                    history.append({"step": 0, **before})
                while self.step < cfg.total_steps and not guard.should_stop():
                    self._step_start_sampler = self.sampler.state_dict()
                    metrics = self.train_step()
                    self.step += 1
                    self._updating, self._step_start_sampler = False, None
                    last = self.step == cfg.total_steps
                    due = cfg.eval_every and (self.step % cfg.eval_every == 0 or last)
                    if self.val_data is not None and due:
                        metrics["val/accuracy"] = self.evaluate()
                    self.logger.log(self.step, metrics)
                    history.append({"step": self.step, **metrics})
                    self.guard.check_policy(self.step, metrics.get("entropy"),
                                            self.models.actor.module)
                    if last or (cfg.save_every and self.step % cfg.save_every == 0):
                        self.save()
                if guard.requested and self.step < cfg.total_steps:
                    raise KeyboardInterrupt
        except KeyboardInterrupt:
            self.logger.close()
            raise self._interrupted(guard) from None
        except RewardError as e:  # the user's function: keep the last finished step, as Ctrl-C
            self.logger.close()
            raise self._interrupted(guard, e) from None
        finally:
            self.logger.close()
        return history

    def _latest_checkpoint(self) -> Path | None:
        """The checkpoint ``latest`` names, or None (none yet, or ``latest`` is unusable)."""
        try:
            return find_resumable(self.output_dir)
        except UserError:
            return None

    def _interrupted(self, guard: InterruptGuard,
                     error: Exception | None = None) -> TrainingInterrupted | Exception:
        """After a signal or a RewardError: save when the state is that of a finished step,
        say so in one line (icpo.trainer.interrupt.stop_report)."""
        return stop_report(self, guard, error)
