"""Group ops (preference_scores, icpo_advantages, grpo_advantages) against their references:
the paper's worked example, awkward groups, every dtype, opcheck, properties, bad input."""

from __future__ import annotations

import pytest
import torch
from _accuracy import SEED, assert_within_2x_plain, rounding_floor
from hypothesis import given, settings
from hypothesis import strategies as st

import icpo.ops  # noqa: F401  (registers torch.ops.icpo.*)
from icpo.ops import grpo_advantages, icpo_advantages, preference_scores, reference

HAS_CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device on this machine")
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
# Table 7 of the paper, first group (docs/algorithm.md, worked examples).
TABLE7_CONF = [-0.0135, -0.0583, -0.0216, -0.0090, -0.0407]
TABLE7_R = [0.1, 0.1, 1.0, 0.1, 1.0]


def offsets_from(sizes, dtype=torch.int64):
    cu = torch.zeros(len(sizes) + 1, dtype=torch.int64)
    cu[1:] = torch.tensor(sizes).cumsum(0)
    return cu.to(dtype)


def make_group_inputs(n, dtype=torch.float32, seed=SEED):
    """Confidence in (-3, 0] with a few exact zeros and ties; rewards like R_verif plus noise."""
    gen = torch.Generator().manual_seed(seed)
    conf = -torch.rand(n, generator=gen, dtype=torch.float64) * 3
    conf[::7] = 0.0
    conf[3::11] = -0.5
    answer, fmt = torch.randint(0, 2, (2, n), generator=gen)
    rewards = 0.9 * answer + 0.1 * fmt
    rewards = rewards + 0.3 * torch.randn(n, generator=gen, dtype=torch.float64)
    return conf.to(dtype), rewards.to(dtype)


def plain_conf(conf):
    """Confidence as plain PyTorch reads it for the rule: in its own dtype, except float16 in
    float32, since the reference's clamp to -1e-12 is no float16 number (it rounds to -0.0 and a
    zero confidence then divides by zero)."""
    return conf.float() if conf.dtype == torch.float16 else conf


def check_against_plain(got, conf, rewards, kw, what, *, scores_only=False, grpo_kw=None):
    """The rule (tests/_accuracy.py) for the group ops' outputs ``got`` (an ICPOAdvantages, the
    scores, or with ``grpo_kw`` GRPO's advantages) against plain PyTorch in the inputs' dtype
    (the references) and float64."""
    if grpo_kw is not None:
        pairs = [(got, reference.grpo_advantages(rewards, **grpo_kw),
                  reference.grpo_advantages(rewards.double(), **grpo_kw))]
    elif scores_only:
        pairs = [(got, reference.preference_scores(plain_conf(conf), **kw).to(conf.dtype),
                  reference.preference_scores(conf.double(), **kw))]
    else:
        pairs = zip(got, reference.icpo_advantages(plain_conf(conf), rewards, **kw),
                    reference.icpo_advantages(conf.double(), rewards.double(), **kw))
    spec = grpo_kw if grpo_kw is not None else kw
    offsets = spec.get("group_offsets")
    largest = int(offsets.diff().max()) if offsets is not None else spec["group_size"]
    names = (("advantages",) if grpo_kw is not None else ("scores",) if scores_only
             else ("scores", "rewards", "advantages"))
    for name, (x, p, t) in zip(names, pairs):
        assert x.dtype == p.dtype, (what, name, x.dtype, p.dtype)
        floor = rounding_floor(x.dtype, t.abs().max().item(), largest)
        assert_within_2x_plain(x, p, t, floor=floor, what=f"{what} {name}")


def bits(x):
    """The raw bit patterns, so -0.0 != +0.0 (torch.equal treats them as equal)."""
    return x.view({8: torch.int64, 4: torch.int32, 2: torch.int16}[x.element_size()])


# Groupings: uniform G = 1, 5, 16, 64 (64 takes the std::sort path) and ragged ones.
GROUPINGS = [("G1", 1, [1] * 7), ("G5", 5, [5] * 12), ("G16", 16, [16] * 5), ("G64", 64, [64] * 3),
             ("ragged", None, [5, 1, 3, 64, 2, 33, 1, 8])]


def group_args(grouping, index_dtype=torch.int64):
    _, size, sizes = grouping
    if size is not None:
        return sum(sizes), {"group_size": size}
    return sum(sizes), {"group_offsets": offsets_from(sizes, index_dtype)}


