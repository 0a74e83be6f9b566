"""Fused symmetric InfoNCE on cosine logits (the L_INFO and L_INFO-R terms of BrgSA, arXiv 2501.03565,
section 3; the maths of cmki.info_nce_reference), and fused cosine scoring for zero-shot diagnosis.

    python -m kernels.similarity            # check against float64 (interpreter without a GPU)
    python -m kernels.similarity --tol 0    # any error fails: exit status 1

Maths, with a, b (N, d) un-normalised embeddings (row i of a is paired with row i of b) and tau:
    n_i = max(||a_i||, eps), a^ = a / n (likewise b^, m_j)      eps = 1e-12, as F.normalize
    S = a^ b^T / tau  (N, N)        Loss = mean_i [lse_j S_ij - S_ii] + mean_j [lse_i S_ij - S_jj]
Backward, for an upstream gradient g, with row / column softmaxes of S:
    H = softmax_rows(S) + softmax_cols(S) - 2 I    (N, N)      G = g / N * H
    da^ = G b^ / tau,   db^ = G^T a^ / tau
    da = (da^ - a^ (a^ . da^)) / n  (n > eps; else da^ / eps)        (F.normalize's backward)

Why fuse (N = 32768, d = 768, fp32 logits: one (N, N) array is 4.3 GB): eager normalises (two
(N, d) copies), writes S, and each cross-entropy reads S, writes its log-softmax and keeps it for
backward (~4 x 4.3 GB written and read forward, as much again backward, and >= 8.6 GB alive).

Design (Inf-CL / cut-cross-entropy style; FLOPs in units of one N x N x d GEMM, eager does 3):
* Forward, one pass (1 unit): a program holds BLOCK_M rows of a (by default 128 at d = 768 in 16
  bits, 32 in fp32) for the whole walk over the column tiles of b, so b is read N / BLOCK_M times; it keeps the
  row log-sum-exp online and writes, for each column, the log-sum-exp over its own rows;
  _col_lse_kernel merges those into the column log-sum-exp. The diagonal S_ii comes from the tiles
  that cross the diagonal. Norms are computed once by a row kernel.
* Backward in row chunks (3 units): _h_kernel recomputes S for a chunk of rows (held) against all
  columns and writes H in the input dtype into a chunk buffer (never the whole N x N); two GEMMs give
  da^ = H b^ and db^ += H^T a^ (fp32 sum over chunks). Row kernels make a^, b^ and apply the
  normalisation backward (one read of x and dL/dx^ per pass, O(N d)).
  A fused kernel holding a (64, d) fp32 gradient accumulator would recompute S once per gradient
  (4 units for da and db, 5 with the forward) and exceed the register file at d = 768.
* Tile helpers come from kernels/tiles.py. Accumulation is fp32 (fp64 for fp64 inputs, gradcheck).
  A GPU runs fp32 tl.dot as TF32 (10-bit mantissas), so fp32 is held there to TOL_TF32, sized by the
  interpreter emulating TF32 (--tf32). Tiles, warps and stages of the two logit kernels: the first
  candidate of kernels/tuning.py's list, or on a GPU the fastest, timed at first use.
"""
import os
import sys

import torch
import torch.nn.functional as F

if __name__ == "__main__" and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # no GPU: run the check through the interpreter

import triton
import triton.language as tl

from kernels.tiles import acc_dtype, cdiv, check_int32, chunking, chunks, constexprs, prepare_inputs, sm_count, tile
from kernels.tuning import candidates, choose, meta, shape_class

EPS = 1e-12  # F.normalize's clamp of the norm
BUFFER_BYTES = 512 * 2 ** 20  # backward chunk buffer (H for a block of rows)
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}  # relative to float64; fp32 on a GPU: TOL_TF32
TOL_TF32 = 2e-3  # emulated TF32 (--tf32): up to 7.8e-4, the cosine scores at d = 768


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
        t = tile(X, rows, c0 + tl.arange(0, BLOCK_D), N, d, stride_x, UPCAST).to(ACC)
        sq += tl.sum(t * t, 1)
    tl.store(NRM + rows, tl.maximum(tl.sqrt(sq), eps).to(NRM.dtype.element_ty), mask=rows < N)


