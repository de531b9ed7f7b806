"""The paper's comparisons (Table 6 shaped) on a CPU: GRPO vs ICPO, paired seeds, 95 % CIs.

By default on the two-route testbed (``icpo/tiny-routes``, docs/experiments.md), where ICPO's
premise can hold; ``--task arithmetic`` runs the same plan on ``icpo/tiny``. Settings:

- main:   GRPO vs ICPO with clean rewards
- noisy:  GRPO vs ICPO with 40 % of the rewards shifted by +-0.3 (docs/algorithm.md)
- coarse: GRPO vs ICPO trained on the paper's coarse data (App. B.1): the prompts whose G
          base-model responses were all right or all wrong (``experiment_data.coarse_train_file``)
- omega:  ICPO with each omega schedule (warmup_decay, warmup_retention, linear_decay, constant)
- delta:  ICPO with delta in {0.3, 0.4, 0.5, 0.6}

A seed sets trainer.seed, data.seed and reward.noise_seed, so every method of a seed sees the
same prompts in the same order and the same noise: comparisons are paired by seed, reported as
mean differences with 95 % t-intervals (final held-out accuracy and area under the validation
curve). Runs whose effective configs are identical (ICPO clean = ICPO warmup_decay = ICPO with
the preset's delta) are run once and shared. Each run is a subprocess of
``examples/train_icpo.py``, one after another; a finished run with the same config is skipped,
so an interrupted invocation resumes where it stopped::

    python experiments/run_experiments.py                 # everything, 8 seeds (about 2 h)
    python experiments/run_experiments.py --quick         # GRPO vs ICPO, 2 seeds (minutes)
    python experiments/run_experiments.py --only noisy,coarse --seeds 4
    python experiments/run_experiments.py --dry-run       # print the plan and the time estimate
    python experiments/run_experiments.py --report-only   # rebuild the report from finished runs

Runs go under ``--out`` (default ``outputs/experiments``, ``outputs/experiments_quick`` with
``--quick``; ``--task arithmetic`` adds ``_arithmetic`` to the default folders): ``data/``,
``runs/<name>_seed<k>/`` (metrics, config, train.log). The report --
``results.md``, ``results.json``, ``plots/*.png`` (``experiment_report.py``) -- goes to
``--results`` (default ``results/experiments`` in the repository for the full mode, the
``--out`` folder for ``--quick``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
import experiment_data as data  # noqa: E402  (sibling modules; experiments/ is not a package)
import experiment_report as report  # noqa: E402  (after sys.path setup)

from icpo.config.schema import OmegaSchedule  # noqa: E402  (after sys.path setup)

TRAIN_SCRIPT = ROOT / "examples" / "train_icpo.py"
PRESET = ROOT / "examples" / "configs" / "routes_cpu.yaml"
TASK_OVERRIDES = {"routes": (),
                  "arithmetic": ("model.path=icpo/tiny", "rollout.max_response_length=64")}
"""Both tasks run the Table 6-shaped preset; ``arithmetic`` swaps in ``icpo/tiny`` and the
response length of its quick-start preset (its worked solutions are longer)."""
RESULTS_DIR = ROOT / "results" / "experiments"
NOISE = ("reward.noise_fraction=0.4", "reward.noise_magnitude=0.3")
SCHEDULES = typing.get_args(OmegaSchedule)
DELTAS = (0.3, 0.4, 0.5, 0.6)
GROUP_NAMES = ("main", "noisy", "coarse", "omega", "delta")
QUICK_GROUPS = ("main",)
"""--quick runs only the main GRPO vs ICPO comparison (with all its seeds) unless --only says
otherwise; the other groups need the full mode's steps to say anything."""

MODE_OVERRIDES = {
    "full": (),
    "quick": ("trainer.total_steps=6", "trainer.train_batch_size=16", "actor.ppo_mini_batch_size=4",
              "trainer.eval_every=3"),
}
"""Dotted overrides of each mode on top of the preset (the full mode is the preset itself)."""
SEEDS = {"full": 8, "quick": 2}
"""Default seeds per setting: >= 8 for results, 2 for the quick check."""
BUDGET_S = {"full": 2 * 3600, "quick": 8 * 60}
DATA_SIZES = {"full": (3000, 1000), "quick": (400, 100)}
"""(train prompts, held-out prompts) per mode; the full run reads fewer than 3000 prompts per
run (steps x batch) and evaluates on 1000 held-out prompts (greedy)."""

