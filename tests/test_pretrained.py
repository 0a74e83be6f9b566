"""prepare/pretrained.py: BERT and timm-style ViT weights load into our encoders and compute the same
function as the reference implementations (transformers' BertModel; timm's Block) on random weights."""
import json
from dataclasses import replace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import data
from prepare import pretrained
from model import PRESETS, TextEncoder, ViT3D, interpolate_table, sincos_table

TOL = 1e-5


def pooled_input(encoder, *args):
    """What the encoder feeds its head (the pooled features), captured with a hook."""
    seen = {}
    hook = encoder.head.register_forward_pre_hook(lambda m, a: seen.setdefault("x", a[0]))
    with torch.no_grad():
        encoder(*args)
    hook.remove()
    return seen["x"]


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=60, hidden_size=48, num_hidden_layers=5,
                                     num_attention_heads=4, intermediate_size=80,
                                     max_position_embeddings=128)
    bert = transformers.BertModel(config).eval()
    for p in bert.parameters():  # away from the init's zeros / ones, so every tensor matters
        p.data.add_(0.05 * torch.randn_like(p))
    folder = tmp_path_factory.mktemp("bert")
    bert.save_pretrained(folder)  # config.json + model.safetensors
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(55)]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    return folder, bert


def test_bert_loads_and_matches_transformers(bert_dir):
    folder, bert = bert_dir
    cfg = replace(PRESETS["tiny"], **pretrained.bert_text_config(folder))
    assert cfg.prompt == PRESETS["paper"].prompt == "There is {}"  # not the from-scratch tiny's "{}."
    text = TextEncoder(cfg).eval()
    report = pretrained.load_bert(text, folder)
    assert set(report.missing) == {"head.weight", "head.bias"}, report.summary()
    assert all(k.startswith("pooler.") for k in report.unexpected), report.summary()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 60, (3, 21), generator=g)
    mask = torch.ones_like(ids)
    mask[0, 9:], mask[2, 15:] = 0, 0
    ours = pooled_input(text, ids, mask)
    with torch.no_grad():
        hs = bert(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    # the official pooling on BertModel's own hidden states: last 4 summed, masked sum / max_len
    ref = (sum(hs[-4:]) * mask[..., None]).sum(1) / cfg.max_len
    err = (ours - ref).abs().max().item()
    assert err <= TOL, f"max abs error {err:.2e} vs transformers.BertModel"


def test_bert_pytorch_bin_and_safetensors_reader_agree(bert_dir, tmp_path):
    folder, bert = bert_dir
    safetensors = pytest.importorskip("safetensors.torch")
    ours = pretrained.read_safetensors(folder / "model.safetensors")
    ref = safetensors.load_file(str(folder / "model.safetensors"))
    assert ours.keys() == ref.keys() and all(torch.equal(ours[k], ref[k]) for k in ref)
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    torch.save({"bert." + k: v for k, v in bert.state_dict().items()}, tmp_path / "pytorch_model.bin")
    cfg = replace(PRESETS["tiny"], **pretrained.bert_text_config(folder))
    a, b = TextEncoder(cfg), TextEncoder(cfg)
    pretrained.load_bert(a, folder)
    pretrained.load_bert(b, tmp_path)  # "bert." prefix, pickle format
    for k, v in a.state_dict().items():
        if not k.startswith("head."):
            assert torch.equal(v, b.state_dict()[k]), k


def test_bert_of_another_size_is_a_clear_error(bert_dir):
    folder, _ = bert_dir
    text = TextEncoder(replace(PRESETS["tiny"], vocab_size=60, text_width=32, text_depth=2,
                               text_heads=4, text_mlp=80))
    with pytest.raises(ValueError, match="word_embeddings.weight has shape"):
        pretrained.load_bert(text, folder)
    cfg = json.loads((folder / "config.json").read_text())
    assert pretrained.bert_text_config(folder)["text_depth"] == cfg["num_hidden_layers"]


class TimmBlock(nn.Module):
    """timm.models.vision_transformer.Block (timm 1.0) with its defaults: pre-norm, nn.LayerNorm
    (eps 1e-5), qkv bias, GELU MLP of ratio 4, no layer scale / drop path. Attention is written out
    (softmax(q k^T / sqrt(hd)) v) instead of timm's fused SDPA call, as an independent reference.
    Used when timm cannot be imported (timm needs torchvision)."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.Module()
        self.attn.qkv, self.attn.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Module()
        self.mlp.fc1, self.mlp.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.attn.qkv(self.norm1(x)).reshape(B, N, 3, self.heads, C // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # (B, nh, N, hd) each
        a = torch.softmax(q @ k.transpose(-2, -1) * (C // self.heads) ** -0.5, dim=-1)
        x = x + self.attn.proj((a @ v).transpose(1, 2).reshape(B, N, C))
        return x + self.mlp.fc2(F.gelu(self.mlp.fc1(self.norm2(x))))


def timm_block(dim, heads):
    try:
        from timm.models.vision_transformer import Block
    except ImportError:
        return TimmBlock(dim, heads)
    return Block(dim, heads, mlp_ratio=4.0, qkv_bias=True)


def test_inflated_2d_vit_matches_timm_blocks(tmp_path):
    torch.manual_seed(0)
    cfg = replace(PRESETS["tiny"], input_centering=False, vit_pool="cls", patch_size=(8, 8, 4),
                  vit_width=48, vit_depth=2, vit_heads=4)
    blocks = nn.ModuleList(timm_block(48, 4) for _ in range(2)).eval()
    norm = nn.LayerNorm(48)
    sd = {f"blocks.{k}": v for k, v in blocks.state_dict().items()}
    sd.update({f"norm.{k}": v for k, v in norm.state_dict().items()})
    for v in sd.values():
        v.add_(0.05 * torch.randn_like(v))
    sd.update({"patch_embed.proj.weight": torch.randn(48, 3, 8, 8) * 0.05,
               "patch_embed.proj.bias": torch.randn(48) * 0.05, "cls_token": torch.randn(1, 1, 48),
               "pos_embed": torch.randn(1, 1 + 14 * 14, 48), "head.weight": torch.randn(10, 48),
               "head.bias": torch.randn(10)})
    blocks.load_state_dict({k[7:]: v for k, v in sd.items() if k.startswith("blocks.")})
    norm.load_state_dict({"weight": sd["norm.weight"], "bias": sd["norm.bias"]})
    torch.save({"model": sd}, tmp_path / "vit.pth")
    vit = ViT3D(cfg).eval()
    report = pretrained.load_vit(vit, tmp_path / "vit.pth")
    assert set(report.missing) == {"head.weight", "head.bias"}, report.summary()
    assert set(report.unexpected) == {"pos_embed", "head.weight", "head.bias"}, report.summary()

    volume = torch.randn(2, 1, 16, 24, 8)
    ours = pooled_input(vit, volume)
    # reference: the 2-D RGB patch embedding on every z slice (grey -> 3 equal channels), averaged
    # over the 4 slices of a patch: what inflation promises
    slices = volume[:, 0].permute(0, 3, 1, 2).reshape(-1, 1, 16, 24).expand(-1, 3, -1, -1)
    emb = F.conv2d(slices, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=8)
    emb = emb.reshape(2, 2, 4, 48, 2, 3).mean(2)  # (B, gz, C, gx, gy), mean over a patch's slices
    x = emb.permute(0, 3, 4, 1, 2).reshape(2, 2 * 3 * 2, 48)  # tokens in (x, y, z) order
    x = x + sincos_table((2, 3, 2), 48)
    x = torch.cat([sd["cls_token"].expand(2, -1, -1), x], 1)
    with torch.no_grad():
        for b in blocks:
            x = b(x)
        ref = norm(x)[:, 0]
    err = (ours - ref).abs().max().item()
    assert err <= TOL, f"max abs error {err:.2e} vs timm Blocks"


def test_3d_vit_weights_load_as_is_and_wrong_sizes_fail(tmp_path):
    cfg = replace(PRESETS["tiny"], vit_pool="cls", vit_width=48, vit_depth=1, vit_heads=4)
    src = ViT3D(cfg)
    sd = {("patch_embed.proj." + k[12:] if k.startswith("patch_embed.") else k): v
          for k, v in src.state_dict().items() if not k.startswith("head.")}
    torch.save(sd, tmp_path / "vit3d.pth")
    dst = ViT3D(cfg)
    report = pretrained.load_vit(dst, tmp_path / "vit3d.pth")
    assert set(report.missing) == {"head.weight", "head.bias"} and torch.equal(dst.patch_embed.weight, src.patch_embed.weight)
    with pytest.raises(ValueError, match="another model size"):
        pretrained.load_vit(ViT3D(replace(cfg, vit_width=32, vit_heads=4)), tmp_path / "vit3d.pth")


# ----------------------------------------------------------------------------- the official 3-D ViT

OFFICIAL = replace(PRESETS["paper"], crop_size=(32, 32, 16), image_size=(48, 32, 24),
                   patch_size=(16, 16, 8), vit_width=48, vit_depth=2, vit_heads=4, embed_dim=24)


def official_state_dict(grid=(2, 2, 2), C=48, depth=2, seed=0):
    """A state dict in the official ViT3D's layout (stander_3D_vit_relate_pe.py: timm Blocks with
    LayerNorm eps 1e-6, patch_embed.proj a Conv3d, cls_token, pos_embed (1, 1 + N, C), norm), with
    random weights; and the timm-style blocks + final norm that compute with them."""
    torch.manual_seed(seed)
    blocks = nn.ModuleList(timm_block(C, 4) for _ in range(depth)).eval()
    for b in blocks:
        b.norm1.eps = b.norm2.eps = 1e-6
    norm = nn.LayerNorm(C)
    sd = {f"blocks.{k}": v for k, v in blocks.state_dict().items()}
    sd.update({f"norm.{k}": v for k, v in norm.state_dict().items()})
    for v in sd.values():
        v.add_(0.05 * torch.randn_like(v))
    n = grid[0] * grid[1] * grid[2]
    sd.update({"patch_embed.proj.weight": torch.randn(C, 1, 16, 16, 8) * 0.02,
               "patch_embed.proj.bias": torch.randn(C) * 0.05, "cls_token": torch.randn(1, 1, C),
               "pos_embed": torch.randn(1, 1 + n, C)})
    blocks.load_state_dict({k[7:]: v for k, v in sd.items() if k.startswith("blocks.")})
    norm.load_state_dict({"weight": sd["norm.weight"], "bias": sd["norm.bias"]})
    return sd, blocks, norm


def test_official_3d_vit_loads_with_its_position_table_and_computes_the_same(tmp_path):
    sd, blocks, norm = official_state_dict()
    torch.save(sd, tmp_path / "vit_b16_3D_m3ae.pth")  # a bare state dict, as the official file
    vit = ViT3D(OFFICIAL).eval()
    report = pretrained.load_vit(vit, tmp_path / "vit_b16_3D_m3ae.pth")
    assert set(report.missing) == {"head.weight", "head.bias"} and not report.unexpected, report.summary()
    assert torch.equal(vit.pos_embed, sd["pos_embed"][0])
    volume = torch.randn(2, 1, 48, 32, 24)  # test grid 3 x 2 x 3, the table is for 2 x 2 x 2
    # reference: the official forward (TokenizerImage with _interpolate_pos_encoding, blocks, norm)
    pos = sd["pos_embed"][:, 1:].reshape(1, 2, 2, 2, 48).permute(0, 4, 1, 2, 3)
    pos = F.interpolate(pos, size=(3, 2, 3), mode="trilinear", align_corners=False)
    x = F.conv3d(volume, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=(16, 16, 8))
    x = torch.cat([sd["cls_token"].expand(2, -1, -1), x.flatten(2).transpose(1, 2)], 1)
    x = x + torch.cat([sd["pos_embed"][:, :1], pos.flatten(2).transpose(1, 2)], 1)
    with torch.no_grad():
        for b in blocks:
            x = b(x)
        ref = norm(x)[:, 0]
    err = (pooled_input(vit, volume) - ref).abs().max().item()
    assert err <= TOL, f"max abs error {err:.2e} vs the official forward"


def test_official_pos_embed_of_another_cube_is_resized_and_sincos_models_skip_it(tmp_path):
    sd, _, _ = official_state_dict(grid=(3, 3, 3))
    torch.save({"state_dict": sd}, tmp_path / "w.pth")
    vit = ViT3D(OFFICIAL)
    pretrained.load_vit(vit, tmp_path / "w.pth")
    torch.testing.assert_close(vit.pos_embed, interpolate_table(sd["pos_embed"][0], (3, 3, 3), (2, 2, 2)))
    plain = ViT3D(replace(OFFICIAL, pos_embed="sincos"))
    report = pretrained.load_vit(plain, tmp_path / "w.pth")
    assert "pos_embed" in report.unexpected and "sincos" in report.unexpected["pos_embed"]
    sd["pos_embed"] = torch.randn(1, 1 + 12, 48)  # 12 rows: not the 2^3 grid, not a cube
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match=r"bad\.pth: pos_embed has 12 patch rows"):
        pretrained.load_vit(ViT3D(OFFICIAL), tmp_path / "bad.pth")


@pytest.mark.parametrize("axes", [(0,), (0, 1), (2,), (0, 1, 2)])
def test_flipped_weights_see_a_flipped_volume_as_the_original(tmp_path, axes):
    """Weights trained on the files' own voxel order, loaded with flip=axes, give on our reoriented
    volume exactly what the unflipped weights give on the file-order volume."""
    sd, _, _ = official_state_dict()
    torch.save(sd, tmp_path / "w.pth")
    theirs, ours = ViT3D(OFFICIAL).eval(), ViT3D(OFFICIAL).eval()
    pretrained.load_vit(theirs, tmp_path / "w.pth")
    pretrained.load_vit(ours, tmp_path / "w.pth", flip=axes)
    for shape in ((32, 32, 16), (48, 32, 24)):  # the table's grid and an interpolated one
        file_order = torch.randn(2, 1, *shape)
        reoriented = file_order.flip([2 + a for a in axes])
        a, b = pooled_input(theirs, file_order), pooled_input(ours, reoriented)
        err = (a - b).abs().max().item()
        assert err <= TOL, f"flip {axes}, volume {shape}: max abs error {err:.2e}"
    assert not torch.allclose(pooled_input(theirs, reoriented), a, atol=1e-3)  # the flip matters


def test_file_order_flip_reads_the_affine(tmp_path):
    nib = pytest.importorskip("nibabel")
    import numpy as np
    vol = np.zeros((4, 5, 6), np.int16)
    for name, diag, want in (("lps", (-0.7, -0.7, 1.5), "xy"), ("ras", (0.7, 0.7, 1.5), ""),
                             ("lpi", (-1, -1, -1), "xyz")):
        nib.save(nib.Nifti1Image(vol, np.diag([*diag, 1.0])), tmp_path / f"{name}.nii.gz")
        assert pretrained.file_order_flip(tmp_path / f"{name}.nii.gz") == want
        marked = vol.copy()
        marked[1, 2, 3] = 7
        nib.save(nib.Nifti1Image(marked, np.diag([*diag, 1.0])), tmp_path / "m.nii.gz")
        ras, _ = data.load_nifti(tmp_path / "m.nii.gz")  # what our pipeline trains on
        np.testing.assert_array_equal(ras, np.flip(marked, ["xyz".index(c) for c in want]))
    assert pretrained.parse_flip("yx") == (0, 1) and pretrained.parse_flip("") == ()
    swapped = np.array([[0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1.0]])
    nib.save(nib.Nifti1Image(vol, swapped), tmp_path / "swap.nii.gz")
    with pytest.raises(ValueError, match=r"swap\.nii\.gz: voxel axes are ARS"):
        pretrained.file_order_flip(tmp_path / "swap.nii.gz")