# -- golden ------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", (torch.float32, torch.float64), ids=str)
def test_table7_first_group(dtype):
    conf, rewards = torch.tensor(TABLE7_CONF, dtype=dtype), torch.tensor(TABLE7_R, dtype=dtype)
    out = icpo_advantages(conf, rewards, 5, delta=0.4, tau=2.0, omega=1.0)
    torch.testing.assert_close(out.scores, torch.tensor([0.2704, 0.5852, 0.4202, 0.0036, 0.4372],
                                                        dtype=dtype), rtol=0, atol=1e-3)
    torch.testing.assert_close(out.advantages, torch.tensor(
        [-0.7917, -0.7917, 1.2108, -0.8649, 1.2376], dtype=dtype), rtol=0, atol=1e-3)
    torch.testing.assert_close(preference_scores(conf, 5, delta=0.4), out.scores)
    grpo = grpo_advantages(rewards, 5)
    torch.testing.assert_close(grpo, torch.tensor([-0.816, -0.816, 1.225, -0.816, 1.225],
                                                  dtype=dtype), rtol=0, atol=1e-3)


# -- against the references --------------------------------------------------------------------

@pytest.mark.parametrize("grouping", GROUPINGS, ids=lambda g: g[0])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_preference_scores_match_reference(grouping, dtype):
    n, kw = group_args(grouping, torch.int32)
    conf, _ = make_group_inputs(n, dtype)
    out = preference_scores(conf, delta=0.3, **kw)
    assert out.dtype == dtype and out.shape == (n,)
    check_against_plain(out, conf, None, dict(delta=0.3, **kw), f"{dtype}", scores_only=True)
    assert bool((out >= 0).all()) and bool(torch.isfinite(out).all())


ICPO_KWARGS = [{}, {"scale": False}, {"unbiased": True}, {"omega": 0.37, "tau": 1.5, "delta": 0.6},
               {"eps": 1e-2, "unbiased": True, "scale": True}]


@pytest.mark.parametrize("kwargs", ICPO_KWARGS, ids=str)
@pytest.mark.parametrize("grouping", GROUPINGS, ids=lambda g: g[0])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_icpo_and_grpo_match_reference(kwargs, grouping, dtype):
    n, kw = group_args(grouping)
    conf, rewards = make_group_inputs(n, dtype, seed=SEED + n)
    out = icpo_advantages(conf, rewards, **kw, **kwargs)
    assert all(got.dtype == dtype and got.shape == (n,) for got in out)
    check_against_plain(out, conf, rewards, {**kw, **kwargs}, f"{dtype} {kwargs}")
    grpo_kwargs = {k: v for k, v in kwargs.items() if k in ("scale", "unbiased", "eps")}
    got = grpo_advantages(rewards, **kw, **grpo_kwargs)
    check_against_plain(got, conf, rewards, {}, f"{dtype} {kwargs} grpo",
                        grpo_kw={**kw, **grpo_kwargs})


@pytest.mark.parametrize("grouping", GROUPINGS, ids=lambda g: g[0])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kwargs", [{}, {"scale": False}, {"unbiased": True}], ids=str)
def test_omega_zero_is_grpo_bitwise(grouping, dtype, kwargs):
    n, kw = group_args(grouping)
    conf, rewards = make_group_inputs(n, dtype, seed=3)
    rewards[:3] = -0.0  # R + 0 * x would turn these into +0.0
    icpo_out = icpo_advantages(conf, rewards, **kw, omega=0.0, **kwargs)
    assert torch.equal(bits(icpo_out.advantages), bits(grpo_advantages(rewards, **kw, **kwargs)))
    assert torch.equal(bits(icpo_out.rewards), bits(rewards))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_advantages_normalize_the_returned_final_rewards(dtype):
    # In every dtype the kernel normalizes R_final as returned (rounded to the dtype), so ICPO's
    # advantages are exactly GRPO's advantages of ICPO's final rewards.
    n, kw = group_args(GROUPINGS[-1])
    conf, rewards = make_group_inputs(n, dtype, seed=9)
    out = icpo_advantages(conf, rewards, **kw, unbiased=True)
    again = grpo_advantages(out.rewards, **kw, unbiased=True)
    assert torch.equal(bits(out.advantages), bits(again))


def test_strided_inputs():
    conf, rewards = make_group_inputs(30, torch.float64)
    out = icpo_advantages(conf[::2], rewards[::2], 5)
    want = icpo_advantages(conf[::2].contiguous(), rewards[::2].contiguous(), 5)
    assert all(torch.equal(bits(got), bits(ref)) for got, ref in zip(out, want))


