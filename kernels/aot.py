"""sm_90 (H100) compile report of every kernel variant the launchers may run, without a GPU.

    python -m kernels.aot --json benchmarks/kernels_aot_after.json --md benchmarks/kernels_aot_after.md \
        --before benchmarks/kernels_aot_before.json
    python -m kernels.aot --dtypes bf16,fp32 --shape bank_attention:64,2048,512   # another shape as well

What it does, per dtype (bf16, fp16, fp32; --dtypes picks a subset) and shape (SHAPES: the benchmark's
sizes and the default run's, plus any --shape):
1. Drives the public ops forward + backward on "meta" tensors (shapes only, no data), with every
   @triton.jit kernel of the op's module swapped for a recorder, so the launchers pick their grids,
   splits, chunks and tile sizes exactly as they would on an H100 (132 SMs). Where a launcher chooses
   among candidate configurations (kernels/tuning.py), the default's launch is recorded for the cost
   model and every other candidate's launch for compiling. What the launchers do with torch in
   between (GEMMs, copies, casts) is seen by a TorchDispatchMode.
2. Compiles each distinct recorded variant (kernel, signature, constexprs, warps, stages) with
   triton.compile(..., target=GPUTarget("cuda", 90, 32)) through TTIR -> TTGIR -> LLIR -> PTX -> cubin,
   and reads registers and spill bytes (stores + loads) from the log of the ptxas that ships inside
   the Triton wheel; shared memory from the compiled metadata.
3. Models each default launch from its recorded grid, sizes and constexprs (the functions in COST
   below, written against the loop structure of each kernel): executed FLOPs (tensor-core products
   including tile padding), L2 -> SM bytes (every tile load of every program; a tile used by two
   products but loaded once counts once) and HBM bytes (each distinct tensor read or written once,
   i.e. a perfect L2; fp32 partials and chunk buffers included). torch matmuls are modelled as cuBLAS
   GEMMs with 128 x 256 output tiles (each tile reads its rows and columns of both operands once); any
   other torch op that moves data counts its operands and result once, in both L2 and HBM.
Required FLOPs are the algorithmic count: bank attention 12 N K d (forward 2 GEMMs, backward 4),
contrastive loss 6 N^2 d (forward 1, backward 2). The targets (every variant compiles, 0 spill bytes
in every variant, 16-bit and fp32, shared memory <= 227 KB, FLOP ratios, L2 traffic >= 3x below the
--before report) are printed as met / NOT MET; the exit status is 1 unless all are met. A first run
compiles for a few minutes on 2 CPU cores; Triton's cache makes a rerun quicker (registers then come
from running ptxas on the cached PTX). Importing this module turns the Triton interpreter off.
"""
import argparse
import contextlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # compiling needs the real JIT, not the interpreter

import torch
import triton
from torch.utils._python_dispatch import TorchDispatchMode

from kernels import bank_attention, similarity, tuning

# (op, N, K or C, d): the benchmark's sizes (kernels/bench.py), and the default run's, the tiny preset
# of model.py (batch 32, K = 256, d = 192; scoring an odd last batch against 18 prompts in fp32; and
# 16384 rows, enough for the single pass at that width). tests/test_kernels_aot.py adds every preset
# of model.PRESETS with --shape.
SHAPES = [("bank_attention", 64, 2048, 768), ("bank_attention", 4096, 2048, 768), ("bank_attention", 65536, 2048, 768),
          ("contrastive_loss", 64, 0, 768), ("contrastive_loss", 32768, 0, 768), ("cosine_scores", 37, 18, 768),
          ("bank_attention", 32, 256, 192), ("bank_attention", 37, 256, 192), ("bank_attention", 16384, 256, 192),
          ("contrastive_loss", 32, 0, 192), ("cosine_scores", 37, 18, 192)]
MODULES = dict(bank_attention=bank_attention, contrastive_loss=similarity, cosine_scores=similarity)
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
TL_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64"}
SHARED_LIMIT = 227 * 1024  # H100 opt-in shared memory per block
GEMM_TILE = (128, 256)  # output tile assumed for cuBLAS in the L2 model


# ----------------------------------------------------------------------------- recording launches

