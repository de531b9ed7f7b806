"""Benchmark icpo.ops.token_logprobs against PyTorch eager and TRL-style chunking.

Providers (all compute the label log-prob and the entropy, fp32 accumulation, temperature 1):
  icpo     icpo.ops.token_logprobs (fused kernel, one pass over each row).
  eager    log_softmax(logits.float()) + gather + entropy -(exp(logz) * logz).sum(-1).
  chunked  the memory-saving method TRL uses: rows in chunks of 128, per chunk a logsumexp, the
           label's logit minus it, and the entropy from that chunk's log-softmax.
Modes: ``fwd`` (no grad, as when scoring rollouts) and ``fwdbwd`` (forward, then the gradient of
``sum(g1 * logp + g2 * entropy)`` with respect to the logits).

On CPU each (shape, dtype, provider, mode) runs in a fresh spawned process so its peak memory can
be measured alone (on CUDA all run in this process, emptying the allocator's cache between runs,
unless --isolate): on CPU, peak RSS (VmHWM, reset once the inputs exist; ru_maxrss where there is no
/proc) minus the RSS right after the inputs were made; on CUDA, torch.cuda.max_memory_allocated
minus the memory allocated for the inputs. Effective GB/s counts the logits bytes moved: one read
for fwd; for fwdbwd, two reads plus the gradient write. ``bw_fraction`` is that over the
device's copy bandwidth, measured at the start (a 1 GiB copy on CUDA, 256 MiB on CPU, counting
bytes read plus bytes written).

Reading CPU numbers: fresh multi-MB tensors are faulted in 4 KiB pages, which is slow on VMs.
icpo's backward asks for transparent huge pages for its gradient only with ICPO_HUGE_PAGES=1
(docs/cpu_kernels.md; off by default since it can make a first call far slower), eager/chunked
temporaries get them only with THP_MEM_ALLOC_ENABLE=1 (both recorded in the results). RSS also
counts memory glibc keeps after a free, which is most of "chunked"'s forward figure.

Example (full size) and a smoke run:
  python bench/bench_token_logprobs.py
  python bench/bench_token_logprobs.py --shapes 512x32000 --dtypes fp32 --iters 3
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import queue
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_info, markdown_table, time_fn, write_results  # noqa: E402  (after the sys.path setup for bench/)

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
PROVIDERS = ("icpo", "eager", "chunked")
MODES = ("fwd", "fwdbwd")
CHUNK_ROWS = 128
# Peak extra memory over fp32-sized logits (icpo: over its own dtype), as measured on CPU at
# T = 512; only used to skip runs that would not fit under --max-mem-gb on a shared machine.
EST_PEAK = {("icpo", "fwd"): 0.05, ("icpo", "fwdbwd"): 1.1, ("chunked", "fwd"): 0.3,
            ("chunked", "fwdbwd"): 7.5, ("eager", "fwd"): 3.3, ("eager", "fwdbwd"): 5.5}


def eager(logits, labels):
    """Plain PyTorch: full-size log-softmax, gather, entropy (several T x V temporaries)."""
    import torch

    logz = torch.log_softmax(logits.float(), dim=-1)
    logp = logz.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    entropy = -(logz.exp() * logz).sum(-1)
    return logp, entropy


def chunked(logits, labels):
    """TRL-style: CHUNK_ROWS rows at a time, so forward temporaries are CHUNK_ROWS x V."""
    import torch

    logps, entropies = [], []
    for start in range(0, logits.shape[0], CHUNK_ROWS):
        z = logits[start:start + CHUNK_ROWS].float()
        lse = torch.logsumexp(z, dim=-1)
        logps.append(z.gather(-1, labels[start:start + CHUNK_ROWS, None]).squeeze(-1) - lse)
        logz = z - lse.unsqueeze(-1)
        entropies.append(-(logz.exp() * logz).sum(-1))
    return torch.cat(logps), torch.cat(entropies)


def _make_inputs(T, V, dtype, device):
    """Logits N(0, 3^2) filled a few rows at a time, so no temporary inflates the baseline."""
    import torch

    gen = torch.Generator(device=device).manual_seed(0)
    logits = torch.empty(T, V, dtype=dtype, device=device)
    rows = max(1, (1 << 18) // V)  # about 1 MB of fp32 per step
    for start in range(0, T, rows):
        chunk = torch.randn(min(rows, T - start), V, generator=gen, device=device)
        logits[start:start + rows] = chunk.mul_(3.0)
        del chunk
    labels = torch.randint(0, V, (T,), generator=gen, device=device)
    return logits, labels


def _provider_fn(name):
    import icpo

    return {"icpo": icpo.ops.token_logprobs, "eager": eager, "chunked": chunked}[name]


def _proc_status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _rss_baseline() -> int:
    """Current RSS in bytes, after resetting the kernel's peak-RSS mark where Linux allows it
    (writing 5 to /proc/self/clear_refs), so transients from building inputs do not count."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    kb = _proc_status_kb("VmRSS")
    if kb is not None:
        return kb * 1024
    import psutil

    return psutil.Process().memory_info().rss


