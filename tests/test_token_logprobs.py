"""icpo.ops.token_logprobs against icpo.ops.reference.token_logprobs: values, gradients, errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _accuracy import EPS32, SEED, assert_within_2x_plain
from torch.utils._python_dispatch import TorchDispatchMode

import icpo.ops  # noqa: F401  (registers torch.ops.icpo.*)
from icpo.ops import reference, token_logprobs

LOWP = (torch.bfloat16, torch.float16)
ALL_DTYPES = (torch.float32,) + LOWP
# (leading shape, V): T = 1, V = 1, primes, V not a multiple of the vector width (16 or 32 lanes
# per step) or of the kernel's 1024-element block, several blocks with a ragged tail, 3-D input.
SHAPES = [((1,), 1), ((1,), 97), ((6,), 1), ((7,), 1031), ((13,), 33), ((3,), 1025),
          ((3,), 2048), ((4,), 4 * 1024 + 31), ((2, 5), 97), ((2, 3), 4099)]


def make_inputs(lead, vocab, dtype=torch.float32, scale=4.0, seed=SEED, ignore_every=0):
    """Random logits (N(0, scale^2)) and labels; every ``ignore_every``-th position ignored."""
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(*lead, vocab, generator=gen) * scale).to(dtype)
    labels = torch.randint(0, vocab, lead, generator=gen)
    if ignore_every:
        labels.view(-1)[::ignore_every] = -100
    return logits, labels


def truth(logits, labels, temperature=1.0, ignore_index=-100):
    """fp64 log-softmax of the (exactly upcast) logits: the yardstick for errors."""
    z = logits.double() / temperature
    logz = torch.log_softmax(z, dim=-1)
    ignored = labels == ignore_index
    logp = logz.gather(-1, labels.masked_fill(ignored, 0).unsqueeze(-1)).squeeze(-1)
    entropy = -(logz.exp() * logz).sum(-1)
    return logp.masked_fill(ignored, 0.0), entropy.masked_fill(ignored, 0.0)


def plain(logits, labels, temperature=1.0, ignore_index=-100):
    """Plain PyTorch at the kernel's precision, the rule's yardstick: log_softmax, gather and
    entropy in fp32 (the kernel accumulates in fp32 whatever the input dtype, and writes fp32
    outputs), which is ``reference.token_logprobs``; its gradient is rounded to the input dtype
    once, as the kernel's is."""
    return reference.token_logprobs(logits, labels, temperature=temperature,
                                    ignore_index=ignore_index)


def forward_floor(logits, temperature=1.0):
    """The rule's floor for logp and entropy (tests/_accuracy.py): one fp32 rounding of the
    largest scaled logit |logits| / temperature, which the fp32 kernel cannot resolve."""
    return EPS32 * logits.double().abs().max().item() / temperature if logits.numel() else 0.0


def backward_floor(logits, labels, temperature, g_logp, g_entropy, entropy, ignore_index=-100):
    """The rule's floor for grad_logits: what the backward's per-row inputs from the forward can
    add to a gradient element, to first order. The kernel reads each row's log-sum-exp and
    entropy as fp32 numbers, which plain PyTorch never rounds (it subtracts the row max first and
    re-sums in its backward): the lse's rounding (one fp32 ulp of |lse|) moves every log p of
    the row, which reaches a gradient element scaled by inv_t (|g_logp| + |g_H| (H + 2)); the
    forward's entropy error (held to the rule on its own) reaches it scaled by inv_t |g_H|. At
    temperatures != 1 on rows with one dominant logit this makes the fp32 gradient's error up
    to ~16x plain fp32's (measured over 400 seeds)."""
    z = logits.detach().double().reshape(-1, logits.shape[-1]) / temperature
    keep = labels.reshape(-1).cpu() != ignore_index
    if z.numel() == 0 or not bool(keep.any()):
        return 0.0
    lse = torch.logsumexp(z, -1).cpu()
    logz = torch.log_softmax(z, -1)
    h = -(logz.exp() * logz).sum(-1).cpu()
    zeros = torch.zeros_like(h)
    g1 = zeros if g_logp is None else g_logp.detach().double().reshape(-1).abs().cpu()
    g2 = zeros if g_entropy is None else g_entropy.detach().double().reshape(-1).abs().cpu()
    dh = (entropy.detach().double().reshape(-1).cpu() - h).abs()
    per_row = (g1 + g2 * (h + 2)) * EPS32 * lse.abs() + g2 * dh
    return per_row[keep].max().item() / temperature


