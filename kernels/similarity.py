"""Fused symmetric InfoNCE on cosine logits, and fused cosine scoring (SPEC sections 3 and 8).

    python -m kernels.similarity      # check against the eager reference, then benchmark

Maths, with a, b (N, d) un-normalised embeddings (row i of a is paired with row i of b) and tau:
    n_i = max(||a_i||, eps), a^ = a / n (likewise b^, m_j)      eps = 1e-12, as F.normalize
    S = a^ b^T / tau  (N, N)        Loss = mean_i [lse_j S_ij - S_ii] + mean_j [lse_i S_ij - S_jj]
Backward, for an upstream gradient g, with row / column softmaxes of S:
    G = g / N * (softmax_rows(S) + softmax_cols(S) - 2 I)      (N, N), never stored
    da^ = G b^ / tau,   db^ = G^T a^ / tau
    da = (da^ - a^ (a^ . da^)) / n  (n > eps; else da^ / eps),   and a^ . da^ = sum_j G_ij S_ij,
so the normalisation backward needs one extra scalar per row, not another pass over d.

Why fuse (N = 32768, d = 768, fp32 logits: one (N, N) array is 4.3 GB): eager normalises (two
(N, d) copies), writes S, and each cross-entropy reads S, writes its log-softmax and keeps it for
backward (~4 x 4.3 GB written and read forward, as much again backward, and >= 8.6 GB alive).
The fused loss reads a and b once per tile, holds one 64 x 64 tile of S at a time and writes only
O(N) statistics plus an (N / 64, N) fp32 table of per-row-block column log-sum-exps (67 MB).

Design (Inf-CL / cut-cross-entropy style):
* Forward, one pass: a program owns 64 rows of a and walks all column tiles of b, keeping the row
  log-sum-exp online and writing, for each column, the log-sum-exp over its own 64 rows; a second
  small kernel merges those into the column log-sum-exp. The diagonal S_ii comes from the one tile
  on the diagonal. Norms are computed once by a row kernel (recomputing them per tile would cost
  as much CUDA-core work as the tensor-core dot itself).
* Backward, two launches of one kernel: rows of a against all of b gives da; the same kernel with
  a and b swapped (G becomes G^T, the row and column statistics swap) gives db. Each recomputes S
  tile by tile from the saved statistics; atomics for db would cost (N / 64) * N * d fp32 adds.
* The d-chunked accumulator tuple, the sizing table and the bf16 upcast in the interpreter follow
  kernels/bank_attention.py. Accumulation is fp32 (fp64 for fp64 inputs, used by gradcheck).
"""
import os

import torch
import torch.nn.functional as F

if __name__ == "__main__" and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # no GPU: run the check through the interpreter

import triton
import triton.language as tl

from kernels.bank_attention import BLOCK_D, Config, _tile, _zeros  # shared tile helpers, sizing
from kernels.bank_attention import pick_config as bank_pick_config

EPS = 1e-12  # F.normalize's clamp of the norm
NC_MAX = 12  # widest gradient accumulator (in BLOCK_D chunks) one program keeps


def contrastive_loss_reference(a: torch.Tensor, b: torch.Tensor, tau: float) -> torch.Tensor:
    """Eager CE(S, I) + CE(S^T, I), S = cos(a, b) / tau: materialises the (N, N) logits."""
    logits = F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).t() / tau  # (N, N)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    target = torch.arange(a.shape[0], device=a.device)
    return F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)


