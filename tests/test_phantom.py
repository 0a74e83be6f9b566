"""Tests for prepare/phantom.py and its scene and report templates: CT-RATE layout, determinism,
orientation, every finding's signature, reports.

    pytest tests/test_phantom.py -q
"""
import csv
import re

import nibabel as nib
import numpy as np
import pytest

from prepare import phantom, phantom_reports
from prepare import phantom_scene as scene

# Words that a sentence about each class contains (used to check what a report claims).
KEYWORDS = {scene.MATERIAL: ["medical material", "pacemaker", "catheter", "sternotomy"], scene.ARTERIAL: ["aort"],
            scene.CARDIOMEGALY: ["cardiomegaly", "enlarged heart", "heart is enlarged", "heart size is increased"],
            scene.PERICARDIAL: ["pericardial"], scene.CORONARY: ["coronary"], scene.HERNIA: ["hernia"], scene.LYMPH: ["lymph"],
            scene.EMPHYSEMA: ["emphysem"], scene.ATELECTASIS: ["atelecta"], scene.NODULE: ["nodul"], scene.OPACITY: ["ground"],
            scene.FIBROSIS: ["fibrotic"], scene.PLEURAL: ["pleural effusion", "pleural fluid"], scene.MOSAIC: ["mosaic"],
            scene.PERIBRONCHIAL: ["peribronch", "bronchial wall"], scene.CONSOLIDATION: ["consolidat"],
            scene.BRONCHIECTASIS: ["bronchiect"], scene.SEPTAL: ["septa"]}
NEGATED = re.compile(r"\b(no|not|normal)\b")


