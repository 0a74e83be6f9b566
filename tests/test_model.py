"""model.py: shapes for both presets, the paper preset's size, the official text pooling, patch grids."""
import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from model import PRESETS, BrgSA, ModelConfig, TextEncoder, ViT3D, interpolate_table, sincos_table

SMALL = dataclasses.replace(PRESETS["tiny"], vit_width=48, vit_depth=2, vit_heads=2, text_width=48,
                            text_depth=2, text_heads=2, text_mlp=96, embed_dim=24, bank_size=16,
                            vocab_size=100)


def test_forward_returns_embeddings_and_the_loss_backprops():
    torch.manual_seed(0)
    m = BrgSA(SMALL)
    vol = torch.randn(3, 1, *SMALL.crop_size)
    ids = torch.randint(5, 100, (3, 11))
    mask = torch.ones(3, 11, dtype=torch.long)
    mask[1, 6:] = 0
    v, t = m(vol, ids, mask)
    assert v.shape == t.shape == (3, SMALL.embed_dim)
    out = m.loss(v, t)
    assert set(out) == {"total", "mse", "info", "info_r"}
    assert all(v.ndim == 0 and torch.isfinite(v) for v in out.values())
    out["total"].backward()
    missing = [n for n, p in m.named_parameters() if p.grad is None]
    assert not missing, f"parameters without gradient: {missing}"
    clip = BrgSA(dataclasses.replace(SMALL, method="clip"))  # plain contrastive: the bank is untrained
    clip.loss(*clip(vol, ids, mask))["total"].backward()
    assert clip.bank.weight.grad is None and clip.visual.head.weight.grad is not None


def test_vit_accepts_crop_and_full_volume_grids():
    cfg = dataclasses.replace(SMALL, input_centering=False, crop_size=(32, 32, 24), vit_pool="mean")
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


