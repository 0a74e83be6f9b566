"""Benchmark of the fused kernels against eager PyTorch, torch.compile and SDPA, timed the same way.

    python -m kernels.bench                              # both ops; benchmarks/kernels_<device>.{md,csv}
    python -m kernels.bench --graphs --size bank_attention:64,2048,768 --append   # all as CUDA graphs
    python -m kernels.bench --op contrastive_loss --repeats 50 --out benchmarks/h100

For each op, size and implementation (eager, torch.compile, SDPA for bank attention, the Triton
kernels): the output and every gradient are first checked against the reference in higher precision
(fp64 on a CPU, fp32 on a GPU) and the row is FAILED when the max relative error exceeds TOL for its
dtype (the exit status is then 1); then the first call is timed on its own (torch.compile's
compilation, Triton's JIT and its first-use choice among candidate configurations: "first call s"),
then --warmup calls (at least 10 by default), then forward, backward and forward + backward,
--repeats times each: median and 10-90% spread, CUDA events, L2 flushed before every timed call.
Every implementation is timed the same way: by default as plain launches, with --graphs each one's
forward + backward captured as one CUDA graph and replayed (launch overhead removed for all alike).
On a GPU also: host ms (CPU time to enqueue one forward + backward, not waiting for the GPU) and peak
memory of forward + backward beyond the inputs. The Triton rows name the configuration each kernel
chose on this GPU. Each row is appended to the Markdown and CSV files as soon as it is measured, so
a run stopped by --deadline (seconds) or killed keeps every finished row.
TFLOP/s use the algorithmic FLOPs, the same for every implementation, so they compare speed only:
    bank_attention    fwd 4NKd (x D^T, P D)        bwd 8NKd (dP, dx, and both roles of dD)
    contrastive_loss  fwd 2N^2 d                   bwd 4N^2 d
given as a fraction of the matmul ceiling measured in the same run (and of the data-sheet dense bf16
peak when the GPU is known). Without a GPU it times eager (and, if asked, torch.compile) on the CPU
at small sizes in fp32; the Triton rows run only through the interpreter (TRITON_INTERPRET=1),
whose times mean nothing but whose accuracy does.
"""
import argparse
import csv
import datetime
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from kernels import tuning
from kernels.bank_attention import bank_attention, bank_attention_reference
from kernels.similarity import contrastive_loss, contrastive_loss_reference

GPU_SIZES = [("bank_attention", 64, 2048, 768), ("bank_attention", 4096, 2048, 768),
             ("bank_attention", 65536, 2048, 768), ("contrastive_loss", 64, 0, 768),
             ("contrastive_loss", 4096, 0, 768), ("contrastive_loss", 32768, 0, 768)]
CPU_SIZES = [("bank_attention", 64, 512, 256), ("bank_attention", 512, 512, 256),
             ("contrastive_loss", 64, 0, 256), ("contrastive_loss", 512, 0, 256)]
TAU = 0.1
PEAK_BF16 = {"H100 SXM": 989e12, "H100 80GB HBM3": 989e12, "H100 PCIe": 756e12, "H100 NVL": 835e12,
             "H200": 989e12, "A100": 312e12}  # dense tensor-core TFLOP/s, NVIDIA data sheets
# max relative error against the reference: on a GPU against fp32 (bf16 / fp16 rounding of P, H and
# the outputs; fp32 Triton products are TF32), on a CPU against fp64
TOL = {"cuda": {torch.bfloat16: 2e-2, torch.float16: 5e-3, torch.float32: 5e-3},
       "cpu": {torch.bfloat16: 2e-2, torch.float16: 5e-3, torch.float32: 1e-4}}
COLUMNS = ["op", "impl", "N", "K", "d", "dtype", "mode", "fwd_ms", "bwd_ms", "fwdbwd_ms", "fwdbwd_p10", "fwdbwd_p90",
           "host_ms", "first_call_s", "peak_mib", "tflops", "of_ceiling", "of_peak", "speed", "memory",
           "max_rel_err", "tol", "status", "config", "device", "torch", "triton", "date"]