# Cost model (HF engine, fp32, per response of max_response_length 64, scaled by the length).
# Anchor: the old tiny_cpu step (32 prompts x 8, one update) took 1.35 s on the idle 2-core
# machine; interleaved with it on a loaded machine (A B A B, medians of 10 steps each), a step of
# the routes preset (32 x 5, four updates, ~19-token responses) took 0.47x as long, so ~0.64 s
# idle; a greedy evaluation of 1000 held-out prompts costs about two such steps. The constants
# below predict 0.96 s and 3 s: about 50 % margin for a shared machine. The ETA printed while
# running is rescaled by the measured run times.
STARTUP_S = 8.0
STEP_S_PER_RESPONSE = 0.008
EVAL_S_PER_PROMPT = 0.004


@dataclass(frozen=True)
class Setting:
    """One line of a comparison group: ``overrides`` on top of the preset and the mode."""

    group: str
    label: str
    slug: str
    overrides: tuple[str, ...]
    coarse: bool = False
    """Trains on the coarse data file instead of the full training file."""

    @property
    def algorithm(self) -> str:
        return "grpo" if "algorithm.name=grpo" in self.overrides else "icpo"


def all_settings() -> list[Setting]:
    """Every setting of every group, groups in :data:`GROUP_NAMES` order."""
    grpo, icpo = ("algorithm.name=grpo",), ("algorithm.name=icpo",)
    out = [Setting("main", "GRPO", "grpo_clean", grpo), Setting("main", "ICPO", "icpo_clean", icpo),
           Setting("noisy", "GRPO", "grpo_noisy", grpo + NOISE),
           Setting("noisy", "ICPO", "icpo_noisy", icpo + NOISE),
           Setting("coarse", "GRPO", "grpo_coarse", grpo, coarse=True),
           Setting("coarse", "ICPO", "icpo_coarse", icpo, coarse=True)]
    out += [Setting("omega", f"ICPO {s}", f"icpo_omega_{s}",
                    icpo + (f"algorithm.omega.schedule={s}",))
            for s in SCHEDULES]
    out += [Setting("delta", f"ICPO delta={d}", f"icpo_delta{d}", icpo + (f"algorithm.delta={d}",))
            for d in DELTAS]
    return out


def select_settings(only: str | None, quick: bool) -> list[Setting]:
    """Settings named by ``--only`` (group names or setting slugs, comma-separated)."""
    settings = all_settings()
    if not only:
        names = QUICK_GROUPS if quick else GROUP_NAMES
        return [s for s in settings if s.group in names]
    wanted = [w.strip() for w in only.split(",") if w.strip()]
    known = set(GROUP_NAMES) | {s.slug for s in settings}
    bad = [w for w in wanted if w not in known]
    if bad or not wanted:
        raise ValueError(f"--only: unknown setting(s) {bad or only!r}; expected comma-separated "
                         f"names from {sorted(known)}")
    return [s for s in settings if s.group in wanted or s.slug in wanted]


@dataclass
class Run:
    """One training subprocess: a deduplicated setting at one seed."""

    name: str
    seed: int
    overrides: list[str]
    out_dir: Path
    total_steps: int
    estimate_s: float


@dataclass
class Plan:
    """The runs to execute and, for every setting, the run name whose results it reads."""

    runs: list[Run]
    run_of: dict[str, str]
    settings: list[Setting]
    seeds: list[int]
    mode_overrides: list[str]
    preset: Path
    shared: dict[str, str] = field(default_factory=dict)

    @property
    def estimate_s(self) -> float:
        return sum(r.estimate_s for r in self.runs)


def estimate_run_seconds(cfg, val_size: int | None = None) -> float:
    """Predicted wall time of one run of ``cfg`` on this machine (see the cost model above);
    ``val_size``: held-out prompts in the val file (default: the full mode's)."""
    t = cfg.trainer
    evals = 0
    if cfg.data.val_files and t.eval_every:
        evals = 1 + t.total_steps // t.eval_every + (1 if t.total_steps % t.eval_every else 0)
    n_val = cfg.data.val_max_samples or val_size or DATA_SIZES["full"][1]
    length = cfg.rollout.max_response_length / 64
    return (STARTUP_S
            + t.total_steps * t.train_batch_size * cfg.rollout.n * length * STEP_S_PER_RESPONSE
            + evals * n_val * cfg.rollout.val_n * length * EVAL_S_PER_PROMPT)


