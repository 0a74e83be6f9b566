"""Ahead-of-time sm_90 (H100) compilation of every Triton kernel in kernels/, on a machine without a GPU.

The interpreter the other tests use never runs Triton's GPU compiler, so layout, shared-memory or
dot-shape errors would only show on a GPU. Here the launchers themselves are driven (on CPU tensors,
with each @triton.jit kernel swapped for a recorder) over every dtype and every launch configuration
pick_config can return, and each distinct (kernel, signature, constexprs, num_warps, num_stages) is
compiled with triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32)) through all stages:
TTIR -> TTGIR -> LLIR -> PTX -> cubin (ptxas ships inside the Triton wheel, so cubin works on CPU).

The compile runs in a subprocess without TRITON_INTERPRET (conftest sets it for this process, and a
kernel decorated under the interpreter cannot be compiled), one per dtype so that each stays short:

    python tests/test_kernels_aot.py [--dtype bfloat16] [--regs]   # --regs: registers, spill bytes

--regs reads the cubin with cuobjdump (shipped with Triton); that report sized NC_MAX in
kernels/bank_attention.py. A first run takes minutes of CPU (the 12-chunk kernels are large);
Triton's cache (~/.triton/cache) makes later runs take seconds.
"""
import json
import os
import re
import subprocess
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DTYPES = ("float16", "bfloat16", "float32")  # fp64 on a GPU runs the eager reference, no kernel
TL_NAMES = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32", "float64": "fp64"}


class _Recorder:
    """Stands in for a @triton.jit kernel: `kernel[grid](*args, **meta)` records instead of launching."""

    def __init__(self, fn, log):
        self.fn, self.log = fn, log

    def __getitem__(self, grid):
        return lambda *args, **meta: self.log.append((self.fn, args, meta))


def _record(module, drive):
    """Run drive() with every launched kernel of `module` recorded -> list of (fn, args, meta)."""
    import triton

    log, saved = [], {}
    for name, obj in vars(module).items():
        if isinstance(obj, triton.runtime.JITFunction) and name.endswith("_kernel"):
            saved[name] = obj
            setattr(module, name, _Recorder(obj, log))
    try:
        drive()
    finally:
        for name, obj in saved.items():
            setattr(module, name, obj)
    return log


def _signature(fn, args, meta):
    """(fn, launch args, launch meta) -> (signature, constexprs, attrs, options) for ASTSource.

    attrs mirror the JIT's specialisation (16-byte-aligned pointers, ints divisible by 16): without
    them the compiler can neither vectorise the loads nor pipeline them, and registers would differ.
    """
    import torch

    sig, constexprs, attrs = {}, {}, {}
    names = [p.name for p in fn.params]
    values = dict(zip(names, args), **{k: v for k, v in meta.items() if k in names})
    for i, p in enumerate(fn.params):
        v = values[p.name]
        if p.is_constexpr:
            sig[p.name], constexprs[p.name] = "constexpr", v
        elif isinstance(v, torch.Tensor):
            sig[p.name] = "*" + TL_NAMES[str(v.dtype).split(".")[1]]
            if v.data_ptr() % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            sig[p.name] = {bool: "i1", int: "i32", float: "fp32"}[type(v)]
            if type(v) is int and v % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    options = {k: meta[k] for k in ("num_warps", "num_stages") if k in meta}
    return sig, constexprs, attrs, options


def _bank_launches(dtype):
    import torch
    from kernels import bank_attention as ba

    # the largest d (d <= 1024) for each distinct set of configurations: aligned, as real widths are
    size = torch.empty(0, dtype=dtype).element_size()
    configs = {tuple(ba.pick_config(d, k, size) for k in ("fwd", "dx", "dD")): d for d in range(1, 1025)}

    def drive():
        for d in configs.values():
            for N, K in ((1, 2048), (200, 17)):  # bank split + combine; dD split over rows
                x = torch.zeros(N, d, dtype=dtype, requires_grad=True)
                D = torch.zeros(K, d, dtype=dtype, requires_grad=True)
                ba.bank_attention(x, D).sum().backward()
    return _record(ba, drive)