def _flops(op: str, N: int, K: int, d: int) -> tuple[float, float]:
    """(forward, backward) algorithmic FLOPs."""
    unit = 2.0 * N * K * d if op == "bank_attention" else 2.0 * N * N * d
    return (2 * unit, 4 * unit) if op == "bank_attention" else (unit, 2 * unit)


def _timer(device: torch.device):
    """-> time(fn, repeats, setup) returning (median, 10th, 90th percentile) ms of fn(); setup untimed."""
    flush = torch.empty(256 * 2 ** 20, dtype=torch.int8, device=device) if device.type == "cuda" else None

    def run(fn, repeats, setup=None):
        times = []
        for _ in range(repeats):
            if setup is not None:
                setup()
            if device.type == "cuda":
                flush.zero_()  # evict the inputs from the 50 MB L2: every run starts cold
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
        if len(times) < 2:
            return times[0], times[0], times[0]
        q = statistics.quantiles(times, n=10, method="inclusive")
        return statistics.median(times), q[0], q[-1]
    return run


def matmul_ceiling(device: torch.device, dtype: torch.dtype) -> float:
    """Measured TFLOP/s of one large square matmul: the practical compute ceiling of this device."""
    n = 8192 if device.type == "cuda" else 1024
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    timer = _timer(device)
    timer(lambda: a @ b, 3)
    return 2 * n ** 3 / (timer(lambda: a @ b, 10)[0] * 1e-3) / 1e12


def _datasheet_peak(name: str) -> float | None:
    return next((v for k, v in PEAK_BF16.items() if k.lower() in name.lower()), None)


