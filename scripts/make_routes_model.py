"""Builds the bundled testbed model ``icpo/tiny-routes`` (see :mod:`icpo.tasks.routes`).

Starts from the bundled ``icpo/tiny`` (its tokenizer and weights: it already reads the prompt
and writes the Table 5 format) and continues SFT on the two-route mixture at the testbed's
difficulty: each training problem is answered by route A (subtract, with the sign slip) or, with
probability ``--route-b``, by route B (add the opposite, always right). A fixed number of steps,
fixed seeds, one thread; writes ``icpo/models/tiny_routes`` atomically and prints greedy accuracy,
sampled accuracy and which route the samples take on held-out ``val`` problems.

Reproduce the committed files byte for byte (7.5 min on one core of the shared 2-core dev machine)::

    python scripts/make_routes_model.py          # defaults = the committed model
    python scripts/measure_premise.py --model icpo/tiny-routes --task routes

Determinism: as ``make_tiny_model.py`` (same seeds and thread count give the same weights).
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_tiny_model as base  # noqa: E402  (sibling script; scripts/ is not a package)

from icpo.models import TINY_MODEL, TINY_ROUTES_MODEL, bundled_model_dir  # noqa: E402  (after sys.path setup)
from icpo.tasks.arithmetic import iter_expressions  # noqa: E402  (after sys.path setup)
from icpo.tasks.routes import DIFFICULTY, ROUTE_B_FRACTION, pretraining_response  # noqa: E402  (after sys.path setup)


def train(model, tokenizer, args) -> None:
    """``args.steps`` SFT steps on the route mixture (loss on response tokens only)."""
    stream = iter_expressions("train", seed=args.seed, difficulty=DIFFICULTY)
    rng = random.Random(args.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.98), weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / args.warmup) * max(0.1, 1 - s / args.steps))
    model.train()
    t0, loss_sum = time.time(), 0.0
    for step in range(1, args.steps + 1):
        exprs = [next(stream) for _ in range(args.batch_size)]
        responses = [pretraining_response(e, rng, args.route_b) for e in exprs]
        ids, labels = base.sft_batch(tokenizer, exprs, responses)
        loss_sum += base.sft_step(model, opt, sched, ids, labels)
        if step % args.log_every == 0:
            print(f"step {step:5d}  loss {loss_sum / args.log_every:.4f}  "
                  f"{time.time() - t0:.0f}s", flush=True)
            loss_sum = 0.0


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=str(bundled_model_dir(TINY_ROUTES_MODEL)),
                   help="output folder")
    p.add_argument("--init", default=str(bundled_model_dir(TINY_MODEL)), help="model to start from")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1 = reproducible weights)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--route-b", type=float, default=ROUTE_B_FRACTION,
                   help="share of route-B responses")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--report-n", type=int, default=500, help="held-out val problems for the report")
    args = p.parse_args(argv)
    if not 0.0 < args.route_b < 1.0:
        p.error(f"--route-b: expected a share in (0, 1), got {args.route_b}")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t0 = time.time()
    tokenizer = AutoTokenizer.from_pretrained(args.init)
    model = LlamaForCausalLM.from_pretrained(args.init, dtype=torch.float32)
    train(model, tokenizer, args)
    report = base.held_out("val", args.report_n, DIFFICULTY)
    torch.manual_seed(args.seed)
    greedy = base.evaluate(model, tokenizer, report)
    pass_1 = base.evaluate(model, tokenizer, report, k=1, temperature=1.0)
    base.save_atomically(model, tokenizer, args.out)
    print(f"val ({args.report_n}): greedy acc {greedy:.3f}, pass@1(T=1) {pass_1:.3f}; "
          f"saved to {args.out}; total {time.time() - t0:.0f}s", flush=True)


if __name__ == "__main__":
    sys.exit(main())