def make_plan(settings: list[Setting], seeds: list[int], mode_overrides: list[str], exp_dir: Path,
              data_files: tuple[Path, Path], preset: Path = PRESET) -> Plan:
    """Resolve every setting's config, merge settings whose configs are identical, and list the
    runs (setting-major, then seed). Bad overrides fail here, before anything runs."""
    from icpo.config import load_config

    if not seeds:
        raise ValueError("seeds: expected at least one seed")
    val = f"data.val_files={json.dumps([str(data_files[1])])}"
    val_size = data.count_lines(data_files[1]) if data_files[1].is_file() else None
    by_key: dict[str, str] = {}
    plan = Plan([], {}, settings, list(seeds), list(mode_overrides), preset)
    for s in settings:
        train = data.coarse_path(data_files[0]) if s.coarse else data_files[0]
        base = [*mode_overrides, *s.overrides, f"data.train_files={json.dumps([str(train)])}", val]
        cfg = load_config(preset, base)
        key = json.dumps(cfg.to_dict(), sort_keys=True, default=str)
        if key in by_key:
            plan.run_of[s.slug] = by_key[key]
            if by_key[key] != s.slug:
                plan.shared[s.slug] = by_key[key]
            continue
        by_key[key] = plan.run_of[s.slug] = s.slug
        for k in seeds:
            out = exp_dir / "runs" / f"{s.slug}_seed{k}"
            ov = [*base, f"trainer.seed={k}", f"data.seed={k}", f"reward.noise_seed={k}",
                  f"trainer.output_dir={out}", "trainer.progress_bar=false"]
            plan.runs.append(Run(s.slug, k, ov, out, cfg.trainer.total_steps,
                                 estimate_run_seconds(cfg, val_size)))
    return plan


def run_finished(run: Run, preset: Path = PRESET) -> bool:
    """True when ``run``'s metrics reach its last step and its saved config is the planned one
    (a changed preset or mode makes the old result stale)."""
    from icpo.config import load_config

    metrics, saved = run.out_dir / "metrics.jsonl", run.out_dir / "config.yaml"
    if not (metrics.is_file() and saved.is_file()):
        return False
    try:
        rows = report.read_rows(metrics)
        same = load_config(saved).to_dict() == load_config(preset, run.overrides).to_dict()
    except ValueError:
        return False
    return same and any(r.get("step") == run.total_steps for r in rows)


def fmt_s(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 90 else f"{seconds:.0f} s"


def print_plan(plan: Plan, mode: str, todo: list[Run], jobs: int = 1) -> None:
    n_unique = len({r.name for r in plan.runs})
    print(f"mode {mode}: {len(plan.settings)} settings -> {n_unique} distinct configs x "
          f"{len(plan.seeds)} seeds = {len(plan.runs)} runs "
          f"({len(plan.runs) - len(todo)} already done)")
    if plan.mode_overrides:
        print("  mode overrides: " + " ".join(plan.mode_overrides))
    for slug, target in plan.shared.items():
        print(f"  {slug}: same config as {target}, reusing its runs")
    for name in dict.fromkeys(r.name for r in plan.runs):
        r = next(x for x in plan.runs if x.name == name)
        print(f"  {name:<28} {r.total_steps} steps, ~{fmt_s(r.estimate_s)} per run")
    left = sum(r.estimate_s for r in todo) / jobs
    budget = BUDGET_S[mode]
    print(f"estimated time: {fmt_s(left)} for {len(todo)} runs, {jobs} at once "
          f"(budget for {mode}: {fmt_s(budget)}; cost model: "
          f"{STEP_S_PER_RESPONSE * 1e3:.1f} ms/response/step, {STARTUP_S:.0f} s start-up)")
    if left > budget:
        print(f"WARNING: the estimate exceeds the {mode} budget; use --only to run fewer settings")


def execute(run: Run, preset: Path, keep_checkpoints: bool) -> None:
    """Train ``run`` in a subprocess (output to ``train.log``); raise on failure with the log
    tail."""
    run.out_dir.mkdir(parents=True, exist_ok=True)
    log = run.out_dir / "train.log"
    # An unfinished or stale run in out_dir is started again (run_finished said so).
    cmd = [sys.executable, str(TRAIN_SCRIPT), "--config", str(preset), "--overwrite",
           *run.overrides]
    with log.open("w") as f:
        f.write(" ".join(cmd) + "\n")
        f.flush()
        code = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT).returncode
    if code != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-15:])
        raise RuntimeError(f"run {run.out_dir.name} exited with status {code}; see {log}:\n{tail}")
    if not keep_checkpoints:
        # The final checkpoint (~15 MB) is not used by the report; dozens of runs add up.
        shutil.rmtree(run.out_dir / "checkpoints", ignore_errors=True)


