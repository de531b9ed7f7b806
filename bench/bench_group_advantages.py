"""Benchmark icpo's group ops against the readable references (and a vectorized-torch baseline).

Whole calls (validation included) of ``icpo.ops.icpo_advantages`` and ``grpo_advantages`` at the
paper's batch (768 prompts x G = 5) and a large one (4096 x 16). Prints a markdown table and writes
``bench/results/group_advantages_<device>.json``. Target: icpo_advantages >= 10x the reference at
768 x 5.

    python bench/bench_group_advantages.py [--device cpu|cuda] [--iters 200]
"""

from __future__ import annotations

import argparse
import os

import torch
from _common import machine_info, markdown_table, time_fn, write_results

import icpo  # noqa: F401  (registers torch.ops.icpo.*)
from icpo.ops import grpo_advantages, icpo_advantages, reference

CONFIGS = [(768, 5), (4096, 16)]
KW = dict(delta=0.4, tau=2.0, omega=1.0)


def make_inputs(groups: int, size: int, device: str, seed: int = 0):
    """Confidence in (-2, 0] and rewards in {0, 0.1, 0.9, 1.0}, fp32, as a training step sees."""
    gen = torch.Generator().manual_seed(seed)
    conf = -2 * torch.rand(groups * size, generator=gen)
    answer, fmt = torch.randint(0, 2, (2, groups * size), generator=gen)
    return conf.to(device), (0.9 * answer + 0.1 * fmt).to(device)


def torch_vectorized_icpo(conf, rewards, size, delta=0.4, tau=2.0, omega=1.0, eps=1e-6):
    """Eq. 9, 11, 5 for uniform groups in plain batched torch: stable sort, reversed cumsum."""
    c = conf.clamp(max=reference.CONFIDENCE_CEIL).view(-1, size)
    ranked, order = torch.sort(c, dim=1, stable=True)
    after = ranked.flip(1).cumsum(1).flip(1) - ranked  # sum of c over later sorted positions
    scores_ranked = delta * after / ranked - delta * ranked[:, -1:]
    scores = torch.empty_like(c).scatter_(1, order, scores_ranked).view(-1)
    final = rewards + omega * torch.minimum(scores, rewards.abs() / tau)
    return scores, final, torch_vectorized_grpo(final, size, eps)


def torch_vectorized_grpo(rewards, size, eps=1e-6):
    r = rewards.view(-1, size)
    adv = (r - r.mean(1, keepdim=True)) / (r.std(1, correction=0, keepdim=True) + eps)
    return adv.view(-1) if size > 1 else torch.zeros_like(rewards)


def check_agreement(conf, rewards, size):
    """The providers must compute the same thing before their times mean anything."""
    want = reference.icpo_advantages(conf.cpu().double(), rewards.cpu().double(), size, **KW)
    got = icpo_advantages(conf, rewards, size, **KW)
    vec = torch_vectorized_icpo(conf, rewards, size, **KW)
    for ours, base, ref in zip(got, vec, want):
        torch.testing.assert_close(ours.cpu().double(), ref, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(base.cpu().double(), ref, rtol=1e-4, atol=1e-4)


def timed(fn, iters, threads=None):
    """time_fn under a temporary torch thread count (None: leave it as it is)."""
    saved = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return time_fn(fn, warmup=min(5, iters), iters=iters)
    finally:
        torch.set_num_threads(saved)


def bench_config(groups, size, device, iters):
    conf, rewards = make_inputs(groups, size, device)
    check_agreement(conf, rewards, size)
    ref_iters = 10 if groups * size <= 4096 else 3  # the reference loops in Python: slow
    offsets = torch.arange(0, groups * size + 1, size, device=device)
    raw_args = (conf, rewards, offsets, 0.4, 2.0, 1.0, True, False, 1e-6)
    # (op, provider, fn, iters, threads); the extra rows show the wrapper's validation cost and
    # what the second core brings (CPU only).
    runs = [
        ("icpo_advantages", "icpo", lambda: icpo_advantages(conf, rewards, size, **KW), iters,
         None),
        ("icpo_advantages", "reference",
         lambda: reference.icpo_advantages(conf, rewards, size, **KW), ref_iters, None),
        ("icpo_advantages", "torch vectorized",
         lambda: torch_vectorized_icpo(conf, rewards, size, **KW), iters, None),
        ("icpo_advantages", "icpo raw op (no validation)",
         lambda: torch.ops.icpo.icpo_advantages(*raw_args), iters, None),
        ("grpo_advantages", "icpo", lambda: grpo_advantages(rewards, size), iters, None),
        ("grpo_advantages", "reference", lambda: reference.grpo_advantages(rewards, size),
         ref_iters, None),
        ("grpo_advantages", "torch vectorized", lambda: torch_vectorized_grpo(rewards, size),
         iters, None),
    ]
    if device == "cpu":
        runs.append(("icpo_advantages", "icpo, 1 thread",
                     lambda: icpo_advantages(conf, rewards, size, **KW), iters, 1))
    times = {(op, name): timed(fn, n, threads) for op, name, fn, n, threads in runs}
    rows = []
    for (op, name), t in times.items():
        ref_p50 = times[(op, "reference")]["p50"]
        rows.append({"shape": f"{groups} x {size}", "op": op, "provider": name,
                     "p50 ms": t["p50"], "p20 ms": t["p20"], "p80 ms": t["p80"],
                     "speedup vs reference": ref_p50 / t["p50"]})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--iters", type=int, default=200, help="timed calls per fast provider")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    rows = [row for groups, size in CONFIGS for row in bench_config(groups, size, args.device,
                                                                    args.iters)]
    columns = ["shape", "op", "provider", "p50 ms", "p20 ms", "p80 ms", "speedup vs reference"]
    print(markdown_table(rows, columns))
    target = next(r for r in rows if r["shape"] == "768 x 5" and r["op"] == "icpo_advantages"
                  and r["provider"] == "icpo")["speedup vs reference"]
    verdict = "met" if target >= 10 else "NOT met"
    print(f"\nicpo_advantages vs reference at 768 x 5: {target:.0f}x (target >= 10x: {verdict})")
    path = write_results(f"group_advantages_{args.device}", {
        "benchmark": "bench_group_advantages", "device": args.device, "iters": args.iters,
        "machine": machine_info(), "load_average": os.getloadavg(), "rows": rows,
        "target": {"icpo_vs_reference_768x5": target, "required": 10.0, "met": target >= 10}})
    print(f"results: {path}")


if __name__ == "__main__":
    main()