@pytest.mark.parametrize("text_pool", ["max_len", "mean"])
def test_text_pooling(text_pool):
    torch.manual_seed(1)
    enc = TextEncoder(dataclasses.replace(SMALL, text_pool=text_pool)).eval().double()
    ids = torch.randint(5, 100, (3, 9))
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[0, 4:] = 0
    mask[2, 1:] = 0  # a single token
    got = enc(ids, mask)
    # Recompute by hand in float64: sum of the last 4 hidden states (here all layers, depth 2),
    # masked token sum, divided by max_len = 97 (official: not the true length) or, with "mean",
    # by each text's own number of tokens (4, 9, 1), then the projection.
    hidden = []
    pos = torch.arange(9)
    x = enc.word_embeddings(ids) + enc.position_embeddings(pos)[None] + enc.token_type_embeddings.weight[0]
    x = enc.embed_norm(x)
    for layer in enc.layers:
        x = layer(x, mask.bool()[:, None, None, :])
        hidden.append(x)
    divisor = torch.tensor([[4.0], [9.0], [1.0]], dtype=torch.float64) if text_pool == "mean" else 97
    pooled = (sum(hidden[-4:]) * mask[..., None]).sum(1) / divisor
    torch.testing.assert_close(got, enc.head(pooled), rtol=1e-12, atol=1e-12)
    # Padding content does not matter, and trimming padding columns does not change the result.
    ids2 = ids.clone()
    ids2[0, 4:] = 7
    torch.testing.assert_close(enc(ids2, mask), got, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(enc(ids[:1, :4], mask[:1, :4]), got[:1], rtol=1e-12, atol=1e-12)


def test_unknown_text_pool_is_rejected():
    with pytest.raises(ValueError, match="text_pool must be"):
        TextEncoder(dataclasses.replace(SMALL, text_pool="cls"))


def test_text_encoder_rejects_too_long_input():
    enc = TextEncoder(SMALL)
    with pytest.raises(ValueError, match="at most 97"):
        enc(torch.ones(1, 98, dtype=torch.long), torch.ones(1, 98, dtype=torch.long))


def test_sincos_table_is_fixed_and_distinct():
    table = sincos_table((3, 4, 5), 48)
    assert table.shape == (60, 48)
    assert torch.cdist(table, table).add(torch.eye(60) * 10).min() > 1e-3  # every position distinct
    assert sincos_table((2, 2, 2), 50)[:, 48:].abs().max() == 0  # leftover channels stay zero
    assert not any(isinstance(b, torch.nn.Parameter) for b in ViT3D(SMALL).buffers())


def test_grad_checkpoint_gives_same_gradients():
    torch.manual_seed(2)
    m1 = BrgSA(SMALL)
    m2 = BrgSA(dataclasses.replace(SMALL, grad_checkpoint=True))
    m2.load_state_dict(m1.state_dict())
    vol, ids = torch.randn(2, 1, *SMALL.crop_size), torch.randint(5, 100, (2, 6))
    mask = torch.ones(2, 6, dtype=torch.long)
    for m in (m1, m2):
        m.loss(*m(vol, ids, mask))["total"].backward()
    for (n, p1), p2 in zip(m1.named_parameters(), m2.parameters()):
        torch.testing.assert_close(p1.grad, p2.grad, rtol=1e-5, atol=1e-7, msg=n)


# ----------------------------------------------------------------------------- official-code details

def linear_interp_matrix(n: int, m: int) -> np.ndarray:
    """(m, n) weights of 1-D linear resizing n -> m with align_corners=False (PyTorch's rule:
    source x = (i + 0.5) n / m - 0.5, clamped at 0), in float64."""
    W = np.zeros((m, n))
    for i in range(m):
        x = max((i + 0.5) * n / m - 0.5, 0.0)
        lo = min(int(np.floor(x)), n - 1)
        hi, f = min(lo + 1, n - 1), x - lo
        W[i, lo] += 1 - f
        W[i, hi] += f
    return W


def test_position_table_interpolation_is_trilinear():
    torch.manual_seed(0)
    base, grid, C = (3, 4, 2), (5, 4, 3), 6
    table = torch.randn(1 + 24, C, dtype=torch.float64)
    out = interpolate_table(table, base, grid)
    assert out.shape == (1 + 60, C) and torch.equal(out[0], table[0])  # CLS row untouched
    # independent reference: a separable product of 1-D linear resizes, in float64
    W = [linear_interp_matrix(n, m) for n, m in zip(base, grid)]
    ref = np.einsum("ai,bj,ck,ijkd->abcd", *W, table[1:].numpy().reshape(*base, C))
    np.testing.assert_allclose(out[1:].numpy(), ref.reshape(-1, C), rtol=0, atol=1e-12)
    # and the same as F.interpolate of the table laid out as a (1, C, gx, gy, gz) volume
    vol = table[1:].reshape(1, *base, C).permute(0, 4, 1, 2, 3)
    f = F.interpolate(vol, size=grid, mode="trilinear", align_corners=False)
    torch.testing.assert_close(out[1:], f.permute(0, 2, 3, 4, 1).reshape(-1, C))
    assert interpolate_table(table, base, base) is table


@pytest.mark.parametrize("unit", [False, True])
def test_sincos_table_formula(unit):
    """One builder, two position conventions: integer patch indices (the CPU presets) and the
    official code's 0..1 coordinates (np.linspace), against a float64 numpy write-out."""
    grid, C = (2, 3, 4), 26  # 26: two leftover channels
    t = sincos_table(grid, C, unit=unit).double().numpy()
    half = C // 6
    omega = 10000.0 ** (-np.arange(half) / half)
    coords = np.meshgrid(*[np.linspace(0, 1, g) if unit else np.arange(g) for g in grid], indexing="ij")
    ref = np.concatenate([f(c.reshape(-1, 1) * omega) for c in coords for f in (np.sin, np.cos)], 1)
    assert t.shape == (24, C) and not t[:, 6 * half:].any()
    np.testing.assert_allclose(t[:, :6 * half], ref, atol=1e-6)
    if unit:  # the paper preset's table: this one with a zero CLS row first
        cfg = dataclasses.replace(PRESETS["paper"], crop_size=(32, 48, 32), vit_width=C, vit_heads=2,
                                  vit_depth=0)
        table = ViT3D(cfg).pos_embed
        assert not table[0].any() and torch.equal(table[1:], torch.from_numpy(t).float())


def test_table_positions_feed_the_blocks_interpolated_to_the_input_grid():
    torch.manual_seed(0)
    cfg = dataclasses.replace(PRESETS["tiny"], pos_embed="table", input_centering=False,
                              crop_size=(32, 32, 16), patch_size=(16, 16, 8), vit_width=24,
                              vit_heads=2, vit_depth=1, vit_pool="cls")
    vit = ViT3D(cfg).eval()
    assert vit.base_grid == (2, 2, 2) and vit.pos_embed.shape == (9, 24)
    vit.pos_embed.normal_()  # as if pretrained: every row distinct
    seen = {}
    vit.blocks[0].register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0]))
    for shape in ((32, 32, 16), (48, 32, 24)):  # the crop grid, then a larger test grid
        x = torch.randn(2, 1, *shape)
        with torch.no_grad():
            vit(x)
            grid = tuple(s // p for s, p in zip(shape, cfg.patch_size))
            pos = interpolate_table(vit.pos_embed, (2, 2, 2), grid)
            tokens = vit.patch_embed(x).flatten(2).transpose(1, 2) + pos[1:]
            ref = torch.cat([vit.cls_token.expand(2, -1, -1) + pos[0], tokens], 1)
        torch.testing.assert_close(seen["x"], ref)
    assert "pos_embed" not in dict(vit.named_parameters())  # stored, not trained


def test_paper_preset_follows_the_official_code_and_tiny_is_unchanged():
    paper, tiny = PRESETS["paper"], PRESETS["tiny"]
    assert (paper.pos_embed, paper.vit_norm_eps, paper.text_dropout, paper.dropout, paper.init) == \
        ("table", 1e-6, 0.1, 0.0, "official")
    assert (tiny.pos_embed, tiny.vit_norm_eps, tiny.text_dropout, tiny.init) == \
        ("sincos", 1e-5, None, "trunc_normal")
    assert "visual.pos_embed" not in BrgSA(tiny).state_dict()
    # an older checkpoint's config (no new fields) builds the model it was trained with
    old = {k: v for k, v in dataclasses.asdict(paper).items()
           if k not in ("pos_embed", "vit_norm_eps", "text_dropout", "init")}
    assert ModelConfig(**old).pos_embed == "sincos"


def test_official_init_eps_and_dropout_on_a_reduced_paper_model():
    torch.manual_seed(0)
    cfg = dataclasses.replace(PRESETS["paper"], vit_width=96, vit_depth=2, vit_heads=4,
                              text_width=64, text_depth=2, text_heads=4, text_mlp=128,
                              vocab_size=100, embed_dim=32, bank_size=16)
    m = BrgSA(cfg)
    blk = m.visual.blocks[0]
    assert blk.norm1.eps == blk.norm2.eps == 1e-6 and m.visual.norm.eps == 1e-5
    assert blk.mlp.dropout.p == 0.0 and m.text.dropout.p == m.text.layers[0].mlp.dropout.p == 0.1
    assert m.text.layers[0].attn.dropout == 0.1
    fc1 = blk.mlp.fc1.weight.detach()  # xavier uniform: U(-b, b), b = sqrt(6 / (fan_in + fan_out))
    b = (6 / (96 + 384)) ** 0.5
    assert fc1.abs().max() <= b and fc1.abs().max() > 0.95 * b and fc1.std().item() == pytest.approx(b / 3 ** 0.5, rel=0.05)
    assert m.text.layers[0].mlp.fc1.weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert m.text.layers[0].mlp.fc1.weight.abs().max() > 0.06  # normal, not truncated at 2 std
    head = m.visual.head.weight.detach()  # PyTorch's default Linear init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    assert head.abs().max() <= 96 ** -0.5 and head.abs().max() > 0.9 * 96 ** -0.5
    assert not m.visual.head.bias.eq(0).all()


def test_zero_shot_scores_follow_the_method():
    """brgsa scores 1/2 [cos(v, t) + cos(v_hat, t)]; the bank-less clip ablation scores cos(v, t)."""
    torch.manual_seed(0)
    v, t = torch.randn(5, SMALL.embed_dim), torch.randn(3, SMALL.embed_dim)
    for method in ("brgsa", "clip"):
        model = BrgSA(dataclasses.replace(SMALL, method=method))
        D = model.bank.weight.detach().double()
        cos = lambda a, b: (a / a.norm(dim=1, keepdim=True)) @ (b / b.norm(dim=1, keepdim=True)).t()
        v_hat = torch.softmax(v.double() @ D.t() * model.scale, dim=1) @ D
        raw = cos(v.double(), t.double())
        want = raw if method == "clip" else 0.5 * (raw + cos(v_hat, t.double()))
        torch.testing.assert_close(model.zero_shot_scores(v, t).double(), want, rtol=1e-5, atol=1e-6)


def test_position_pooling_starts_as_mean_pooling_and_reads_out_per_position():
    """v = mean_i [head(x_i) + T x_i P_i]: equal to mean pooling while P = 0; each patch position
    has its own read-out (float64 reference on the final tokens); the per-patch embeddings that the
    grounding maps score average to v."""
    torch.manual_seed(0)
    cfg = dataclasses.replace(SMALL, vit_pool="position")
    pos, mean = ViT3D(cfg).double().eval(), ViT3D(dataclasses.replace(SMALL, vit_pool="mean")).double().eval()
    mean.load_state_dict({k: v for k, v in pos.state_dict().items() if k != "position_head"})
    x = torch.randn(2, 1, *SMALL.image_size, dtype=torch.float64)
    torch.testing.assert_close(pos(x), mean(x))
    with torch.no_grad():
        pos.position_head.normal_()
    tokens, _ = pos.tokens(x)
    patches = tokens[:, 1:]  # (B, T, C)
    T = patches.shape[1]
    want = sum(pos.head(patches[:, i]) + T * patches[:, i] @ pos.position_head[i] for i in range(T)) / T
    torch.testing.assert_close(pos(x), want)
    torch.testing.assert_close(pos.patch_embeddings(tokens).mean(1), pos(x))
    pos(x).sum().backward()
    assert pos.position_head.grad.abs().sum(dim=(1, 2)).gt(0).all()  # every position learns
    with pytest.raises(ValueError, match="position pooling was built for"):
        pos.patch_embeddings(tokens[:, :-1])
    with pytest.raises(ValueError, match="position pooling needs whole volumes"):
        ViT3D(dataclasses.replace(cfg, crop_size=(32, 32, 24)))


def test_bert_layer_is_post_norm_as_written_out():
    """model.PostNormBlock against BERT's layer written out in float64 from its own weights:
    h = LN(x + MHSA(x)), y = LN(h + W2 gelu(W1 h)) with a padding mask; a pre-norm block (LN
    before each sublayer) gives other numbers, so the loaded BERT weights would be misread."""
    from model import PostNormBlock
    torch.manual_seed(0)
    B, T, C, H = 2, 7, 24, 3
    blk = PostNormBlock(C, H, 48, 0.0).double().eval()
    for p in blk.parameters():  # LayerNorm affine away from (1, 0), so that it counts
        p.data.normal_(0, 0.3)
    x = torch.randn(B, T, C, dtype=torch.float64)
    keep = torch.ones(B, T, dtype=torch.bool)
    keep[1, 4:] = False

    def ln(z, norm):
        mu, var = z.mean(-1, keepdim=True), z.var(-1, unbiased=False, keepdim=True)
        return (z - mu) / torch.sqrt(var + 1e-12) * norm.weight + norm.bias

    def mhsa(z):
        q, k, v = (z @ w.T + b for w, b in zip(blk.attn.qkv.weight.chunk(3), blk.attn.qkv.bias.chunk(3)))
        split = lambda a: a.view(B, T, H, C // H).transpose(1, 2)  # noqa: E731
        s = split(q) @ split(k).transpose(-1, -2) / math.sqrt(C // H)
        s = s.masked_fill(~keep[:, None, None, :], float("-inf"))
        y = (torch.softmax(s, -1) @ split(v)).transpose(1, 2).reshape(B, T, C)
        return y @ blk.attn.proj.weight.T + blk.attn.proj.bias

    def mlp(z):
        h = F.gelu(z @ blk.mlp.fc1.weight.T + blk.mlp.fc1.bias)
        return h @ blk.mlp.fc2.weight.T + blk.mlp.fc2.bias

    h = ln(x + mhsa(x), blk.norm1)
    want = ln(h + mlp(h), blk.norm2)
    got = blk(x, keep[:, None, None, :])
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    pre_h = x + mhsa(ln(x, blk.norm1))
    assert (pre_h + mlp(ln(pre_h, blk.norm2)) - got).abs().max() > 0.1
