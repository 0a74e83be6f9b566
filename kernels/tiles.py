"""Tile helpers shared by kernels/bank_attention.py and kernels/similarity.py (no op of its own).

    python -c "import kernels.tiles"   # nothing to run; the ops' tests exercise every helper

A row of width d is held as a tuple of NC chunks of BLOCK_D columns (tl.arange needs a power of two,
and d = 768 is not one): `chunks` loads rows as such a tuple, `zeros` makes accumulators of that
shape and `store_chunks` writes one back; tails in every dimension are masked with zeros. The rest is
plumbing: the accumulator dtype, the SM count, a 32-bit offset guard, and two fixes that make Triton's
CPU interpreter compute as a GPU does (bf16 rounding, TF32 products).
"""
import functools
import math
import os

import torch
import triton
import triton.language as tl

INT32_MAX = 2 ** 31 - 1
H100_SMS = 132  # programs to fill when the device is not a GPU (so the interpreter takes GPU paths)
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # read once: kernel modules are imported after it is set


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


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for launch grids: plain integers (triton.cdiv is a constexpr function, and a host
    call of it costs microseconds, which launchers at small N cannot spare)."""
    return -(-a // b)


@functools.lru_cache(maxsize=None)
def chunking(d: int) -> tuple[int, int]:
    """(BLOCK_D, NC) for width d: chunks of up to 256 columns (d = 768 is 3 x 256), at least 16 wide
    (the smallest tl.dot on a GPU)."""
    block = min(256, max(16, 1 << (d - 1).bit_length()))
    return block, cdiv(d, block)


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors to fill: the GPU's, or the H100's when there is no GPU."""
    return _cuda_sms(device.index if device.index is not None else torch.cuda.current_device()) \
        if device.type == "cuda" else H100_SMS


@functools.lru_cache(maxsize=None)
def _cuda_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def acc_dtype(x: torch.Tensor) -> torch.dtype:
    """Accumulator and statistics dtype: fp64 for fp64 inputs (gradcheck), else fp32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def constexprs(x: torch.Tensor) -> dict:
    """The interpreter-only constexprs: UPCAST (bf16 tiles widened to fp32, as the interpreter
    multiplies bf16 as raw bits) and ACC (fp64 for fp64 inputs, which only the interpreter's
    gradcheck sends; fp32 otherwise)."""
    return dict(UPCAST=INTERPRET and x.dtype == torch.bfloat16,
                ACC=tl.float64 if x.dtype == torch.float64 else tl.float32)


def prepare_inputs(name: str, a: torch.Tensor, b: torch.Tensor, want: str, same_rows: bool = False,
                   autocast: bool = False) -> tuple:
    """Check an op's two (rows, d) inputs (clear errors naming the op and the shapes) -> both in one
    dtype (their promotion, or the autocast dtype when autocast is on and `autocast` asks for it, as a
    matmul would), contiguous."""
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1] or (same_rows and a.shape[0] != b.shape[0]):
        raise ValueError(f"{name} expects {want}, got {tuple(a.shape)} and {tuple(b.shape)}")
    if min(a.shape[0], b.shape[0], a.shape[1]) < 1 or a.device != b.device:
        raise ValueError(f"{name} needs non-empty inputs (every size >= 1) on one device, got {tuple(a.shape)} "
                         f"on {a.device} and {tuple(b.shape)} on {b.device}")
    if a.shape[1] > 1024:
        raise ValueError(f"{name} supports d <= 1024 (one program holds a row), got d = {a.shape[1]}")
    dtype = torch.promote_types(a.dtype, b.dtype)
    if autocast and a.device.type != "meta" and torch.is_autocast_enabled(a.device.type):
        dtype = torch.get_autocast_dtype(a.device.type)
    if dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise TypeError(f"{name} supports fp16, bf16, fp32 and fp64, got {dtype}")
    return a.to(dtype).contiguous(), b.to(dtype).contiguous()


def check_int32(name: str, **arrays) -> None:
    """The kernels index with int32 offsets: refuse (clearly) any array (a tensor, or the shape of one
    about to be allocated) of 2^31 or more elements."""
    for what, t in arrays.items():
        shape = tuple(t.shape) if isinstance(t, torch.Tensor) else tuple(t)
        if math.prod(shape) > INT32_MAX:
            raise ValueError(f"{name}: {what} {shape} has {math.prod(shape):,} elements; the kernels "
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



def interpreter_emulates_tf32(on: bool = True) -> None:
    """Make the interpreter's fp32 tl.dot behave as a GPU's TF32 tensor cores: the products read only
    the top 10 mantissa bits of each fp32 operand (the hardware ignores the low 13 bits; no rounding)
    and accumulate in fp32. Lets a CPU measure the error fp32 inputs will have on a GPU, which is what
    the ops' fp32 tolerance on a GPU is sized from. A no-op unless TRITON_INTERPRET=1."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    import numpy as np
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    dot = getattr(builder.create_dot, "exact", builder.create_dot)
    if not on:
        builder.create_dot = dot
        return

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if a.data.dtype == np.float32 and b.data.dtype == np.float32 and "TF32" in str(input_precision).upper() \
                and "X3" not in str(input_precision).upper():
            keep = np.uint32(0xFFFFE000)  # sign, exponent and the top 10 mantissa bits
            a = interpreter.TensorHandle((a.data.view(np.uint32) & keep).view(np.float32), a.dtype)
            b = interpreter.TensorHandle((b.data.view(np.uint32) & keep).view(np.float32), b.dtype)
        return dot(self, a, b, d, input_precision, max_num_imprecise_acc)

    create_dot.exact = dot
    builder.create_dot = create_dot
