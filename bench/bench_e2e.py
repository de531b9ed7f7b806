"""End-to-end GRPO step cost: TRL's ``GRPOTrainer`` against icpo's trainer, on the same work.

Rows (each run in a fresh subprocess, one after the other, so peak RSS is per provider):
  TRL GRPO   trl.GRPOTrainer, transformers ``generate`` on CPU (use_vllm=False).
  icpo GRPO  icpo.trainer.Trainer with algorithm.name=grpo (HF rollout engine).
  icpo ICPO  the same with algorithm.name=icpo (confidence-weighted advantages).

Matched between providers: the model (``--model``: the bundled tiny one by default, or a folder
such as the real-vocabulary testbed of ``scripts/make_vocab_model.py``) and its tokenizer, fp32
weights; the generated arithmetic prompts (``icpo.tasks.arithmetic.make_records``), in order, no
shuffling, rendered with the Table 5 system prompt by ``icpo.data.templates.build_prompt`` (TRL
gets that text, and the token ids are checked equal to icpo's); group size G; prompts per step; max
completion length; temperature 1.0 with no top-p / top-k; beta (KL coef, > 0 so both load a
reference model); learning rate, clip range, gradient clipping; one optimizer step per generation
batch (TRL: num_iterations=1, steps_per_generation=1, the whole generation batch per device batch;
icpo: train_batch_size == ppo_mini_batch_size, ppo_epochs=1); token-mean loss (TRL's "dapo");
group-std scaled advantages; the reward (``icpo.rewards.verifiable.compute_score`` in TRL's
reward-function signature); the same number of torch threads. TRL runs with no logging, evaluation,
saving or reporting.

Both skip a separate old-log-prob forward when fully on-policy: TRL uses the update's own
log-probs; icpo runs that forward once, with grad, in its old-log-prob phase (ICPO's confidence
needs the values before the advantages) and the update reuses it; this needs the step's samples in
one micro-batch (--max-tokens-per-micro-batch, 16384 by default; TRL also runs the whole batch in
one forward here).

Per provider: median seconds per step (the first --warmup steps of every run skipped), median CPU
seconds per step, completion tokens per second (tokens generated in the timed steps / their
seconds), peak RSS (max ru_maxrss over the provider's subprocesses) and, for icpo, the median
seconds of each phase. --rounds N runs every provider N times, interleaved, and pools the steps.
Writes ``bench/results/e2e.json`` with ``speedup_vs_trl`` and ``icpo_overhead`` from the wall
medians, and the same ratios from CPU seconds (``*_cpu``): on a shared machine wall time also
counts the time a process waited for a core, CPU time (one thread) does not.

  python bench/bench_e2e.py --rounds 3          # 16 prompts x G 8, <= 64 tokens, 8 steps, 3 rounds
  python bench/bench_e2e.py --steps 3 --prompts 4 --group 4 --max-completion 16  # smoke run
  python bench/bench_e2e.py --algorithm grpo   # TRL GRPO and icpo GRPO only

At a real vocabulary (issue 18's configuration: V = 151936, 8 prompts x G 8, 64 new tokens, KL to
a reference, one thread; ~1-2 minutes per step and provider, ~8 GB peak RSS each):

  python scripts/make_vocab_model.py          # writes outputs/vocab-model-151936 (~10 s)
  python bench/bench_e2e.py --model outputs/vocab-model-151936 --prompts 8 --group 8 \
      --max-completion 64 --steps 3 --rounds 2 --name e2e_vocab151936

Transparent huge pages: an icpo provider with the suffix ``:thp-off`` runs its worker with THP
switched off for the process (``prctl(PR_SET_THP_DISABLE)``), ``:thp-on`` with every large
allocation asking for them (PyTorch's ``THP_MEM_ALLOC_ENABLE=1`` and ``ICPO_HUGE_PAGES=1``: what
the system setting "always" would give where it is "madvise"); without a suffix the system's
setting applies. They interleave with the others, e.g. ``--providers
trl-grpo,icpo-grpo,icpo-icpo,icpo-grpo:thp-off,icpo-grpo:thp-on``; each worker records the
AnonHugePages it ended with, and the result the system setting.
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
from _common import machine_info, markdown_table, write_results  # noqa: E402

PROVIDERS = {"trl-grpo": "TRL GRPO", "icpo-grpo": "icpo GRPO", "icpo-icpo": "icpo ICPO"}
ALGORITHMS = {"grpo": "trl-grpo,icpo-grpo", "icpo": "trl-grpo,icpo-icpo",
              "both": ",".join(PROVIDERS)}
"""--algorithm -> providers; TRL's GRPO is the baseline of both (TRL has no ICPO)."""
THP_MODES = {"thp-off": "THP off", "thp-on": "THP on"}
"""Suffixes of an icpo provider (``icpo-grpo:thp-off``): see the module docstring."""
PHASES = ("generation", "reward", "old_logprob", "ref_logprob", "advantages", "update")
CLIP_LOW, CLIP_HIGH, GRAD_CLIP = 0.2, 0.28, 1.0


