"""Dynamic sampling, overlong shaping and rollout correction against the peers' formulas.

The peers' code is re-implemented here, independently and on their own layouts, from their
current sources: verl's DAPO recipe (``RayDAPOTrainer.fit``'s filter_groups loop, numpy
``np.std`` per uid), verl's ``DAPORewardManager`` overlong buffer, verl's
``compute_rollout_correction_weights`` / ``compute_is_metrics`` (padded ``[B, L]`` with a
response mask), TRL 1.16's ``get_soft_overlong_punishment``, ``mask_truncated_completions`` and
``vllm_importance_sampling_mode`` (all four modes), OpenRLHF's ``apply_overlong_penalty``.
icpo runs its own packed functions. Seeds are fixed.
"""

import math
from collections import defaultdict

import numpy as np
import pytest
import torch

from icpo.algorithms.dynamic_sampling import (
    FilterGroupsLimitError,
    GroupAccumulator,
    filter_metric,
    keep_groups,
)
from icpo.algorithms.losses import aggregate
from icpo.algorithms.overlong import (
    loss_token_weights,
    overlong_penalty,
    truncated_mask,
    truncated_mask_from_tokens,
)
from icpo.algorithms.rollout_correction import (
    TRL_IS_MODES,
    apply_rollout_is,
    rollout_is_weights,
    rollout_mismatch_metrics,
)

# ---------------------------------------------------------------- dynamic sampling (verl DAPO)

def verl_filter_groups(gen_batches, n, train_batch_size, max_num_gen_batches):
    """The DAPO trainer's loop over generation batches (each a list of per-response metric
    values, n per uid, consecutive): returns (kept (batch, response) pairs after
    ``batch[:traj_bsz]``, num_gen_batches), or raises ValueError as verl does."""
    batch, num_prompt_in_batch, num_gen_batches = [], 0, 0
    for b, values in enumerate(gen_batches):
        num_gen_batches += 1
        uids = [f"{b}-{i // n}" for i in range(len(values))]
        uid2vals = defaultdict(list)
        for uid, v in zip(uids, values):
            uid2vals[uid].append(v)
        uid2std = {uid: np.std(vals) for uid, vals in uid2vals.items()}
        kept_uids = [uid for uid, std in uid2std.items() if std > 0 or len(uid2vals[uid]) == 1]
        num_prompt_in_batch += len(kept_uids)
        batch += [(b, i) for i, uid in enumerate(uids) if uid in kept_uids]
        if num_prompt_in_batch < train_batch_size:
            if max_num_gen_batches <= 0 or num_gen_batches < max_num_gen_batches:
                continue
            raise ValueError(f"{num_gen_batches=} >= {max_num_gen_batches=}.")
        return batch[:train_batch_size * n], num_gen_batches
    raise AssertionError("test ran out of generation batches")


def icpo_filter_groups(gen_batches, n, train_batch_size, max_num_gen_batches):
    acc = GroupAccumulator(train_batch_size, n, max_num_gen_batches)
    for values in gen_batches:
        acc.add(torch.tensor(values))
        if acc.full:
            pairs = [(b, g * n + j) for b, g in acc.selection() for j in range(n)]
            return pairs, acc.num_gen_batches
    raise AssertionError("test ran out of generation batches")


@pytest.mark.parametrize("n", [1, 2, 4, 5])
def test_filter_groups_matches_verl(n):
    rng = np.random.default_rng(n)
    checked = 0
    for trial in range(60):
        prompts = int(rng.integers(1, 7))
        # Dyadic values (0, 0.5, 1): np.std is exactly 0 on equal values (see the rounding test).
        p_same = rng.uniform(0.3, 0.95)  # share of groups whose values all agree
        batches = []
        for _ in range(12):
            values = []
            for _ in range(prompts):
                same = rng.random() < p_same
                v = rng.choice([0.0, 0.5, 1.0], size=n)
                values += [float(v[0])] * n if same else [float(x) for x in v]
            batches.append(values)
        tbs, limit = int(rng.integers(1, 2 * prompts + 1)), int(rng.integers(0, 5))
        try:
            want = verl_filter_groups(batches, n, tbs, limit)
        except ValueError:
            with pytest.raises(FilterGroupsLimitError,
                               match="algorithm.filter_groups.max_num_gen_batches"):
                icpo_filter_groups(batches, n, tbs, limit)
            continue
        except AssertionError:
            continue
        assert icpo_filter_groups(batches, n, tbs, limit) == want, f"trial {trial}"
        checked += 1
    assert checked >= 20


