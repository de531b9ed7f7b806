"""icpo.ops.segment_mean against its reference (values, gradients, opcheck, errors), and the
pack_padded / unpack_to_padded helpers (packed == padded)."""

from __future__ import annotations

import pytest
import torch
from _accuracy import SEED, assert_within_2x_plain, rounding_floor

import icpo.ops  # noqa: F401  (registers torch.ops.icpo.*)
from icpo.ops import pack_padded, reference, segment_mean, unpack_to_padded

HAS_CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device on this machine")
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
# Awkward segmentations: a single element, all length-1, ragged with primes, one long segment
# (spans many vector widths), many segments (several parallel chunks).
LENGTHS = [[1], [1, 1, 1], [5, 1, 7, 3], [97, 1, 2, 31], [3001], [40] * 2000]


def cu_from(lengths, dtype=torch.int32, device="cpu"):
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int64)
    cu[1:] = torch.tensor(lengths).cumsum(0)
    return cu.to(dtype=dtype, device=device)


def make_values(total, dtype=torch.float32, seed=SEED, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(total, generator=gen, dtype=torch.float64) * 3 - 1).to(dtype).to(device)


def check_segment_mean(lengths, dtype, index_dtype=torch.int64, device="cpu", what="",
                       seed=SEED):
    """segment_mean and its gradient on random values, held to the rule against plain PyTorch in
    values' dtype (``reference.segment_mean``: torch's mean per segment) and float64."""
    values = make_values(sum(lengths), dtype, seed=seed)
    upstream = make_values(len(lengths), dtype, seed=seed + 1)
    cu = cu_from(lengths, index_dtype)
    x = values.to(device).requires_grad_()
    out = segment_mean(x, cu.to(device))
    (grad,) = torch.autograd.grad(out, x, upstream.to(device))
    assert out.dtype == grad.dtype == dtype and out.shape == (len(lengths),)
    results = {}
    for name, v, g in (("truth", values.double(), upstream.double()), ("plain", values, upstream)):
        v = v.clone().requires_grad_()
        mean = reference.segment_mean(v, cu)
        results[name] = (mean, torch.autograd.grad(mean, v, g)[0])
    what = f"{what} {device} {dtype} {index_dtype} B={len(lengths)} T={sum(lengths)}"
    floor = rounding_floor(dtype, values.double().abs().max().item(), max(lengths))
    assert_within_2x_plain(out, results["plain"][0], results["truth"][0], floor=floor,
                           what=what, seed=seed)
    floor = rounding_floor(dtype, upstream.double().abs().max().item())
    assert_within_2x_plain(grad, results["plain"][1], results["truth"][1], floor=floor,
                           what=f"{what} grad", seed=seed)


@pytest.mark.parametrize("lengths", LENGTHS, ids=lambda lens: f"B{len(lens)}T{sum(lens)}")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("index_dtype", (torch.int32, torch.int64), ids=str)
def test_matches_reference(lengths, dtype, index_dtype):
    check_segment_mean(lengths, dtype, index_dtype)


def test_length_one_segments_are_the_values():
    values = make_values(9)
    torch.testing.assert_close(segment_mean(values, cu_from([1] * 9)), values, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gradient_matches_reference_autograd(dtype):
    check_segment_mean([4, 1, 9, 2], dtype)  # the gradient of short, ragged segments


def test_strided_values_and_expanded_upstream_gradient():
    cu = cu_from([2, 3], torch.int64)
    base = make_values(10).requires_grad_()
    out = segment_mean(base[::2], cu)
    torch.testing.assert_close(out, reference.segment_mean(base.detach()[::2], cu))
    out.sum().backward()  # the upstream gradient is an expanded (stride-0) view
    want = torch.zeros(10)
    want[::2] = torch.tensor([1 / 2] * 2 + [1 / 3] * 3)
    torch.testing.assert_close(base.grad, want)


def test_gradcheck_and_gradgradcheck_float64():
    cu = cu_from([3, 1, 5], torch.int64)
    values = make_values(9, torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(lambda v: segment_mean(v, cu), (values,))
    assert torch.autograd.gradgradcheck(lambda v: segment_mean(v, cu), (values,))


def _sample_inputs(device="cpu"):
    for lengths, dtype, index_dtype in [([3, 1, 5], torch.float32, torch.int32),
                                        ([1], torch.float64, torch.int64),
                                        ([7, 2], torch.bfloat16, torch.int64)]:
        values = make_values(sum(lengths), dtype, device=device)
        yield values, cu_from(lengths, index_dtype, device)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_cuda)])
def test_opcheck(device):
    for values, cu in _sample_inputs(device):
        torch.library.opcheck(torch.ops.icpo.segment_mean.default, (values, cu))
        grad_values = values.detach().clone().requires_grad_(values.dtype == torch.float64)
        torch.library.opcheck(torch.ops.icpo.segment_mean.default, (grad_values, cu))
        grad = make_values(cu.numel() - 1, values.dtype, seed=SEED + 2, device=device)
        torch.library.opcheck(torch.ops.icpo.segment_mean_bwd.default, (grad, cu, values.numel()))


def test_torch_compile_with_fake_kernels():
    cu = cu_from([3, 1, 5])
    values = make_values(9).requires_grad_()
    compiled = torch.compile(lambda v, c: segment_mean(v, c) * 2, backend="aot_eager",
                             fullgraph=True)
    out = compiled(values, cu)
    torch.testing.assert_close(out, 2 * reference.segment_mean(values.detach(), cu))
    out.sum().backward()
    torch.testing.assert_close(values.grad, torch.tensor([2 / 3] * 3 + [2.0] + [2 / 5] * 5))


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_matches_cpu(dtype):
    check_segment_mean([97, 1, 2, 31, 3001], dtype, device="cuda")


