"""The main job's speed on a shared CPU: alone, beside a busy process, two copies at once.

Runs the first N steps of the main job (``examples/train_icpo.py``, the tiny preset) as a
subprocess under each thread setting, in three situations, and reports step time (the sum of
``time/step`` in metrics.jsonl: start-up, evaluation and saving excluded) and the ratios:

  alone    the job by itself
  busy     the job beside one single-threaded busy loop (another user's work)
  pair     two copies of the job started together (each copy's time is reported)

Thread settings (``--modes``):

  old       torch's and OpenMP's defaults: one intra-op thread per core, spin-waiting
            (ICPO_KEEP_THREAD_DEFAULTS=1; what the project did before)
  default   this project's defaults: OMP_WAIT_POLICY=PASSIVE, trainer.num_threads auto
  omp1      OMP_NUM_THREADS=1 set by the user (passive waiting)
  omp2      OMP_NUM_THREADS=2 set by the user (passive waiting)

Targets (issue 14, 10 steps, 2-core machine): busy / alone <= 1.5, pair / alone <= 2.5 each.
Runs are interleaved (for each repeat, each situation, every mode in turn) so that drift in
the machine's load hits every mode alike. The machine should otherwise be idle.

    python bench/bench_threads.py                 # N = 10, all modes: ~30 min on 2 idle cores
    python bench/bench_threads.py --steps 3 --modes old default   # a quick check, ~7 min

Writes ``bench/results/threads.json`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS_DIR, machine_info, write_results  # noqa: E402  (after the sys.path setup for bench/)

REPO = Path(__file__).resolve().parents[1]
MODES = {
    "old": {"ICPO_KEEP_THREAD_DEFAULTS": "1"},
    "default": {},
    "omp1": {"OMP_NUM_THREADS": "1"},
    "omp2": {"OMP_NUM_THREADS": "2"},
}
SITUATIONS = ("alone", "busy", "pair")
# Seconds, measured on the 2-core development machine when idle (issue 14): one step of the
# main job alone, and the start-up of one run (imports, DeepSpeed, model, data, final save).
STEP_S, START_S = 6.3, 20.0
SLOWDOWN = {"old": {"alone": 1, "busy": 3.0, "pair": 5.7}}  # issue 14's measurements
EXPECTED = {"alone": 1, "busy": 1.3, "pair": 2.2}  # roughly, for the other modes


def estimate_s(steps: int, modes: list[str], repeats: int) -> float:
    """Rough wall time of the whole benchmark on an idle 2-core machine."""
    total = 0.0
    for m in modes:
        slow = SLOWDOWN.get(m, EXPECTED)
        total += sum(START_S + steps * STEP_S * slow[s] for s in SITUATIONS)
    return total * repeats


def _env(mode: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "MKL_NUM_THREADS",
                        "ICPO_KEEP_THREAD_DEFAULTS", "RANK", "WORLD_SIZE", "LOCAL_RANK",
                        "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(MODES[mode])
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".torch_extensions"))
    return env


def _start_job(mode: str, steps: int, out: Path) -> subprocess.Popen:
    cmd = [sys.executable, str(REPO / "examples" / "train_icpo.py"),
           f"trainer.total_steps={steps}", "trainer.eval_every=0", "trainer.save_every=0",
           "trainer.progress_bar=false", f"trainer.output_dir={out}"]
    return subprocess.Popen(cmd, cwd=REPO, env=_env(mode), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def _step_seconds(proc: subprocess.Popen, out: Path) -> float:
    _, err = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"job in {out} failed (exit {proc.returncode}):\n{err[-2000:]}")
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    return sum(r["time/step"] for r in rows if "time/step" in r)


def run(mode: str, situation: str, steps: int, work: Path) -> list[float]:
    """Step seconds of the job(s) of one (mode, situation)."""
    outs = [work / f"{mode}-{situation}-{i}-{time.monotonic_ns()}" for i in range(2)]
    busy = None
    if situation == "busy":
        busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        jobs = [_start_job(mode, steps, outs[0])]
        if situation == "pair":
            jobs.append(_start_job(mode, steps, outs[1]))
        return [_step_seconds(j, o) for j, o in zip(jobs, outs)]
    finally:
        if busy is not None:
            busy.kill()
            busy.wait()


def summarize(times: dict[str, dict[str, list[float]]]) -> dict[str, dict]:
    """Per mode: median step seconds alone, busy / alone, pair / alone (each copy and the
    worst), and, when "old" was run, old's median time over this mode's in each situation."""
    results = {}
    for mode, t in times.items():
        alone = statistics.median(t["alone"])
        results[mode] = {
            "env": MODES[mode], "step_seconds": t, "alone_s": alone,
            "busy_ratio": statistics.median(t["busy"]) / alone,
            "pair_ratio_each": [x / alone for x in t["pair"]],
            "pair_ratio_max": max(t["pair"]) / alone,
        }
        if "old" in times and mode != "old":
            results[mode]["old_over_this"] = {
                s: round(statistics.median(times["old"][s]) / statistics.median(t[s]), 2)
                for s in SITUATIONS}
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=10,
                   help="steps of the main job per run (default 10)")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    p.add_argument("--repeats", type=int, default=1, help="interleaved repeats (medians reported)")
    p.add_argument("--out", default=str(RESULTS_DIR / "threads.json"))
    args = p.parse_args(argv)
    if args.steps < 1 or args.repeats < 1:
        p.error("--steps and --repeats must be >= 1")
    est = estimate_s(args.steps, args.modes, args.repeats)
    print(f"bench_threads: {args.steps} steps, modes {args.modes}, {args.repeats} repeat(s); "
          f"about {est / 60:.0f} min on an idle 2-core machine (longer on a busy one)", flush=True)
    load_before = os.getloadavg()
    times: dict[str, dict[str, list[float]]] = {m: {s: [] for s in SITUATIONS} for m in args.modes}
    t_start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench_threads_") as tmp:
        for rep in range(args.repeats):
            for situation in SITUATIONS:
                for mode in args.modes:
                    secs = run(mode, situation, args.steps, Path(tmp))
                    times[mode][situation].extend(secs)
                    print(f"  [{rep + 1}/{args.repeats}] {mode:8s} {situation:5s} "
                          + " ".join(f"{s:7.1f} s" for s in secs), flush=True)
    results = summarize(times)
    for mode, r in results.items():
        print(f"{mode:8s} alone {r['alone_s']:7.1f} s   "
              f"busy/alone {r['busy_ratio']:.2f} (target <= 1.5)"
              f"   pair/alone {r['pair_ratio_max']:.2f} worst of two (target <= 2.5)"
              + (f"   old/this: {r['old_over_this']}" if "old_over_this" in r else ""))
    payload = {"benchmark": "threads", "steps": args.steps, "repeats": args.repeats,
               "command": "python bench/bench_threads.py " + " ".join(argv or sys.argv[1:]),
               "load_average_before": load_before, "load_average_after": os.getloadavg(),
               "wall_s": time.monotonic() - t_start, "machine": machine_info(), "results": results}
    path = write_results(Path(args.out).stem, payload) if Path(args.out).parent == RESULTS_DIR \
        else _write(Path(args.out), payload)
    print(f"wrote {path}")
    return 0


def _write(path: Path, payload: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


if __name__ == "__main__":
    sys.exit(main())