@triton.jit
def _scale_kernel(X, NRM, OUT,                  # x (N, d), n (N,) -> x / n (N, d) in OUT's dtype
                  N, d, stride_x, stride_o,
                  BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr, ACC: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    inv = 1.0 / tl.load(NRM + rows, mask=rows < N, other=1.0)
    for c0 in range(0, d, BLOCK_D):
        cols = c0 + tl.arange(0, BLOCK_D)
        t = tile(X, rows, cols, N, d, stride_x, UPCAST).to(ACC) * inv[:, None]
        tl.store(OUT + rows[:, None] * stride_o + cols[None, :], t.to(OUT.dtype.element_ty),
                 mask=(rows < N)[:, None] & (cols < d)[None, :])


@triton.jit
def _unit_grad_kernel(X, NRM, DXH, COEF, DX,    # F.normalize's backward for dL/dx^ = coef * dxh
                      N, d, stride_x, stride_g, stride_o, eps,
                      BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr, ACC: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    n = tl.load(NRM + rows, mask=rows < N, other=1.0)
    coef = tl.load(COEF).to(ACC)
    proj = tl.zeros((BLOCK_M,), ACC)  # x^ . dxh, over the whole row first
    for c0 in range(0, d, BLOCK_D):
        cols = c0 + tl.arange(0, BLOCK_D)
        x = tile(X, rows, cols, N, d, stride_x, UPCAST).to(ACC)
        g = tile(DXH, rows, cols, N, d, stride_g, UPCAST).to(ACC)
        proj += tl.sum(x * g, 1)
    proj = tl.where(n > eps, proj / n, 0.0)  # removed only where the norm was not clamped
    for c0 in range(0, d, BLOCK_D):
        cols = c0 + tl.arange(0, BLOCK_D)
        x = tile(X, rows, cols, N, d, stride_x, UPCAST).to(ACC)
        g = tile(DXH, rows, cols, N, d, stride_g, UPCAST).to(ACC)
        dx = coef * (g - x / n[:, None] * proj[:, None]) / n[:, None]
        tl.store(DX + rows[:, None] * stride_o + cols[None, :], dx.to(DX.dtype.element_ty),
                 mask=(rows < N)[:, None] & (cols < d)[None, :])


@triton.jit
def _cos_logits(As, B, NA, NB, rows, cols, N, d, stride_b, inv_tau,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, NC: tl.constexpr,
                UPCAST: tl.constexpr, ACC: tl.constexpr):
    """S tile = (a[rows] . b[cols]) / (n_rows m_cols) / tau, (BLOCK_M, BLOCK_N); As holds a[rows]."""
    s = tl.zeros((BLOCK_M, BLOCK_N), ACC)
    for c in tl.static_range(NC):
        bt = tile(B, cols, c * BLOCK_D + tl.arange(0, BLOCK_D), N, d, stride_b, UPCAST)
        s += tl.dot(As[c], tl.trans(bt), out_dtype=ACC)
    na = tl.load(NA + rows, mask=rows < N, other=1.0)
    nb = tl.load(NB + cols, mask=cols < N, other=1.0)
    return s * ((1.0 / na)[:, None] * (1.0 / nb)[None, :] * inv_tau)


@triton.jit
def _lse_kernel(A, B, NA, NB, LSE_R, LSE_CP, DIAG,   # LSE_CP (N / BLOCK_M, N): column lse per row block
                N, d, stride_a, stride_b, stride_cp, inv_tau,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, NC: tl.constexpr,
                UPCAST: tl.constexpr, ACC: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    As = chunks(A, rows, N, d, stride_a, BLOCK_D, NC, UPCAST)  # held for the whole walk
    m_i = tl.full((BLOCK_M,), float("-inf"), ACC)
    l_i = tl.zeros((BLOCK_M,), ACC)
    diag = tl.zeros((BLOCK_M,), ACC)
    for j0 in range(0, N, BLOCK_N):
        cols = j0 + tl.arange(0, BLOCK_N)
        s = _cos_logits(As, B, NA, NB, rows, cols, N, d, stride_b, inv_tau,
                        BLOCK_M, BLOCK_N, BLOCK_D, NC, UPCAST, ACC)  # (BLOCK_M, BLOCK_N)
        s_r = tl.where((cols < N)[None, :], s, float("-inf"))  # row statistics: online lse
        m_new = tl.maximum(m_i, tl.max(s_r, 1))
        l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(s_r - m_new[:, None]), 1)
        m_i = m_new
        s_c = tl.where(row_ok[:, None], s, float("-inf"))  # column statistics over these rows
        m_c = tl.max(s_c, 0)
        lse_c = m_c + tl.log(tl.sum(tl.exp(s_c - m_c[None, :]), 0))
        tl.store(LSE_CP + pid * stride_cp + cols, lse_c.to(LSE_CP.dtype.element_ty), mask=cols < N)
        if (j0 < pid * BLOCK_M + BLOCK_M) & (j0 + BLOCK_N > pid * BLOCK_M):  # a tile holding some S_ii
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
def _h_kernel(A, B, NA, NB, LSE_R, LSE_C, H,    # rows r0 .. r0 + n_rows of a vs all of b -> H (n_rows, N)
              N, d, r0, n_rows, stride_a, stride_b, stride_h, inv_tau,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, NC: tl.constexpr,
              UPCAST: tl.constexpr, ACC: tl.constexpr):
    local = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = r0 + local
    row_ok = local < n_rows
    As = chunks(A, rows, r0 + n_rows, d, stride_a, BLOCK_D, NC, UPCAST)  # held for the whole walk
    lse_r = tl.load(LSE_R + rows, mask=row_ok, other=0.0)
    j_lo = tl.program_id(1) * BLOCK_N
    for j0 in range(j_lo, N, tl.num_programs(1) * BLOCK_N):
        cols = j0 + tl.arange(0, BLOCK_N)
        s = _cos_logits(As, B, NA, NB, rows, cols, N, d, stride_b, inv_tau,
                        BLOCK_M, BLOCK_N, BLOCK_D, NC, UPCAST, ACC)
        lse_c = tl.load(LSE_C + cols, mask=cols < N, other=0.0)
        h = tl.exp(s - lse_r[:, None]) + tl.exp(s - lse_c[None, :])  # both softmaxes
        h = h - 2.0 * (rows[:, None] == cols[None, :]).to(ACC)
        tl.store(H + local[:, None] * stride_h + cols[None, :], h.to(H.dtype.element_ty),
                 mask=row_ok[:, None] & (cols < N)[None, :])


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
        bt = tile(B, cols, dc, C, d, stride_b, UPCAST)
        s += tl.dot(tile(A, rows, dc, N, d, stride_a, UPCAST), tl.trans(bt), out_dtype=ACC)
    na = tl.load(NA + rows, mask=rows < N, other=1.0)
    nb = tl.load(NB + cols, mask=cols < C, other=1.0)
    s = s / na[:, None] / nb[None, :]
    tl.store(O + rows[:, None] * stride_o + cols[None, :], s.to(O.dtype.element_ty),
             mask=(rows < N)[:, None] & (cols < C)[None, :])


# ----------------------------------------------------------------------------- launchers

def _rowwise(kernel, x, *args):
    """Launch a row kernel over x (N, d): 64 rows a program, 64-column chunks."""
    kernel[(cdiv(x.shape[0], 64),)](x, *args, BLOCK_M=64, BLOCK_D=64, **constexprs(x), num_warps=4)


def _norms(x: torch.Tensor) -> torch.Tensor:
    """max(||x_i||, eps) in the accumulator dtype, (N,)."""
    n = torch.empty(x.shape[0], device=x.device, dtype=acc_dtype(x))
    _rowwise(_norm_kernel, x, n, x.shape[0], x.shape[1], x.stride(0), EPS)
    return n


def _loss_forward(a, b, tau):
    """a, b (N, d) contiguous, one dtype -> loss (0-dim), and what backward needs."""
    N, d = a.shape
    (block_d, nc), acc = chunking(d), constexprs(a)["ACC"]
    configs = candidates("sim.logits", block_d, nc, a.element_size())
    rows = min(c.BLOCK_M for c in configs)  # the most row blocks, the largest column statistics
    check_int32("contrastive_loss", a=a, column_statistics=(cdiv(N, rows), N))
    na, nb = _norms(a), _norms(b)
    lse_r, diag, lse_c = (torch.empty(N, device=a.device, dtype=na.dtype) for _ in range(3))

    def launch(cfg):
        blocks = cdiv(N, cfg.BLOCK_M)
        lse_cp = torch.empty(blocks, N, device=a.device, dtype=na.dtype)  # column lse of each row block
        _lse_kernel[(blocks,)](a, b, na, nb, lse_r, lse_cp, diag, N, d, a.stride(0), b.stride(0), lse_cp.stride(0),
                               1.0 / tau, **meta(cfg, block_d, nc, a))
        _col_lse_kernel[(cdiv(N, 128),)](lse_cp, lse_c, N, blocks, lse_cp.stride(0), BLOCK=128, ACC=acc,
                                         num_warps=4)
    launch(choose("sim.lse", a, (d, shape_class(N)), configs, launch))
    loss = ((lse_r - diag).sum() + (lse_c - diag).sum()) / N
    return loss, (na, nb, lse_r, lse_c)


def _normalize(x, n):
    """x / n in x's dtype (the a^, b^ of the gradient GEMMs)."""
    out = torch.empty_like(x)
    _rowwise(_scale_kernel, x, n, out, x.shape[0], x.shape[1], x.stride(0), out.stride(0))
    return out


def _unit_grad(x, n, dx_hat, coef):
    """F.normalize's backward: x (N, d), n = max(||x||, eps) (N,), dL/dx^ = coef * dx_hat -> dL/dx."""
    dx = torch.empty_like(x)
    _rowwise(_unit_grad_kernel, x, n, dx_hat, coef, dx, x.shape[0], x.shape[1], x.stride(0), dx_hat.stride(0),
             dx.stride(0), EPS)
    return dx


def _grads(a, b, na, nb, lse_r, lse_c, grad, tau):
    """-> dL/da, dL/db, one chunk of rows of H at a time."""
    N, d = a.shape
    (block_d, nc), sms = chunking(d), sm_count(a.device)
    chunk = max(128, BUFFER_BYTES // (N * a.element_size()) // 128 * 128)  # whole row blocks of any candidate
    chunk = min(chunk, cdiv(N, 128) * 128)
    buf = torch.empty(chunk * N, device=a.device, dtype=a.dtype)
    check_int32("contrastive_loss", buffer=buf)
    a_hat, b_hat = _normalize(a, na), _normalize(b, nb)
    da_hat, db_hat = torch.empty_like(a), None
    configs = candidates("sim.logits", block_d, nc, a.element_size())
    for r0 in range(0, N, chunk):
        n = min(chunk, N - r0)
        H = buf[: n * N].view(n, N)

        def launch(cfg, r0=r0, n=n, H=H):  # below a wave of row blocks, the columns are split too
            blocks = cdiv(n, cfg.BLOCK_M)
            col_split = max(1, min(cdiv(N, cfg.BLOCK_N), sms // blocks))
            _h_kernel[(blocks, col_split)](a, b, na, nb, lse_r, lse_c, H, N, d, r0, n, a.stride(0), b.stride(0),
                                           H.stride(0), 1.0 / tau, **meta(cfg, block_d, nc, a))
        launch(choose("sim.h", a, (d, shape_class(N), shape_class(n)), configs, launch))
        torch.mm(H, b_hat, out=da_hat[r0:r0 + n])
        part = H.t() @ a_hat[r0:r0 + n]  # (N, d)
        db_hat = part.to(na.dtype) if db_hat is None else db_hat.add_(part)
    coef = (grad.to(na.dtype) / (N * tau)).reshape(1)  # device scalar: no host sync
    return _unit_grad(a, na, da_hat, coef), _unit_grad(b, nb, db_hat, coef)


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
        da, db = _grads(a, b, na, nb, lse_r, lse_c, grad, ctx.tau)
        return da, db, None


def contrastive_loss(a: torch.Tensor, b: torch.Tensor, tau: float) -> torch.Tensor:
    """Fused CE(S, I) + CE(S^T, I), S = cos(a, b) / tau, for un-normalised a, b (N, d) -> fp32 scalar."""
    a, b = prepare_inputs("contrastive_loss", a, b, "a and b both (N, d)", same_rows=True)
    if a.dtype == torch.float64 and a.is_cuda:  # tensor cores have no use for fp64: stay eager
        return contrastive_loss_reference(a, b, tau)
    return ContrastiveLoss.apply(a, b, float(tau))


@torch.no_grad()
def cosine_scores(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Fused cosine similarity (N, d), (C, d) -> (N, C) in the input dtype (forward only)."""
    a, b = prepare_inputs("cosine_scores", a, b, "a (N, d) and b (C, d)")
    if a.dtype == torch.float64 and a.is_cuda:
        return cosine_scores_reference(a, b)
    (N, d), C = a.shape, b.shape[0]
    out = torch.empty(N, C, device=a.device, dtype=a.dtype)
    check_int32("cosine_scores", a=a, b=b, scores=out)
    _cosine_kernel[(cdiv(N, 64), cdiv(C, 64))](
        a, b, _norms(a), _norms(b), out, N, C, d, a.stride(0), b.stride(0), out.stride(0),
        BLOCK_M=64, BLOCK_N=64, BLOCK_D=64, **constexprs(a), num_warps=4, num_stages=2)
    return out


# ----------------------------------------------------------------------------- self-check

def _case(shape, dtype, dev):
    """Fused and float64 (loss, da, db, cosine scores) at one shape: N pairs and C prompts of width d."""
    N, C, d = shape
    a, b = (torch.randn(N, d, device=dev, dtype=dtype, requires_grad=True) for _ in range(2))
    loss = contrastive_loss(a, b, 0.1)
    got = (loss, *torch.autograd.grad(loss, (a, b)), cosine_scores(a, b[:C]))
    a64, b64 = a.detach().double().requires_grad_(), b.detach().double().requires_grad_()
    ref = contrastive_loss_reference(a64, b64, 0.1)
    return got, (ref, *torch.autograd.grad(ref, (a64, b64)), cosine_scores_reference(a64, b64[:C]))


if __name__ == "__main__":  # the paper's width, and odd sizes
    from kernels.selfcheck import main
    sys.exit(main("similarity", _case, [(131, 19, 768), (67, 18, 200), (1, 1, 200)], ("loss", "da", "db", "cos"),
                  TOL, TOL_TF32))
