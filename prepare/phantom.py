"""Synthetic chest CT + radiology report generator: the project's embedded default data set.

Each scan is a procedural chest (body wall, ribs, spine, lungs, airways, heart, aorta, upper abdomen)
drawn in millimetres, so one scene can be sampled on any grid (a second reconstruction is the same
scene on another grid with other noise). The 18 CT-RATE abnormalities each paint a signature big
enough to survive the tiny preset's 7 x 7 x 10 mm voxels; labels come from a few latent factors
(age, smoking, heart failure, infection, interstitial disease) so findings co-occur as in real
reports. Reports are written from the labels with varied templates, negations and normal statements,
and never contain the zero-shot prompt "There is {name}". Output follows the CT-RATE layout: int16
NIfTI volumes in the v1 convention (HU = raw - 1024, slope/intercept in the metadata CSV) with an
LPS-style affine, metadata, reports and 18-label CSVs. A fixed seed gives byte-identical files.

The scene (anatomy, findings, rendering) lives in prepare/phantom_scene.py and the report templates
in prepare/phantom_reports.py; this file draws the labels, writes the files and runs the command line.

    python -m prepare.phantom --out data/phantom --n 1000 --seed 0
    python -m prepare.phantom --out data/grounding --n 120 --seed 12 --masks   # + per-finding masks
    python -m prepare.phantom --out data/real_text --reports reports.csv   # real report texts + labels
    python -m prepare.phantom --out data/real_text_f0 --reports reports.csv --fold 0 --folds 5  # k-fold split
    python -m prepare.phantom --out data/phantom_small --voxels small   # stored finer, for the small preset
"""
import argparse
import csv
import gzip
import json
import multiprocessing
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from prepare.files import worker_signals
from prepare.phantom_reports import compose_report
from prepare.phantom_scene import (ARTERIAL, ATELECTASIS, BRONCHIECTASIS, CARDIOMEGALY, CLASSES,
                                   CONSOLIDATION, CORONARY, EMPHYSEMA, FIBROSIS, HERNIA, LYMPH,
                                   MATERIAL, MOSAIC, NODULE, OPACITY, PERIBRONCHIAL, PERICARDIAL,
                                   PLEURAL, SEPTAL, STORED_SPACING, draw_spacing,
                                   render_volume)

INTERCEPT = -1024                # CT-RATE v1: raw = HU - intercept, slope 1
MARKER = "synthetic.json"        # written beside the CSVs: what made this set (train.py and eval.py
                                 # say so when a model trained on it scores a scan)
SECOND_RECON_P = 0.1             # share of scans that get a second reconstruction of the same scene


# ----------------------------------------------------------------------------- labels

def sample_labels(rng):
    """18 labels from latent factors: age -> calcification and hernia; smoking -> emphysema, nodules,
    bronchial walls; heart failure -> cardiomegaly, effusions, septal lines; infection -> opacity,
    consolidation, nodes; interstitial disease -> fibrosis, bronchiectasis, septal lines. ~10% normal."""
    age, smoker, hf, inf, ild = rng.random(), *(rng.random(4) < [0.35, 0.22, 0.25, 0.15])
    u, normal = rng.random(len(CLASSES)), rng.random() < 0.1
    p, y = np.zeros(len(CLASSES)), np.zeros(len(CLASSES), np.int64)
    order = [ARTERIAL, CORONARY, CARDIOMEGALY, PERICARDIAL, PLEURAL, ATELECTASIS, EMPHYSEMA, NODULE,
             OPACITY, CONSOLIDATION, FIBROSIS, SEPTAL, MOSAIC, PERIBRONCHIAL, BRONCHIECTASIS, LYMPH,
             HERNIA, MATERIAL]
    rules = {ARTERIAL: lambda: 0.05 + 0.5 * age,
             CORONARY: lambda: 0.6 if y[ARTERIAL] else 0.06,
             CARDIOMEGALY: lambda: 0.7 if hf else 0.07,
             PERICARDIAL: lambda: 0.4 if hf else 0.06,
             PLEURAL: lambda: 0.6 if hf else 0.3 if inf else 0.05,
             ATELECTASIS: lambda: 0.55 if y[PLEURAL] else 0.15,
             EMPHYSEMA: lambda: 0.6 if smoker else 0.07,
             NODULE: lambda: 0.4 if smoker else 0.2,
             OPACITY: lambda: 0.75 if inf else 0.12,
             CONSOLIDATION: lambda: (0.6 if inf else 0.04) if y[OPACITY] else 0.05,
             FIBROSIS: lambda: 0.75 if ild else 0.1 + 0.1 * age,
             SEPTAL: lambda: 0.45 if ild else 0.3 if hf else 0.05,
             MOSAIC: lambda: 0.25 if ild else 0.1,
             PERIBRONCHIAL: lambda: 0.3 if inf or smoker else 0.06,
             BRONCHIECTASIS: lambda: 0.45 if ild else 0.09,
             LYMPH: lambda: 0.45 if inf else 0.15,
             HERNIA: lambda: 0.05 + 0.25 * age,
             MATERIAL: lambda: 0.4 if hf else 0.1}
    for k in order:
        p[k] = rules[k]()
        y[k] = u[k] < p[k]
    return np.zeros_like(y) if normal else y


