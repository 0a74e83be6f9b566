"""Fused knowledge-bank attention (CMKI, SPEC sections 3 and 8): x_hat = softmax(s * x D^T) D.

    python -m kernels.bank_attention      # check against the eager reference, then benchmark

Maths, with x (N, d) the embeddings, D (K, d) the bank and s the logit scale (1, or 1/sqrt(d)):
    S = s * x D^T  (N, K)     P = softmax(S) over the K entries     x_hat = P D  (N, d)
The forward keeps only the row log-sum-exp L = logsumexp(S) (N,). Backward, with dO = dLoss/dx_hat:
    dP = dO D^T,   delta = rowsum(dO * x_hat) = rowsum(P * dP),   dS = P * (dP - delta)
    dx = s * dS D,   dD = P^T dO + s * dS^T x      (D is both key and value: both roles add into dD)

Why fuse (bytes, bf16, N = 65536, K = 2048, d = 768; one (N, K) array is 268 MB, x is 101 MB):
eager writes s*x D^T (268 MB), softmax reads it and writes P (536 MB), P D reads P (268 MB), and P
stays alive for backward; its backward writes dP, reads P and dP, writes dS and reads dS twice and P
once (~1.9 GB). The fused forward reads x and D and writes x_hat and L (~0.2 GB); the backward reads
x, dO, x_hat, D and L and writes dx and dD (~0.6 GB). No (N, K) array ever exists.

Design (H100 first, but every choice also runs through Triton's CPU interpreter):
* Forward is FlashAttention-style: a program owns BLOCK_M rows of x and walks the bank in BLOCK_K
  tiles with an online softmax (running max m and sum l, max subtracted before every exp). Each tile
  of D is fetched from memory once and serves as key (logits) and as value (P D); the value product
  re-reads its d-chunks from L1/L2 because a whole BLOCK_K x d tile would not fit in registers next
  to the accumulator.
* d up to 1024 (768 in the paper) is too wide for one tile: the logits are summed over BLOCK_D-wide
  chunks, and the output accumulator is a tuple of NC chunk accumulators (fp32, BLOCK_M x BLOCK_D).
  When d needs more than NC_MAX chunks, the output columns are split over GROUPS programs, each of
  which recomputes the logits. The alternative, a two-pass scheme (an L-only pass, then one value
  pass per column chunk), pays that recompute always; a global-memory accumulator pays d*4 bytes of
  traffic per row per bank tile instead. NC_MAX is sized from the sm_90 register report (no spills).
* Small N (the paper's batch of 64 is one row block) leaves most SMs idle, so the bank is split over
  SPLIT programs (flash-decoding): each writes a normalised partial output and its L, and a combine
  kernel merges them with weights exp(L_split - L).
* Backward uses two kernels and no atomics: _dx_kernel over row blocks (walks the bank; also writes
  delta) and _dD_kernel over bank tiles (walks the rows), both recomputing P from L. Atomics for dD
  from every row block would cost (N / BLOCK_M) * K * d fp32 read-modify-writes (6.4 G at N = 65536),
  far more than recomputing S and dP. Small N splits dx over the bank, large N splits dD over the rows;
  the fp32 partials are summed afterwards.
* Accumulation is fp32 (fp64 for fp64 inputs, used by gradcheck). The interpreter multiplies bf16 as
  raw integer bits, so when interpreting, bf16 tiles are upcast to fp32 right after loading (UPCAST).
  On the GPU an fp32 tl.dot runs as TF32.
"""
import os
from typing import NamedTuple

import torch

if __name__ == "__main__" and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # no GPU: run the check through the interpreter

import triton
import triton.language as tl

BLOCK_D = 64  # d-chunk width: one wgmma K-step of 64 on H100; narrower d is masked
NC_CHOICES = (1, 2, 4, 6, 8, 12)  # d-chunks one program may accumulate (each is a compiled variant)
NC_MAX = dict(fwd=12, dx=12, dD=8)  # widest 16-bit accumulator per kernel without large sm_90 spills
H100_SMS = 132  # programs to fill when the device is not a GPU (so the interpreter takes GPU paths)


