"""Cost of drawing one token per row at a real vocabulary: the HF engine's sampler before and
after it drew one uniform per row (``icpo.rollout.sampling``).

Rows (median of --iters calls, one decode step's ``[batch, vocab]`` fp32 logits):
  multinomial   the previous sampler: softmax, a full ``isfinite`` check, ``torch.multinomial``
                (one exponential per vocabulary entry)
  inverse_cdf   ``icpo.rollout.sampling.sample_next``: softmax, fp32 block sums, one uniform per
                row located in the fp64 cumulative sums
and their parts (softmax, isfinite, multinomial alone, the inverse-CDF draw alone), at
temperature 1.0 and at 0.7 (one more full pass: the division).

  python bench/bench_sampling.py                    # V = 151936, batch 64, one thread
  python bench/bench_sampling.py --vocab 32000 --batch 8
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_info, markdown_table, time_fn, write_results  # noqa: E402

from icpo.rollout.base import SamplingParams  # noqa: E402
from icpo.rollout.sampling import sample_categorical, sample_next  # noqa: E402


def multinomial_next(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """The sampler as it was (icpo.rollout.hf.sample_next before the inverse-CDF draw)."""
    probs = (logits.float() / temperature).softmax(dim=-1)
    if not torch.isfinite(probs).all():
        raise ValueError("sampling: the model produced NaN or inf logits")
    return torch.multinomial(probs, 1).squeeze(1)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--name", default="sampling_cpu", help="result file stem under bench/results/")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    logits = torch.randn(args.batch, args.vocab) * 3
    probs = logits.softmax(-1)
    rows = []

    def add(name, fn):
        t = time_fn(fn, warmup=2, iters=args.iters)
        rows.append({"sampler": name, "p50_ms": t["p50"], "p20_ms": t["p20"], "p80_ms": t["p80"]})
        print(f"{name:34s} {t['p50']:8.2f} ms", flush=True)

    for temp in (1.0, 0.7):
        params = SamplingParams(temperature=temp)
        add(f"multinomial (T={temp})", lambda: multinomial_next(logits, temp))
        add(f"inverse_cdf (T={temp})", lambda: sample_next(logits, params))
    add("part: softmax", lambda: logits.softmax(-1))
    add("part: isfinite(probs).all()", lambda: torch.isfinite(probs).all())
    add("part: torch.multinomial", lambda: torch.multinomial(probs, 1))
    add("part: sample_categorical", lambda: sample_categorical(probs))
    by = {r["sampler"]: r["p50_ms"] for r in rows}
    ratio = {f"T={t}": by[f"multinomial (T={t})"] / by[f"inverse_cdf (T={t})"] for t in (1.0, 0.7)}
    payload = {"benchmark": "sampling", "settings": vars(args), "rows": rows,
               "speedup_vs_multinomial": ratio, "machine": machine_info()}
    path = write_results(args.name, payload)
    print(markdown_table(rows, ["sampler", "p50_ms", "p20_ms", "p80_ms"]))
    print("speedup over multinomial: " + ", ".join(f"{k} {v:.1f}x" for k, v in ratio.items()))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
