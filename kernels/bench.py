"""Benchmark of the fused kernels against eager PyTorch, torch.compile and SDPA (SPEC section 9).

    python -m kernels.bench                       # both ops; table on stdout, CSV + Markdown in benchmarks/
    python -m kernels.bench --op bank_attention --out benchmarks/h100 --repeats 50

For each op and size, every implementation is first checked against the reference (fp64 on a CPU,
fp32 on a GPU; max relative error of the output and of every gradient, in the table), then timed:
forward, backward and forward+backward (median of repeats, CUDA events, L2 flushed by writing a
256 MB buffer before every timed call), and peak memory of forward+backward beyond the inputs.
torch.compile gets one compiled object per size (dynamic=False, so no recompiles and no dynamic
shapes); SDPA names the backend that ran; at the paper's N = 64 the fused op is also timed as one
CUDA graph replay (launch overhead removed). TFLOP/s use the algorithmic FLOPs, the same for every
implementation, so they compare speed only:
    bank_attention    fwd 4NKd (x D^T, P D)        bwd 8NKd (dP, dx, and both roles of dD)
    contrastive_loss  fwd 2N^2 d                   bwd 4N^2 d
and are given as a fraction of the data-sheet dense bf16 peak (when the GPU is known) and of the
matmul ceiling measured in the same run. On a machine without a GPU it compares eager and
torch.compile on the CPU at small sizes (fp32), labelled as such; what a CPU cannot measure (the
Triton rows, which need a GPU; peak GPU memory; CUDA graphs) is left out rather than written as nan.
"""
import argparse
import csv
import datetime
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from kernels.bank_attention import bank_attention, bank_attention_reference
from kernels.similarity import contrastive_loss, contrastive_loss_reference

GPU_SIZES = dict(bank_attention=[(64, 2048, 768), (4096, 2048, 768), (65536, 2048, 768)],
                 contrastive_loss=[(64, 0, 768), (4096, 0, 768), (32768, 0, 768)])
CPU_SIZES = dict(bank_attention=[(64, 512, 256), (512, 512, 256)],
                 contrastive_loss=[(64, 0, 256), (512, 0, 256)])
TAU = 0.1
PEAK_BF16 = {"H100 SXM": 989e12, "H100 80GB HBM3": 989e12, "H100 PCIe": 756e12, "H100 NVL": 835e12,
             "H200": 989e12, "A100": 312e12}  # dense tensor-core TFLOP/s, NVIDIA data sheets
TOL = {torch.bfloat16: 2e-2, torch.float16: 5e-3, torch.float32: 2e-3}  # on a GPU (TF32), vs fp32


def _flops(op: str, N: int, K: int, d: int) -> tuple[float, float]:
    """(forward, backward) algorithmic FLOPs."""
    unit = 2.0 * N * K * d if op == "bank_attention" else 2.0 * N * N * d
    return (2 * unit, 4 * unit) if op == "bank_attention" else (unit, 2 * unit)


def _timer(device: torch.device):
    """-> time(fn, repeats, setup) returning the median milliseconds of fn(), setup() untimed."""
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
        return statistics.median(times)
    return run


def matmul_ceiling(device: torch.device, dtype: torch.dtype) -> float:
    """Measured TFLOP/s of one large square matmul: the practical compute ceiling of this device."""
    n = 8192 if device.type == "cuda" else 1024
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    timer = _timer(device)
    timer(lambda: a @ b, 3)
    return 2 * n ** 3 / (timer(lambda: a @ b, 10) * 1e-3) / 1e12


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


def _implementations(op: str, device: torch.device, dtype: torch.dtype) -> list[tuple[str, object]]:
    """(name, fn) pairs; "torch.compile" is compiled per size by run()."""
    ref = bank_attention_reference if op == "bank_attention" else contrastive_loss_reference
    impls = [("eager", ref), ("torch.compile", ref)]
    if op == "bank_attention":
        sdpa, backend = _sdpa(device, dtype)
        if sdpa is not None:
            impls.append((f"sdpa[{backend}]", sdpa))
    if device.type == "cuda":
        impls.append(("triton (ours)", bank_attention if op == "bank_attention" else contrastive_loss))
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


def measure(op, fn, N, K, d, device, dtype, repeats) -> dict:
    """fwd / bwd / fwd+bwd median ms (and on a GPU peak MiB) of one implementation at one size."""
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

    row = dict(max_rel_err=check(op, fn, leaves, extra, dy))
    for _ in range(3):  # warm-up: compilation, autotuning, allocator
        fwd_bwd()
    row.update(fwd_ms=timer(lambda: fn(*leaves, *extra), repeats),
               bwd_ms=timer(lambda: state["y"].backward(dy), repeats, setup=forward),
               fwdbwd_ms=timer(fwd_bwd, repeats))
    state.clear()
    if device.type == "cuda":
        zero()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fwd_bwd()
        torch.cuda.synchronize()
        row["peak_mib"] = (torch.cuda.max_memory_allocated() - base) / 2 ** 20
    return row


