"""The small preset (one GPU, or ~1 h on 2 CPU cores): its shapes, a few training steps end to end on
a synthetic set stored at its finer voxel size, --preset auto, the phantom's small findings at its
resolution, k-fold splits of a reports CSV, and its memory plan. A few steps only: CPU and fast.

    pytest tests/test_small_preset.py -q
"""
import csv
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import cmki
import data as data_lib
import train
from model import PRESETS, BrgSA
from prepare import phantom
from prepare.tables import read_csv
from prepare import phantom_scene as scene

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import memory_plan  # noqa: E402
import small_preset  # noqa: E402

SMALL = PRESETS["small"]


def test_preset_matches_its_preprocessing_and_patch_grid():
    from prepare.preprocess import preprocess_settings
    assert preprocess_settings("small") == ("small", (3.5, 3.5, 5.0), (96, 96, 64))  # its cache's grid
    assert tuple(SMALL.image_size) == tuple(SMALL.crop_size)  # whole volumes: position pooling
    # the same field of view as the tiny preset, at twice its resolution
    tiny = PRESETS["tiny"]
    assert np.allclose(np.multiply(SMALL.spacing, SMALL.image_size), np.multiply(tiny.spacing, tiny.image_size))
    assert all(n % p == 0 for n, p in zip(SMALL.image_size, SMALL.patch_size))
    assert train.TRAIN_PRESETS["small"]["synth_n"] >= 1000


def test_forward_shapes():
    torch.manual_seed(0)
    model = BrgSA(SMALL).eval()
    grid = tuple(n // p for n, p in zip(SMALL.image_size, SMALL.patch_size))
    x = torch.randn(2, 1, *SMALL.image_size)
    with torch.no_grad():
        tokens, got_grid = model.visual.tokens(x)
        v = model.visual(x)
        u = model.visual.patch_embeddings(tokens)
    assert got_grid == grid and tokens.shape == (2, 1 + np.prod(grid), SMALL.vit_width)
    assert v.shape == (2, SMALL.embed_dim) and u.shape == (2, np.prod(grid), SMALL.embed_dim)
    torch.testing.assert_close(u.mean(1), v)  # position pooling: v is the mean of the patch embeddings
    assert model.bank.weight.shape == (SMALL.bank_size, SMALL.embed_dim)


def test_a_few_steps_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setattr(cmki, "USE_KERNELS", False)  # eager maths: fast (kernels: test_kernels_training)
    out = tmp_path / "run"
    result = train.main(["--preset=small", "--device=cpu", "--synth_n=12", "--batch_size=4",
                         "--max_iters=3", "--eval_interval=0", "--log_interval=1",
                         f"--synth_dir={tmp_path / 'synth'}", f"--out_dir={out}"])
    assert len(result["history"]) == 3 and all(np.isfinite(result["history"]))
    # the synthetic set is generated for this preset: stored finer than its 3.5 x 3.5 x 5 mm grid
    meta = read_csv(tmp_path / "synth" / "n12_seed0_small" / "dataset" / "metadata" / "train_metadata.csv")
    for row in meta:
        sxy = float(row["XYSpacing"].strip("[]").split(",")[0])
        assert 2.0 <= sxy <= 2.3 and 4.0 <= float(row["ZSpacing"]) <= 4.5, row
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert tuple(ckpt["model_config"]["image_size"]) == (96, 96, 64)
    assert ckpt["train_config"]["preset"] == "small"
    saved = json.loads((out / "eval.json").read_text())
    assert saved["n_volumes"] == result["n_volumes"] > 0 and len(saved["auc"]) == len(scene.CLASSES)
    assert saved["macro_auc"] == pytest.approx(result["macro_auc"])


@pytest.mark.parametrize("cuda, device, preset", [
    (True, "auto", "small"), (False, "auto", "tiny"), (True, "cpu", "tiny"), (True, "cuda", "small")])
def test_auto_preset_follows_the_device(cuda, device, preset, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1 if cuda else 0)
    cfg = train.parse_args([f"--device={device}", f"--out_dir={tmp_path}"])
    first = capsys.readouterr().out.splitlines()[0]
    assert cfg.preset == preset and first.startswith(f"train: --preset auto picked {preset}: ")
    assert cfg.batch_size == train.TRAIN_PRESETS[preset]["batch_size"]
    # an explicit preset is kept, and says nothing
    assert train.parse_args(["--preset=tiny", f"--device={device}", f"--out_dir={tmp_path}"]).preset == "tiny"
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("k", small_preset.SMALL_FINDINGS, ids=[scene.CLASSES[k] for k in small_preset.SMALL_FINDINGS])
def test_small_findings_cover_more_than_a_voxel_or_two_at_its_resolution(k):
    lesions, _ = small_preset.lesion_voxels(k, "small", seeds=range(2))
    tiny, _ = small_preset.lesion_voxels(k, "tiny", seeds=range(2))
    assert np.median(lesions) >= 5, f"{scene.CLASSES[k]}: {sorted(lesions)}"
    assert np.median(lesions) >= 4 * np.median(tiny)  # ~8x the voxels per mm^3


def test_stored_spacing_draws_are_the_same_for_both_ranges():
    for seed in range(5):
        t = scene.draw_spacing(np.random.default_rng(seed), "tiny")
        s = scene.draw_spacing(np.random.default_rng(seed), "small")
        u = [(t[0] - 4.0) / 0.6, (t[2] - 8.0) / 1.0]
        np.testing.assert_allclose([(s[0] - 2.0) / 0.3, (s[2] - 4.0) / 0.5], u, atol=1e-3)
    with pytest.raises(ValueError, match="voxels"):
        scene.draw_spacing(np.random.default_rng(0), "paper")


def _reports_csv(path, n):
    rng = np.random.default_rng(0)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["report_text"] + scene.CLASSES)
        for i in range(n):
            w.writerow([f"Report number {i}."] + rng.integers(0, 2, 18).tolist())
    return path