def bank_attention_reference(x: torch.Tensor, bank: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Eager x_hat = softmax(scale * x D^T) D: materialises the (N, K) logits and probabilities."""
    p = torch.softmax(scale * x @ bank.t(), dim=-1)  # (N, K)
    return p @ bank  # (N, d)


# ----------------------------------------------------------------------------- kernels

@triton.jit
def _tile(ptr, rows, cols, n_rows, n_cols, stride, UPCAST: tl.constexpr):
    """Load ptr[rows, cols] (row stride `stride`, unit column stride) with zeros outside the array."""
    mask = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    t = tl.load(ptr + (rows[:, None] * stride + cols[None, :]), mask=mask, other=0.0)
    if UPCAST:
        t = t.to(tl.float32)
    return t


@triton.jit
def _logits(X, DO, D, rows, cols, N, K, d, stride_x, stride_d,
            BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
            WITH_DP: tl.constexpr, UPCAST: tl.constexpr, ACC: tl.constexpr):
    """x[rows] D[cols]^T and (WITH_DP) dO[rows] D[cols]^T, summed over d in BLOCK_D chunks."""
    s = tl.zeros((BLOCK_M, BLOCK_K), ACC)
    dp = tl.zeros((BLOCK_M, BLOCK_K), ACC)
    for c0 in range(0, d, BLOCK_D):
        dc = c0 + tl.arange(0, BLOCK_D)
        Dc = _tile(D, cols, dc, K, d, stride_d, UPCAST)  # (BLOCK_K, BLOCK_D), shared by both dots
        s += tl.dot(_tile(X, rows, dc, N, d, stride_x, UPCAST), tl.trans(Dc), out_dtype=ACC)
        if WITH_DP:
            dp += tl.dot(_tile(DO, rows, dc, N, d, stride_x, UPCAST), tl.trans(Dc), out_dtype=ACC)
    return s, dp


@triton.jit
def _fwd_kernel(X, D, O, L,                      # x (N, d), D (K, d), out (SPLIT, N, d), L (SPLIT, N)
                N, K, d, tiles_per_split,
                stride_x, stride_d, stride_os, stride_o, stride_ls,
                scale,
                BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
                NC: tl.constexpr, UPCAST: tl.constexpr, ACC: tl.constexpr):
    pid_m, pid_g, pid_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    k_lo = pid_s * tiles_per_split * BLOCK_K  # this program's slice of the bank
    k_hi = tl.minimum(K, k_lo + tiles_per_split * BLOCK_K)
    g0 = pid_g * NC * BLOCK_D  # first output column of this program's group
    m_i = tl.full((BLOCK_M,), float("-inf"), ACC)
    l_i = tl.zeros((BLOCK_M,), ACC)
    acc = ()
    for c in tl.static_range(NC):
        acc = acc + (tl.zeros((BLOCK_M, BLOCK_D), ACC),)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        s, _ = _logits(X, X, D, rows, cols, N, K, d, stride_x, stride_d,
                       BLOCK_M, BLOCK_K, BLOCK_D, False, UPCAST, ACC)
        s = tl.where((cols < K)[None, :], s * scale, float("-inf"))  # (BLOCK_M, BLOCK_K)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp(m_i - m_new)  # rescales what was accumulated under the old max
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        m_i = m_new
        new = ()
        for c in tl.static_range(NC):
            v = _tile(D, cols, g0 + c * BLOCK_D + tl.arange(0, BLOCK_D), K, d, stride_d, UPCAST)
            new = new + (acc[c] * alpha[:, None] + tl.dot(p.to(v.dtype), v, out_dtype=ACC),)
        acc = new
    row_ok = rows < N
    for c in tl.static_range(NC):
        dc = g0 + c * BLOCK_D + tl.arange(0, BLOCK_D)
        ptrs = O + pid_s * stride_os + rows[:, None] * stride_o + dc[None, :]
        o = acc[c] / l_i[:, None]
        tl.store(ptrs, o.to(O.dtype.element_ty), mask=row_ok[:, None] & (dc < d)[None, :])
    lse = m_i + tl.log(l_i)
    tl.store(L + pid_s * stride_ls + rows, lse.to(L.dtype.element_ty), mask=row_ok & (pid_g == 0))


@triton.jit
def _combine_kernel(OP, LP, O, L,               # partials (SPLIT, N, d), (SPLIT, N) -> out (N, d), L (N,)
                    N, d, n_split,
                    stride_ps, stride_p, stride_ls, stride_o,
                    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    dc = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_ok = rows < N
    m = tl.full((BLOCK_M,), float("-inf"), ACC)
    w_sum = tl.zeros((BLOCK_M,), ACC)
    acc = tl.zeros((BLOCK_M, BLOCK_D), ACC)
    for sp in range(0, n_split):  # online log-sum-exp over the splits' L
        l_s = tl.load(LP + sp * stride_ls + rows, mask=row_ok, other=0.0)
        o_s = _tile(OP + sp * stride_ps, rows, dc, N, d, stride_p, False)
        m_new = tl.maximum(m, l_s)
        alpha = tl.exp(m - m_new)
        w = tl.exp(l_s - m_new)
        acc = acc * alpha[:, None] + w[:, None] * o_s
        w_sum = w_sum * alpha + w
        m = m_new
    out = acc / w_sum[:, None]
    tl.store(O + rows[:, None] * stride_o + dc[None, :], out.to(O.dtype.element_ty),
             mask=row_ok[:, None] & (dc < d)[None, :])
    lse = m + tl.log(w_sum)
    tl.store(L + rows, lse.to(L.dtype.element_ty), mask=row_ok & (tl.program_id(1) == 0))


@triton.jit
def _dx_kernel(X, D, O, DO, L, DELTA, DX,       # DX (SPLIT, N, d); DELTA (N,) is written here
               N, K, d, tiles_per_split,
               stride_x, stride_d, stride_dxs, stride_dx,
               scale,
               BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
               NC: tl.constexpr, UPCAST: tl.constexpr, ACC: tl.constexpr):
    pid_m, pid_g, pid_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    delta = tl.zeros((BLOCK_M,), ACC)  # rowsum(dO * x_hat), cheap next to the bank walk
    for c0 in range(0, d, BLOCK_D):
        dc = c0 + tl.arange(0, BLOCK_D)
        o = _tile(O, rows, dc, N, d, stride_x, UPCAST).to(ACC)
        delta += tl.sum(o * _tile(DO, rows, dc, N, d, stride_x, UPCAST).to(ACC), 1)
    tl.store(DELTA + rows, delta.to(DELTA.dtype.element_ty), mask=row_ok & (pid_g + pid_s == 0))
    lse = tl.load(L + rows, mask=row_ok, other=0.0)
    k_lo = pid_s * tiles_per_split * BLOCK_K
    k_hi = tl.minimum(K, k_lo + tiles_per_split * BLOCK_K)
    g0 = pid_g * NC * BLOCK_D
    acc = ()
    for c in tl.static_range(NC):
        acc = acc + (tl.zeros((BLOCK_M, BLOCK_D), ACC),)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        s, dp = _logits(X, DO, D, rows, cols, N, K, d, stride_x, stride_d,
                        BLOCK_M, BLOCK_K, BLOCK_D, True, UPCAST, ACC)
        p = tl.where((cols < K)[None, :], tl.exp(s * scale - lse[:, None]), 0.0)  # P recomputed
        ds = p * (dp - delta[:, None])  # (BLOCK_M, BLOCK_K)
        new = ()
        for c in tl.static_range(NC):
            v = _tile(D, cols, g0 + c * BLOCK_D + tl.arange(0, BLOCK_D), K, d, stride_d, UPCAST)
            new = new + (acc[c] + tl.dot(ds.to(v.dtype), v, out_dtype=ACC),)
        acc = new
    for c in tl.static_range(NC):
        dc = g0 + c * BLOCK_D + tl.arange(0, BLOCK_D)
        ptrs = DX + pid_s * stride_dxs + rows[:, None] * stride_dx + dc[None, :]
        tl.store(ptrs, (acc[c] * scale).to(DX.dtype.element_ty),
                 mask=row_ok[:, None] & (dc < d)[None, :])


@triton.jit
def _dD_kernel(X, D, DO, L, DELTA, DD,          # DD (SPLIT, K, d)
               N, K, d, blocks_per_split,
               stride_x, stride_d, stride_dds, stride_dd,
               scale,
               BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
               NC: tl.constexpr, UPCAST: tl.constexpr, ACC: tl.constexpr):
    pid_k, pid_g, pid_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)  # this program's bank entries
    n_lo = pid_s * blocks_per_split * BLOCK_M  # this program's slice of the rows
    n_hi = tl.minimum(N, n_lo + blocks_per_split * BLOCK_M)
    g0 = pid_g * NC * BLOCK_D
    acc = ()
    for c in tl.static_range(NC):
        acc = acc + (tl.zeros((BLOCK_K, BLOCK_D), ACC),)
    for i0 in range(n_lo, n_hi, BLOCK_M):
        rows = i0 + tl.arange(0, BLOCK_M)
        row_ok = rows < N
        s, dp = _logits(X, DO, D, rows, cols, N, K, d, stride_x, stride_d,
                        BLOCK_M, BLOCK_K, BLOCK_D, True, UPCAST, ACC)
        lse = tl.load(L + rows, mask=row_ok, other=0.0)
        delta = tl.load(DELTA + rows, mask=row_ok, other=0.0)
        ok = row_ok[:, None] & (cols < K)[None, :]
        p = tl.where(ok, tl.exp(s * scale - lse[:, None]), 0.0)  # (BLOCK_M, BLOCK_K)
        ds = p * (dp - delta[:, None]) * scale
        new = ()
        for c in tl.static_range(NC):
            dc = g0 + c * BLOCK_D + tl.arange(0, BLOCK_D)
            do = _tile(DO, rows, dc, N, d, stride_x, UPCAST)  # value role: P^T dO
            xc = _tile(X, rows, dc, N, d, stride_x, UPCAST)  # key role: s dS^T x
            acc_c = acc[c] + tl.dot(tl.trans(p).to(do.dtype), do, out_dtype=ACC)
            new = new + (acc_c + tl.dot(tl.trans(ds).to(xc.dtype), xc, out_dtype=ACC),)
        acc = new
    for c in tl.static_range(NC):
        dc = g0 + c * BLOCK_D + tl.arange(0, BLOCK_D)
        ptrs = DD + pid_s * stride_dds + cols[:, None] * stride_dd + dc[None, :]
        tl.store(ptrs, acc[c].to(DD.dtype.element_ty), mask=(cols < K)[:, None] & (dc < d)[None, :])


# ----------------------------------------------------------------------------- launchers

class Config(NamedTuple):
    BLOCK_M: int     # rows of x per tile
    BLOCK_K: int     # bank entries per tile
    BLOCK_D: int     # width of one d-chunk
    NC: int          # d-chunks accumulated per program
    groups: int      # programs sharing one row block's output columns (each recomputes the logits)
    num_warps: int
    num_stages: int


def pick_config(d: int, kernel: str = "fwd", itemsize: int = 2, nc_max: int = 0) -> Config:
    """Launch configuration for width d; tiles of 64 feed H100 tensor cores (and are >= 16 for tl.dot).

    fp32 tiles take twice the registers, so they get half the accumulator chunks.
    """
    chunks = triton.cdiv(d, BLOCK_D)
    nc_max = max(1, (nc_max or NC_MAX[kernel]) // (2 if itemsize > 2 else 1))
    nc = min(c for c in NC_CHOICES if c >= triton.cdiv(chunks, triton.cdiv(chunks, nc_max)))
    return Config(64, 64, BLOCK_D, nc, triton.cdiv(chunks, nc), 4 if nc == 1 else 8, 2)


def _split(n_tiles: int, programs: int, device: torch.device) -> tuple[int, int]:
    """Split n_tiles of work over enough programs to fill the GPU -> (splits, tiles per split)."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" \
        else H100_SMS
    splits = 1 if programs >= sms else min(n_tiles, triton.cdiv(sms, programs))
    per = triton.cdiv(n_tiles, splits)
    return triton.cdiv(n_tiles, per), per


def _meta(x: torch.Tensor, cfg: Config) -> dict:
    """Constexprs and launch options shared by the three main kernels."""
    upcast = os.environ.get("TRITON_INTERPRET") == "1" and x.dtype == torch.bfloat16
    return dict(BLOCK_M=cfg.BLOCK_M, BLOCK_K=cfg.BLOCK_K, BLOCK_D=cfg.BLOCK_D, NC=cfg.NC,
                UPCAST=upcast, ACC=_ACC[_acc_dtype(x)], num_warps=cfg.num_warps, num_stages=cfg.num_stages)


_ACC = {torch.float32: tl.float32, torch.float64: tl.float64}


def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _partials(splits: int, like: torch.Tensor, rows: int) -> torch.Tensor:
    """The output itself when there is one split, else (splits, rows, d) accumulator-dtype partials."""
    if splits == 1:
        return torch.empty(rows, like.shape[1], device=like.device, dtype=like.dtype)
    return torch.empty(splits, rows, like.shape[1], device=like.device, dtype=_acc_dtype(like))


def _forward(x: torch.Tensor, D: torch.Tensor, scale: float):
    """x (N, d), D (K, d), both contiguous and of one dtype -> x_hat (N, d), L (N,)."""
    (N, d), K = x.shape, D.shape[0]
    cfg = pick_config(d, "fwd", x.element_size())
    row_blocks = triton.cdiv(N, cfg.BLOCK_M)
    splits, per = _split(triton.cdiv(K, cfg.BLOCK_K), row_blocks * cfg.groups, x.device)
    o = _partials(splits, x, N)  # (N, d) or (SPLIT, N, d)
    lse = torch.empty(splits, N, device=x.device, dtype=_acc_dtype(x))
    _fwd_kernel[(row_blocks, cfg.groups, splits)](
        x, D, o, lse, N, K, d, per,
        x.stride(0), D.stride(0), o.stride(0) * (splits > 1), o.stride(-2), lse.stride(0),
        scale, **_meta(x, cfg))
    if splits == 1:
        return o, lse[0]
    out, lse_out = torch.empty_like(x), torch.empty(N, device=x.device, dtype=lse.dtype)
    _combine_kernel[(row_blocks, triton.cdiv(d, 128))](
        o, lse, out, lse_out, N, d, splits, o.stride(0), o.stride(1), lse.stride(0), out.stride(0),
        BLOCK_M=64, BLOCK_D=128, ACC=_ACC[lse.dtype], num_warps=4)
    return out, lse_out


def _backward(x, D, out, lse, dout, scale):
    """Saved tensors and dO (N, d) -> dx (N, d), dD (K, d)."""
    (N, d), K = x.shape, D.shape[0]
    cfg = pick_config(d, "dx", x.element_size())
    row_blocks, bank_tiles = triton.cdiv(N, cfg.BLOCK_M), triton.cdiv(K, cfg.BLOCK_K)
    delta = torch.empty(N, device=x.device, dtype=_acc_dtype(x))
    splits, per = _split(bank_tiles, row_blocks * cfg.groups, x.device)  # small N: split the bank
    dx = _partials(splits, x, N)
    _dx_kernel[(row_blocks, cfg.groups, splits)](
        x, D, out, dout, lse, delta, dx, N, K, d, per,
        x.stride(0), D.stride(0), dx.stride(0) * (splits > 1), dx.stride(-2), scale, **_meta(x, cfg))
    cfg = pick_config(d, "dD", x.element_size())
    splits, per = _split(row_blocks, bank_tiles * cfg.groups, x.device)  # large N: split the rows
    dD = _partials(splits, D, K)
    _dD_kernel[(bank_tiles, cfg.groups, splits)](
        x, D, dout, lse, delta, dD, N, K, d, per,
        x.stride(0), D.stride(0), dD.stride(0) * (splits > 1), dD.stride(-2), scale, **_meta(x, cfg))
    return (dx if dx.dim() == 2 else dx.sum(0).to(x.dtype)), (dD if dD.dim() == 2 else dD.sum(0).to(D.dtype))


class BankAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, D, scale):
        out, lse = _forward(x, D, scale)
        ctx.save_for_backward(x, D, out, lse)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, dout):
        x, D, out, lse = ctx.saved_tensors
        dx, dD = _backward(x, D, out, lse, dout.contiguous(), ctx.scale)
        return dx, dD, None


