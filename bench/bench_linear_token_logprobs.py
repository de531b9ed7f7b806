"""Benchmark icpo.ops.linear_token_logprobs (LM head + label log-prob + entropy, the [T, V]
logits never held whole) against the ways of getting the same numbers from hidden states.

Methods (label log-prob and entropy of softmax(hidden @ weight.T), fp32 statistics, no bias):
  icpo          icpo.ops.linear_token_logprobs (C++ / CUDA, chunked GEMMs + fused row passes).
  materialized  logits = hidden @ weight.T, then icpo.ops.token_logprobs (today's trainer path).
  eager         logits, log_softmax in fp32, gather, entropy -(exp(logz) * logz).sum(-1).
  chunked       verl's chunked torch method, written from its description: 512-token chunks, the
                forward under no_grad, the backward recomputing each chunk's logits and its
                gradient in fp32 torch ops (d_weight summed in weight's dtype).
  cce           Cut Cross-Entropy, linear_cross_entropy(impl="torch_compile", reduction="none"):
                -logp only (no entropy); needs the package and triton on --cce-path
                (`pip install --no-deps --target /tmp/cce cut-cross-entropy triton`).
  gemm          torch.mm(hidden, weight.T) alone: the GEMM rate, whose multiples are the floors
                (fwd: 1 GEMM; fwd+bwd: 4 for icpo, which recomputes the logits, 3 without).
Modes: fwd (no grad, as when scoring rollouts) and fwdbwd (the gradient of
sum(g1 * logp + g2 * entropy), or of sum(g1 * loss) for cce, with respect to hidden and weight).

On CPU every (shape, dtype, method, mode) runs in a fresh spawned process with its own thread
count, so its memory is measured alone: peak extra memory = peak RSS (VmHWM, reset after the
inputs exist by writing 5 to /proc/self/clear_refs) minus the RSS then. It includes the returned
gradients (d_hidden and d_weight in the inputs' dtype, which every method returns);
`extra_minus_grads_MB` leaves them out, and `extra_over_logits` divides that by the fp32 [T, V]
logits (the issue's target: <= 0.05 at T = 8192). On CUDA all runs share this process (memory
from torch.cuda.max_memory_allocated) and TFLOP/s is reported against --peak-tflops.

Times: the wall-clock median (p50_ms) and the process-CPU-time median (cpu_ms, all threads); the
ratios (x_gemm_floor, time_vs_*) use the one --clock names: wall on a quiet machine, cpu when
other processes share the cores (with one thread it leaves their time out).

Results go to bench/results/<name>.json after every run (--resume skips runs already there), so
the full grid can run unattended:
  python bench/bench_linear_token_logprobs.py                       # the full CPU grid, 1 thread
  python bench/bench_linear_token_logprobs.py --quick               # seconds-long smoke run
  python bench/bench_linear_token_logprobs.py --shapes 2048x896 --dtypes fp32 bf16
  python bench/bench_linear_token_logprobs.py --device cuda --shapes 8192x4096 --dtypes bf16 \\
      --methods icpo materialized gemm --peak-tflops 989            # H100/H200 dense bf16
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import queue
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS_DIR, machine_info, markdown_table, time_fn, write_results  # noqa: E402

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
METHODS = ("icpo", "materialized", "eager", "chunked", "cce", "gemm")
MODES = ("fwd", "fwdbwd")
VERL_CHUNK = 512
# Rough peak extra memory in units of the fp32 [T, V] logits, to skip runs that would not fit
# under --max-mem-gb on a shared machine (eager / materialized / cce hold the logits whole).
EST = {("icpo", "fwd"): 0.0, ("icpo", "fwdbwd"): 0.0, ("materialized", "fwd"): 1.0,
       ("materialized", "fwdbwd"): 2.2, ("eager", "fwd"): 3.2, ("eager", "fwdbwd"): 6.0,
       ("cce", "fwd"): 1.6, ("cce", "fwdbwd"): 3.0, ("gemm", "fwd"): 1.0, ("gemm", "fwdbwd"): 1.0,
       ("chunked", "fwd"): 0.0, ("chunked", "fwdbwd"): 0.0}
FIXED_EST_BYTES = {"icpo": 400 << 20, "chunked": 6 * VERL_CHUNK * 4}  # chunked: x V below


def eager(hidden, weight, labels):
    import torch

    logz = torch.log_softmax((hidden @ weight.T).float(), dim=-1)
    logp = logz.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    return logp, -(logz.exp() * logz).sum(-1)


def materialized(hidden, weight, labels):
    import icpo.ops

    return icpo.ops.token_logprobs(hidden @ weight.T, labels)


def _chunk_stats(h, weight, labels):
    """fp32 logits of a chunk -> (logz, logp, entropy), as verl computes them."""
    import torch

    logz = torch.log_softmax((h @ weight.T).float(), dim=-1)
    p = logz.exp()
    return logz, p, logz.gather(-1, labels.unsqueeze(-1)).squeeze(-1), -(p * logz).sum(-1)


def _chunked_function():
    import torch

    class VerlChunked(torch.autograd.Function):
        @staticmethod
        def forward(ctx, hidden, weight, labels):
            logps, ents = [], []
            for s in range(0, hidden.shape[0], VERL_CHUNK):
                _, _, lp, en = _chunk_stats(hidden[s:s + VERL_CHUNK], weight,
                                            labels[s:s + VERL_CHUNK])
                logps.append(lp)
                ents.append(en)
            ctx.save_for_backward(hidden, weight, labels)
            return torch.cat(logps), torch.cat(ents)

        @staticmethod
        def backward(ctx, g_logp, g_ent):
            hidden, weight, labels = ctx.saved_tensors
            d_hidden, d_weight = torch.empty_like(hidden), torch.zeros_like(weight)
            for s in range(0, hidden.shape[0], VERL_CHUNK):
                h, y = hidden[s:s + VERL_CHUNK], labels[s:s + VERL_CHUNK]
                logz, p, _, en = _chunk_stats(h, weight, y)
                # d/dz of logp = onehot - p; of entropy = -p * (logz + H)
                dz = -p * (g_logp[s:s + VERL_CHUNK, None]
                           + g_ent[s:s + VERL_CHUNK, None] * (logz + en[:, None]))
                dz.scatter_add_(1, y[:, None], g_logp[s:s + VERL_CHUNK, None])
                dz = dz.to(hidden.dtype)
                d_hidden[s:s + VERL_CHUNK] = dz @ weight
                d_weight.addmm_(dz.T, h)
            return d_hidden, d_weight, None

    return VerlChunked.apply


def _method_fn(name, cfg):
    import torch

    import icpo.ops

    if name == "icpo":
        return lambda h, w, y: icpo.ops.linear_token_logprobs(h, w, y, chunk_size=cfg["chunk_size"])
    if name == "chunked":
        return _chunked_function()
    if name == "cce":
        sys.path.insert(0, cfg["cce_path"])
        from cut_cross_entropy import linear_cross_entropy

        return lambda h, w, y: (-linear_cross_entropy(h, w, y, impl="torch_compile",
                                                      reduction="none"), None)
    if name == "gemm":
        return lambda h, w, y: (torch.mm(h, w.T), None)
    return {"materialized": materialized, "eager": eager}[name]


def _make_inputs(T, H, V, dtype, device, seed=0):
    """hidden N(0, 1), weight scaled for logits ~ N(0, 3^2), made in pieces (no big temporary)."""
    import torch

    gen = torch.Generator(device=device).manual_seed(seed)
    hidden = torch.randn(T, H, generator=gen, device=device).to(dtype)
    weight = torch.empty(V, H, dtype=dtype, device=device)
    rows = max(1, (1 << 22) // H)
    for s in range(0, V, rows):
        piece = torch.randn(min(rows, V - s), H, generator=gen, device=device)
        weight[s:s + rows] = piece.mul_(3.0 / H**0.5)
    labels = torch.randint(0, V, (T,), generator=gen, device=device)
    return hidden, weight, labels


def _status_kb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _rss_baseline():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets the peak-RSS mark to the current RSS
    return _status_kb("VmRSS") * 1024


def measure(cfg: dict) -> dict:
    """One run (in a spawned child on CPU): warm up tiny, build inputs, peak memory, time."""
    import torch

    import icpo  # noqa: F401

    if cfg["device"] == "cpu":
        torch.set_num_threads(cfg["threads"])
    device, dtype = cfg["device"], getattr(torch, DTYPES[cfg["dtype"]])
    fn = _method_fn(cfg["method"], cfg)
    bwd = cfg["mode"] == "fwdbwd" and cfg["method"] != "gemm"

    def make_step(hidden, weight, labels):
        gen = torch.Generator(device=device).manual_seed(1)
        g1 = torch.randn(hidden.shape[0], generator=gen, device=device)
        g2 = torch.randn(hidden.shape[0], generator=gen, device=device)
        if not bwd:
            def step():
                with torch.no_grad():
                    return fn(hidden, weight, labels)
            return step
        hidden.requires_grad_(True)
        weight.requires_grad_(True)

        def step():
            logp, entropy = fn(hidden, weight, labels)
            loss = (logp * g1).sum() + (0 if entropy is None else (entropy * g2).sum())
            return torch.autograd.grad(loss, (hidden, weight))
        return step

    make_step(*_make_inputs(8, 16, 64, dtype, device))()  # thread pool, lazy imports, compiles
    inputs = _make_inputs(cfg["T"], cfg["H"], cfg["V"], dtype, device)
    step = make_step(*inputs)
    cuda = device == "cuda"
    if cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = _rss_baseline()
    start = time.perf_counter()
    out = step()
    if cuda:
        torch.cuda.synchronize()
        peak_extra = torch.cuda.max_memory_allocated() - base
    else:
        peak_extra = _status_kb("VmHWM") * 1024 - base
    first_ms = (time.perf_counter() - start) * 1e3
    del out
    if cuda:
        timing = time_fn(step, cfg["warmup"], cfg["iters"]) if cfg["iters"] else {"p50": first_ms}
    else:
        timing = _time_cpu(step, cfg["warmup"], cfg["iters"], first_ms)
    return {**timing, "first_ms": first_ms, "peak_extra_bytes": max(peak_extra, 0)}


def _time_cpu(step, warmup, iters, first_ms):
    """Median wall and process-CPU milliseconds per call (CPU time, user + system, all threads:
    with one thread it leaves out the time other processes held the core, a steadier figure on
    a shared machine)."""
    import statistics

    for _ in range(warmup):
        step()
    wall, cpu = [], []
    for _ in range(iters):
        w0, c0 = time.perf_counter(), time.process_time()
        step()
        wall.append((time.perf_counter() - w0) * 1e3)
        cpu.append((time.process_time() - c0) * 1e3)
    if not iters:
        return {"p50": first_ms}
    return {"p50": statistics.median(wall), "cpu_p50": statistics.median(cpu)}


def _child(cfg, results):
    try:
        results.put(("ok", measure(cfg)))
    except BaseException as exc:  # report, do not hang the parent
        results.put(("error", f"{type(exc).__name__}: {exc}"[:400]))


def run_isolated(cfg: dict, timeout_s: float) -> dict:
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
        proc.join(timeout=10)
        if proc.is_alive():
            proc.kill()
    return payload if status == "ok" else {"error": payload}


def _in_process(cfg: dict) -> dict:
    import torch

    try:
        return measure(cfg)
    except Exception as exc:
        return {"error": f"{type(exc).__name__}: {exc}"[:400]}
    finally:
        if cfg["device"] == "cuda":
            torch.cuda.empty_cache()


def _key(row):
    return tuple(row.get(k) for k in ("T", "H", "V", "dtype", "mode", "method", "threads"))


def _ms(row, clock):
    return row.get("cpu_ms") if clock == "cpu" else row.get("p50_ms")


def _add_ratios(rows, peak_tflops, clock):
    """Floors, ratios to materialized / cce, and TFLOP/s, within the same (T, H, V, dtype), from
    the wall or the CPU-time medians (`clock`)."""
    by = {_key(r): r for r in rows if _ms(r, clock)}

    def same(r, method, mode=None):
        return by.get((r["T"], r["H"], r["V"], r["dtype"], mode or r["mode"], method,
                       r["threads"]))

    for r in rows:
        if not _ms(r, clock):
            continue
        gemm = same(r, "gemm", "fwd")
        # GEMMs each method runs: icpo and chunked recompute the logits in the backward.
        gemms = 1 if r["mode"] == "fwd" else (4 if r["method"] in ("icpo", "chunked") else 3)
        flops = 2 * r["T"] * r["H"] * r["V"]
        r["TFLOPs"] = gemms * flops / (_ms(r, clock) * 1e-3) / 1e12
        if peak_tflops:
            r["peak_fraction"] = r["TFLOPs"] / peak_tflops
        if gemm and r["method"] != "gemm":
            r["x_gemm_floor"] = _ms(r, clock) / (gemms * _ms(gemm, clock))
        for base in ("materialized", "cce"):
            other = same(r, base)
            if other and r["method"] == "icpo":
                r[f"time_vs_{base}"] = _ms(r, clock) / _ms(other, clock)
                if other.get("extra_minus_grads_MB"):
                    r[f"mem_vs_{base}"] = r["extra_minus_grads_MB"] / other["extra_minus_grads_MB"]


def _parse_shapes(text):
    shapes = []
    for item in text.split(","):
        t, _, h = item.lower().partition("x")
        if not (t.isdigit() and h.isdigit()):
            raise argparse.ArgumentTypeError(f"--shapes wants TxH[,TxH...], got {item!r}")
        shapes.append((int(t), int(h)))
    return shapes


def _args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--shapes", type=_parse_shapes,
                   default=_parse_shapes("2048x512,2048x896,2048x2048,8192x512,8192x896,8192x2048"),
                   help="comma-separated TxH (tokens x hidden size)")
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["fp32", "bf16"])
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--threads", type=int, nargs="+", default=[1], help="CPU thread counts")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--warmup", type=int, default=0, help="untimed runs after the memory run")
    p.add_argument("--iters", type=int, default=2, help="timed runs (0: time the memory run)")
    p.add_argument("--chunk-size", type=int, default=None, help="icpo's chunk_size")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="which median the ratios use (cpu: process CPU time, steadier on a "
                        "shared machine with one thread)")
    p.add_argument("--cce-path", default="/tmp/cce", help="where cut_cross_entropy is installed")
    p.add_argument("--peak-tflops", type=float, default=None, help="device peak, for CUDA")
    p.add_argument("--max-mem-gb", type=float, default=12.0,
                   help="skip runs whose estimated peak exceeds this (shared machines)")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per isolated run")
    p.add_argument("--name", default=None, help="result file stem under bench/results/")
    p.add_argument("--resume", action="store_true", help="keep and skip runs already in the file")
    p.add_argument("--quick", action="store_true", help="T=256, H=256, V=32768, one timed run")
    args = p.parse_args(argv)
    if args.quick:
        args.shapes, args.vocab, args.iters = [(256, 256)], 32768, 1
    return args


def main(argv=None) -> None:
    import json

    import torch

    args = _args(argv)
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available()
                                                        else "cpu")
    name = args.name or (f"linear_token_logprobs_{device}" + ("_quick" if args.quick else ""))
    path = RESULTS_DIR / f"{name}.json"
    rows = json.loads(path.read_text())["rows"] if args.resume and path.exists() else []
    done = {_key(r) for r in rows if "p50_ms" in r}
    rows = [r for r in rows if _key(r) in done]
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    meta = {"benchmark": "linear_token_logprobs", "device": device, "argv": sys.argv[1:],
            "machine": machine_info(), "verl_chunk": VERL_CHUNK,
            "thp": thp.read_text().strip() if thp.exists() else None,
            "ICPO_HUGE_PAGES": os.environ.get("ICPO_HUGE_PAGES")}
    V = args.vocab
    for T, H in args.shapes:
        for dname in args.dtypes:
            itemsize = torch.empty((), dtype=getattr(torch, DTYPES[dname])).element_size()
            logits32 = T * V * 4
            grads = (T * H + V * H) * itemsize
            for threads in args.threads:
                for mode in args.modes:
                    for method in args.methods:
                        if method == "gemm" and mode == "fwdbwd":
                            continue  # one GEMM rate per shape is the floor of both modes
                        row = {"T": T, "H": H, "V": V, "dtype": dname, "mode": mode,
                               "method": method, "threads": threads if device == "cpu" else None}
                        if _key(row) in done:
                            continue
                        fixed = FIXED_EST_BYTES.get(method, 0) * (V if method == "chunked" else 1)
                        est = (EST[(method, mode)] * logits32 + fixed + (T + V) * H * itemsize
                               + (grads if mode == "fwdbwd" else 0))
                        if est > args.max_mem_gb * 2**30:
                            row["note"] = f"skipped: est. {est / 2**30:.1f} GB > --max-mem-gb"
                        else:
                            cfg = {**row, "device": device, "warmup": args.warmup,
                                   "iters": args.iters, "chunk_size": args.chunk_size,
                                   "cce_path": args.cce_path}
                            res = run_isolated(cfg, args.timeout) if device == "cpu" \
                                else _in_process(cfg)
                            if "error" in res:
                                row["note"] = res["error"]
                            else:
                                extra = res["peak_extra_bytes"]
                                minus = extra - (grads if mode == "fwdbwd" and method != "gemm"
                                                 else 0)
                                row.update(p50_ms=res["p50"], cpu_ms=res.get("cpu_p50"),
                                           first_ms=res["first_ms"],
                                           peak_extra_MB=extra / 2**20,
                                           extra_minus_grads_MB=max(minus, 0) / 2**20,
                                           extra_over_logits=max(minus, 0) / logits32)
                        rows = [r for r in rows if _key(r) != _key(row)] + [row]
                        print({k: row.get(k) for k in ("T", "H", "dtype", "mode", "method",
                                                       "p50_ms", "peak_extra_MB", "note")},
                              flush=True)
                        _add_ratios(rows, args.peak_tflops, args.clock)
                        write_results(name, {**meta, "clock": args.clock, "rows": rows})
    columns = ["T", "H", "dtype", "threads", "mode", "method", "p50_ms", "cpu_ms", "TFLOPs",
               "x_gemm_floor",
               "time_vs_materialized", "extra_minus_grads_MB", "extra_over_logits",
               "mem_vs_cce", "note"]
    if args.peak_tflops:
        columns.insert(8, "peak_fraction")
    print()
    print(markdown_table(rows, columns))
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
