"""Benchmark of the fused kernels against eager PyTorch, torch.compile and SDPA (SPEC section 9).

    python -m kernels.bench                       # both ops; table on stdout, CSV in out/
    python -m kernels.bench --op bank_attention --csv out/bank.csv --repeats 50

For each op and size: forward, backward and forward+backward time (median of repeats, CUDA events),
peak memory of forward+backward beyond the inputs, achieved TFLOP/s and its fraction of the bf16
matmul ceiling measured in the same run (one large torch.matmul). FLOPs are the algorithmic count,
the same for every implementation, so TFLOP/s compares speed only:
    bank_attention    fwd 4NKd (x D^T, P D)        bwd 8NKd (dP, dx, and both roles of dD)
    contrastive_loss  fwd 2N^2 d                   bwd 4N^2 d
On a machine without a GPU it compares eager and torch.compile on the CPU at small sizes (fp32),
labelled as such; the Triton rows need a GPU (the interpreter times Python, not the kernel).
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


def _flops(op: str, N: int, K: int, d: int) -> tuple[float, float]:
    """(forward, backward) algorithmic FLOPs."""
    unit = 2.0 * N * K * d if op == "bank_attention" else 2.0 * N * N * d
    return (2 * unit, 4 * unit) if op == "bank_attention" else (unit, 2 * unit)


def _timer(device: torch.device):
    """-> time(fn, repeats, setup) returning the median milliseconds of fn(), setup() untimed."""
    def run(fn, repeats, setup=None):
        times = []
        for _ in range(repeats):
            if setup is not None:
                setup()
            if device.type == "cuda":
                torch.cuda.synchronize()
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


def _sdpa(device: torch.device):
    """Bank attention as SDPA (q = x, k = v = D) on the first backend that runs fwd+bwd at d = 768."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    order = [SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
             SDPBackend.MATH]
    for backend in order:
        def fn(x, D, scale=1.0, backend=backend):
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(x[None, None], D[None, None], D[None, None],
                                                      scale=scale)[0, 0]  # (N, d)
        try:
            dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
            x = torch.randn(64, 768, device=device, dtype=dtype, requires_grad=True)
            D = torch.randn(128, 768, device=device, dtype=dtype, requires_grad=True)
            fn(x, D).sum().backward()
            return fn, backend.name.lower()
        except RuntimeError:
            continue
    return None, "none"


def _implementations(op: str, device: torch.device) -> list[tuple[str, object]]:
    ref = bank_attention_reference if op == "bank_attention" else contrastive_loss_reference
    impls = [("eager", ref), ("torch.compile", torch.compile(ref))]
    if op == "bank_attention":
        sdpa, backend = _sdpa(device)
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


def measure(op, fn, N, K, d, device, dtype, repeats) -> dict:
    """fwd / bwd / fwd+bwd median ms and peak MiB of one implementation at one size."""
    leaves, extra, dy = _inputs(op, N, K, d, device, dtype)
    timer = _timer(device)

    def zero():
        for t in leaves:
            t.grad = None

    def fwd_bwd():
        zero()
        y = fn(*leaves, *extra)
        y.backward(dy)

    def forward():  # untimed set-up of the backward timing (compiled graphs free their buffers)
        zero()
        state["y"] = fn(*leaves, *extra)

    state = {}
    for _ in range(3):  # warm-up: compilation, allocator
        fwd_bwd()
    row = dict(fwd_ms=timer(lambda: fn(*leaves, *extra), repeats),
               bwd_ms=timer(lambda: state["y"].backward(dy), repeats, setup=forward),
               fwdbwd_ms=timer(fwd_bwd, repeats), peak_mib=float("nan"))
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


