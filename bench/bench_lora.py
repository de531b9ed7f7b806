"""LoRA against full fine-tuning in icpo's trainer: peak RSS and step time (issue 19, item 1).

Rows: for each model (``tiny``: the bundled icpo/tiny, ~1M parameters; ``vocab``: the
real-vocabulary testbed of ``scripts/make_vocab_model.py``, V = 151936, 89.5M parameters, 87 % of
them the tied embedding), full fine-tuning and ``model.lora_rank=R`` (adapters on every linear
layer but the head), both with a KL term (``actor.kl_coef > 0``): full fine-tuning loads a
second copy of the model as the reference and keeps AdamW state for every weight; LoRA scores
the reference with the adapters off and keeps AdamW state for the adapters only.

Each configuration runs in a fresh interpreter, so its peak RSS (``ru_maxrss``) is its own;
the configurations run interleaved, round-robin, ``--rounds`` times. Matched between the two
modes of a model: the tiny preset (examples/configs/tiny_cpu.yaml) with the same prompts,
group size, response cap, seed, lr, ZeRO-0, fp32, CPU, HF rollout engine, ``--threads``
threads. The steps are the trainer's ``train_step`` (generation, rewards, old and reference
log-probs, update, weight sync), run back to back without evaluation; peak RSS is read after
them, then one checkpoint is written and its size reported (not counted in the RSS).

Per row: median wall and CPU seconds per step (the first ``--warmup`` steps of every run left
out), peak RSS, trainable parameters, checkpoint MiB. Per model: LoRA / full ratios of peak RSS,
wall and CPU per step; the issue's target is peak RSS <= 60 % of full fine-tuning's. On a shared
machine wall time also counts waiting for a core; CPU seconds (one thread) do not.

  python scripts/make_vocab_model.py                 # outputs/vocab-model-151936 (~12 s)
  python bench/bench_lora.py                         # both models, 2 rounds (~10 min)
  python bench/bench_lora.py --models tiny --steps 2 --rounds 1 --name lora_smoke  # smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from icpo._io import atomic_write_text

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import markdown_table, write_results

REPO = Path(__file__).resolve().parents[1]
PRESET = REPO / "examples" / "configs" / "tiny_cpu.yaml"
MODELS = {"tiny": "icpo/tiny", "vocab": "outputs/vocab-model-151936"}
"""Default folder of each model (``--vocab-model`` moves the second)."""
SHAPES = {"tiny": dict(prompts=8, group=4, max_completion=32, steps=4),
          "vocab": dict(prompts=2, group=4, max_completion=16, steps=3)}
"""Per model: prompts per step, G, response cap, steps per run (a 152k-vocabulary step is
slow on one thread, so its batch is small)."""
MODES = ("full", "lora")


def peak_rss_mib() -> float:
    """Peak resident set size of this process (Linux ru_maxrss is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def folder_mib(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


def run_config(args) -> dict:
    """One configuration in this (fresh) process: steps, then peak RSS, then a checkpoint."""
    import torch

    from icpo.config import load_config
    from icpo.tasks.arithmetic import make_records, write_jsonl
    from icpo.trainer import Trainer

    shape = SHAPES[args.model_key]
    work = Path(args.workdir)
    data = work / "train.jsonl"
    write_jsonl(make_records("train", shape["prompts"] * shape["steps"]), data)
    overrides = [
        f"model.path={args.model_path}", "model.dtype=float32", f"data.train_files=[{data}]",
        "data.val_files=[]", "data.shuffle=false", "rollout.engine=hf",
        f"rollout.n={shape['group']}", f"rollout.max_response_length={shape['max_completion']}",
        f"rollout.hf_batch_size={shape['prompts']}", f"actor.kl_coef={args.kl_coef}",
        f"actor.lr={args.lr}", f"actor.ppo_mini_batch_size={shape['prompts']}",
        f"trainer.total_steps={shape['steps']}", f"trainer.train_batch_size={shape['prompts']}",
        f"trainer.seed={args.seed}", f"trainer.output_dir={work / 'run'}",
        "trainer.eval_every=0", "trainer.save_every=0", "trainer.progress_bar=false",
        "trainer.device=cpu", "trainer.zero_stage=0", f"trainer.num_threads={args.threads}"]
    if args.mode == "lora":
        overrides.append(f"model.lora_rank={args.lora_rank}")
    trainer = Trainer(load_config(str(PRESET), overrides))
    rss_after_setup = peak_rss_mib()
    step_s, cpu_s = [], []
    for _ in range(shape["steps"]):
        t0, c0 = time.perf_counter(), time.process_time()
        trainer.train_step()
        step_s.append(time.perf_counter() - t0)
        cpu_s.append(time.process_time() - c0)
        trainer.step += 1
    rss = peak_rss_mib()
    models = trainer.models
    trainable = sum(p.numel() for g in models.optimizer.param_groups for p in g["params"])
    t0 = time.perf_counter()
    checkpoint = trainer.save()
    save_s = time.perf_counter() - t0
    return {"step_s": step_s, "cpu_s": cpu_s, "peak_rss_mib": rss,
            "rss_after_setup_mib": rss_after_setup, "trainable_params": trainable,
            "model_params": models.num_params, "separate_reference": not models.reference_is_base
            and models.reference is not None, "checkpoint_mib": folder_mib(checkpoint),
            "checkpoint_model_mib": folder_mib(checkpoint / "model"), "save_s": save_s,
            "torch_threads": torch.get_num_threads()}


def worker(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix=f"bench_lora_{args.model_key}_{args.mode}_") as tmp:
        args.workdir = tmp
        out = run_config(args)
    atomic_write_text(args.result, json.dumps(out))


def spawn(model_key: str, mode: str, args, argv: list[str]) -> dict:
    """Run one configuration in a fresh interpreter and read back its result."""
    with tempfile.TemporaryDirectory(prefix="bench_lora_") as tmp:
        result = os.path.join(tmp, "result.json")
        cmd = [sys.executable, __file__, *argv, "--worker", model_key, "--mode", mode,
               "--result", result]
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), TOKENIZERS_PARALLELISM="false",
                   TRANSFORMERS_VERBOSITY="error")
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=not args.verbose, text=True)
        if proc.returncode != 0:
            tail = (proc.stderr or "")[-4000:] if not args.verbose else ""
            raise RuntimeError(f"{model_key}/{mode} failed (exit {proc.returncode}):\n{tail}")
        with open(result) as f:
            out = json.load(f)
        out["process_s"] = time.perf_counter() - t0
        return out


