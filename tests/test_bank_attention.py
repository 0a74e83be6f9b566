"""kernels/bank_attention.py through the Triton interpreter: forward and both gradients against a
float64 reference over odd shapes, both scales, both forward paths (single pass; bank split and
merged), large logits, gradcheck, the launch plumbing and the self-check's exit status.

Inputs are scaled so that the logits spread over a few units, the regime in which relative
tolerances are meaningful: with |S| ~ 30 the softmax is one-hot, dx is a tiny difference of large
terms, and eager PyTorch itself misses them in fp16/bf16. Large logits are checked separately,
against the size of the terms being summed.

Shapes are a covering subset of N in {1, 3, 64, 129, 200}, K in {1, 17, 300, 2048}, d in {8, 33,
200, 768}: every value appears, as do the paths they select (bank split + merge for small N and many
tiles, splits of the bank in the backward, several row blocks and row chunks, masked tails in every
dimension). With TRITON_INTERPRET=0 on a machine with a GPU (conftest keeps a value already set)
the same tests run on CUDA tensors with the real compiler, fp32 then held to the TF32 tolerance.
"""
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kernels import bank_attention as ba
from kernels import tiles, tuning

ROOT = Path(__file__).resolve().parents[1]
DEVICE = "cuda" if os.environ.get("TRITON_INTERPRET") == "0" and torch.cuda.is_available() else "cpu"
TOL = {torch.float32: ba.TOL[torch.float32] if DEVICE == "cpu" else ba.TOL_TF32, torch.float16: 2e-3,
       torch.bfloat16: ba.TOL[torch.bfloat16]}  # relative, vs float64


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
    return x.to(DEVICE), D.to(DEVICE), dO.to(DEVICE)


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


