"""icpo.rollout.sampling: the inverse-CDF draw (one uniform per row) is exact, reproducible from a
generator's seed, never draws a zero-probability token, takes fp32 and bf16 probabilities and
refuses NaN / inf rows. top-k / top-p against transformers' warpers: tests/test_rollout.py."""

import pytest
import torch

from icpo.rollout.base import SamplingParams
from icpo.rollout.sampling import BLOCK, inverse_cdf, sample_categorical, sample_next


def awkward_probs(vocab=37, seed=0):
    """Rows with zeros (whole blocks of them at block=4), tiny entries and one large entry."""
    g = torch.Generator().manual_seed(seed)
    p = torch.rand(3, vocab, generator=g) ** 3
    p[:, 4:12] = 0.0  # two whole blocks of 4 empty
    p[0, 20] = 1e-6
    p[1, -1] = 5.0  # the last entry, in the tail block
    p[2, 0] = 0.0
    return p


def chi_square_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs.double() / probs.double().sum() * counts.sum()
    keep = expected > 0
    stat = ((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum()
    df = int(keep.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2.0, dtype=torch.float64), stat / 2))


@pytest.mark.parametrize("block", [4, 7, BLOCK])  # many blocks + a tail, a prime, one tail block
def test_quantiles_of_a_uniform_grid_match_the_cdf(block):
    """u on a grid of M midpoints: token j gets round(p_j * M) of them, within one (exact)."""
    probs = awkward_probs()
    m = 100_000
    u = (torch.arange(m, dtype=torch.float64) + 0.5) / m
    for row in range(probs.shape[0]):
        drawn = inverse_cdf(probs[row].expand(m, -1), u, block=block)
        counts = torch.bincount(drawn, minlength=probs.shape[1]).double()
        want = probs[row].double() / probs[row].double().sum() * m
        assert (counts - want).abs().max() <= 1.0, f"row {row}: {counts.tolist()}"
        assert not counts[probs[row] == 0].any()


@pytest.mark.parametrize("block", [4, BLOCK])
def test_draws_follow_the_distribution(block):
    """Chi-square over 200k seeded draws per row (seed 1234)."""
    probs = awkward_probs()
    g = torch.Generator().manual_seed(1234)
    n = 200_000
    for row in range(probs.shape[0]):
        drawn = sample_categorical(probs[row].expand(n, -1), g, block=block)
        counts = torch.bincount(drawn, minlength=probs.shape[1]).double()
        assert not counts[probs[row] == 0].any(), "a zero-probability token was drawn"
        p = chi_square_pvalue(counts, probs[row])
        assert p > 1e-4, f"row {row}: chi-square p = {p:.2e}"


def test_edges_of_the_unit_interval():
    """u = 0 gives the first token of mass > 0, u just below 1 the last one (rounding of
    u * total up to total must not run past it)."""
    probs = torch.zeros(2, 3000)
    probs[:, 1030] = probs[:, 2047] = probs[:, 2990] = 1.0 / 3
    u = torch.tensor([0.0, 1.0 - 2.0 ** -53], dtype=torch.float64)
    assert inverse_cdf(probs, u).tolist() == [1030, 2990]
    assert inverse_cdf(probs, u, block=4).tolist() == [1030, 2990]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_draws_are_exact_and_reproducible():
    probs = awkward_probs(vocab=5000).cuda()
    m = 20_000
    u = ((torch.arange(m, dtype=torch.float64) + 0.5) / m).cuda()
    drawn = inverse_cdf(probs[1].expand(m, -1), u, block=64)
    counts = torch.bincount(drawn, minlength=probs.shape[1]).double()
    want = probs[1].double() / probs[1].double().sum() * m
    assert (counts - want).abs().max() <= 1.0 and not counts[probs[1] == 0].any()
    draw = lambda: sample_categorical(  # noqa: E731  (a one-line helper)
        probs, torch.Generator("cuda").manual_seed(1))
    assert torch.equal(draw(), draw()) and draw().device.type == "cuda"


def test_seeded_draws_are_reproducible():
    probs = torch.rand(64, 5000, generator=torch.Generator().manual_seed(0))
    draw = lambda seed: sample_categorical(  # noqa: E731  (a one-line helper)
        probs, torch.Generator().manual_seed(seed))
    assert torch.equal(draw(7), draw(7))
    assert not torch.equal(draw(7), draw(8))
    torch.manual_seed(3)
    a = sample_categorical(probs)
    torch.manual_seed(3)
    assert torch.equal(a, sample_categorical(probs))  # the default generator when None


