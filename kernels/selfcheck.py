"""The command line of the ops' self-checks (no op of its own; not on the reading path).

    python -m kernels.bank_attention [--tol T] [--shape N,K,d ...] [--tf32]
    python -m kernels.similarity [--tol T] [--shape N,C,d ...] [--tf32]

Each op passes a function that computes its fused outputs and their float64 reference at one shape;
every shape is checked in fp32 and bf16, one printed line per case with the max error of each output
relative to the largest reference value, and the exit status is 1 when any error exceeds its
tolerance (`--tol 0` must therefore fail). On a GPU fp32 products are TF32, so fp32 is held there to
the op's TF32 tolerance; `--tf32` makes the CPU interpreter multiply as TF32 does and applies the
same tolerance, which is how that tolerance was sized.
"""
import argparse

import torch

from kernels.tiles import interpreter_emulates_tf32, interpreter_rounds_bf16


def main(name: str, case, shapes: list, outputs: tuple, tol: dict, tol_tf32: float, argv=None) -> int:
    """case(shape, dtype, device) -> (fused outputs, float64 outputs) -> exit status."""
    p = argparse.ArgumentParser(prog=f"python -m kernels.{name}",
                                description=f"Check the fused {name} against float64 (interpreter without a GPU).")
    p.add_argument("--tol", type=float, help="one tolerance for every case (default: per dtype, TF32 on a GPU)")
    p.add_argument("--shape", action="append", default=[],
                   help="check this shape (comma-separated sizes; repeatable) instead of the default ones")
    p.add_argument("--tf32", action="store_true", help="interpreter: fp32 products as a GPU's TF32, and its tolerance")
    args = p.parse_args(argv)
    interpreter_rounds_bf16()  # without a GPU, bf16 stores round as a GPU's do
    interpreter_emulates_tf32(args.tf32)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    ok = True
    for shape in [tuple(int(v) for v in s.split(",")) for s in args.shape] or shapes:
        for dtype in (torch.float32, torch.bfloat16):
            limit = tol_tf32 if dtype == torch.float32 and (dev == "cuda" or args.tf32) else tol[dtype]
            limit = limit if args.tol is None else args.tol
            torch.manual_seed(0)
            got, want = case(shape, dtype, dev)
            errs = [((g.double() - w).abs().max() / w.abs().max().clamp_min(1e-30)).item()
                    for g, w in zip(got, want)]
            ok &= max(errs) <= limit
            verdict = "ok" if max(errs) <= limit else "FAILED"
            print(f"{name} {str(dtype)[6:]:8s} {'x'.join(map(str, shape)):14s} rel err {'/'.join(outputs)} = "
                  + " / ".join(f"{e:.1e}" for e in errs) + f"  (tol {limit:g}) {verdict}", flush=True)
    print(f"{name}: {'all checks passed' if ok else 'FAILED'}")
    return 0 if ok else 1
