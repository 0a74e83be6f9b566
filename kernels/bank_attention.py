"""Fused knowledge-bank attention (CMKI, SPEC sections 3 and 8): x_hat = softmax(s * x D^T) D.

    python -m kernels.bank_attention      # check against a float64 reference (interpreter without a GPU)

Maths, with x (N, d) the embeddings, D (K, d) the bank and s the logit scale (1, or 1/sqrt(d)):
    S = s * x D^T  (N, K)     P = softmax(S) over the K entries     x_hat = P D  (N, d)
The forward keeps only the row max m and row sum l = sum_j 2^(log2(e) S_ij - m_i) (N each; m is in
base-2 units because the kernels use exp2 with log2(e) folded into the scale). Backward, dO = dL/dx_hat:
    dP = dO D^T,   delta = rowsum(dO * x_hat) = rowsum(P * dP),   dS = P * (dP - delta)
    dx = s * dS D,   dD = P^T dO + s * dS^T x      (D is both key and value: both roles add into dD)

Why fuse (bf16, N = 65536, K = 2048, d = 768: an (N, K) array is 268 MB, an (N, d) one 101 MB):
eager writes S, softmax reads it and writes P, P D reads P, and P stays alive for backward (~1.3 GB
moved); its backward writes dP, reads P and dP, writes dS, reads dS twice and P once (~2.3 GB). Here
no (N, K) array exists beyond one row chunk, so memory is O(N d + K d + chunk K).

Design (H100 first, d up to 1024; FLOPs in units of one N x K x d GEMM, 2 N K d; eager does 6):
* Forward, FlashAttention-style (2 units): a program holds BLOCK_M rows of x for the whole walk over
  the bank and, per BLOCK_K tile, loads the tile of D once and uses it as key (logits) and value (P D),
  with an online softmax (max subtracted, exp2). The output accumulator covers all of d (NC chunks of
  BLOCK_D columns), so the logits are never recomputed. Small N (the paper's batch of 64 is one row
  block) splits the bank over programs (flash-decoding), merged by _combine_kernel.
* Backward in row chunks (5 units): _bwd_kernel holds BLOCK_M rows of x and dO, walks the bank, loads
  each tile of D once for both S and dP, and writes P and s * dS for its rows into a chunk buffer
  W (2 * rows, K) in the input dtype (the rounding a fused kernel applies before its second products).
  The three remaining products are plain GEMMs on that buffer: dx = (s dS) D and
  dD = [P; s dS]^T [dO; x]. A single fused backward would need a (BLOCK_K, d) fp32 accumulator for dD
  beside (BLOCK_M, d) for dx, more than the register file at d = 768, so FlashAttention-style kernels
  either recompute S and dP in a second kernel (9 units) or split d (11 units); the buffer costs
  2 * chunk * K elements instead, chunk sized so that it stays within BUFFER_BYTES. delta is taken
  as the diagonal of dO x_hat^T (BLOCK_M^2 d per program) so that dP - delta is exactly 0 where P is
  one-hot; at N = 64, where 128 programs split the bank, that repetition makes the executed FLOPs
  1.8x the algorithmic count (about a microsecond per program).
* Splits are chosen to fill whole waves of the GPU's SMs (132 when there is no GPU, so the interpreter
  and kernels.aot take the H100's paths). Accumulation is fp32 (fp64 for fp64 inputs, for gradcheck);
  on the GPU an fp32 tl.dot runs as TF32 and fp64 inputs take the eager path.
"""
import os
from typing import NamedTuple

import torch

if __name__ == "__main__" and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # no GPU: run the check through the interpreter

import triton
import triton.language as tl

from kernels.tiles import (acc_dtype, check_int32, chunking, chunks, constexprs, interpreter_rounds_bf16, sm_count,
                           store_chunks, tile, zeros)

LOG2E = 1.4426950408889634
BUFFER_BYTES = 64 * 2 ** 20  # backward chunk buffer (P and s dS for a block of rows)