def check_forward(logp, entropy, logits, labels, temperature=1.0, ignore_index=-100, what=""):
    """The rule (tests/_accuracy.py) for the forward's outputs on these inputs."""
    t_logp, t_entropy = truth(logits, labels, temperature, ignore_index)
    p_logp, p_entropy = plain(logits, labels, temperature, ignore_index)
    floor = forward_floor(logits, temperature)
    assert_within_2x_plain(logp, p_logp, t_logp, floor=floor, what=f"{what} logp")
    assert_within_2x_plain(entropy, p_entropy, t_entropy, floor=floor, what=f"{what} entropy")


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("lead,vocab", SHAPES)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_forward_matches_reference(lead, vocab, dtype, temperature):
    logits, labels = make_inputs(lead, vocab, dtype, ignore_every=5)
    logp, entropy = token_logprobs(logits, labels, temperature=temperature)
    assert logp.dtype == entropy.dtype == torch.float32
    assert logp.shape == entropy.shape == labels.shape
    check_forward(logp, entropy, logits, labels, temperature, what=f"{dtype} {lead} x {vocab}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_qwen_sized_vocabulary(dtype):
    logits, labels = make_inputs((3,), 151936, dtype, scale=3.0)
    logp, entropy = token_logprobs(logits, labels)
    check_forward(logp, entropy, logits, labels, what=f"{dtype}")


def test_ignored_positions_give_zero_and_custom_ignore_index():
    logits, labels = make_inputs((9,), 50)
    labels[labels == 7] = 8
    labels[[0, 4, 8]] = 7  # 7 is the ignore index here, so exactly these positions are ignored
    logp, entropy = token_logprobs(logits, labels, ignore_index=7)
    ignored = labels == 7
    assert torch.equal(logp[ignored], torch.zeros(3))
    assert torch.equal(entropy[ignored], torch.zeros(3))
    assert (logp[~ignored] < 0).all() and (entropy[~ignored] > 0).all()
    check_forward(logp, entropy, logits, labels, ignore_index=7)


def test_label_at_argmax_and_single_token_vocabulary():
    logits, labels = make_inputs((4,), 1031, scale=1.0)
    logits[torch.arange(4), labels] = 40.0  # the label dominates: logp -> 0 from below
    logp, entropy = token_logprobs(logits, labels)
    t_logp, t_entropy = truth(logits, labels)
    assert (logp <= 0).all() and (logp > -1e-6).all()
    torch.testing.assert_close(logp.double(), t_logp, atol=1e-7, rtol=1e-3)
    torch.testing.assert_close(entropy.double(), t_entropy, atol=1e-7, rtol=1e-3)
    one, label0 = make_inputs((5,), 1, scale=10.0)
    logp1, entropy1 = token_logprobs(one, label0)
    assert torch.equal(logp1, torch.zeros(5)) and torch.equal(entropy1, torch.zeros(5))


def test_empty_batch_and_return_entropy_false():
    logp, entropy = token_logprobs(torch.zeros(0, 11), torch.zeros(0, dtype=torch.long))
    assert logp.shape == entropy.shape == (0,)
    logits, labels = make_inputs((3,), 11)
    logp, entropy = token_logprobs(logits, labels, return_entropy=False)
    assert entropy is None
    torch.testing.assert_close(logp, reference.token_logprobs(logits, labels)[0])


class _RecordIcpoCalls(TorchDispatchMode):
    """Records the tensors handed to torch.ops.icpo.token_logprobs_fwd."""

    def __init__(self):
        super().__init__()
        self.inputs = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.icpo.token_logprobs_fwd.default:
            self.inputs.append(args[0])
        return func(*args, **(kwargs or {}))


def test_strided_views_are_read_in_place():
    # Read in place, and the very numbers of a contiguous copy (rows are computed alike).
    base, labels = make_inputs((4, 10), 101)
    logits, labels = base[:, ::2, :], labels[:, ::2]  # [4, 5, 101]: rows 2 * 101 apart
    with _RecordIcpoCalls() as rec:
        logp, entropy = token_logprobs(logits, labels)
    (seen,) = rec.inputs
    assert seen.data_ptr() == logits.data_ptr() and seen.stride() == (202, 1)
    want_logp, want_entropy = token_logprobs(logits.contiguous(), labels)
    assert torch.equal(logp, want_logp) and torch.equal(entropy, want_entropy)
    cols, col_labels = base[0, :, :50], labels[0].clamp(max=49).repeat(2)  # [10, 50], stride 101
    assert torch.equal(token_logprobs(cols, col_labels)[0],
                       token_logprobs(cols.contiguous(), col_labels)[0])


def test_same_result_on_one_and_many_threads():
    logits, labels = make_inputs((37,), 3001, torch.bfloat16)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = token_logprobs(logits, labels)
    finally:
        torch.set_num_threads(threads)
    many = token_logprobs(logits, labels)
    assert torch.equal(one[0], many[0]) and torch.equal(one[1], many[1])


def _grads(fn, logits, labels, temperature, g_logp, g_entropy, dtype=None):
    x = logits.detach().to(dtype or logits.dtype).requires_grad_(True)
    logp, entropy = fn(x, labels, temperature=temperature,
                       return_entropy=g_entropy is not None)
    loss = 0
    if g_logp is not None:
        loss = loss + (logp * g_logp.to(logp.dtype)).sum()
    if g_entropy is not None:
        loss = loss + (entropy * g_entropy.to(entropy.dtype)).sum()
    return torch.autograd.grad(loss, x)[0]


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("lead,vocab", [((1,), 1), ((7,), 1031), ((2, 3), 4099), ((5,), 97)])
@pytest.mark.parametrize("which", ["both", "logp_only", "entropy_only"])
def test_gradients_match_autograd_through_reference(lead, vocab, dtype, which):
    logits, labels = make_inputs(lead, vocab, dtype, scale=2.0, ignore_every=4)
    before = logits.clone()
    gen = torch.Generator().manual_seed(SEED + 1)
    g_logp = torch.randn(lead, generator=gen) if which != "entropy_only" else None
    g_entropy = torch.randn(lead, generator=gen) if which != "logp_only" else None
    ours = _grads(token_logprobs, logits, labels, 0.8, g_logp, g_entropy)
    assert ours.dtype == dtype and ours.shape == logits.shape
    assert torch.equal(logits, before)  # the caller's logits are never modified
    assert torch.equal(ours[labels == -100], torch.zeros_like(ours[labels == -100]))
    check_backward(ours, logits, labels, 0.8, g_logp, g_entropy, what=f"{dtype} {which}")


def check_backward(grad, logits, labels, temperature, g_logp, g_entropy, what=""):
    """The rule (tests/_accuracy.py) for grad_logits of sum(g_logp * logp + g_entropy * H)."""
    best = _grads(truth_fn, logits, labels, temperature, g_logp, g_entropy, dtype=torch.float64)
    plain_grad = _grads(reference.token_logprobs, logits, labels, temperature, g_logp, g_entropy)
    entropy = token_logprobs(logits, labels, temperature=temperature)[1]  # the kernel's
    floor = backward_floor(logits, labels, temperature, g_logp, g_entropy, entropy)
    assert_within_2x_plain(grad, plain_grad, best, floor=floor, what=f"{what} grad")


def truth_fn(x, labels, *, temperature, return_entropy):
    logp, entropy = truth(x, labels, temperature)
    return logp, (entropy if return_entropy else None)


@pytest.mark.parametrize("lead,vocab", [((4,), 13), ((2, 3), 5), ((1,), 1), ((3,), 40)])
def test_gradcheck_float64(lead, vocab):
    logits, labels = make_inputs(lead, vocab, torch.float64, scale=1.5)
    labels.view(-1)[0] = -100
    x = logits.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: token_logprobs(t, labels, temperature=0.9), (x,))
    assert torch.autograd.gradcheck(lambda t: token_logprobs(t, labels, return_entropy=False)[0],
                                    (x,))


