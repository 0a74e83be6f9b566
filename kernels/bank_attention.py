"""Fused knowledge-bank attention (CMKI, SPEC sections 3 and 8): x_hat = softmax(s * x D^T) D.

    python -m kernels.bank_attention      # check against the eager reference, then benchmark

Maths, with x (N, d) the embeddings, D (K, d) the bank and s the logit scale (1, or 1/sqrt(d)):
    S = s * x D^T  (N, K)     P = softmax(S) over the K entries     x_hat = P D  (N, d)
The forward keeps only the row max m and row sum l = sum_j exp(S_ij - m_i) (N each). Backward, with
dO = dLoss/dx_hat:
    dP = dO D^T,   delta = rowsum(dO * x_hat) = rowsum(P * dP),   dS = P * (dP - delta)
    dx = s * dS D,   dD = P^T dO + s * dS^T x      (D is both key and value: both roles add into dD)

Why fuse (bf16, N = 65536, K = 2048, d = 768: an (N, K) array is 268 MB, an (N, d) one 101 MB):
eager writes S, softmax reads it and writes P, P D reads P, and P stays alive for backward (~1.3 GB
moved); its backward writes dP, reads P and dP, writes dS, reads dS twice and P once (~2.3 GB). The
fused forward reads x and D and writes x_hat, m, l (~0.2 GB); the backward reads x, dO, x_hat, D, m, l
and writes dx, dD (~0.8 GB); no (N, K) array exists, so memory is O(N d + K d). The price is
recomputation: in GEMM units of 2NKd eager does 2 forward + 4 backward, the fused kernels 2 forward,
3 for dx and 4 for dD (6 at d = 768, where dD runs as two column groups).

Design (H100 first; every path also runs through Triton's CPU interpreter):
* Forward is FlashAttention-style: a program owns BLOCK_M rows of x and walks the bank in BLOCK_K
  tiles with an online softmax (max subtracted before every exp). Each tile of D is fetched from
  memory once per program and serves as key (logits) and value (P D); the value product re-reads its
  d-chunks from L1/L2, as a whole BLOCK_K x d tile would not fit in registers beside the accumulator.
* d up to 1024 is too wide for one tile: the logits are summed over BLOCK_D = 64 wide chunks and the
  output accumulator is a tuple of NC fp32 (BLOCK_M, BLOCK_D) chunks. Beyond NC_MAX chunks the output
  columns are split over `groups` programs that each recompute the logits (a two-pass scheme would
  always pay that; a global-memory accumulator would move d * 4 bytes per row per bank tile). NC_MAX
  comes from the sm_90 register report of tests/test_kernels_aot.py: 12 chunks (d = 768 in one pass)
  spill < 80 bytes in the forward and dx kernels; dD, holding two products, stops at 8.
* Small N (the paper's batch of 64 is one row block) would leave most SMs idle: the bank is split
  over SPLIT programs (flash-decoding), each writing a normalised partial output with its m and l,
  merged by _combine_kernel with weights l_s exp(m_s - m).
* Backward: two kernels, no atomics. _dx_kernel over row blocks walks the bank (and writes delta);
  _dD_kernel over bank tiles walks the rows; both recompute P = exp(S - m) / l. Atomics for dD from
  every row block would be (N / BLOCK_M) * K * d fp32 adds (6.4 G at N = 65536). Small N splits dx
  over the bank, large N splits dD over the rows; fp32 partials are summed afterwards. m and l are
  saved apart because a log-sum-exp rounded to fp32 is off by up to 3e-5 at |S| ~ 1e3, an error
  every recomputed P would inherit.
* Accumulation is fp32 (fp64 for fp64 inputs, for gradcheck). The interpreter multiplies bf16 as raw
  integer bits, so when interpreting, bf16 tiles are upcast to fp32 right after loading (UPCAST).
  On the GPU an fp32 tl.dot runs as TF32, and fp64 inputs take the eager path.
"""
import os
from typing import NamedTuple

import torch

if __name__ == "__main__" and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # no GPU: run the check through the interpreter

import triton
import triton.language as tl

BLOCK_D = 64  # d-chunk width (four 16-deep bf16 MMA steps); narrower d is masked
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
def _zeros(ROWS: tl.constexpr, BLOCK_D: tl.constexpr, NC: tl.constexpr, ACC: tl.constexpr):
    """NC chunk accumulators of (ROWS, BLOCK_D): the output columns one program owns."""
    acc = ()
    for c in tl.static_range(NC):
        acc = acc + (tl.zeros((ROWS, BLOCK_D), ACC),)
    return acc


