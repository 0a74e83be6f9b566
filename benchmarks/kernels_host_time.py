"""Host (CPU) time of the kernel launchers against eager PyTorch, with no GPU and no launch.

    python benchmarks/kernels_host_time.py                      # table on stdout
    python benchmarks/kernels_host_time.py --md benchmarks/kernels_host_time.md

At the paper's batch (N = 64) a fused op is launch-bound: the GPU work takes microseconds, so the
time Python spends choosing grids, allocating and launching decides the speed. This measures that
part alone, for forward + backward of each op at N = 64 (bank attention K = 2048, d = 768; the
contrastive loss d = 768), on "meta" tensors (shapes without data, so no arithmetic runs) with every
@triton.jit kernel of the op's module replaced by a stub that returns at once: what remains is the
launcher's Python and the torch calls it makes (allocations, views, the GEMMs of the backward). The
eager reference runs the same way (its torch calls on meta tensors, autograd included), so the ratio
compares like with like in one run. Meta kernels are not always cheap (cross_entropy's is a Python
decomposition, and every torch call of the launchers pays for shape checks written in Python), so
both are also timed on CPU tensors of 2 x 2, whose arithmetic is negligible: the dispatch cost of a
real backend (the launchers then plan for 2 x 2, which costs them no more than 64 x 2048).
Not included: Triton's own per-launch work (argument binding, cache lookup, the driver call), which
python -m kernels.bench's host column measures on a GPU. bf16 inputs; median and 10-90% spread of
--repeats calls after 20 warm-ups, one thread.
"""
import argparse
import datetime
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import triton  # noqa: E402

from kernels import bank_attention, similarity  # noqa: E402


class _Stub:
    """`kernel[grid](*args, **meta)` that launches nothing."""

    def __getitem__(self, grid):
        return lambda *args, **meta: None


def _stub_kernels(module) -> int:
    kernels = [n for n, obj in vars(module).items()
               if n.endswith("_kernel") and isinstance(obj, triton.runtime.JITFunction)]
    for n in kernels:
        setattr(module, n, _Stub())
    return len(kernels)


def _timed(fn, repeats: int) -> tuple[float, float, float]:
    """(median, 10th, 90th percentile) microseconds of fn()."""
    for _ in range(20):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e6)
    q = statistics.quantiles(times, n=10)
    return statistics.median(times), q[0], q[-1]


def _fwd_bwd(op, *shapes, extra=(), device="meta"):
    make = (lambda s: torch.empty(s, device="meta")) if device == "meta" else torch.randn
    leaves = [make(s).to(torch.bfloat16).requires_grad_() for s in shapes]

    def run():
        y = op(*leaves, *extra)
        torch.autograd.grad(y, leaves, torch.empty_like(y) if y.dim() else None)
    return run


def measure(repeats: int) -> list[dict]:
    N, K, d = 64, 2048, 768
    cases = [("bank_attention", bank_attention.bank_attention_reference, bank_attention.bank_attention,
              ((N, d), (K, d)), (d ** -0.5,)),
             ("contrastive_loss", similarity.contrastive_loss_reference, similarity.contrastive_loss,
              ((N, d), (N, d)), (0.1,))]
    stubbed = {m.__name__: _stub_kernels(m) for m in (bank_attention, similarity)}
    rows = []
    for name, eager, fused, shapes, extra in cases:
        e = _timed(_fwd_bwd(eager, *shapes, extra=extra), repeats)
        e_cpu = _timed(_fwd_bwd(eager, (2, 2), (2, 2), extra=extra, device="cpu"), repeats)
        f = _timed(_fwd_bwd(fused, *shapes, extra=extra), repeats)
        f_cpu = _timed(_fwd_bwd(fused, (2, 2), (2, 2), extra=extra, device="cpu"), repeats)
        rows.append(dict(op=name, shape=f"N={N}" + (f",K={K}" if name == "bank_attention" else "") + f",d={d}",
                         eager_us=e, eager_cpu_us=e_cpu, launcher_us=f, launcher_cpu_us=f_cpu, ratio=f[0] / e[0],
                         ratio_cpu=f_cpu[0] / e_cpu[0],
                         stubbed=stubbed[f"kernels.{'bank_attention' if name == 'bank_attention' else 'similarity'}"]))
    return rows


def markdown(rows) -> str:
    cpu = platform.processor() or platform.machine()
    lines = [f"Host time of forward + backward, launches stubbed, meta tensors, bf16: {cpu}, "
             f"{torch.get_num_threads()} thread, torch {torch.__version__}, triton {triton.__version__}, "
             f"{datetime.datetime.now().isoformat(timespec='seconds')}", "",
             "| op | shape | launcher µs, meta (10-90%) | eager µs, meta | launcher / eager | "
             "launcher µs, CPU 2 x 2 | eager µs, CPU 2 x 2 | launcher / eager |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    span = lambda t: f"{t[0]:.0f} ({t[1]:.0f}-{t[2]:.0f})"  # noqa: E731
    for r in rows:
        lines.append(f"| {r['op']} | {r['shape']} | {span(r['launcher_us'])} | {span(r['eager_us'])} | "
                     f"{r['ratio']:.2f} | {span(r['launcher_cpu_us'])} | {span(r['eager_cpu_us'])} | "
                     f"{r['ratio_cpu']:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=300)
    p.add_argument("--md", help="also write the table here")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    table = markdown(measure(args.repeats))
    print(table)
    if args.md:
        Path(args.md).write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