class _Counted:
    """Stands in for a @triton.jit kernel and counts its launches (then launches it)."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, 0

    def __getitem__(self, grid):
        self.launches += 1
        return self.kernel[grid]


def _count(monkeypatch, *names) -> dict:
    counters = {n: _Counted(getattr(ba, n)) for n in names}
    for n, c in counters.items():
        monkeypatch.setattr(ba, n, c)
    return counters


@pytest.mark.parametrize("N, K, d, dtype, scaled", [
    (1, 17, 8, torch.float32, False),       # one row, one partial bank tile
    (3, 5, 33, torch.float16, True),        # (K = 1 has its own test: dx is exactly 0 there)
    (64, 17, 33, torch.bfloat16, False),    # the paper's batch of 64 as one row block
    (129, 17, 8, torch.float32, True),      # three row blocks
    (1, 2048, 8, torch.float32, True),      # bank split over programs, then merged
    (3, 2048, 33, torch.bfloat16, False),
    (64, 17, 768, torch.float32, True),     # the paper's width: 3 chunks of 256 in one accumulator
    (3, 300, 768, torch.float16, False),    # the paper's width, bank split
    (129, 17, 768, torch.bfloat16, True),   # bf16 P and s dS rounded before the second products
])
def test_forward_and_grads_match_float64(N, K, d, dtype, scaled):
    scale = 1 / math.sqrt(d) if scaled else 1.0
    x, D, dO = _inputs(N, K, d, dtype, sigma=_sigma(d, scale))
    _check_against_float64(x, D, dO, scale, TOL[dtype])


@pytest.mark.parametrize("N, K, d, dtype", [(200, 300, 33, torch.float32), (70, 40, 768, torch.bfloat16),
                                            (1, 17, 200, torch.float16)])
def test_single_pass_forward(N, K, d, dtype, monkeypatch):
    # with as many SMs as row blocks, no split: the plain kernel walks the whole bank for its rows
    monkeypatch.setattr(ba, "sm_count", lambda device: 1)
    runs = _count(monkeypatch, "_fwd_kernel", "_fwd_split_kernel", "_combine_kernel")
    x, D, dO = _inputs(N, K, d, dtype, sigma=_sigma(d, 1.0))
    _check_against_float64(x, D, dO, 1.0, TOL[dtype])
    assert [runs[n].launches for n in runs] == [1, 0, 0]


@pytest.mark.parametrize("N, K, d, dtype", [(64, 300, 33, torch.float32), (5, 300, 768, torch.bfloat16)])
def test_split_forward_merges_every_slice(N, K, d, dtype, monkeypatch):
    runs = _count(monkeypatch, "_fwd_kernel", "_fwd_split_kernel", "_combine_kernel")
    x, D, dO = _inputs(N, K, d, dtype, sigma=_sigma(d, 1.0), seed=2)
    _check_against_float64(x, D, dO, 1.0, TOL[dtype])
    assert [runs[n].launches for n in runs] == [0, 1, 1]


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
@pytest.mark.parametrize("single", [False, True])
def test_large_logits_stay_finite(dtype, single, monkeypatch):
    # |s x D^T| ~ 1e3: exp overflows without the max subtraction, and a log-sum-exp saved in fp32
    # (ulp 6e-5 at 1e3) would shift every recomputed P. The softmax is one-hot here, so dx is ~0 and a
    # relative error means nothing: errors are measured against the size of the terms being summed.
    # Logits of 1e3 carry an fp32 rounding error of ~1e3 * 2^-24 * sqrt(d) (eager's too), which P
    # inherits, hence the fp32 bound of 1e-4. Both forward paths: the split one merges slice maxima.
    if single:
        monkeypatch.setattr(ba, "sm_count", lambda device: 1)
    tol = max(TOL[dtype], 1e-4)
    x, D, dO = _inputs(64, 300, 33, dtype, sigma=12.0, seed=1)
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


def test_autocast_runs_in_the_autocast_dtype():
    x, D, _ = _inputs(5, 17, 33, torch.float32)
    with torch.autocast(DEVICE, torch.bfloat16):
        out = ba.bank_attention(x, D)
    assert out.dtype == torch.bfloat16
    want = ba.bank_attention_reference(x.to(torch.bfloat16).double(), D.to(torch.bfloat16).double())
    assert _rel_err(out, want)[0] <= TOL[torch.bfloat16]


def test_bad_shapes_are_rejected_with_a_clear_message():
    with pytest.raises(ValueError, match="same d"):
        ba.bank_attention(torch.randn(4, 8), torch.randn(5, 9))
    with pytest.raises(ValueError, match="non-empty"):
        ba.bank_attention(torch.randn(0, 8), torch.randn(5, 8))
    with pytest.raises(ValueError, match="d <= 1024"):
        ba.bank_attention(torch.randn(2, 1025), torch.randn(5, 1025))
    with pytest.raises(TypeError, match="supports"):
        ba.bank_attention(torch.ones(2, 8, dtype=torch.int32), torch.ones(3, 8, dtype=torch.int32))


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


def test_every_candidate_runs_and_the_fastest_is_kept(monkeypatch):
    # the first-use timing (on a GPU) through the interpreter with a wall clock: every candidate of
    # each kernel is launched, one is kept per shape class and reused, and the result is unchanged
    monkeypatch.setattr(tuning, "TIME_ON_CPU", True)
    monkeypatch.setattr(tuning, "CHOSEN", {})
    monkeypatch.setattr(tuning, "TIMINGS", {})
    for single in (False, True):
        if single:
            monkeypatch.setattr(ba, "sm_count", lambda device: 1)
        x, D, dO = _inputs(40, 300, 33, torch.float32, sigma=_sigma(33, 1.0), seed=3)
        _check_against_float64(x, D, dO, 1.0, TOL[torch.float32])
    kernels = {key[0] for key in tuning.CHOSEN}
    assert kernels == {"bank.split", "bank.fwd", "bank.bwd"}, kernels
    for key, cfg in tuning.CHOSEN.items():
        configs = tuning.candidates(key[0], *tiles.chunking(33), 4)
        assert [c for c, _ in tuning.TIMINGS[key]] == configs and cfg in configs
        assert min(tuning.TIMINGS[key], key=lambda t: t[1])[0] == cfg
    runs = _count(monkeypatch, "_fwd_kernel")  # a second call at the same shape class: no more timing
    ba.bank_attention(x[:33], D)
    assert runs["_fwd_kernel"].launches == 1


def test_tf32_emulation_reaches_the_gpu_tolerance_and_not_beyond():
    # fp32 tl.dot is TF32 on a GPU: the interpreter emulating it must show errors well above the
    # interpreter's fp32 tolerance (the emulation works) and within TOL_TF32 (the GPU check's)
    if DEVICE != "cpu":
        pytest.skip("emulation of the GPU's TF32 in the interpreter")
    x, D, dO = _inputs(20, 300, 200, torch.float32, sigma=_sigma(200, 1.0))
    tiles.interpreter_emulates_tf32()
    try:
        got = _run(ba.bank_attention, x, D, dO, 1.0)
    finally:
        tiles.interpreter_emulates_tf32(False)
    want = _run(ba.bank_attention_reference, x.double(), D.double(), dO.double(), 1.0)
    errs = [_rel_err(g, w)[0] for g, w in zip(got, want)]
    assert 10 * ba.TOL[torch.float32] < max(errs) <= ba.TOL_TF32, errs
    assert _rel_err(_run(ba.bank_attention, x, D, dO, 1.0)[0], want[0])[0] <= ba.TOL[torch.float32]  # off again


def test_split_plans():
    plan = tuning.split_plan
    assert plan(128, 1, 132, 24576, 98304 * 3, 4096).splits > 1  # N = 64, K = 2048: one row block
    assert plan(32, 1024, 132, 24576, 98304) == (1, 32)  # N = 65536: 1024 row blocks fill the GPU
    for n_tiles, programs in ((32, 1), (5, 3), (1, 1), (33, 7), (128, 4)):
        splits, per = plan(n_tiles, programs, 132, 10, 40, 3)
        assert (splits - 1) * per < n_tiles <= splits * per  # every split gets work
    assert plan(128, 1, 132, 1, 0).splits == 128  # nothing fixed, nothing to merge: one tile each
    assert plan(128, 1, 132, 1, 0, merge=1).splits < 128  # a merge cost per split: fewer


@pytest.mark.parametrize("tol, status", [(None, 0), (0.0, 1)])
def test_self_check_exit_status(tol, status):
    # python -m kernels.bank_attention exits 1 when a check fails: --tol 0 must fail, the real
    # tolerances pass (one small shape here; the GPU check runs the default ones)
    env = {**os.environ, "TRITON_INTERPRET": "1"} if DEVICE == "cpu" else dict(os.environ)
    cmd = [sys.executable, "-m", "kernels.bank_attention", "--shape", "3,40,33"] + \
        ([] if tol is None else ["--tol", str(tol)])
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == status, proc.stdout + proc.stderr
    assert proc.stdout.count("FAILED") == (2 if status else 0) + status, proc.stdout  # 2 dtypes + summary


def test_a_candidate_that_cannot_run_is_passed_over(monkeypatch):
    # on a GPU with less shared memory than the H100 some candidates fail to launch: the timing
    # rules them out instead of failing the op
    monkeypatch.setattr(tuning, "TIME_ON_CPU", True)
    monkeypatch.setattr(tuning, "CHOSEN", {})
    monkeypatch.setattr(tuning, "TIMINGS", {})
    configs = [tuning.Config(64, 64, 4, 2), tuning.Config(16, 64, 4, 2)]

    def launch(cfg):
        if cfg.BLOCK_M == 64:
            raise RuntimeError("out of resources: shared memory")
    x = torch.empty(3, 8)
    assert tuning.choose("test.kernel", x, (8,), configs, launch) == configs[1]
    assert tuning.TIMINGS[("test.kernel", "cpu", torch.float32, (8,))][0][1] == float("inf")

    def broken(cfg):
        raise RuntimeError("out of resources")
    assert tuning.choose("test.other", x, (8,), configs, broken) == configs[0]  # none runs: the default's error
    assert ("test.other", "cpu", torch.float32, (8,)) not in tuning.CHOSEN
