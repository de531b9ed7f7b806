"""Train with ICPO (or GRPO) — the project's main example.

With no arguments it trains ICPO on the bundled tiny model and the generated arithmetic task on
this CPU, printing held-out accuracy before and after, and writes ``metrics.jsonl``, a
checkpoint and ``curves.png`` under ``outputs/tiny_icpo``:

    python examples/train_icpo.py

On GPU nodes, give a config (and dotted overrides) and launch one process per GPU:

    torchrun --nproc_per_node 8 examples/train_icpo.py \
        --config examples/configs/paper_qwen2.5_7b.yaml
    deepspeed --num_gpus 8 examples/train_icpo.py --config my.yaml trainer.zero_stage=3
    deepspeed --hostfile hosts.txt examples/train_icpo.py --config my.yaml   # multi-node

Add ``--resume`` to continue from the newest checkpoint in ``trainer.output_dir``, ``--overwrite``
to replace a run already there (a second run into the same folder is refused otherwise). Ctrl-C
or SIGTERM saves a checkpoint of the last finished step, prints how to resume, and exits with 130
or 143; a user error is one line and exit 2, as with ``icpo train``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
TINY_PRESET = HERE / "configs" / "tiny_cpu.yaml"


def ensure_task_data(cfg, train_size: int, val_size: int) -> None:
    """Generate the arithmetic task's splits into ``<output_dir>/data`` when the config names no
    data files (the tiny preset). Deterministic: every rank writes the same bytes atomically."""
    if cfg.data.train_files:
        return
    from icpo.errors import check_new_files, check_range
    from icpo.tasks.arithmetic import make_records, write_jsonl

    check_range("--train-size", train_size, at_least=1, integer=True)
    check_range("--val-size", val_size, at_least=1, integer=True)
    data_dir = Path(cfg.trainer.output_dir) / "data"
    # The same bytes on every run (and rank): replacing them is fine, a file in the way is not.
    check_new_files(data_dir, [], overwrite=True, flag="trainer.output_dir")
    data_dir.mkdir(parents=True, exist_ok=True)
    train, val = data_dir / "train.jsonl", data_dir / "val.jsonl"
    write_jsonl(make_records("train", train_size), train)
    write_jsonl(make_records("val", val_size), val)
    cfg.data.train_files, cfg.data.val_files = [str(train)], [str(val)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(TINY_PRESET),
                        help="YAML config (default: tiny CPU preset)")
    parser.add_argument("--resume", nargs="?", const="auto", default=None,
                        help="continue from the newest checkpoint in trainer.output_dir, or PATH")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the run already in trainer.output_dir (else refused)")
    parser.add_argument("--train-size", type=int, default=4000,
                        help="generated task: training prompts")
    parser.add_argument("--val-size", type=int, default=200,
                        help="generated task: held-out prompts")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None,
                        help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. algorithm.name=grpo")
    args = parser.parse_args(argv)
    from icpo.cli import split_resume

    split_resume(args)  # `--resume actor.lr=1e-6`: the override is no checkpoint path

    from icpo.runtime import set_thread_env_defaults

    set_thread_env_defaults()  # OpenMP reads it once, when torch loads: before the imports below
    from icpo.config import load_config

    cfg = load_config(args.config, args.overrides)
    ensure_task_data(cfg, args.train_size, args.val_size)
    from icpo.trainer import Trainer
    from icpo.trainer.distributed import exit_launched_process
    from icpo.trainer.interrupt import train_to_end
    from icpo.trainer.summary import print_summary

    trainer = Trainer(cfg, resume=args.resume, overwrite=args.overwrite)
    history, code = train_to_end(trainer)
    if code:  # stopped by a signal: the trainer printed where, what it saved, how to resume
        exit_launched_process(code)
        return code
    if trainer.rank != 0:
        exit_launched_process(0)
        return 0
    print_summary(cfg, history)
    exit_launched_process(0)
    return 0


if __name__ == "__main__":
    from icpo.errors import run_main

    # As `icpo train`: a user error is one line and exit 2, Ctrl-C while loading exit 130.
    sys.exit(run_main("train_icpo.py", main))