def _opcheck_samples():
    samples = []
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        logits, labels = make_inputs((6,), 37, dtype, ignore_every=3)
        samples.append((logits.requires_grad_(dtype != torch.float16), labels))
    wide, labels = make_inputs((5,), 70)
    samples.append((wide[:, :41], labels.clamp(max=40)))  # row stride != V
    return samples


@pytest.mark.parametrize("sample", range(5))
def test_opcheck_both_ops(sample):
    logits, labels = _opcheck_samples()[sample]
    torch.library.opcheck(torch.ops.icpo.token_logprobs_fwd.default, (logits, labels, 1.25, -100))
    x = logits.detach()
    _, entropy, lse = torch.ops.icpo.token_logprobs_fwd(x, labels, 1.25, -100)
    gen = torch.Generator().manual_seed(SEED)
    g_logp, g_entropy = torch.randn(2, x.shape[0], generator=gen, dtype=lse.dtype)
    torch.library.opcheck(torch.ops.icpo.token_logprobs_bwd.default,
                          (g_logp, g_entropy, x, labels, lse, entropy, 1.25, -100))


def test_compiles_without_graph_breaks():
    logits, labels = make_inputs((4, 3), 29)
    x = logits.clone().requires_grad_(True)

    def loss_fn(t):
        logp, entropy = token_logprobs(t, labels, temperature=0.5)
        return logp.sum() + 0.1 * entropy.sum()

    compiled = torch.compile(loss_fn, backend="aot_eager", fullgraph=True)
    got = torch.autograd.grad(compiled(x), x)[0]
    want = torch.autograd.grad(loss_fn(x), x)[0]
    torch.testing.assert_close(got, want)


