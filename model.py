"""The BrgSA model: a 3D ViT for CT volumes, a BERT-style text encoder, and the shared knowledge bank.

The encoders of Lai et al. (arXiv 2501.03565, section 3) as the official code builds them
(github.com/laihaoran/BrgSA):
- ViT3D (gloria/models/stander_3D_vit_relate_pe.py, timm blocks): Conv3d patch embedding, a CLS
  token, a fixed 3D sin-cos position table, pre-norm blocks, a final LayerNorm, CLS -> Linear -> v.
- TextEncoder (gloria/models/text_model.py): BERT's layout (post-norm layers, learned positions,
  token types) so BERT / CXR-BERT weights load as they are; the last 4 hidden states are summed,
  the non-padding tokens summed and divided by the maximum length (a constant), then Linear -> t.
- BrgSA: both encoders and the knowledge bank. forward(volume, ids, mask) -> (v, t); the loss is
  cmki.brgsa_loss on them (BrgSA.loss), so that under DDP it can see every rank's embeddings.

Three presets: `paper` (the official model, ~200 M parameters), `tiny` (the CPU default) and
`small` (one GPU). Where the CPU presets differ from the paper, ModelConfig says so in one group.
pick_device turns a --device flag (train.py, eval.py) into the device a model runs on.

    python model.py        # prints the parameter count of each preset
"""
import math
import re
from dataclasses import dataclass, replace
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

import cmki


@dataclass
class ModelConfig:
    # image side: a 3D ViT over the CT volume
    image_size: tuple = (256, 256, 128)  # stored / test volume in voxels (X, Y, Z), RAS order
    crop_size: tuple = (224, 224, 112)   # random training crop of the stored volume
    spacing: tuple = (1.5, 1.5, 3.0)     # mm per voxel the volumes are resampled to
    patch_size: tuple = (16, 16, 8)      # Conv3d kernel = stride
    vit_width: int = 768
    vit_depth: int = 12
    vit_heads: int = 12
    # text side: a BERT over the report's summary sentences
    vocab_size: int = 30522              # replaced by the trained tokenizer's size at train time
    max_len: int = 97                    # tokens per text
    text_width: int = 768
    text_depth: int = 12
    text_heads: int = 12
    text_mlp: int = 3072
    # the shared embedding space and the method (cmki.py)
    embed_dim: int = 768                 # d, width of v, t and of the bank entries
    bank_size: int = 2048                # K, number of knowledge-bank entries
    bank_scale: str = "one"              # CMKI logit scale: "one" (official) or "sqrt" (1/sqrt(d))
    tau: float = 0.1                     # temperature of both InfoNCE terms (fixed, not learned)
    alpha: float = 0.5                   # weight of L_MSE
    beta: float = 1.0                    # weight of L_INFO
    gamma: float = 1.0                   # weight of L_INFO-R
    method: str = "brgsa"                # or an ablation of cmki.METHODS: "clip" (no bank), ...
    prompt: str = "There is {}"          # zero-shot prompt, the paper's (eval.py)
    dropout: float = 0.0                 # inside the encoders; the official ViT uses none
    grad_checkpoint: bool = False        # recompute block activations in backward to save memory
    # Where the presets part ways. The paper preset sets the official code's choice of each; the
    # CPU-sized presets, trained from scratch for minutes on synthetic scans, keep what measurably
    # helped them (benchmarks/README.md, "What the default reaches"). The defaults here are what the
    # first checkpoints were written with, so that those still load.
    vit_pool: str = "cls"                # image embedding: "cls" token (official), "mean" of the
                                         # patch tokens, or "position": mean + a per-position read-out
    input_centering: bool = False        # subtract the training set's mean volume (not official)
    pos_embed: str = "sincos"            # "table" (official): a table for the crop grid on 0..1
                                         # coordinates (or pretrained), interpolated to the input
                                         # grid, not trained; "sincos": rebuilt on integer indices
    vit_norm_eps: float = 1e-5           # LayerNorm eps of the ViT blocks (official 1e-6)
    text_pool: str = "max_len"           # divide the token sum by max_len (official) or by the
                                         # text's own length ("mean")
    text_dropout: float = None           # of the text encoder (None: `dropout`; BERT-base 0.1)
    init: str = "trunc_normal"           # "official": xavier in the ViT, BERT's normal(0.02) in the
                                         # text encoder, PyTorch's default in the two heads


