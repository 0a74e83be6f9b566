"""Tests for prepare/preprocess.py and prepare/tables.py: CT-RATE / RAD-ChestCT / NIfTI-folder caches,
their CSV tables, the command line, resumable runs and bad files.

Real volumes come from ../shared/data (skipped when absent); everything else is built in tmp_path.
    Run: python -m pytest tests/test_preprocess.py -q
"""
import csv
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import data
from model import PRESETS
from prepare import preprocess, tables
from test_data import T_SHAPE, T_SPACING, make_ctrate, write_csv


@pytest.mark.parametrize("style", ["v1", "v2"])
def test_prepare_ctrate_and_cache_reuse(tmp_path, style, capsys):
    truth = make_ctrate(tmp_path / "ct", "valid", style=style)
    cache = tmp_path / "cache"
    recs = preprocess.prepare_ctrate(tmp_path / "ct", "valid", cache, T_SPACING, T_SHAPE, workers=2)
    assert sorted(r.name for r in recs) == sorted(truth)
    for r in recs:
        hu, labels, report = truth[r.name]
        assert r.hu_rule == ("rescaled" if style == "v1" else "already_hu")
        np.testing.assert_allclose(r.spacing, [2.0, 2.5, 4.0])  # metadata, not the 1 mm header
        np.testing.assert_array_equal(r.labels, labels)
        assert r.report == report
        ras = hu[::-1, ::-1, :].astype(np.float32)  # the header says LPS
        want = data.preprocess_volume(ras, (2.0, 2.5, 4.0), T_SPACING, T_SHAPE)
        got = np.load(r.npy_path, mmap_mode="r")
        assert got.dtype == np.int16 and got.shape == T_SHAPE
        err = np.abs(got - want)  # int16 storage rounds to the nearest HU
        assert err.max() <= 0.5 + 1e-3, f"max err {err.max()} HU, mean {err.mean()}"
    back = {r.name: r for r in preprocess.load_index(cache)}
    assert set(back) == set(truth)
    for r in recs:
        np.testing.assert_array_equal(back[r.name].labels, r.labels)
        assert back[r.name].report == r.report and back[r.name].hu_rule == r.hu_rule
        np.testing.assert_allclose(back[r.name].spacing, r.spacing)
    mtimes = {p: p.stat().st_mtime_ns for p in (cache / "volumes").glob("*.npy")}
    capsys.readouterr()
    again = preprocess.prepare_ctrate(tmp_path / "ct", "valid", cache, T_SPACING, T_SHAPE, workers=1)
    assert f"skipped={len(truth)}" in capsys.readouterr().err
    assert len(again) == len(recs)
    assert {p: p.stat().st_mtime_ns for p in (cache / "volumes").glob("*.npy")} == mtimes
    with pytest.raises(ValueError, match="settings|built with"):
        preprocess.prepare_ctrate(tmp_path / "ct", "valid", cache, (5.0, 5.0, 8.0), T_SHAPE, workers=1)


def test_prepare_ctrate_logs_and_skips_bad_volumes(tmp_path, capsys):
    truth = make_ctrate(tmp_path, "train", n_patients=5)
    vol = tmp_path / "train" / "train_2" / "train_2_a" / "train_2_a_1.nii.gz"
    vol.write_bytes(vol.read_bytes()[:200])  # truncated download
    stray = tmp_path / "train" / "train_9" / "train_9_a"
    stray.mkdir(parents=True)
    (stray / "train_9_a_1.nii.gz").write_bytes((tmp_path / "train" / "train_1" / "train_1_a" /
                                                "train_1_a_1.nii.gz").read_bytes())
    recs = preprocess.prepare_ctrate(tmp_path, "train", tmp_path / "c", T_SPACING, T_SHAPE, workers=2)
    err = capsys.readouterr().err
    assert sorted(r.name for r in recs) == sorted(set(truth) - {"train_2_a_1"})
    assert "train_2_a_1" in err and "train_2_a_1.nii.gz" in err
    assert "train_9_a_1" in err and "train_metadata.csv" in err and "unknown volume" in err
    assert "failed=2" in err
    assert (tmp_path / "c" / "failed.txt").read_text().count("\n") == 2