def summarize(runs: list[dict], warmup: int) -> dict:
    """Pool the steps after ``warmup`` of every round of one configuration."""
    step_s = [s for r in runs for s in r["step_s"][warmup:]]
    cpu_s = [c for r in runs for c in r["cpu_s"][warmup:]]
    first = runs[0]
    return {"step_s": statistics.median(step_s), "step_cpu_s": statistics.median(cpu_s),
            "peak_rss_mib": max(r["peak_rss_mib"] for r in runs),
            "peak_rss_mib_per_run": [r["peak_rss_mib"] for r in runs],
            "rss_after_setup_mib": max(r["rss_after_setup_mib"] for r in runs),
            "trainable_params": first["trainable_params"], "model_params": first["model_params"],
            "separate_reference": first["separate_reference"],
            "checkpoint_mib": first["checkpoint_mib"],
            "checkpoint_model_mib": first["checkpoint_model_mib"],
            "save_s": statistics.median(r["save_s"] for r in runs), "steps_timed": len(step_s),
            "step_s_per_run": [r["step_s"] for r in runs],
            "cpu_s_per_run": [r["cpu_s"] for r in runs],
            "process_s_per_run": [r["process_s"] for r in runs],
            "torch_threads": first["torch_threads"]}


def model_info(key: str, path: str) -> dict:
    from icpo.models import resolve_model_path

    folder = Path(resolve_model_path(path))
    cfg = json.loads((folder / "config.json").read_text())
    keys = ("model_type", "vocab_size", "hidden_size", "num_hidden_layers", "tie_word_embeddings")
    return {"key": key, "path": path, "folder": str(folder.resolve()),
            **{k: cfg.get(k) for k in keys}, **SHAPES[key]}