class _Recorder:
    """Stands in for a kernel: `kernel[grid](*args, **meta)` is recorded into logs[0] instead of
    launched (logs[0] is the default launches' log, or the candidates' while they are recorded)."""

    def __init__(self, kernel, logs):
        self.kernel, self.logs = kernel, logs

    def __getitem__(self, grid):
        return lambda *args, **meta: self.logs[0].append((self.kernel, grid, args, meta))


class _TorchOps(TorchDispatchMode):
    """Counts what the launchers do with torch between kernels: every matmul (modelled as a cuBLAS
    GEMM with GEMM_TILE output tiles) and every other op that moves data (views and allocations move
    none): FLOPs, L2 -> SM bytes, HBM bytes (operands and result once) and kernel launches."""
    FREE = ("view", "t", "slice", "select", "as_strided", "unsqueeze", "squeeze", "expand", "alias",
            "detach", "empty", "empty_like", "empty_strided", "_unsafe_view", "transpose", "permute", "lift_fresh")

    def __init__(self):
        super().__init__()
        self.flops = self.l2 = self.hbm = 0.0
        self.launches = 0
        self.counting = True  # off while the candidates other than the default are recorded

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if name in self.FREE or not self.counting:
            return out
        tensors = [t for t in list(args) + list((kwargs or {}).values()) if isinstance(t, torch.Tensor)]
        results = out if isinstance(out, (tuple, list)) else [out]
        moved = sum(t.numel() * t.element_size() for t in tensors + [r for r in results if isinstance(r, torch.Tensor)])
        self.launches += 1
        self.hbm += moved
        if name in ("mm", "addmm"):
            a, b = args[-2:] if name == "mm" else args[1:3]
            (M, K), Nn = a.shape, b.shape[1]
            tiles = _cdiv(M, GEMM_TILE[0]) * _cdiv(Nn, GEMM_TILE[1])
            self.flops += 2 * M * K * Nn
            self.l2 += tiles * sum(GEMM_TILE) * K * a.element_size()
        else:
            self.l2 += moved
        return out


def _launches(module, op, N, K, d, dtype):
    """Run op forward + backward on meta tensors -> (recorded default launches, launches of the other
    candidates, torch-op accounting of the default path)."""
    logs, extra, saved = [[]], [], {}
    for name, obj in vars(module).items():
        if name.endswith("_kernel") and isinstance(obj, (triton.runtime.JITFunction, triton.runtime.Autotuner)):
            saved[name] = obj
            setattr(module, name, _Recorder(obj, logs))

    def every_candidate(kernel, configs, launch):  # tuning.choose's hook: record the others too
        logs.insert(0, extra)
        ops.counting = False
        try:
            for cfg in configs[1:]:
                launch(cfg)
        finally:
            logs.pop(0)
            ops.counting = True
    tuning.RECORD = every_candidate
    try:
        with _TorchOps() as ops:
            if op == "bank_attention":
                x = torch.empty(N, d, device="meta", dtype=dtype, requires_grad=True)
                D = torch.empty(K, d, device="meta", dtype=dtype, requires_grad=True)
                out = module.bank_attention(x, D, d ** -0.5)
                torch.autograd.grad(out, (x, D), torch.empty(N, d, device="meta", dtype=dtype))
            elif op == "contrastive_loss":
                a, b = (torch.empty(N, d, device="meta", dtype=dtype, requires_grad=True) for _ in range(2))
                torch.autograd.grad(module.contrastive_loss(a, b, 0.1), (a, b))
            else:
                module.cosine_scores(torch.empty(N, d, device="meta", dtype=dtype),
                                     torch.empty(K, d, device="meta", dtype=dtype))
    finally:
        tuning.RECORD = None
        for name, obj in saved.items():
            setattr(module, name, obj)
    return logs[0], extra, ops


def _values(kernel, args, meta) -> dict:
    fn = kernel.fn if isinstance(kernel, triton.runtime.Autotuner) else kernel
    names = [p.name for p in fn.params]
    return dict(zip(names, args), **{k: v for k, v in meta.items() if k in names})


def _variants(kernel, args, meta):
    """One (fn, signature, constexprs, attrs, options) per configuration the launch may run."""
    if isinstance(kernel, triton.runtime.Autotuner):  # every config the tuner may pick
        for cfg in kernel.configs:
            yield _signature(kernel.fn, args, {**meta, **cfg.kwargs, "num_warps": cfg.num_warps,
                                               "num_stages": cfg.num_stages})
    else:
        yield _signature(kernel, args, meta)


