"""The BrgSA method's maths: the Cross-Modal Knowledge Bank, CMKI, the losses and zero-shot scoring.

Lai et al., "Bridged Semantic Alignment for Zero-shot 3D Medical Image Diagnosis" (arXiv 2501.03565,
section 3). The exact equations are those of the official code (github.com/laihaoran/BrgSA): the bank
and CMKI in gloria/models/dictionarylearning.py (orthogonal init, no 1/sqrt(d)), the losses, their
weights and the zero-shot score in gloria/models/gloria_model_clip_proj_dict.py (tau = 0.1):

    x_hat    = softmax(s * x D^T) D                          CMKI: one head, no projections, s = 1
    L_INFO   = CE(S, I) + CE(S^T, I),   S_ij = cos(v_i, t_j) / tau
    L_MSE    = MSE(v_hat, v) + MSE(t_hat, t)
    L_INFO-R = CE(S_hat, I) + CE(S_hat^T, I)  on (v_hat, t_hat)
    L        = alpha * L_MSE + beta * L_INFO + gamma * L_INFO-R
    score(V, c) = 1/2 [cos(v, t_c) + cos(v_hat, t_c)]       zero-shot, the bank on the image side

Each function is written here in eager PyTorch. At the bottom, `cmki`, `info_nce` and
`cosine_scores` hand the same maths to the fused Triton kernels in kernels/ when the tensors are on
CUDA, or when TRITON_INTERPRET=1 was set before import (the CPU interpreter the tests use).

    python -c "import cmki"   # nothing to run on its own; tests/test_cmki.py checks it
"""
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F


class KnowledgeBank(nn.Module):
    """The Cross-Modal Knowledge Bank D (K entries of width d), shared by the image and text sides.

    An ordinary parameter trained by backprop (no EMA, no queue), orthogonally initialised as in the
    official code, so the K entries start out spanning as many directions as d allows.
    """

    def __init__(self, size: int, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(size, dim))  # (K, d)
        nn.init.orthogonal_(self.weight)

    def forward(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        return cmki(x, self.weight, scale)


def cmki_reference(x: torch.Tensor, bank: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """x_hat = softmax(scale * x D^T) D, eager: materialises the (N, K) attention matrix."""
    attn = torch.softmax(scale * x @ bank.t(), dim=-1)  # (N, K), softmax over the bank entries
    return attn @ bank  # (N, d)


def info_nce_reference(a: torch.Tensor, b: torch.Tensor, tau: float) -> torch.Tensor:
    """CE(S, I) + CE(S^T, I) with S_ij = cos(a_i, b_j) / tau; each CE is a mean over the batch."""
    logits = F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).t() / tau  # (N, N)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # fp32 at least for the LSE
    target = torch.arange(a.shape[0], device=a.device)  # the matching pair sits on the diagonal
    return F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)


def brgsa_loss(v, t, bank, tau=0.1, alpha=0.5, beta=1.0, gamma=1.0, scale=1.0) -> dict:
    """The full BrgSA objective on pooled, projected, un-normalised embeddings v, t (N, d).

    No stop-gradient anywhere (official code): L_MSE pulls the bank towards both modalities and
    the embeddings towards the bank at the same time.
    """
    v_hat, t_hat = cmki(v, bank, scale), cmki(t, bank, scale)  # (N, d) each
    up = torch.promote_types(v.dtype, torch.float32)  # the MSE in fp32 (fp64 for fp64) under autocast
    mse = F.mse_loss(v_hat.to(up), v.to(up)) + F.mse_loss(t_hat.to(up), t.to(up))
    info = info_nce(v, t, tau)
    info_r = info_nce(v_hat, t_hat, tau)
    total = alpha * mse + beta * info + gamma * info_r
    return dict(total=total, mse=mse, info=info, info_r=info_r)


@torch.no_grad()
def zero_shot_scores(v, t_prompts, bank, scale: float = 1.0) -> torch.Tensor:
    """Score(V, c) = 1/2 [cos(v, t_c) + cos(v_hat, t_c)]: (N, d), (C, d) -> (N, C).

    The bank is applied on the image side only, as in the official inference code; the prompt
    embeddings are computed once by the caller and reused for every volume.
    """
    v_hat = cmki(v, bank, scale)
    return 0.5 * (cosine_scores(v, t_prompts) + cosine_scores(v_hat, t_prompts)).float()


def default_scale(dim: int, mode: str) -> float:
    """'one' -> 1.0 (official code); 'sqrt' -> 1/sqrt(d) (the usual attention temperature)."""
    if mode not in ("one", "sqrt"):
        raise ValueError(f"bank_scale must be 'one' or 'sqrt', got {mode!r}")
    return 1.0 if mode == "one" else 1.0 / math.sqrt(dim)


# The objective's variants that benchmarks/ablation.py compares: the weights each one sets to zero.
# "clip" is plain contrastive alignment (beta * L_INFO only) and scores with cos(v, t) alone; the
# bank exists but takes no part in it (model.BrgSA.loss and zero_shot_scores).
METHODS = {"brgsa": {}, "clip": dict(alpha=0.0, gamma=0.0), "no_mse": dict(alpha=0.0),
           "no_info_r": dict(gamma=0.0)}


def loss_weights(method: str, alpha: float, beta: float, gamma: float) -> tuple:
    """(alpha, beta, gamma) of a method from METHODS, given the full objective's weights."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {list(METHODS)}, got {method!r}")
    w = {**dict(alpha=alpha, beta=beta, gamma=gamma), **METHODS[method]}
    return w["alpha"], w["beta"], w["gamma"]


# ----------------------------------------------------------------------------- dispatch to kernels/
# The same maths, fused. Set `cmki.USE_KERNELS = False` to force the eager path (tests flip it to
# compare the two); the kernels are imported lazily so that a machine without a working Triton still
# runs every eager path.

USE_KERNELS = True
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_kernels = None


def cmki(x: torch.Tensor, bank: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Cross-Modal Knowledge Interaction: re-express x (N, d) through the bank (K, d)."""
    if _fused(x, bank):
        return _kernel_modules()[0].bank_attention(x, bank, scale)
    return cmki_reference(x, bank, scale)


def info_nce(a: torch.Tensor, b: torch.Tensor, tau: float) -> torch.Tensor:
    """Symmetric InfoNCE on cosine logits; the fused path never stores the N x N matrix."""
    if _fused(a, b):
        return _kernel_modules()[1].contrastive_loss(a, b, tau)
    return info_nce_reference(a, b, tau)


def cosine_scores(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(N, d), (C, d) -> (N, C) cosine similarities."""
    if _fused(a, b):
        return _kernel_modules()[1].cosine_scores(a, b)
    return F.normalize(a.float(), dim=-1) @ F.normalize(b.float(), dim=-1).t()


def _fused(*tensors) -> bool:
    """True when the Triton path should run: CUDA tensors, or the interpreter was asked for."""
    if not USE_KERNELS or not (tensors[0].is_cuda or _INTERPRET):
        return False
    return len(_kernel_modules()) == 2


def _kernel_modules():
    global _kernels
    if _kernels is None:
        try:
            from kernels import bank_attention, similarity
            _kernels = (bank_attention, similarity)
        except ImportError:  # no Triton installed: every call falls back to the eager reference
            _kernels = ()
    return _kernels
