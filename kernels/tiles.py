"""Tile helpers shared by kernels/bank_attention.py and kernels/similarity.py (no op of its own).

    python -c "import kernels.tiles"   # nothing to run; the ops' tests exercise every helper

A row of width d is held as a tuple of NC chunks of BLOCK_D columns (tl.arange needs a power of two,
and d = 768 is not one); tails in every dimension are masked with zeros.
"""
import os

import torch
import triton
import triton.language as tl

INT32_MAX = 2 ** 31 - 1
H100_SMS = 132  # programs to fill when the device is not a GPU (so the interpreter takes GPU paths)


@triton.jit
def tile(ptr, rows, cols, n_rows, n_cols, stride, UPCAST: tl.constexpr):
    """Load ptr[rows, cols] (row stride `stride`, unit column stride) with zeros outside the array."""
    mask = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    t = tl.load(ptr + (rows[:, None] * stride + cols[None, :]), mask=mask, other=0.0)
    if UPCAST:  # the interpreter multiplies bf16 as raw integer bits
        t = t.to(tl.float32)
    return t


@triton.jit
def chunks(ptr, rows, n_rows, d, stride, BLOCK_D: tl.constexpr, NC: tl.constexpr, UPCAST: tl.constexpr):
    """The rows `rows` of a (n_rows, d) array as NC tiles of (len(rows), BLOCK_D)."""
    out = ()
    for c in tl.static_range(NC):
        out = out + (tile(ptr, rows, c * BLOCK_D + tl.arange(0, BLOCK_D), n_rows, d, stride, UPCAST),)
    return out


@triton.jit
def zeros(ROWS: tl.constexpr, BLOCK_D: tl.constexpr, NC: tl.constexpr, ACC: tl.constexpr):
    """NC chunk accumulators of (ROWS, BLOCK_D)."""
    acc = ()
    for c in tl.static_range(NC):
        acc = acc + (tl.zeros((ROWS, BLOCK_D), ACC),)
    return acc


@triton.jit
def store_chunks(ptr, acc, f, rows, n_rows, d, stride, BLOCK_D: tl.constexpr, NC: tl.constexpr):
    """ptr[rows, c * BLOCK_D + j] = f[rows] * acc[c][:, j] for every chunk c, masked."""
    for c in tl.static_range(NC):
        dc = c * BLOCK_D + tl.arange(0, BLOCK_D)
        mask = (rows < n_rows)[:, None] & (dc < d)[None, :]
        tl.store(ptr + rows[:, None] * stride + dc[None, :], (acc[c] * f[:, None]).to(ptr.dtype.element_ty),
                 mask=mask)


def chunking(d: int) -> tuple[int, int]:
    """(BLOCK_D, NC) for width d: chunks of up to 256 columns (d = 768 is 3 x 256), at least 16 wide
    (the smallest tl.dot on a GPU)."""
    block = min(256, max(16, triton.next_power_of_2(d)))
    return block, triton.cdiv(d, block)


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors to fill: the GPU's, or the H100's when there is no GPU."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else H100_SMS


def acc_dtype(x: torch.Tensor) -> torch.dtype:
    """Accumulator and statistics dtype: fp64 for fp64 inputs (gradcheck), else fp32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def constexprs(x: torch.Tensor) -> dict:
    """UPCAST (bf16 through the interpreter) and ACC, the tl accumulator dtype."""
    upcast = os.environ.get("TRITON_INTERPRET") == "1" and x.dtype == torch.bfloat16
    return dict(UPCAST=upcast, ACC=tl.float64 if x.dtype == torch.float64 else tl.float32)


def check_int32(name: str, **tensors: torch.Tensor) -> None:
    """The kernels index with int32 offsets: refuse (clearly) any array of 2^31 or more elements."""
    for what, t in tensors.items():
        if t.numel() > INT32_MAX:
            raise ValueError(f"{name}: {what} {tuple(t.shape)} has {t.numel():,} elements; the kernels "
                             f"use 32-bit offsets (at most {INT32_MAX:,}): split the batch")


def interpreter_rounds_bf16() -> None:
    """Make Triton's interpreter cast fp32 -> bf16 by rounding to nearest even, as a GPU does. By
    itself it drops the low 16 bits, an error no GPU makes, and kernels that store P, H or dS in bf16
    before a second product would be checked against it. Called by tests/conftest.py and by the ops'
    self-checks; a no-op unless TRITON_INTERPRET=1, and calling it twice changes nothing."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    import numpy as np
    from triton.runtime import interpreter

    cast = interpreter.InterpreterBuilder.cast_impl
    if getattr(cast, "rounds_bf16", False):
        return

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            x = np.asarray(src.data, dtype=np.float32)
            u = x.view(np.uint32).astype(np.uint64)
            bits = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
            bits = np.where(np.isnan(x), np.uint16(0x7FC0), bits).astype(np.uint16)
            return interpreter.TensorHandle(bits.reshape(x.shape), dst_type.scalar)
        return cast(self, src, dst_type)

    cast_impl.rounds_bf16 = True
    interpreter.InterpreterBuilder.cast_impl = cast_impl