def _signature(fn, args, meta):
    """Launch arguments -> what ASTSource needs, mirroring the JIT's specialisation: tensors are
    16-byte aligned (torch allocations are) and ints divisible by 16 are marked so."""
    sig, constexprs, attrs = {}, {}, {}
    values = _values(fn, args, meta)
    for i, p in enumerate(fn.params):
        v = values[p.name]
        if p.is_constexpr:
            sig[p.name], constexprs[p.name] = "constexpr", v
        elif isinstance(v, torch.Tensor):
            sig[p.name] = "*" + TL_NAMES[v.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            sig[p.name] = {bool: "i1", int: "i32" if abs(v) < 2 ** 31 else "i64", float: "fp32"}[type(v)]
            if type(v) is int and v % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    options = {k: meta[k] for k in ("num_warps", "num_stages") if k in meta}
    return fn, sig, constexprs, attrs, options


# ----------------------------------------------------------------------------- compiling

def _ptxas_report(text: str) -> tuple[int, int]:
    """(registers, spill bytes = stores + loads) from a `ptxas -v` log."""
    regs = max(map(int, re.findall(r"Used (\d+) registers", text)), default=-1)
    spills = sum(map(int, re.findall(r"(\d+) bytes spill (?:stores|loads)", text)))
    return regs, spills


def _compile(job) -> dict:
    """Compile one variant for sm_90 in a worker process -> shared bytes, registers, spill bytes."""
    from triton.backends.compiler import GPUTarget

    module, name, sig, constexprs, attrs, options = job
    fn = getattr(sys.modules.get(f"kernels.{module}") or __import__(f"kernels.{module}", fromlist=[name]), name)
    fn = fn.fn if isinstance(fn, triton.runtime.Autotuner) else fn
    src = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs)
    log = io.StringIO()
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
    try:
        with contextlib.redirect_stdout(log):
            k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
    except Exception as e:  # a failure is reported, not hidden behind the first one
        return dict(ok=False, error=f"{type(e).__name__}: {str(e)[-1500:]}")
    regs, spills = _ptxas_report(log.getvalue())
    if regs < 0:  # served from Triton's cache: ptxas did not run, so run it on the cached PTX
        with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
            f.write(k.asm["ptx"])
            f.flush()
            ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
            out = subprocess.run([str(ptxas), "-v", "--gpu-name=sm_90a", f.name, "-o", os.devnull],
                                 capture_output=True, text=True)
        regs, spills = _ptxas_report(out.stderr + out.stdout)
    return dict(ok=True, shared=k.metadata.shared, regs=regs, spills=spills)


# ----------------------------------------------------------------------------- cost models