def test_ctrate_csv_errors_name_file_and_column(tmp_path):
    make_ctrate(tmp_path, "train", n_patients=2)
    t = tables.CTRateTables(tmp_path, "train")
    with pytest.raises(ValueError, match=r"train_reports\.csv.*unknown volume name 'x_1'|"
                                         r"train_metadata\.csv.*unknown volume name 'x_1'"):
        t.entry("x_1")
    lab = tmp_path / "multi_abnormality_labels" / "train_predicted_labels.csv"
    rows = list(csv.DictReader(open(lab)))
    for r in rows:
        r.pop("Cardiomegaly")
    write_csv(lab, rows)
    with pytest.raises(ValueError, match=r"train_predicted_labels\.csv.*Cardiomegaly"):
        tables.CTRateTables(tmp_path, "train")
    with pytest.raises(FileNotFoundError, match="valid"):
        tables.CTRateTables(tmp_path, "valid")


def test_preprocess_cli_v1_v2_bad_files_summary_and_resume(tmp_path, capsys):
    make_ctrate(tmp_path / "v1", "train", n_patients=4, style="v1", seed=1)
    truth = make_ctrate(tmp_path / "v2", "train", n_patients=4, style="v2", seed=1)
    # both trees hold the same HU: v1 needs the intercept, v2 must not get it twice
    v1 = tmp_path / "v1" / "train" / "train_3" / "train_3_a" / "train_3_a_1.nii.gz"
    v1.write_bytes(v1.read_bytes()[:300])  # truncated
    args = ["--dataset", "ctrate", "--split", "train", "--preset", "tiny", "--workers", "2"]
    assert preprocess.preprocess_main(args + ["--root", f"{tmp_path}/v1", "--out", f"{tmp_path}/o1"]) == 1
    out = capsys.readouterr()
    assert "done=4 skipped=0 failed=1" in out.out and "train_3_a_1.nii.gz" in out.err
    assert "error: 1 volume(s) failed" in out.err and "the 4 good ones are in the index" in out.err
    assert "'rescaled': 4" in out.out
    assert preprocess.preprocess_main(args + ["--root", f"{tmp_path}/v2", "--out", f"{tmp_path}/o2"]) == 0
    assert "done=5 skipped=0 failed=0" in capsys.readouterr().out
    r1 = {r.name: r for r in preprocess.load_index(tmp_path / "o1")}
    r2 = {r.name: r for r in preprocess.load_index(tmp_path / "o2")}
    assert set(r2) == set(truth) and set(r1) == set(truth) - {"train_3_a_1"}
    for name in r1:
        assert r1[name].hu_rule == "rescaled" and r2[name].hu_rule == "already_hu"
        a, b = np.load(r1[name].npy_path), np.load(r2[name].npy_path)
        assert a.shape == PRESETS["tiny"].image_size
        np.testing.assert_array_equal(a, b)
        assert -1000 <= a.min() and a.max() <= 1000
        assert (a < -900).any() and (np.abs(a - 40) < 30).any()  # air and soft tissue
    # resume: a stray temp file from a killed run, one finished .npy never logged, one deleted
    vols = tmp_path / "o2" / "volumes"
    (vols / ".train_1_a_1.npy.999.tmp").write_bytes(b"half")
    (vols / "train_2_a_1.npy").unlink()
    done = (tmp_path / "o2" / "done.jsonl").read_text().splitlines()
    (tmp_path / "o2" / "done.jsonl").write_text(
        "\n".join(l for l in done if "train_0_a_2" not in l) + "\n{\"name\": \"tor")
    keep = {p.name: p.stat().st_mtime_ns for p in vols.glob("*.npy")}
    assert preprocess.preprocess_main(args + ["--root", f"{tmp_path}/v2", "--out", f"{tmp_path}/o2"]) == 0
    assert "done=2 skipped=3 failed=0" in capsys.readouterr().out
    now = {p.name: p.stat().st_mtime_ns for p in vols.glob("*.npy")}
    assert set(now) == set(keep) | {"train_2_a_1.npy"}
    assert [n for n in keep if now[n] != keep[n]] == ["train_0_a_2.npy"]
    assert len(preprocess.load_index(tmp_path / "o2")) == 5
    assert preprocess.preprocess_main(args + ["--root", f"{tmp_path}/v2", "--out", f"{tmp_path}/o2"]) == 0
    assert "done=0 skipped=5 failed=0" in capsys.readouterr().out  # the torn log line was ended


