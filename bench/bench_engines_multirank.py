"""Rollout engines on two ranks: vLLM 0.32 (one colocated engine per rank, ``external_launcher``)
against the HF engine, the tiny preset under ``torchrun --nproc_per_node 2``.

Every rank holds two trainers on the same config and seed, one per engine, and their steps are
interleaved (HF, vLLM, HF, vLLM, ...), so both see the same machine load. Per engine, over the
steps after --warmup: median seconds per step (rank 0's ``time/step``; the step's collectives
keep the ranks together), per generation phase, and per weight sync (``time/sync``: vLLM's
reload fed by ``iter_full_parameters``, under ZeRO-3 one gathered parameter at a time; the HF
engine samples from the trained module, so its sync is empty). Rank 0 writes
``bench/results/engines_multirank_<device>_zero<Z>.json`` with the ratios ``vllm_over_hf``.

Needs vLLM (on CPU ``.venv-vllm``, tools/vllm_cpu_env.sh):

  OMP_NUM_THREADS=1 .venv-vllm/bin/torchrun --nproc_per_node 2 bench/bench_engines_multirank.py \\
      --zero 0 --steps 11
  OMP_NUM_THREADS=1 .venv-vllm/bin/torchrun --nproc_per_node 2 bench/bench_engines_multirank.py \\
      --zero 3 --steps 11

Each rank gets --prompts / 2 prompts a step. The two trainers train independently, so after the
first step their policies and response lengths drift apart.
"""

from __future__ import annotations

import argparse
import os
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
    """A Trainer on the tiny preset with this engine at --zero (same data, seed, settings)."""
    from icpo.config import load_config
    from icpo.trainer import Trainer

    overrides = [
        f"rollout.engine={engine}", f"rollout.n={args.group}",
        f"rollout.max_response_length={args.max_completion}",
        f"data.train_files=[{workdir / 'train.jsonl'}]", "data.val_files=[]",
        f"trainer.total_steps={args.steps}", f"trainer.train_batch_size={args.prompts}",
        f"actor.ppo_mini_batch_size={args.prompts}", f"trainer.zero_stage={args.zero}",
        f"trainer.seed={args.seed}", f"trainer.output_dir={workdir / engine}",
        "trainer.eval_every=0", "trainer.save_every=0", "trainer.progress_bar=false",
        "trainer.tensorboard=false"]
    cfg = load_config(str(ROOT / "examples" / "configs" / "tiny_cpu.yaml"), overrides)
    t0 = time.perf_counter()
    trainer = Trainer(cfg)
    return trainer, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--zero", type=int, choices=[0, 2, 3], default=0)
    parser.add_argument("--steps", type=int, default=11, help="training steps per engine")
    parser.add_argument("--warmup", type=int, default=1, help="leading steps left out")
    parser.add_argument("--prompts", type=int, default=16, help="prompts per step, all ranks")
    parser.add_argument("--group", type=int, default=8, help="responses per prompt (G)")
    parser.add_argument("--max-completion", type=int, default=64, help="response token cap")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--out", default=None,
                        help="result name (default engines_multirank_<device>_zero<Z>)")
    args = parser.parse_args(argv)
    if args.steps <= args.warmup:
        parser.error("--steps must exceed --warmup")
    if "RANK" not in os.environ:
        parser.error("run under torchrun --nproc_per_node 2 (see the docstring)")

    import torch

    from icpo.tasks.arithmetic import make_records, write_jsonl

    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    workdir = Path(tempfile.gettempdir()) / f"bench_engines_multirank_{os.environ['MASTER_PORT']}"
    data = workdir / "train.jsonl"
    if rank == 0:
        workdir.mkdir(parents=True, exist_ok=True)
        tmp = data.with_suffix(".tmp")
        write_jsonl(make_records("train", args.prompts * (args.steps + 1)), tmp)
        tmp.rename(data)
    while not data.exists():
        time.sleep(0.2)
    trainers = {e: make_trainer(args, e, workdir) for e in ENGINES}
    world = trainers["hf"][0].world
    rows: dict[str, list[dict]] = {e: [] for e in ENGINES}
    for step in range(args.steps):
        for e in ENGINES:  # interleaved: both engines see the same load
            trainer, _ = trainers[e]
            m = trainer.train_step()
            trainer.step += 1
            tokens = m["response_length/mean"] * args.prompts * args.group
            rows[e].append({"step_s": m["time/step"], "generation_s": m["time/generation"],
                            "sync_s": m["time/sync"], "tokens": tokens})
            if rank == 0:
                print(f"step {step} {e:4s} step {m['time/step']:.2f}s generation "
                      f"{m['time/generation']:.2f}s sync {m['time/sync']:.3f}s tokens "
                      f"{tokens:.0f}", flush=True)
    if rank == 0:
        summary = {}
        for e in ENGINES:
            timed = rows[e][args.warmup:]
            med = {k: statistics.median(r[k] for r in timed)
                   for k in ("step_s", "generation_s", "sync_s")}
            med["total_timed_s"] = sum(r["step_s"] for r in timed)
            med["build_s"] = trainers[e][1]
            summary[e] = med
        ratios = {k: summary["vllm"][k] / summary["hf"][k]
                  for k in ("step_s", "generation_s", "total_timed_s")}
        device = "cuda" if torch.cuda.is_available() else "cpu"
        columns = ["engine", "step_s", "generation_s", "sync_s", "total_timed_s", "build_s"]
        print(markdown_table([{"engine": e, **{k: round(v, 4) for k, v in summary[e].items()}}
                              for e in ENGINES], columns))
        print("vLLM / HF:", {k: round(v, 3) for k, v in ratios.items()})
        path = write_results(args.out or f"engines_multirank_{device}_zero{args.zero}", {
            "machine": machine_info(), "args": vars(args), "world_size": world,
            "per_step_rank0": rows, "median": summary, "vllm_over_hf": ratios,
            "note": "interleaved steps, two trainers per rank, 2 ranks on a shared machine; "
                    "build_s of vllm includes vLLM's start-up; sync_s of hf is the empty call"})
        print(f"results: {path}")
    torch.distributed.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # as the trainer's launched processes end (icpo/trainer/distributed.py)


if __name__ == "__main__":
    raise SystemExit(main())