# ----------------------------------------------------------------------------- files in CT-RATE layout

META_COLUMNS = ["VolumeName", "XYSpacing", "ZSpacing", "RescaleSlope", "RescaleIntercept",
                "ImageOrientationPatient", "ImagePositionPatient"]
REPORT_COLUMNS = ["VolumeName", "ClinicalInformation_EN", "Technique_EN", "Findings_EN", "Impressions_EN"]
SPLITS = {"train": ("train_metadata.csv", "train_reports.csv", "train_predicted_labels.csv"),
          "valid": ("validation_metadata.csv", "validation_reports.csv", "valid_predicted_labels.csv")}


def _write_lps(path, ras, spacing):
    """Store a canonical-RAS array in LPS order: affine diag(-sx, -sy, sz), so that readers must
    reorient. gzip with mtime 0 keeps the bytes reproducible. -> RAS mm of voxel 0."""
    (sx, sy, sz), (nx, ny, nz) = spacing, ras.shape
    origin = np.array([(nx - 1) / 2 * sx, (ny - 1) / 2 * sy, -(nz - 1) / 2 * sz])         # RAS mm of voxel 0
    affine = np.diag([-sx, -sy, sz, 1.0])
    affine[:3, 3] = origin
    img = nib.Nifti1Image(np.ascontiguousarray(ras[::-1, ::-1, :]), affine)              # RAS -> LPS axes
    img.header.set_xyzt_units("mm")
    img.header.set_slope_inter(1.0, 0.0)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    Path(path).write_bytes(gzip.compress(img.to_bytes(), compresslevel=1, mtime=0))
    return origin


def write_volume(path, hu, spacing):
    """Store canonical-RAS HU as int16 raw (HU + 1024), LPS-oriented (_write_lps). -> metadata fields."""
    raw = (np.clip(np.rint(hu), -1024, 3071) - INTERCEPT).astype(np.int16)   # 12-bit raw
    sx, sy, sz = spacing
    origin = _write_lps(path, raw, spacing)
    lps = [-origin[0], -origin[1], origin[2]]
    return dict(XYSpacing=f"[{sx}, {sy}]", ZSpacing=sz, RescaleSlope=1, RescaleIntercept=INTERCEPT,
                ImageOrientationPatient="[1, 0, 0, 0, 1, 0]",
                ImagePositionPatient="[" + ", ".join(f"{v:.4f}" for v in lps) + "]")


def mask_path(root, volume_name, finding):
    """Where the --masks option writes one finding's mask of one volume:
    ROOT/masks/<volume name without .nii.gz>/<finding, lower case, '_' for spaces>.nii.gz."""
    stem = volume_name[:-len(".nii.gz")] if volume_name.endswith(".nii.gz") else volume_name
    return Path(root) / "masks" / stem / (finding.lower().replace(" ", "_") + ".nii.gz")


