"""model.py: shapes for both presets, the paper preset's size, the official text pooling, patch grids."""
import dataclasses

import pytest
import torch

from model import PRESETS, BrgSA, TextEncoder, ViT3D, sincos_3d

SMALL = dataclasses.replace(PRESETS["tiny"], vit_width=48, vit_depth=2, vit_heads=2, text_width=48,
                            text_depth=2, text_heads=2, text_mlp=96, embed_dim=24, bank_size=16,
                            vocab_size=100)


def test_tiny_forward_returns_loss_dict_and_backprops():
    torch.manual_seed(0)
    m = BrgSA(SMALL)
    vol = torch.randn(3, 1, *SMALL.crop_size)
    ids = torch.randint(5, 100, (3, 11))
    mask = torch.ones(3, 11, dtype=torch.long)
    mask[1, 6:] = 0
    out = m(vol, ids, mask)
    assert set(out) == {"total", "mse", "info", "info_r"}
    assert all(v.ndim == 0 and torch.isfinite(v) for v in out.values())
    out["total"].backward()
    missing = [n for n, p in m.named_parameters() if p.grad is None]
    assert not missing, f"parameters without gradient: {missing}"


def test_vit_accepts_crop_and_full_volume_grids():
    cfg = dataclasses.replace(SMALL, input_centering=False, crop_size=(32, 32, 24))
    m = ViT3D(cfg).eval()
    for size in (cfg.crop_size, cfg.image_size):
        assert m(torch.randn(2, 1, *size)).shape == (2, cfg.embed_dim)
    with pytest.raises(ValueError, match="divisible"):
        m(torch.randn(1, 1, 41, 40, 28))
    with pytest.raises(ValueError, match=r"\(B, 1, X, Y, Z\)"):
        m(torch.randn(1, 40, 40, 28))


def test_mean_pooling_ignores_the_cls_token_and_cls_pooling_uses_it():
    x = torch.randn(2, 1, *SMALL.image_size)
    for pool, depends in (("mean", False), ("cls", True)):
        torch.manual_seed(0)
        m = ViT3D(dataclasses.replace(SMALL, vit_pool=pool, vit_depth=0)).eval()  # no attention
        before = m(x)
        with torch.no_grad():
            m.cls_token.add_(1.0)
        assert torch.allclose(before, m(x)) != depends, pool


def test_input_centering_subtracts_the_stored_mean():
    torch.manual_seed(0)
    centred = ViT3D(SMALL).eval()
    plain = ViT3D(dataclasses.replace(SMALL, input_centering=False)).eval()
    plain.load_state_dict({k: v for k, v in centred.state_dict().items() if k != "input_mean"})
    mean, x = torch.randn(1, *SMALL.image_size), torch.randn(2, 1, *SMALL.image_size)
    centred.set_input_mean(mean)
    assert "input_mean" in centred.state_dict()  # travels with checkpoints
    torch.testing.assert_close(centred(x), plain(x - mean), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(centred(x), plain(x), atol=1e-3)
    with pytest.raises(ValueError, match="input centering"):
        centred(torch.randn(1, 1, 32, 32, 24))


def test_paper_preset_size_and_reduced_forward():
    cfg = PRESETS["paper"]
    assert (cfg.vit_width, cfg.vit_depth, cfg.embed_dim, cfg.bank_size, cfg.patch_size) == \
        (768, 12, 768, 2048, (16, 16, 8))
    m = BrgSA(cfg)
    n = m.num_params()
    assert 190e6 < n < 210e6, f"paper preset has {n / 1e6:.1f} M parameters, expected about 200 M"
    with torch.no_grad():  # a reduced input: 2 x 2 x 2 patches, 5 tokens
        v = m.visual(torch.randn(1, 1, 32, 32, 16))
        t = m.text(torch.randint(1, 1000, (1, 7)), torch.ones(1, 7, dtype=torch.long))
    assert v.shape == t.shape == (1, 768)


def test_text_pooling_is_official_sum_over_max_len():
    torch.manual_seed(1)
    enc = TextEncoder(SMALL).eval()
    ids = torch.randint(5, 100, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[0, 4:] = 0
    got = enc(ids, mask)
    # Recompute by hand: sum of the last 4 hidden states (here all layers, depth 2), masked token
    # sum, divided by max_len = 97 (not the true length), then the projection.
    hidden = []
    pos = torch.arange(9)
    x = enc.word_embeddings(ids) + enc.position_embeddings(pos)[None] + enc.token_type_embeddings.weight[0]
    x = enc.embed_norm(x)
    for layer in enc.layers:
        x = layer(x, mask.bool()[:, None, None, :])
        hidden.append(x)
    pooled = (sum(hidden[-4:]) * mask[..., None]).sum(1) / 97
    torch.testing.assert_close(got, enc.head(pooled), rtol=1e-5, atol=1e-6)
    # Padding content does not matter, and trimming padding columns does not change the result.
    ids2 = ids.clone()
    ids2[0, 4:] = 7
    torch.testing.assert_close(enc(ids2, mask), got, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(enc(ids[:1, :4], mask[:1, :4]), got[:1], rtol=1e-5, atol=1e-6)


def test_text_encoder_rejects_too_long_input():
    enc = TextEncoder(SMALL)
    with pytest.raises(ValueError, match="at most 97"):
        enc(torch.ones(1, 98, dtype=torch.long), torch.ones(1, 98, dtype=torch.long))


def test_sincos_table_is_fixed_and_distinct():
    table = sincos_3d((3, 4, 5), 48)
    assert table.shape == (60, 48)
    assert torch.cdist(table, table).add(torch.eye(60) * 10).min() > 1e-3  # every position distinct
    assert sincos_3d((2, 2, 2), 50)[:, 48:].abs().max() == 0  # leftover channels stay zero
    assert not any(isinstance(b, torch.nn.Parameter) for b in ViT3D(SMALL).buffers())


def test_grad_checkpoint_gives_same_gradients():
    torch.manual_seed(2)
    m1 = BrgSA(SMALL)
    m2 = BrgSA(dataclasses.replace(SMALL, grad_checkpoint=True))
    m2.load_state_dict(m1.state_dict())
    vol, ids = torch.randn(2, 1, *SMALL.crop_size), torch.randint(5, 100, (2, 6))
    mask = torch.ones(2, 6, dtype=torch.long)
    for m in (m1, m2):
        m(vol, ids, mask)["total"].backward()
    for (n, p1), p2 in zip(m1.named_parameters(), m2.parameters()):
        torch.testing.assert_close(p1.grad, p2.grad, rtol=1e-5, atol=1e-7, msg=n)