def _rss_peak() -> int:
    kb = _proc_status_kb("VmHWM")
    if kb is None:
        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb * 1024


def measure(cfg: dict) -> dict:
    """Run in a spawned child: build inputs, measure peak extra memory, then time."""
    import torch

    import icpo  # noqa: F401  (registers torch.ops.icpo.*)

    device = cfg["device"]
    dtype = getattr(torch, DTYPES[cfg["dtype"]])
    fn = _provider_fn(cfg["provider"])
    # Warm up on a tiny input first, so one-time costs (thread pool, lazy imports) stay out of the
    # memory measurement.
    tiny, tiny_labels = _make_inputs(4, 64, dtype, device)
    tiny.requires_grad_(cfg["mode"] == "fwdbwd")
    logp, entropy = fn(tiny, tiny_labels)
    if cfg["mode"] == "fwdbwd":
        torch.autograd.grad(logp.sum() + entropy.sum(), tiny)
    del tiny, tiny_labels, logp, entropy
    logits, labels = _make_inputs(cfg["T"], cfg["V"], dtype, device)
    if cfg["mode"] == "fwd":
        def step():
            with torch.no_grad():
                return fn(logits, labels)
    else:
        logits.requires_grad_(True)
        gen = torch.Generator(device=device).manual_seed(1)
        g1 = torch.randn(cfg["T"], generator=gen, device=device)
        g2 = torch.randn(cfg["T"], generator=gen, device=device)

        def step():
            logp, entropy = fn(logits, labels)
            return torch.autograd.grad((logp * g1).sum() + (entropy * g2).sum(), logits)[0]

    cuda = device == "cuda"
    if cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = step()
        torch.cuda.synchronize()
        peak_extra = torch.cuda.max_memory_allocated() - base
    else:
        base = _rss_baseline()
        out = step()
        peak_extra = _rss_peak() - base
    del out
    timing = (_time_cuda if cuda else time_fn)(step, cfg["warmup"], cfg["iters"])
    return {**timing, "peak_extra_bytes": max(peak_extra, 0)}


def _time_cuda(fn, warmup, iters):
    """p50/p20/p80 in ms from CUDA events around each call."""
    import statistics

    import torch

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    q = statistics.quantiles(times, n=10, method="inclusive") if len(times) > 1 else times * 9
    return {"p50": statistics.median(times), "p20": q[1], "p80": q[7]}


def copy_bandwidth(device: str) -> float:
    """GB/s of a large device-to-device copy (bytes read + bytes written), median of 10."""
    import torch

    n = (1 << 30 if device == "cuda" else 1 << 28) // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    timing = (_time_cuda if device == "cuda" else time_fn)(lambda: dst.copy_(src), 3, 10)
    return 2 * n * 4 / (timing["p50"] * 1e-3) / 1e9


def _child(cfg: dict, results) -> None:
    try:
        results.put(("ok", measure(cfg)))
    except BaseException as exc:  # report, do not hang the parent
        results.put(("error", f"{type(exc).__name__}: {exc}"))