def test_ties_keep_position_order():
    conf = torch.tensor([-0.5, -0.2, -0.5, -0.2, -0.5, -0.9], dtype=torch.float64)
    scores = preference_scores(conf, 6, delta=0.4)
    torch.testing.assert_close(scores, reference.preference_scores(conf, 6, delta=0.4))
    # Stable order: a tied response ranked just before its twin counts it once more (ratio 1).
    torch.testing.assert_close(scores[[0, 2, 1]] - scores[[2, 4, 3]], torch.full((3,), 0.4,
                                                                            dtype=torch.float64))


def test_zero_confidence_gives_finite_scores():
    conf = torch.tensor([0.0, -0.1, 0.0, -0.3, 0.0, 0.0, 0.0, 0.0])
    rewards = torch.tensor([1.0, 0.1, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0])
    out = icpo_advantages(conf, rewards, group_offsets=torch.tensor([0, 4, 8]))
    for got, want in zip(out, reference.icpo_advantages(conf, rewards, 4)):
        assert bool(torch.isfinite(got).all())
        torch.testing.assert_close(got, want)
    # All-zero rewards: the clip min(S, |R| / tau) is 0, so ICPO adds nothing and A = 0.
    torch.testing.assert_close(out.advantages[4:], torch.zeros(4))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_equal_rewards_and_singletons_give_zero(dtype):
    rewards = torch.full((12,), 0.7, dtype=dtype)
    for kwargs in ({}, {"unbiased": True}, {"scale": False}):
        torch.testing.assert_close(grpo_advantages(rewards, 4, **kwargs),
                                   torch.zeros(12, dtype=dtype), rtol=0, atol=1e-5)
        single = icpo_advantages(make_group_inputs(3, dtype)[0], rewards[:3], 1, **kwargs)
        assert torch.equal(single.advantages, torch.zeros(3, dtype=dtype))


def test_mixed_dtypes_follow_rewards():
    conf, rewards = make_group_inputs(10, torch.float64)
    out = icpo_advantages(conf, rewards.float(), 5)
    assert all(t.dtype == torch.float32 for t in out)
    check_against_plain(out, conf, rewards.float(), {"group_size": 5}, "float64 conf")


def test_outputs_are_not_differentiable():
    conf, rewards = make_group_inputs(10)
    conf.requires_grad_()
    rewards.requires_grad_()
    out = icpo_advantages(conf, rewards, 5)
    assert not any(t.requires_grad for t in out)
    assert not preference_scores(conf, 5).requires_grad
    assert not grpo_advantages(rewards, 5).requires_grad


def test_parallel_chunks_match_reference_and_one_thread():
    # Big enough for two parallel chunks in each kernel (8192 elements per chunk for the scores,
    # 32768 for GRPO); groups are independent, so the thread count cannot change a single bit.
    conf, rewards = make_group_inputs(2 * 8192 + 8, torch.float32, seed=SEED + 5)
    big_rewards = make_group_inputs(2 * 32768 + 8, torch.float32, seed=SEED + 6)[1]
    out = icpo_advantages(conf, rewards, 8)
    check_against_plain(out, conf, rewards, {"group_size": 8}, "parallel")
    grpo = grpo_advantages(big_rewards, 8)
    check_against_plain(grpo, None, big_rewards, {}, "parallel grpo", grpo_kw={"group_size": 8})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        serial = icpo_advantages(conf, rewards, 8)
        serial_grpo = grpo_advantages(big_rewards, 8)
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(bits(a), bits(b)) for a, b in zip(out, serial))
    assert torch.equal(bits(grpo), bits(serial_grpo))


def _sample_inputs(device="cpu"):
    for dtype, sizes in [(torch.float32, [5, 5, 5]), (torch.float64, [1, 3, 40, 2]),
                         (torch.bfloat16, [4, 4])]:
        conf, rewards = make_group_inputs(sum(sizes), dtype)
        yield conf.to(device), rewards.to(device), offsets_from(sizes).to(device)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_cuda)])
def test_opcheck(device):
    for conf, rewards, offsets in _sample_inputs(device):
        torch.library.opcheck(torch.ops.icpo.preference_scores.default, (conf, offsets, 0.4))
        for scale, unbiased, omega in [(True, False, 1.0), (False, True, 0.0)]:
            torch.library.opcheck(torch.ops.icpo.icpo_advantages.default,
                                  (conf, rewards, offsets, 0.4, 2.0, omega, scale, unbiased, 1e-6))
            torch.library.opcheck(torch.ops.icpo.grpo_advantages.default,
                                  (rewards, offsets, scale, unbiased, 1e-6))


