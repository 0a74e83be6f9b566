"""benchmarks/memory_plan.py: the activation-memory formula against the bytes autograd really saves
for backward, at a reduced ViT size on the CPU, in fp32 and bf16 autocast, with and without
activation checkpointing."""
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import memory_plan  # noqa: E402
from model import PRESETS, ViT3D  # noqa: E402

CFG = replace(PRESETS["tiny"], input_centering=False, vit_pool="cls", crop_size=(32, 32, 16),
              patch_size=(4, 4, 4), vit_width=64, vit_depth=3, vit_heads=4)


def saved_bytes(model, x, mixed):
    """Bytes of the distinct storages autograd saves in the forward (parameters excluded)."""
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", torch.bfloat16, enabled=mixed):
            model(x)
    return sum(b for k, b in seen.items() if k not in params)


@pytest.mark.parametrize("mixed", [False, True])
@pytest.mark.parametrize("checkpoint", [False, True])
def test_formula_matches_saved_activations(mixed, checkpoint):
    torch.manual_seed(0)
    B, cfg = 2, replace(CFG, grad_checkpoint=checkpoint)
    measured = saved_bytes(ViT3D(cfg), torch.randn(B, 1, *cfg.crop_size), mixed)
    T = memory_plan.tokens(cfg)[0]
    predicted = B * (memory_plan.encoder_bytes(T, cfg.vit_width, cfg.vit_heads, cfg.vit_depth,
                                               mixed, checkpoint, peak=False)
                     + memory_plan.vit_stem_bytes(cfg, mixed))
    rel = abs(predicted - measured) / measured
    assert rel <= 0.10, f"predicted {predicted} B, measured {measured} B ({100 * rel:.1f}% off)"


def test_paper_plan_rows():
    rows = {(r[0], r[1]): r for r in memory_plan.plan(PRESETS["paper"], 64, 80)}
    assert not rows[("fp32", "no")][5] and rows[("bf16 autocast", "yes")][5]
    assert rows[("bf16 autocast", "yes")][2] < rows[("bf16 autocast", "no")][2] / 4