def test_all_groups_filtered_keeps_drawing_then_hits_the_limit():
    flat = [1.0, 1.0, 0.0, 0.0]  # two groups of n = 2, both zero spread
    acc = GroupAccumulator(train_batch_size=1, n=2, max_num_gen_batches=0)  # unbounded
    for _ in range(50):
        assert not acc.add(torch.tensor(flat)).any()
    assert not acc.full and acc.num_gen_batches == 50 and acc.selection() == []
    assert acc.add(torch.tensor([0.0, 1.0, 1.0, 1.0])).tolist() == [True, False]
    assert acc.full and acc.selection() == [(50, 0)]
    s = acc.stats()
    assert (s.num_gen_batches, s.groups_generated, s.groups_kept, s.groups_trained) == \
        (51, 102, 1, 1)
    limited = GroupAccumulator(train_batch_size=1, n=2, max_num_gen_batches=3)
    limited.add(torch.tensor(flat))
    limited.add(torch.tensor(flat))
    with pytest.raises(FilterGroupsLimitError, match=r"max_num_gen_batches=3"):
        limited.add(torch.tensor(flat))
    with pytest.raises(ValueError, match="=3."):  # verl raises at the same batch
        verl_filter_groups([flat] * 5, 2, 1, 3)


def test_limit_batch_that_fills_the_step_does_not_raise():
    acc = GroupAccumulator(train_batch_size=2, n=2, max_num_gen_batches=2)
    acc.add(torch.tensor([1.0, 0.0, 1.0, 1.0]))
    acc.add(torch.tensor([0.0, 1.0, 0.0, 1.0]))  # the 2nd (= last allowed) batch fills it
    # Surplus: 3 groups kept, the last one (batch 1's second group) is dropped, as batch[:traj_bsz].
    assert acc.full and acc.selection() == [(0, 0), (1, 0)] and acc.stats().groups_kept == 3
    with pytest.raises(RuntimeError, match="already full"):
        acc.add(torch.tensor([0.0, 1.0, 0.0, 1.0]))
    acc.reset()
    assert acc.num_gen_batches == 0 and not acc.full


def test_zero_spread_is_exact_where_np_std_rounds():
    """verl's np.std of three equal 0.1 values is 1.4e-17 > 0, so verl keeps that group; icpo
    drops it (all its advantages are 0). The one documented difference."""
    assert np.std([0.1, 0.1, 0.1]) > 0
    assert verl_filter_groups([[0.1] * 3], 3, 1, 0)[0] == [(0, 0), (0, 1), (0, 2)]
    assert keep_groups(torch.tensor([0.1] * 3, dtype=torch.float64), 3).tolist() == [False]


def test_keep_groups_inputs():
    assert keep_groups(torch.tensor([1.0, 1.0, 0.0]), 1).tolist() == [True, True, True]  # n = 1
    assert keep_groups(torch.tensor([True, True, False, True]), 2).tolist() == [False, True]
    with pytest.raises(ValueError, match="not a multiple of n=2"):
        keep_groups(torch.tensor([1.0, 0.0, 1.0]), 2)
    with pytest.raises(ValueError, match="non-finite"):
        keep_groups(torch.tensor([1.0, float("nan")]), 2)
    with pytest.raises(ValueError, match="max_num_gen_batches must be an int"):
        GroupAccumulator(4, 2, 1.5)
    with pytest.raises(ValueError, match="filter_groups.metric must be one of"):
        filter_metric("seq_final_reward", acc=torch.ones(2), score=torch.ones(2),
                      seq_reward=torch.ones(2))


