"""Memory plan for training BrgSA: activation, weight and optimizer bytes computed from the config.

    python benchmarks/memory_plan.py                  # paper preset, batch 64: the README table
    python benchmarks/memory_plan.py --batch 32 --gpu_gb 40
    python benchmarks/memory_plan.py --preset small --batch 32 --gpu_gb 16   # the one-GPU default

Activations are the tensors autograd saves for backward. Per transformer layer and token, with
width C, the saved tensors are (counting C-wide vectors): the LayerNorm inputs (2), the Linear
inputs (qkv 1, proj 1, fc1 1, fc2 4), the q, k, v that attention keeps (3) and its output (1),
the GELU input (4, the fc1 output): 16 C per token for the post-norm text layer and the pre-norm
ViT block alike, with no T x T attention matrix (SDPA's flash / memory-efficient kernels keep only
a log-sum-exp per row). Under bf16 autocast the residual stream and the LayerNorm inputs stay fp32
(4 bytes) while the Linear / attention / GELU tensors are bf16 (2 bytes): 2 x 4 + 14 x 2 = 36 bytes
per token per channel, against 64 in fp32. With activation checkpointing a block keeps only its
input (fp32 residual stream), and backward recomputes one block at a time: peak = L inputs + one
block's full activations. The patch-embedding input and a few token-wide tensors at the ends of the
ViT come on top (vit_stem_bytes). tests/test_memory_plan.py checks these counts against the bytes autograd
really saves, at a reduced size on the CPU.
"""
import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model import PRESETS, BrgSA, ModelConfig  # noqa: E402

GiB = 1024 ** 3


def tokens(cfg: ModelConfig) -> tuple:
    """(ViT tokens at the training crop, text tokens at max_len)."""
    return math.prod(c // p for c, p in zip(cfg.crop_size, cfg.patch_size)) + 1, cfg.max_len


def layer_bytes(T: int, C: int, heads: int, mixed: bool) -> int:
    """Saved bytes of one transformer layer for one sample of T tokens (see the module docstring);
    the per-row LayerNorm statistics (2 per norm) and attention log-sum-exp are fp32."""
    per_channel = 2 * 4 + 14 * 2 if mixed else 16 * 4
    return T * C * per_channel + T * 4 * (2 * 2 + heads)


def encoder_bytes(T, C, heads, depth, mixed: bool, checkpoint: bool, peak: bool = True) -> int:
    """Saved bytes of a `depth`-layer encoder for one sample. With checkpointing only each block's
    input stays (bf16 under autocast, the residual stream's dtype), and with peak=True backward's
    recomputation of one block at a time is added."""
    if not checkpoint:
        return depth * layer_bytes(T, C, heads, mixed)
    return depth * T * C * (2 if mixed else 4) + (layer_bytes(T, C, heads, mixed) if peak else 0)


def vit_stem_bytes(cfg: ModelConfig, mixed: bool) -> int:
    """Per sample: the volume the patch convolution keeps, its token output and the final LayerNorm's
    fp32 input."""
    T, C = tokens(cfg)[0], cfg.vit_width
    return math.prod(cfg.crop_size) * (2 if mixed else 4) + T * C * (4 + (2 if mixed else 4))


def activation_bytes(cfg: ModelConfig, batch: int, mixed: bool, checkpoint: bool) -> int:
    """Peak bytes saved for backward by one training step of `batch` samples (both encoders)."""
    T, L = tokens(cfg)
    vit = encoder_bytes(T, cfg.vit_width, cfg.vit_heads, cfg.vit_depth, mixed, checkpoint)
    txt = encoder_bytes(L, cfg.text_width, cfg.text_heads, cfg.text_depth, mixed, checkpoint)
    return batch * (vit + txt + vit_stem_bytes(cfg, mixed))


def state_bytes(n_params: int, mixed: bool) -> int:
    """fp32 weights + fp32 gradients + AdamW's two fp32 moments (16 bytes per parameter), plus the
    bf16 weight copies autocast caches for the step (2 bytes per parameter)."""
    return n_params * (16 + (2 if mixed else 0))


def plan(cfg: ModelConfig, batch: int, gpu_gb: float) -> list:
    """Rows (precision, checkpointing, activation GiB, weights+grads+Adam GiB, total GiB, fits)."""
    n = BrgSA(cfg).num_params()
    rows = []
    for mixed in (True, False):
        for ckpt in (False, True):
            act, state = activation_bytes(cfg, batch, mixed, ckpt), state_bytes(n, mixed)
            total = act + state
            rows.append(("bf16 autocast" if mixed else "fp32", "yes" if ckpt else "no",
                         act / GiB, state / GiB, total / GiB, total / GiB <= 0.9 * gpu_gb))
    return rows


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--preset", default="paper", choices=sorted(PRESETS), help="model preset")
    p.add_argument("--batch", type=int, default=64, help="samples per step on one GPU")
    p.add_argument("--gpu_gb", type=float, default=80, help="GPU memory; 'fits' leaves 10%% spare "
                                                             "for workspaces and fragmentation")
    a = p.parse_args()
    cfg = PRESETS[a.preset]
    T, L = tokens(cfg)
    print(f"{a.preset} preset, batch {a.batch}: {BrgSA(cfg).num_params() / 1e6:.1f} M parameters, "
          f"{T} image tokens (crop {cfg.crop_size}), {L} text tokens\n")
    print(f"| precision | activation checkpointing | activations GiB | weights + grads + AdamW GiB "
          f"| total GiB | fits {a.gpu_gb:g} GB |")
    print("|---|---|---:|---:|---:|---|")
    for prec, ck, act, state, total, fits in plan(cfg, a.batch, a.gpu_gb):
        print(f"| {prec} | {ck} | {act:.1f} | {state:.1f} | {total:.1f} | {'yes' if fits else 'no'} |")
