"""kernels/similarity.py through the Triton interpreter: the fused symmetric InfoNCE (loss, da, db)
and the fused cosine scores against float64 references, over odd shapes, dtypes and temperatures;
the first-use timing of the candidates, TF32 emulation and the self-check's exit status. With
TRITON_INTERPRET=0 on a machine with a GPU the same tests run on CUDA tensors (fp32 then TF32).
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kernels import similarity as sim
from kernels import tiles, tuning

ROOT = Path(__file__).resolve().parents[1]
DEVICE = "cuda" if os.environ.get("TRITON_INTERPRET") == "0" and torch.cuda.is_available() else "cpu"
TOL = {torch.float32: sim.TOL[torch.float32] if DEVICE == "cpu" else sim.TOL_TF32, torch.float16: 2e-3,
       torch.bfloat16: sim.TOL[torch.bfloat16]}  # relative, vs float64


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> tuple[float, float]:
    """(max, mean) |got - want| relative to max |want|."""
    err = (got.double() - want).abs()
    scale = want.abs().max().clamp_min(1e-30)
    return (err.max() / scale).item(), (err.mean() / scale).item()


def _pairs(N, d, dtype, seed=0, sigma=3.0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(N, d, generator=g) * sigma  # un-normalised, as the projection heads emit
    b = (a + torch.randn(N, d, generator=g) * sigma) * 0.5  # correlated, so the diagonal matters
    return a.to(dtype).to(DEVICE), b.to(dtype).to(DEVICE)


def _loss_and_grads(fn, a, b, tau, upstream):
    a, b = a.clone().requires_grad_(), b.clone().requires_grad_()
    loss = fn(a, b, tau)
    (loss * upstream).backward()
    return loss, a.grad, b.grad


@pytest.mark.parametrize("N, d, dtype, tau", [
    (1, 8, torch.float32, 0.1),       # a single pair: loss is exactly 0, gradients exactly 0
    (3, 33, torch.float16, 0.1),
    (64, 33, torch.bfloat16, 0.1),    # the paper's batch: one tile
    (129, 8, torch.float32, 0.05),    # three row and column tiles with a ragged tail
    (65, 768, torch.float32, 0.1),    # the paper's width: the held rows are 3 chunks of 256
    (70, 768, torch.bfloat16, 0.01),  # logits up to 100
    (17, 100, torch.float16, 1.0),
])
def test_contrastive_loss_and_grads_match_float64(N, d, dtype, tau):
    a, b = _pairs(N, d, dtype, seed=N)
    upstream = 1.7  # a non-unit upstream gradient reaches the kernel as a device scalar
    got = _loss_and_grads(sim.contrastive_loss, a, b, tau, upstream)
    want = _loss_and_grads(sim.contrastive_loss_reference, a.double(), b.double(), tau, upstream)
    assert got[0].dim() == 0 and got[0].dtype == torch.float32 and got[1].dtype == dtype
    for name, g, w in zip(("loss", "da", "db"), got, want):
        assert torch.isfinite(g).all(), f"{name} has inf/NaN"
        if w.abs().max() < 1e-12:  # N = 1: exactly zero
            assert g.abs().max() < 1e-6, f"{name} should be 0, got {g.abs().max():.2e}"
            continue
        worst, mean = _rel_err(g, w)
        assert worst <= TOL[dtype], f"{name}: max rel err {worst:.2e} (mean {mean:.2e}) > {TOL[dtype]:g}"


def test_gradcheck_float64():
    for N, d in ((3, 8), (70, 20)):
        a, b = _pairs(N, d, torch.float64, seed=N)
        f = lambda x, y: sim.contrastive_loss(x, y, 0.3)  # noqa: E731
        assert torch.autograd.gradcheck(f, (a.requires_grad_(), b.requires_grad_()), fast_mode=True)


def test_tiny_and_zero_vectors_follow_f_normalize():
    # norms below eps are clamped (F.normalize): the gradient is then da^ / eps, not a projection
    a, b = _pairs(5, 8, torch.float64, seed=1)
    a[1] = 0.0
    a[2] *= 1e-14
    got = _loss_and_grads(sim.contrastive_loss, a, b, 0.1, 1.0)
    want = _loss_and_grads(sim.contrastive_loss_reference, a, b, 0.1, 1.0)
    for name, g, w in zip(("loss", "da", "db"), got, want):
        assert torch.isfinite(g).all()
        assert _rel_err(g, w)[0] <= 1e-6, name  # 1/eps = 1e12 amplifies fp64 rounding


def test_non_contiguous_inputs():
    a, b = _pairs(40, 16, torch.float32)
    a_nc, b_nc = torch.cat([a, a], dim=1)[:, :16], b.t().contiguous().t()  # row stride 32; column-major
    assert not a_nc.is_contiguous() and not b_nc.is_contiguous()
    got = sim.contrastive_loss(a_nc, b_nc, 0.1)
    assert _rel_err(got, sim.contrastive_loss_reference(a.double(), b.double(), 0.1))[0] <= 1e-5


@pytest.mark.parametrize("N, C, d, dtype", [
    (1, 1, 8, torch.float32),
    (5, 18, 33, torch.float16),   # 18 abnormality prompts
    (70, 3, 768, torch.bfloat16),
    (130, 67, 20, torch.float32),
])
def test_cosine_scores_match_float64(N, C, d, dtype):
    a, _ = _pairs(N, d, dtype, seed=C)
    _, b = _pairs(C, d, dtype, seed=N)
    got = sim.cosine_scores(a, b)
    want = sim.cosine_scores_reference(a.double(), b.double())
    assert got.shape == (N, C) and got.dtype == dtype
    worst, mean = _rel_err(got, want)
    assert worst <= TOL[dtype], f"max rel err {worst:.2e} (mean {mean:.2e})"


@pytest.mark.parametrize("N, d, dtype", [(150, 20, torch.float32), (150, 20, torch.float16),
                                         (300, 768, torch.bfloat16)])  # 128-row blocks at d = 768
def test_backward_in_several_row_chunks(N, d, dtype, monkeypatch):
    # a small buffer forces several chunks of rows of H (128 rows, whole row blocks of every
    # candidate): da per chunk, db summed over chunks in fp32
    monkeypatch.setattr(sim, "BUFFER_BYTES", 128 * N * torch.empty(0, dtype=dtype).element_size())
    a, b = _pairs(N, d, dtype, seed=3)
    got = _loss_and_grads(sim.contrastive_loss, a, b, 0.1, 1.0)
    want = _loss_and_grads(sim.contrastive_loss_reference, a.double(), b.double(), 0.1, 1.0)
    for name, g, w in zip(("loss", "da", "db"), got, want):
        worst, mean = _rel_err(g, w)
        assert worst <= TOL[dtype], f"{name}: max rel err {worst:.2e} (mean {mean:.2e}) > {TOL[dtype]:g}"


def test_huge_inputs_are_refused_before_any_launch():
    a = torch.empty(2 ** 19, 16, device="meta")  # (N / 32, N) column statistics: 2^33 elements
    with pytest.raises(ValueError, match="32-bit offsets"):
        sim.contrastive_loss(a, a, 0.1)


def test_bad_inputs_are_rejected_with_a_clear_message():
    with pytest.raises(ValueError, match="both \\(N, d\\)"):
        sim.contrastive_loss(torch.randn(4, 8), torch.randn(5, 8), 0.1)
    with pytest.raises(ValueError, match="\\(C, d\\)"):
        sim.cosine_scores(torch.randn(4, 8), torch.randn(5, 9))
    with pytest.raises(ValueError, match="non-empty"):
        sim.contrastive_loss(torch.randn(0, 8), torch.randn(0, 8), 0.1)


def test_every_candidate_runs_and_the_fastest_is_kept(monkeypatch):
    # the first-use timing (on a GPU) through the interpreter with a wall clock: both logit kernels
    # try every candidate once per shape class, and the loss and gradients are unchanged
    monkeypatch.setattr(tuning, "TIME_ON_CPU", True)
    monkeypatch.setattr(tuning, "CHOSEN", {})
    monkeypatch.setattr(tuning, "TIMINGS", {})
    a, b = _pairs(70, 20, torch.float32, seed=4)
    got = _loss_and_grads(sim.contrastive_loss, a, b, 0.1, 1.0)
    want = _loss_and_grads(sim.contrastive_loss_reference, a.double(), b.double(), 0.1, 1.0)
    for g, w in zip(got, want):
        assert _rel_err(g, w)[0] <= TOL[torch.float32]
    assert {key[0] for key in tuning.CHOSEN} == {"sim.lse", "sim.h"}
    configs = tuning.candidates("sim.logits", *tiles.chunking(20), 4)
    for key, cfg in tuning.CHOSEN.items():
        assert [c for c, _ in tuning.TIMINGS[key]] == configs and cfg == min(tuning.TIMINGS[key], key=lambda t: t[1])[0]


def test_tf32_emulation_reaches_the_gpu_tolerance_and_not_beyond():
    if DEVICE != "cpu":
        pytest.skip("emulation of the GPU's TF32 in the interpreter")
    a, b = _pairs(40, 200, torch.float32, seed=5)
    tiles.interpreter_emulates_tf32()
    try:
        got = sim.cosine_scores(a, b[:18])
    finally:
        tiles.interpreter_emulates_tf32(False)
    err = _rel_err(got, sim.cosine_scores_reference(a.double(), b[:18].double()))[0]
    assert 10 * sim.TOL[torch.float32] < err <= sim.TOL_TF32, err


@pytest.mark.parametrize("tol, status", [(None, 0), (0.0, 1)])
def test_self_check_exit_status(tol, status):
    # python -m kernels.similarity exits 1 when a check fails: --tol 0 must fail, the real tolerances pass
    env = {**os.environ, "TRITON_INTERPRET": "1"} if DEVICE == "cpu" else dict(os.environ)
    cmd = [sys.executable, "-m", "kernels.similarity", "--shape", "5,3,33"]
    cmd += [] if tol is None else ["--tol", str(tol)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == status, proc.stdout + proc.stderr
    assert proc.stdout.count("FAILED") == (2 if status else 0) + status, proc.stdout


@pytest.mark.skipif(DEVICE != "cpu", reason="the interpreter's cast")
def test_interpreter_rounds_bf16_stores_as_torch_does():
    # conftest makes the interpreter's fp32 -> bf16 cast round to nearest even (alone it truncates),
    # so the bf16 tolerances above hold the kernels to the rounding a GPU applies
    import triton
    import triton.language as tl

    @triton.jit
    def cast(X, Y, n, BLOCK: tl.constexpr):
        i = tl.arange(0, BLOCK)
        tl.store(Y + i, tl.load(X + i, mask=i < n).to(tl.bfloat16), mask=i < n)

    x = torch.randn(4000, generator=torch.Generator().manual_seed(0)) * 30
    x[:4] = torch.tensor([float("inf"), -0.0, 1e-40, 1.00390625])  # 1 + 2^-8: a tie, rounds to even (1.0)
    y = torch.empty(4000, dtype=torch.bfloat16)
    cast[(1,)](x, y, 4000, BLOCK=4096)
    assert torch.equal(y.view(torch.int16), x.to(torch.bfloat16).view(torch.int16))