def test_seq_reward_sees_the_overlong_penalty_score_does_not():
    """verl: "score" is the reward function's value, "seq_reward" the token-level scores'
    sum, which includes the overlong penalty: a group of equally scored responses of different
    lengths is dropped on score and kept on seq_reward."""
    score = torch.tensor([1.0, 1.0, 0.0, 0.0])
    pen = overlong_penalty([3, 10, 2, 2], max_response_length=10, buffer_len=4).penalty
    metrics = dict(acc=score > 0, score=score, seq_reward=score + pen)
    assert keep_groups(filter_metric("score", **metrics), 2).tolist() == [False, False]
    assert keep_groups(filter_metric("acc", **metrics), 2).tolist() == [False, False]
    assert keep_groups(filter_metric("seq_reward", **metrics), 2).tolist() == [True, False]


def test_every_rank_takes_its_part_of_the_same_selection():
    g = torch.Generator().manual_seed(7)
    world, per_rank, n = 3, 4, 2
    batches = [torch.randint(0, 2, (world * per_rank * n,), generator=g).float()
               for _ in range(6)]
    ranks = [GroupAccumulator(10, n, 0) for _ in range(world)]
    for metric in batches:  # every rank sees the same gathered metric
        if ranks[0].full:
            break
        for acc in ranks:
            acc.add(metric)
    assert all(acc.selection() == ranks[0].selection() for acc in ranks)
    parts = [acc.local_selection(r, per_rank) for r, acc in enumerate(ranks)]
    rebuilt = sorted((b, g + r * per_rank) for r, p in enumerate(parts) for b, g in p)
    assert rebuilt == sorted(ranks[0].selection()) and len(rebuilt) == 10


# ---------------------------------------------------------------- overlong (verl, TRL, OpenRLHF)

def verl_overlong(scores, lengths, max_resp_len, buffer_len, factor):
    """DAPORewardManager: score (python float) + min(-exceed / len * factor, 0), written to the
    float32 reward tensor; valid_response_length is an int64 tensor."""
    out = torch.zeros(len(scores), dtype=torch.float32)
    for i, (score, length) in enumerate(zip(scores, lengths)):
        valid_response_length = torch.tensor(length)
        reward = score
        expected_len = max_resp_len - buffer_len
        exceed_len = valid_response_length - expected_len
        reward += min(-exceed_len / buffer_len * factor, 0)
        out[i] = reward
    return out


def trl_soft_overlong(completion_lengths, max_completion_len, soft_punish_cache):
    out = []
    for completion_length in completion_lengths:
        if completion_length <= max_completion_len - soft_punish_cache:
            out.append(0.0)
        elif max_completion_len - soft_punish_cache < completion_length <= max_completion_len:
            out.append((max_completion_len - soft_punish_cache - completion_length)
                       / soft_punish_cache)
        else:
            out.append(-1.0)
    return out


def openrlhf_overlong(lengths, max_new_tokens, buffer_len, factor):
    out = []
    for length in lengths:
        exceed = min(length - (max_new_tokens - buffer_len), buffer_len)
        out.append(-exceed / buffer_len * factor if exceed > 0 else 0.0)
    return out


@pytest.mark.parametrize("M,buf,f", [(64, 16, 1.0), (50, 7, 0.3), (12, 12, 2.5), (9, 1, 1.0)])
def test_overlong_penalty_matches_verl_bitwise(M, buf, f):
    g = torch.Generator().manual_seed(M * 100 + buf)
    lengths = torch.randint(0, M + 1, (200,), generator=g).tolist() + [M - buf, M - buf + 1, M, 0]
    scores = torch.rand(len(lengths), generator=g).round(decimals=2)
    ours = overlong_penalty(lengths, M, buf, f)
    want = verl_overlong(scores.tolist(), lengths, M, buf, f)
    assert torch.equal(scores + ours.penalty, want)
    assert ours.num_penalized == (sum(x > M - buf for x in lengths) if f > 0 else 0)
    torch.testing.assert_close(ours.penalty, torch.tensor(openrlhf_overlong(lengths, M, buf, f)))


