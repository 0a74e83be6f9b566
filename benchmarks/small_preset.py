"""Measurements behind the small preset (benchmarks/small_preset.md): how many voxels the small
findings cover on each preset's grid, what a trained model's bank does and what its image encoder
holds, and what a run would cost on one GPU.

    python benchmarks/small_preset.py masks                      # per-lesion voxels, tiny vs small grid
    python benchmarks/small_preset.py model out/best.pt out_small/best.pt   # bank usage, linear probe
    python benchmarks/small_preset.py gpu                        # FLOPs per run, time at a stated MFU
    python benchmarks/small_preset.py supervised --preset small --steps 1056   # the ViT with labels
    python benchmarks/small_preset.py classes tiny=out/eval.json small=out_small/eval.json \
        tiny=out/grounding/grounding.json small=out_small/grounding/grounding.json   # per-class table

masks: each small finding is rendered alone on a normal chest (prepare/phantom_scene.py, its own mask),
at the stored voxel sizes of each preset's synthetic set, carried to the preset's grid the way the
volumes are (data.preprocess_volume, trilinear) and kept where at least half a voxel is covered; its
26-connected parts are the lesions (one nodule, one calcified spot, one node, one dilated bronchus).

model: for each checkpoint, on the held-out split of the data it was trained on, the bank's usage:
the effective number of entries exp(H) of softmax(s v D^T) per volume (H its entropy; K when the
attention is uniform, 1 when it picks one entry), median over volumes, and the median of its largest
weight; and the linear probe on v of benchmarks/ablation.py (ridge on the training volumes'
embeddings with their labels, macro AUROC on the held-out volumes). Run it from the directory the
runs were started in (the synthetic set's path is relative to it).

supervised: the preset's image encoder (ViT3D, input centering and position pooling as in BrgSA)
plus a linear layer to the 18 labels, trained with binary cross-entropy on the same training
volumes, optimizer and schedule as train.py's preset (validation reports left out), scored per class
on the held-out volumes: what this encoder learns when it is told the labels, the ceiling for
what contrastive training with the reports could teach it in as many steps.
"""
import argparse
import csv
import json
import sys
import tempfile
from dataclasses import fields, replace
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import data as data_lib  # noqa: E402
import model as model_lib  # noqa: E402
import eval as eval_lib  # noqa: E402
import train  # noqa: E402
from benchmarks.ablation import linear_probe  # noqa: E402
from analysis.speed import flops_per_sample  # noqa: E402
from model import PRESETS  # noqa: E402
from prepare.inputs import training_inputs  # noqa: E402
from prepare import phantom_scene as scene  # noqa: E402

SMALL_FINDINGS = [scene.NODULE, scene.ARTERIAL, scene.CORONARY, scene.LYMPH, scene.BRONCHIECTASIS,
                  scene.MATERIAL]


# ----------------------------------------------------------------------------- masks

def components(mask: np.ndarray) -> np.ndarray:
    """Voxel counts of the 26-connected parts of a bool (X, Y, Z) mask: every voxel takes the
    largest label among its neighbours until nothing changes (max-pooling propagation)."""
    m = torch.from_numpy(mask)
    lab = torch.where(m, torch.arange(1, m.numel() + 1, dtype=torch.float64).reshape(m.shape), 0.0)
    while True:
        new = F.max_pool3d(lab[None, None], 3, 1, 1)[0, 0] * m
        if torch.equal(new, lab):
            break
        lab = new
    return torch.unique(lab[m], return_counts=True)[1].numpy()


def lesion_voxels(k: int, preset: str, seeds=range(6)) -> tuple:
    """-> (voxels of each lesion, mask voxels per volume) of finding k on `preset`'s grid."""
    target = PRESETS[preset]
    per_lesion, per_volume = [], []
    for seed in seeds:
        masks = {}
        spacing = scene.draw_spacing(np.random.default_rng(100 + seed), preset)
        scene.render_volume(np.eye(18)[k], np.random.default_rng(seed), spacing, masks=masks)
        cover = data_lib.preprocess_volume(masks[k].astype(np.float32) * 1000, spacing,
                                           target.spacing, target.image_size) / 1000
        per_lesion += components(cover >= 0.5).tolist()
        per_volume.append(int((cover >= 0.5).sum()))
    return np.array(per_lesion), np.array(per_volume)