def label(provider: str) -> str:
    """``icpo-grpo:thp-off`` -> ``icpo GRPO (THP off)``."""
    base, _, thp = provider.partition(":")
    return PROVIDERS[base] + (f" ({THP_MODES[thp]})" if thp else "")


def thp_system() -> str | None:
    try:
        return Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text().strip()
    except OSError:
        return None


def disable_thp() -> None:
    """prctl(PR_SET_THP_DISABLE, 1): no transparent huge pages for this process from now on."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(41, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_THP_DISABLE) failed")


def thp_state() -> dict:
    """Whether THP is disabled for this process (prctl PR_GET_THP_DISABLE) and the huge pages
    its anonymous memory holds now (AnonHugePages of /proc/self/smaps_rollup, MiB)."""
    import ctypes

    state: dict = {"disabled": bool(ctypes.CDLL(None).prctl(42, 0, 0, 0, 0))}
    try:
        for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
            if line.startswith("AnonHugePages:"):
                state["anon_huge_pages_mib"] = int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return state


def records(args) -> list[dict]:
    """The same prompts for every provider: one distinct prompt set per step, in order."""
    from icpo.tasks.arithmetic import make_records

    return make_records("train", args.prompts * args.steps)


def peak_rss_mib() -> float:
    """Peak resident set size of this process (Linux ru_maxrss is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def summarize(runs: list[dict], warmup: int) -> dict:
    """Pool the steps after ``warmup`` of every run (round) of one provider: median step time,
    completion tokens/s (their tokens / their seconds), median of each phase, max peak RSS."""
    step_s = [s for r in runs for s in r["step_s"][warmup:]]
    tokens = [t for r in runs for t in r["tokens"][warmup:]]
    out = {"step_s": statistics.median(step_s), "tokens_per_s": sum(tokens) / sum(step_s),
           "step_cpu_s": statistics.median(c for r in runs for c in r["cpu_s"][warmup:]),
           "peak_rss_mib": max(r["peak_rss_mib"] for r in runs), "steps_timed": len(step_s),
           "completion_tokens_per_step": statistics.mean(tokens),
           "step_s_per_run": [r["step_s"] for r in runs],
           "cpu_s_per_run": [r["cpu_s"] for r in runs],
           "wall_s_per_run": [r["wall_s"] for r in runs], "torch_threads": runs[0]["torch_threads"],
           "thp_per_run": [r.get("thp") for r in runs]}
    if "phases" in runs[0]:
        out["phases_s"] = {p: statistics.median(v for r in runs for v in r["phases"][p][warmup:])
                           for p in PHASES}
    return out


# ------------------------------------------------------------------------------------- TRL
def run_trl(args) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from icpo.data.templates import build_prompt
    from icpo.models import resolve_model_path
    from icpo.rewards.verifiable import compute_score

    model_dir = str(resolve_model_path(args.model))
    tok = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    recs = records(args)
    texts = [build_prompt(tok, r["prompt"], "r1") for r in recs]
    # TRL tokenizes text prompts with the tokenizer's defaults; icpo with add_special_tokens=False
    # (chat templates write their own specials). They must produce the same ids here.
    if tok(texts)["input_ids"] != tok(texts, add_special_tokens=False)["input_ids"]:
        raise RuntimeError("TRL and icpo would tokenize the prompts differently")
    dataset = Dataset.from_dict({
        "prompt": texts,
        "ground_truth": [r["reward_model"]["ground_truth"] for r in recs],
        "data_source": [r["data_source"] for r in recs]})
    tokens_per_call: list[float] = []

    def verifiable(prompts, completions, completion_ids, ground_truth, data_source, **_):
        """icpo's compute_score in TRL's reward-function signature; counts completion tokens."""
        tokens_per_call.append(float(sum(len(c) for c in completion_ids)))
        return [compute_score(src, text, gt)["score"]
                for src, text, gt in zip(data_source, completions, ground_truth)]

    step_s: list[float] = []
    cpu_s: list[float] = []

    class StepTimer(TrainerCallback):
        """Wall and CPU time of each optimizer step: generation, scoring, loss, backward, step."""

        def on_step_begin(self, *a, **k):
            self.t0, self.c0 = time.perf_counter(), time.process_time()

        def on_step_end(self, *a, **k):
            step_s.append(time.perf_counter() - self.t0)
            cpu_s.append(time.process_time() - self.c0)

    rows = args.prompts * args.group
    cfg = GRPOConfig(
        output_dir=args.workdir, report_to="none", use_cpu=True, bf16=False, fp16=False,
        model_init_kwargs={"dtype": torch.float32}, gradient_checkpointing=False,
        per_device_train_batch_size=rows, gradient_accumulation_steps=1, steps_per_generation=1,
        num_generations=args.group, num_iterations=1, max_steps=args.steps,
        max_completion_length=args.max_completion, temperature=1.0, top_p=1.0, top_k=0,
        beta=args.beta, learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=0.0, epsilon=CLIP_LOW, epsilon_high=CLIP_HIGH, max_grad_norm=GRAD_CLIP,
        loss_type="dapo", scale_rewards="group", shuffle_dataset=False, seed=args.seed,
        logging_strategy="no", save_strategy="no", eval_strategy="no", log_completions=False,
        disable_tqdm=True, dataloader_num_workers=0, use_vllm=False)
    trainer = GRPOTrainer(model=model_dir, reward_funcs=verifiable, args=cfg,
                          train_dataset=dataset, processing_class=tok, callbacks=[StepTimer()])
    trainer.train()
    if len(step_s) != args.steps or len(tokens_per_call) != args.steps:
        raise RuntimeError(f"TRL ran {len(step_s)} steps / {len(tokens_per_call)} generations, "
                           f"expected {args.steps} of each")
    return {"step_s": step_s, "cpu_s": cpu_s, "tokens": tokens_per_call}


# ------------------------------------------------------------------------------------ icpo
def run_icpo(args, algorithm: str) -> dict:
    from icpo.config import load_config
    from icpo.tasks.arithmetic import write_jsonl
    from icpo.trainer import Trainer

    data = Path(args.workdir) / "train.jsonl"
    write_jsonl(records(args), data)
    preset = Path(__file__).resolve().parents[1] / "examples" / "configs" / "tiny_cpu.yaml"
    overrides = [
        f"model.path={args.model}", "model.dtype=float32", f"data.train_files=[{data}]",
        "data.val_files=[]", "data.shuffle=false", "data.template=r1", "rollout.engine=hf",
        f"rollout.n={args.group}", f"rollout.max_response_length={args.max_completion}",
        "rollout.temperature=1.0", "rollout.top_p=1.0", "rollout.top_k=-1",
        f"rollout.hf_batch_size={args.prompts}", f"algorithm.name={algorithm}",
        f"actor.kl_coef={args.beta}", f"actor.lr={args.lr}", "actor.lr_schedule=constant",
        "actor.lr_warmup_steps=0", "actor.weight_decay=0.0", f"actor.clip_low={CLIP_LOW}",
        f"actor.clip_high={CLIP_HIGH}", f"actor.grad_clip={GRAD_CLIP}",
        "actor.loss_agg_mode=token-mean", "actor.entropy_coef=0.0", "actor.ppo_epochs=1",
        f"actor.ppo_mini_batch_size={args.prompts}",
        f"actor.max_tokens_per_micro_batch={args.max_tokens_per_micro_batch}",
        "algorithm.scale_advantages=true", f"trainer.total_steps={args.steps}",
        f"trainer.train_batch_size={args.prompts}", f"trainer.seed={args.seed}",
        f"trainer.output_dir={Path(args.workdir) / 'run'}", "trainer.eval_every=0",
        "trainer.save_every=0", "trainer.progress_bar=false", "trainer.tensorboard=false",
        "trainer.device=cpu", "trainer.zero_stage=0"]
    cfg = load_config(str(preset), overrides)
    trainer = Trainer(cfg)
    cpu_s: list[float] = []
    train_step = trainer.train_step

    def timed_step():
        c0 = time.process_time()
        metrics = train_step()
        cpu_s.append(time.process_time() - c0)
        return metrics

    trainer.train_step = timed_step
    history = trainer.train()
    steps = [h for h in history if "time/step" in h]
    rows = args.prompts * args.group
    return {"step_s": [h["time/step"] for h in steps], "cpu_s": cpu_s,
            "tokens": [h["response_length/mean"] * rows for h in steps],
            "phases": {p: [h[f"time/{p}"] for h in steps] for p in PHASES}}


# ---------------------------------------------------------------------------------- driver
def worker(args) -> None:
    import torch

    base, _, thp = args.worker.partition(":")
    if thp == "thp-off":
        disable_thp()  # before the model and its buffers are allocated
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    with tempfile.TemporaryDirectory(prefix=f"bench_e2e_{base}_") as tmp:
        args.workdir = tmp
        t0 = time.perf_counter()
        out = run_trl(args) if base == "trl-grpo" else run_icpo(args, base[5:])
        out["thp"] = thp_state()
        out["wall_s"] = time.perf_counter() - t0
    out["peak_rss_mib"] = peak_rss_mib()
    out["torch_threads"] = torch.get_num_threads()
    atomic_write_text(args.result, json.dumps(out))


def spawn(provider: str, args, argv: list[str]) -> dict:
    """Run one provider in a fresh interpreter and read back its result."""
    with tempfile.TemporaryDirectory(prefix="bench_e2e_") as tmp:
        result = os.path.join(tmp, "result.json")
        cmd = [sys.executable, __file__, *argv, "--worker", provider, "--result", result]
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), TOKENIZERS_PARALLELISM="false",
                   TRANSFORMERS_VERBOSITY="error")
        if provider.endswith(":thp-on"):  # read by torch's allocator and icpo's kernels at start
            env.update(THP_MEM_ALLOC_ENABLE="1", ICPO_HUGE_PAGES="1")
        proc = subprocess.run(cmd, env=env, capture_output=not args.verbose, text=True)
        if proc.returncode != 0:
            tail = (proc.stderr or "")[-4000:] if not args.verbose else ""
            raise RuntimeError(f"{provider} failed (exit {proc.returncode}):\n{tail}")
        with open(result) as f:
            return json.load(f)


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("torch", "transformers", "trl", "accelerate", "deepspeed", "datasets", "icpo"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def model_info(path: str) -> dict:
    """What the result file records about the model: its folder, type and sizes."""
    from icpo.models import resolve_model_path

    folder = Path(resolve_model_path(path))
    cfg = json.loads((folder / "config.json").read_text())
    keys = ("model_type", "vocab_size", "hidden_size", "num_hidden_layers", "tie_word_embeddings")
    return {"path": path, "folder": str(folder.resolve()), **{k: cfg.get(k) for k in keys}}


def parse_args(argv: list[str] | None = None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="icpo/tiny",
                   help="model folder (or icpo/tiny) every provider trains: its config.json, "
                        "weights and tokenizer (default: %(default)s)")
    p.add_argument("--steps", type=int, default=8, help="optimizer steps per run (> --warmup)")
    p.add_argument("--warmup", type=int, default=1, help="leading steps of each run left out")
    p.add_argument("--rounds", type=int, default=1, help="runs per provider, interleaved")
    p.add_argument("--prompts", type=int, default=16, help="prompts per step")
    p.add_argument("--group", type=int, default=8, help="responses per prompt (G)")
    p.add_argument("--max-completion", type=int, default=64, help="max completion tokens")
    p.add_argument("--beta", type=float, default=0.001,
                   help="KL coefficient (> 0: reference model)")
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--threads", type=int, default=1,
                   help="torch/OpenMP threads for every provider (1 by default: on a shared "
                        "machine spinning OpenMP threads turn other processes' load into large "
                        "swings)")
    p.add_argument("--max-tokens-per-micro-batch", type=int, default=16384,
                   help="icpo token budget")
    p.add_argument("--algorithm", choices=list(ALGORITHMS), default=None,
                   help="icpo's algorithm(s) to run beside TRL's GRPO: grpo, icpo or both "
                        "(default: both; shorthand for --providers)")
    p.add_argument("--providers", default=None,
                   help="comma list of " + ",".join(PROVIDERS) + " (default: all); an icpo "
                        "one may end in :thp-off or :thp-on (see above)")
    p.add_argument("--name", default="e2e", help="result file stem under bench/results/")
    p.add_argument("--verbose", action="store_true", help="show the subprocesses' output")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for name in ("steps", "prompts", "group", "max_completion", "threads", "rounds"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not 0 <= args.warmup < args.steps:
        raise SystemExit(f"--warmup must be in [0, --steps), got {args.warmup} with "
                         f"--steps {args.steps}")
    if args.beta <= 0:
        raise SystemExit("--beta must be > 0 so both providers load a reference model, "
                         f"got {args.beta}")
    if args.algorithm and args.providers:
        raise SystemExit("--algorithm and --providers exclude each other; give one")
    args.providers = args.providers or ALGORITHMS[args.algorithm or "both"]
    given = args.providers.split(",") + ([args.worker] if args.worker else [])
    unknown = {p for p in given if p.partition(":")[0] not in PROVIDERS
               or p.partition(":")[2] not in ("", *(THP_MODES if p.startswith("icpo") else ()))}
    if unknown:
        raise SystemExit(f"--providers: unknown {sorted(unknown)}; expected some of "
                         f"{list(PROVIDERS)}, an icpo one optionally with :thp-off or :thp-on")
    from icpo.models import resolve_model_path

    if not (Path(resolve_model_path(args.model)) / "config.json").is_file():
        raise SystemExit(f"--model: {args.model!r} is not a model folder (no config.json); "
                         "make one with scripts/make_vocab_model.py")
    return args


def table_rows(results: dict) -> list[dict]:
    rows = []
    for key, r in results.items():
        row = {"provider": label(key), "step_s": r["step_s"], "step_cpu_s": r["step_cpu_s"],
               "tokens_per_s": r["tokens_per_s"], "peak_rss_mib": r["peak_rss_mib"]}
        row.update({f"{p}_s": v for p, v in r.get("phases_s", {}).items()})
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    import psutil
    import torch

    torch.set_num_threads(args.threads)  # so machine_info() records the threads the runs used
    passthrough = [a for a in argv if a not in ("--verbose",)]
    load_before = os.getloadavg()
    providers = args.providers.split(",")
    runs: dict[str, list[dict]] = {p: [] for p in providers}
    # Rounds interleave the providers, so load from other processes falls on all of them alike.
    for rnd in range(args.rounds):
        for provider in providers:
            print(f"round {rnd + 1}/{args.rounds}: {label(provider)} ...", flush=True)
            runs[provider].append(spawn(provider, args, passthrough))
    results = {p: summarize(r, args.warmup) for p, r in runs.items()}
    step = {k: v["step_s"] for k, v in results.items()}
    cpu = {k: v["step_cpu_s"] for k, v in results.items()}
    payload = {
        "benchmark": "e2e",
        "model": model_info(args.model),
        "settings": {k: getattr(args, k) for k in (
            "steps", "warmup", "rounds", "prompts", "group", "max_completion", "beta", "lr", "seed",
            "threads", "max_tokens_per_micro_batch", "providers")},
        "speedup_vs_trl": (step["trl-grpo"] / step["icpo-grpo"]
                           if {"trl-grpo", "icpo-grpo"} <= step.keys() else None),
        "icpo_overhead": (step["icpo-icpo"] / step["icpo-grpo"] - 1
                          if {"icpo-icpo", "icpo-grpo"} <= step.keys() else None),
        # The same two ratios from CPU seconds per step: with one thread, what the step costs,
        # nearly independent of what else runs on the machine (wall times are not).
        "speedup_vs_trl_cpu": (cpu["trl-grpo"] / cpu["icpo-grpo"]
                               if {"trl-grpo", "icpo-grpo"} <= cpu.keys() else None),
        "icpo_overhead_cpu": (cpu["icpo-icpo"] / cpu["icpo-grpo"] - 1
                              if {"icpo-icpo", "icpo-grpo"} <= cpu.keys() else None),
        "results": {label(k): v for k, v in results.items()},
        "thp_system": thp_system(),
        "load_avg_before": load_before, "load_avg_after": os.getloadavg(),
        "memory_total_gib": psutil.virtual_memory().total / 2**30,
        "versions": versions(),
        "machine": machine_info(),
    }
    path = write_results(args.name, payload)
    cols = (["provider", "step_s", "step_cpu_s", "tokens_per_s", "peak_rss_mib"]
            + [f"{p}_s" for p in PHASES])
    print(markdown_table(table_rows(results), cols))
    for key in ("speedup_vs_trl", "icpo_overhead", "speedup_vs_trl_cpu", "icpo_overhead_cpu"):
        if payload[key] is not None:
            print(f"{key}: {payload[key]:.3f}")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