def bank_attention_reference(x: torch.Tensor, bank: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Eager x_hat = softmax(scale * x D^T) D: materialises the (N, K) logits and probabilities."""
    p = torch.softmax(scale * x @ bank.t(), dim=-1)  # (N, K)
    return p @ bank  # (N, d)


# ----------------------------------------------------------------------------- kernels

@triton.jit
def _logits(xs, Ds, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, NC: tl.constexpr, ACC: tl.constexpr):
    """sum_c xs[c] Ds[c]^T: (BLOCK_M, BLOCK_K) from chunk tuples of the rows and of the bank tile."""
    s = tl.zeros((BLOCK_M, BLOCK_K), ACC)
    for c in tl.static_range(NC):
        s += tl.dot(xs[c], tl.trans(Ds[c]), out_dtype=ACC)
    return s


@triton.jit
def _fwd_kernel(X, D, O, ML,                     # x (N, d), D (K, d) -> out (SPLIT, N, d), m|l (SPLIT, 2, N)
                N, K, d, tiles_per_split,
                stride_x, stride_d, stride_os, stride_o, stride_ms,
                qk_scale,                        # s * log2(e)
                BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
                NC: tl.constexpr, UPCAST: tl.constexpr, ACC: tl.constexpr):
    pid_m, pid_s = tl.program_id(0), tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    xs = chunks(X, rows, N, d, stride_x, BLOCK_D, NC, UPCAST)  # held for the whole bank walk
    k_lo = pid_s * tiles_per_split * BLOCK_K  # this program's slice of the bank
    k_hi = tl.minimum(K, k_lo + tiles_per_split * BLOCK_K)
    m_i = tl.full((BLOCK_M,), float("-inf"), ACC)
    l_i = tl.zeros((BLOCK_M,), ACC)
    acc = zeros(BLOCK_M, BLOCK_D, NC, ACC)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        Ds = chunks(D, cols, K, d, stride_d, BLOCK_D, NC, UPCAST)  # key and value: loaded once
        s = _logits(xs, Ds, BLOCK_M, BLOCK_K, NC, ACC)
        s = tl.where((cols < K)[None, :], s * qk_scale, float("-inf"))  # base-2 logits
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)  # rescales what was accumulated under the old max
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        m_i = m_new
        p_in = p.to(X.dtype.element_ty).to(Ds[0].dtype)  # P in the input dtype, as the GPU rounds it
        new = ()
        for c in tl.static_range(NC):
            new = new + (tl.dot(p_in, Ds[c], acc[c] * alpha[:, None], out_dtype=ACC),)
        acc = new
    store_chunks(O + pid_s * stride_os, acc, 1.0 / l_i, rows, N, d, stride_o, BLOCK_D, NC)
    tl.store(ML + pid_s * stride_ms + rows, m_i.to(ML.dtype.element_ty), mask=rows < N)
    tl.store(ML + pid_s * stride_ms + N + rows, l_i.to(ML.dtype.element_ty), mask=rows < N)


@triton.jit
def _combine_kernel(OP, MLP, O, ML,             # partials (SPLIT, N, d), (SPLIT, 2, N) -> (N, d), (2, N)
                    N, d, n_split,
                    stride_ps, stride_p, stride_ms, stride_o,
                    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    c0 = tl.program_id(1) * BLOCK_D
    row_ok = rows < N
    m, l = tl.full((BLOCK_M,), float("-inf"), ACC), tl.zeros((BLOCK_M,), ACC)
    acc = tl.zeros((BLOCK_M, BLOCK_D), ACC)
    for sp in range(0, n_split):  # online merge: split sp holds sum 2^(S - m_s) = l_s
        m_s = tl.load(MLP + sp * stride_ms + rows, mask=row_ok, other=0.0)
        l_s = tl.load(MLP + sp * stride_ms + N + rows, mask=row_ok, other=1.0)
        o_s = tile(OP + sp * stride_ps, rows, c0 + tl.arange(0, BLOCK_D), N, d, stride_p, False)
        m_new = tl.maximum(m, m_s)
        alpha = tl.exp2(m - m_new)
        w = l_s * tl.exp2(m_s - m_new)
        acc = acc * alpha[:, None] + w[:, None] * o_s
        l = l * alpha + w
        m = m_new
    store_chunks(O + c0, (acc,), 1.0 / l, rows, N, d - c0, stride_o, BLOCK_D, 1)
    first = row_ok & (tl.program_id(1) == 0)
    tl.store(ML + rows, m.to(ML.dtype.element_ty), mask=first)
    tl.store(ML + N + rows, l.to(ML.dtype.element_ty), mask=first)


@triton.jit
def _bwd_kernel(X, D, O, DO, ML, W,             # rows r0 .. r0 + n_rows -> W: P (n_rows, K) | s dS (n_rows, K)
                N, K, d, r0, n_rows, tiles_per_split,
                stride_x, stride_d, stride_w,
                qk_scale, scale,
                BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
                NC: tl.constexpr, UPCAST: tl.constexpr, ACC: tl.constexpr):
    pid_m, pid_s = tl.program_id(0), tl.program_id(1)
    local = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # row within the chunk
    rows = r0 + local
    row_ok = local < n_rows
    n_hi = r0 + n_rows
    xs = chunks(X, rows, n_hi, d, stride_x, BLOCK_D, NC, UPCAST)  # held for the whole bank walk
    dos = chunks(DO, rows, n_hi, d, stride_x, BLOCK_D, NC, UPCAST)
    # delta = rowsum(dO * x_hat) as the diagonal of dO x_hat^T: summed by tl.dot in the order dP is,
    # so that dP - delta is exactly 0 where P is one-hot; dO is read again here, as reusing the held
    # tiles would keep them in registers as well as in shared memory
    dd = tl.zeros((BLOCK_M, BLOCK_M), ACC)
    for c in tl.static_range(NC):
        dc = c * BLOCK_D + tl.arange(0, BLOCK_D)
        o = tile(O, rows, dc, n_hi, d, stride_x, UPCAST)
        dd += tl.dot(tile(DO, rows, dc, n_hi, d, stride_x, UPCAST), tl.trans(o), out_dtype=ACC)
    delta = tl.sum(tl.where(local[:, None] == local[None, :], dd, 0.0), 1)
    m_i = tl.load(ML + rows, mask=row_ok, other=0.0)
    inv_l = 1.0 / tl.load(ML + N + rows, mask=row_ok, other=1.0)
    k_lo = pid_s * tiles_per_split * BLOCK_K
    k_hi = tl.minimum(K, k_lo + tiles_per_split * BLOCK_K)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        Ds = chunks(D, cols, K, d, stride_d, BLOCK_D, NC, UPCAST)  # one load for S and dP
        s = _logits(xs, Ds, BLOCK_M, BLOCK_K, NC, ACC)
        dp = _logits(dos, Ds, BLOCK_M, BLOCK_K, NC, ACC)
        p = tl.exp2(s * qk_scale - m_i[:, None]) * inv_l[:, None]  # P recomputed as in the forward
        ds = p * (dp - delta[:, None]) * scale
        mask = row_ok[:, None] & (cols < K)[None, :]
        offs = local[:, None] * stride_w + cols[None, :]
        tl.store(W + offs, p.to(W.dtype.element_ty), mask=mask)
        tl.store(W + n_rows * stride_w + offs, ds.to(W.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- launchers

class Config(NamedTuple):
    BLOCK_M: int     # rows of x per program
    BLOCK_K: int     # bank entries per tile
    BLOCK_D: int     # width of one d-chunk
    NC: int          # d-chunks: BLOCK_D * NC >= d, the whole width in one program
    num_warps: int
    num_stages: int


def pick_config(d: int, kernel: str = "fwd", itemsize: int = 2) -> Config:
    """Launch configuration for width d, from the sm_90 report of kernels.aot at d = 768 (0 spill
    bytes in 16-bit, shared memory within the H100's 227 KB). The held row block takes
    BLOCK_M * d * itemsize bytes of shared memory (96 KB for 64 rows of bf16; the backward holds x and
    dO), which leaves room for 16-entry bank tiles at d = 768; fp32 holds fewer rows (its forward
    still spills 332 bytes: fp32 inputs are not the fast path)."""
    block_d, nc = chunking(d)
    wide = block_d * nc > 256
    if not wide:
        return Config(64 if itemsize <= 2 else 32, 64, block_d, nc, 4, 2 if itemsize <= 2 else 1)
    if kernel == "fwd":  # 8 warps share the (64, d) fp32 accumulator: 192 registers each at d = 768
        return Config(64, 16, block_d, nc, 8, 2) if itemsize <= 2 else Config(32, 16, block_d, nc, 8, 1)
    return Config(64, 16, block_d, nc, 4, 1) if itemsize <= 2 else Config(16, 32, block_d, nc, 4, 1)


def _split(n_tiles: int, programs: int, device: torch.device, fixed: int = 0) -> tuple[int, int]:
    """Split the n_tiles bank tiles each of `programs` programs walks into (splits, tiles per split):
    the fewest splits with the shortest makespan, waves * (tiles per split + fixed), where a wave is
    one program per SM and `fixed` is what a program loads before its walk (its held rows), in tiles.
    Splitting pays only below about one wave: partials cost traffic and a merge."""
    sms = sm_count(device)
    if programs >= sms:
        return 1, n_tiles
    best = None
    for s in range(1, n_tiles + 1):
        per = triton.cdiv(n_tiles, s)
        s = triton.cdiv(n_tiles, per)
        span = triton.cdiv(programs * s, sms) * (per + fixed)
        if best is None or span < best[0]:
            best = (span, s, per)
    return best[1], best[2]


def _partials(splits: int, like: torch.Tensor, rows: int) -> torch.Tensor:
    """The output itself when there is one split, else (splits, rows, d) accumulator-dtype partials."""
    if splits == 1:
        return torch.empty(rows, like.shape[1], device=like.device, dtype=like.dtype)
    return torch.empty(splits, rows, like.shape[1], device=like.device, dtype=acc_dtype(like))


def _launch(cfg: Config, x: torch.Tensor) -> dict:
    return dict(BLOCK_M=cfg.BLOCK_M, BLOCK_K=cfg.BLOCK_K, BLOCK_D=cfg.BLOCK_D, NC=cfg.NC, **constexprs(x),
                num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def _forward(x: torch.Tensor, D: torch.Tensor, scale: float):
    """x (N, d), D (K, d), both contiguous and of one dtype -> x_hat (N, d), row max|sum (2, N)."""
    (N, d), K = x.shape, D.shape[0]
    cfg = pick_config(d, "fwd", x.element_size())
    row_blocks = triton.cdiv(N, cfg.BLOCK_M)
    splits, per = _split(triton.cdiv(K, cfg.BLOCK_K), row_blocks, x.device, cfg.BLOCK_M // cfg.BLOCK_K)
    o = _partials(splits, x, N)  # (N, d) or (SPLIT, N, d)
    ml = torch.empty(splits, 2, N, device=x.device, dtype=acc_dtype(x))  # row max m (base 2), sum l
    check_int32("bank_attention", x=x, bank=D, partials=o)
    _fwd_kernel[(row_blocks, splits)](
        x, D, o, ml, N, K, d, per,
        x.stride(0), D.stride(0), o.stride(0) * (splits > 1), o.stride(-2), ml.stride(0),
        scale * LOG2E, **_launch(cfg, x))
    if splits == 1:
        return o, ml[0]
    out, ml_out = torch.empty_like(x), torch.empty(2, N, device=x.device, dtype=ml.dtype)
    _combine_kernel[(row_blocks, triton.cdiv(d, 128))](
        o, ml, out, ml_out, N, d, splits, o.stride(0), o.stride(1), ml.stride(0), out.stride(0),
        BLOCK_M=64, BLOCK_D=128, ACC=constexprs(x)["ACC"], num_warps=4)
    return out, ml_out


def _backward(x, D, out, ml, dout, scale):
    """Saved tensors and dO (N, d) -> dx (N, d), dD (K, d), one chunk of rows at a time."""
    (N, d), K = x.shape, D.shape[0]
    cfg = pick_config(d, "bwd", x.element_size())
    chunk = max(cfg.BLOCK_M, BUFFER_BYTES // (2 * K * x.element_size()) // cfg.BLOCK_M * cfg.BLOCK_M)
    chunk = min(chunk, triton.cdiv(N, cfg.BLOCK_M) * cfg.BLOCK_M)
    buf = torch.empty(2 * chunk * K, device=x.device, dtype=x.dtype)  # P | s dS of one chunk
    check_int32("bank_attention", x=x, bank=D, buffer=buf)
    dx = torch.empty_like(x)
    dD = None
    for r0 in range(0, N, chunk):
        n = min(chunk, N - r0)
        W = buf[: 2 * n * K].view(2 * n, K)  # rows [0, n): P, rows [n, 2n): s dS
        row_blocks = triton.cdiv(n, cfg.BLOCK_M)
        splits, per = _split(triton.cdiv(K, cfg.BLOCK_K), row_blocks, x.device, 4 * cfg.BLOCK_M // cfg.BLOCK_K)
        _bwd_kernel[(row_blocks, splits)](
            x, D, out, dout, ml, W, N, K, d, r0, n, per,
            x.stride(0), D.stride(0), W.stride(0), scale * LOG2E, scale, **_launch(cfg, x))
        torch.mm(W[n:], D, out=dx[r0:r0 + n])  # dx = s dS D
        part = W.t() @ torch.cat([dout[r0:r0 + n], x[r0:r0 + n]])  # P^T dO + s dS^T x  (K, d)
        if N <= chunk:
            dD = part
        else:  # several chunks: their sum is kept in fp32
            dD = part.to(acc_dtype(x)) if dD is None else dD.add_(part)
    return dx, dD.to(D.dtype)


class BankAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, D, scale):
        out, ml = _forward(x, D, scale)
        ctx.save_for_backward(x, D, out, ml)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, dout):
        x, D, out, ml = ctx.saved_tensors
        dx, dD = _backward(x, D, out, ml, dout.contiguous(), ctx.scale)
        return dx, dD, None


def bank_attention(x: torch.Tensor, bank: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Fused softmax(scale * x bank^T) bank: (N, d), (K, d) -> (N, d); differentiable in x and bank."""
    if x.dim() != 2 or bank.dim() != 2 or x.shape[1] != bank.shape[1]:
        raise ValueError(f"bank_attention expects x (N, d) and bank (K, d) with the same d, "
                         f"got {tuple(x.shape)} and {tuple(bank.shape)}")
    if min(x.shape[0], bank.shape[0], x.shape[1]) < 1 or x.device != bank.device:
        raise ValueError(f"bank_attention needs N, K, d >= 1 and one device, got x {tuple(x.shape)} "
                         f"on {x.device}, bank {tuple(bank.shape)} on {bank.device}")
    if x.shape[1] > 1024:
        raise ValueError(f"bank_attention supports d <= 1024 (one program holds a row), got d = {x.shape[1]}")
    dtype = torch.promote_types(x.dtype, bank.dtype)
    if x.device.type != "meta" and torch.is_autocast_enabled(x.device.type):  # autocast: as a matmul
        dtype = torch.get_autocast_dtype(x.device.type)
    if dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise TypeError(f"bank_attention supports fp16, bf16, fp32 and fp64, got {dtype}")
    if dtype == torch.float64 and x.is_cuda:  # tensor cores have no use for fp64: stay eager
        return bank_attention_reference(x.to(dtype), bank.to(dtype), scale)
    return BankAttention.apply(x.to(dtype).contiguous(), bank.to(dtype).contiguous(), float(scale))


# ----------------------------------------------------------------------------- check + benchmark

def _grads(fn, x, D, dO, scale):
    x, D = x.clone().requires_grad_(), D.clone().requires_grad_()
    out = fn(x, D, scale)
    return (out, *torch.autograd.grad(out, (x, D), dO.to(out.dtype)))


def _check():
    """Forward and both gradients at the paper's width against float64, printed."""
    torch.manual_seed(0)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    for dtype, tol in ((torch.float32, 1e-5 if dev == "cpu" else 2e-3), (torch.bfloat16, 1e-2)):
        x, D, dO = (torch.randn(n, 768, device=dev).to(dtype) for n in (67, 300, 67))  # S ~ N(0, 1)
        got = _grads(bank_attention, x, D, dO, 768 ** -0.5)
        want = _grads(bank_attention_reference, x.double(), D.double(), dO, 768 ** -0.5)
        errs = [((g.double() - w).abs().max() / w.abs().max()).item() for g, w in zip(got, want)]
        print(f"check {str(dtype):15s} rel err out/dx/dD = " + " / ".join(f"{e:.1e}" for e in errs)
              + f"  (tol {tol:g}) {'ok' if max(errs) <= tol else 'FAILED'}")


if __name__ == "__main__":
    interpreter_rounds_bf16()  # without a GPU, bf16 stores round as a GPU's do
    _check()  # timing: python -m kernels.bench
