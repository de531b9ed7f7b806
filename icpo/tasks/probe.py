"""Probing a model on task records before training: sample G responses per prompt, grade them,
and measure their confidence (the trainer's).

Used by ``scripts/measure_premise.py`` (ICPO's premise on a model), which counts with the
trainer's own metrics (:func:`icpo.algorithms.premise.premise_metrics`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Graded:
    """``g`` consecutive samples per record: texts, correctness, and the token ids sampled."""

    texts: list[str]
    correct: list[bool]
    rewards: list[float]
    """The verifiable reward R_verif (``compute_score``'s score: answer and format)."""
    prompt_ids: list[list[int]]
    response_ids: list[list[int]]
    group_size: int


def load(model_path: str):
    """(model in eval mode, tokenizer) of a path or bundled id, float32 on CPU."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from icpo.models import resolve_model_path

    path = resolve_model_path(model_path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(path)


def sample_graded(model, tok, records: list[dict], g: int, seed: int, max_new_tokens: int = 64,
                  temperature: float = 1.0, batch_size: int = 64) -> Graded:
    """Samples ``g`` responses per record (R1 template, our HF engine) and grades each by its
    answer (``compute_score``'s ``acc`` against ``reward_model.ground_truth``)."""
    from icpo.data.templates import build_prompt
    from icpo.rewards.verifiable import compute_score
    from icpo.rollout.base import SamplingParams
    from icpo.rollout.hf import HFRolloutEngine

    prompts = [tok(build_prompt(tok, r["prompt"]), add_special_tokens=False)["input_ids"]
               for r in records]
    engine = HFRolloutEngine(model, tok, batch_size=batch_size)
    params = SamplingParams(n=g, temperature=temperature, max_new_tokens=max_new_tokens, seed=seed)
    batch = engine.generate(prompts, params)
    texts = tok.batch_decode(batch.response_ids, skip_special_tokens=True)
    truth = [r["reward_model"]["ground_truth"] for r in records for _ in range(g)]
    scores = [compute_score("", t, gt) for t, gt in zip(texts, truth)]
    correct = [s["acc"] == 1.0 for s in scores]
    return Graded(texts, correct, [s["score"] for s in scores], batch.prompt_ids,
                  batch.response_ids, g)


@torch.no_grad()
def response_confidence(model, prompts: list[list[int]], responses: list[list[int]],
                        batch: int = 64) -> list[float]:
    """Mean token log-prob of each response given its prompt at temperature 1, the trainer's
    confidence (``confidence_from_logprobs``, kind ``mean_logprob``)."""
    from icpo.algorithms import confidence_from_logprobs

    out: list[float] = []
    for s in range(0, len(prompts), batch):
        pairs = list(zip(prompts[s:s + batch], responses[s:s + batch]))
        width = max(len(p) + len(r) for p, r in pairs)
        ids = torch.zeros(len(pairs), width, dtype=torch.long)
        for i, (p, r) in enumerate(pairs):
            ids[i, :len(p) + len(r)] = torch.tensor(p + r)
        logp = torch.log_softmax(model(input_ids=ids).logits.float(), dim=-1)
        packed, cu = [], [0]
        for i, (p, r) in enumerate(pairs):
            pos = torch.arange(len(p) - 1, len(p) + len(r) - 1)
            packed.append(logp[i, pos, torch.tensor(r)])
            cu.append(cu[-1] + len(r))
        out += confidence_from_logprobs(torch.cat(packed), torch.tensor(cu)).tolist()
    return out
