"""cmki.py against a float64 reference written here from the paper's equations (values and gradients).

Both dispatch paths are checked: the eager reference (USE_KERNELS off) and whatever cmki picks under
the test set-up (the Triton interpreter when kernels/ is present).
"""
import math

import pytest
import torch

import cmki


def ref_cmki(x, D, s):
    """x_hat_i = sum_k p_ik D_k with p_ik = exp(s x_i.D_k) / sum_j exp(s x_i.D_j), in float64."""
    logits = s * (x[:, None, :] * D[None, :, :]).sum(-1)  # (N, K), elementwise, no matmul shortcut
    logits = logits - logits.max(dim=1, keepdim=True).values
    p = logits.exp() / logits.exp().sum(dim=1, keepdim=True)
    return (p[:, :, None] * D[None, :, :]).sum(1)


def ref_ce_sym(a, b, tau):
    """CE(S, I) + CE(S^T, I), S_ij = cos(a_i, b_j)/tau, each CE a mean over rows, in float64."""
    an = a / a.norm(dim=1, keepdim=True)
    bn = b / b.norm(dim=1, keepdim=True)
    S = (an[:, None, :] * bn[None, :, :]).sum(-1) / tau
    n = S.shape[0]
    row = -(S.diagonal() - S.logsumexp(dim=1)).sum() / n
    col = -(S.diagonal() - S.logsumexp(dim=0)).sum() / n
    return row + col


def ref_loss(v, t, D, tau, alpha, beta, gamma, s):
    v_hat, t_hat = ref_cmki(v, D, s), ref_cmki(t, D, s)
    mse = ((v_hat - v) ** 2).mean() + ((t_hat - t) ** 2).mean()
    return alpha * mse + beta * ref_ce_sym(v, t, tau) + gamma * ref_ce_sym(v_hat, t_hat, tau)


def _close(got, want, tol, what):
    err = (got.double() - want).abs().max().item()
    scale = want.abs().max().item() + 1e-12
    assert err <= tol * scale, f"{what}: max abs err {err:.3e} (relative {err / scale:.3e})"


@pytest.fixture(params=[False, True], ids=["eager", "dispatch"])
def use_kernels(request, monkeypatch):
    monkeypatch.setattr(cmki, "USE_KERNELS", request.param)
    return request.param


@pytest.mark.parametrize("N,K,d", [(1, 1, 8), (3, 17, 33), (9, 64, 24)])
@pytest.mark.parametrize("mode", ["one", "sqrt"])
def test_cmki_forward_and_grads(use_kernels, N, K, d, mode):
    g = torch.Generator().manual_seed(N * 100 + K + d)
    x64 = torch.randn(N, d, generator=g, dtype=torch.float64) * 2
    D64 = torch.randn(K, d, generator=g, dtype=torch.float64)
    s = cmki.default_scale(d, mode)
    x, D = x64.float().requires_grad_(), D64.float().requires_grad_()
    xr, Dr = x64.clone().requires_grad_(), D64.clone().requires_grad_()
    out, want = cmki.cmki(x, D, s), ref_cmki(xr, Dr, s)
    _close(out, want, 1e-5, "x_hat")
    w = torch.randn(N, d, generator=g, dtype=torch.float64)  # a random upstream gradient
    (out * w.float()).sum().backward()
    (want * w).sum().backward()
    _close(x.grad, xr.grad, 1e-4, "dx")
    _close(D.grad, Dr.grad, 1e-4, "dD")


def test_cmki_large_logits_stay_finite(use_kernels):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(4, 16, generator=g) * 300.0
    D = torch.randn(32, 16, generator=g)
    assert (x @ D.t()).abs().max() > 1e3  # logits in the range where a naive exp overflows
    out = cmki.cmki(x, D)
    assert torch.isfinite(out).all()
    _close(out, ref_cmki(x.double(), D.double(), 1.0), 1e-5, "x_hat at large logits")


@pytest.mark.parametrize("N,d,tau", [(1, 8, 0.1), (5, 33, 0.1), (16, 12, 0.07)])
def test_info_nce_forward_and_grads(use_kernels, N, d, tau):
    g = torch.Generator().manual_seed(N + d)
    a64 = torch.randn(N, d, generator=g, dtype=torch.float64) * 3
    b64 = torch.randn(N, d, generator=g, dtype=torch.float64)
    a, b = a64.float().requires_grad_(), b64.float().requires_grad_()
    ar, br = a64.clone().requires_grad_(), b64.clone().requires_grad_()
    got, want = cmki.info_nce(a, b, tau), ref_ce_sym(ar, br, tau)
    _close(got.reshape(()), want, 1e-5, "loss")
    got.backward()
    want.backward()
    _close(a.grad, ar.grad, 1e-4, "da")
    _close(b.grad, br.grad, 1e-4, "db")


def test_info_nce_single_pair_is_zero():
    # One pair: both softmaxes have a single entry, so each CE is exactly log(1) = 0.
    a, b = torch.randn(1, 8), torch.randn(1, 8)
    assert cmki.info_nce_reference(a, b, 0.1).item() == pytest.approx(0.0, abs=1e-7)