def _read(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_layout_and_columns(tmp_path):
    root = phantom.generate(tmp_path, n=6, valid_fraction=0.34, seed=1, workers=1, log=lambda s: None)
    assert root == tmp_path / "dataset"
    meta = {"train": _read(root / "metadata/train_metadata.csv"), "valid": _read(root / "metadata/validation_metadata.csv")}
    reps = {"train": _read(root / "radiology_text_reports/train_reports.csv"),
            "valid": _read(root / "radiology_text_reports/validation_reports.csv")}
    labs = {"train": _read(root / "multi_abnormality_labels/train_predicted_labels.csv"),
            "valid": _read(root / "multi_abnormality_labels/valid_predicted_labels.csv")}
    assert list(meta["train"][0]) == phantom.META_COLUMNS
    assert list(reps["valid"][0]) == phantom.REPORT_COLUMNS
    assert list(labs["train"][0]) == ["VolumeName"] + scene.CLASSES
    for split, patients in (("train", {1, 2, 3, 4}), ("valid", {1, 2})):
        names = [r["VolumeName"] for r in meta[split]]
        assert names == [r["VolumeName"] for r in reps[split]] == [r["VolumeName"] for r in labs[split]]
        assert {int(n.split("_")[1]) for n in names} == patients
        for r in meta[split]:
            name = r["VolumeName"]
            assert re.fullmatch(rf"{split}_\d+_a_[12]\.nii\.gz", name)
            p, _, _ = name.split("_")[1:4]
            img = nib.load(root / split / f"{split}_{p}" / f"{split}_{p}_a" / name)
            sxy = [float(v) for v in r["XYSpacing"].strip("[]").split(",")]
            np.testing.assert_allclose(img.header.get_zooms(), sxy + [float(r["ZSpacing"])], rtol=1e-6)
            assert (r["RescaleSlope"], r["RescaleIntercept"]) == ("1", "-1024")
            assert img.get_data_dtype() == np.int16
        assert all(set(r[c] for c in scene.CLASSES) <= {"0", "1"} for r in labs[split])


def test_same_seed_same_bytes(tmp_path):
    kw = dict(n=5, valid_fraction=0.2, log=lambda s: None)
    a = _files(phantom.generate(tmp_path / "a", seed=3, workers=1, **kw))
    b = _files(phantom.generate(tmp_path / "b", seed=3, workers=2, **kw))      # parallel gives the same files
    c = _files(phantom.generate(tmp_path / "c", seed=4, workers=1, **kw))
    assert a == b
    assert a.keys() & c.keys() and all(a[k] != c[k] for k in a.keys() & c.keys() if k.endswith(".nii.gz"))


def test_second_reconstruction_is_same_scene():
    labels = np.zeros(18)
    hu1, s1 = scene.render_volume(labels, np.random.default_rng(0))
    hu2, s2 = scene.render_volume(labels, np.random.default_rng(0), spacing=(3.5, 3.5, 7.0), noise_seed=1)
    assert s2 == (3.5, 3.5, 7.0) and hu2.shape != hu1.shape
    # same anatomy: the lung volume (mm^3) agrees within 3%
    v1, v2 = (np.count_nonzero(h < -600) * np.prod(s) for h, s in ((hu1, s1), (hu2, s2)))
    assert abs(v1 - v2) / v1 < 0.03, (v1, v2)


def test_orientation_after_canonical_reorientation(tmp_path):
    hu, spacing = scene.render_volume(np.eye(18)[scene.CARDIOMEGALY], np.random.default_rng(2))
    path = tmp_path / "v.nii.gz"
    phantom.write_volume(path, hu, spacing)
    img = nib.load(path)
    assert nib.aff2axcodes(img.affine) == ("L", "P", "S")        # stored like DICOM, not RAS
    can = nib.as_closest_canonical(img)
    assert nib.aff2axcodes(can.affine) == ("R", "A", "S")
    ras = np.asarray(can.dataobj).astype(np.float32) + phantom.INTERCEPT
    np.testing.assert_array_equal(ras, np.clip(np.rint(hu), -1024, 3071))
    g = scene.Grid(hu.shape, spacing)
    X, Y, Z = np.broadcast_arrays(g.x, g.y, g.z)
    spine = (ras > 300) & (np.abs(X) < 25) & (ras < 2000)
    assert Y[spine].mean() < -40, Y[spine].mean()                 # spine posterior (low y)
    blood = (ras > 90) & (ras < 220) & (Z < 0)                    # contrast blood, mostly the heart
    n = lambda m: np.count_nonzero(blood & m)
    assert n(X < 0) > 1.5 * n(X > 0) and n(Y > 0) > n(Y < 0), (n(X < 0), n(X > 0), n(Y > 0), n(Y < 0))
    lung = ras < -600
    body = np.abs(X) < 140
    assert np.count_nonzero(lung & body & (X < 0)) > 2000 and np.count_nonzero(lung & body & (X > 0)) > 2000


def _pair(k, seed):
    base = np.zeros(18)
    a, spacing = scene.render_volume(base, np.random.default_rng(seed))
    b, _ = scene.render_volume(base + np.eye(18)[k], np.random.default_rng(seed))
    d = np.abs(b - a) > 1
    g = scene.Grid(a.shape, spacing)
    X, Y, Z = (np.broadcast_to(c, a.shape)[d] for c in (g.x, g.y, g.z))
    return a[d], b[d], X, Y, Z


# per class: a check on (before, after, x, y, z) of the voxels that the finding changed (mm, HU)
SIGNATURES = {
    scene.MATERIAL: lambda a, b, x, y, z: b.max() > 2300 and (b > 2000).sum() >= 20,
    scene.ARTERIAL: lambda a, b, x, y, z: b.max() > 1400 and (b > 1000).sum() >= 10 and np.median(np.abs(x)) < 50,
    scene.CARDIOMEGALY: lambda a, b, x, y, z: b.size > 3000 and -20 < np.median(b) < 250 and x.mean() < 0,
    scene.PERICARDIAL: lambda a, b, x, y, z: b.size > 800 and -10 < np.median(b) < 30 and x.mean() < 0 and y.mean() > -10,
    scene.CORONARY: lambda a, b, x, y, z: b.max() > 1400 and (b > 1000).sum() >= 8 and x.mean() < 10,
    scene.HERNIA: lambda a, b, x, y, z: (b < -900).any() and (b > 0).any() and z.mean() < 0 and y.mean() < 20,
    scene.LYMPH: lambda a, b, x, y, z: b.size > 30 and 15 < np.median(b) < 65 and np.median(a) < 0,
    scene.EMPHYSEMA: lambda a, b, x, y, z: (b < -950).sum() > 300 and z[b < -950].mean() > 0 and np.median(a) < -750
    and (b - a).mean() < -40,
    scene.ATELECTASIS: lambda a, b, x, y, z: b.size > 80 and 5 < np.median(b) < 75 and np.median(a) < -700 and z.mean() < 0,
    scene.NODULE: lambda a, b, x, y, z: b.size > 8 and 5 < np.median(b) < 75 and np.median(a) < -700,
    scene.OPACITY: lambda a, b, x, y, z: b.size > 300 and -600 < np.median(b) < -400 and np.median(a) < -750,
    scene.FIBROSIS: lambda a, b, x, y, z: b.size > 80 and -150 < np.median(b) < 10 and np.median(a) < -700,
    scene.PLEURAL: lambda a, b, x, y, z: b.size > 300 and -10 < np.median(b) < 35 and y.mean() < -30 and np.median(a) < -700,
    scene.MOSAIC: lambda a, b, x, y, z: 0.2 < ((b - a) > 0).mean() < 0.8 and 70 < np.median(np.abs(b - a)) < 120,
    scene.PERIBRONCHIAL: lambda a, b, x, y, z: b.size > 200 and np.median(b) > -150 and np.median(a) < -600,
    scene.CONSOLIDATION: lambda a, b, x, y, z: b.size > 100 and 10 < np.median(b) < 55 and np.median(a) < -700,
    scene.BRONCHIECTASIS: lambda a, b, x, y, z: (b < -900).mean() > 0.3 and (b > -100).mean() > 0.2 and z.mean() < 0,
    scene.SEPTAL: lambda a, b, x, y, z: b.size > 800 and -430 < np.median(b) < -270 and np.median(a) < -750,
}


@pytest.mark.parametrize("k", range(18), ids=scene.CLASSES)
def test_each_finding_has_its_signature(k):
    for seed in (0, 1, 2):
        a, b, x, y, z = _pair(k, seed)
        assert b.size > 0, f"{scene.CLASSES[k]} changed nothing (seed {seed})"
        assert SIGNATURES[k](a, b, x, y, z), (f"{scene.CLASSES[k]} seed {seed}: n={b.size} before median "
                                              f"{np.median(a):.0f} after median {np.median(b):.0f} "
                                              f"centroid ({x.mean():.0f}, {y.mean():.0f}, {z.mean():.0f}) mm")


def test_labels_prevalence_and_cooccurrence():
    rng = np.random.default_rng(0)
    Y = np.array([phantom.sample_labels(rng) for _ in range(4000)])
    prev = Y.mean(0)
    assert ((prev > 0.08) & (prev < 0.45)).all(), dict(zip(scene.CLASSES, prev.round(3)))
    assert 0.08 < (Y.sum(1) == 0).mean() < 0.25
    cond = lambda a, b: Y[Y[:, b] == 1, a].mean() / Y[Y[:, b] == 0, a].mean()
    assert cond(scene.CORONARY, scene.ARTERIAL) > 3 and cond(scene.PLEURAL, scene.CARDIOMEGALY) > 2
    assert cond(scene.CONSOLIDATION, scene.OPACITY) > 3 and cond(scene.NODULE, scene.EMPHYSEMA) > 1.2


def test_reports_mention_positives_and_never_claim_negatives():
    rng = np.random.default_rng(0)
    for i in range(400):
        labels = phantom.sample_labels(rng) if i % 4 else (rng.random(18) < 0.5).astype(int)
        rep = phantom_reports.compose_report(labels, rng)
        text = rep["Findings_EN"] + " " + rep["Impressions_EN"]
        for name in scene.CLASSES:
            assert f"there is {name.lower()}" not in text.lower()
        positive = [s.lower() for s in re.split(r"(?<=[.;:])\s+", rep["Findings_EN"]) if not NEGATED.search(s.lower())]
        for k, words in KEYWORDS.items():
            said = any(w in s for s in positive for w in words)
            assert said == bool(labels[k]), (scene.CLASSES[k], labels[k], rep["Findings_EN"])
        if not labels.any():
            assert rep["Impressions_EN"] == "Thoracic CT examination within normal limits."


def test_reports_csv_mode(shared_data, tmp_path):
    src = shared_data / "ctclip_reports_18labels" / "reports_shared.csv"
    rows = _read(src)[:3]
    root = phantom.generate(tmp_path, n=3, valid_fraction=0.34, seed=0, workers=1, reports_csv=src, log=lambda s: None)
    reps = _read(root / "radiology_text_reports/train_reports.csv") + _read(root / "radiology_text_reports/validation_reports.csv")
    labs = _read(root / "multi_abnormality_labels/train_predicted_labels.csv") + \
        _read(root / "multi_abnormality_labels/valid_predicted_labels.csv")
    first = [r for r in reps if r["VolumeName"].endswith("_1.nii.gz")]
    assert [r["Findings_EN"] for r in first] == [r["report_text"] for r in rows]
    assert all(r["Impressions_EN"] == "" for r in reps)
    firstlab = [r for r in labs if r["VolumeName"].endswith("_1.nii.gz")]
    assert [[r[c] for c in scene.CLASSES] for r in firstlab] == [[str(int(float(r[c]))) for c in scene.CLASSES] for r in rows]


def test_bad_reports_csv_is_named(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        phantom.generate(tmp_path, n=2, reports_csv=tmp_path / "nope.csv")
    bad = tmp_path / "bad.csv"
    bad.write_text("report_text,Cardiomegaly\nHeart is enlarged.,1\n")
    with pytest.raises(ValueError, match=r"bad\.csv.*Medical material"):
        phantom.generate(tmp_path, n=2, reports_csv=bad)
    with pytest.raises(SystemExit, match=r"phantom: error: .*bad\.csv"):
        phantom.main(["--out", str(tmp_path), "--reports", str(bad)])


def test_cli_help_lists_every_flag(capsys):
    with pytest.raises(SystemExit) as e:
        phantom.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--out", "--n", "--valid_fraction", "--seed", "--workers", "--reports"):
        assert flag in out


def test_help_lists_every_flag_with_its_default(capsys, help_lacks_defaults):
    with pytest.raises(SystemExit):
        phantom.main(["--help"])
    out = capsys.readouterr().out
    assert "--valid_fraction" in out and help_lacks_defaults(out) == []


def _digest(root):
    """Of every volume and table: the marker file (what made the set) came later and is left out."""
    import hashlib
    h = hashlib.sha256()
    for name, data in _files(root).items():
        if name == phantom.MARKER:
            continue
        h.update(name.encode())
        h.update(data)
    return h.hexdigest()


def test_default_set_unchanged_and_masks_leave_volumes_alone(tmp_path):
    # The digest of generate(n=4, seed=3) as written before masks existed: the default set must not move.
    quiet = lambda *a: None
    root = phantom.generate(tmp_path / "plain", n=4, seed=3, workers=1, log=quiet)
    assert _digest(root) == "b5dd87acf4e083278fed99d283d8d4cc95d0fcb6a8b4dfc0e721002f46bb85d6"
    import json
    assert json.loads((root / phantom.MARKER).read_text())["scans"] == "synthetic phantoms, not real CT"
    with_masks = phantom.generate(tmp_path / "masked", n=4, seed=3, workers=1, log=quiet, masks=True)
    files = _files(with_masks)
    assert {k: v for k, v in files.items() if not k.startswith("masks/")} == _files(root)
    for row in _read(root / "multi_abnormality_labels" / "train_predicted_labels.csv"):
        for c in scene.CLASSES:
            path = phantom.mask_path(with_masks, row["VolumeName"], c)
            assert path.is_file() == (row[c] == "1"), (row["VolumeName"], c)
            if path.is_file():
                vol = nib.load(str(next(with_masks.rglob(row["VolumeName"]))))
                m = nib.load(str(path))
                assert m.shape == vol.shape and np.array_equal(m.affine, vol.affine)
                assert np.asanyarray(m.dataobj).any()


@pytest.mark.parametrize("k", [k for k in range(18) if k != scene.CARDIOMEGALY], ids=[
    c for k, c in enumerate(scene.CLASSES) if k != scene.CARDIOMEGALY])
def test_masks_line_up_with_the_painted_voxels(k):
    """A finding alone on a normal chest: the voxels that differ from the same chest without it
    (same noise) all lie in its mask, and the mask is those voxels to within 1% (a later painter may
    write the very value the finding left, e.g. an airway lumen over an emphysema hole), except
    peribronchial thickening, whose mask is the whole thickened bronchus (normal bronchi are painted
    too, thinner). Cardiomegaly moves the anatomy (its mask is the enlarged heart): no such reference."""
    for seed in (0, 1):
        base, masks = np.zeros(18), {}
        a, _ = scene.render_volume(base, np.random.default_rng(seed))
        b, _ = scene.render_volume(base + np.eye(18)[k], np.random.default_rng(seed), masks=masks)
        changed = a != b
        assert set(masks) == {k} and changed.any()
        assert not (changed & ~masks[k]).any(), f"{scene.CLASSES[k]}: painted outside its mask"
        if k != scene.PERIBRONCHIAL:
            extra = np.count_nonzero(masks[k] & ~changed)
            assert extra <= 0.01 * masks[k].sum(), (
                f"{scene.CLASSES[k]} seed {seed}: mask {masks[k].sum()} voxels, changed {changed.sum()}")


def test_cardiomegaly_mask_is_the_enlarged_heart():
    masks = {}
    labels = np.eye(18)[scene.CARDIOMEGALY]
    hu, _ = scene.render_volume(labels, np.random.default_rng(0), masks=masks)
    heart = masks[scene.CARDIOMEGALY]
    assert heart.sum() > 3000 and 20 < np.median(hu[heart]) < 250  # myocardium and blood pool
