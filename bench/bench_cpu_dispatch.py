"""Portable CPU kernels (one build per ISA, chosen at run time) against a -march=native build.

The question (issue 9's target): is the portable extension, dispatching to the best variant this
CPU runs, within 5 % of an ``ICPO_NATIVE=ON`` build's kernel speed? The native build is a second
copy of the extension, configured with CMake into ``--build-dir`` (reused when it exists); the
portable one is the installed ``icpo._C``. Each runs in its own worker process, which loads the
library with ``torch.ops.load_library`` and calls the raw ops (``torch.ops.icpo.*``: the C++ input
checks plus the kernel, no Python wrapper), one thread (``OMP_NUM_THREADS=1``).

The machine may be shared, so the two are measured interleaved: every round runs each case once
per configuration, the order alternating between rounds (A B / B A); a measurement is the median
of ``--iters`` calls after one warm-up; the reported time is the median over rounds, and the
ratio is the median over rounds of the per-round ratio portable / native (< 1.05 meets the
target); the same ratio from each measurement's fastest call is printed too (contention only
adds time, so the minimum is the less disturbed estimate of the kernel itself). The portable
build forced to ``avx2`` is measured in the same rounds, for information.

Cases: token_logprobs ``fwd`` (logp, entropy, lse) and ``fwdbwd`` (fwd then the gradient of the
logits), fp32 and bf16, at each ``--shapes``; segment_mean forward over ``--segments`` ragged
segments of a packed fp32 vector.

  python bench/bench_cpu_dispatch.py                      # full run, writes bench/results/
  python bench/bench_cpu_dispatch.py --shapes 256x32000 --rounds 2 --iters 2 --no-write   # smoke
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


# ---------------------------------------------------------------- worker (one library loaded)

def _worker(lib: str) -> None:
    """Load ``lib``; answer one JSON command per stdin line with one JSON result line."""
    import torch

    torch.ops.load_library(lib)
    ops = torch.ops.icpo
    cache: dict = {}

    def inputs(case):
        key = json.dumps(case, sort_keys=True)
        if key not in cache:
            cache.clear()  # one case's tensors at a time
            gen = torch.Generator().manual_seed(0)
            if case["op"] == "segment_mean":
                total, nseg = case["total"], case["segments"]
                cuts = torch.randperm(total - 1, generator=gen)[:nseg - 1].add_(1).sort().values
                cu = torch.cat([torch.zeros(1, dtype=torch.int64), cuts,
                                torch.tensor([total])]).to(torch.int32)
                cache[key] = (torch.randn(total, generator=gen), cu)
            else:
                t, v = case["shape"]
                logits = (torch.randn(t, v, generator=gen) * 3).to(getattr(torch, case["dtype"]))
                labels = torch.randint(0, v, (t,), generator=gen)
                g = torch.randn(t, generator=gen), torch.randn(t, generator=gen)
                cache[key] = (logits, labels, g)
        return cache[key]

    def runner(case):
        data = inputs(case)
        if case["op"] == "segment_mean":
            values, cu = data
            return lambda: ops.segment_mean(values, cu)
        logits, labels, (g1, g2) = data
        if case["mode"] == "fwd":
            return lambda: ops.token_logprobs_fwd(logits, labels, 1.0, -100)

        def fwdbwd():
            _, entropy, lse = ops.token_logprobs_fwd(logits, labels, 1.0, -100)
            return ops.token_logprobs_bwd(g1, g2, logits, labels, lse, entropy, 1.0, -100)
        return fwdbwd

    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd.get("quit"):
            break
        variant = ops.set_cpu_capability(cmd["variant"])
        fn = runner(cmd["case"])
        fn()  # warm-up
        times = []
        for _ in range(cmd["iters"]):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        result = {"variant": variant, "ms": statistics.median(times), "min_ms": min(times)}
        print(json.dumps(result), flush=True)


class Worker:
    """A worker process for one library; ``measure`` sends one command and waits for the answer."""

    def __init__(self, lib: str):
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        env.pop("ICPO_CPU_CAPABILITY", None)
        self.proc = subprocess.Popen([sys.executable, __file__, "--worker", lib], env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def measure(self, case: dict, variant: str, iters: int) -> dict:
        self.proc.stdin.write(json.dumps({"case": case, "variant": variant, "iters": iters}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"worker exited (code {self.proc.wait()}) on {case} / {variant}")
        return json.loads(line)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.write(json.dumps({"quit": True}) + "\n")
            self.proc.stdin.close()
            self.proc.wait(timeout=60)


# ---------------------------------------------------------------- parent

def build_native(build_dir: Path) -> Path:
    """Configure and build the extension with ICPO_NATIVE=ON (CPU only); return the library."""
    gen = ["-G", "Ninja"] if shutil.which("ninja") else []
    for cmd in (["cmake", "-S", str(REPO), "-B", str(build_dir), *gen, "-DCMAKE_BUILD_TYPE=Release",
                 "-DICPO_NATIVE=ON", "-DICPO_CUDA=OFF", f"-DPython_EXECUTABLE={sys.executable}"],
                ["cmake", "--build", str(build_dir), "-j", str(os.cpu_count() or 1)]):
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:  # CMake's output only when it failed (it warns a lot)
            sys.stderr.write(proc.stdout + proc.stderr)
            raise RuntimeError(f"native build failed: {' '.join(cmd)}")
    libs = sorted(build_dir.glob("_C*.so"))
    if not libs:
        raise RuntimeError(f"no _C*.so in {build_dir} after the build")
    return libs[0]


def portable_library() -> str:
    import importlib.util

    spec = importlib.util.find_spec("icpo._C")
    if spec is None or spec.origin is None:
        raise RuntimeError("icpo._C is not installed; pip install -e . first")
    return spec.origin


def parse_shape(text: str) -> tuple[int, int]:
    try:
        t, v = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape must look like 2048x32000, got {text!r}") from None
    if t < 1 or v < 1:
        raise argparse.ArgumentTypeError(f"shape must be positive, got {text!r}")
    return t, v


def cases(args) -> list[dict]:
    out = []
    for shape in args.shapes:
        for dtype in args.dtypes:
            for mode in ("fwd", "fwdbwd"):
                out.append({"name": f"token_logprobs {mode} {dtype} {shape[0]}x{shape[1]}",
                            "op": "token_logprobs", "mode": mode, "dtype": DTYPES[dtype],
                            "shape": list(shape)})
    out.append({"name": f"segment_mean fp32 T={args.total} B={args.segments}",
                "op": "segment_mean", "total": args.total, "segments": args.segments})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", type=parse_shape,
                        default=[(2048, 32000), (512, 151936)], help="TxV logits shapes")
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["fp32", "bf16"])
    parser.add_argument("--total", type=int, default=1 << 23, help="segment_mean: values")
    parser.add_argument("--segments", type=int, default=4096, help="segment_mean: segments")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--iters", type=int, default=5, help="timed calls per measurement")
    parser.add_argument("--build-dir", type=Path, default=None,
                        help="native build folder (default: a temporary one, removed after)")
    parser.add_argument("--native-lib", type=Path, default=None,
                        help="an already built ICPO_NATIVE=ON _C*.so (skips the build)")
    parser.add_argument("--no-write", action="store_true", help="print only, no results file")
    args = parser.parse_args()
    if args.rounds < 1 or args.iters < 1:
        parser.error("--rounds and --iters must be >= 1")
    if args.segments < 1 or args.total < args.segments:
        parser.error("need 1 <= --segments <= --total")

    from _common import machine_info, markdown_table, write_results

    tmp = None
    if args.native_lib is not None:
        native_lib = args.native_lib
    else:
        build_dir = args.build_dir
        if build_dir is None:
            tmp = tempfile.mkdtemp(prefix="icpo_native_")
            build_dir = Path(tmp)
        print(f"building the ICPO_NATIVE=ON extension in {build_dir} ...", flush=True)
        native_lib = build_native(build_dir)
    portable_lib = portable_library()

    portable, native = Worker(portable_lib), Worker(str(native_lib))
    try:
        configs = [("portable", portable, "auto"), ("native", native, "auto"),
                   ("portable_avx2", portable, "avx2")]
        all_cases = cases(args)
        times = {(c["name"], cfg[0]): [] for c in all_cases for cfg in configs}
        mins = {key: [] for key in times}
        variants: dict[str, str] = {}
        for r in range(args.rounds):
            order = configs if r % 2 == 0 else configs[1::-1] + configs[2:]
            for case in all_cases:
                for label, worker, variant in order:
                    res = worker.measure(case, variant, args.iters)
                    variants[label] = res["variant"]
                    times[(case["name"], label)].append(res["ms"])
                    mins[(case["name"], label)].append(res["min_ms"])
            print(f"round {r + 1}/{args.rounds} done", flush=True)
    finally:
        portable.close()
        native.close()
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)

    rows = []
    for case in all_cases:
        p, n, a2 = (times[(case["name"], k)] for k in ("portable", "native", "portable_avx2"))
        pm, nm = mins[(case["name"], "portable")], mins[(case["name"], "native")]
        rows.append({
            "case": case["name"],
            f"portable ({variants['portable']}) ms": statistics.median(p),
            "native ms": statistics.median(n),
            "portable / native": statistics.median(x / y for x, y in zip(p, n)),
            "same, from min times": statistics.median(x / y for x, y in zip(pm, nm)),
            "avx2 ms": statistics.median(a2),
            f"avx2 / {variants['portable']}": statistics.median(x / y for x, y in zip(a2, p)),
            "rounds_median_ms": {"portable": p, "native": n, "portable_avx2": a2},
            "rounds_min_ms": {"portable": pm, "native": nm,
                              "portable_avx2": mins[(case["name"], "portable_avx2")]},
        })
    columns = [k for k in rows[0] if not k.startswith("rounds_")]
    print(markdown_table(rows, columns))
    worst = max(r["portable / native"] for r in rows)
    verdict = "meets" if worst < 1.05 else "misses"
    print(f"worst portable / native = {worst:.3f} ({verdict} the 5 % target)")
    if not args.no_write:
        payload = {
            "benchmark": "bench_cpu_dispatch",
            "question": "portable per-ISA build (runtime dispatch) vs ICPO_NATIVE=ON build",
            "machine": {**machine_info(), "shared_machine": True},
            "settings": {"rounds": args.rounds, "iters": args.iters, "threads": 1,
                         "portable_lib": portable_lib, "native_lib": str(native_lib)},
            "variants": variants,
            "worst_ratio": worst,
            "rows": rows,
        }
        print(f"wrote {write_results('cpu_dispatch', payload)}")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        _worker(sys.argv[2])
    else:
        main()