def run(ops, device, repeats) -> tuple[list[dict], dict]:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    ceiling = matmul_ceiling(device, dtype)
    sizes = GPU_SIZES if device.type == "cuda" else CPU_SIZES
    rows = []
    for op in ops:
        impls = _implementations(op, device)
        for N, K, d in sizes[op]:
            fwd_flops, bwd_flops = _flops(op, N, K, d)
            for name, fn in impls:
                try:
                    r = measure(op, fn, N, K, d, device, dtype, repeats)
                except Exception as e:  # one failing implementation must not hide the others
                    r = dict(fwd_ms=float("nan"), bwd_ms=float("nan"), fwdbwd_ms=float("nan"),
                             peak_mib=float("nan"), error=f"{type(e).__name__}: {str(e)[:120]}")
                tflops = (fwd_flops + bwd_flops) / (r["fwdbwd_ms"] * 1e-3) / 1e12
                rows.append(dict(op=op, impl=name, N=N, K=K or "", d=d, dtype=str(dtype).split(".")[1],
                                 **r, tflops=tflops, frac_ceiling=tflops / ceiling))
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows, dict(ceiling_tflops=ceiling, dtype=str(dtype).split(".")[1])


def _environment(device: torch.device) -> dict:
    import triton
    gpu = device.type == "cuda"
    name = torch.cuda.get_device_name(device) if gpu else f"CPU ({torch.get_num_threads()} threads)"
    return dict(device=name, torch=torch.__version__, triton=triton.__version__,
                date=datetime.datetime.now().isoformat(timespec="seconds"))


def print_table(rows, info, env):
    print(f"\n{env['device']} | torch {env['torch']} | triton {env['triton']} | {env['date']}")
    print(f"measured {info['dtype']} matmul ceiling: {info['ceiling_tflops']:.3g} TFLOP/s\n")
    print("| op | impl | N | K | d | fwd ms | bwd ms | fwd+bwd ms | peak MiB | TFLOP/s | of ceiling "
          "| speed vs eager | memory vs eager |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    eager = {(r["op"], r["N"]): r for r in rows if r["impl"] == "eager"}
    for r in rows:
        e = eager.get((r["op"], r["N"]), dict(fwdbwd_ms=float("nan"), peak_mib=float("nan")))
        print(f"| {r['op']} | {r['impl']} | {r['N']} | {r['K']} | {r['d']} | {r['fwd_ms']:.3f} | "
              f"{r['bwd_ms']:.3f} | {r['fwdbwd_ms']:.3f} | {r['peak_mib']:.0f} | {r['tflops']:.3g} | "
              f"{100 * r['frac_ceiling']:.1f}% | {e['fwdbwd_ms'] / r['fwdbwd_ms']:.2f}x | "
              f"{r['peak_mib'] / e['peak_mib']:.2f} |" + (f" {r['error']}" if "error" in r else ""))


def write_csv(path: Path, rows, info, env):
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = ["op", "impl", "N", "K", "d", "dtype", "fwd_ms", "bwd_ms", "fwdbwd_ms", "peak_mib", "tflops",
              "frac_ceiling", "ceiling_tflops", "device", "torch", "triton", "date", "error"]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in rows:
            w.writerow({**r, "ceiling_tflops": info["ceiling_tflops"], **env})


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--op", choices=["bank_attention", "contrastive_loss", "all"], default="all")
    p.add_argument("--csv", default="out/kernel_bench.csv", help="where the CSV goes")
    p.add_argument("--repeats", type=int, default=20, help="timed repeats per measurement (median)")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ops = ["bank_attention", "contrastive_loss"] if args.op == "all" else [args.op]
    if device.type == "cpu":
        print("No GPU: timing eager and torch.compile on the CPU at small sizes (fp32). "
              "The Triton kernels need a GPU to be timed.")
    rows, info = run(ops, device, args.repeats if device.type == "cuda" else min(args.repeats, 5))
    env = _environment(device)
    print_table(rows, info, env)
    write_csv(Path(args.csv), rows, info, env)
    print(f"\nwrote {args.csv}")


if __name__ == "__main__":
    sys.exit(main())