@pytest.mark.parametrize("cu, match", [
    (torch.tensor([1, 3, 5]), "cu_seqlens must start at 0"),
    (torch.tensor([0, 4, 3, 5]), r"non-decreasing, but cu_seqlens\[2\] = 3 < cu_seqlens\[1\] = 4"),
    (torch.tensor([0, 2, 4]), r"cu_seqlens must end at T = values\.numel\(\) = 5"),
    (torch.tensor([0, 2, 2, 5]), r"cu_seqlens\[1\] == cu_seqlens\[2\] = 2: segment 1 is empty"),
    (torch.tensor([0.0, 5.0]), "cu_seqlens must be int32 or int64"),
    (torch.tensor([[0, 5]]), "cu_seqlens must be 1-D"),
    (torch.zeros(0, dtype=torch.int64), "cu_seqlens must be 1-D with B"),
    (torch.tensor([0, 5], device="meta"), "cu_seqlens must be on cpu"),
])
def test_bad_cu_seqlens(cu, match):
    with pytest.raises((ValueError, TypeError), match=match):
        segment_mean(make_values(5), cu)


@pytest.mark.parametrize("values, match", [
    (torch.arange(5), "values must be float32"),
    (torch.zeros(5, 1), r"values must be 1-D \(packed \[T\]\)"),
    ([0.0] * 5, "values must be a torch.Tensor"),
])
def test_bad_values(values, match):
    with pytest.raises((ValueError, TypeError), match=match):
        segment_mean(values, torch.tensor([0, 5]))


def test_kernel_bounds_checks_guard_the_raw_op():
    # The raw op bypasses the wrapper's checks; it must still refuse out-of-range offsets.
    with pytest.raises(RuntimeError, match="cu_seqlens must end at T = 5"):
        torch.ops.icpo.segment_mean(make_values(5), torch.tensor([0, 9]))
    with pytest.raises(RuntimeError, match="non-decreasing"):
        torch.ops.icpo.segment_mean_bwd(torch.ones(2), torch.tensor([0, 4, 3]), 3)


# -- packing helpers ---------------------------------------------------------------------------

def random_batch(batch=4, length=7, extra=(3,), seed=0):
    gen = torch.Generator().manual_seed(seed)
    padded = torch.randn(batch, length, *extra, generator=gen)
    mask = torch.rand(batch, length, generator=gen) > 0.4  # holes anywhere, not aligned
    mask[0] = True
    mask[1] = False
    mask[2, 0] = False
    mask[2, -1] = True
    return padded, mask


@pytest.mark.parametrize("extra", [(), (3,), (2, 2)])
def test_pack_keeps_masked_positions_in_order(extra):
    padded, mask = random_batch(extra=extra)
    packed, cu = pack_padded(padded, mask)
    assert cu.dtype == torch.int32 and cu.tolist()[0] == 0
    assert cu.diff().tolist() == mask.sum(1).tolist()
    for b in range(padded.shape[0]):
        assert torch.equal(packed[cu[b]:cu[b + 1]], padded[b][mask[b]])


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.int64, torch.float32, torch.uint8])
def test_round_trip(mask_dtype):
    padded, mask = random_batch()
    packed, cu = pack_padded(padded, mask.to(mask_dtype))
    again, left_mask = unpack_to_padded(packed, cu, padding_value=-7.0)
    assert left_mask.shape == (4, int(mask.sum(1).max()))
    assert torch.equal(left_mask.sum(1), mask.sum(1))
    assert torch.equal(again[left_mask], packed)
    assert bool((again[~left_mask] == -7.0).all())
    repacked, recu = pack_padded(again, left_mask)
    assert torch.equal(repacked, packed) and torch.equal(recu, cu)


def test_packed_mean_equals_padded_masked_mean():
    padded, mask = random_batch(extra=())
    mask[1, 2] = True  # segment_mean refuses empty segments
    packed, cu = pack_padded(padded, mask)
    want = (padded * mask).sum(1) / mask.sum(1)
    torch.testing.assert_close(segment_mean(packed, cu), want)


def test_unpack_with_int64_offsets_and_empty_segments():
    packed = torch.arange(6.0)
    padded, mask = unpack_to_padded(packed, torch.tensor([0, 0, 4, 4, 6]))
    assert torch.equal(padded, torch.tensor([[0.0] * 4, [0, 1, 2, 3], [0.0] * 4, [4, 5, 0, 0]]))
    assert mask.sum(1).tolist() == [0, 4, 0, 2]
    empty, empty_mask = unpack_to_padded(torch.zeros(0, 2), torch.tensor([0]))
    assert empty.shape == (0, 0, 2) and empty_mask.shape == (0, 0)


def test_pack_bad_inputs():
    padded, mask = random_batch()
    with pytest.raises(ValueError, match=r"mask must have shape \[B, L\] = \(4, 7\)"):
        pack_padded(padded, mask[:, :3])
    with pytest.raises(ValueError, match="mask must hold only 0 and 1"):
        pack_padded(padded, mask.long() * 2)
    with pytest.raises(ValueError, match=r"padded must be \[B, L, ...\]"):
        pack_padded(torch.zeros(3), torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="cu_seqlens must end at T = packed.shape"):
        unpack_to_padded(torch.zeros(5), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="cu_seqlens must be non-decreasing"):
        unpack_to_padded(torch.zeros(5), torch.tensor([0, 3, 2, 5]))