def _cdiv(a, b):
    return -(-a // b)


def _split_tiles(n_tiles, per, n_split):
    """Tiles walked by each of n_split programs that take `per` consecutive tiles each."""
    return [max(0, min(n_tiles, (s + 1) * per) - s * per) for s in range(n_split)]


def _bank_fwd(v, grid, e):
    """The single pass (no split) or one slice of the bank per program (_fwd_split_kernel)."""
    BM, BN, dp = v["BLOCK_M"], v["BLOCK_N"], v["BLOCK_D"] * v["NC"]  # dp: d padded to whole chunks
    N, K, d = v["N"], v["K"], v["d"]
    rb, splits = grid[:2]
    per = v.get("tiles_per_split", _cdiv(K, BN))
    walks = sum(_split_tiles(_cdiv(K, BN), per, splits)) * rb  # (row block, bank tile)
    flops = walks * 2 * BM * BN * 2 * dp  # S = x D^T and P D
    l2 = rb * splits * BM * dp * e + walks * BN * dp * e  # x once per program, each D tile once
    out_e = e if splits == 1 else 4
    hbm = (N + K) * d * e + splits * (N * d * out_e + 2 * N * 4)
    return flops, l2 + splits * N * d * out_e, hbm


def _bank_combine(v, grid, e):
    n = v["n_split"] * v["N"] * (v["d"] + 2) * 4 + v["N"] * (v["d"] * e + 8)
    return 0, n, n


def _bank_bwd(v, grid, e):
    BM, BN, dp = v["BLOCK_M"], v["BLOCK_N"], v["BLOCK_D"] * v["NC"]
    K, d, n = v["K"], v["d"], v["n_rows"]
    rb, splits = grid[:2]
    walks = sum(_split_tiles(_cdiv(K, BN), v["tiles_per_split"], splits)) * rb
    flops = rb * splits * 2 * BM * BM * dp + walks * 2 * BM * BN * 2 * dp  # delta as a diagonal; S and dP
    l2 = rb * splits * 4 * BM * dp * e + walks * BN * dp * e  # x, dO held; dO, x_hat for delta; D
    w = 2 * n * K * e  # P and s dS written
    return flops, l2 + w, (3 * n + K) * d * e + w


def _sim_norm(v, grid, e):
    return 0, v["N"] * v["d"] * e, v["N"] * v["d"] * e


def _sim_scale(v, grid, e):
    n = v["N"] * v["d"] * (e + v["OUT"].element_size())
    return 0, n, n


def _sim_unit_grad(v, grid, e):
    row = v["N"] * v["d"] * (e + v["DXH"].element_size())  # x and dL/dx^, read in each of two passes
    return 0, 2 * row + v["N"] * v["d"] * e, row + v["N"] * v["d"] * e


def _sim_lse(v, grid, e):
    BM, BN, dp, N, d = v["BLOCK_M"], v["BLOCK_N"], v["BLOCK_D"] * v["NC"], v["N"], v["d"]
    walks = grid[0] * _cdiv(N, BN)
    stats = grid[0] * N * 4
    return walks * 2 * BM * BN * dp, grid[0] * BM * dp * e + walks * BN * dp * e + stats, 2 * N * d * e + stats


def _sim_col_lse(v, grid, e):
    n = v["n_blocks"] * v["N"] * 4
    return 0, n, n


def _sim_h(v, grid, e):
    BM, BN, dp, N, d, n = v["BLOCK_M"], v["BLOCK_N"], v["BLOCK_D"] * v["NC"], v["N"], v["d"], v["n_rows"]
    walks = grid[0] * _cdiv(N, BN)  # the column splits share the column tiles
    h = n * N * e  # H written
    return walks * 2 * BM * BN * dp, grid[0] * grid[1] * BM * dp * e + walks * BN * dp * e + h, (n + N) * d * e + h


def _sim_cosine(v, grid, e):
    N, C, d, BM, BN = v["N"], v["C"], v["d"], v["BLOCK_M"], v["BLOCK_N"]
    dp = _cdiv(d, v["BLOCK_D"]) * v["BLOCK_D"]
    programs, out = grid[0] * grid[1], N * C * e
    return programs * 2 * BM * BN * dp, programs * (BM + BN) * dp * e + out, (N + C) * d * e + out


COST = {  # kernel name -> (values, grid, itemsize) -> (executed FLOPs, L2 -> SM bytes, HBM bytes)
    "_fwd_kernel": _bank_fwd, "_fwd_split_kernel": _bank_fwd, "_combine_kernel": _bank_combine,
    "_bwd_kernel": _bank_bwd, "_cosine_kernel": _sim_cosine,
    "_norm_kernel": _sim_norm, "_scale_kernel": _sim_scale, "_unit_grad_kernel": _sim_unit_grad,
    "_lse_kernel": _sim_lse, "_col_lse_kernel": _sim_col_lse, "_h_kernel": _sim_h,
}


# ----------------------------------------------------------------------------- report

def _grid(grid, values):
    grid = tuple(grid(values) if callable(grid) else grid)
    return grid + (1,) * (3 - len(grid))


def _config_label(constexprs, options) -> str:
    sizes = [f"{k}={v}" for k, v in constexprs.items() if k.isupper() and k not in ("UPCAST", "ACC")]
    return " ".join(sizes + [f"{k}={v}" for k, v in options.items()])


def _add_jobs(jobs, module, log, dtype, shape, role):
    """Each distinct variant of the recorded launches -> jobs (shared by every shape that uses it)."""
    name = module.__name__.split(".")[-1]
    for kernel, grid, args, meta in log:
        for fn, sig, constexprs, attrs, options in _variants(kernel, args, meta):
            key = (name, fn.__name__, json.dumps(sig), repr(sorted(constexprs.items())), repr(sorted(options.items())))
            job = jobs.setdefault(key, dict(kernel=f"{name}.{fn.__name__}", dtype=TL_NAMES[dtype], shapes=set(),
                                            roles=set(), config=_config_label(constexprs, options),
                                            job=(name, fn.__name__, sig, constexprs, attrs, options)))
            job["shapes"].add(shape)
            job["roles"].add(role)


def _model_op(op, N, K, d, dtype, jobs) -> dict:
    """Record one op at one shape and dtype: its modelled costs; its kernel variants go into jobs."""
    module, e = MODULES[op], torch.empty(0, dtype=dtype).element_size()
    log, extra, torch_ops = _launches(module, op, N, K, d, dtype)
    flops, l2, hbm = torch_ops.flops, torch_ops.l2, torch_ops.hbm
    for kernel, grid, args, meta in log:
        v = _values(kernel, args, meta)
        fn = kernel.fn if isinstance(kernel, triton.runtime.Autotuner) else kernel
        if isinstance(kernel, triton.runtime.Autotuner):  # model the first config
            v = {**v, **kernel.configs[0].kwargs}
        f, b, h = COST[fn.__name__](v, _grid(grid, v), e)
        flops, l2, hbm = flops + f, l2 + b, hbm + h
    shape = f"{op}:N={N}" + (f",{'C' if op == 'cosine_scores' else 'K'}={K}" if K else "") + f",d={d}"
    _add_jobs(jobs, module, log, dtype, shape, "default")
    _add_jobs(jobs, module, extra, dtype, shape, "candidate")
    required = {"bank_attention": 12 * N * K * d, "contrastive_loss": 6 * N * N * d, "cosine_scores": 2 * N * K * d}[op]
    return dict(op=op, dtype=TL_NAMES[dtype], shape=dict(N=N, K=K, d=d) if K else dict(N=N, d=d),
                triton_launches=len(log), torch_launches=torch_ops.launches, executed_flops=flops,
                required_flops=required, flops_ratio=flops / required, hbm_bytes=hbm, l2_bytes=l2,
                torch_matmul_flops=torch_ops.flops)


def collect(jobs_n: int, dtypes=DTYPES, shapes=SHAPES) -> tuple[list[dict], list[dict]]:
    """-> (per-variant compile rows, per-op model rows)."""
    jobs, ops = {}, []
    for op, N, K, d in shapes:
        for dtype in dtypes:
            ops.append(_model_op(op, N, K, d, dtype, jobs))
    with ProcessPoolExecutor(max_workers=jobs_n) as pool:
        results = list(pool.map(_compile, [j["job"] for j in jobs.values()]))
    rows = []
    for j, r in zip(jobs.values(), results):
        role = "default" if "default" in j["roles"] else "candidate"
        rows.append(dict(kernel=j["kernel"], dtype=j["dtype"], role=role,
                         shape=sorted(j["shapes"]), config=j["config"],
                         **({"shared": r["shared"], "regs": r["regs"], "spills": r["spills"]} if r["ok"]
                            else {"error": r["error"]})))
    return sorted(rows, key=lambda r: (r["kernel"], r["dtype"], r["role"] != "default", r["config"])), ops


def markdown(rows, ops) -> str:
    out = ["| kernel | dtype | role | shapes | config | shared B | regs | spill B |",
           "|---|---|---|---|---|---:|---:|---:|"]
    for r in rows:
        cells = ["FAILED", "", ""] if "error" in r else [r["shared"], r["regs"], r["spills"]]
        out.append(f"| {r['kernel']} | {r['dtype']} | {r['role']} | {' '.join(r['shape'])} | {r['config']} | "
                   + " | ".join(map(str, cells)) + " |")
    out += ["", "| op | dtype | shape | launches (Triton + torch) | executed TFLOP | required TFLOP | ratio "
            "| HBM GB | L2->SM GB |", "|---|---|---|---|---:|---:|---:|---:|---:|"]
    for o in ops:
        shape = ",".join(f"{k}={v}" for k, v in o["shape"].items())
        out.append(f"| {o['op']} | {o['dtype']} | {shape} | {o['triton_launches']} + {o['torch_launches']} | "
                   f"{o['executed_flops'] / 1e12:.4f} | {o['required_flops'] / 1e12:.4f} | {o['flops_ratio']:.2f} | "
                   f"{o['hbm_bytes'] / 1e9:.3f} | {o['l2_bytes'] / 1e9:.3f} |")
    return "\n".join(out)


def targets(rows, ops, before=None) -> list[tuple[str, bool]]:
    """The CPU-side targets of the kernels -> [(description, met)]."""
    out = [("every variant compiles for sm_90 (%d variants, %d of them non-default candidates)"
            % (len(rows), sum(r["role"] == "candidate" for r in rows)), all("error" not in r for r in rows))]
    for kind, dtypes in (("bf16/fp16", ("bf16", "fp16")), ("fp32", ("fp32",))):
        some = [r for r in rows if r["dtype"] in dtypes]
        if some:
            out.append((f"0 spill bytes in every {kind} variant, candidates included (max %d)"
                        % max(r.get("spills", 0) for r in some), all(r.get("spills", 1) == 0 for r in some)))
    out.append(("shared memory <= 227 KB per block (max %d B)" % max(r.get("shared", 0) for r in rows),
                all(r.get("shared", SHARED_LIMIT + 1) <= SHARED_LIMIT for r in rows)))
    for op, N, limit in (("bank_attention", 65536, 1.25), ("contrastive_loss", 32768, 1.4)):
        for o in (o for o in ops if o["op"] == op and o["shape"]["N"] == N and o["dtype"] != "fp32"):
            out.append((f"{op} {o['dtype']} N={N}: executed / required FLOPs {o['flops_ratio']:.2f} <= {limit}",
                        o["flops_ratio"] <= limit))
            old = next((b for b in before or [] if (b["op"], b["dtype"], b["shape"]) == (op, o["dtype"], o["shape"])),
                       None)
            if old:
                gain = old["l2_bytes"] / o["l2_bytes"]
                out.append((f"{op} {o['dtype']} N={N}: modelled L2 -> SM bytes {gain:.2f}x below before "
                            f"({old['l2_bytes'] / 1e9:.1f} -> {o['l2_bytes'] / 1e9:.1f} GB), target >= 3x", gain >= 3))
    return out


def _shape(text: str) -> tuple:
    """'op:N,K,d' (K = 0 for the contrastive loss; C prompts for cosine_scores) -> (op, N, K, d)."""
    op, sizes = text.split(":")
    if op not in MODULES:
        raise argparse.ArgumentTypeError(f"unknown op {op!r} (one of {', '.join(MODULES)})")
    return (op, *map(int, sizes.split(",")))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", default="sm_90", choices=["sm_90"], help="target (the H100 is the one modelled)")
    p.add_argument("--json", help="write the report here")
    p.add_argument("--md", help="write the Markdown tables here")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 2, help="parallel compiles")
    p.add_argument("--dtypes", default="bf16,fp16,fp32", help="comma-separated subset of bf16,fp16,fp32")
    p.add_argument("--before", help="an earlier --json report: the L2 traffic target is relative to it")
    p.add_argument("--shape", type=_shape, action="append", default=[],
                   help="also op:N,K,d (op: bank_attention, contrastive_loss with K = 0, cosine_scores with K = C)")
    p.add_argument("--only", action="store_true", help="only the --shape ones, not SHAPES")
    args = p.parse_args(argv)
    dtypes = [d for d in DTYPES if TL_NAMES[d] in args.dtypes.split(",")]
    shapes = ([] if args.only else SHAPES) + [s for s in args.shape if s not in SHAPES]
    rows, ops = collect(args.jobs, dtypes, shapes)
    before = json.loads(Path(args.before).read_text())["ops"] if args.before else None
    checks = targets(rows, ops, before)
    table = markdown(rows, ops) + "\n\n" + "\n".join(f"- {'met' if ok else 'NOT MET'}: {what}" for what, ok in checks)
    print(table)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(dict(arch=args.arch, triton=triton.__version__, kernels=rows, ops=ops,
                                                   targets=[dict(target=w, met=ok) for w, ok in checks]),
                                              indent=1) + "\n")
    if args.md:
        Path(args.md).write_text(f"sm_90 compile report, triton {triton.__version__}: `python -m kernels.aot "
                                 f"{' '.join(argv if argv is not None else sys.argv[1:])}`\n\n{table}\n")
    return 0 if all(ok for _, ok in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
