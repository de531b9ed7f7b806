"""Probing a model on task records before training: sample G responses per prompt, grade them,
and measure their confidence; count how often the correct response is the less confident.

Used by ``scripts/measure_premise.py`` (ICPO's premise on a model) and by the experiments'
coarse-data step (which prompts a base model answers all right or all wrong).
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

    prompts = [tok(build_prompt(tok, r["prompt"]), add_special_tokens=False)["input_ids"] for r in records]
    engine = HFRolloutEngine(model, tok, batch_size=batch_size)
    params = SamplingParams(n=g, temperature=temperature, max_new_tokens=max_new_tokens, seed=seed)
    batch = engine.generate(prompts, params)
    texts = tok.batch_decode(batch.response_ids, skip_special_tokens=True)
    truth = [r["reward_model"]["ground_truth"] for r in records for _ in range(g)]
    scores = [compute_score("", t, gt) for t, gt in zip(texts, truth)]
    correct = [s["acc"] == 1.0 for s in scores]
    return Graded(texts, correct, [s["score"] for s in scores], batch.prompt_ids, batch.response_ids, g)


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


def premise_pairs(confidence: list[float], correct: list[bool], group_size: int) -> dict:
    """Counts over the within-group (correct, wrong) pairs of consecutive groups of ``group_size``.

    Returns ``pairs``, ``correct_less_confident`` (pairs whose correct response has the strictly
    lower confidence), ``mixed_groups`` and ``top_is_correct`` (mixed groups whose most
    confident response is correct).
    """
    if len(confidence) != len(correct) or len(confidence) % group_size:
        raise ValueError(f"confidence/correct: expected equal lengths divisible by group_size "
                         f"{group_size}, got {len(confidence)} and {len(correct)}")
    out = {"pairs": 0, "correct_less_confident": 0, "mixed_groups": 0, "top_is_correct": 0}
    for start in range(0, len(confidence), group_size):
        conf, ok = confidence[start:start + group_size], correct[start:start + group_size]
        right = [c for c, k in zip(conf, ok) if k]
        wrong = [c for c, k in zip(conf, ok) if not k]
        if not right or not wrong:
            continue
        out["mixed_groups"] += 1
        out["top_is_correct"] += ok[max(range(group_size), key=conf.__getitem__)]
        out["pairs"] += len(right) * len(wrong)
        out["correct_less_confident"] += sum(r < w for r in right for w in wrong)
    return out


def bonus_at_cap(confidence: list[float], rewards: list[float], group_size: int, delta: float,
                 tau: float) -> list[bool]:
    """Per response: is ICPO's preference score at or above its clip |R| / tau (Eq. 9, 11), i.e.
    would the bonus be the cap rather than carry the score's ranking? Scores from the trainer's
    own advantage function at omega = 1."""
    from types import SimpleNamespace

    from icpo.algorithms import compute_advantages

    cfg = SimpleNamespace(name="icpo", delta=delta, tau=tau, scale_advantages=True, unbiased_std=False, eps=1e-6)
    out = compute_advantages(torch.tensor(confidence), torch.tensor(rewards), group_size, cfg, 1.0)
    caps = torch.tensor(rewards).abs() / tau
    return (out.scores >= caps).tolist()


def uniform_groups(graded: Graded) -> list[bool]:
    """Per record: True when its ``g`` samples are all correct or all wrong."""
    g, ok = graded.group_size, graded.correct
    return [len(set(ok[i:i + g])) == 1 for i in range(0, len(ok), g)]
