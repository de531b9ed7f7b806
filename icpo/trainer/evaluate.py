"""Held-out accuracy: mean@k over a prompt set, greedy (temperature 0) or sampled."""

from __future__ import annotations

import torch

from icpo.rollout import SamplingParams
from icpo.trainer import distributed as dist


def evaluate(engine, tokenizer, dataset, reward_fn, rollout_cfg, *, rank: int = 0, world: int = 1,
             seed: int = 0) -> float:
    """mean@k accuracy of ``engine`` on ``dataset``: every prompt answered ``val_n`` times at
    ``val_temperature`` (0 is greedy; :meth:`SamplingParams.from_config`), averaged over all
    answers. Prompts are split over ranks and the result is the same on every rank."""
    items = dataset.items[rank::world]
    params = SamplingParams.from_config(rollout_cfg, validation=True, seed=seed + rank)
    correct = torch.zeros(0)
    if items:
        engine.wake_up()
        out = engine.generate([it.prompt_ids for it in items], params)
        engine.sleep()
        texts = tokenizer.batch_decode(out.response_ids, skip_special_tokens=True)
        records = [items[i // params.n].record for i in range(len(texts))]
        correct = reward_fn(records, texts).acc.float()
    total = dist.all_reduce_sum(torch.tensor([correct.sum().item(), float(correct.numel())]))
    if total[1] == 0:
        raise ValueError("evaluation set is empty")
    return (total[0] / total[1]).item()