def test_info_nce_perfect_alignment_is_near_zero():
    a = torch.eye(6) * 5
    loss = cmki.info_nce_reference(a, a.clone(), 0.01)
    assert loss.item() < 1e-10
    assert cmki.info_nce_reference(a, a.roll(1, 0), 0.01).item() > 100  # all pairs wrong


@pytest.mark.parametrize("mode", ["one", "sqrt"])
def test_brgsa_loss_matches_reference(use_kernels, mode):
    g = torch.Generator().manual_seed(7)
    N, K, d = 6, 20, 16
    v64, t64 = (torch.randn(N, d, generator=g, dtype=torch.float64) for _ in range(2))
    D64 = torch.randn(K, d, generator=g, dtype=torch.float64)
    s = cmki.default_scale(d, mode)
    leaves = [z.float().requires_grad_() for z in (v64, t64, D64)]
    refs = [z.clone().requires_grad_() for z in (v64, t64, D64)]
    out = cmki.brgsa_loss(*leaves, tau=0.1, alpha=0.5, beta=1.0, gamma=1.0, scale=s)
    want = ref_loss(*refs, 0.1, 0.5, 1.0, 1.0, s)
    _close(out["total"].reshape(()), want, 1e-5, "total")
    assert out["total"].item() == pytest.approx(
        0.5 * out["mse"].item() + out["info"].item() + out["info_r"].item(), rel=1e-6)
    out["total"].backward()
    want.backward()
    for got, ref, name in zip(leaves, refs, ("dv", "dt", "dD")):
        _close(got.grad, ref.grad, 1e-4, name)


def test_gradcheck_float64_eager():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    D = torch.randn(7, 5, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: cmki.cmki_reference(a, b, 0.7), (x, D))
    y = torch.randn(3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: cmki.info_nce_reference(a, b, 0.1), (x, y))


def test_zero_shot_scores_formula(use_kernels):
    g = torch.Generator().manual_seed(11)
    v, t, D = torch.randn(5, 12, generator=g), torch.randn(3, 12, generator=g), torch.randn(9, 12, generator=g)
    got = cmki.zero_shot_scores(v, t, D)
    v_hat = ref_cmki(v.double(), D.double(), 1.0)
    cos = lambda a, b: (a / a.norm(dim=1, keepdim=True)) @ (b / b.norm(dim=1, keepdim=True)).t()
    want = 0.5 * (cos(v.double(), t.double()) + cos(v_hat, t.double()))
    assert got.shape == (5, 3)
    _close(got, want, 1e-5, "scores")


def test_knowledge_bank_is_orthogonal_parameter():
    bank = cmki.KnowledgeBank(8, 32)
    W = bank.weight
    assert isinstance(W, torch.nn.Parameter) and W.shape == (8, 32)
    torch.testing.assert_close(W @ W.t(), torch.eye(8), atol=1e-5, rtol=0)  # orthonormal rows
    assert bank(torch.randn(2, 32)).shape == (2, 32)


def test_default_scale():
    assert cmki.default_scale(768, "one") == 1.0
    assert cmki.default_scale(64, "sqrt") == pytest.approx(1 / math.sqrt(64))
    with pytest.raises(ValueError, match="bank_scale"):
        cmki.default_scale(64, "half")


@pytest.mark.parametrize("method", list(cmki.METHODS))
def test_ablation_losses_equal_their_formulas(use_kernels, method):
    """Each ablation's total against the float64 reference with its weights: L is written as the
    paper's sum, so a zero-weight term adds exactly nothing (clip: bitwise beta * L_INFO) and
    passes a zero gradient (model.BrgSA.loss keeps clip's bank out of training altogether)."""
    g = torch.Generator().manual_seed(13)
    N, K, d = 7, 19, 10
    v64, t64 = (torch.randn(N, d, generator=g, dtype=torch.float64) for _ in range(2))
    D64 = torch.randn(K, d, generator=g, dtype=torch.float64)
    alpha, beta, gamma = cmki.loss_weights(method, 0.5, 1.5, 1.0)
    assert (alpha, beta, gamma) == {"brgsa": (0.5, 1.5, 1.0), "clip": (0.0, 1.5, 0.0),
                                    "no_mse": (0.0, 1.5, 1.0), "no_info_r": (0.5, 1.5, 0.0)}[method]
    leaves = [z.float().requires_grad_() for z in (v64, t64, D64)]
    refs = [z.clone().requires_grad_() for z in (v64, t64, D64)]
    out = cmki.brgsa_loss(*leaves, tau=0.1, alpha=alpha, beta=beta, gamma=gamma)
    want = ref_loss(*refs, 0.1, alpha, beta, gamma, 1.0)
    _close(out["total"].reshape(()), want, 1e-5, f"{method} total")
    if method == "clip":
        assert torch.equal(out["total"], beta * out["info"])  # bitwise: nothing else is added
    out["total"].backward()
    want.backward()
    for got, ref, name in zip(leaves, refs, ("dv", "dt", "dD")):
        if method == "clip" and name == "dD":
            assert not got.grad.any()  # the bank enters clip's loss with weight 0 only
            continue
        _close(got.grad, ref.grad, 1e-4, f"{method} {name}")


def test_unknown_method_is_refused():
    with pytest.raises(ValueError, match="method must be one of"):
        cmki.loss_weights("bank_only", 0.5, 1.0, 1.0)