def measure_graph(op, fn, N, K, d, device, dtype, repeats) -> dict:
    """fwd+bwd of fn captured as one CUDA graph and replayed: the launch overhead taken away."""
    leaves, extra, dy = _inputs(op, N, K, d, device, dtype)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture (allocator, Triton's JIT)
        for _ in range(3):
            fn(*leaves, *extra).backward(dy)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn(*leaves, *extra).backward(dy)  # gradients accumulate into the static .grad buffers
    return dict(fwdbwd_ms=_timer(device)(graph.replay, repeats))


def run(ops, device, repeats) -> tuple[list[dict], dict]:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    ceiling = matmul_ceiling(device, dtype)
    peak = _datasheet_peak(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    sizes = GPU_SIZES if device.type == "cuda" else CPU_SIZES
    rows = []
    for op in ops:
        impls = _implementations(op, device, dtype)
        for N, K, d in sizes[op]:
            fwd_flops, bwd_flops = _flops(op, N, K, d)
            for name, fn in impls:
                if name == "torch.compile":  # one compiled object per size: no recompiles, static shapes
                    torch._dynamo.reset()
                    fn = torch.compile(fn, dynamic=False)
                timings = [(name, measure)]
                if name == "triton (ours)" and N <= 64:
                    timings.append((name + " + CUDA graph", measure_graph))
                for label, how in timings:
                    try:
                        r = how(op, fn, N, K, d, device, dtype, repeats)
                    except Exception as e:  # one failing implementation must not hide the others
                        rows.append(dict(op=op, impl=label, N=N, K=K or "", d=d,
                                         error=f"{type(e).__name__}: {str(e)[:160]}"))
                        continue
                    tflops = (fwd_flops + bwd_flops) / (r["fwdbwd_ms"] * 1e-3) / 1e12
                    rows.append(dict(op=op, impl=label, N=N, K=K or "", d=d, dtype=str(dtype).split(".")[1],
                                     **r, tflops=tflops, of_ceiling=tflops / ceiling,
                                     **({"of_peak": tflops * 1e12 / peak} if peak else {})))
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows, dict(ceiling_tflops=ceiling, peak_tflops=peak and peak / 1e12, dtype=str(dtype).split(".")[1])


def _environment(device: torch.device) -> dict:
    import triton
    gpu = device.type == "cuda"
    name = torch.cuda.get_device_name(device) if gpu else f"CPU ({torch.get_num_threads()} threads)"
    return dict(device=name, torch=torch.__version__, triton=triton.__version__,
                date=datetime.datetime.now().isoformat(timespec="seconds"))


COLUMNS = [("fwd_ms", "fwd ms", "{:.3f}"), ("bwd_ms", "bwd ms", "{:.3f}"), ("fwdbwd_ms", "fwd+bwd ms", "{:.3f}"),
           ("peak_mib", "peak MiB", "{:.0f}"), ("tflops", "TFLOP/s", "{:.3g}"),
           ("of_peak", "of data-sheet peak", "{:.1%}"), ("of_ceiling", "of matmul ceiling", "{:.1%}"),
           ("speed", "speed vs eager", "{:.2f}x"), ("memory", "memory vs eager", "{:.2f}"),
           ("max_rel_err", "max rel err", "{:.1e}")]


def markdown(rows, info, env) -> str:
    eager = {(r["op"], r["N"]): r for r in rows if r["impl"] == "eager" and "error" not in r}
    for r in rows:
        e = eager.get((r["op"], r["N"]))
        if e and "fwdbwd_ms" in r:
            r["speed"] = e["fwdbwd_ms"] / r["fwdbwd_ms"]
            if "peak_mib" in r and e.get("peak_mib"):
                r["memory"] = r["peak_mib"] / e["peak_mib"]
    cols = [c for c in COLUMNS if any(c[0] in r for r in rows)]  # what this machine could measure
    lines = [f"{env['device']} | torch {env['torch']} | triton {env['triton']} | {env['date']}",
             f"measured {info['dtype']} matmul ceiling: {info['ceiling_tflops']:.3g} TFLOP/s"
             + (f"; data-sheet peak {info['peak_tflops']:.0f} TFLOP/s" if info["peak_tflops"] else ""), "",
             "| op | impl | N | K | d | " + " | ".join(c[1] for c in cols) + " |",
             "|---|---|---:|---:|---:|" + "---:|" * len(cols)]
    for r in rows:
        cells = [c[2].format(r[c[0]]) if c[0] in r else "" for c in cols]
        lines.append(f"| {r['op']} | {r['impl']} | {r['N']} | {r['K']} | {r['d']} | " + " | ".join(cells) + " |"
                     + (f" {r['error']}" if "error" in r else ""))
    return "\n".join(lines)


def write_csv(path: Path, rows, info, env):
    cols = [c[0] for c in COLUMNS if any(c[0] in r for r in rows)]
    fields = ["op", "impl", "N", "K", "d", "dtype", *cols, "ceiling_tflops", "device", "torch", "triton", "date"]
    fields += ["error"] if any("error" in r for r in rows) else []
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({**r, "ceiling_tflops": info["ceiling_tflops"], **env})


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--op", choices=["bank_attention", "contrastive_loss", "all"], default="all")
    p.add_argument("--out", default=None, help="path stem of the .csv and .md (default benchmarks/kernels_<device>)")
    p.add_argument("--repeats", type=int, default=20, help="timed repeats per measurement (median)")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ops = ["bank_attention", "contrastive_loss"] if args.op == "all" else [args.op]
    if device.type == "cpu":
        print("No GPU: timing eager and torch.compile on the CPU at small sizes (fp32). "
              "The Triton kernels need a GPU to be timed.")
    rows, info = run(ops, device, args.repeats if device.type == "cuda" else min(args.repeats, 5))
    env = _environment(device)
    table = markdown(rows, info, env)
    print("\n" + table)
    stem = Path(args.out or f"benchmarks/kernels_{'cpu' if device.type == 'cpu' else env['device'].replace(' ', '_')}")
    stem.parent.mkdir(parents=True, exist_ok=True)
    write_csv(stem.with_suffix(".csv"), rows, info, env)
    stem.with_suffix(".md").write_text(table + "\n")
    print(f"\nwrote {stem.with_suffix('.csv')} and {stem.with_suffix('.md')}")
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
