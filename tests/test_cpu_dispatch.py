"""The per-ISA CPU kernel variants (docs/cpu_kernels.md): every variant this CPU runs gives the
reference's results, the dispatcher picks the best one, the overrides work or are refused, and
no AVX instruction sits outside a variant in the built library."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _accuracy import SEED
from test_segment_mean import check_segment_mean
from test_token_logprobs import _grads, check_backward, check_forward, make_inputs, truth, truth_fn

import icpo  # noqa: F401  (registers torch.ops.icpo.*)
from icpo.ops import (
    cpu_capability,
    forced_cpu_capability,
    set_cpu_capability,
    supported_cpu_capabilities,
    token_logprobs,
)

REPO = Path(__file__).resolve().parent.parent
SUPPORTED = supported_cpu_capabilities()
PORTABLE = "native" not in SUPPORTED
LEVEL = {"default": 0, "avx2": 1, "avx512": 2}
# V around the vector widths (16 / 32 lanes per step) and the 1024-element block, with tails.
VOCABS = [1, 7, 33, 1025, 4099]
DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


@pytest.fixture(params=SUPPORTED)
def variant(request):
    with forced_cpu_capability(request.param) as name:
        assert cpu_capability() == name == request.param
        yield name


def _cpuinfo_flags() -> set[str] | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_token_logprobs_forward_and_backward_under_each_variant(variant, dtype):
    # The accuracy rule of test_token_logprobs, per variant; float64 (gradcheck's dtype) against
    # float64 math directly.
    for vocab in VOCABS:
        what = f"{variant} {dtype} V={vocab}"
        logits, labels = make_inputs((9,), vocab, dtype, ignore_every=4)
        logp, entropy = token_logprobs(logits, labels, temperature=0.7)
        if dtype == torch.float64:
            want_logp, want_entropy = truth(logits, labels, 0.7)
            torch.testing.assert_close(logp, want_logp, atol=1e-10, rtol=1e-10)
            torch.testing.assert_close(entropy, want_entropy, atol=1e-10, rtol=1e-10)
        else:
            check_forward(logp, entropy, logits, labels, 0.7, what=what)
        logits, labels = make_inputs((9,), vocab, dtype, scale=2.0, ignore_every=4)
        gen = torch.Generator().manual_seed(SEED + vocab)
        g_logp, g_entropy = torch.randn(9, generator=gen), torch.randn(9, generator=gen)
        ours = _grads(token_logprobs, logits, labels, 0.7, g_logp, g_entropy)
        assert ours.dtype == dtype
        assert torch.equal(ours[labels == -100], torch.zeros_like(ours[labels == -100]))
        if dtype == torch.float64:
            best = _grads(truth_fn, logits, labels, 0.7, g_logp, g_entropy, dtype=torch.float64)
            torch.testing.assert_close(ours, best, atol=1e-10, rtol=1e-10)
        else:
            check_backward(ours, logits, labels, 0.7, g_logp, g_entropy, what=what)


def test_variants_agree_and_flag_non_finite_rows(variant):
    # Strided rows (a column slice) and several 1024-element blocks; one row holds +inf, which
    # the vector path must flag (lse = NaN) like the scalar tail does.
    base, labels = make_inputs((6,), 3000, torch.float32, ignore_every=3)
    logits = base[:, 5:2990]
    labels = labels.clamp(max=2984)
    with forced_cpu_capability("default"):
        want = torch.ops.icpo.token_logprobs_fwd(logits, labels, 1.25, -100)
    got = torch.ops.icpo.token_logprobs_fwd(logits, labels, 1.25, -100)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
    bad = logits.clone()
    bad[2, 700] = float("inf")
    lse = torch.ops.icpo.token_logprobs_fwd(bad, labels, 1.0, -100)[2]
    assert torch.isnan(lse[2]) and torch.isfinite(lse[[0, 1, 3, 4, 5]]).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_segment_mean_under_each_variant(variant, dtype):
    for lengths, index_dtype in (([5, 1, 7, 3], torch.int32), ([97, 1, 2, 31, 3001], torch.int64)):
        check_segment_mean(lengths, dtype, index_dtype, what=variant)


def _aten_level() -> int:
    return LEVEL.get(torch.backends.cpu.get_cpu_capability().lower(), 0)


@pytest.mark.skipif(not PORTABLE, reason="a native (ICPO_NATIVE=ON) build has one variant")
def test_supported_variants_follow_the_cpu_flags_and_auto_picks_the_best():
    assert SUPPORTED[0] == "default"
    flags = _cpuinfo_flags()
    if platform.machine() in ("x86_64", "AMD64") and flags is not None:
        # /proc/cpuinfo lists what the CPU has *and* the kernel enabled (XCR0), like our check.
        want = ["default"]
        if {"avx2", "fma", "f16c"} <= flags:
            want.append("avx2")
            if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags:
                want.append("avx512")
        assert SUPPORTED == want
    with forced_cpu_capability("auto") as chosen:
        cap = min(LEVEL[SUPPORTED[-1]], _aten_level())
        assert chosen == max((n for n in SUPPORTED if LEVEL[n] <= cap), key=LEVEL.get)


def test_unknown_variant_is_refused_with_the_choices():
    before = cpu_capability()
    with pytest.raises(RuntimeError, match="not a CPU kernel variant.*default"):
        set_cpu_capability("sse9")
    assert cpu_capability() == before


@pytest.mark.skipif(not PORTABLE or "avx512" in SUPPORTED,
                    reason="this CPU runs every variant, so none can be refused")
def test_variant_the_cpu_lacks_is_refused():
    with pytest.raises(RuntimeError, match="needs a CPU with"):
        set_cpu_capability("avx512")


@pytest.mark.skipif(not PORTABLE, reason="a native (ICPO_NATIVE=ON) build has one variant")
def test_environment_overrides():
    # In a fresh process: ICPO_CPU_CAPABILITY (any case) wins over ATEN_CPU_CAPABILITY; "auto"
    # then follows ATen's lowered capability.
    forced = SUPPORTED[1] if len(SUPPORTED) > 1 else "default"
    code = ("import json, icpo; from icpo.ops import cpu_capability, set_cpu_capability; "
            "first = cpu_capability(); print(json.dumps([first, set_cpu_capability('auto')]))")
    clean = {k: v for k, v in os.environ.items()
             if k not in ("ICPO_CPU_CAPABILITY", "ATEN_CPU_CAPABILITY")}
    env = {**clean, "ICPO_CPU_CAPABILITY": forced.upper(), "ATEN_CPU_CAPABILITY": "default",
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == [forced, "default"]


def test_bad_environment_value_is_refused_at_import(monkeypatch):
    import icpo.ops.cpu as cpu

    before = cpu_capability()
    monkeypatch.setenv(cpu.ENV_VAR, "avx9000")
    with pytest.raises(ValueError,
                       match="^ICPO_CPU_CAPABILITY=avx9000 is not a CPU kernel variant"):
        cpu._check_environment()
    assert cpu_capability() == before


def _built_library() -> str | None:
    sys.path.insert(0, str(REPO / "tools"))
    try:
        import check_cpu_isa
    finally:
        sys.path.pop(0)
    lib = check_cpu_isa.default_library()
    return lib if lib and check_cpu_isa.has_symbol_table(lib) else None


@pytest.mark.skipif(platform.machine() != "x86_64" or not PORTABLE, reason="x86-64 portable build")
def test_no_avx_instruction_outside_the_variants():
    import shutil

    if shutil.which("objdump") is None:
        pytest.skip("needs objdump (binutils)")
    lib = _built_library()
    if lib is None:
        pytest.skip("no unstripped build/*/_C*.so in this checkout")
    sys.path.insert(0, str(REPO / "tools"))
    try:
        import check_cpu_isa
    finally:
        sys.path.pop(0)
    avx, avx512 = check_cpu_isa.avx_functions(lib)
    by_variant = {n: check_cpu_isa.variant_of(n) for n in avx}
    assert [n for n, v in by_variant.items() if v is None] == []
    # The flags took effect: each variant holds vector code, AVX-512 only in the avx512 one.
    assert {"icpo_avx2", "icpo_avx512"} <= set(by_variant.values())
    assert any(by_variant.get(n) == "icpo_avx512" for n in avx512)
    assert not any(by_variant.get(n) == "icpo_avx2" for n in avx512)