def _make_scan(job):
    """Render and write every reconstruction of one scan; -> list of (split, meta, report, labels) rows."""
    root, split, patient, seed, index, labels, text, with_masks, voxels = job
    rng = np.random.default_rng(np.random.SeedSequence([seed, index]))
    drawn = sample_labels(rng)
    labels = drawn if labels is None else np.asarray(labels)
    report = compose_report(labels, rng)
    if text is not None:
        report.update(ClinicalInformation_EN="", Technique_EN="", Findings_EN=text, Impressions_EN="")
    scene_seed, n_recon, recon_rng = rng.integers(2 ** 63), 1 + int(rng.random() < SECOND_RECON_P), rng
    folder = Path(root) / split / f"{split}_{patient}" / f"{split}_{patient}_a"
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for r in range(1, n_recon + 1):
        name = f"{split}_{patient}_a_{r}.nii.gz"
        spacing = None if r == 1 else draw_spacing(recon_rng, voxels)
        masks = {} if with_masks else None
        hu, spacing = render_volume(labels, np.random.default_rng(scene_seed), spacing,
                                    None if r == 1 else int(recon_rng.integers(2 ** 63)), masks, voxels)
        meta = write_volume(folder / name, hu, spacing)
        for k, m in (masks or {}).items():  # uint8 0/1 on the volume's own grid and affine
            path = mask_path(root, name, CLASSES[k])
            path.parent.mkdir(parents=True, exist_ok=True)
            _write_lps(path, m.astype(np.uint8), spacing)
        rows.append((split, dict(VolumeName=name, **meta), dict(VolumeName=name, **report),
                     dict(VolumeName=name, **{c: int(v) for c, v in zip(CLASSES, labels)})))
    return rows


def read_reports_csv(path):
    """Rows of a CSV with `report_text` and the 18 label columns -> list of (labels (18,), text)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"reports CSV not found: {path}")
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        missing = [c for c in ["report_text"] + CLASSES if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: missing column(s) {missing}; expected 'report_text' and the 18 label columns")
        out = []
        for i, row in enumerate(reader, start=2):
            try:
                labels = np.array([int(float(row[c])) for c in CLASSES])
            except (TypeError, ValueError) as e:
                raise ValueError(f"{path}, line {i}: labels must be 0/1 ({e})") from None
            if not np.isin(labels, (0, 1)).all():
                raise ValueError(f"{path}, line {i}: labels must be 0/1, got {labels.tolist()}")
            out.append((labels, row["report_text"] or ""))
    return out


def _write_csv(path, columns, rows):
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        w.writerows(rows)


def fold_rows(n, fold, folds):
    """Row indices held out by fold `fold` of `folds` over n rows: the fold-th of `folds` contiguous
    blocks (sizes differ by at most one); the last fold holds out the last rows."""
    if not (folds >= 2 and 0 <= fold < folds and n >= folds):
        raise ValueError(f"need 0 <= fold < folds, folds >= 2 and at least `folds` rows, got fold={fold}, "
                         f"folds={folds}, {n} rows")
    return range(fold * n // folds, (fold + 1) * n // folds)


def generate(out_dir, n=1000, valid_fraction=0.2, seed=0, workers=2, reports_csv=None, log=print,
             masks=False, voxels="tiny", fold=None, folds=5):
    """Write a synthetic CT-RATE-style data set under out_dir/dataset and return that path.

    The first round(n * (1 - valid_fraction)) scans are train_*, the rest valid_*. With reports_csv,
    each real report's labels drive its volume and its text becomes Findings_EN (n <= number of rows).
    fold (with reports_csv): the rows of fold_rows(n, fold, folds) are the valid_* scans instead (the
    others train_*, in row order); each row's scan is the same in every fold (it is drawn from the row
    index), and the last fold is the default split when valid_fraction = 1 / folds.
    masks: also write each positive finding's mask (mask_path); the volumes stay byte-identical.
    voxels: the stored voxel sizes (STORED_SPACING); "small" renders the same scenes ~2x finer."""
    t0, root = time.time(), Path(out_dir) / "dataset"
    if voxels not in STORED_SPACING:
        raise ValueError(f"voxels must be one of {sorted(STORED_SPACING)}, got {voxels!r}")
    if fold is not None and reports_csv is None:
        raise ValueError("a fold splits the rows of a reports CSV: give reports_csv (--reports) with it")
    real = read_reports_csv(reports_csv) if reports_csv is not None else None
    n = min(int(n), len(real)) if real is not None else int(n)
    if n < 1 or not 0.0 <= valid_fraction < 1.0:
        raise ValueError(f"need n >= 1 and 0 <= valid_fraction < 1, got n={n}, valid_fraction={valid_fraction}")
    held = set(fold_rows(n, fold, folds)) if fold is not None else set(range(int(round(n * (1 - valid_fraction))), n))
    order = [i for i in range(n) if i not in held] + sorted(held)  # train rows, then valid rows
    n_train = n - len(held)
    jobs = []
    for k, i in enumerate(order):
        split, patient = ("train", k + 1) if k < n_train else ("valid", k - n_train + 1)
        labels, text = real[i] if real is not None else (None, None)
        jobs.append((str(root), split, patient, int(seed), i, labels, text, bool(masks), voxels))
    for sub in ("metadata", "radiology_text_reports", "multi_abnormality_labels"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    tables = {s: ([], [], []) for s in SPLITS}
    step = max(1, n // 10)
    with multiprocessing.Pool(workers, initializer=worker_signals) if workers > 1 else _Serial() as pool:
        for done, rows in enumerate(pool.imap(_make_scan, jobs, chunksize=4), start=1):
            for split, *row in rows:
                for table, r in zip(tables[split], row):
                    table.append(r)
            if done % step == 0 or done == n:
                log(f"phantom: {done}/{n} scans")
    for split, (meta, reports, labels) in tables.items():
        names = SPLITS[split]
        _write_csv(root / "metadata" / names[0], META_COLUMNS, meta)
        _write_csv(root / "radiology_text_reports" / names[1], REPORT_COLUMNS, reports)
        _write_csv(root / "multi_abnormality_labels" / names[2], ["VolumeName"] + CLASSES, labels)
    (root / MARKER).write_text(json.dumps(dict(made_by="python -m prepare.phantom", n=n, seed=int(seed),
                                               reports=str(reports_csv) if reports_csv else "templates",
                                               scans="synthetic phantoms, not real CT")) + "\n")
    volumes = sum(len(t[0]) for t in tables.values())
    prevalence = np.mean([[r[c] for c in CLASSES] for t in tables.values() for r in t[2]], axis=0)
    log(f"phantom: {n} scans ({n_train} train, {n - n_train} valid), {volumes} volumes in "
        f"{time.time() - t0:.1f} s -> {root}")
    log("phantom: prevalence " + ", ".join(f"{c} {p:.2f}" for c, p in zip(CLASSES, prevalence)))
    return root


class _Serial:
    """Stand-in for multiprocessing.Pool when workers <= 1."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def imap(self, fn, jobs, chunksize=1):
        return map(fn, jobs)


