"""One process of ``test_zero3_fused_head_matches_zero0`` (run under torchrun, two processes):
the trainer's policy update on fixed samples at ZeRO stage ``STAGE``, twice: ``separate`` (the
update's own forwards over several micro-batches, unequal across ranks) and ``reused`` (the
scoring forward, with grad, handed to the update). Each rank writes its loss metrics and the
full (reduced) gradient of every parameter to ``OUT/rank{r}.pt``.

    python -m torch.distributed.run --nproc_per_node 2 tests/_fused_zero_worker.py \\
        MODEL_DIR STAGE OUT
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from icpo import ops
from icpo.config import config_from_dict
from icpo.rollout import RolloutBatch
from icpo.trainer import distributed as dist
from icpo.trainer import setup
from icpo.trainer.batching import micro_batches
from icpo.trainer.guard import Guard
from icpo.trainer.scoring import response_logprobs, score_all
from icpo.trainer.update import PolicyUpdate, ScoredRollout

N, PROMPTS, T = 2, 2, 0.9  # responses per prompt, prompts per rank, temperature
FUSED = "on"


def _with_partitioned_head(real):
    """DeepSpeed keeps parameters under 1e5 elements whole on every rank at ZeRO-3; the test
    model's head is smaller, so that threshold is set to 0 to partition it."""
    def config(zero_stage, *a, **k):
        cfg = real(zero_stage, *a, **k)
        if zero_stage == 3:
            cfg["zero_optimization"]["stage3_param_persistence_threshold"] = 0
        return cfg
    return config


def samples(rank: int, vocab: int) -> RolloutBatch:
    """Rank 1's prompts and responses are longer than rank 0's: more micro-batches."""
    g = torch.Generator().manual_seed(100 + rank)
    ids = lambda n: torch.randint(  # noqa: E731  (a one-line helper)
        3, vocab, (n,), generator=g).tolist()
    prompt_lens, resp_lens = [6 + 4 * rank, 9], [5, 3 + 6 * rank, 7, 2]
    prompts = [ids(prompt_lens[i // N]) for i in range(PROMPTS * N)]
    for i in range(1, len(prompts), N):  # a group's responses share its prompt
        prompts[i] = prompts[i - 1]
    return RolloutBatch(prompts, [ids(n) for n in resp_lens], ["length"] * len(prompts))


def main(model_dir: str, stage: int, out: Path) -> None:
    cfg = config_from_dict({
        "model": {"path": model_dir, "dtype": "float32"},
        "rollout": {"n": N, "temperature": T},
        # lr 1e-12: the two variants run one after the other on (to fp32) the same weights
        "actor": {"lr": 1e-12, "kl_coef": 0.05, "entropy_coef": 0.01, "grad_clip": 0.0,
                  "ppo_mini_batch_size": 2 * PROMPTS, "fused_linear": FUSED},
        "trainer": {"zero_stage": stage, "device": "cpu", "train_batch_size": 2 * PROMPTS,
                    "total_steps": 1},
    })
    rank, world, device = dist.init_distributed("cpu")
    setup.deepspeed_config = _with_partitioned_head(setup.deepspeed_config)
    models = setup.build_training_models(cfg, device, 4)
    actor = models.actor
    head = actor.module.get_output_embeddings()
    partitioned = stage == 3 and head.weight.numel() == 0  # released outside its forward
    calls = []
    real_op = ops.linear_token_logprobs
    ops.linear_token_logprobs = lambda *a, **k: calls.append(1) or real_op(*a, **k)

    grads: list[dict[str, torch.Tensor]] = []
    real_take = actor._take_model_step

    def take_model_step(*a, **k):  # gradients reduced over ranks, before the optimizer
        from deepspeed.utils import safe_get_full_grad

        grads.append({n: safe_get_full_grad(p).detach().clone()
                      for n, p in actor.module.named_parameters()})
        return real_take(*a, **k)

    actor._take_model_step = take_model_step
    vocab = actor.module.config.vocab_size
    guard = Guard(3, 0.0, vocab)
    update = PolicyUpdate(cfg, models, guard, device, 0, world=world, mini_prompts=PROMPTS,
                          lockstep=stage == 3 and world > 1)
    ro = samples(rank, vocab)
    resp_cu = torch.zeros(len(ro) + 1, dtype=torch.int64)
    resp_cu[1:] = torch.tensor([len(r) for r in ro.response_ids]).cumsum(0)
    noise = torch.Generator().manual_seed(7 + rank)
    results = {}
    for variant, budget in (("separate", 24), ("reused", 4096)):
        cfg.actor.max_tokens_per_micro_batch = budget
        batches = micro_batches(ro.prompt_ids, ro.response_ids, list(range(len(ro))), budget)
        reuse, most = update.scoring_plan(len(ro), len(batches))
        assert reuse == (variant == "reused"), (variant, reuse, len(batches))
        forward = None
        if reuse:
            forward = response_logprobs(actor.module, batches[0], T, lockstep=update.lockstep,
                                        fused_linear=FUSED)
            logp = forward[0].detach()
        else:
            logp, _ = score_all(actor.module, batches, T, lockstep_batches=most,
                                fused_linear=FUSED)
        ref, _ = score_all(models.reference, batches, T, with_entropy=False,
                           lockstep_batches=most, fused_linear=FUSED)
        tokens = logp.numel()
        old = logp + 0.05 * torch.randn(tokens, generator=noise)  # ratios off 1, some clipped
        ref = ref + 0.1 * torch.randn(tokens, generator=noise)  # a KL with a gradient
        adv = torch.randn(len(ro), generator=noise).repeat_interleave(resp_cu.diff())
        scored = ScoredRollout(ro, old, ref, adv, resp_cu, forward)
        metrics = update(scored, step=0, seed=0)
        results[variant] = {"metrics": metrics, "grads": grads.pop(),
                            "micro_batches": len(batches)}
    torch.save({"results": results, "partitioned": partitioned, "fused_calls": len(calls)},
               out / f"rank{rank}.pt")
    dist.shutdown()


if __name__ == "__main__":
    FUSED = sys.argv[4] if len(sys.argv) > 4 else "on"
    main(sys.argv[1], int(sys.argv[2]), Path(sys.argv[3]))