def test_torch_compile_with_fake_kernels():
    conf, rewards = make_group_inputs(15)
    compiled = torch.compile(lambda c, r: icpo_advantages(c, r, 5).advantages * 2,
                             backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(conf, rewards), 2 * icpo_advantages(conf, rewards, 5).advantages)


@needs_cuda
@pytest.mark.parametrize("grouping", GROUPINGS, ids=lambda g: g[0])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_matches_cpu(grouping, dtype):
    n, kw = group_args(grouping)
    conf, rewards = make_group_inputs(n, dtype)
    kw_cuda = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
    for omega in (1.0, 0.0):  # the CUDA kernels held to the rule, as the CPU ones are
        got = icpo_advantages(conf.cuda(), rewards.cuda(), **kw_cuda, omega=omega)
        check_against_plain(got, conf, rewards, {**kw, "omega": omega}, f"cuda {dtype}")
    check_against_plain(preference_scores(conf.cuda(), **kw_cuda), conf, None, kw,
                        f"cuda {dtype}", scores_only=True)
    zero = icpo_advantages(conf.cuda(), rewards.cuda(), **kw_cuda, omega=0.0).advantages
    assert torch.equal(bits(zero), bits(grpo_advantages(rewards.cuda(), **kw_cuda)))


# -- properties (hypothesis) -------------------------------------------------------------------

@st.composite
def ragged_batches(draw):
    """(confidence, rewards, offsets) in float64: 1..6 groups of 1..12 responses."""
    sizes = draw(st.lists(st.integers(1, 12), min_size=1, max_size=6))
    n = sum(sizes)
    conf = draw(st.lists(st.one_of(st.just(0.0), st.floats(-5.0, 0.0)), min_size=n, max_size=n))
    rewards = draw(st.lists(st.floats(-2.0, 2.0), min_size=n, max_size=n))
    return (torch.tensor(conf, dtype=torch.float64), torch.tensor(rewards, dtype=torch.float64),
            offsets_from(sizes))


@settings(max_examples=150, deadline=None)
@given(ragged_batches(), st.floats(0.1, 1.0), st.floats(0.0, 2.0), st.booleans(), st.booleans())
def test_property_matches_reference(batch, delta, omega, scale, unbiased):
    conf, rewards, offsets = batch
    kw = dict(group_offsets=offsets, delta=delta, omega=omega, scale=scale, unbiased=unbiased)
    out = icpo_advantages(conf, rewards, **kw)
    for got, want in zip(out, reference.icpo_advantages(conf, rewards, **kw)):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    assert bool((out.scores >= 0).all())
    grpo = grpo_advantages(rewards, group_offsets=offsets, scale=scale, unbiased=unbiased)
    zero = icpo_advantages(conf, rewards, **{**kw, "omega": 0.0}).advantages
    assert torch.equal(bits(zero), bits(grpo))
    # Advantages are centered within each group, whether or not they are scaled.
    group_ids = torch.repeat_interleave(torch.arange(offsets.numel() - 1), offsets.diff())
    sums = torch.zeros(offsets.numel() - 1, dtype=torch.float64).index_add_(0, group_ids,
                                                                          out.advantages)
    torch.testing.assert_close(sums, torch.zeros_like(sums), rtol=0, atol=1e-6)


@settings(max_examples=100, deadline=None)
@given(ragged_batches(), st.randoms(use_true_random=False))
def test_property_permutation_equivariant_without_ties(batch, rnd):
    conf, rewards, offsets = batch
    conf = conf.clamp(max=-1e-3)
    if conf.unique().numel() != conf.numel():
        return  # with ties, the order between twins is by position: not equivariant
    bounds = offsets.tolist()
    perm = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        idx = list(range(start, end))
        rnd.shuffle(idx)
        perm += idx
    perm = torch.tensor(perm)
    out = icpo_advantages(conf, rewards, group_offsets=offsets)
    shuffled = icpo_advantages(conf[perm], rewards[perm], group_offsets=offsets)
    for a, b in zip(out, shuffled):
        torch.testing.assert_close(a[perm], b, rtol=1e-12, atol=1e-12)


# -- bad input ---------------------------------------------------------------------------------