def test_preprocess_cli_runs_as_a_script_and_reports_bad_roots(tmp_path):
    make_ctrate(tmp_path / "ct", "valid", n_patients=2)
    cmd = [sys.executable, "-m", "prepare.preprocess", "--root", str(tmp_path / "ct"), "--split",
           "valid", "--out", str(tmp_path / "o"), "--preset", "tiny", "--workers", "1"]
    repo = data.Path(data.__file__).parent
    res = subprocess.run(cmd, cwd=repo, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "done=3 skipped=0 failed=0" in res.stdout, res.stderr
    res = subprocess.run(cmd[:4] + [str(tmp_path / "nowhere")] + cmd[5:], cwd=repo,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 1 and "error:" in res.stderr and "nowhere" in res.stderr


def test_ensure_cache_and_load_dataset(tmp_path):
    truth = make_ctrate(tmp_path / "set" / "dataset", "train", n_patients=2)
    cache = preprocess.ensure_cache(tmp_path / "set" / "dataset", "train", "tiny", workers=1)
    assert cache == (tmp_path / "set" / "cache_tiny" / "train").resolve()
    recs = preprocess.load_dataset(cache, "train", PRESETS["tiny"])
    assert sorted(r.name for r in recs) == sorted(truth)

    class Cfg:  # stands in for model.ModelConfig
        spacing, image_size = (7.0, 7.0, 10.0), (48, 48, 32)

    again = preprocess.ensure_cache(tmp_path / "set" / "dataset", "train", Cfg())  # same cache
    assert [r.npy_path for r in preprocess.load_dataset(again, "train", Cfg())] == [r.npy_path for r in recs]
    assert preprocess.ensure_cache(cache, "train", "paper") == cache  # already preprocessed
    custom = preprocess.ensure_cache(tmp_path / "set" / "dataset", "train", (5.0, 5.0, 8.0), (8, 8, 4), 1)
    assert custom.name == "train" and custom.parent.name == "cache_5x5x8mm_8x8x4"
    assert np.load(preprocess.load_dataset(custom, "train")[0].npy_path).shape == (8, 8, 4)
    assert len(preprocess.load_dataset(tmp_path / "set" / "cache_tiny", "train")) == len(truth)
    with pytest.raises(ValueError, match="no volume of split 'valid'"):
        preprocess.load_dataset(cache, "valid")
    with pytest.raises(ValueError, match="unknown preset"):
        preprocess.ensure_cache(tmp_path / "set" / "dataset", "train", "huge")
    with pytest.raises(ValueError, match="needs a preset"):
        preprocess.ensure_cache(tmp_path / "set" / "dataset", "train", None)
    with pytest.raises(FileNotFoundError, match="python -m prepare.preprocess"):
        preprocess.load_dataset(tmp_path / "set" / "dataset", "train")
    with pytest.raises(ValueError, match=r"preprocessed at \(7.0, 7.0, 10.0\)"):
        preprocess.load_dataset(tmp_path / "set" / "cache_tiny", "train", PRESETS["paper"])  # tiny cache


def test_ensure_cache_goes_under_out_dir_not_beside_the_data(tmp_path):
    root = tmp_path / "ro" / "dataset"
    truth = make_ctrate(root, "valid", n_patients=2)
    cache = preprocess.ensure_cache(root, "valid", "tiny", workers=1, out_dir=tmp_path / "run")
    assert cache == tmp_path / "run" / "cache_tiny" / "dataset" / "valid"
    assert not (tmp_path / "ro" / "cache_tiny").exists()
    assert sorted(r.name for r in preprocess.load_dataset(cache, "valid", PRESETS["tiny"])) == sorted(truth)
    beside = preprocess.ensure_cache(root, "valid", "tiny", workers=1)  # no out_dir: beside
    assert beside == (tmp_path / "ro" / "cache_tiny" / "valid").resolve()
    # an existing cache beside the data (train.py's synthetic set) is reused, not rebuilt
    assert preprocess.ensure_cache(root, "valid", "tiny", out_dir=tmp_path / "other") == beside
    assert not (tmp_path / "other").exists()


# ----------------------------------------------------------------------------- RAD-ChestCT, folders

def write_radchest(root, names, rng, shape=(20, 24, 22)):
    """.npz volumes (slices, rows, cols) in HU with a marker, and an abnormality*location CSV."""
    root.mkdir(parents=True, exist_ok=True)
    for n in names:
        ct = np.full(shape, -1000, np.int16)
        ct[:, 4:20, 3:19] = 40
        ct[2, 5, 7] = 900  # slice 2 (superior), row 5 (anterior), column 7 (patient right)
        np.savez_compressed(root / f"{n}.npz", ct=ct)
    abns = sorted({a for v in tables.RADCHEST_SOURCES.values() for a in v} | {"other_path"})
    cols = [f"{a}*{loc}" for a in abns for loc in ("lung", "heart")]
    rows, truth = [], {}
    for n in names:
        row = {c: int(rng.random() < 0.08) for c in cols}
        rows.append(dict(NoteAcc_DEID=n, **row))
        truth[n] = np.array([any(row[f"{a}*{loc}"] for a in tables.RADCHEST_SOURCES[k]
                                 for loc in ("lung", "heart")) for k in tables.RADCHEST_CLASSES],
                            np.float32)
    write_csv(root / "imgtest_Abnormality_and_Location_Labels.csv", rows)
    return truth


def test_radchest_orientation_labels_and_bad_files(tmp_path, capsys):
    rng = np.random.default_rng(4)
    truth = write_radchest(tmp_path / "rad", [f"tst{i:05d}" for i in range(6)], rng)
    hu, sp = tables.read_radchest_npz(tmp_path / "rad" / "tst00000.npz")
    assert hu.shape == (22, 24, 20) and hu.dtype == np.float32  # (X, Y, Z) <- (slices, rows, cols)
    np.testing.assert_allclose(sp, [0.8, 0.8, 0.8])
    assert tuple(np.argwhere(hu == 900)[0]) == (22 - 1 - 7, 24 - 1 - 5, 20 - 1 - 2)  # RAS
    np.savez(tmp_path / "rad" / "tst00006.npz", volume=np.zeros((4, 4, 4)))  # wrong key
    (tmp_path / "rad" / "tst00007.npz").write_bytes(b"PK\x03\x04 broken")
    np.savez(tmp_path / "rad" / "tst00008.npz", ct=np.zeros((4, 4), np.int16))
    np.savez(tmp_path / "rad" / "zzz.npz", ct=np.zeros((4, 4, 4), np.int16))  # not in the CSV
    for n in ("tst00006", "tst00007", "tst00008"):
        truth[n] = np.zeros(16, np.float32)
    label_csv = tmp_path / "rad" / "imgtest_Abnormality_and_Location_Labels.csv"
    rows = list(csv.DictReader(open(label_csv)))
    rows += [dict(rows[0], NoteAcc_DEID=n) for n in ("tst00006", "tst00007", "tst00008")]
    write_csv(label_csv, rows)
    out = tmp_path / "o"
    code = preprocess.preprocess_main(["--dataset", "radchest", "--root", str(tmp_path / "rad"), "--out",
                                 str(out), "--preset", "tiny", "--workers", "2"])
    o = capsys.readouterr()
    assert code == 1 and "done=6 skipped=0 failed=4" in o.out, o.out + o.err
    for what in ("no array 'ct'", "not a readable .npz", "3-D 'ct' array",
                 "unknown volume name 'zzz'"):
        assert what in o.err
    recs = preprocess.load_index(out)
    assert len(recs) == 6 and recs[0].classes == tables.RADCHEST_CLASSES
    for r in recs:
        np.testing.assert_array_equal(r.labels, truth[r.name])
        assert r.hu_rule == "already_hu" and r.spacing == (0.8, 0.8, 0.8)
    assert sum(r.labels.sum() for r in recs) > 5  # the test draws some positives


def test_radchest_label_rules_and_score_mapping(tmp_path):
    cols = ["NoteAcc_DEID", "nodulegr1cm*lung", "stent*heart", "calcification*aorta",
            "calcification*heart", "scarring*lung", "hernia*stomach"]
    others = [a for k, v in tables.RADCHEST_SOURCES.items() for a in v[:1]
              if k not in ("Lung nodule", "Medical material", "Calcification",
                           "Pulmonary fibrotic sequela", "Hiatal hernia")]
    rows = [dict(zip(cols, ["a", 1, 0, 0, 1, 0, 0]), **{o: 0 for o in others}),
            dict(zip(cols, ["b", 0, 1, 0, 0, 1, 1]), **{o: 0 for o in others})]
    write_csv(tmp_path / "l.csv", rows)
    lab = tables.read_radchest_labels(tmp_path / "l.csv")
    idx = {c: i for i, c in enumerate(tables.RADCHEST_CLASSES)}
    assert set(np.flatnonzero(lab["a"])) == {idx["Lung nodule"], idx["Calcification"]}
    assert set(np.flatnonzero(lab["b"])) == {
        idx["Medical material"], idx["Pulmonary fibrotic sequela"], idx["Hiatal hernia"]}
    for r in rows:
        r.pop("scarring*lung")
    write_csv(tmp_path / "m.csv", rows)
    with pytest.raises(ValueError, match=r"m\.csv.*Pulmonary fibrotic sequela"):
        tables.read_radchest_labels(tmp_path / "m.csv")
    s = np.random.default_rng(0).normal(size=(5, 18)).astype(np.float32)
    m = tables.ctrate_to_radchest(s)
    assert m.shape == (5, 16) and len(tables.RADCHEST_CLASSES) == 16
    c = data.CTRATE_CLASSES.index
    np.testing.assert_array_equal(m[:, idx["Calcification"]], np.maximum(
        s[:, c("Arterial wall calcification")], s[:, c("Coronary artery wall calcification")]))
    for k in tables.RADCHEST_CLASSES:
        if k != "Calcification":
            np.testing.assert_array_equal(m[:, idx[k]], s[:, c(k)])
    torch.testing.assert_close(tables.ctrate_to_radchest(torch.from_numpy(s)), torch.from_numpy(m))


def test_radchest_medical_material_official_11_devices(tmp_path):
    """Official mapping: 11 device labels; sternotomy / valve replacement only with devices='all'."""
    assert len(tables.RADCHEST_DEVICES) == 11
    assert not set(tables.RADCHEST_DEVICES_EXTRA) & set(tables.RADCHEST_DEVICES)
    base = {f"{a[0]}*lung": 0 for k, a in tables.RADCHEST_SOURCES.items() if k != "Medical material"}
    devices = tables.RADCHEST_DEVICES + tables.RADCHEST_DEVICES_EXTRA
    rows = [dict(NoteAcc_DEID="sternotomy_only", **base, **{f"{d}*heart": int(d == "sternotomy")
                                                           for d in devices}),
            dict(NoteAcc_DEID="valve_only", **base, **{f"{d}*heart": int(d == "heart_valve_replacement")
                                                       for d in devices}),
            dict(NoteAcc_DEID="pacemaker", **base, **{f"{d}*heart": int(d == "pacemaker_or_defib")
                                                      for d in devices}),
            dict(NoteAcc_DEID="none", **base, **{f"{d}*heart": 0 for d in devices})]
    write_csv(tmp_path / "l.csv", rows)
    mm = tables.RADCHEST_CLASSES.index("Medical material")
    official = tables.read_radchest_labels(tmp_path / "l.csv")
    every = tables.read_radchest_labels(tmp_path / "l.csv", devices="all")
    assert [official[n][mm] for n in ("sternotomy_only", "valve_only", "pacemaker", "none")] == [0, 0, 1, 0]
    assert [every[n][mm] for n in ("sternotomy_only", "valve_only", "pacemaker", "none")] == [1, 1, 1, 0]
    for n in official:  # nothing else moves
        assert np.array_equal(np.delete(official[n], mm), np.delete(every[n], mm))
    with pytest.raises(ValueError, match="'official' or 'all'"):
        tables.read_radchest_labels(tmp_path / "l.csv", devices="most")


def test_folder_dataset_real_volumes(shared_data, tmp_path, capsys):
    src = shared_data / "ct_volumes"
    folder = tmp_path / "in" / "sub"
    folder.mkdir(parents=True)
    for n in ("pyradiomics_lung1_ct_ds2.nii.gz", "invesalius_cranium_ct0051_ct_ds2.nii.gz"):
        (folder / n).write_bytes((src / n).read_bytes())
    lung_bytes = (src / "pyradiomics_lung1_ct_ds2.nii.gz").read_bytes()
    (tmp_path / "in" / "broken.nii.gz").write_bytes(lung_bytes[:5000])
    code = preprocess.preprocess_main(["--dataset", "folder", "--root", str(tmp_path / "in"), "--out",
                                 str(tmp_path / "o"), "--preset", "tiny", "--workers", "2"])
    o = capsys.readouterr()
    assert code == 1 and "done=2 skipped=0 failed=1" in o.out and "broken.nii.gz" in o.err
    # the head CT is kept but flagged; the chest CT is not
    assert "[warning] sub__invesalius_cranium_ct0051_ct_ds2:" in o.err and "not a chest CT?" in o.err
    assert "[warning] sub__pyradiomics" not in o.err
    recs = {r.name: r for r in preprocess.load_index(tmp_path / "o")}
    assert set(recs) == {"sub__pyradiomics_lung1_ct_ds2", "sub__invesalius_cranium_ct0051_ct_ds2"}
    lung = recs["sub__pyradiomics_lung1_ct_ds2"]
    head = recs["sub__invesalius_cranium_ct0051_ct_ds2"]
    np.testing.assert_allclose(lung.spacing, [1.140625, 1.140625, 5.0])
    np.testing.assert_allclose(head.spacing, [1.914, 1.914, 1.5], atol=1e-3)
    assert lung.labels.shape == (0,) and lung.hu_rule == "header"
    v = np.load(lung.npy_path)
    assert (v < -700).mean() > 0.2 and (np.abs(v) < 100).mean() > 0.05  # lungs and soft tissue




def test_help_lists_every_flag_with_its_default(capsys, help_lacks_defaults):
    with pytest.raises(SystemExit):
        preprocess.preprocess_main(["--help"])
    out = capsys.readouterr().out
    assert out.count("usage:") == 1 and "--labels" in out and help_lacks_defaults(out) == []
def test_volumes_not_in_hu_fail_by_name_unless_allowed(shared_data, tmp_path, capsys):
    """A lesion mask (0/1), an all-zero volume and a CT stored as raw values without its intercept
    are no CT in HU: each fails with its name and why, the real CT is kept, the exit code is 1;
    --allow_non_hu keeps them all."""
    import nibabel as nib
    src = shared_data / "ct_volumes"
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "ct.nii.gz").write_bytes((src / "pyradiomics_lung1_ct_ds2.nii.gz").read_bytes())
    (tmp_path / "in" / "mask.nii.gz").write_bytes(
        (src / "pyradiomics_lung1_lesion_mask_ds2.nii.gz").read_bytes())
    ct = nib.load(str(src / "pyradiomics_lung1_ct_ds2.nii.gz"))
    raw = np.asarray(ct.dataobj, np.int16) + 1024  # what the scanner stored before the -1024 intercept
    nib.save(nib.Nifti1Image(raw, ct.affine), str(tmp_path / "in" / "raw.nii.gz"))
    nib.save(nib.Nifti1Image(np.zeros((40, 40, 20), np.int16), ct.affine), str(tmp_path / "in" / "zero.nii.gz"))
    args = ["--dataset", "folder", "--root", str(tmp_path / "in"), "--preset", "tiny", "--workers", "1"]
    assert preprocess.preprocess_main(args + ["--out", str(tmp_path / "o")]) == 1
    o = capsys.readouterr()
    assert "done=1 skipped=0 failed=3" in o.out and "error: 3 volume(s) failed" in o.err
    for name in ("mask.nii.gz", "raw.nii.gz", "zero.nii.gz"):
        line = next(l for l in o.err.splitlines() if l.startswith("[failed]") and name in l)
        assert "no air" in line and "--allow_non_hu" in line, line
    assert [r.name for r in preprocess.load_index(tmp_path / "o")] == ["ct"]
    assert preprocess.preprocess_main(args + ["--out", str(tmp_path / "o2"), "--allow_non_hu"]) == 0
    assert "done=4 skipped=0 failed=0" in capsys.readouterr().out



def test_ctrate_lt_labels_by_name(shared_data, tmp_path):
    path = shared_data / "brgsa_official" / "ctrate_lt_labels.csv"
    lab = tables.read_labels(path, tables.CTRATE_LT_CLASSES)
    assert len(tables.CTRATE_LT_CLASSES) == 15 and len(lab) == 3039
    rows = list(csv.DictReader(open(path)))
    cols = ["VolumeName"] + list(tables.CTRATE_LT_CLASSES)[::-1]  # the official file's order differs
    write_csv(tmp_path / "shuffled.csv", [{c: r[c] for c in cols} for r in rows])
    lab2 = tables.read_labels(tmp_path / "shuffled.csv", tables.CTRATE_LT_CLASSES)
    assert all(np.array_equal(lab[k], lab2[k]) for k in lab)
    assert lab["valid_2_a_1"][tables.CTRATE_LT_CLASSES.index("Lung mass")] == 1
    write_csv(tmp_path / "short.csv", [{c: r[c] for c in cols if c != "Empyema"} for r in rows[:3]])
    with pytest.raises(ValueError, match=r"short\.csv.*missing class column.*Empyema"):
        tables.read_labels(tmp_path / "short.csv", tables.CTRATE_LT_CLASSES)


def test_read_labels_refuses_values_other_than_0_and_1(tmp_path):
    path = tmp_path / "labels.csv"
    path.write_text("VolumeName,Cardiomegaly\na,1\nb,2\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"labels\.csv: line 3 \('b'\): label '2' for class "
                                         r"'Cardiomegaly'; expected 0 or 1"):
        tables.read_labels(path, ("Cardiomegaly",))


def test_spreadsheet_label_csv_reads_as_the_plain_one(tmp_path, spreadsheet_csv):
    """A labels CSV saved by a spreadsheet (byte-order mark before the first column's name, CRLF,
    quoted class names with commas) is read exactly as the plain one."""
    rows = [["scan", "Lung nodule", 'Effusion, "pleural"'], ["a.nii.gz", "1", "0"], ["b.nii.gz", "0", "1"]]
    write_csv(tmp_path / "plain.csv", [dict(zip(rows[0], r)) for r in rows[1:]])
    sheet = spreadsheet_csv(tmp_path / "sheet.csv", rows)
    assert tables.label_columns(sheet) == tables.label_columns(tmp_path / "plain.csv") == \
        ("scan", ("Lung nodule", 'Effusion, "pleural"'))
    a = tables.read_labels(tmp_path / "plain.csv", rows[0][1:], "scan")
    b = tables.read_labels(sheet, rows[0][1:], "scan")
    assert a.keys() == b.keys() == {"a", "b"} and all(np.array_equal(a[k], b[k]) for k in a)


SLOW_PREPROCESS = """
import sys, time
from prepare import preprocess
one = preprocess._prepare_one
def slow(job):  # a stand-in for full-size volumes: each takes a moment
    time.sleep(0.3)
    return one(job)
preprocess._prepare_one = slow
sys.exit(preprocess.preprocess_main(sys.argv[1:]))
"""


def test_sigterm_during_preprocessing_keeps_whole_volumes_and_a_rerun_completes(tmp_path):
    import json
    import signal
    import time
    make_ctrate(tmp_path / "ct", "train", n_patients=12)
    args = ["--root", str(tmp_path / "ct"), "--split", "train", "--out", str(tmp_path / "c"),
            "--preset", "tiny", "--workers", "1"]
    repo = data.Path(data.__file__).parent
    proc = subprocess.Popen([sys.executable, "-c", SLOW_PREPROCESS, *args], cwd=repo,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    done, deadline = tmp_path / "c" / "done.jsonl", time.time() + 60
    while not (done.is_file() and done.read_text().count("\n") >= 2) and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143 and "Traceback" not in err and "rerun the same command" in err
    finished = [json.loads(line)["name"] for line in done.read_text().splitlines()]
    assert 2 <= len(finished) < 13
    for name in finished:  # every volume it lists is whole
        assert np.load(tmp_path / "c" / "volumes" / f"{name}.npy").shape == PRESETS["tiny"].image_size
    assert not list((tmp_path / "c" / "volumes").glob(".*.tmp"))
    assert preprocess.preprocess_main(args) == 0
    names = [r.name for r in preprocess.load_index(tmp_path / "c")]
    assert len(names) == len(set(names)) == 13  # 12 patients, one with two reconstructions


def test_a_second_preprocess_into_one_cache_is_refused(tmp_path, capsys):
    from prepare import files
    make_ctrate(tmp_path / "ct", "train", n_patients=2)
    args = ["--root", str(tmp_path / "ct"), "--split", "train", "--out", str(tmp_path / "c"),
            "--preset", "tiny", "--workers", "1"]
    with files.run_lock(tmp_path / "c" / ".lock", "preprocess"):
        assert preprocess.preprocess_main(args) == 1
    assert f"is in use by another preprocess run (pid {os.getpid()}" in capsys.readouterr().err
    assert preprocess.preprocess_main(args) == 0
