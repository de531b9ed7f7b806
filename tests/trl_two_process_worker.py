"""Worker for tests/test_trl_integration.py::test_two_processes (run under torchrun, 2 ranks).

Each rank scores its own prompts with GRPOTrainer and ICPOTrainer (omega = 0 and omega = 1).
Rank 0 writes, as JSON, everything both ranks computed, gathered: the test checks that ICPO's
advantages were computed over the whole batch and sliced per process, as TRL does.
"""

import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, sys.argv[2])  # the tests folder
from test_trl_integration import (  # noqa: E402  (after sys.path gets the tests folder)
    MODEL,
    G,
    GRPOConfig,
    GRPOTrainer,
    ICPOConfig,
    ICPOTrainer,
    config,
    dataset,
    trl_confidence,
)


def brevity(completion_ids, **_):
    """A dense reward, so that every group has spread and ICPO's bonus is not capped to 0."""
    return [1.0 - len(c) / 32 for c in completion_ids]


def build(cls, args):
    tok, data = dataset(8)
    t = cls(model=MODEL, reward_funcs=brevity, args=args, train_dataset=data,
            processing_class=tok)
    t.model.train()
    t.current_gradient_accumulation_steps = 1
    t.state.max_steps = 10
    return t, data


def gather(x: torch.Tensor) -> list:
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts).tolist()


def main(out_path: str) -> None:
    torch.set_num_threads(1)
    tmp = out_path + ".d"
    runs = {}
    for name, cls, cfg_cls, kw in [
            ("grpo", GRPOTrainer, GRPOConfig, {}),
            ("icpo0", ICPOTrainer, ICPOConfig, dict(omega_max=0.0)),
            ("icpo1", ICPOTrainer, ICPOConfig, dict(omega_schedule="constant", omega_max=1.0,
                                                    icpo_delta=0.5)),
            ("icpo1_batch", ICPOTrainer, ICPOConfig, dict(omega_schedule="constant", omega_max=1.0,
                                                          icpo_delta=0.5, scale_rewards="batch"))]:
        t, data = build(cls, config(cfg_cls, tmp, **kw))
        rank = t.accelerator.process_index
        rows = [row for row in data.select(range(2 * rank, 2 * rank + 2)) for _ in range(G)]
        torch.manual_seed(123 + rank)
        out = t._generate_and_score_completions(rows)
        runs[name] = {"advantages": gather(out["advantages"].float()),
                      "confidence": gather(trl_confidence(t, out)),
                      "rewards": (t._rewards_all.sum(1).tolist() if name != "grpo" else None),
                      "world": t.accelerator.num_processes}
    if dist.get_rank() == 0:
        with open(out_path, "w") as f:
            json.dump(runs, f)


if __name__ == "__main__":
    main(sys.argv[1])
    # The same clean exit as icpo's launched ranks (icpo.trainer.distributed.exit_launched_process):
    # gloo's C++ teardown at interpreter exit aborts a rank now and then ("terminate called without
    # an active exception", -6) after all work is written, which torchrun reports as a failure.
    from icpo.trainer.distributed import shutdown

    shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
