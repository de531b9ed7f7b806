"""Issue 19's dynamic sampling, overlong shaping, truncated-response mask and rollout correction
as wired into the config, the loss, the rollout engines and the trainer. The formulas
themselves are checked against the peers' in tests/test_peer_features.py.

Loss level: the mask's arithmetic against TRL's ``completion_mask`` re-implemented on a padded
``[B, L]`` layout, masked responses getting exactly zero gradient (grpo, dr_grpo, dapo, bnpo),
the TIS weights multiplying the policy-gradient term only. Engines: the HF sampler's log-probs
are log-softmax of the distribution it drew from; vLLM's are parsed per token (fakes; the real
engine: tests/test_vllm_engine.py). Trainer (the tiny preset: the bundled model, 1-2 steps of
8 prompts x 4): the trained batch has no zero-spread group, prompts drawn per step = groups
generated, resume with dynamic sampling equals an uninterrupted run, the draw limit is a
one-line error, the overlong penalty through the reward path, the mask on the truncated
responses, TIS weights of 1 (fp32) and, with the engine sampling at another temperature than
the trainer scores at, weights equal to the formula's. Seeds are fixed.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import icpo.trainer.update as update_mod
from icpo.algorithms.losses import aggregate, grpo_loss
from icpo.config import load_config
from icpo.errors import UserError
from icpo.rollout import RolloutBatch, SamplingParams
from icpo.rollout.sampling import sample_next
from icpo.rollout.vllm_engine import parse_outputs
from icpo.tasks.arithmetic import make_records, write_jsonl
from icpo.trainer import Trainer
from icpo.trainer.metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]
TINY_PRESET = REPO / "examples" / "configs" / "tiny_cpu.yaml"
NONDETERMINISTIC = ("time", "time/", "perf/")

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


# ----------------------------------------------------------------------------- loss level

def _packed(lengths, seed):
    g = torch.Generator().manual_seed(seed)
    cu = torch.tensor([0, *lengths]).cumsum(0)
    T = int(cu[-1])
    return cu, torch.randn(T, generator=g), g


def trl_masked_loss(values, cu, mask_per_seq, loss_type, max_len, num_micro_batches=1):
    """TRL 1.16's ``_compute_loss`` aggregation on a padded ``[B, L]`` loss with
    ``completion_mask`` = padding mask * (not truncated), one micro-batch."""
    lengths = (cu[1:] - cu[:-1]).tolist()
    B, L = len(lengths), max(lengths)
    per_token = torch.zeros(B, L, dtype=torch.float64)
    cmask = torch.zeros(B, L, dtype=torch.float64)
    for i, n in enumerate(lengths):
        per_token[i, :n] = values[cu[i]:cu[i + 1]].double()
        cmask[i, :n] = float(mask_per_seq[i])
    if loss_type == "grpo":
        return ((per_token * cmask).sum(-1) / cmask.sum(-1).clamp(min=1.0)).mean()
    if loss_type == "bnpo":
        return (per_token * cmask).sum() / cmask.sum().clamp(min=1.0) / num_micro_batches
    if loss_type == "dr_grpo":
        return (per_token * cmask).sum() / (B * max_len)
    if loss_type == "dapo":  # num_items_in_batch = the mask's sum over the whole batch
        return (per_token * cmask).sum() / cmask.sum().clamp(min=1.0)
    raise AssertionError(loss_type)


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_masked_aggregate_is_trls_completion_mask(loss_type, seed):
    lengths = [3, 1, 5, 2, 4]
    cu, values, g = _packed(lengths, seed)
    keep = (torch.rand(len(lengths), generator=g) > 0.4).tolist()
    keep[seed % len(keep)] = False  # at least one masked response
    w = torch.repeat_interleave(torch.tensor(keep, dtype=torch.float32), torch.tensor(lengths))
    ours = aggregate(values, cu, loss_type, 8, token_weights=w)
    assert float(ours) == pytest.approx(float(trl_masked_loss(values, cu, keep, loss_type, 8)),
                                        abs=1e-6)
    everything_masked = aggregate(values, cu, loss_type, 8, token_weights=torch.zeros_like(w))
    assert float(everything_masked) == 0.0  # TRL's clamp(min=1): 0, not NaN


ACTOR = SimpleNamespace(clip_low=0.2, clip_high=0.28, kl_coef=0.05, kl_estimator="k3",
                        entropy_coef=0.01, clip_ratio_c=3.0, entropy_agg_mode=None)


@pytest.mark.parametrize("mode", ["grpo", "dr_grpo", "dapo", "bnpo", "seq-mean-token-sum"])
def test_masked_responses_get_no_gradient(mode):
    """Policy, KL and entropy terms: the masked responses' tokens get exactly zero gradient;
    the unmasked ones get what a batch of only them gets (B scaled where B counts all)."""
    lengths = [4, 2, 5, 3]
    cu, logp0, g = _packed(lengths, 7)
    logp0 = -logp0.abs()
    old = logp0 + 0.1 * torch.randn(logp0.shape, generator=g)
    ref = logp0 + 0.2 * torch.randn(logp0.shape, generator=g)
    ent = torch.rand(logp0.shape, generator=g, requires_grad=True)
    adv = torch.repeat_interleave(torch.randn(4, generator=g), torch.tensor(lengths))
    keep = torch.tensor([True, False, True, False])
    w = torch.repeat_interleave(keep.float(), torch.tensor(lengths))
    cfg = SimpleNamespace(**vars(ACTOR), loss_agg_mode=mode)
    logp = logp0.clone().requires_grad_(True)
    loss, _ = grpo_loss(logp, old, ref, ent, adv, cu, cfg, 8, token_weights=w)
    loss.backward()
    masked = w == 0
    assert torch.all(logp.grad[masked] == 0) and torch.all(ent.grad[masked] == 0)
    assert logp.grad[~masked].abs().min() > 0
    # the kept responses alone, with the same normalisation
    sel = torch.nonzero(~masked).flatten()
    sub_cu = torch.tensor([0, 4, 9])
    sub = [t[sel].detach() for t in (logp0, old, ref, ent, adv)]
    sub_logp = sub[0].clone().requires_grad_(True)
    totals = {"global_seqs": 4} if mode in ("grpo", "dr_grpo", "seq-mean-token-sum") else {}
    alone, _ = grpo_loss(sub_logp, sub[1], sub[2], sub[3], sub[4], sub_cu, cfg, 8, **totals)
    alone.backward()
    assert loss.item() == pytest.approx(alone.item(), rel=1e-6)
    assert torch.allclose(logp.grad[sel], sub_logp.grad, rtol=1e-5, atol=1e-8)


def test_tis_weights_multiply_the_policy_gradient_term_only():
    lengths = [3, 4, 2]
    cu, logp0, g = _packed(lengths, 3)
    logp0 = -logp0.abs()
    old = logp0 + 0.05 * torch.randn(logp0.shape, generator=g)
    ref = logp0 + 0.1 * torch.randn(logp0.shape, generator=g)
    adv = torch.repeat_interleave(torch.randn(3, generator=g), torch.tensor(lengths))
    w = torch.rand(logp0.shape, generator=g) * 2
    cfg = SimpleNamespace(**{**vars(ACTOR), "entropy_coef": 0.0}, loss_agg_mode="token-mean")
    base, m0 = grpo_loss(logp0, old, ref, None, adv, cu, cfg, 8)
    weighted, m1 = grpo_loss(logp0, old, ref, None, adv, cu, cfg, 8, rollout_is_weights=w)
    ones, _ = grpo_loss(logp0, old, ref, None, adv, cu, cfg, 8,
                        rollout_is_weights=torch.ones_like(w))
    assert float(ones) == float(base)
    assert m1["kl_loss"] == m0["kl_loss"] and m1["clipfrac"] == m0["clipfrac"]
    # the surrogate recomputed here: -min(r A, clip(r) A), dual-clip, times w, token mean
    ratio = torch.exp(logp0 - old)
    pg = -torch.minimum(ratio * adv, ratio.clamp(0.8, 1.28) * adv)
    pg = torch.where(adv < 0, torch.minimum(pg, -adv * 3.0), pg)
    assert m1["pg_loss"] == pytest.approx(float((pg * w).mean()), rel=1e-6)
    assert float(weighted) == pytest.approx(m1["pg_loss"] + 0.05 * m1["kl_loss"], rel=1e-6)


# ----------------------------------------------------------------------------- engines

@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, -1, 1.0), (0.7, -1, 1.0),
                                                       (1.3, 20, 1.0), (0.9, -1, 0.8)])
def test_hf_sampler_logprobs_are_those_of_the_distribution_it_drew_from(temperature, top_k,
                                                                         top_p):
    g = torch.Generator().manual_seed(11)
    logits = torch.randn(64, 3000, generator=g) * 3
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)
    plain = sample_next(logits.clone(), params, torch.Generator().manual_seed(5))
    tokens, logp = sample_next(logits.clone(), params, torch.Generator().manual_seed(5),
                               with_logprobs=True)
    assert torch.equal(tokens, plain)  # the same draws
    # the processed distribution: /T, top-k, then top-p (kept set), renormalized
    scaled = logits.double() / temperature
    if top_k > 0:
        scaled[scaled < torch.topk(scaled, top_k, dim=-1).values[:, -1:]] = -math.inf
    if top_p < 1:
        asc, order = scaled.sort(dim=-1)
        drop = asc.softmax(-1).cumsum(-1) <= 1 - top_p
        drop[:, -1] = False
        scaled = scaled.scatter(-1, order, asc.masked_fill(drop, -math.inf))
    ref = scaled.log_softmax(-1).gather(-1, tokens[:, None])[:, 0]
    assert (logp.double() - ref).abs().max() < 1e-5
    assert sample_next(logits, SamplingParams(temperature=0.0), with_logprobs=True)[1] is None


def _completion(index, tokens, reason, logprobs=None):
    per_position = None
    if logprobs is not None:  # vLLM: one {token: Logprob} dict per position, sampled included
        per_position = [{t: SimpleNamespace(logprob=lp), t + 1: SimpleNamespace(logprob=-9.0)}
                        for t, lp in zip(tokens, logprobs)]
    return SimpleNamespace(index=index, token_ids=tuple(tokens), finish_reason=reason,
                           logprobs=per_position)


def test_vllm_sampling_logprobs_parsed_per_token():
    outs = [SimpleNamespace(prompt_token_ids=[1], outputs=[
        _completion(0, [5, 2, 7], "stop", [-0.5, -1.5, -2.5]),  # EOS 2: cut after it
        _completion(1, [6, 8], "length", [-0.25, -0.75])])]
    batch = parse_outputs(outs, 2, [2], max_new_tokens=3)
    assert batch.response_ids == [[5, 2], [6, 8]]
    assert batch.rollout_logprobs == [[-0.5, -1.5], [-0.25, -0.75]]
    bare = [SimpleNamespace(prompt_token_ids=[1], outputs=[_completion(0, [5], "stop")])]
    assert parse_outputs(bare, 1, [2], 3).rollout_logprobs is None


def test_rollout_batch_carries_the_logprobs():
    b = RolloutBatch([[1], [1], [2]], [[3, 4], [5], [6, 7, 8]], ["stop", "length", "stop"],
                     rollout_logprobs=[[-1.0, -2.0], [-3.0], [-4.0, -5.0, -6.0]])
    assert b.select([2, 0]).rollout_logprobs == [[-4.0, -5.0, -6.0], [-1.0, -2.0]]
    both = RolloutBatch.concat([b, b.select([1])])
    assert both.rollout_logprobs[-1] == [-3.0] and len(both) == 4
    none = RolloutBatch([[1]], [[3]], ["stop"])
    assert RolloutBatch.concat([b, none]).rollout_logprobs is None
    with pytest.raises(ValueError, match="one value per response token"):
        RolloutBatch([[1]], [[3, 4]], ["stop"], rollout_logprobs=[[-1.0]])


# ----------------------------------------------------------------------------- config

def test_compat_presets_set_the_peers_defaults():
    verl = load_config(None, ["algorithm.compat=verl", "rollout.engine=vllm"])
    assert verl.algorithm.rollout_correction.rollout_is is None
    assert verl.algorithm.rollout_correction.rollout_is_threshold == 2.0
    assert not verl.algorithm.filter_groups.enable and not verl.reward.overlong_buffer.enable
    trl = load_config(None, ["algorithm.compat=trl", "rollout.engine=vllm"]).algorithm
    rc = trl.rollout_correction
    assert (rc.rollout_is, rc.rollout_is_mode, rc.rollout_is_threshold,
            rc.rollout_is_threshold_lower) == ("sequence", "mask", 3.0, None)
    hf = load_config(None, ["algorithm.compat=trl", "rollout.engine=hf"])
    assert hf.algorithm.rollout_correction.rollout_is is None  # TRL corrects only with vLLM
    assert not hf.actor.mask_truncated
    mine = load_config(None, ["algorithm.compat=trl", "rollout.engine=vllm",
                              "algorithm.rollout_correction.rollout_is=token"])
    assert mine.algorithm.rollout_correction.rollout_is == "token"  # explicit settings win


@pytest.mark.parametrize("overrides, field", [
    (["reward.overlong_buffer.enable=true"], "reward.overlong_buffer.len"),
    (["reward.overlong_buffer.enable=true", "reward.overlong_buffer.len=3073"],
     "reward.overlong_buffer.len"),
    (["reward.overlong_buffer.penalty_factor=-1"], "reward.overlong_buffer.penalty_factor"),
    (["algorithm.filter_groups.enable=true", "reward.drop_mixed_groups=true"],
     "algorithm.filter_groups.enable"),
    (["algorithm.filter_groups.max_num_gen_batches=-1"],
     "algorithm.filter_groups.max_num_gen_batches"),
    (["algorithm.filter_groups.metric=seq_final_reward"], "algorithm.filter_groups.metric"),
    (["algorithm.rollout_correction.rollout_is=geo"], "algorithm.rollout_correction.rollout_is"),
    (["algorithm.rollout_correction.rollout_is_threshold=0"],
     "algorithm.rollout_correction.rollout_is_threshold"),
    (["algorithm.rollout_correction.rollout_is_threshold_lower=2.5"],
     "algorithm.rollout_correction.rollout_is_threshold_lower"),
    (["algorithm.rollout_correction.rollout_is_mode=clip"],
     "algorithm.rollout_correction.rollout_is_mode"),
])
def test_bad_settings_name_the_field(overrides, field):
    with pytest.raises(Exception, match=field.replace(".", r"\.")) as e:
        load_config(None, overrides)
    assert "\n" not in str(e.value)


# ----------------------------------------------------------------------------- trainer

REWARDS = '''
def constant(data_source, solution_str, ground_truth, extra_info=None):
    return 0.0
'''


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("tiny_preset")
    write_jsonl(make_records("train", 64), d / "train.jsonl")
    (d / "rewards.py").write_text(REWARDS)
    return d / "train.jsonl", d / "rewards.py"


def tiny_cfg(tiny_data, out: Path, *overrides: str):
    """The tiny preset (bundled model, arithmetic task) made small: 8 prompts x G=4, responses
    of at most 24 tokens, one mini-batch, 1 step."""
    return load_config(TINY_PRESET, [
        f"data.train_files=[{tiny_data[0]}]", "rollout.n=4", "rollout.max_response_length=24",
        "trainer.train_batch_size=8", "actor.ppo_mini_batch_size=8", "trainer.total_steps=1",
        "trainer.eval_every=0", "trainer.save_every=0", "trainer.progress_bar=false",
        f"trainer.output_dir={out}", *overrides])


class UpdateSpy:
    """Records what each step hands the update (``Trainer._update``)."""

    def __init__(self, monkeypatch):
        self.scored = []
        real = Trainer._update

        def spy(trainer, scored, step):
            self.scored.append(dataclasses.replace(scored))
            return real(trainer, scored, step)

        monkeypatch.setattr(Trainer, "_update", spy)


def test_dynamic_sampling_trains_only_groups_with_spread(tiny_data, tmp_path, monkeypatch):
    spy = UpdateSpy(monkeypatch)
    out = tmp_path / "ds"
    trainer = Trainer(tiny_cfg(tiny_data, out, "algorithm.filter_groups.enable=true",
                               "trainer.total_steps=2"))
    start = trainer.sampler.state_dict()["position"]
    history = trainer.train()
    drawn = 0
    for line, scored in zip(history, spy.scored):
        print({k: v for k, v in line.items() if k.startswith("filter_groups/")})
        assert line["filter_groups/groups_trained"] == 8
        assert line["filter_groups/groups_generated"] == 8 * line["filter_groups/num_gen_batches"]
        assert line["filter_groups/groups_kept"] >= 8
        assert line["filter_groups/zero_std_group_frac"] == 0.0
        drawn += line["filter_groups/groups_generated"]
        assert len(scored.samples) == 8 * 4
        # every trained group has right and wrong answers (metric acc)
        texts = trainer.tokenizer.batch_decode(scored.samples.response_ids,
                                               skip_special_tokens=True)
        acc = trainer.reward_fn(scored.samples.records, texts).acc.float().view(8, 4)
        assert ((acc != acc[:, :1]).any(dim=1)).all()
    assert any(h["filter_groups/num_gen_batches"] > 1 for h in history), "nothing was filtered"
    # the sampler's state covers every prompt drawn (64 prompts, one epoch or more)
    state = trainer.sampler.state_dict()
    assert state["epoch"] * 64 + state["position"] - start == drawn


def test_dynamic_sampling_resume_matches_uninterrupted_run(tiny_data, tmp_path, monkeypatch):
    extra = ("algorithm.filter_groups.enable=true", "trainer.total_steps=2",
             "trainer.save_every=1", "reward.noise_fraction=0.25")
    straight = Trainer(tiny_cfg(tiny_data, tmp_path / "straight", *extra))
    straight.train()
    cfg = tiny_cfg(tiny_data, tmp_path / "resumed", *extra)
    real_step = Trainer.train_step

    def crashing(self):
        if self.step == 1:
            raise RuntimeError("simulated crash after the step-1 checkpoint")
        return real_step(self)

    monkeypatch.setattr(Trainer, "train_step", crashing)
    with pytest.raises(RuntimeError, match="simulated"):
        Trainer(cfg).train()
    monkeypatch.setattr(Trainer, "train_step", real_step)
    resumed = Trainer(cfg, resume="auto")
    assert resumed.step == 1
    resumed.train()

    def keep(r):
        return {k: v for k, v in r.items() if not k.startswith(NONDETERMINISTIC)}

    a = [keep(r) for r in read_metrics(tmp_path / "straight" / "metrics.jsonl")]
    b = [keep(r) for r in read_metrics(tmp_path / "resumed" / "metrics.jsonl")]
    assert [r["step"] for r in b] == [1, 2] and a == b
    assert a[1]["filter_groups/num_gen_batches"] >= 1
    sa, sb = straight.models.actor.module.state_dict(), resumed.models.actor.module.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert straight.sampler.state_dict() == resumed.sampler.state_dict()


def test_dynamic_sampling_draw_limit_is_a_one_line_error(tiny_data, tmp_path):
    # a constant reward: every group has zero spread, no batch ever fills
    trainer = Trainer(tiny_cfg(tiny_data, tmp_path / "limit", "algorithm.filter_groups.enable=true",
                               "algorithm.filter_groups.metric=score",
                               "algorithm.filter_groups.max_num_gen_batches=2",
                               f"reward.function={tiny_data[1]}:constant"))
    with pytest.raises(UserError) as e:
        trainer.train()
    msg = str(e.value)
    assert "\n" not in msg and "max_num_gen_batches=2" in msg and "0 of the 8 groups" in msg
    assert trainer.sampler.state_dict()["position"] == 16  # two batches were drawn


def test_overlong_penalty_through_the_reward_path(tiny_data, tmp_path):
    """M = 24, len = 8, factor 0.5: L = 16 gets 0, 17 gets -0.5 / 8, 24 gets -0.5 (added to the
    constant 0 reward)."""
    trainer = Trainer(tiny_cfg(tiny_data, tmp_path / "ol", "reward.overlong_buffer.enable=true",
                               "reward.overlong_buffer.len=8",
                               "reward.overlong_buffer.penalty_factor=0.5",
                               f"reward.function={tiny_data[1]}:constant"))
    record = trainer.train_data.items[0].record
    lengths = [15, 16, 17, 20, 24]
    ro = RolloutBatch([[1]] * 5, [[30] * k for k in lengths], ["stop"] * 4 + ["length"],
                      records=[record] * 5)
    got = trainer._rewards(ro, 0)
    expected = torch.tensor([0.0, 0.0, -0.5 / 8, -0.5 * 4 / 8, -0.5])
    assert torch.equal(got.rewards, expected)
    assert torch.equal(got.score, torch.zeros(5))
    assert got.counts["reward/overlong_penalized_frac"] == (3, 5)


def test_overlong_and_mask_truncated_in_a_step(tiny_data, tmp_path, monkeypatch):
    seen = []
    real_loss = update_mod.grpo_loss

    def spy_loss(*args, token_weights=None, **kw):
        seen.append(token_weights)
        return real_loss(*args, token_weights=token_weights, **kw)

    monkeypatch.setattr(update_mod, "grpo_loss", spy_loss)
    spy = UpdateSpy(monkeypatch)
    trainer = Trainer(tiny_cfg(tiny_data, tmp_path / "mask", "reward.overlong_buffer.enable=true",
                               "reward.overlong_buffer.len=8", "actor.mask_truncated=true"))
    line = trainer.train()[0]
    scored = spy.scored[0]
    truncated = [r == "length" for r in scored.samples.finish_reasons]
    lengths = [len(r) for r in scored.samples.response_ids]
    assert 0 < sum(truncated) < len(truncated)
    assert line["actor/masked_truncated_frac"] == sum(truncated) / len(truncated)
    assert line["reward/overlong_penalized_frac"] == sum(k > 16 for k in lengths) / len(lengths)
    expected = torch.repeat_interleave(torch.tensor([0.0 if t else 1.0 for t in truncated]),
                                       torch.tensor(lengths))
    assert torch.equal(scored.token_weights, expected)
    assert all(w is not None for w in seen)
    assert torch.equal(torch.cat(seen).sort().values, expected.sort().values)


def _independent_logprobs(model, samples, temperature):
    """log-softmax(logits / T) at each response token, from plain full forwards (fp64)."""
    out = []
    with torch.no_grad():
        for p, r in zip(samples.prompt_ids, samples.response_ids):
            logits = model(torch.tensor([p + r])).logits[0, len(p) - 1:-1].double() / temperature
            out.append(logits.log_softmax(-1).gather(-1, torch.tensor(r)[:, None])[:, 0])
    return torch.cat(out)


def test_tis_weights_are_one_in_fp32_on_the_hf_engine(tiny_data, tmp_path, monkeypatch):
    spy = UpdateSpy(monkeypatch)
    trainer = Trainer(tiny_cfg(tiny_data, tmp_path / "tis",
                               "algorithm.rollout_correction.rollout_is=token"))
    line = trainer.train()[0]
    print({k: v for k, v in line.items() if k.startswith("rollout_corr/")})
    assert line["rollout_corr/logp_abs_diff_max"] < 1e-4
    assert abs(line["rollout_corr/is_weight_min"] - 1) < 1e-4
    assert abs(line["rollout_corr/is_weight_max"] - 1) < 1e-4
    assert line["rollout_corr/is_truncated_frac"] == 0.0
    assert (spy.scored[0].rollout_is_weights - 1).abs().max() < 1e-4


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_tis_weights_follow_the_formula_when_the_engine_samples_hotter(tiny_data, tmp_path,
                                                                       monkeypatch, level):
    """The engine samples at T = 1.5 while the trainer scores at 1.0: the weights are
    min(exp(log pi_old - log pi_rollout), 1.2) of those two temperatures' log-softmax, computed
    here from plain forwards (per token, or the response's sum for ``sequence``)."""
    real_sampling = Trainer._sampling
    monkeypatch.setattr(Trainer, "_sampling", lambda self, step, draw=0: dataclasses.replace(
        real_sampling(self, step, draw), temperature=1.5))
    captured = {}
    real_update = Trainer._update

    def spy(trainer, scored, step):  # before the update: the weights pi_old was scored with
        model = trainer.models.actor.module
        captured["old"] = _independent_logprobs(model, scored.samples, 1.0)
        captured["rollout"] = _independent_logprobs(model, scored.samples, 1.5)
        captured["scored"] = scored
        return real_update(trainer, scored, step)

    monkeypatch.setattr(Trainer, "_update", spy)
    trainer = Trainer(tiny_cfg(tiny_data, tmp_path / f"hot_{level}",
                               f"algorithm.rollout_correction.rollout_is={level}",
                               "algorithm.rollout_correction.rollout_is_threshold=1.2"))
    line = trainer.train()[0]
    scored, cu = captured["scored"], captured["scored"].resp_cu
    engine = torch.tensor([x for lp in scored.samples.rollout_logprobs for x in lp])
    assert (engine.double() - captured["rollout"]).abs().max() < 1e-4  # the engine's own T
    d = captured["old"] - captured["rollout"]
    if level == "sequence":
        d = torch.repeat_interleave(torch.stack([d[a:b].sum() for a, b in
                                                 zip(cu[:-1].tolist(), cu[1:].tolist())]),
                                    cu.diff())
    raw = torch.exp(d.clamp(-20, 20))
    w = scored.rollout_is_weights.double()
    assert (w - raw.clamp(max=1.2)).abs().max() < 1e-3 * raw.clamp(max=1.2).max()
    assert (raw - 1).abs().max() > 0.05  # a real mismatch
    print({k: v for k, v in line.items() if k.startswith("rollout_corr/")})
    units = raw if level == "token" else raw[cu[:-1]]
    assert 0 < line["rollout_corr/is_truncated_frac"] == pytest.approx(
        float((units > 1.2).double().mean()))
    assert line["rollout_corr/logp_abs_diff_mean"] == pytest.approx(
        float((captured["old"] - captured["rollout"]).abs().mean()), rel=1e-3)


@pytest.mark.slow
def test_two_processes_decide_alike(tiny_data, tmp_path):
    """torchrun, 2 CPU processes, ZeRO-2 (every rank must run as many backward passes): with
    dynamic sampling each rank keeps the groups it generated that the gathered metric keeps,
    so ranks train on different numbers of groups, but they draw the same batches (equal
    sampler states) and together train exactly train_batch_size groups per step."""
    import json
    import subprocess
    import sys

    from launch import clean_env, free_port

    from icpo.config import save_config

    out = tmp_path / "two"
    cfg = tiny_cfg(tiny_data, out, "algorithm.filter_groups.enable=true", "trainer.zero_stage=2",
                   "trainer.total_steps=2", "actor.ppo_mini_batch_size=4",
                   "actor.mask_truncated=true", "algorithm.rollout_correction.rollout_is=token",
                   "reward.overlong_buffer.enable=true", "reward.overlong_buffer.len=8")
    save_config(cfg, tmp_path / "two.yaml")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(free_port()), str(REPO / "tests" / "_peer_features_worker.py"),
           str(tmp_path / "two.yaml")]
    proc = subprocess.run(cmd, cwd=REPO, env=clean_env(), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    print(ranks)
    assert ranks[0]["sampler"] == ranks[1]["sampler"]
    lines = read_metrics(out / "metrics.jsonl")
    assert [ln["step"] for ln in lines] == [1, 2]
    for i, ln in enumerate(lines):
        assert ranks[0]["groups"][i] + ranks[1]["groups"][i] == 8
        assert ln["filter_groups/groups_trained"] == 8
        assert ln["filter_groups/zero_std_group_frac"] == 0.0
        assert ln["rollout_corr/logp_abs_diff_max"] < 1e-4
    drawn = sum(ln["filter_groups/groups_generated"] for ln in lines)
    assert ranks[0]["sampler"]["epoch"] * 64 + ranks[0]["sampler"]["position"] == drawn
