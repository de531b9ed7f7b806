"""Measures whether ICPO's premise holds for a model before any RL: within groups of sampled
responses, is the correct response often the LESS confident one?

For ``--n`` held-out prompts, samples ``--g`` responses each (temperature 1, our HF rollout
engine, fixed seed), scores them with the verifiable reward, and takes each response's confidence
as the mean token log-prob under the sampling policy (``confidence_from_logprobs``, the
trainer's definition; :mod:`icpo.tasks.probe`). It reports the trainer's ``premise/`` metrics
(:func:`icpo.algorithms.premise.premise_metrics`) on these samples: over every within-group pair
(correct, wrong) the fraction in which the correct response is the less confident one (the
premise; ICPO needs it to be substantial), the fraction of mixed groups whose most confident
response is correct, and the fraction of responses with R != 0 whose ICPO score reaches its clip
|R| / tau (``--delta``, ``--tau``). With
``--task routes`` it also splits the samples by route (:mod:`icpo.tasks.routes`)::

    python scripts/measure_premise.py --model icpo/tiny --task arithmetic
    python scripts/measure_premise.py --model icpo/tiny-routes --task routes --json out.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch


def _task(name: str):
    """(difficulty, route classifier or None) of a task name."""
    if name == "routes":
        from icpo.tasks.routes import DIFFICULTY, route_of
        return DIFFICULTY, route_of
    if name == "arithmetic":
        from icpo.tasks.arithmetic import Difficulty
        return Difficulty(), None
    raise ValueError(f"--task: expected 'arithmetic' or 'routes', got {name!r}")


def measure(model_path: str, task: str, n: int, g: int, seed: int, max_new_tokens: int = 64,
            delta: float = 0.5, tau: float = 2.0) -> dict:
    """Samples, scores and counts; returns the summary dict printed by :func:`main`. The premise
    numbers are the trainer's per-step ``premise/`` metrics (:func:`premise_metrics`) on these
    samples, with ICPO's scores (Eq. 9) at ``delta`` and the clip at ``tau``."""
    from icpo.algorithms.premise import premise_metrics
    from icpo.data.coarse import group_outcome
    from icpo.ops import preference_scores
    from icpo.tasks.arithmetic import make_records
    from icpo.tasks.probe import load, response_confidence, sample_graded

    difficulty, route_of = _task(task)
    model, tok = load(model_path)
    graded = sample_graded(model, tok, make_records("val", n, difficulty=difficulty), g, seed,
                           max_new_tokens)
    texts, correct = graded.texts, graded.correct
    conf = response_confidence(model, graded.prompt_ids, graded.response_ids)
    conf_t = torch.tensor(conf)  # float32, as the trainer
    scores = preference_scores(conf_t, g, delta=delta)
    mixed = sum(group_outcome(correct[i:i + g]) == "mixed" for i in range(0, len(correct), g))
    summary = {"model": model_path, "task": task, "prompts": n, "group_size": g, "seed": seed,
               "delta": delta, "tau": tau, "accuracy": sum(correct) / len(correct),
               "mixed_groups": mixed,
               **premise_metrics(conf_t, torch.tensor(correct), torch.tensor(graded.rewards),
                                 scores, g, tau)}
    if route_of is not None:
        routes: dict[str, dict] = {}
        for t, ok, c in zip(texts, correct, conf):
            r = routes.setdefault(str(route_of(t)), {"n": 0, "correct": 0, "conf_sum": 0.0})
            r["n"] += 1
            r["correct"] += ok
            r["conf_sum"] += c
        summary["routes"] = {k: {"share": v["n"] / len(texts), "accuracy": v["correct"] / v["n"],
                                 "mean_confidence": v["conf_sum"] / v["n"]}
                             for k, v in sorted(routes.items())}
    return summary


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="icpo/tiny-routes")
    p.add_argument("--task", default="routes",
                   help="'routes' (the testbed) or 'arithmetic' (icpo/tiny's)")
    p.add_argument("--n", type=int, default=300,
                   help="held-out val prompts (>= 200 for the report)")
    p.add_argument("--g", type=int, default=5, help="responses per prompt (the paper's G = 5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--delta", type=float, default=0.5,
                   help="Eq. 9 delta for the bonus-at-cap count")
    p.add_argument("--tau", type=float, default=2.0, help="Eq. 11 tau for the bonus-at-cap count")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", help="also write the summary to this JSON file")
    args = p.parse_args(argv)
    if args.n < 1 or args.g < 2:
        p.error(f"--n must be >= 1 and --g >= 2, got {args.n} and {args.g}")
    try:
        _task(args.task)
    except ValueError as e:
        p.error(str(e))
    torch.set_num_threads(args.threads)
    t0 = time.time()
    summary = measure(args.model, args.task, args.n, args.g, args.seed, delta=args.delta,
                      tau=args.tau)
    summary["wall_s"] = round(time.time() - t0, 1)
    print(json.dumps(summary, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
