"""Training through the fused kernels: a few optimizer steps of a shrunken tiny preset give the same
losses with cmki.USE_KERNELS on (Triton interpreter) as with the eager references.

Plain SGD keeps the comparison sharp: Adam would turn rounding-level differences in near-zero
gradients into full-size steps of opposite sign.
"""
import dataclasses

import pytest
import torch

import cmki
import model
from kernels import bank_attention, similarity

STEPS, B, L = 3, 6, 12


def _config():
    """The tiny preset, shrunk so that a step through the interpreter takes about a second."""
    small = dict(image_size=(16, 16, 8), crop_size=(16, 16, 8), patch_size=(8, 8, 4), vit_width=32,
                 vit_depth=1, vit_heads=2, vocab_size=64, max_len=L, text_width=32, text_depth=1,
                 text_heads=2, text_mlp=64, embed_dim=48, bank_size=80)
    names = {f.name for f in dataclasses.fields(model.ModelConfig)}
    return dataclasses.replace(model.PRESETS["tiny"], **{k: v for k, v in small.items() if k in names})


def _train(use_kernels: bool, monkeypatch) -> list[dict]:
    monkeypatch.setattr(cmki, "USE_KERNELS", use_kernels)
    cfg = _config()
    torch.manual_seed(0)
    net = model.BrgSA(cfg)
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(STEPS):
        volume = torch.randn(B, 1, *cfg.crop_size, generator=g)  # (B, 1, X, Y, Z)
        ids = torch.randint(1, cfg.vocab_size, (B, L), generator=g)  # (B, L)
        mask = (torch.arange(L)[None] < torch.randint(3, L + 1, (B, 1), generator=g)).long()
        out = net.loss(*net(volume, ids * mask, mask))
        opt.zero_grad()
        out["total"].backward()
        opt.step()
        losses.append({k: v.item() for k, v in out.items()})
    return losses


def test_training_steps_match_eager(monkeypatch):
    calls = {"bank": 0, "nce": 0}

    def counted(fn, key):
        def wrapper(*args, **kwargs):
            calls[key] += 1
            return fn(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(bank_attention, "bank_attention", counted(bank_attention.bank_attention, "bank"))
    monkeypatch.setattr(similarity, "contrastive_loss", counted(similarity.contrastive_loss, "nce"))
    fused = _train(True, monkeypatch)
    assert calls == {"bank": 2 * STEPS, "nce": 2 * STEPS}, f"the fused path did not run: {calls}"
    eager = _train(False, monkeypatch)
    assert calls == {"bank": 2 * STEPS, "nce": 2 * STEPS}, "the eager run reached the kernels"
    for step, (f, e) in enumerate(zip(fused, eager)):
        for key in ("total", "mse", "info", "info_r"):
            assert f[key] == pytest.approx(e[key], rel=1e-5, abs=1e-6), \
                f"step {step} {key}: fused {f[key]:.6f} vs eager {e[key]:.6f}"
    assert fused[-1]["total"] != fused[0]["total"]  # the steps changed the model