def _poke(x, index, value):
    """A copy of x with x[index] replaced by value."""
    x = x.clone()
    x[index] = value
    return x


VOCAB_BAD = 100  # columns 0-63 go through the vector loop, 64-99 through the scalar tail
BAD_INPUTS = [
    (lambda x, y: (x.long(), y, {}), "logits"),
    (lambda x, y: (x[0], y[0], {}), "logits"),
    (lambda x, y: (x[None, None], y[None, None], {}), "logits"),
    (lambda x, y: (x[:, :0], y, {}), "logits"),
    (lambda x, y: (x, y.int(), {}), "labels"),
    (lambda x, y: (x, y.float(), {}), "labels"),
    (lambda x, y: (x, y[:-1], {}), "labels"),
    (lambda x, y: (x, y.to("meta"), {}), "labels"),
    (lambda x, y: (x, _poke(y, 2, VOCAB_BAD), {}), "labels"),
    (lambda x, y: (x, _poke(y, 1, -1), {}), "labels"),
    (lambda x, y: (_poke(x, (1, 5), float("nan")), y, {}), "logits"),
    (lambda x, y: (_poke(x, (1, 90), float("nan")), y, {}), "logits"),
    (lambda x, y: (_poke(x, (3, 7), float("inf")), y, {}), "logits"),
    (lambda x, y: (_poke(x, (3, 99), float("inf")), y, {}), "logits"),
    (lambda x, y: (_poke(x, (0, 33), -float("inf")), y, {}), "logits"),
    (lambda x, y: (_poke(x, (4, 70), -float("inf")), y, {}), "logits"),
    (lambda x, y: (x, y, {"temperature": 0.0}), "temperature"),
    (lambda x, y: (x, y, {"temperature": -1.0}), "temperature"),
    (lambda x, y: (x, y, {"temperature": float("nan")}), "temperature"),
]


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("case", range(len(BAD_INPUTS)))
def test_bad_input_names_the_argument(case, dtype):
    make, name = BAD_INPUTS[case]
    logits, labels = make_inputs((5,), VOCAB_BAD, dtype)
    args = make(logits, labels)
    with pytest.raises((TypeError, ValueError, RuntimeError), match=name):
        token_logprobs(args[0], args[1], **args[2])


