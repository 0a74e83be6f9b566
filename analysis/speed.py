"""Throughput accounting: a model's FLOPs per sample and the GPU's peak, for the progress line's
volumes/s and MFU (model FLOPs utilisation, the PaLM / nanoGPT convention).

    python -c "from analysis.speed import flops_per_sample; from model import PRESETS; print(flops_per_sample(PRESETS['paper']))"
"""
import math

import torch

from model import ModelConfig


def flops_per_sample(cfg: ModelConfig, train: bool = True) -> float:
    """Model FLOPs for one (volume, report) pair at the training crop and max_len tokens.

    Matmuls only (2 FLOPs per multiply-add), as in the PaLM / nanoGPT MFU convention; backward
    costs twice the forward, so training is 3x. Recomputation by activation checkpointing is not
    counted: MFU measures useful model work, not the hardware's total.
    """
    def transformer(T, C, hidden, depth):  # per layer: qkv + proj + MLP, then QK^T and AV
        return depth * (2 * T * (4 * C * C + 2 * C * hidden) + 4 * T * T * C)

    n_patch = math.prod(c // p for c, p in zip(cfg.crop_size, cfg.patch_size))
    C, L = cfg.vit_width, cfg.max_len
    heads = 2 * n_patch if cfg.vit_pool == "position" else 1  # position: head + read-out per patch
    vit = (2 * n_patch * C * math.prod(cfg.patch_size)  # Conv3d patch embedding
           + transformer(n_patch + 1, C, 4 * C, cfg.vit_depth) + heads * 2 * C * cfg.embed_dim)
    text = transformer(L, cfg.text_width, cfg.text_mlp, cfg.text_depth) + 2 * cfg.text_width * cfg.embed_dim
    bank = 2 * 2 * 2 * cfg.bank_size * cfg.embed_dim  # CMKI (x D^T, then P D) for v and t
    return (3 if train else 1) * (vit + text + bank)


# Dense bf16 tensor-core peak FLOP/s by GPU name (vendor data sheets; first match wins): MFU's base.
PEAK_FLOPS = {"H200": 989e12, "H100 PCIe": 756e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12}


def speed(volumes: int, seconds: float, flops_per_volume: float, device, world: int) -> str:
    """Volumes/s; MFU against the GPU's peak (n/a on a CPU or an unlisted GPU); this GPU's peak memory."""
    vps, name = volumes / max(seconds, 1e-9), torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    peak = next((v for k, v in PEAK_FLOPS.items() if k in name), 0.0)
    mfu = f"{100 * vps * flops_per_volume / (peak * world):.1f}%" if peak else "n/a"
    return f"{vps:.1f} vol/s | MFU {mfu}" + (
        f" | peak {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB" if name else "")