def run_isolated(cfg: dict, timeout_s: float) -> dict:
    """measure(cfg) in a fresh spawned process; {"error": ...} if it fails, dies or times out."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    proc = ctx.Process(target=_child, args=(cfg, results), daemon=True)
    proc.start()
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            try:
                status, payload = results.get(timeout=1.0)
                break
            except queue.Empty:
                if not proc.is_alive():
                    return {"error": f"child exited with code {proc.exitcode} (out of memory?)"}
                if time.monotonic() > deadline:
                    return {"error": f"timed out after {timeout_s:.0f} s"}
    finally:
        if proc.is_alive():
            proc.join(timeout=10)
        if proc.is_alive():
            proc.kill()
    return payload if status == "ok" else {"error": payload}


def _parse_shapes(text: str) -> list[tuple[int, int]]:
    shapes = []
    for item in text.split(","):
        t, _, v = item.lower().partition("x")
        if not (t.isdigit() and v.isdigit()):
            raise argparse.ArgumentTypeError(f"--shapes wants TxV[,TxV...], got {item!r}")
        shapes.append((int(t), int(v)))
    return shapes


def _args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--shapes", type=_parse_shapes, default=_parse_shapes("8192x32000,8192x151936"),
                   help="comma-separated TxV (default 8192x32000,8192x151936)")
    p.add_argument("--tokens", type=int, help="override T of every shape (smoke runs)")
    p.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["fp32", "bf16"])
    p.add_argument("--providers", nargs="+", choices=PROVIDERS, default=list(PROVIDERS))
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=7)
    p.add_argument("--max-mem-gb", type=float, default=12.0,
                   help="skip a run whose estimated peak exceeds this many GB (shared machines)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per isolated run")
    p.add_argument("--isolate", choices=["auto", "yes", "no"], default="auto",
                   help="one spawned process per run (auto: on CPU only)")
    p.add_argument("--name", default=None, help="result file stem under bench/results/")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = _args(argv)
    import torch

    device = (args.device if args.device != "auto"
              else ("cuda" if torch.cuda.is_available() else "cpu"))
    shapes = [(args.tokens or t, v) for t, v in args.shapes]
    isolate = args.isolate == "yes" or (args.isolate == "auto" and device == "cpu")
    copy_gbps = copy_bandwidth(device)
    print(f"copy bandwidth on {device}: {copy_gbps:.0f} GB/s", flush=True)
    rows = []
    for (T, V) in shapes:
        for dname in args.dtypes:
            itemsize = torch.empty((), dtype=getattr(torch, DTYPES[dname])).element_size()
            logits_bytes = T * V * itemsize
            for mode in args.modes:
                for provider in args.providers:
                    row = {"T": T, "V": V, "dtype": dname, "mode": mode, "provider": provider,
                           "logits_MB": logits_bytes / 2**20}
                    # eager/chunked upcast to fp32, so estimates scale with fp32 bytes for them.
                    est = (EST_PEAK[(provider, mode)] * T * V
                           * (itemsize if provider == "icpo" else 4))
                    if est + logits_bytes > args.max_mem_gb * 2**30:
                        row["note"] = f"skipped: est. {(est + logits_bytes) / 2**30:.1f} GB"
                        rows.append(row)
                        print(f"skip {row}", flush=True)
                        continue
                    cfg = {"T": T, "V": V, "dtype": dname, "mode": mode, "provider": provider,
                           "device": device, "warmup": args.warmup, "iters": args.iters}
                    res = run_isolated(cfg, args.timeout) if isolate else _in_process(cfg)
                    if "error" in res:
                        row["note"] = res["error"]
                        rows.append(row)
                        print(f"failed {row}", flush=True)
                        continue
                    passes = 1 if mode == "fwd" else 3
                    row.update(p50_ms=res["p50"], p20_ms=res["p20"], p80_ms=res["p80"],
                               GBps=passes * logits_bytes / (res["p50"] * 1e-3) / 1e9,
                               bw_fraction=passes * logits_bytes / (res["p50"] * 1e-3) / 1e9
                               / copy_gbps,
                               peak_extra_MB=res["peak_extra_bytes"] / 2**20,
                               extra_over_logits=res["peak_extra_bytes"] / logits_bytes)
                    rows.append(row)
                    print({k: row[k] for k in ("T", "V", "dtype", "mode", "provider", "p50_ms",
                                               "peak_extra_MB")}, flush=True)
    _add_ratios(rows)
    columns = ["T", "V", "dtype", "mode", "provider", "p50_ms", "GBps", "bw_fraction",
               "peak_extra_MB", "extra_over_logits", "speedup_vs_eager", "speedup_vs_chunked",
               "note"]
    print()
    print(markdown_table(rows, columns))
    name = args.name or f"logprobs_{device}"
    path = write_results(name, {"benchmark": "token_logprobs", "device": device,
                                "argv": sys.argv[1:], "machine": machine_info(),
                                "gbps_counts": "fwd: 1 logits read; fwdbwd: 2 reads + 1 grad write",
                                "THP_MEM_ALLOC_ENABLE": os.environ.get("THP_MEM_ALLOC_ENABLE"),
                                "ICPO_HUGE_PAGES": os.environ.get("ICPO_HUGE_PAGES"),
                                "copy_GBps": copy_gbps, "isolated_runs": isolate,
                                "rows": rows})
    print(f"\nwrote {path}")


def _in_process(cfg: dict) -> dict:
    """measure(cfg) here (CUDA: peak memory is per-device and resettable); {"error": ...} on
    failure, e.g. out of memory."""
    import torch

    try:
        return measure(cfg)
    except Exception as exc:  # report the run, go on with the others
        return {"error": f"{type(exc).__name__}: {exc}"[:300]}
    finally:
        if cfg["device"] == "cuda":
            torch.cuda.empty_cache()


def _add_ratios(rows: list[dict]) -> None:
    """speedup_vs_<base> = base p50 / provider p50, for rows of the same shape, dtype and mode,
    base = eager and chunked."""
    for base_name in ("eager", "chunked"):
        base_p50 = {(r["T"], r["V"], r["dtype"], r["mode"]): r.get("p50_ms")
                    for r in rows if r["provider"] == base_name}
        for r in rows:
            base = base_p50.get((r["T"], r["V"], r["dtype"], r["mode"]))
            if base and r.get("p50_ms"):
                r[f"speedup_vs_{base_name}"] = base / r["p50_ms"]


if __name__ == "__main__":
    main()