def test_overlong_boundary():
    M, buf, f = 20, 5, 0.8
    pen = overlong_penalty([M - buf - 1, M - buf, M - buf + 1, M], M, buf, f)
    assert pen.penalty[:2].tolist() == [0.0, 0.0]
    assert pen.penalty[2].item() == pytest.approx(-f / buf)
    assert pen.penalty[3].item() == pytest.approx(-f)
    assert pen.num_penalized == 2


@pytest.mark.parametrize("weight", [1.0, 0.5])
def test_trl_soft_punishment_is_verl_with_the_reward_weight_as_factor(weight):
    M, cache = 40, 10
    lengths = list(range(0, M + 1))
    trl = torch.tensor(trl_soft_overlong(lengths, M, cache), dtype=torch.float32) * weight
    torch.testing.assert_close(overlong_penalty(lengths, M, cache, weight).penalty, trl,
                               rtol=1e-6, atol=0)
    assert trl_soft_overlong([M + 1], M, cache) == [-1.0]  # TRL only: icpo's lengths are <= M


def test_overlong_refuses_bad_settings():
    with pytest.raises(ValueError, match=r"overlong_buffer.len must be an int in \[1, "):
        overlong_penalty([3], 10, 0)  # verl would divide by 0 (NaN at L = M)
    with pytest.raises(ValueError, match="overlong_buffer.len"):
        overlong_penalty([3], 10, 11)
    with pytest.raises(ValueError, match="penalty_factor must be >= 0"):
        overlong_penalty([3], 10, 4, -1.0)
    with pytest.raises(ValueError, match="max_response_length=10"):
        overlong_penalty([11], 10, 4)
    assert overlong_penalty([], 10, 4).penalty.numel() == 0


def test_truncated_mask_is_trls_rule_on_icpo_rollouts():
    from icpo.rollout.base import truncate_at_eos  # how icpo's engines cut and name responses

    eos, pad, max_new = [7, 9], 0, 6
    g = torch.Generator().manual_seed(11)
    responses, reasons = [], []
    for _ in range(300):
        raw = torch.randint(1, 12, (int(torch.randint(1, 10, (1,), generator=g)),),
                            generator=g).tolist()
        ids, reason = truncate_at_eos(raw, eos, max_new)
        if not ids:
            continue
        responses.append(ids)
        reasons.append(reason)
    # TRL: is_truncated = ids[-1] not in [*eos_token_ids, pad_token_id]
    trl = torch.tensor([ids[-1] not in [*eos, pad] for ids in responses])
    ours = truncated_mask(reasons)
    assert torch.equal(ours.truncated, trl) and ours.num_truncated == int(trl.sum()) > 0
    assert torch.equal(truncated_mask_from_tokens(responses, [*eos, pad]).truncated, trl)
    # A response exactly max_new long that ends with its EOS is not truncated (TRL agrees).
    assert truncate_at_eos([1, 2, 3, 4, 5, 7], eos, max_new) == ([1, 2, 3, 4, 5, 7], "stop")
    with pytest.raises(ValueError, match="response 0 is empty"):
        truncated_mask_from_tokens([[]], eos)
    with pytest.raises(ValueError, match="'stop' or 'length'"):
        truncated_mask(["stop", "abort"])