def parse_args(argv: list[str] | None = None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="tiny,vocab", help="comma list of " + ",".join(MODELS))
    p.add_argument("--vocab-model", default=MODELS["vocab"],
                   help="folder of the real-vocabulary model (default: %(default)s)")
    p.add_argument("--steps", type=int, default=None,
                   help="steps per run for every model (default: per model, see SHAPES)")
    p.add_argument("--warmup", type=int, default=1, help="leading steps of each run left out")
    p.add_argument("--rounds", type=int, default=2, help="runs per configuration, interleaved")
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--kl-coef", type=float, default=0.001, help="> 0: a reference is scored")
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--threads", type=int, default=1, help="torch/OpenMP threads per run")
    p.add_argument("--name", default="lora", help="result file stem under bench/results/")
    p.add_argument("--verbose", action="store_true", help="show the subprocesses' output")
    p.add_argument("--worker", choices=list(MODELS), help=argparse.SUPPRESS)
    p.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.keys = args.models.split(",")
    unknown = set(args.keys) - set(MODELS)
    if unknown:
        raise SystemExit(f"--models: unknown {sorted(unknown)}; expected some of {list(MODELS)}")
    for name in ("rounds", "lora_rank", "threads"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.kl_coef <= 0:
        raise SystemExit(f"--kl-coef must be > 0 (the comparison is with a KL term), got "
                         f"{args.kl_coef}")
    if args.steps is not None:
        for shape in SHAPES.values():
            shape["steps"] = args.steps
    if not all(0 <= args.warmup < SHAPES[k]["steps"] for k in args.keys):
        raise SystemExit(f"--warmup must be below every model's steps, got {args.warmup}")
    args.paths = {"tiny": MODELS["tiny"], "vocab": args.vocab_model}
    from icpo.models import resolve_model_path

    for key in args.keys:
        if not (Path(resolve_model_path(args.paths[key])) / "config.json").is_file():
            raise SystemExit(f"{key}: {args.paths[key]!r} is not a model folder (no config.json);"
                             " make it with python scripts/make_vocab_model.py")
    return args


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.worker:
        args.model_key, args.model_path = args.worker, args.paths[args.worker]
        worker(args)
        return
    runs: dict[tuple[str, str], list[dict]] = {(k, m): [] for k in args.keys for m in MODES}
    for r in range(args.rounds):
        for key in args.keys:
            order = MODES if r % 2 == 0 else MODES[::-1]  # neither mode always runs first
            for mode in order:
                print(f"round {r + 1}/{args.rounds}: {key} {mode} ...", flush=True)
                runs[key, mode].append(spawn(key, mode, args, argv))
    results = {f"{k}/{m}": summarize(v, args.warmup) for (k, m), v in runs.items()}
    ratios = {}
    for key in args.keys:
        full, lora = results[f"{key}/full"], results[f"{key}/lora"]
        ratios[key] = {"peak_rss": lora["peak_rss_mib"] / full["peak_rss_mib"],
                       "step_s": lora["step_s"] / full["step_s"],
                       "step_cpu_s": lora["step_cpu_s"] / full["step_cpu_s"],
                       "trainable_params": lora["trainable_params"] / full["trainable_params"],
                       "checkpoint_mib": lora["checkpoint_mib"] / full["checkpoint_mib"],
                       "peak_rss_target_met": lora["peak_rss_mib"] <= 0.6 * full["peak_rss_mib"]}
    rows = [{"config": name, **{c: r[c] for c in ("step_s", "step_cpu_s", "peak_rss_mib",
                                                  "trainable_params", "checkpoint_mib")}}
            for name, r in results.items()]
    print(markdown_table(rows, ["config", "step_s", "step_cpu_s", "peak_rss_mib",
                                "trainable_params", "checkpoint_mib"]))
    print(markdown_table([{"model": k, **v} for k, v in ratios.items()],
                         ["model", "peak_rss", "step_s", "step_cpu_s", "trainable_params",
                          "checkpoint_mib", "peak_rss_target_met"]))
    path = write_results(args.name, {
        "description": "icpo trainer, LoRA (model.lora_rank) vs full fine-tuning, both with "
                       "actor.kl_coef > 0; each configuration a fresh process, interleaved",
        "command": "python bench/bench_lora.py " + " ".join(argv),
        "models": {k: model_info(k, args.paths[k]) for k in args.keys},
        "settings": {"lora_rank": args.lora_rank, "lora_alpha": 16.0,
                     "target_modules": "all-linear", "kl_coef": args.kl_coef, "lr": args.lr,
                     "rounds": args.rounds, "warmup": args.warmup, "threads": args.threads,
                     "zero_stage": 0, "dtype": "float32"},
        "results": results, "lora_over_full": ratios, "target": "peak_rss <= 0.6"})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