# The CPU default: 48 x 48 x 32 voxels of 7 x 7 x 10 mm (a 34 x 34 x 32 cm chest), the whole volume
# (no crop), trained on 2 cores in minutes. Its text tower learns from scratch on the summaries
# ("Mild bilateral emphysema."), which never say "There is": the prompt is phrased as they are. Mean
# text pooling: a 4-token prompt and a 40-token training text then reach the head at the same scale.
_TINY = ModelConfig(
    image_size=(48, 48, 32), crop_size=(48, 48, 32), spacing=(7.0, 7.0, 10.0),
    patch_size=(16, 16, 8), vit_width=192, vit_depth=3, vit_heads=4, vit_pool="position",
    input_centering=True,
    vocab_size=4096, text_width=192, text_depth=2, text_heads=4, text_mlp=384,
    embed_dim=192, bank_size=256, prompt="{}.", text_pool="mean")

PRESETS = {
    # The paper's model: ViT-B/16x16x8 + BERT-base, d = 768, K = 2048, the official code's details.
    # It starts from random weights unless pretrained ones are loaded (README).
    "paper": ModelConfig(pos_embed="table", vit_norm_eps=1e-6, text_dropout=0.1, init="official"),
    "tiny": _TINY,
    # The one-GPU default (python train.py picks it when a CUDA GPU is used): tiny at twice its
    # resolution, 3.5 x 3.5 x 5 mm (96 x 96 x 64 voxels, the same chest), where a calcified spot
    # covers ~10 voxels and a nodule ~55 (1-2 and ~6 at tiny's). Patches of 16 x 16 x 16 voxels
    # (5.6 x 5.6 x 8 cm; 6 x 6 x 4 = 144 tokens) keep attention cheap; wider and deeper towers and a
    # bank of 512 entries (benchmarks/README.md, "The small preset").
    "small": replace(_TINY, image_size=(96, 96, 64), crop_size=(96, 96, 64), spacing=(3.5, 3.5, 5.0),
                     patch_size=(16, 16, 16), vit_width=256, vit_depth=4, text_width=256, text_depth=3,
                     text_mlp=512, embed_dim=256, bank_size=512),
}


def sincos_table(grid: tuple, width: int, unit: bool = False) -> torch.Tensor:
    """Fixed 3D sin-cos position table for a (gx, gy, gz) patch grid -> (gx*gy*gz, width).

    Each axis gets width // 3 channels, [sin | cos] at frequencies 10000^(-i / (width // 6)); the
    channels left over when width is not a multiple of 6 stay zero. Positions are the integer
    patch indices, or with unit=True the official code's 0..1 coordinates (np.linspace per axis).
    """
    half = width // 6
    dtype = torch.float64 if unit else torch.float32
    omega = 1.0 / 10000 ** (torch.arange(half, dtype=dtype) / max(half, 1))
    coords = [torch.linspace(0, 1, g, dtype=dtype) if unit else torch.arange(g, dtype=dtype)
              for g in grid]
    parts = []
    for pos in torch.meshgrid(*coords, indexing="ij"):
        angle = pos.reshape(-1, 1) * omega  # (T, half)
        parts += [angle.sin(), angle.cos()]
    return F.pad(torch.cat(parts, dim=1), (0, width - 6 * half)).float()  # (T, width)


def interpolate_table(table: torch.Tensor, base: tuple, grid: tuple) -> torch.Tensor:
    """(1 + prod(base), C) position table -> (1 + prod(grid), C): the patch rows trilinearly
    interpolated from the base grid to `grid` (align_corners=False, as the official code); the CLS
    row is kept."""
    if tuple(grid) == tuple(base):
        return table
    C = table.shape[-1]
    patch = table[1:].reshape(1, *base, C).permute(0, 4, 1, 2, 3)  # (1, C, bx, by, bz)
    patch = F.interpolate(patch, size=tuple(grid), mode="trilinear", align_corners=False)
    return torch.cat([table[:1], patch.permute(0, 2, 3, 4, 1).reshape(-1, C)])


class MLP(nn.Module):
    def __init__(self, width: int, hidden: int, dropout: float):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(width, hidden), nn.Linear(hidden, width)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        return self.dropout(self.fc2(F.gelu(self.fc1(x))))