@triton.jit
def _store(ptr, acc, f, rows, n_rows, g0, d, stride, BLOCK_D: tl.constexpr, NC: tl.constexpr):
    """ptr[rows, g0 + c * BLOCK_D + j] = f[rows] * acc[c][:, j] for every chunk c, masked."""
    for c in tl.static_range(NC):
        dc = g0 + c * BLOCK_D + tl.arange(0, BLOCK_D)
        mask = (rows < n_rows)[:, None] & (dc < d)[None, :]
        val = (acc[c] * f[:, None]).to(ptr.dtype.element_ty)
        tl.store(ptr + rows[:, None] * stride + dc[None, :], val, mask=mask)


@triton.jit
def _fwd_kernel(X, D, O, ML,                     # x (N, d), D (K, d) -> out (SPLIT, N, d), m|l (SPLIT, 2, N)
                N, K, d, tiles_per_split,
                stride_x, stride_d, stride_os, stride_o, stride_ms,
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
    acc = _zeros(BLOCK_M, BLOCK_D, NC, ACC)
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
    _store(O + pid_s * stride_os, acc, 1.0 / l_i, rows, N, g0, d, stride_o, BLOCK_D, NC)
    first = (rows < N) & (pid_g == 0)  # every group computed the same statistics
    tl.store(ML + pid_s * stride_ms + rows, m_i.to(ML.dtype.element_ty), mask=first)
    tl.store(ML + pid_s * stride_ms + N + rows, l_i.to(ML.dtype.element_ty), mask=first)


@triton.jit
def _combine_kernel(OP, MLP, O, ML,             # partials (SPLIT, N, d), (SPLIT, 2, N) -> (N, d), (2, N)
                    N, d, n_split,
                    stride_ps, stride_p, stride_ms, stride_o,
                    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    dc = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_ok = rows < N
    m, l = tl.full((BLOCK_M,), float("-inf"), ACC), tl.zeros((BLOCK_M,), ACC)
    acc = tl.zeros((BLOCK_M, BLOCK_D), ACC)
    for sp in range(0, n_split):  # online merge: split sp holds sum exp(S - m_s) = l_s
        m_s = tl.load(MLP + sp * stride_ms + rows, mask=row_ok, other=0.0)
        l_s = tl.load(MLP + sp * stride_ms + N + rows, mask=row_ok, other=1.0)
        o_s = _tile(OP + sp * stride_ps, rows, dc, N, d, stride_p, False)
        m_new = tl.maximum(m, m_s)
        alpha = tl.exp(m - m_new)
        w = l_s * tl.exp(m_s - m_new)
        acc = acc * alpha[:, None] + w[:, None] * o_s
        l = l * alpha + w
        m = m_new
    _store(O, (acc,), 1.0 / l, rows, N, tl.program_id(1) * BLOCK_D, d, stride_o, BLOCK_D, 1)
    first = row_ok & (tl.program_id(1) == 0)
    tl.store(ML + rows, m.to(ML.dtype.element_ty), mask=first)
    tl.store(ML + N + rows, l.to(ML.dtype.element_ty), mask=first)


@triton.jit
def _dx_kernel(X, D, O, DO, ML, DELTA, DX,      # DX (SPLIT, N, d); DELTA (N,) is written here
               N, K, d, tiles_per_split,
               stride_x, stride_d, stride_dxs, stride_dx,
               scale,
               BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
               NC: tl.constexpr, UPCAST: tl.constexpr, ACC: tl.constexpr):
    pid_m, pid_g, pid_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    # delta = rowsum(dO * x_hat) as the diagonal of dO x_hat^T: summed by tl.dot in the order dP is,
    # so that dP - delta is exactly 0 where P is one-hot (cheap: once per row block, not per tile)
    dd = tl.zeros((BLOCK_M, BLOCK_M), ACC)
    for c0 in range(0, d, BLOCK_D):
        dc = c0 + tl.arange(0, BLOCK_D)
        o = _tile(O, rows, dc, N, d, stride_x, UPCAST)
        dd += tl.dot(_tile(DO, rows, dc, N, d, stride_x, UPCAST), tl.trans(o), out_dtype=ACC)
    delta = tl.sum(tl.where(rows[:, None] == rows[None, :], dd, 0.0), 1)
    tl.store(DELTA + rows, delta.to(DELTA.dtype.element_ty), mask=row_ok & (pid_g + pid_s == 0))
    m_i = tl.load(ML + rows, mask=row_ok, other=0.0)
    inv_l = 1.0 / tl.load(ML + N + rows, mask=row_ok, other=1.0)
    k_lo = pid_s * tiles_per_split * BLOCK_K
    k_hi = tl.minimum(K, k_lo + tiles_per_split * BLOCK_K)
    g0 = pid_g * NC * BLOCK_D
    acc = _zeros(BLOCK_M, BLOCK_D, NC, ACC)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        s, dp = _logits(X, DO, D, rows, cols, N, K, d, stride_x, stride_d,
                        BLOCK_M, BLOCK_K, BLOCK_D, True, UPCAST, ACC)
        p = tl.exp(s * scale - m_i[:, None]) * inv_l[:, None]  # P recomputed as in the forward
        p = tl.where((cols < K)[None, :], p, 0.0)
        ds = p * (dp - delta[:, None])  # (BLOCK_M, BLOCK_K)
        new = ()
        for c in tl.static_range(NC):
            v = _tile(D, cols, g0 + c * BLOCK_D + tl.arange(0, BLOCK_D), K, d, stride_d, UPCAST)
            new = new + (acc[c] + tl.dot(ds.to(v.dtype), v, out_dtype=ACC),)
        acc = new
    f = tl.full((BLOCK_M,), scale, ACC)
    _store(DX + pid_s * stride_dxs, acc, f, rows, N, g0, d, stride_dx, BLOCK_D, NC)


@triton.jit
def _dD_kernel(X, D, DO, ML, DELTA, DD,         # DD (SPLIT, K, d)
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
    acc = _zeros(BLOCK_K, BLOCK_D, NC, ACC)
    for i0 in range(n_lo, n_hi, BLOCK_M):
        rows = i0 + tl.arange(0, BLOCK_M)
        row_ok = rows < N
        s, dp = _logits(X, DO, D, rows, cols, N, K, d, stride_x, stride_d,
                        BLOCK_M, BLOCK_K, BLOCK_D, True, UPCAST, ACC)
        m_i = tl.load(ML + rows, mask=row_ok, other=0.0)
        l_i = tl.load(ML + N + rows, mask=row_ok, other=1.0)
        delta = tl.load(DELTA + rows, mask=row_ok, other=0.0)
        p = tl.exp(s * scale - m_i[:, None]) / l_i[:, None]  # (BLOCK_M, BLOCK_K)
        p = tl.where(row_ok[:, None] & (cols < K)[None, :], p, 0.0)
        ds = p * (dp - delta[:, None]) * scale
        new = ()
        for c in tl.static_range(NC):
            dc = g0 + c * BLOCK_D + tl.arange(0, BLOCK_D)
            do = _tile(DO, rows, dc, N, d, stride_x, UPCAST)  # value role: P^T dO
            xc = _tile(X, rows, dc, N, d, stride_x, UPCAST)  # key role: s dS^T x
            acc_c = acc[c] + tl.dot(tl.trans(p).to(do.dtype), do, out_dtype=ACC)
            new = new + (acc_c + tl.dot(tl.trans(ds).to(xc.dtype), xc, out_dtype=ACC),)
        acc = new
    f = tl.full((BLOCK_K,), 1.0, ACC)
    _store(DD + pid_s * stride_dds, acc, f, cols, K, g0, d, stride_dd, BLOCK_D, NC)


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
    """Launch configuration for width d: 64-wide tiles (H100 tensor cores; tl.dot needs >= 16), and
    half the accumulator chunks for fp32, whose tiles take twice the registers."""
    chunks = triton.cdiv(d, BLOCK_D)
    nc_max = max(1, (nc_max or NC_MAX[kernel]) // (2 if itemsize > 2 else 1))
    nc = min(c for c in NC_CHOICES if c >= triton.cdiv(chunks, triton.cdiv(chunks, nc_max)))
    return Config(64, 64, BLOCK_D, nc, triton.cdiv(chunks, nc), 4 if nc == 1 else 8, 2)


def _split(n_tiles: int, programs: int, device: torch.device) -> tuple[int, int]:
    """Split n_tiles of work over enough programs to fill the GPU -> (splits, tiles per split)."""
    gpu = device.type == "cuda"
    sms = torch.cuda.get_device_properties(device).multi_processor_count if gpu else H100_SMS
    splits = 1 if programs >= sms else min(n_tiles, triton.cdiv(sms, programs))
    per = triton.cdiv(n_tiles, splits)
    return triton.cdiv(n_tiles, per), per


def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    """Accumulator and statistics dtype: fp64 for fp64 inputs (gradcheck), else fp32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _meta(x: torch.Tensor, cfg: Config) -> dict:
    """Constexprs and launch options shared by the three main kernels."""
    upcast = os.environ.get("TRITON_INTERPRET") == "1" and x.dtype == torch.bfloat16
    acc = tl.float64 if x.dtype == torch.float64 else tl.float32
    return dict(BLOCK_M=cfg.BLOCK_M, BLOCK_K=cfg.BLOCK_K, BLOCK_D=cfg.BLOCK_D, NC=cfg.NC, UPCAST=upcast,
                ACC=acc, num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def _partials(splits: int, like: torch.Tensor, rows: int) -> torch.Tensor:
    """The output itself when there is one split, else (splits, rows, d) accumulator-dtype partials."""
    if splits == 1:
        return torch.empty(rows, like.shape[1], device=like.device, dtype=like.dtype)
    return torch.empty(splits, rows, like.shape[1], device=like.device, dtype=_acc_dtype(like))


def _forward(x: torch.Tensor, D: torch.Tensor, scale: float):
    """x (N, d), D (K, d), both contiguous and of one dtype -> x_hat (N, d), row max|sum (2, N)."""
    (N, d), K = x.shape, D.shape[0]
    cfg = pick_config(d, "fwd", x.element_size())
    row_blocks = triton.cdiv(N, cfg.BLOCK_M)
    splits, per = _split(triton.cdiv(K, cfg.BLOCK_K), row_blocks * cfg.groups, x.device)
    o = _partials(splits, x, N)  # (N, d) or (SPLIT, N, d)
    ml = torch.empty(splits, 2, N, device=x.device, dtype=_acc_dtype(x))  # row max m, sum l
    _fwd_kernel[(row_blocks, cfg.groups, splits)](
        x, D, o, ml, N, K, d, per,
        x.stride(0), D.stride(0), o.stride(0) * (splits > 1), o.stride(-2), ml.stride(0),
        scale, **_meta(x, cfg))
    if splits == 1:
        return o, ml[0]
    out, ml_out = torch.empty_like(x), torch.empty(2, N, device=x.device, dtype=ml.dtype)
    _combine_kernel[(row_blocks, triton.cdiv(d, 128))](
        o, ml, out, ml_out, N, d, splits, o.stride(0), o.stride(1), ml.stride(0), out.stride(0),
        BLOCK_M=64, BLOCK_D=128, ACC=_meta(x, cfg)["ACC"], num_warps=4)
    return out, ml_out


def _backward(x, D, out, ml, dout, scale):
    """Saved tensors and dO (N, d) -> dx (N, d), dD (K, d)."""
    (N, d), K = x.shape, D.shape[0]
    cfg = pick_config(d, "dx", x.element_size())
    row_blocks, bank_tiles = triton.cdiv(N, cfg.BLOCK_M), triton.cdiv(K, cfg.BLOCK_K)
    delta = torch.empty(N, device=x.device, dtype=_acc_dtype(x))
    splits, per = _split(bank_tiles, row_blocks * cfg.groups, x.device)  # small N: split the bank
    dx = _partials(splits, x, N)
    _dx_kernel[(row_blocks, cfg.groups, splits)](
        x, D, out, dout, ml, delta, dx, N, K, d, per,
        x.stride(0), D.stride(0), dx.stride(0) * (splits > 1), dx.stride(-2), scale, **_meta(x, cfg))
    cfg = pick_config(d, "dD", x.element_size())
    splits, per = _split(row_blocks, bank_tiles * cfg.groups, x.device)  # large N: split the rows
    dD = _partials(splits, D, K)
    _dD_kernel[(bank_tiles, cfg.groups, splits)](
        x, D, dout, ml, delta, dD, N, K, d, per,
        x.stride(0), D.stride(0), dD.stride(0) * (splits > 1), dD.stride(-2), scale, **_meta(x, cfg))
    dx = dx if dx.dim() == 2 else dx.sum(0).to(x.dtype)  # sum the fp32 partials of the splits
    return dx, (dD if dD.dim() == 2 else dD.sum(0).to(D.dtype))


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
    dtype = torch.promote_types(x.dtype, bank.dtype)
    if x.device.type != "meta" and torch.is_autocast_enabled(x.device.type):  # under autocast: the autocast dtype, as a matmul
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
    _check()
    if torch.cuda.is_available():
        from kernels import bench
        bench.main(["--op", "bank_attention"])
    else:
        print("timing needs a GPU: the check above ran through the Triton interpreter on the CPU")