def masks_table(out: Path):
    rows = []
    for k in SMALL_FINDINGS:
        for preset in ("tiny", "small"):
            lesions, volumes = lesion_voxels(k, preset)
            rows.append(dict(finding=scene.CLASSES[k], preset=preset, lesions=len(lesions),
                             median=float(np.median(lesions)), p10=float(np.percentile(lesions, 10)),
                             one_or_two=float(np.mean(lesions <= 2)),
                             per_volume=float(np.median(volumes))))
    lines = ["| finding | grid | lesions (6 scans) | voxels per lesion: median | 10th percentile "
             "| lesions of 1-2 voxels | mask voxels per volume (median) |", "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        spacing = "x".join(f"{v:g}" for v in PRESETS[r["preset"]].spacing)
        lines.append(f"| {r['finding']} | {r['preset']} ({spacing} mm) | {r['lesions']} | {r['median']:.0f} "
                     f"| {r['p10']:.0f} | {r['one_or_two']:.0%} | {r['per_volume']:.0f} |")
    write(rows, lines, out)


# ----------------------------------------------------------------------------- model

@torch.no_grad()
def bank_usage(model, v: torch.Tensor) -> dict:
    """Effective number of bank entries exp(H) of softmax(s v D^T) per row of v, and the largest
    weight: medians over the rows."""
    D = model.bank.weight.float()
    P = torch.softmax(model.scale * v.float() @ D.T, dim=-1)  # (N, K)
    H = -(P * P.clamp_min(1e-30).log()).sum(-1)
    return dict(bank_size=D.shape[0], effective_entries=float(H.exp().median()),
                largest_weight=float(P.max(-1).values.median()), v_norm=float(v.norm(dim=-1).median()),
                entry_norm=float(D.norm(dim=-1).median()))


def model_rows(ckpts: list, out: Path):
    cpu, rows = torch.device("cpu"), []
    for path in ckpts:
        model, _, ckpt = eval_lib.load_checkpoint(path, cpu)
        known = {f.name for f in fields(train.TrainConfig)}  # a checkpoint of an older version may have more
        cfg = train.TrainConfig(**{k: v for k, v in ckpt["train_config"].items() if k in known})
        inputs = training_inputs(cfg, model.cfg, 0, ckpt["tokenizer"], log=lambda *a: None)
        fit, held_out = inputs.train, inputs.held_out
        v, _, _ = eval_lib.embed_volumes(model, data_lib.eval_loader(held_out, 32), cpu)
        row = dict(ckpt=str(path), preset=cfg.preset, method=model.cfg.method, seed=cfg.seed,
                   step=ckpt["step"], **bank_usage(model, v), probe_auc=linear_probe(model, fit, held_out))
        print(row, flush=True)
        rows.append(row)
    lines = ["| checkpoint | preset | method | seed | K | effective entries exp(H), median | largest weight "
             "(uniform 1/K) | median abs v | median abs D_k | linear probe on v |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['ckpt']} | {r['preset']} | {r['method']} | {r['seed']} | {r['bank_size']} | "
                     f"{r['effective_entries']:.0f} | {r['largest_weight']:.4f} ({1 / r['bank_size']:.4f}) | "
                     f"{r['v_norm']:.2f} | {r['entry_norm']:.2f} | {r['probe_auc']:.3f} |")
    write(rows, lines, out)


# ----------------------------------------------------------------------------- GPU estimate

def gpu_estimate(out: Path, peak: float = 989e12, mfus=(0.05, 0.15, 0.30)):
    """Model FLOPs of one default run of each preset (analysis.speed.flops_per_sample x pairs seen, plus 11
    validations of 90 volumes and the 223 held-out volumes at a forward pass each) and the compute
    time that takes on an H100 (dense bf16 peak `peak`) at each MFU in mfus, per step and per run."""
    rows = []
    for preset in ("tiny", "small"):
        t = train.TRAIN_PRESETS[preset]
        steps, bs = t["epochs"] * (720 // t["batch_size"]), t["batch_size"]
        cfg = PRESETS[preset]
        step = bs * flops_per_sample(cfg)
        run = steps * step + (11 * 90 + 223) * flops_per_sample(cfg, train=False)
        rows.append(dict(preset=preset, steps=steps, batch=bs, gflop_per_step=step / 1e9, pflop_per_run=run / 1e15,
                         **{f"ms_per_step_at_mfu_{m:g}": 1e3 * step / (m * peak) for m in mfus},
                         **{f"s_per_run_at_mfu_{m:g}": run / (m * peak) for m in mfus}))
    lines = ["| preset | steps x batch | GFLOP per step | PFLOP per run | "
             + " | ".join(f"ms per step at MFU {m:.0%}" for m in mfus) + " | "
             + " | ".join(f"s per run at MFU {m:.0%}" for m in mfus) + " |",
             "|---|---:|---:|---:|" + "---:|" * 2 * len(mfus)]
    for r in rows:
        lines.append(f"| {r['preset']} | {r['steps']} x {r['batch']} | {r['gflop_per_step']:.0f} | "
                     f"{r['pflop_per_run']:.3f} | "
                     + " | ".join(f"{r[f'ms_per_step_at_mfu_{m:g}']:.2f}" for m in mfus) + " | "
                     + " | ".join(f"{r[f's_per_run_at_mfu_{m:g}']:.1f}" for m in mfus) + " |")
    write(rows, lines, out)


# ----------------------------------------------------------------------------- per-class table

def classes_table(pairs: list, out: Path):
    """NAME=eval.json (zero-shot AUROC per class) and NAME=grounding.json (grounding AUROC in vs out,
    '*' when its interval lies above 0.5) -> one row per class, one column per file."""
    cols = []
    for pair in pairs:
        name, path = str(pair).split("=", 1)
        r = json.loads(Path(path).read_text())
        if "per_finding" in r:
            cols.append((f"{name} grounding", {c: f"{v['auroc']:.3f}{'*' if v['beats_chance'] else ''}"
                                               for c, v in r["per_finding"].items()}))
        else:
            cols.append((f"{name} zero-shot", {c: f"{v:.3f}" for c, v in r["auc"].items()}))
    rows = [dict(finding=c, **{n: col.get(c, "") for n, col in cols}) for c in data_lib.CTRATE_CLASSES]
    lines = ["| finding | " + " | ".join(n for n, _ in cols) + " |", "|---|" + "---:|" * len(cols)]
    lines += ["| " + " | ".join(r.values()) + " |" for r in rows]
    write(rows, lines, out)


# ----------------------------------------------------------------------------- supervised

def supervised(preset: str, steps: int, out: Path, seed: int = 0):
    """The preset's ViT trained with the labels (see the module docstring) -> per-class AUROC."""
    torch.manual_seed(seed)
    cfg = train.parse_args([f"--preset={preset}", "--device=cpu", f"--seed={seed}",
                            f"--out_dir={tempfile.mkdtemp()}"])  # the preset's recipe; nothing is written
    mcfg = model_lib.PRESETS[preset]
    inputs = training_inputs(cfg, mcfg, train.TRAIN_PRESETS[preset]["vocab_size"])
    fit, held_out = inputs.train, inputs.held_out
    vit = model_lib.ViT3D(mcfg)
    vit.apply(partial(model_lib._init_linear, fn=partial(torch.nn.init.trunc_normal_, std=0.02)))
    if mcfg.input_centering:
        vit.set_input_mean(data_lib.mean_volume(fit))
    net = torch.nn.Sequential(vit, torch.nn.Linear(mcfg.embed_dim, 18))
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, betas=train.TRAIN_PRESETS[preset]["betas"],
                            weight_decay=cfg.weight_decay)
    cfg = replace(cfg, max_iters=steps)
    g = torch.Generator().manual_seed(seed)
    order = []
    for step in range(steps):
        if len(order) < cfg.batch_size:
            order += torch.randperm(len(fit), generator=g).tolist()
        batch, order = order[:cfg.batch_size], order[cfg.batch_size:]
        x = torch.stack([data_lib.load_volume(fit[i].npy_path) for i in batch])
        y = torch.from_numpy(np.stack([np.asarray(fit[i].labels, np.float32) for i in batch]))
        for group in opt.param_groups:
            group["lr"] = train.lr_at(step, cfg)
        loss = F.binary_cross_entropy_with_logits(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip)
        opt.step()
        if (step + 1) % 50 == 0 or step + 1 == steps:
            print(f"supervised {preset}: step {step + 1}/{steps} loss {loss.item():.4f}", flush=True)
    net.eval()
    with torch.no_grad():
        scores = torch.cat([net(b["volume"]) for b in data_lib.eval_loader(held_out, 32)]).numpy()
    labels = np.stack([np.asarray(r.labels) for r in held_out])
    rows = [dict(preset=preset, steps=steps, finding=c, auc=eval_lib.auroc(scores[:, j], labels[:, j]))
            for j, c in enumerate(data_lib.CTRATE_CLASSES)]
    rows.append(dict(preset=preset, steps=steps, finding="macro mean", auc=float(np.mean([r["auc"] for r in rows]))))
    lines = [f"| finding | supervised {preset} ViT, {steps} steps: held-out AUROC |", "|---|---:|"]
    lines += [f"| {r['finding']} | {r['auc']:.3f} |" for r in rows]
    write(rows, lines, out)


def write(rows: list, lines: list, out: Path):
    text = "\n".join(lines)
    print(text)
    if out is None:
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_suffix(".csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    out.with_suffix(".md").write_text(text + "\n")
    print(f"wrote {out.with_suffix('.csv')}, {out.with_suffix('.md')}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["masks", "model", "gpu", "supervised", "classes"], help="which measurement")
    p.add_argument("ckpts", nargs="*", help="model: best.pt files of finished runs; classes: NAME=eval.json "
                                            "or NAME=grounding.json")
    p.add_argument("--out", type=Path, default=None,
                   help="write OUT.csv and OUT.md beside the printed table (default: print only)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default 0: torch's choice)")
    p.add_argument("--preset", default="small", choices=["tiny", "small"], help="supervised: the preset")
    p.add_argument("--steps", type=int, default=1056, help="supervised: optimizer steps")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.what == "masks":
        masks_table(a.out)
    elif a.what == "model":
        if not a.ckpts:
            p.error("model: give one or more best.pt files")
        model_rows([Path(c) for c in a.ckpts], a.out)
    elif a.what == "classes":
        classes_table(a.ckpts, a.out)
    elif a.what == "gpu":
        gpu_estimate(a.out)
    else:
        supervised(a.preset, a.steps, a.out)


if __name__ == "__main__":
    main()
