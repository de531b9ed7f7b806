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
        one_batch = response_logprobs(model, pack_samples(prompts, responses, [0, 1, 2]),
                                      temperature)[0]
        expected = []
        for p, r in zip(prompts, responses):
            logits = model(torch.tensor([p + r])).logits[0].float() / temperature
            logz = torch.log_softmax(logits[len(p) - 1:-1], dim=-1)
            expected.append(logz.gather(-1, torch.tensor(r)[:, None]).squeeze(-1))
    expected = torch.cat(expected)
    torch.testing.assert_close(packed, expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(one_batch, expected, atol=1e-4, rtol=1e-4)


def _grouped_samples(V, seed=0):
    """Groups of 4 responses per prompt (prompts of different lengths, one prompt repeated in
    two groups), responses of length 1 to 13 including ties."""
    gen = torch.Generator().manual_seed(seed)
    rand = lambda n: torch.randint(  # noqa: E731  (a one-line helper)
        0, V, (n,), generator=gen).tolist()
    base = [rand(n) for n in (40, 37, 45)]
    prompt_list = [base[0], base[1], base[2], base[0]]
    prompts, responses = [], []
    for p in prompt_list:
        for n in (1, 6, 13, 6):
            prompts.append(p)
            responses.append(rand(n))
    return prompts, responses


def test_shared_prefix_scoring_matches_per_sample(tiny_random_model_dir):
    """Each distinct prompt run once, its KV cache gathered for its responses: the same
    log-probs, entropies and parameter gradients as running every sample whole (float64)."""
    from transformers import AutoModelForCausalLM

    from icpo.trainer import scoring

    model = AutoModelForCausalLM.from_pretrained(tiny_random_model_dir, dtype=torch.float64)
    prompts, responses = _grouped_samples(model.config.vocab_size)
    batch = pack_samples(prompts, responses, list(range(len(prompts))))
    body, _ = scoring._body_and_head(model)
    assert scoring._shared_prefix_hidden(body, batch) is not None  # the shared path is taken
    results = {}
    for share in (False, True):
        model.zero_grad()
        logp, ent = response_logprobs(model, batch, 0.8, share_prefix=share)
        (logp.double() * torch.linspace(-1, 1, logp.numel(), dtype=torch.float64)).sum().add(
            0.5 * ent.sum()).backward()
        results[share] = (logp.detach(), ent.detach(),
                          {n: p.grad.clone() for n, p in model.named_parameters()})
    (lp0, e0, g0), (lp1, e1, g1) = results[False], results[True]
    torch.testing.assert_close(lp1, lp0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(e1, e0, atol=1e-5, rtol=1e-5)
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], atol=1e-6, rtol=1e-5, msg=name)


def test_shared_prefix_skipped_when_nothing_repeats_or_checkpointing(tiny_random_model_dir):
    from transformers import AutoModelForCausalLM

    from icpo.trainer import scoring

    model = AutoModelForCausalLM.from_pretrained(tiny_random_model_dir, dtype=torch.float32)
    body, _ = scoring._body_and_head(model)
    V = model.config.vocab_size
    distinct = [torch.randint(0, V, (30,)).tolist() for _ in range(4)]
    batch = pack_samples(distinct, [[1, 2, 3]] * 4, [0, 1, 2, 3])
    assert scoring._shared_prefix_hidden(body, batch) is None  # no prompt repeats
    assert scoring._can_share_prefix(body)
    model.gradient_checkpointing_enable()
    model.train()
    assert not scoring._can_share_prefix(body)  # transformers drops the cache under it
    model.eval()
    assert scoring._can_share_prefix(body)


def test_lockstep_scoring_runs_one_forward_per_batch(tiny_random_model_dir):
    """ZeRO-3 lockstep: one body forward per micro-batch (no buckets, no shared prefix), padded
    with filler forwards to the given count; the log-probs are those of the normal path."""
    from transformers import AutoModelForCausalLM

    from icpo.trainer import scoring

    model = AutoModelForCausalLM.from_pretrained(tiny_random_model_dir, dtype=torch.float32)
    prompts, responses = _grouped_samples(model.config.vocab_size)
    batches = micro_batches(prompts, responses, list(range(len(prompts))), max_tokens=2000)
    calls = []
    body, _ = scoring._body_and_head(model)
    handle = body.register_forward_hook(lambda *a: calls.append(1))
    try:
        normal, _ = scoring.score_all(model, batches, 1.0)
        assert len(calls) > len(batches)  # buckets / shared prefix: several forwards a batch
        calls.clear()
        locked, _ = scoring.score_all(model, batches, 1.0, lockstep_batches=len(batches) + 2)
        assert len(calls) == len(batches) + 2
        calls.clear()
        empty, _ = scoring.score_all(model, [], 1.0, lockstep_batches=3)
        assert len(calls) == 3 and empty.numel() == 0
    finally:
        handle.remove()
    torch.testing.assert_close(locked, normal, atol=1e-5, rtol=1e-5)
