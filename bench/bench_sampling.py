"""Cost of drawing one token per row at a real vocabulary: the HF engine's sampler before and
after it drew one uniform per row (``icpo.rollout.sampling``).

Rows (median wall and CPU time of --iters calls, one decode step's ``[batch, vocab]`` fp32
logits; the speedups are from CPU time, which other processes on a shared machine disturb less):
  multinomial   the previous sampler: softmax, a full ``isfinite`` check, ``torch.multinomial``
                (one exponential per vocabulary entry)
  inverse_cdf   ``icpo.rollout.sampling.sample_next``: softmax, fp32 block sums, one uniform per
                row located in the fp64 cumulative sums
and their parts (softmax, isfinite, multinomial alone, the inverse-CDF draw alone), at
temperature 1.0 and at 0.7 (one more full pass: the division). With ``--model``, also whole
rollouts of the HF engine (our decoder) on that model with either sampler: --prompts x --group
rows, --new-tokens each (an untrained model rarely stops early), seconds per decode step.

  python bench/bench_sampling.py                    # V = 151936, batch 64, one thread
  python bench/bench_sampling.py --vocab 32000 --batch 8
  python bench/bench_sampling.py --model outputs/vocab-model-151936   # + rollouts (~1 min)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_info, markdown_table, time_fn, write_results

from icpo.rollout.base import SamplingParams
from icpo.rollout.sampling import sample_categorical, sample_next


def multinomial_next(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """The sampler as it was (icpo.rollout.hf.sample_next before the inverse-CDF draw)."""
    probs = (logits.float() / temperature).softmax(dim=-1)
    if not torch.isfinite(probs).all():
        raise ValueError("sampling: the model produced NaN or inf logits")
    return torch.multinomial(probs, 1).squeeze(1)


def rollout_rows(model_dir: str, args) -> list[dict]:
    """Seconds per decode step of HFRolloutEngine.generate with each sampler, same prompts."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import icpo.rollout.hf as hf
    from icpo.data.templates import build_prompt
    from icpo.tasks.arithmetic import make_records

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    prompts = [tok(build_prompt(tok, r["prompt"]), add_special_tokens=False)["input_ids"]
               for r in make_records("train", args.prompts)]
    engine = hf.HFRolloutEngine(model, tok, batch_size=args.prompts, decoder="icpo")
    params = SamplingParams(n=args.group, max_new_tokens=args.new_tokens, seed=0)
    samplers = {"multinomial": lambda logits, p: multinomial_next(logits, p.temperature),
                "inverse_cdf": sample_next}
    rows = []
    for rnd in range(2):  # interleaved, so load from other processes falls on both alike
        for name, fn in samplers.items():
            hf.sample_next = fn
            t0, c0 = time.perf_counter(), time.process_time()
            batch = engine.generate(prompts, params)
            seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
            steps = max(len(r) for r in batch.response_ids)
            rows.append({"sampler": f"rollout {name} (round {rnd + 1})", "seconds": seconds,
                         "decode_steps": steps, "p50_ms": 1e3 * seconds / steps,
                         "cpu_ms": 1e3 * cpu / steps, "rows": len(batch)})
            print(f"{rows[-1]['sampler']:34s} {rows[-1]['p50_ms']:8.2f} ms per decode step "
                  f"({steps} steps, {len(batch)} rows, {seconds:.1f} s)", flush=True)
    hf.sample_next = sample_next
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--name", default="sampling_cpu", help="result file stem under bench/results/")
    p.add_argument("--model", help="also time HF-engine rollouts on this model folder")
    p.add_argument("--prompts", type=int, default=8, help="rollout prompts (with --model)")
    p.add_argument("--group", type=int, default=8, help="rollout samples per prompt")
    p.add_argument("--new-tokens", type=int, default=16, help="rollout tokens per sample")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    logits = torch.randn(args.batch, args.vocab) * 3
    probs = logits.softmax(-1)
    rows = []

    def add(name, fn):
        cpu = []

        def timed():
            c0 = time.process_time()
            fn()
            cpu.append(time.process_time() - c0)

        t = time_fn(timed, warmup=2, iters=args.iters)
        rows.append({"sampler": name, "p50_ms": t["p50"], "p20_ms": t["p20"], "p80_ms": t["p80"],
                     "cpu_ms": 1e3 * statistics.median(cpu[2:])})
        print(f"{name:34s} {t['p50']:8.2f} ms (CPU {rows[-1]['cpu_ms']:.2f} ms)", flush=True)

    for temp in (1.0, 0.7):
        params = SamplingParams(temperature=temp)
        add(f"multinomial (T={temp})", lambda: multinomial_next(logits, temp))
        add(f"inverse_cdf (T={temp})", lambda: sample_next(logits, params))
    add("part: softmax", lambda: logits.softmax(-1))
    add("part: isfinite(probs).all()", lambda: torch.isfinite(probs).all())
    add("part: torch.multinomial", lambda: torch.multinomial(probs, 1))
    add("part: sample_categorical", lambda: sample_categorical(probs))
    by = {r["sampler"]: r["cpu_ms"] for r in rows}
    ratio = {f"T={t}": by[f"multinomial (T={t})"] / by[f"inverse_cdf (T={t})"] for t in (1.0, 0.7)}
    if args.model:
        rows += rollout_rows(args.model, args)
    payload = {"benchmark": "sampling", "settings": vars(args), "rows": rows,
               "speedup_vs_multinomial": ratio, "machine": machine_info()}
    path = write_results(args.name, payload)
    print(markdown_table(rows, ["sampler", "p50_ms", "p20_ms", "p80_ms", "cpu_ms"]))
    print("speedup over multinomial (CPU time): "
          + ", ".join(f"{k} {v:.1f}x" for k, v in ratio.items()))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