def _sdpa(device: torch.device, dtype: torch.dtype):
    """Bank attention as SDPA (q = x, k = v = D) on the first backend that runs fwd+bwd at d = 768."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                    SDPBackend.MATH):
        def fn(x, D, scale=1.0, backend=backend):
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(x[None, None], D[None, None], D[None, None],
                                                      scale=scale)[0, 0]  # (N, d)
        try:
            x = torch.randn(64, 768, device=device, dtype=dtype, requires_grad=True)
            D = torch.randn(128, 768, device=device, dtype=dtype, requires_grad=True)
            fn(x, D).sum().backward()
            return fn, backend.name.lower()
        except RuntimeError:
            continue
    return None, "none"


def _implementations(op: str, device: torch.device, dtype: torch.dtype, wanted: set) -> list:
    """(name, fn) pairs in the order measured (eager first: the others are compared with it)."""
    ref = bank_attention_reference if op == "bank_attention" else contrastive_loss_reference
    fused = bank_attention if op == "bank_attention" else contrastive_loss
    impls = [("eager", ref)] if "eager" in wanted else []
    if "compile" in wanted:
        impls.append(("torch.compile", ref))
    if op == "bank_attention" and "sdpa" in wanted:
        sdpa, backend = _sdpa(device, dtype)
        if sdpa is not None:
            impls.append((f"sdpa[{backend}]", sdpa))
    if "triton" in wanted and (device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"):
        impls.append(("triton" if device.type == "cuda" else "triton (interpreter)", fused))
    return impls


def _inputs(op, N, K, d, device, dtype):
    g = torch.Generator(device=device).manual_seed(0)
    if op == "bank_attention":
        x = torch.randn(N, d, device=device, dtype=dtype, generator=g).requires_grad_()
        D = torch.randn(K, d, device=device, dtype=dtype, generator=g).div_(math.sqrt(d)).requires_grad_()
        return (x, D), (1.0,), torch.randn(N, d, device=device, dtype=dtype, generator=g)
    a = torch.randn(N, d, device=device, dtype=dtype, generator=g).requires_grad_()
    b = torch.randn(N, d, device=device, dtype=dtype, generator=g).requires_grad_()
    return (a, b), (TAU,), None


def check(op, fn, leaves, extra, dy) -> float:
    """Max relative error of fn's output and gradients against the reference in higher precision."""
    ref = bank_attention_reference if op == "bank_attention" else contrastive_loss_reference
    hi = torch.float64 if leaves[0].device.type == "cpu" else torch.float32
    outs = []
    for f, ls in ((fn, leaves), (ref, [t.detach().to(hi).requires_grad_() for t in leaves])):
        y = f(*ls, *extra)
        grads = torch.autograd.grad(y, ls, None if dy is None else dy.to(y.dtype))
        outs.append([y.detach(), *grads])
    return max(((g.to(hi) - w).abs().max() / w.abs().max().clamp_min(1e-30)).item() for g, w in zip(*outs))


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(op, fn, N, K, d, device, dtype, repeats, warmup, graphs) -> dict:
    """One implementation at one size: error, first call, then the timings (see the docstring)."""
    leaves, extra, dy = _inputs(op, N, K, d, device, dtype)
    timer, state = _timer(device), {}

    def zero():
        for t in leaves:
            t.grad = None

    def fwd_bwd():
        zero()
        fn(*leaves, *extra).backward(dy)

    def forward():  # untimed set-up of the backward timing (compiled graphs free their buffers)
        zero()
        state["y"] = fn(*leaves, *extra)

    t0 = time.perf_counter()
    fwd_bwd()  # compilation, Triton's JIT and first-use choice of configurations
    _sync(device)
    row = dict(first_call_s=time.perf_counter() - t0, max_rel_err=check(op, fn, leaves, extra, dy))
    for _ in range(warmup):
        fwd_bwd()
    if graphs:  # forward + backward as one CUDA graph, replayed: launch overhead removed
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                fn(*leaves, *extra).backward(dy)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn(*leaves, *extra).backward(dy)  # gradients accumulate into the static .grad buffers
        row["fwdbwd_ms"], row["fwdbwd_p10"], row["fwdbwd_p90"] = timer(graph.replay, repeats)
        return row
    row["fwd_ms"] = timer(lambda: fn(*leaves, *extra), repeats)[0]
    row["bwd_ms"] = timer(lambda: state["y"].backward(dy), repeats, setup=forward)[0]
    state.clear()
    row["fwdbwd_ms"], row["fwdbwd_p10"], row["fwdbwd_p90"] = timer(fwd_bwd, repeats)
    if device.type == "cuda":
        host = []
        for _ in range(repeats):  # enqueue only; synchronised between calls so the queue never fills
            _sync(device)
            t0 = time.perf_counter()
            fwd_bwd()
            host.append((time.perf_counter() - t0) * 1e3)
        row["host_ms"] = statistics.median(host)
        zero()
        _sync(device)
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fwd_bwd()
        _sync(device)
        row["peak_mib"] = (torch.cuda.max_memory_allocated() - base) / 2 ** 20
    return row