def bank_attention(x: torch.Tensor, bank: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Fused softmax(scale * x bank^T) bank: (N, d), (K, d) -> (N, d); differentiable in x and bank."""
    if x.dim() != 2 or bank.dim() != 2 or x.shape[1] != bank.shape[1]:
        raise ValueError(f"bank_attention expects x (N, d) and bank (K, d) with the same d, "
                         f"got {tuple(x.shape)} and {tuple(bank.shape)}")
    if min(x.shape[0], bank.shape[0], x.shape[1]) < 1:
        raise ValueError(f"bank_attention needs N, K, d >= 1, got x {tuple(x.shape)}, bank {tuple(bank.shape)}")
    if x.device != bank.device:
        raise ValueError(f"x is on {x.device} but bank is on {bank.device}")
    dtype = torch.promote_types(x.dtype, bank.dtype)
    if torch.is_autocast_enabled(x.device.type):  # under autocast: the autocast dtype, as a matmul
        dtype = torch.get_autocast_dtype(x.device.type)
    if dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise TypeError(f"bank_attention supports fp16, bf16, fp32 and fp64, got {dtype}")
    if dtype == torch.float64 and x.is_cuda:  # tensor cores have no use for fp64: stay eager
        return bank_attention_reference(x.to(dtype), bank.to(dtype), scale)
    return BankAttention.apply(x.to(dtype).contiguous(), bank.to(dtype).contiguous(), float(scale))


# ----------------------------------------------------------------------------- check + benchmark

def _check():
    torch.manual_seed(0)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    for dtype, tol in ((torch.float32, 1e-5 if dev == "cpu" else 2e-3), (torch.bfloat16, 1e-2)):
        x = torch.randn(67, 768, device=dev, dtype=dtype, requires_grad=True)
        D = torch.randn(300, 768, device=dev, dtype=dtype, requires_grad=True)
        dO = torch.randn(67, 768, device=dev, dtype=dtype)
        s = 768 ** -0.5
        got = torch.autograd.grad(bank_attention(x, D, s), (x, D), dO, retain_graph=True)
        x64, D64 = x.detach().double().requires_grad_(), D.detach().double().requires_grad_()
        ref = bank_attention_reference(x64, D64, s)
        want = torch.autograd.grad(ref, (x64, D64), dO.double())
        errs = [((a.double() - b).abs().max() / b.abs().max()).item()
                for a, b in zip((bank_attention(x, D, s),) + got, (ref,) + want)]
        status = "ok" if max(errs) <= tol else "FAILED"
        print(f"check {str(dtype):15s} rel err out/dx/dD = " + " / ".join(f"{e:.1e}" for e in errs)
              + f"  (tol {tol:g}) {status}")


if __name__ == "__main__":
    _check()
    if torch.cuda.is_available():
        from kernels import bench
        bench.main(["--op", "bank_attention"])
    else:
        print("timing needs a GPU: the check above ran through the Triton interpreter on the CPU")