def test_nan_message_points_at_the_row():
    logits, labels = make_inputs((2, 3), 17)
    logits[1, 2, 5] = float("nan")
    with pytest.raises(ValueError, match=r"logits.*\[1, 2\]"):
        token_logprobs(logits, labels)


def test_raw_op_refuses_out_of_range_labels():
    # Compiled graphs skip the wrapper's data-dependent checks; the kernel must still not read
    # outside a row.
    with pytest.raises(RuntimeError, match="labels"):
        torch.ops.icpo.token_logprobs_fwd(torch.zeros(3, 8), torch.tensor([0, 8, 1]), 1.0, -100)
    with pytest.raises(RuntimeError, match="logits"):
        torch.ops.icpo.token_logprobs_fwd(torch.zeros(8, 3).t(), torch.tensor([0, 1, 1]), 1.0, -100)


# A backward whose gradient (64 x 40000 fp32, 10 MB) is large enough for the huge-page hint;
# prints a digest of the gradient and the process's huge pages while the gradient is alive.
_HUGE_PAGES_CODE = """
import hashlib, torch, icpo.ops
gen = torch.Generator().manual_seed(0)
x = (torch.randn(64, 40000, generator=gen) * 3).requires_grad_(True)
y = torch.randint(0, 40000, (64,), generator=gen)
logp, ent = icpo.ops.token_logprobs(x, y)
(g,) = torch.autograd.grad(logp.sum() + ent.sum(), x)
with open("/proc/self/smaps_rollup") as f:
    huge = [l.split()[1] for l in f if l.startswith("AnonHugePages:")]
print(hashlib.sha256(g.numpy().tobytes()).hexdigest(), huge[0] if huge else "?")
"""


def test_huge_page_hint_is_opt_in_and_changes_no_result():
    runs = {}
    for value in (None, "1", "yes"):
        env = {k: v for k, v in os.environ.items() if k != "ICPO_HUGE_PAGES"}
        env["OMP_NUM_THREADS"] = "1"
        if value is not None:
            env["ICPO_HUGE_PAGES"] = value
        runs[value] = subprocess.run([sys.executable, "-c", _HUGE_PAGES_CODE], env=env,
                                     capture_output=True, text=True, timeout=300)
    for value in (None, "1"):
        assert runs[value].returncode == 0, runs[value].stderr
    (digest_off, huge_off), (digest_on, _) = (runs[v].stdout.split() for v in (None, "1"))
    assert digest_off == digest_on
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if thp.exists() and "[madvise]" in thp.read_text() and huge_off != "?":
        assert huge_off == "0"  # no hint, so no huge page in the process (THP only on request)
    assert runs["yes"].returncode != 0
    assert "ICPO_HUGE_PAGES must be 0 or 1 (unset: 0), got 'yes'" in runs["yes"].stderr


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("lead,vocab", [((1,), 1), ((7,), 1031), ((2, 3), 4099), ((3,), 151936)])
def test_cuda_matches_cpu(lead, vocab, dtype):
    # Both kernels held to the rule on the same inputs.
    logits, labels = make_inputs(lead, vocab, dtype, ignore_every=4)
    gen = torch.Generator().manual_seed(SEED + 2)
    g_logp, g_entropy = torch.randn(lead, generator=gen), torch.randn(lead, generator=gen)
    for where in ("cpu", "cuda"):
        x, y, g1, g2 = (t.to(where) for t in (logits, labels, g_logp, g_entropy))
        logp, entropy = token_logprobs(x, y, temperature=0.8)
        check_forward(logp, entropy, logits, labels, 0.8, what=f"{where} {dtype}")
        grad = _grads(token_logprobs, x, y, 0.8, g1, g2)
        check_backward(grad, x, y, 0.8, g1, g2, what=f"{where} {dtype}")


@cuda
def test_cuda_opcheck_and_errors():
    logits, labels = make_inputs((6,), 37, ignore_every=3)
    x, y = logits.cuda().requires_grad_(True), labels.cuda()
    torch.library.opcheck(torch.ops.icpo.token_logprobs_fwd.default, (x, y, 1.25, -100))
    with pytest.raises(ValueError, match="logits"):
        token_logprobs(x.detach().index_fill(0, torch.tensor([1], device="cuda"), float("nan")), y)