def _similarity_launches(dtype):
    import torch
    from kernels import similarity as sim

    configs = {sim.pick_config(d, torch.empty(0, dtype=dtype).element_size()): d for d in range(1, 1025)}

    def drive():
        for d in configs.values():
            for N in (1, 200):
                a = torch.zeros(N, d, dtype=dtype, requires_grad=True)
                b = torch.zeros(N, d, dtype=dtype, requires_grad=True)
                sim.contrastive_loss(a, b, 0.1).backward()
                sim.cosine_scores(a.detach(), b.detach()[:7])
    return _record(sim, drive)


def _compile_one(job):
    """Compile one kernel variant for sm_90; returns a result dict (runs in a worker process)."""
    import triton
    from triton.backends.compiler import GPUTarget

    module, fn_name, sig, constexprs, attrs, options, regs = job
    fn = getattr(__import__(f"kernels.{module}", fromlist=[fn_name]), fn_name)
    try:
        src = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs)
    except TypeError:  # Triton < 3.2 called the argument `constants`
        src = triton.compiler.ASTSource(fn=fn, signature=sig, constants=constexprs, attrs=attrs)
    label = f"{module}.{fn_name} {sig.get('X', sig.get('A', ''))} " \
        + " ".join(f"{k}={v}" for k, v in constexprs.items() if k not in ("UPCAST", "ACC")) \
        + " " + " ".join(f"{k}={v}" for k, v in options.items())
    try:
        kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
    except Exception as e:  # report every failure, not just the first
        return dict(label=label, ok=False, error=f"{type(e).__name__}: {str(e)[-2000:]}")
    return dict(label=label, ok=True, stages=sorted(kernel.asm), shared=kernel.metadata.shared,
                regs=_resource_usage(kernel.asm.get("cubin")) if regs else None)


def _resource_usage(cubin):
    """Registers / spill bytes of a cubin via cuobjdump (shipped with Triton); None if unavailable."""
    import tempfile

    import triton
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if cubin is None or not tool.exists():
        return None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([str(tool), "--dump-resource-usage", f.name], capture_output=True,
                             text=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", out)
    return dict(zip(("reg", "stack", "shared", "local"), map(int, m.groups()))) if m else None


def _jobs(dtypes, regs):
    import torch
    jobs, seen = [], set()
    for module, launches in (("bank_attention", _bank_launches), ("similarity", _similarity_launches)):
        for dtype in dtypes:
            for fn, args, meta in launches(getattr(torch, dtype)):
                sig, constexprs, attrs, options = _signature(fn, args, meta)
                # one variant per configuration; alignment variants of it compile the same code paths
                key = (module, fn.__name__, json.dumps(sig), repr(constexprs), repr(options))
                if key not in seen:
                    seen.add(key)
                    jobs.append((module, fn.__name__, sig, constexprs, attrs, options, regs))
    return jobs


def main(argv=()):
    os.environ.pop("TRITON_INTERPRET", None)
    sys.path.insert(0, str(ROOT))
    dtypes = [argv[argv.index("--dtype") + 1]] if "--dtype" in argv else DTYPES
    jobs = _jobs(dtypes, regs="--regs" in argv)
    with ProcessPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        results = list(pool.map(_compile_one, jobs))
    for r in results:
        if not r["ok"]:
            print(f"FAILED {r['label']}\n{r['error']}")
        elif "--regs" in argv:
            print(f"{r['label']:100s} shared={r['shared']} {r['regs']}")
    print(json.dumps(dict(compiled=sum(r["ok"] for r in results), failed=sum(not r["ok"] for r in results),
                          stages=results[0].get("stages") if results else None)))
    return 0 if all(r["ok"] for r in results) else 1


@pytest.mark.parametrize("dtype", DTYPES)
def test_every_kernel_compiles_for_sm90(dtype):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, __file__, "--dtype", dtype], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    assert proc.returncode == 0, f"sm_90 AOT compile failed:\n{proc.stdout[-6000:]}\n{proc.stderr[-3000:]}"
    counts = json.loads(summary)
    assert counts["compiled"] > 0 and counts["failed"] == 0, summary
    assert "cubin" in counts["stages"] or "ptx" in counts["stages"], summary


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