def trl_masked_loss(per_tok, mask, truncated, loss_type, L):
    """GRPOTrainer: completion_mask zeroed on truncated completions, then the loss type's
    aggregation (one process, one micro-batch)."""
    mask = mask * (~truncated).unsqueeze(1).float()
    if loss_type == "grpo":
        return ((per_tok * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    if loss_type == "dr_grpo":
        return (per_tok * mask).sum() / (per_tok.size(0) * L)
    return (per_tok * mask).sum() / mask.sum().clamp(min=1.0)  # dapo


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo"])
def test_truncated_responses_leave_the_loss_as_in_trl(loss_type):
    """The recipe loss_token_weights documents: weight the per-token loss, count only weighted
    tokens in N, keep every response in B."""
    lengths, L = [3, 8, 1, 8, 5, 8], 8
    truncated = torch.tensor([False, True, False, True, False, False])
    g = torch.Generator().manual_seed(3)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    per_tok = torch.randn(int(cu[-1]), generator=g)
    padded, mask = torch.zeros(len(lengths), L), torch.zeros(len(lengths), L)
    for b, n in enumerate(lengths):
        padded[b, :n], mask[b, :n] = per_tok[cu[b]:cu[b + 1]], 1.0
    w = loss_token_weights(truncated, cu)
    ours = aggregate(per_tok * w, cu, loss_type, L, global_tokens=max(1, int(w.sum())))
    torch.testing.assert_close(ours, trl_masked_loss(padded, mask, truncated, loss_type, L))


# ---------------------------------------------------------------- rollout correction (TIS)

def packed_and_padded(lengths, seed, spread=0.6):
    g = torch.Generator().manual_seed(seed)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    old = -torch.rand(int(cu[-1]), generator=g) * 4
    rollout = old + torch.randn(int(cu[-1]), generator=g) * spread
    L, B = max(lengths), len(lengths)
    pad = {k: torch.zeros(B, L) for k in ("old", "rollout")}
    for b, n in enumerate(lengths):
        pad["old"][b, :n], pad["rollout"][b, :n] = old[cu[b]:cu[b + 1]], rollout[cu[b]:cu[b + 1]]
    mask = (torch.arange(L)[None] < torch.tensor(lengths)[:, None]).float()
    return (old, rollout, cu), (pad["old"], pad["rollout"], mask)


def verl_rollout_is(old_log_prob, rollout_log_prob, response_mask, rollout_is, threshold):
    """compute_rollout_correction_and_rejection_mask -> compute_rollout_correction_weights."""
    log_ratio = old_log_prob - rollout_log_prob
    if rollout_is == "token":
        weights = torch.exp(torch.clamp(log_ratio, min=-20.0, max=20.0))
    else:
        log_ratio_sum = (log_ratio * response_mask).sum(-1).unsqueeze(-1)
        weights = torch.exp(torch.clamp(log_ratio_sum, min=-20.0, max=20.0)).expand_as(log_ratio)
    weights = weights * response_mask
    if rollout_is == "sequence":
        frac_high = (log_ratio_sum > torch.log(torch.tensor(threshold))).float().mean()
    else:
        high = (weights > threshold).float() * response_mask
        frac_high = high.sum() / (response_mask.sum() + 1e-8)
    kl = ((rollout_log_prob - old_log_prob) * response_mask).sum() / (response_mask.sum() + 1e-8)
    return weights.clamp(max=threshold).detach(), frac_high.item(), kl.item()


def trl_vllm_is(old_per_token_logps, sampling_per_token_logps, mask, mode, clip_max, clip_min):
    per_token_logps_diff = torch.nan_to_num((old_per_token_logps - sampling_per_token_logps) * mask)
    if mode.startswith("sequence"):
        logps_diff = per_token_logps_diff.sum(dim=-1, keepdim=True)
    else:
        logps_diff = per_token_logps_diff
    ratio = torch.exp(logps_diff)
    if mode.endswith("truncate"):
        ratio = torch.clamp(ratio, min=clip_min, max=clip_max)
    else:
        lo = clip_min if clip_min is not None else -math.inf
        hi = clip_max if clip_max is not None else math.inf
        ratio = ratio.masked_fill((ratio < lo) | (ratio > hi), value=0.0)
    delta = torch.abs(old_per_token_logps - sampling_per_token_logps)[mask.bool()]
    flat = ratio.flatten() if mode.startswith("sequence") else ratio[mask.bool()]
    return ratio, delta.mean().item(), delta.max().item(), flat


LENGTHS = [1, 5, 1, 13, 2, 9, 1, 4]  # with length-1 responses


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("threshold", [2.0, 1.2])
def test_rollout_is_matches_verl(level, threshold):
    (old, rollout, cu), (p_old, p_rollout, mask) = packed_and_padded(LENGTHS, seed=5)
    want, frac_high, kl = verl_rollout_is(p_old, p_rollout, mask, level, threshold)
    ours = rollout_is_weights(old, rollout, cu, level, threshold)
    torch.testing.assert_close(ours, want[mask.bool()], rtol=1e-6, atol=1e-7)
    assert not ours.requires_grad and ours.dtype == torch.float32
    assert 0 < (ours == threshold).sum() < ours.numel()  # weights above and below the cap
    m = rollout_mismatch_metrics(old, rollout, cu, level, threshold)
    assert m["rollout_corr/is_truncated_frac"] == pytest.approx(frac_high)
    assert m["rollout_corr/kl"] == pytest.approx(kl, rel=1e-5)


@pytest.mark.parametrize("trl_mode", sorted(TRL_IS_MODES))
@pytest.mark.parametrize("clip_min", [None, 0.5])
def test_rollout_is_matches_trl(trl_mode, clip_min):
    (old, rollout, cu), (p_old, p_rollout, mask) = packed_and_padded(LENGTHS, seed=6, spread=0.5)
    ratio, d_mean, d_max, flat = trl_vllm_is(p_old, p_rollout, mask, trl_mode, 3.0, clip_min)
    level, mode = TRL_IS_MODES[trl_mode]
    ours = rollout_is_weights(old, rollout, cu, level, 3.0, mode=mode, threshold_lower=clip_min)
    torch.testing.assert_close(ours, ratio.expand_as(p_old)[mask.bool()], rtol=1e-6, atol=1e-7)
    m = rollout_mismatch_metrics(old, rollout, cu, level, 3.0, mode=mode, threshold_lower=clip_min)
    assert m["rollout_corr/logp_abs_diff_mean"] == pytest.approx(d_mean, rel=1e-6)
    assert m["rollout_corr/logp_abs_diff_max"] == pytest.approx(d_max, rel=1e-6)
    assert m["rollout_corr/is_weight_mean"] == pytest.approx(flat.mean().item(), rel=1e-5)
    assert m["rollout_corr/is_weight_max"] == pytest.approx(flat.max().item(), rel=1e-6)
    assert m["rollout_corr/is_weight_min"] == pytest.approx(flat.min().item(), rel=1e-6, abs=1e-9)
    if mode == "mask":  # TRL's default: sequences above the cap get weight 0
        assert (ours == 0).any() and m["rollout_corr/is_truncated_frac"] > 0


def test_weights_above_and_below_the_threshold():
    cu = torch.tensor([0, 1, 2, 3])
    old = torch.zeros(3)
    rollout = -torch.tensor([math.log(1.5), math.log(2.5), 30.0])  # ratios 1.5, 2.5, e^30
    trunc = rollout_is_weights(old, rollout, cu, "token", 2.0)
    torch.testing.assert_close(trunc, torch.tensor([1.5, 2.0, 2.0]))
    masked = rollout_is_weights(old, rollout, cu, "token", 2.0, mode="mask")
    torch.testing.assert_close(masked, torch.tensor([1.5, 0.0, 0.0]))
    low = rollout_is_weights(old, -rollout, cu, "token", 2.0)  # ratios 1/1.5, 1/2.5, e^-20
    torch.testing.assert_close(low, torch.tensor([1 / 1.5, 1 / 2.5, math.exp(-20.0)]))


def test_sequence_level_on_length_one_responses_is_token_level():
    (old, rollout, cu), _ = packed_and_padded([1] * 9, seed=8, spread=1.0)
    for thr in (2.0, 0.7):
        torch.testing.assert_close(rollout_is_weights(old, rollout, cu, "sequence", thr),
                                   rollout_is_weights(old, rollout, cu, "token", thr))
    seq = rollout_is_weights(old, rollout, torch.tensor([0, 4, 9]), "sequence", 100.0)
    prod = [(old[s:e] - rollout[s:e]).sum().exp() for s, e in ((0, 4), (4, 9))]
    torch.testing.assert_close(seq, torch.stack(prod).repeat_interleave(torch.tensor([4, 5])))


def test_same_policy_gives_weight_one_and_no_mismatch():
    (old, _, cu), _ = packed_and_padded(LENGTHS, seed=9)
    for level in ("token", "sequence"):
        assert torch.equal(rollout_is_weights(old, old.clone(), cu, level), torch.ones_like(old))
        m = rollout_mismatch_metrics(old, old.clone(), cu, level)
        assert m["rollout_corr/logp_abs_diff_max"] == 0.0
        assert m["rollout_corr/is_truncated_frac"] == 0.0
        assert m["rollout_corr/is_weight_mean"] == 1.0


def test_rollout_inputs_refused():
    old, cu = torch.zeros(3), torch.tensor([0, 1, 1, 3])  # response 1 is empty
    with pytest.raises(ValueError, match="cu_seqlens"):  # check_packed: no empty response
        rollout_is_weights(old, old, cu)
    with pytest.raises(ValueError, match="2 NaN values"):
        rollout_is_weights(old, torch.tensor([0.0, math.nan, math.nan]), torch.tensor([0, 1, 3]))
    with pytest.raises(ValueError, match="rollout_logp has 2 tokens"):
        rollout_is_weights(old, torch.zeros(2), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="rollout_is must be null or one of"):
        rollout_is_weights(old, old, torch.tensor([0, 3]), "seq")
    with pytest.raises(ValueError, match="rollout_is_threshold must be"):
        rollout_is_weights(old, old, torch.tensor([0, 3]), "token", 0.0)


def test_mismatch_metrics_over_processes():
    """Two processes' gathered stats give the metrics of their union; a process with no
    responses takes part with empty tensors."""
    (old, rollout, cu), _ = packed_and_padded(LENGTHS, seed=10, spread=0.8)
    split = int(cu[3])
    parts = [(old[:split], rollout[:split], cu[:4]), (old[split:], rollout[split:], cu[3:] - split),
             (torch.zeros(0), torch.zeros(0), torch.tensor([0]))]
    for level in ("token", "sequence"):
        local = []
        fake_gather = lambda x: local.append(x.clone()) or x  # noqa: E731  (a one-line helper)
        for p in parts:
            rollout_mismatch_metrics(*p, level, gather=fake_gather)
        gathered = torch.cat(local)
        merged = rollout_mismatch_metrics(*parts[0], level, gather=lambda x: gathered)
        whole = rollout_mismatch_metrics(old, rollout, cu, level)
        assert merged.keys() == whole.keys()
        for k in whole:
            assert merged[k] == pytest.approx(whole[k], rel=1e-9), k


def test_apply_rollout_is_weights_the_policy_term_only():
    """verl: pg_losses * rollout_is_weights, then agg_loss; the gradient flows through the
    policy term, never the weights."""
    (old, rollout, cu), (p_old, p_rollout, mask) = packed_and_padded(LENGTHS, seed=12)
    pg = torch.randn(old.numel(), generator=torch.Generator().manual_seed(1), requires_grad=True)
    w = rollout_is_weights(old, rollout, cu, "token", 2.0)
    loss = aggregate(apply_rollout_is(pg, w), cu, "token-mean")
    p_pg = torch.zeros_like(p_old)
    p_pg[mask.bool()] = pg.detach()
    verl_w = verl_rollout_is(p_old, p_rollout, mask, "token", 2.0)[0]
    torch.testing.assert_close(loss, (p_pg * verl_w * mask).sum() / mask.sum())
    loss.backward()
    torch.testing.assert_close(pg.grad, w / old.numel())
    assert apply_rollout_is(pg, None) is pg
    with pytest.raises(ValueError, match="rollout weights have shape"):
        apply_rollout_is(pg, w[:-1])
