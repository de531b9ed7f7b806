"""Summarize a tools/gpu_check.sh run into gpu_check.json and print a short table.

Reads, from --out: .steps.jsonl (each step's status and seconds), cuda_tests.xml (pytest's JUnit
report), logprobs_<device>.json (bench/bench_token_logprobs.py), linear_logprobs_<device>.json
(bench/bench_linear_token_logprobs.py), vllm_check.json (tools/gpu_vllm_check.py, where vLLM was
installed) and train_metrics.jsonl (the training run). Records the device, driver and versions,
and the issue's targets (reported either way): token_logprobs forward >= 70 % of copy
bandwidth, forward+backward >= 5x eager, forward extra memory < 5 % of the logits.

Exit: 0 when every step ran ok, no test failed, the vLLM check (if it ran) passed and the
training losses are finite; 1 otherwise.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import platform
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path


def _run(cmd: list[str]) -> str | None:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def machine() -> dict:
    info: dict = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                  "python": platform.python_version(), "platform": platform.platform()}
    smi = _run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                "--format=csv,noheader"])
    if smi:
        info["gpu"], info["driver"], info["gpu_memory"] = [s.strip() for s in smi.split(",")][:3]
    nvcc = _run(["nvcc", "--version"])
    info["nvcc"] = nvcc.splitlines()[-1] if nvcc else None
    try:
        import torch

        info["torch"], info["torch_cuda"] = torch.__version__, torch.version.cuda
        if torch.cuda.is_available():
            p = torch.cuda.get_device_properties(0)
            info["sm_count"], info["capability"] = p.multi_processor_count, f"{p.major}.{p.minor}"
        import icpo._build_info as b

        info["icpo_build"] = {"torch": b.torch_version, "cuda": b.cuda,
                              "cuda_arch_list": b.cuda_arch_list}
    except Exception as exc:  # the summary must still be written
        info["error"] = f"{type(exc).__name__}: {exc}"
    return info


def tests(path: Path) -> dict | None:
    if not path.exists():
        return None
    root = ET.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    counts["failed"] = [f"{c.get('classname')}::{c.get('name')}" for c in suite.iter("testcase")
                        if c.find("failure") is not None or c.find("error") is not None][:20]
    return counts


def bench(path: Path) -> dict | None:
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    rows = [r for r in data["rows"] if r["provider"] == "icpo" and "p50_ms" in r]
    fwd = [r for r in rows if r["mode"] == "fwd"]
    fwdbwd = [r for r in rows if r["mode"] == "fwdbwd"]
    keep = ("T", "V", "dtype", "mode", "p50_ms", "GBps", "bw_fraction", "speedup_vs_eager",
            "speedup_vs_chunked", "extra_over_logits")
    out = {"copy_GBps": data.get("copy_GBps"), "icpo": [{k: r.get(k) for k in keep} for r in rows],
           "errors": [r for r in data["rows"] if "note" in r and "skipped" not in r["note"]]}
    if fwd:
        out["target_fwd_bw_fraction_ge_0.70"] = min(r["bw_fraction"] for r in fwd) >= 0.70
        out["target_fwd_extra_memory_lt_0.05"] = max(r["extra_over_logits"] for r in fwd) < 0.05
    speedups = [r.get("speedup_vs_eager") for r in fwdbwd]
    if speedups and None not in speedups:
        out["target_fwdbwd_speedup_ge_5"] = min(speedups) >= 5.0
    return out


def linear(path: Path) -> dict | None:
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    keep = ("T", "H", "V", "dtype", "mode", "method", "p50_ms", "TFLOPs", "peak_fraction",
            "x_gemm_floor", "time_vs_materialized", "extra_over_logits", "note")
    return {"rows": [{k: r[k] for k in keep if k in r} for r in data["rows"]]}


def vllm(path: Path) -> dict | None:
    if not path.exists():
        return None
    return json.loads(path.read_text())


def train(path: Path) -> dict | None:
    if not path.exists():
        return None
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    losses = {k: v for r in records for k, v in r.items() if "loss" in k and isinstance(v, float)}
    bad = [(r.get("step"), k, v) for r in records for k, v in r.items()
           if "loss" in k and isinstance(v, (int, float)) and not math.isfinite(v)]
    return {"records": len(records), "last_step": records[-1].get("step") if records else None,
            "finite_losses": not bad and bool(losses), "non_finite": bad[:10],
            "last": {k: v for k, v in (records[-1] if records else {}).items()
                     if "loss" in k or k in ("step", "reward/mean", "val/accuracy")}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--device", default="cuda")
    p.add_argument("--dry-run", type=int, default=0)
    args = p.parse_args(argv)
    steps_file = args.out / ".steps.jsonl"
    steps = [json.loads(line) for line in steps_file.read_text().splitlines()] \
        if steps_file.exists() else []
    summary = {"dry_run": bool(args.dry_run), "device": args.device, "machine": machine(),
               "steps": steps, "tests": tests(args.out / "cuda_tests.xml"),
               "bench": bench(args.out / f"logprobs_{args.device}.json"),
               "bench_linear": linear(args.out / f"linear_logprobs_{args.device}.json"),
               "vllm": vllm(args.out / "vllm_check.json"),
               "train": train(args.out / "train_metrics.jsonl")}
    ok = (all(s["status"] == "ok" for s in steps) and bool(steps)
          and summary["tests"] is not None
          and not (summary["tests"]["failures"] or summary["tests"]["errors"])
          and bool(summary["train"] and summary["train"]["finite_losses"])
          and (summary["vllm"] is None or bool(summary["vllm"].get("passed"))))
    summary["passed"] = ok
    (args.out / "gpu_check.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")

    m = summary["machine"]
    print(f"\n== gpu_check on {m.get('gpu', 'no GPU')} (driver {m.get('driver')}), torch "
          f"{m.get('torch')}, {m.get('nvcc')}{' [DRY RUN on CPU]' if args.dry_run else ''}")
    for s in steps:
        print(f"  {s['step']:<11} {s['status']:<16} {s['seconds']:>4} s")
    t = summary["tests"]
    if t:
        print(f"  tests: {t['tests']} run, {t['failures']} failed, {t['errors']} errors, "
              f"{t['skipped']} skipped {t['failed'] or ''}")
    b = summary["bench"]
    if b:
        print(f"  copy bandwidth {b['copy_GBps']:.0f} GB/s; icpo token_logprobs:")
        for r in b["icpo"]:
            print(f"    {r['T']}x{r['V']} {r['dtype']:<4} {r['mode']:<6} {r['p50_ms']:8.3f} ms "
                  f"{r['bw_fraction']:.2f} of copy bw, {r.get('speedup_vs_eager') or 0:.1f}x eager,"
                  f" {r.get('speedup_vs_chunked') or 0:.1f}x chunked, extra mem "
                  f"{r['extra_over_logits']:.3f} of logits")
        print("  targets: " + ", ".join(f"{k[7:]}={v}" for k, v in b.items()
                                        if k.startswith("target_")))
    lin = summary["bench_linear"]
    if lin:
        print("  icpo linear_token_logprobs (fused LM head):")
        for r in lin["rows"]:
            if "p50_ms" in r:
                print(f"    {r['T']}x{r['H']}x{r['V']} {r['dtype']:<4} {r['mode']:<6} "
                      f"{r['method']:<12} {r['p50_ms']:9.3f} ms {r.get('TFLOPs') or 0:7.3g} "
                      f"TFLOP/s ({r.get('peak_fraction') or 0:.2f} of peak)")
    v = summary["vllm"]
    if v:
        mem = v.get("memory") or {}
        print(f"  vllm ({v.get('dtype')}): passed={v.get('passed')} synced gap "
              f"{v.get('synced_gap')} (stale {v.get('stale_gap')}), sampling log-prob gap "
              f"{v.get('sampling_logprob_gap')}, sleep frees {mem.get('freed_by_sleep_GiB')} GiB, "
              f"greedy equal {v.get('greedy_equal_fraction')} {v.get('error') or ''}")
    tr = summary["train"]
    if tr:
        print(f"  train: {tr['records']} records, finite losses {tr['finite_losses']}, "
              f"last {tr['last']}")
    print(f"  PASSED={ok}  ({args.out / 'gpu_check.json'})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