class Attention(nn.Module):
    """Multi-head self-attention through F.scaled_dot_product_attention (flash/mem-efficient on GPU)."""

    def __init__(self, width: int, heads: int, dropout: float):
        super().__init__()
        assert width % heads == 0, "width must be a multiple of heads"
        self.heads, self.dropout = heads, dropout
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)

    def forward(self, x, mask=None):  # x (B, T, C); mask (B, 1, 1, T) bool, True = attend
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)  # (B, nh, T, hs)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class PreNormBlock(nn.Module):
    """ViT block: x + MHSA(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, width: int, heads: int, dropout: float, eps: float = 1e-5):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(width, eps=eps), nn.LayerNorm(width, eps=eps)
        self.attn, self.mlp = Attention(width, heads, dropout), MLP(width, 4 * width, dropout)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PostNormBlock(nn.Module):
    """BERT layer: LN(x + MHSA(x)), then LN(x + MLP(x)) (post-norm, as BERT checkpoints expect)."""

    def __init__(self, width: int, heads: int, hidden: int, dropout: float):
        super().__init__()
        self.attn, self.mlp = Attention(width, heads, dropout), MLP(width, hidden, dropout)
        self.norm1, self.norm2 = nn.LayerNorm(width, eps=1e-12), nn.LayerNorm(width, eps=1e-12)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x, mask):
        x = self.norm1(x + self.dropout(self.attn(x, mask)))
        return self.norm2(x + self.mlp(x))


def _run_block(block, checkpoint: bool, *args):
    if checkpoint and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False)
    return block(*args)


class ViT3D(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        _check_choice("vit_pool", cfg.vit_pool, ("cls", "mean", "position"))
        _check_choice("pos_embed", cfg.pos_embed, ("sincos", "table"))
        w = cfg.vit_width
        self.patch_embed = nn.Conv3d(1, w, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, w))
        self.base_grid = tuple(c // p for c, p in zip(cfg.crop_size, cfg.patch_size))
        if cfg.pos_embed == "table":
            # (1 + T0, C) for the training-crop grid (14^3 in the paper), CLS row first and zero. A
            # buffer, not a parameter: the official code interpolates it under torch.no_grad, so
            # BrgSA training never moves it; it is what pretrained weights (or sin-cos) put there.
            self.register_buffer("pos_embed", F.pad(sincos_table(self.base_grid, w, unit=True),
                                                    (0, 0, 1, 0)))
        self.blocks = nn.ModuleList(PreNormBlock(w, cfg.vit_heads, cfg.dropout, cfg.vit_norm_eps)
                                    for _ in range(cfg.vit_depth))
        self.norm = nn.LayerNorm(w)
        self.head = nn.Linear(w, cfg.embed_dim)
        if cfg.vit_pool == "position":
            if tuple(cfg.crop_size) != tuple(cfg.image_size):
                raise ValueError(f"position pooling needs whole volumes (crop_size {cfg.crop_size} "
                                 f"== image_size {cfg.image_size}): each patch position has its own "
                                 f"read-out")
            # One more (C, d) map per patch position (zero at init, where this is mean pooling). The
            # mean of the tokens forgets where a finding sits; a calcified aortic wall or a hiatal
            # hernia sits in the same place in every chest, and a read-out per position can use it.
            self.position_head = nn.Parameter(torch.zeros(math.prod(self.base_grid), w, cfg.embed_dim))
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        if cfg.input_centering:
            # The training set's mean volume in model-input units, set by train.py (set_input_mean)
            # and saved with the weights. Every chest shares most of its anatomy; without this the
            # patch embeddings are dominated by that common part and a small ViT trained from
            # scratch barely moves in a few hundred steps (measured on the synthetic set).
            self.register_buffer("input_mean", torch.zeros(1, 1, *cfg.image_size))

    def set_input_mean(self, mean: torch.Tensor):
        """Store the mean (X, Y, Z) or (1, X, Y, Z) model-input volume of the training set."""
        self.input_mean.copy_(mean.reshape(self.input_mean.shape))

    def forward(self, volume: torch.Tensor) -> torch.Tensor:  # (B, 1, X, Y, Z) -> v (B, d)
        x, _ = self.tokens(volume)  # (B, 1 + T, C)
        if self.cfg.vit_pool == "position":
            return self.patch_embeddings(x).mean(1)  # (B, d)
        return self.head(x[:, 0] if self.cfg.vit_pool == "cls" else x[:, 1:].mean(1))  # (B, d)

    def patch_embeddings(self, x: torch.Tensor) -> torch.Tensor:
        """Final tokens (B, 1 + T, C) -> one embedding per patch u_i (B, T, d), whose mean is v under
        mean and position pooling (analysis/grounding.py scores them)."""
        u = self.head(x[:, 1:])  # (B, T, d)
        if self.cfg.vit_pool == "position":
            T = x.shape[1] - 1
            if T != len(self.position_head):
                raise ValueError(f"position pooling was built for {len(self.position_head)} patches "
                                 f"(the {self.base_grid} grid of the crop), got {T}")
            # u_i = head(x_i) + T x_i W_i, so that v = mean_i u_i = head(mean_i x_i) + sum_i x_i W_i:
            # the mean token's head plus every position's read-out, and each u_i its own share.
            u = u + T * torch.einsum("btc,tcd->btd", x[:, 1:], self.position_head.to(x.dtype))
        return u

    def tokens(self, volume: torch.Tensor):
        """(B, 1, X, Y, Z) -> (final-normed tokens (B, 1 + T, C), CLS first, patch grid (gx, gy, gz)).

        Patch token i is patch (ix, iy, iz) of the grid in C order."""
        if volume.ndim != 5 or volume.shape[1] != 1:
            raise ValueError(f"ViT3D expects (B, 1, X, Y, Z), got {tuple(volume.shape)}")
        if self.cfg.input_centering:
            if volume.shape[2:] != self.input_mean.shape[2:]:
                raise ValueError(f"input centering needs {tuple(self.input_mean.shape[2:])} volumes "
                                 f"(the stored mean), got {tuple(volume.shape[2:])}")
            volume = volume - self.input_mean.to(volume.dtype)
        if any(s % p for s, p in zip(volume.shape[2:], self.cfg.patch_size)):
            raise ValueError(f"volume {tuple(volume.shape[2:])} is not divisible by the patch "
                             f"size {self.cfg.patch_size}")
        x = self.patch_embed(volume)  # (B, C, gx, gy, gz)
        grid = x.shape[2:]
        x = x.flatten(2).transpose(1, 2)  # (B, T, C), T = gx*gy*gz
        cls = self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype)  # (B, 1, C)
        if self.cfg.pos_embed == "table":  # official: interpolated to this grid (16^3 at test)
            pos = interpolate_table(self.pos_embed, self.base_grid, grid).to(x.dtype)  # (1 + T, C)
            x, cls = x + pos[1:], cls + pos[:1]
        else:
            x = x + sincos_table(grid, x.shape[-1]).to(x.device, x.dtype)
        x = torch.cat([cls, x], dim=1)
        for block in self.blocks:
            x = _run_block(block, self.cfg.grad_checkpoint, x)
        return self.norm(x), tuple(grid)  # (B, 1 + T, C)


class TextEncoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        _check_choice("text_pool", cfg.text_pool, ("max_len", "mean"))
        w = cfg.text_width
        self.word_embeddings = nn.Embedding(cfg.vocab_size, w, padding_idx=0)
        self.position_embeddings = nn.Embedding(cfg.max_len, w)
        self.token_type_embeddings = nn.Embedding(2, w)
        self.embed_norm = nn.LayerNorm(w, eps=1e-12)
        p = cfg.dropout if cfg.text_dropout is None else cfg.text_dropout
        self.dropout = nn.Dropout(p)
        self.layers = nn.ModuleList(PostNormBlock(w, cfg.text_heads, cfg.text_mlp, p)
                                    for _ in range(cfg.text_depth))
        self.head = nn.Linear(w, cfg.embed_dim)
        for emb in (self.word_embeddings, self.position_embeddings, self.token_type_embeddings):
            nn.init.normal_(emb.weight, std=0.02)  # BERT's initialiser range

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        B, L = input_ids.shape  # (B, L) token ids, (B, L) 1 = real token, 0 = padding
        if L > self.cfg.max_len:
            raise ValueError(f"{L} tokens given, the text encoder takes at most {self.cfg.max_len}")
        pos = torch.arange(L, device=input_ids.device)
        x = self.word_embeddings(input_ids) + self.position_embeddings(pos)[None]
        x = self.dropout(self.embed_norm(x + self.token_type_embeddings.weight[0]))  # (B, L, C)
        keep = attention_mask.bool()
        mask = keep[:, None, None, :]  # (B, 1, 1, L) broadcast over heads and query positions
        pooled = 0
        for i, layer in enumerate(self.layers):
            x = _run_block(layer, self.cfg.grad_checkpoint, x, mask)
            if i >= len(self.layers) - 4:  # official pooling: sum of the last 4 hidden states
                pooled = pooled + x
        # Sum the non-padding tokens; officially divide by the *maximum* length, not the true one.
        n = keep.sum(1, keepdim=True).to(x.dtype) if self.cfg.text_pool == "mean" else self.cfg.max_len
        pooled = (pooled * keep[..., None].to(x.dtype)).sum(1) / n  # (B, C)
        return self.head(pooled)  # (B, d)


class BrgSA(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.visual = ViT3D(cfg)
        self.text = TextEncoder(cfg)
        self.bank = cmki.KnowledgeBank(cfg.bank_size, cfg.embed_dim)
        _check_choice("init", cfg.init, ("trunc_normal", "official"))
        if cfg.init == "official":
            self.visual.apply(partial(_init_linear, fn=nn.init.xavier_uniform_))
            self.text.apply(partial(_init_linear, fn=partial(nn.init.normal_, std=0.02)))
            nn.init.normal_(self.visual.cls_token, std=0.02)
            for head in (self.visual.head, self.text.head):  # plain nn.Linear officially
                head.reset_parameters()
        else:
            self.apply(partial(_init_linear, fn=partial(nn.init.trunc_normal_, std=0.02)))

    def forward(self, volume, input_ids, attention_mask):
        """(B, 1, X, Y, Z), (B, L), (B, L) -> (v, t), each (B, d); the loss is self.loss(v, t)."""
        return self.visual(volume), self.text(input_ids, attention_mask)

    @property
    def scale(self) -> float:
        return cmki.default_scale(self.cfg.embed_dim, self.cfg.bank_scale)

    def loss(self, v: torch.Tensor, t: torch.Tensor) -> dict:
        """cmki.brgsa_loss with this config's weights (an ablation's, for cfg.method)."""
        c = self.cfg
        alpha, beta, gamma = cmki.loss_weights(c.method, c.alpha, c.beta, c.gamma)
        bank = self.bank.weight.detach() if c.method == "clip" else self.bank.weight  # unused: untrained
        return cmki.brgsa_loss(v, t, bank, c.tau, alpha, beta, gamma, self.scale)

    def zero_shot_scores(self, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """(N, d) image, (C, d) prompt embeddings -> (N, C) scores: BrgSA's 1/2 [cos(v, t) +
        cos(v_hat, t)] (cmki.zero_shot_scores), or cos(v, t) for the bank-less "clip" ablation."""
        if self.cfg.method == "clip":
            return cmki.cosine_scores(v, t).float()
        return cmki.zero_shot_scores(v, t, self.bank.weight.float(), self.scale)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def _init_linear(m, fn):
    if isinstance(m, nn.Linear):
        fn(m.weight)
        nn.init.zeros_(m.bias)


def _check_choice(name: str, value, allowed: tuple):
    if value not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")


def pick_device(name: str) -> torch.device:
    """--device (auto, cpu, cuda, cuda:N; auto:N under torchrun) -> torch.device, or a clear error."""
    if name.startswith("auto"):
        name = "cuda" + name[4:] if torch.cuda.is_available() else "cpu"
    if not re.fullmatch(r"cpu|cuda(:\d+)?", name):
        raise ValueError(f"--device: expected auto, cpu, cuda or cuda:N, got {name!r}")
    if name != "cpu" and int(name[5:] or 0) >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: " + (f"only {torch.cuda.device_count()} GPU(s) here" if
                         torch.cuda.is_available() else "no CUDA GPU is available here (use cpu or auto)"))
    return torch.device(name)


if __name__ == "__main__":
    for name, preset in PRESETS.items():
        print(f"{name:6s} {BrgSA(preset).num_params() / 1e6:8.1f} M parameters "
              f"(vocabulary {preset.vocab_size}; train.py counts with its trained tokenizer's, "
              f"which can be smaller)")
