"""kernels/bank_attention.py through the Triton interpreter: forward and both gradients against a
float64 reference over odd shapes, both scales, large logits, gradcheck, and the launch plumbing.

Inputs are scaled so that the logits spread over a few units, the regime in which the relative
tolerances of SPEC section 8 are meaningful: with |S| ~ 30 the softmax is one-hot, dx is a tiny
difference of large terms, and eager PyTorch itself misses them in fp16/bf16. Large logits are
checked separately, against eager PyTorch in the same dtype.

Shapes are a covering subset of N in {1, 3, 64, 129}, K in {1, 17, 2048}, d in {8, 33, 768}: every
value appears, as do the paths they select (bank split + combine for small N and large K, splits
of the bank in the backward, several row blocks and row chunks, masked tails in every dimension).
"""
import math

import pytest
import torch

from kernels import bank_attention as ba

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}  # relative, vs float64


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> tuple[float, float]:
    """(max, mean) |got - want| relative to max |want|."""
    err = (got.double() - want).abs()
    scale = want.abs().max().clamp_min(1e-30)
    return (err.max() / scale).item(), (err.mean() / scale).item()


def _inputs(N, K, d, dtype, sigma=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(N, d, generator=g) * sigma).to(dtype)
    D = (torch.randn(K, d, generator=g) * sigma).to(dtype)
    dO = torch.randn(N, d, generator=g).to(dtype)
    return x, D, dO


def _run(fn, x, D, dO, scale):
    """-> (x_hat, dx, dD) of fn, with gradients in the inputs' dtype."""
    x, D = x.clone().requires_grad_(), D.clone().requires_grad_()
    out = fn(x, D, scale)
    out.backward(dO.to(out.dtype))
    return out, x.grad, D.grad


def _check_against_float64(x, D, dO, scale, tol):
    got = _run(ba.bank_attention, x, D, dO, scale)
    want = _run(ba.bank_attention_reference, x.double(), D.double(), dO.double(), scale)
    assert got[0].dtype == x.dtype and got[0].shape == x.shape
    for name, g, w in zip(("out", "dx", "dD"), got, want):
        assert torch.isfinite(g).all(), f"{name} has inf/NaN"
        worst, mean = _rel_err(g, w)
        assert worst <= tol, f"{name}: max rel err {worst:.2e} (mean {mean:.2e}) > {tol:g}"


def _sigma(d: int, scale: float) -> float:
    """Input std that gives logits s * x.D of std ~2 for standard-normal-shaped x and D."""
    return math.sqrt(2.0 / (scale * math.sqrt(d)))