def main(argv=None):
    p = argparse.ArgumentParser(description="Write a synthetic chest CT + report data set in CT-RATE layout.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", required=True, help="output folder; the data set goes to OUT/dataset")
    p.add_argument("--n", type=int, default=1000, help="number of scans (patients); ~10%% get a second reconstruction")
    p.add_argument("--valid_fraction", type=float, default=0.2, help="share of scans written as valid_* (the last ones)")
    p.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives byte-identical files")
    p.add_argument("--workers", type=int, default=2, help="worker processes (1 = no multiprocessing)")
    p.add_argument("--reports", default=None, metavar="CSV",
                   help="CSV with report_text + the 18 label columns: each row's labels drive one volume and "
                        "its text becomes the report (n = number of rows unless --n is smaller)")
    p.add_argument("--fold", type=int, default=None,
                   help="with --reports: hold out the fold-th of --folds contiguous blocks of rows as the valid "
                        "split instead of the last --valid_fraction")
    p.add_argument("--folds", type=int, default=5, help="number of folds for --fold")
    p.add_argument("--voxels", default="tiny", choices=sorted(STORED_SPACING),
                   help="stored voxel sizes: tiny ~4.3 x 4.3 x 8.5 mm (for the tiny preset), small ~2.15 x 2.15 "
                        "x 4.25 mm (for the small preset; ~8x the voxels)")
    p.add_argument("--masks", action="store_true",
                   help="also write each positive finding's voxel mask (NIfTI, the volume's grid and affine) "
                        "to OUT/dataset/masks/<volume>/<finding>.nii.gz (default: off)")
    a = p.parse_args(argv)
    try:
        generate(a.out, n=a.n, valid_fraction=a.valid_fraction, seed=a.seed, workers=a.workers, reports_csv=a.reports,
                 masks=a.masks, voxels=a.voxels, fold=a.fold, folds=a.folds)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"phantom: error: {e}")


if __name__ == "__main__":
    main()