CALLERS = {
    "preference_scores": lambda c, r, *a, **k: preference_scores(c, *a, **k),
    "icpo_advantages": lambda c, r, *a, **k: icpo_advantages(c, r, *a, **k),
    "grpo_advantages": lambda c, r, *a, **k: grpo_advantages(r, *a, **k),
}
C6, R6 = torch.full((6,), -0.5), torch.ones(6)
BAD_GROUPS = [
    ((), {}, ValueError, "exactly one of group_size or group_offsets, got neither"),
    ((3,), {"group_offsets": torch.tensor([0, 6])}, ValueError, "got both"),
    ((4,), {}, ValueError, "group_size = 4 does not divide N = 6"),
    ((0,), {}, ValueError, "group_size must be positive"),
    ((2.0,), {}, TypeError, "group_size must be an int"),
    ((True,), {}, TypeError, "group_size must be an int"),
    ((), {"group_offsets": torch.tensor([1, 6])}, ValueError, "group_offsets must start at 0"),
    ((), {"group_offsets": torch.tensor([0, 4, 2, 6])}, ValueError,
     r"non-decreasing, but group_offsets\[2\] = 2 < group_offsets\[1\] = 4"),
    ((), {"group_offsets": torch.tensor([0, 3, 5])}, ValueError, "group_offsets must end at N = 6"),
    ((), {"group_offsets": torch.tensor([0, 3, 3, 6])}, ValueError, "group 1 is empty"),
    ((), {"group_offsets": torch.tensor([0.0, 6.0])}, TypeError, "group_offsets must be int32"),
    ((), {"group_offsets": torch.tensor([[0, 6]])}, ValueError, "group_offsets must be 1-D"),
    ((), {"group_offsets": torch.tensor([0, 6], device="meta")}, ValueError,
     "group_offsets must be on cpu"),
]


@pytest.mark.parametrize("op", CALLERS)
@pytest.mark.parametrize("args, kwargs, exc, match", BAD_GROUPS)
def test_bad_grouping(op, args, kwargs, exc, match):
    with pytest.raises(exc, match=match) as info:
        CALLERS[op](C6, R6, *args, **kwargs)
    assert op in str(info.value)


def with_value(x, i, v):
    x = x.clone()
    x[i] = v
    return x


BAD_DATA = [
    ("preference_scores", with_value(C6, 2, float("nan")), R6, r"confidence must be finite, got "
     r"confidence\[2\] = nan"),
    ("icpo_advantages", with_value(C6, 4, float("-inf")), R6, r"confidence\[4\] = -inf"),
    ("icpo_advantages", with_value(C6, 3, 0.25), R6, r"confidence must be <= 0 .* confidence\[3\]"),
    ("preference_scores", with_value(C6, 0, 1e-9), R6, r"confidence must be <= 0"),
    ("icpo_advantages", C6, with_value(R6, 1, float("inf")), r"rewards must be finite, got "
     r"rewards\[1\] = inf"),
    ("grpo_advantages", C6, with_value(R6, 5, float("nan")), r"rewards\[5\] = nan"),
    ("icpo_advantages", C6.long(), R6, "confidence must be float32"),
    ("grpo_advantages", C6, R6.int(), "rewards must be float32"),
    ("icpo_advantages", C6.view(2, 3), R6.view(2, 3), r"confidence must be 1-D \[N\]"),
    ("grpo_advantages", C6, R6.view(3, 2), r"rewards must be 1-D \[N\]"),
    ("icpo_advantages", C6[:5], R6, "confidence and rewards must have the same shape"),
    ("icpo_advantages", C6.to("meta"), R6, "confidence and rewards must be on one device"),
    ("preference_scores", C6.tolist(), R6, "confidence must be a torch.Tensor"),
]


@pytest.mark.parametrize("op, conf, rewards, match", BAD_DATA)
def test_bad_data(op, conf, rewards, match):
    with pytest.raises((ValueError, TypeError), match=match):
        CALLERS[op](conf, rewards, group_size=6 if isinstance(conf, list) else 3)


def test_raw_op_refuses_out_of_range_offsets():
    with pytest.raises(RuntimeError, match="group_offsets must end at"):
        torch.ops.icpo.grpo_advantages(R6, torch.tensor([0, 9]), True, False, 1e-6)
    with pytest.raises(RuntimeError, match="confidence must be"):
        torch.ops.icpo.icpo_advantages(C6.double(), R6, torch.tensor([0, 6]), 0.4, 2.0, 1.0,
                                       True, False, 1e-6)
