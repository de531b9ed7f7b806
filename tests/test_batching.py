"""Packing and token-budget micro-batching, and packed scoring == one-sample-at-a-time scoring."""

import pytest
import torch

from icpo.trainer.batching import micro_batches, pack_samples, token_budget_groups
from icpo.trainer.scoring import response_logprobs


def test_pack_positions_and_labels():
    prompts, responses = [[1, 2, 3], [4]], [[5, 6], [7, 8, 9]]
    b = pack_samples(prompts, responses, [0, 1])
    assert b.input_ids.tolist() == [1, 2, 3, 5, 6, 4, 7, 8, 9]
    assert b.position_ids.tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3]
    # logits at position t predict token t+1: response tokens 5, 6 are scored at 2, 3.
    assert b.score_positions.tolist() == [2, 3, 5, 6, 7]
    assert b.input_ids[b.score_positions + 1].tolist() == b.labels.tolist() == [5, 6, 7, 8, 9]
    assert b.resp_cu_seqlens.tolist() == [0, 2, 5]


def test_pack_rejects_empty_response():
    with pytest.raises(ValueError, match="sample 1"):
        pack_samples([[1], [2]], [[3], []], [0, 1])


@pytest.mark.parametrize("budget", [1, 5, 7, 100])
def test_token_budget_groups_cover_all_in_order(budget):
    lengths = [3, 4, 2, 6, 1, 5]
    groups = token_budget_groups(lengths, budget)
    assert [i for g in groups for i in g] == list(range(len(lengths)))
    for g in groups:
        assert len(g) == 1 or sum(lengths[i] for i in g) <= budget
    with pytest.raises(ValueError, match="max_tokens"):
        token_budget_groups(lengths, 0)


def test_packed_scoring_matches_unpacked(tiny_random_model_dir):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_random_model_dir, dtype=torch.float32).eval()
    V = model.config.vocab_size
    prompts = [torch.randint(0, V, (n,)).tolist() for n in (5, 1, 9)]
    responses = [torch.randint(0, V, (n,)).tolist() for n in (4, 7, 1)]
    batches = micro_batches(prompts, responses, [0, 1, 2], max_tokens=12)
    assert len(batches) == 3
    temperature = 0.7
    with torch.no_grad():
        packed = torch.cat([response_logprobs(model, b, temperature)[0] for b in batches])
        one_batch = response_logprobs(model, pack_samples(prompts, responses, [0, 1, 2]), temperature)[0]
        expected = []
        for p, r in zip(prompts, responses):
            logits = model(torch.tensor([p + r])).logits[0].float() / temperature
            logz = torch.log_softmax(logits[len(p) - 1:-1], dim=-1)
            expected.append(logz.gather(-1, torch.tensor(r)[:, None]).squeeze(-1))
    expected = torch.cat(expected)
    torch.testing.assert_close(packed, expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(one_batch, expected, atol=1e-4, rtol=1e-4)