class Table:
    """The Markdown and CSV files, one row appended (and flushed) as soon as it is measured."""

    MD = [("fwd_ms", "fwd ms", "{:.3f}"), ("bwd_ms", "bwd ms", "{:.3f}"), ("fwdbwd_ms", "fwd+bwd ms", "{:.3f}"),
          ("spread", "10-90%", "{}"), ("host_ms", "host ms", "{:.3f}"), ("first_call_s", "first call s", "{:.2f}"),
          ("peak_mib", "peak MiB", "{:.0f}"), ("tflops", "TFLOP/s", "{:.3g}"),
          ("of_ceiling", "of matmul ceiling", "{:.1%}"),
          ("of_peak", "of data-sheet peak", "{:.1%}"), ("speed", "speed vs eager", "{:.2f}x"),
          ("memory", "memory vs eager", "{:.2f}"), ("max_rel_err", "max rel err", "{:.1e}"), ("tol", "tol", "{:g}"),
          ("status", "status", "{}"), ("config", "Triton configuration chosen", "{}")]

    def __init__(self, stem: Path, env: dict, info: dict, append: bool):
        stem.parent.mkdir(parents=True, exist_ok=True)
        self.md_path, self.csv_path = stem.with_suffix(".md"), stem.with_suffix(".csv")
        fresh = not append or not self.md_path.exists()
        self.env, self.eager = env, {}
        with open(self.md_path, "w" if fresh else "a") as f:
            f.write(("" if fresh else "\n") + f"{env['device']} | torch {env['torch']} | triton {env['triton']} | "
                    f"{env['date']}\nmeasured {info['dtype']} matmul ceiling: {info['ceiling']:.3g} TFLOP/s"
                    + (f"; data-sheet peak {info['peak']:.0f} TFLOP/s" if info["peak"] else "") + "\n\n"
                    "| op | impl | N | K | d | dtype | mode | " + " | ".join(c[1] for c in self.MD) + " |\n"
                    "|---|---|---:|---:|---:|---|---|" + "---:|" * (len(self.MD) - 2) + "---|---|\n")
        if fresh or not self.csv_path.exists():
            with open(self.csv_path, "w", newline="") as f:
                csv.DictWriter(f, fieldnames=COLUMNS).writeheader()

    def add(self, row: dict):
        key = (row["op"], row["N"], row["K"], row["d"], row["mode"])
        if row["impl"] == "eager" and "fwdbwd_ms" in row:
            self.eager[key] = row
        e = self.eager.get(key)
        if e and "fwdbwd_ms" in row:
            row["speed"] = e["fwdbwd_ms"] / row["fwdbwd_ms"]
            if row.get("peak_mib") and e.get("peak_mib"):
                row["memory"] = row["peak_mib"] / e["peak_mib"]
        if "fwdbwd_p10" in row:
            row["spread"] = f"{row['fwdbwd_p10']:.3f}-{row['fwdbwd_p90']:.3f}"
        cells = [fmt.format(row[k]) if row.get(k) is not None else "" for k, _, fmt in self.MD]
        with open(self.md_path, "a") as f:
            f.write(f"| {row['op']} | {row['impl']} | {row['N']} | {row['K'] or ''} | {row['d']} | "
                    f"{row.get('dtype', '')} | {row['mode']} | " + " | ".join(cells) + " |\n")
        with open(self.csv_path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore").writerow({**row, **self.env})
        print(f"{row['op']:16s} {row['impl']:22s} N={row['N']:<6} {row['mode']:7s} "
              + (f"fwd+bwd {row['fwdbwd_ms']:.3f} ms" if "fwdbwd_ms" in row else "")
              + (f"  err {row['max_rel_err']:.1e}" if "max_rel_err" in row else "") + f"  {row['status']}"
              + (f"  [{row['config']}]" if row.get("config") else ""), flush=True)


def _chosen_since(before: set) -> str:
    """The configurations Triton's launchers chose since `before` (keys of tuning.CHOSEN)."""
    return "; ".join(f"{key[0]} {cfg}" for key, cfg in tuning.CHOSEN.items() if key not in before)


def run(sizes, device, dtype, impls, repeats, warmup, graphs, table, info, deadline) -> bool:
    """Measure every (size, implementation) into `table` -> True when no row FAILED."""
    ok = True
    for op, N, K, d in sizes:
        fwd_flops, bwd_flops = _flops(op, N, K, d)
        for name, fn in _implementations(op, device, dtype, impls):
            row = dict(op=op, impl=name, N=N, K=K, d=d, dtype=str(dtype).split(".")[1],
                       mode="graph" if graphs else "launch", tol=TOL[device.type][dtype])
            if time.time() > deadline:
                table.add({**row, "status": "skipped (deadline)"})
                continue
            before = set(tuning.CHOSEN)
            try:
                if name == "torch.compile":  # one compiled object per size: no recompiles, static shapes
                    torch._dynamo.reset()
                    fn = torch.compile(fn, dynamic=False)
                row.update(measure(op, fn, N, K, d, device, dtype, repeats, warmup, graphs))
            except Exception as e:  # one failing implementation must not hide the others; only ours fails the run
                ours = name.startswith("triton")
                row["status"] = (f"{'FAILED' if ours else 'error'}: {type(e).__name__}: {str(e)[:160]}"
                                 .replace("|", "/").replace("\n", " "))
                ok = ok and not ours
                table.add(row)
                continue
            tflops = (fwd_flops + bwd_flops) / (row["fwdbwd_ms"] * 1e-3) / 1e12
            row.update(tflops=tflops, of_ceiling=tflops / info["ceiling"],
                       of_peak=tflops / info["peak"] if info["peak"] else None,
                       status="ok" if row["max_rel_err"] <= row["tol"] else "FAILED",
                       config=_chosen_since(before) if name.startswith("triton") else "")
            ok = ok and row["status"] == "ok"
            table.add(row)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return ok


def _environment(device: torch.device) -> dict:
    import triton
    gpu = device.type == "cuda"
    name = torch.cuda.get_device_name(device) if gpu else f"CPU ({torch.get_num_threads()} threads)"
    return dict(device=name, torch=torch.__version__, triton=triton.__version__,
                date=datetime.datetime.now().isoformat(timespec="seconds"))


def _size(text: str) -> tuple:
    """'op:N,K,d' (K = 0 for the contrastive loss) -> (op, N, K, d)."""
    op, sizes = text.split(":")
    if op not in ("bank_attention", "contrastive_loss"):
        raise argparse.ArgumentTypeError(f"unknown op {op!r}")
    return (op, *map(int, sizes.split(",")))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--op", choices=["bank_attention", "contrastive_loss", "all"], default="all")
    p.add_argument("--size", type=_size, action="append", default=[],
                   help="op:N,K,d instead of the default sizes (K = 0 for contrastive_loss); repeatable")
    p.add_argument("--impls", default="eager,compile,sdpa,triton",
                   help="comma-separated subset of eager, compile, sdpa, triton")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], help="default: bf16 on a GPU, fp32 on a CPU")
    p.add_argument("--out", default=None, help="path stem of the .csv and .md (default benchmarks/kernels_<device>)")
    p.add_argument("--append", action="store_true", help="append to the .md / .csv instead of starting them anew")
    p.add_argument("--repeats", type=int, default=20, help="timed repeats per measurement (median, 10-90%%)")
    p.add_argument("--warmup", type=int, default=10, help="untimed calls after the first one")
    p.add_argument("--graphs", action="store_true", help="time every implementation as a replayed CUDA graph")
    p.add_argument("--deadline", type=float, default=None, help="seconds: rows not started by then are skipped")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.graphs and device.type != "cuda":
        p.error("--graphs needs a GPU")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}.get(
        args.dtype, torch.bfloat16 if device.type == "cuda" else torch.float32)
    sizes = [s for s in (args.size or (GPU_SIZES if device.type == "cuda" else CPU_SIZES))
             if args.op in ("all", s[0])]
    deadline = time.time() + args.deadline if args.deadline else float("inf")
    if device.type == "cpu":
        print("No GPU: times are the CPU's (fp32 unless --dtype); Triton rows only through the interpreter.")
    env = _environment(device)
    info = dict(ceiling=matmul_ceiling(device, dtype), dtype=str(dtype).split(".")[1],
                peak=(_datasheet_peak(env["device"]) or 0) / 1e12 if device.type == "cuda" else None)
    stem = Path(args.out or f"benchmarks/kernels_{'cpu' if device.type == 'cpu' else env['device'].replace(' ', '_')}")
    table = Table(stem, env, info, args.append)
    ok = run(sizes, device, dtype, set(args.impls.split(",")), args.repeats, args.warmup, args.graphs, table, info,
             deadline)
    print(f"\nwrote {table.md_path} and {table.csv_path}" + ("" if ok else "; some rows FAILED"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