@pytest.mark.parametrize("N, K, d, dtype, scaled", [
    (1, 17, 8, torch.float32, False),       # one row, one partial bank tile
    (3, 5, 33, torch.float16, True),        # (K = 1 has its own test: dx is exactly 0 there)
    (64, 17, 33, torch.bfloat16, False),    # the paper's batch of 64 as one row block
    (129, 17, 8, torch.float32, True),      # three row blocks
    (1, 2048, 8, torch.float32, True),      # bank split over 32 programs, then combined
    (3, 2048, 33, torch.bfloat16, False),
    (64, 17, 768, torch.float32, True),     # the paper's width: 3 chunks of 256 in one accumulator
    (3, 17, 768, torch.float16, False),
    (129, 17, 768, torch.bfloat16, True),   # bf16 P and s dS rounded before the second products
])
def test_forward_and_grads_match_float64(N, K, d, dtype, scaled):
    scale = 1 / math.sqrt(d) if scaled else 1.0
    x, D, dO = _inputs(N, K, d, dtype, sigma=_sigma(d, scale))
    _check_against_float64(x, D, dO, scale, TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_single_entry_bank(dtype):
    # K = 1: P = 1, so x_hat = D_0, dS = 0, dx = 0 and dD = sum_i dO_i (a relative error to 0 is
    # meaningless, so dx is held to tol times the size of the terms it is made of)
    x, D, dO = _inputs(3, 1, 33, dtype)
    xk, Dk = x.clone().requires_grad_(), D.clone().requires_grad_()
    out = ba.bank_attention(xk, Dk, 1 / math.sqrt(33))
    out.backward(dO)
    assert _rel_err(out, D.double().expand(3, -1))[0] <= TOL[dtype]
    assert _rel_err(Dk.grad, dO.double().sum(0, keepdim=True))[0] <= TOL[dtype]
    terms = dO.double().abs().max() * D.double().abs().max() ** 2 * 33 ** 0.5
    assert xk.grad.double().abs().max() <= TOL[dtype] * terms


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_large_logits_stay_finite(dtype):
    # |s x D^T| ~ 1e3: exp overflows without the max subtraction, and a log-sum-exp saved in fp32
    # (ulp 6e-5 at 1e3) would shift every recomputed P. The softmax is one-hot here, so dx is ~0 and a
    # relative error means nothing: errors are measured against the size of the terms being summed.
    # Logits of 1e3 carry an fp32 rounding error of ~1e3 * 2^-24 * sqrt(d) (eager's too), which P
    # inherits, hence the fp32 bound of 1e-4.
    tol = max(TOL[dtype], 1e-4)
    x, D, dO = _inputs(64, 17, 33, dtype, sigma=12.0, seed=1)
    x64, D64, dO64 = x.double(), D.double(), dO.double()
    assert (x64 @ D64.t()).abs().max() > 500
    got = _run(ba.bank_attention, x, D, dO, 1.0)
    want = _run(ba.bank_attention_reference, x64, D64, dO64, 1.0)
    P = torch.softmax(x64 @ D64.t(), dim=-1)  # (N, K)
    dS_terms = P * (dO64 @ D64.t()).abs()  # |P * dP|, the size of what dS is made of
    terms = (want[0].abs().max(), (dS_terms @ D64.abs()).max(),
             (P.t() @ dO64.abs() + dS_terms.t() @ x64.abs()).max())
    for name, g, w, t in zip(("out", "dx", "dD"), got, want, terms):
        assert torch.isfinite(g).all(), f"{name} has inf/NaN"
        err = ((g.double() - w).abs().max() / t).item()
        assert err <= tol, f"{name}: max error / term size {err:.2e} > {tol:g}"


def test_gradcheck_float64():
    for N, K, d in ((3, 17, 8), (1, 200, 3), (65, 5, 33)):  # plain, bank split, two row blocks
        x, D, _ = _inputs(N, K, d, torch.float64, seed=N)
        f = lambda a, b: ba.bank_attention(a, b, 0.7)  # noqa: E731
        assert torch.autograd.gradcheck(f, (x.requires_grad_(), D.requires_grad_()), fast_mode=True)


def test_non_contiguous_and_mixed_dtype_inputs():
    x, D, dO = _inputs(70, 40, 16, torch.float32, sigma=0.5)
    x_nc = torch.cat([x, x], dim=1)[:, ::2]  # strided columns (a different x, checked as such)
    D_nc = D.t().contiguous().t()  # column-major
    assert not x_nc.is_contiguous() and not D_nc.is_contiguous()
    _check_against_float64(x_nc, D_nc, dO, 0.5, TOL[torch.float32])
    out = ba.bank_attention(x.to(torch.bfloat16), D)  # bf16 with fp32 -> promoted, as a matmul would
    assert out.dtype == torch.float32


def test_bad_shapes_are_rejected_with_a_clear_message():
    with pytest.raises(ValueError, match="same d"):
        ba.bank_attention(torch.randn(4, 8), torch.randn(5, 9))
    with pytest.raises(ValueError, match="N, K, d >= 1"):
        ba.bank_attention(torch.randn(0, 8), torch.randn(5, 8))
    with pytest.raises(TypeError, match="supports"):
        ba.bank_attention(torch.ones(2, 8, dtype=torch.int32), torch.ones(3, 8, dtype=torch.int32))


@pytest.mark.parametrize("itemsize", [2, 4])
def test_config_table_covers_every_width(itemsize):
    for kernel in ("fwd", "bwd"):
        for d in range(1, 1025):
            cfg = ba.pick_config(d, kernel, itemsize)
            assert min(cfg.BLOCK_M, cfg.BLOCK_K, cfg.BLOCK_D) >= 16  # tl.dot's minimum on a GPU
            assert cfg.NC * cfg.BLOCK_D >= d > (cfg.NC - 1) * cfg.BLOCK_D, (kernel, d, cfg)  # no empty chunk


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_in_several_row_chunks(dtype, monkeypatch):
    # a small buffer forces several chunks of rows: dx per chunk, dD summed over chunks in fp32
    monkeypatch.setattr(ba, "BUFFER_BYTES", 2 * 17 * 64 * torch.empty(0, dtype=dtype).element_size())
    x, D, dO = _inputs(200, 17, 33, dtype, sigma=_sigma(33, 1.0))
    _check_against_float64(x, D, dO, 1.0, TOL[dtype])


def test_huge_inputs_are_refused_before_any_launch():
    x = torch.empty(2 ** 21, 1024, device="meta")  # 2^31 elements: past 32-bit offsets
    with pytest.raises(ValueError, match="32-bit offsets"):
        ba.bank_attention(x, torch.empty(16, 1024, device="meta"))


def test_small_n_splits_the_bank_and_large_n_does_not():
    cpu = torch.device("cpu")
    assert ba._split(32, 1, cpu)[0] > 1  # N = 64, K = 2048: one row block would leave SMs idle
    assert ba._split(32, 1024, cpu) == (1, 32)  # N = 65536: 1024 row blocks fill the GPU
    for n_tiles, programs in ((32, 1), (5, 3), (1, 1), (33, 7)):
        splits, per = ba._split(n_tiles, programs, cpu)
        assert (splits - 1) * per < n_tiles <= splits * per  # every split gets work