def _texts(root, split):
    name = "train_reports.csv" if split == "train" else "validation_reports.csv"
    rows = read_csv(root / "radiology_text_reports" / name)
    return [r["Findings_EN"] for r in rows if r["VolumeName"].endswith("_1.nii.gz")]


def test_folds_hold_out_each_report_once_and_the_last_is_the_default_split(tmp_path):
    src = _reports_csv(tmp_path / "reports.csv", 10)
    quiet = lambda *a: None  # noqa: E731
    held = []
    for fold in range(5):
        root = phantom.generate(tmp_path / f"f{fold}", n=10, seed=0, workers=1, reports_csv=src, log=quiet,
                                fold=fold, folds=5)
        valid, trained = _texts(root, "valid"), _texts(root, "train")
        assert len(valid) == 2 and len(trained) == 8 and not set(valid) & set(trained)
        held += valid
    assert sorted(held) == sorted(f"Report number {i}." for i in range(10))
    # a report's scan is the same in every fold: fold 4 of 5 is the plain 80/20 split, byte for byte
    plain = phantom.generate(tmp_path / "plain", n=10, seed=0, workers=1, reports_csv=src, log=quiet)
    files = lambda r: {p.relative_to(r).as_posix(): p.read_bytes() for p in r.rglob("*") if p.is_file()}  # noqa: E731
    assert files(plain) == files(tmp_path / "f4" / "dataset")
    with pytest.raises(ValueError, match="reports"):
        phantom.generate(tmp_path / "x", n=10, fold=0)
    with pytest.raises(ValueError, match="fold"):
        phantom.generate(tmp_path / "y", n=10, reports_csv=src, fold=5, folds=5)


def test_memory_plan_fits_a_16_gb_gpu_at_its_batch_size():
    batch = train.TRAIN_PRESETS["small"]["batch_size"]
    rows = {(prec, ck): total for prec, ck, _, _, total, fits in memory_plan.plan(SMALL, batch, 16)}
    assert rows[("bf16 autocast", "no")] <= 0.9 * 16 and rows[("bf16 autocast", "yes")] < rows[("bf16 autocast", "no")]


def test_ablation_needs_reports_for_real_text_and_reads_older_csvs(tmp_path, capsys):
    import ablation
    with pytest.raises(SystemExit) as exit_:
        ablation.main(["--sets", "real_text", "--work", str(tmp_path)])
    assert exit_.value.code == 2 and "--reports" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        ablation.main(["--sets", "real_text", "--reports", str(tmp_path / "r.csv"), "--folds", "1"])
    old = tmp_path / "old.csv"  # a table written before the preset and fold columns
    old.write_text("set,method,seed,macro_auc,macro_auc_ctclip,probe_auc,selected_step,steps,seconds,"
                   "raw_centroid_distance,raw_true_pair_cos,raw_random_pair_cos,bank_centroid_distance,"
                   "bank_true_pair_cos,bank_random_pair_cos\n"
                   "synthetic,brgsa,0,0.7,0.6,0.77,630,704,500,0.4,0.2,0.0,0.4,0.3,0.0\n"
                   "synthetic,brgsa,1,0.8,0.6,0.77,630,704,500,0.4,0.2,0.0,0.4,0.3,0.0\n")
    ablation.main(["--merge", str(old), "--out", str(tmp_path / "t")])
    assert "| synthetic | tiny | brgsa | 2 | 0.750 ± 0.071 |" in (tmp_path / "t.md").read_text()


def test_classes_table_puts_zero_shot_and_grounding_side_by_side(tmp_path, capsys):
    names = data_lib.CTRATE_CLASSES
    ev = {"auc": {c: i / 100 for i, c in enumerate(names)}}
    gr = {"per_finding": {c: {"auroc": 0.5 + i / 100, "beats_chance": i % 2 == 1}
                          for i, c in enumerate(names)}}
    (tmp_path / "e.json").write_text(json.dumps(ev))
    (tmp_path / "g.json").write_text(json.dumps(gr))
    small_preset.main(["classes", f"a={tmp_path / 'e.json'}", f"a={tmp_path / 'g.json'}",
                       "--out", str(tmp_path / "t")])
    lines = (tmp_path / "t.md").read_text().splitlines()
    assert lines[0] == "| finding | a zero-shot | a grounding |"
    assert lines[2] == f"| {names[0]} | 0.000 | 0.500 |"
    assert lines[3] == f"| {names[1]} | 0.010 | 0.510* |"
    assert len(lines) == 2 + len(names)