def test_one_uniform_per_row():
    """The draw consumes exactly b uniforms: the generator's next number is the (b+1)-th."""
    g = torch.Generator().manual_seed(5)
    sample_categorical(torch.ones(6, 300_000), g)
    expected = torch.rand(7, dtype=torch.float64, generator=torch.Generator().manual_seed(5))[6]
    assert torch.rand(1, dtype=torch.float64, generator=g)[0] == expected


@pytest.mark.parametrize("vocab", [1, 5, BLOCK, BLOCK + 1, 151936])
def test_single_nonzero_entry(vocab):
    where = torch.tensor([0, vocab - 1, vocab // 2, (vocab * 2) // 3])
    probs = torch.zeros(4, vocab)
    probs[torch.arange(4), where] = torch.tensor([1.0, 1e-30, 3.0, 0.5])
    for seed in range(5):
        drawn = sample_categorical(probs, torch.Generator().manual_seed(seed))
        assert drawn.tolist() == where.tolist()


def test_bf16_probabilities():
    """bf16 rows are drawn from their own values (block sums accumulate in fp32): the same draws
    as the fp32 copy of those values, and a zero never drawn."""
    probs = awkward_probs(vocab=2500).bfloat16()
    probs[:, 1500:2100] = 0
    rows = probs.repeat(200, 1)
    a = sample_categorical(rows, torch.Generator().manual_seed(9))
    b = sample_categorical(rows.float(), torch.Generator().manual_seed(9))
    assert a.dtype == torch.int64 and torch.equal(a, b)
    assert not ((a >= 1500) & (a < 2100)).any()


@pytest.mark.parametrize("bad", ["nan", "inf", "all_neg_inf"])
def test_non_finite_logits_are_refused(bad):
    logits = torch.randn(3, 2000)
    if bad == "nan":
        logits[1, 1500] = float("nan")
    elif bad == "inf":
        logits[1, 7] = float("inf")
    else:
        logits[1] = float("-inf")
    for params in (SamplingParams(), SamplingParams(temperature=0.7, top_k=50, top_p=0.9)):
        with pytest.raises(ValueError, match=r"NaN or inf logits \(rows \[1\]"):
            sample_next(logits, params)


def test_nan_and_zero_probabilities_are_refused():
    probs = torch.rand(4, 100)
    probs[2, 3] = float("nan")
    probs[3] = 0
    with pytest.raises(ValueError, match=r"rows \[2, 3\]"):
        sample_categorical(probs)
    with pytest.raises(ValueError, match="probs: expected"):
        sample_categorical(torch.rand(100))


def test_sample_next_distribution_at_temperature():
    """softmax(logits / T) on a vocabulary of several blocks, chi-square (seed 11)."""
    g = torch.Generator().manual_seed(11)
    logits = torch.randn(1, 3 * BLOCK + 5, generator=g) * 2
    n, chunk = 40_000, 4_000  # in chunks: a [40000, V] softmax would take 0.5 GB
    drawn = torch.cat([sample_next(logits.expand(chunk, -1), SamplingParams(temperature=0.8), g)
                       for _ in range(n // chunk)])
    counts = torch.bincount(drawn, minlength=logits.shape[1]).double()
    # Pool the rare tokens so that every cell expects >= 5 draws.
    probs = (logits[0].double() / 0.8).softmax(-1)
    order = probs.argsort()
    cells = (probs[order].cumsum(0) * n / 5).floor().clamp(max=n // 5).long()
    pooled_c = torch.zeros(int(cells.max()) + 1, dtype=torch.float64)
    pooled_c.index_add_(0, cells, counts[order])
    pooled_p = torch.zeros_like(pooled_c).index_add_(0, cells, probs[order])
    p = chi_square_pvalue(pooled_c, pooled_p)
    assert p > 1e-4, f"chi-square p = {p:.2e}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("params", [SamplingParams(), SamplingParams(temperature=0.6, top_k=9),
                                    SamplingParams(temperature=1.3, top_p=0.8)])
def test_sample_next_leaves_the_logits_alone(dtype, params):
    logits = torch.randn(4, 3000).to(dtype)
    before = logits.clone()
    drawn = sample_next(logits, params, torch.Generator().manual_seed(0))
    assert torch.equal(logits, before) and drawn.shape == (4,)
    if params.top_k > 0:
        kth = torch.topk(logits.float(), params.top_k, dim=-1).values[:, -1]
        assert (logits.float().gather(1, drawn[:, None]).squeeze(1) >= kth).all()


def test_greedy_is_argmax():
    logits = torch.randn(5, 300)
    assert torch.equal(sample_next(logits, SamplingParams(temperature=0.0)), logits.argmax(-1))