def cosine_scores_reference(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Eager (N, d), (C, d) -> (N, C) cosine similarities."""
    return F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).t()


# ----------------------------------------------------------------------------- kernels

@triton.jit
def _norm_kernel(X, NRM,                        # x (N, d) -> max(||x_i||, eps) (N,)
                 N, d, stride_x, eps,
                 BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr, ACC: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    sq = tl.zeros((BLOCK_M,), ACC)
    for c0 in range(0, d, BLOCK_D):
        t = _tile(X, rows, c0 + tl.arange(0, BLOCK_D), N, d, stride_x, UPCAST).to(ACC)
        sq += tl.sum(t * t, 1)
    tl.store(NRM + rows, tl.maximum(tl.sqrt(sq), eps).to(NRM.dtype.element_ty), mask=rows < N)


@triton.jit
def _cos_logits(A, B, NA, NB, rows, cols, N, d, stride_a, stride_b, inv_tau,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                UPCAST: tl.constexpr, ACC: tl.constexpr):
    """S tile = (a[rows] . b[cols]) / (n_rows m_cols) / tau, (BLOCK_M, BLOCK_N), zero outside N."""
    s = tl.zeros((BLOCK_M, BLOCK_N), ACC)
    for c0 in range(0, d, BLOCK_D):
        dc = c0 + tl.arange(0, BLOCK_D)
        bt = _tile(B, cols, dc, N, d, stride_b, UPCAST)
        s += tl.dot(_tile(A, rows, dc, N, d, stride_a, UPCAST), tl.trans(bt), out_dtype=ACC)
    na = tl.load(NA + rows, mask=rows < N, other=1.0)
    nb = tl.load(NB + cols, mask=cols < N, other=1.0)
    return s * ((1.0 / na)[:, None] * (1.0 / nb)[None, :] * inv_tau)


@triton.jit
def _lse_kernel(A, B, NA, NB, LSE_R, LSE_CP, DIAG,   # LSE_CP (N / BLOCK_M, N): column lse per row block
                N, d, stride_a, stride_b, stride_cp, inv_tau,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                UPCAST: tl.constexpr, ACC: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    m_i = tl.full((BLOCK_M,), float("-inf"), ACC)
    l_i = tl.zeros((BLOCK_M,), ACC)
    diag = tl.zeros((BLOCK_M,), ACC)
    for j0 in range(0, N, BLOCK_N):
        cols = j0 + tl.arange(0, BLOCK_N)
        s = _cos_logits(A, B, NA, NB, rows, cols, N, d, stride_a, stride_b, inv_tau,
                        BLOCK_M, BLOCK_N, BLOCK_D, UPCAST, ACC)  # (BLOCK_M, BLOCK_N)
        s_r = tl.where((cols < N)[None, :], s, float("-inf"))  # row statistics: online lse
        m_new = tl.maximum(m_i, tl.max(s_r, 1))
        l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(s_r - m_new[:, None]), 1)
        m_i = m_new
        s_c = tl.where(row_ok[:, None], s, float("-inf"))  # column statistics over these rows
        m_c = tl.max(s_c, 0)
        lse_c = m_c + tl.log(tl.sum(tl.exp(s_c - m_c[None, :]), 0))
        tl.store(LSE_CP + pid * stride_cp + cols, lse_c.to(LSE_CP.dtype.element_ty), mask=cols < N)
        if j0 == pid * BLOCK_M:  # the tile holding S_ii (BLOCK_M == BLOCK_N)
            diag += tl.sum(tl.where(rows[:, None] == cols[None, :], s, 0.0), 1)
    tl.store(LSE_R + rows, (m_i + tl.log(l_i)).to(LSE_R.dtype.element_ty), mask=row_ok)
    tl.store(DIAG + rows, diag.to(DIAG.dtype.element_ty), mask=row_ok)


@triton.jit
def _col_lse_kernel(LSE_CP, LSE_C,              # (N / BLOCK_M, N) -> (N,): log-sum-exp down the columns
                    N, n_blocks, stride_cp,
                    BLOCK: tl.constexpr, ACC: tl.constexpr):
    cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = tl.full((BLOCK,), float("-inf"), ACC)
    l = tl.zeros((BLOCK,), ACC)
    for r in range(0, n_blocks):
        x = tl.load(LSE_CP + r * stride_cp + cols, mask=cols < N, other=0.0)
        m_new = tl.maximum(m, x)
        l = l * tl.exp(m - m_new) + tl.exp(x - m_new)
        m = m_new
    tl.store(LSE_C + cols, (m + tl.log(l)).to(LSE_C.dtype.element_ty), mask=cols < N)


@triton.jit
def _grad_kernel(A, B, NA, NB, LSE_A, LSE_B, GRAD, DA,   # rows of a vs all of b -> dLoss/da (N, d)
                 N, d, stride_a, stride_b, stride_da, inv_tau, inv_n, eps,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                 NC: tl.constexpr, UPCAST: tl.constexpr, ACC: tl.constexpr):
    pid_m, pid_g = tl.program_id(0), tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    g0 = pid_g * NC * BLOCK_D  # first output column of this program's group
    lse_r = tl.load(LSE_A + rows, mask=row_ok, other=0.0)
    coef = tl.load(GRAD).to(ACC) * inv_n  # upstream gradient / N, read on device (no host sync)
    proj = tl.zeros((BLOCK_M,), ACC)  # a^ . da^ = sum_j G_ij S_ij
    acc = _zeros(BLOCK_M, BLOCK_D, NC, ACC)
    for j0 in range(0, N, BLOCK_N):
        cols = j0 + tl.arange(0, BLOCK_N)
        s = _cos_logits(A, B, NA, NB, rows, cols, N, d, stride_a, stride_b, inv_tau,
                        BLOCK_M, BLOCK_N, BLOCK_D, UPCAST, ACC)
        lse_c = tl.load(LSE_B + cols, mask=cols < N, other=0.0)
        p = tl.exp(s - lse_r[:, None]) + tl.exp(s - lse_c[None, :])  # both softmaxes
        p = p - 2.0 * (rows[:, None] == cols[None, :]).to(ACC)
        g = tl.where(row_ok[:, None] & (cols < N)[None, :], p * coef, 0.0)  # G tile
        proj += tl.sum(g * s, 1)
        nb = tl.load(NB + cols, mask=cols < N, other=1.0)
        w = g * ((1.0 / nb) * inv_tau)[None, :]  # so that w @ b = G b^ / tau
        new = ()
        for c in tl.static_range(NC):
            bt = _tile(B, cols, g0 + c * BLOCK_D + tl.arange(0, BLOCK_D), N, d, stride_b, UPCAST)
            new = new + (acc[c] + tl.dot(w.to(bt.dtype), bt, out_dtype=ACC),)
        acc = new
    na = tl.load(NA + rows, mask=row_ok, other=1.0)
    keep = tl.where(na > eps, proj / na, 0.0)  # projection removed only where the norm was not clamped
    for c in tl.static_range(NC):
        dc = g0 + c * BLOCK_D + tl.arange(0, BLOCK_D)
        at = _tile(A, rows, dc, N, d, stride_a, UPCAST).to(ACC)
        da = (acc[c] - at * keep[:, None]) / na[:, None]
        tl.store(DA + rows[:, None] * stride_da + dc[None, :], da.to(DA.dtype.element_ty),
                 mask=row_ok[:, None] & (dc < d)[None, :])


@triton.jit
def _cosine_kernel(A, B, NA, NB, O,             # a (N, d), b (C, d) -> cos (N, C)
                   N, C, d, stride_a, stride_b, stride_o,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                   UPCAST: tl.constexpr, ACC: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    s = tl.zeros((BLOCK_M, BLOCK_N), ACC)
    for c0 in range(0, d, BLOCK_D):
        dc = c0 + tl.arange(0, BLOCK_D)
        bt = _tile(B, cols, dc, C, d, stride_b, UPCAST)
        s += tl.dot(_tile(A, rows, dc, N, d, stride_a, UPCAST), tl.trans(bt), out_dtype=ACC)
    na = tl.load(NA + rows, mask=rows < N, other=1.0)
    nb = tl.load(NB + cols, mask=cols < C, other=1.0)
    s = s / na[:, None] / nb[None, :]
    tl.store(O + rows[:, None] * stride_o + cols[None, :], s.to(O.dtype.element_ty),
             mask=(rows < N)[:, None] & (cols < C)[None, :])


# ----------------------------------------------------------------------------- launchers

def pick_config(d: int, itemsize: int = 2) -> Config:
    """Launch configuration of the gradient kernel (sized like bank_attention's dx kernel)."""
    return bank_pick_config(d, itemsize=itemsize, nc_max=NC_MAX)


def _meta(x: torch.Tensor) -> dict:
    upcast = os.environ.get("TRITON_INTERPRET") == "1" and x.dtype == torch.bfloat16
    return dict(UPCAST=upcast, ACC=tl.float64 if x.dtype == torch.float64 else tl.float32)


def _norms(x: torch.Tensor) -> torch.Tensor:
    """max(||x_i||, eps) in the accumulator dtype, (N,)."""
    n = torch.empty(x.shape[0], device=x.device, dtype=_acc_dtype(x))
    _norm_kernel[(triton.cdiv(x.shape[0], 64),)](x, n, x.shape[0], x.shape[1], x.stride(0), EPS,
                                                 BLOCK_M=64, BLOCK_D=BLOCK_D, **_meta(x), num_warps=4)
    return n


def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _loss_forward(a, b, tau):
    """a, b (N, d) contiguous, one dtype -> loss (0-dim), and what backward needs."""
    N, d = a.shape
    na, nb = _norms(a), _norms(b)
    blocks = triton.cdiv(N, 64)
    lse_r, diag = (torch.empty(N, device=a.device, dtype=na.dtype) for _ in range(2))
    lse_cp = torch.empty(blocks, N, device=a.device, dtype=na.dtype)  # (N / 64, N)
    _lse_kernel[(blocks,)](a, b, na, nb, lse_r, lse_cp, diag, N, d, a.stride(0), b.stride(0),
                           lse_cp.stride(0), 1.0 / tau, BLOCK_M=64, BLOCK_N=64, BLOCK_D=BLOCK_D,
                           **_meta(a), num_warps=4, num_stages=2)
    lse_c = torch.empty_like(lse_r)
    _col_lse_kernel[(triton.cdiv(N, 256),)](lse_cp, lse_c, N, blocks, lse_cp.stride(0),
                                            BLOCK=256, ACC=_meta(a)["ACC"], num_warps=4)
    loss = ((lse_r - diag).sum() + (lse_c - diag).sum()) / N
    return loss, (na, nb, lse_r, lse_c)


def _grad(a, b, na, nb, lse_a, lse_b, grad, tau):
    """dLoss/da for rows of a against all of b; called with (b, a, ...) it gives dLoss/db."""
    N, d = a.shape
    cfg = pick_config(d, a.element_size())
    da = torch.empty_like(a)
    _grad_kernel[(triton.cdiv(N, cfg.BLOCK_M), cfg.groups)](
        a, b, na, nb, lse_a, lse_b, grad, da, N, d, a.stride(0), b.stride(0), da.stride(0),
        1.0 / tau, 1.0 / N, EPS, BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_K, BLOCK_D=cfg.BLOCK_D,
        NC=cfg.NC, **_meta(a), num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return da


class ContrastiveLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, tau):
        loss, stats = _loss_forward(a, b, tau)
        ctx.save_for_backward(a, b, *stats)
        ctx.tau = tau
        return loss

    @staticmethod
    def backward(ctx, grad):
        a, b, na, nb, lse_r, lse_c = ctx.saved_tensors
        grad = grad.to(na.dtype).contiguous()
        da = _grad(a, b, na, nb, lse_r, lse_c, grad, ctx.tau)
        db = _grad(b, a, nb, na, lse_c, lse_r, grad, ctx.tau)  # swapped: G -> G^T
        return da, db, None


def _prepare(a: torch.Tensor, b: torch.Tensor, name: str, same_rows: bool):
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1] or (same_rows and a.shape[0] != b.shape[0]):
        want = "a and b both (N, d)" if same_rows else "a (N, d) and b (C, d)"
        raise ValueError(f"{name} expects {want}, got {tuple(a.shape)} and {tuple(b.shape)}")
    if min(a.shape[0], b.shape[0], a.shape[1]) < 1 or a.device != b.device:
        raise ValueError(f"{name} needs non-empty inputs on one device, got {tuple(a.shape)} on {a.device}, "
                         f"{tuple(b.shape)} on {b.device}")
    dtype = torch.promote_types(a.dtype, b.dtype)
    if dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise TypeError(f"{name} supports fp16, bf16, fp32 and fp64, got {dtype}")
    return a.to(dtype).contiguous(), b.to(dtype).contiguous()


def contrastive_loss(a: torch.Tensor, b: torch.Tensor, tau: float) -> torch.Tensor:
    """Fused CE(S, I) + CE(S^T, I), S = cos(a, b) / tau, for un-normalised a, b (N, d) -> fp32 scalar."""
    a, b = _prepare(a, b, "contrastive_loss", same_rows=True)
    if a.dtype == torch.float64 and a.is_cuda:  # tensor cores have no use for fp64: stay eager
        return contrastive_loss_reference(a, b, tau)
    return ContrastiveLoss.apply(a, b, float(tau))


@torch.no_grad()
def cosine_scores(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Fused cosine similarity (N, d), (C, d) -> (N, C) in the input dtype (forward only)."""
    a, b = _prepare(a, b, "cosine_scores", same_rows=False)
    if a.dtype == torch.float64 and a.is_cuda:
        return cosine_scores_reference(a, b)
    (N, d), C = a.shape, b.shape[0]
    out = torch.empty(N, C, device=a.device, dtype=a.dtype)
    _cosine_kernel[(triton.cdiv(N, 64), triton.cdiv(C, 64))](
        a, b, _norms(a), _norms(b), out, N, C, d, a.stride(0), b.stride(0), out.stride(0),
        BLOCK_M=64, BLOCK_N=64, BLOCK_D=BLOCK_D, **_meta(a), num_warps=4, num_stages=2)
    return out


# ----------------------------------------------------------------------------- check + benchmark

def _check():
    torch.manual_seed(0)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    for dtype, tol in ((torch.float32, 1e-5 if dev == "cpu" else 2e-3), (torch.bfloat16, 1e-2)):
        a = torch.randn(131, 768, device=dev, dtype=dtype, requires_grad=True)
        b = torch.randn(131, 768, device=dev, dtype=dtype, requires_grad=True)
        loss = contrastive_loss(a, b, 0.1)
        got = (loss,) + torch.autograd.grad(loss, (a, b)) + (cosine_scores(a, b[:19]),)
        a64, b64 = a.detach().double().requires_grad_(), b.detach().double().requires_grad_()
        ref = contrastive_loss_reference(a64, b64, 0.1)
        want = (ref,) + torch.autograd.grad(ref, (a64, b64)) + (cosine_scores_reference(a64, b64[:19]),)
        errs = [((g.double() - w).abs().max() / w.abs().max()).item() for g, w in zip(got, want)]
        status = "ok" if max(errs) <= tol else "FAILED"
        print(f"check {str(dtype):15s} rel err loss/da/db/cos = " + " / ".join(f"{e:.1e}" for e in errs)
              + f"  (tol {tol:g}) {status}")


if __name__ == "__main__":
    _check()
    print("timings: python -m kernels.bench --op contrastive_loss")