def default_jobs() -> int:
    """Runs at once: each run takes ``icpo.runtime.auto_num_threads()`` intra-op threads (1 on a
    2- to 7-core machine), so the usable cores hold this many without oversubscribing."""
    from icpo.runtime import auto_num_threads, usable_cores

    return max(1, usable_cores() // auto_num_threads())


def run_all(plan: Plan, todo: list[Run], keep_checkpoints: bool, jobs: int = 1) -> list[str]:
    """Execute ``todo`` with up to ``jobs`` subprocesses at once (started in plan order), printing
    each run as it ends and an ETA rescaled by the measured run times."""
    from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

    failures: list[str] = []
    ratios: list[float] = []

    def timed(run: Run) -> float:
        t0 = time.perf_counter()
        execute(run, plan.preset, keep_checkpoints)
        return time.perf_counter() - t0

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        remaining = {pool.submit(timed, run): run for run in todo}
        while remaining:
            finished, _ = wait(remaining, return_when=FIRST_COMPLETED)
            for fut in sorted(finished, key=lambda f: todo.index(remaining[f])):
                run = remaining.pop(fut)
                print(f"[{len(todo) - len(remaining)}/{len(todo)}] {run.out_dir.name} ...",
                      end=" ", flush=True)
                try:
                    dt = fut.result()
                except RuntimeError as e:
                    failures.append(str(e))
                    print(f"FAILED\n{e}", flush=True)
                    continue
                ratios.append(dt / max(run.estimate_s, 1e-9))
                rows = report.read_rows(run.out_dir / "metrics.jsonl")
                acc = report.series(rows, "val/accuracy")
                shown = f"val acc {acc[0][1]:.3f} -> {acc[-1][1]:.3f}, " if acc else ""
                # Median of actual/estimated: one run slowed by a neighbour's burst does not
                # skew it.
                left = (sum(r.estimate_s for r in remaining.values())
                        * statistics.median(ratios) / max(1, jobs))
                print(f"done in {fmt_s(dt)} ({shown}ETA {fmt_s(left)})", flush=True)
    return failures


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="short runs of the main comparison (minutes)")
    p.add_argument("--only",
                   help=f"comma-separated groups {','.join(GROUP_NAMES)} or setting names")
    p.add_argument("--task", default="routes", choices=data.TASKS,
                   help="routes: the two-route testbed (default); arithmetic: icpo/tiny's task")
    p.add_argument("--out", default=None,
                   help="experiment folder (default outputs/experiments[_arithmetic][_quick])")
    p.add_argument("--results", default=None,
                   help="report folder (default results/experiments[_arithmetic]; "
                   "--quick: the --out folder)")
    p.add_argument("--seeds", type=int, default=None,
                   help="seeds per setting (default 8; --quick: 2)")
    p.add_argument("--config", default=None,
                   help="preset YAML (default: examples/configs/routes_cpu.yaml)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="extra dotted overrides for every run (after the mode's)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the plan and estimate, run nothing")
    p.add_argument("--report-only", action="store_true", help="only rebuild the report")
    p.add_argument("--keep-checkpoints", action="store_true",
                   help="keep each run's final checkpoint")
    p.add_argument("--jobs", type=int, default=None,
                   help="runs at once (default: usable cores / threads per run, 2 on a 2-core "
                   "machine)")
    args = p.parse_args(argv)
    mode = "quick" if args.quick else "full"
    args.seeds = SEEDS[mode] if args.seeds is None else args.seeds
    if args.seeds < 1:
        p.error(f"--seeds: expected an int >= 1, got {args.seeds}")
    if args.jobs is not None and args.jobs < 1:
        p.error(f"--jobs: expected an int >= 1, got {args.jobs}")
    return args


def prepare_coarse(plan: Plan, data_files: tuple[Path, Path], todo: list[Run],
                   make: bool = True) -> dict | None:
    """Writes the coarse data when a planned run needs it (``make``); returns its stats with
    repository-relative paths (None if unused or not made)."""
    if not any(s.coarse for s in plan.settings):
        return None
    from icpo.config import load_config

    path = data.coarse_path(data_files[0])
    if make and (todo or not path.is_file()):
        cfg = load_config(plan.preset, plan.mode_overrides)
        t0 = time.perf_counter()
        print(f"coarse data: {cfg.model.path} samples G={cfg.rollout.n} per training prompt ...",
              end=" ", flush=True)
        made = data.coarse_train_file(data_files[0], cfg.model.path, cfg.rollout.n,
                                      cfg.rollout.max_response_length)
        if made != path:
            raise RuntimeError(f"coarse data written to {made}, planned at {path}")
        print(f"done in {fmt_s(time.perf_counter() - t0)}", flush=True)
    stats = path.with_suffix(".json")
    if not stats.is_file():
        return None
    out = json.loads(stats.read_text())
    out["output"] = shown(out.get("output", path))
    out["train_files"] = [shown(f) for f in out.get("train_files", [])]
    return out


def shown(path: Path) -> str:
    """``path`` relative to the repository when inside it: the committed report names no machine."""
    try:
        return str(Path(path).resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def previous_timing(path: Path, mode: str, seeds: list[int]) -> dict:
    """``--report-only`` keeps how the runs were made (jobs, wall time) from the report it
    replaces, when that report was of the same mode and seeds."""
    try:
        old = json.loads(path.read_text())["meta"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    if (old.get("mode"), old.get("seeds")) != (mode, seeds):
        return {}
    return {k: old[k] for k in ("jobs", "wall_s_this_invocation") if k in old}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    mode = "quick" if args.quick else "full"
    suffix = ("" if args.task == "routes" else f"_{args.task}")
    exp_dir = Path(args.out
                   or f"outputs/experiments{suffix}{'_quick' if args.quick else ''}").resolve()
    results_dir = (Path(args.results).resolve() if args.results
                   else exp_dir if args.quick else RESULTS_DIR.with_name(RESULTS_DIR.name + suffix))
    preset = Path(args.config or PRESET).resolve()
    try:
        settings = select_settings(args.only, args.quick)
        data_files = data.ensure_data(exp_dir, args.task, *DATA_SIZES[mode])
        plan = make_plan(settings, list(range(1, args.seeds + 1)),
                         [*TASK_OVERRIDES[args.task], *MODE_OVERRIDES[mode], *args.set],
                         exp_dir, data_files, preset)
    except (FileNotFoundError, ValueError) as e:  # ConfigError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 2
    todo = [] if args.report_only else [r for r in plan.runs if not run_finished(r, preset)]
    jobs = args.jobs or default_jobs()
    print_plan(plan, mode, todo, jobs)
    if args.seeds < SEEDS["full"]:
        print(f"note: {args.seeds} seed(s); the experiments call for at least {SEEDS['full']}")
    if args.dry_run:
        return 0
    t0 = time.perf_counter()
    coarse = prepare_coarse(plan, data_files, todo, make=not args.report_only)
    failures = run_all(plan, todo, args.keep_checkpoints, jobs)
    meta = {"mode": mode, "task": args.task, "preset": shown(preset),
            "mode_overrides": plan.mode_overrides, "seeds": plan.seeds,
            "data": {"train": DATA_SIZES[mode][0], "held_out": DATA_SIZES[mode][1]},
            "coarse_data": coarse, "report_only": args.report_only,
            **(previous_timing(results_dir / "results.json", mode, plan.seeds) if args.report_only
               else {"jobs": jobs, "wall_s_this_invocation": round(time.perf_counter() - t0, 1)}),
            "shared_runs": plan.shared}
    rows = [{"group": s.group, "label": s.label, "slug": s.slug, "algorithm": s.algorithm,
             "overrides": list(s.overrides), "run": plan.run_of[s.slug],
             "runs": [{"seed": k, "dir": str(exp_dir / "runs" / f"{plan.run_of[s.slug]}_seed{k}")}
                      for k in plan.seeds]}
            for s in settings]
    written = report.write_report(results_dir, rows, meta)
    print(f"wall time: {fmt_s(time.perf_counter() - t0)}")
    print("\n".join(f"wrote {p}" for p in written))
    print((results_dir / "results.md").read_text().split("\n## ")[1].split("\n", 1)[1])
    if failures:
        print(f"{len(failures)} run(s) failed; rerun the same command to retry them",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
