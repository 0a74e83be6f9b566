"""eval.py: the reference AUROC on hand-checkable cases, the zero-shot protocols on a tiny model
against scores computed here, score-file mode on real scores, single scans, heat maps and bad input.
The instruments it calls (and eval.auroc against pair counting) are checked in tests/test_analysis.py."""
import csv
import json
import math
import re
import subprocess
import sys
from dataclasses import asdict, replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import cmki
import data as D
import eval as E
from analysis import files as AF
from model import PRESETS, BrgSA
from prepare import preprocess
from prepare import tables as T
from prepare.files import read_checkpoint


def test_auroc_hand_cases():
    assert E.auroc(np.array([0.1, 0.2, 0.3, 0.4]), np.array([0, 0, 1, 1])) == 1.0
    assert E.auroc(np.array([0.4, 0.3, 0.2, 0.1]), np.array([0, 0, 1, 1])) == 0.0
    assert E.auroc(np.array([0.5, 0.5, 0.5]), np.array([0, 1, 1])) == 0.5  # all tied
    # 2 positives, 2 negatives: pairs (0.8>0.3) (0.8>0.6) (0.4>0.3) (0.4<0.6) -> 3/4
    assert E.auroc(np.array([0.8, 0.4, 0.3, 0.6]), np.array([1, 1, 0, 0])) == 0.75
    assert np.isnan(E.auroc(np.array([0.1, 0.2]), np.array([1, 1])))


def _write(path, header, rows):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def test_score_file_mode_reproduces_official_brgsa(shared_data, tmp_path):
    scores = shared_data / "brgsa_official" / "ctrate_lt_scores.csv"
    labels = shared_data / "brgsa_official" / "ctrate_lt_labels.csv"
    r = AF.evaluate_score_files(scores, labels)
    assert r["n_volumes"] == 3039 and len(r["auc"]) == 15
    assert r["macro_auc"] == pytest.approx(0.8148, abs=5e-5)
    # Shuffle the label file's columns and rows: matching is by name, so nothing changes.
    with open(labels) as f:
        rows = list(csv.reader(f))
    header, body = rows[0], rows[1:]
    perm = [0] + list(np.random.default_rng(1).permutation(np.arange(1, len(header))))
    body = [[row[i] for i in perm] for row in body][::-1]
    _write(tmp_path / "l.csv", [header[i] for i in perm], body)
    r2 = AF.evaluate_score_files(scores, tmp_path / "l.csv", n_boot=0)
    assert r2["auc"] == pytest.approx(r["auc"])
    out = E.main(["--scores", str(scores), "--labels", str(tmp_path / "l.csv"),
                  "--out_dir", str(tmp_path / "o"), "--n_boot", "0", "--no_plots"])
    assert (tmp_path / "o" / "eval.json").is_file() and out["macro_auc"] == r["macro_auc"]


def test_score_file_errors_name_the_problem(tmp_path):
    _write(tmp_path / "s.csv", ["VolumeName", "A", "B"], [["v1", "0.1", "0.2"], ["v2", "0.3", "0.1"]])
    _write(tmp_path / "l.csv", ["VolumeName", "A"], [["v1", "0"], ["v2", "1"]])
    with pytest.raises(ValueError, match=r"l\.csv.*\['B'\]"):
        AF.evaluate_score_files(tmp_path / "s.csv", tmp_path / "l.csv")
    _write(tmp_path / "l2.csv", ["VolumeName", "B", "A"], [["v1", "0", "1"], ["v9", "1", "0"]])
    with pytest.raises(ValueError, match="have no labels.*v2"):
        AF.evaluate_score_files(tmp_path / "s.csv", tmp_path / "l2.csv")
    _write(tmp_path / "bad.csv", ["VolumeName", "A"], [["v1", "high"]])
    with pytest.raises(ValueError, match="non-numeric"):
        AF.read_score_csv(tmp_path / "bad.csv")
    _write(tmp_path / "l3.csv", ["VolumeName", "A", "B"], [["v1", "0", "2"], ["v2", "1", "0"]])
    with pytest.raises(ValueError, match=r"l3\.csv: label 2 for 'v1', class 'B'; expected 0 or 1"):
        AF.evaluate_score_files(tmp_path / "s.csv", tmp_path / "l3.csv")
    _write(tmp_path / "nameless.csv", ["A", "B"], [["0.1", "0.2"], ["0.3", "0.1"]])
    with pytest.raises(ValueError, match=r"nameless\.csv: the first column \('A'\) holds numbers"):
        AF.read_score_csv(tmp_path / "nameless.csv")


# ----------------------------------------------------------------------------- a tiny model and data set

CLASSES = list(D.CTRATE_CLASSES)


@pytest.fixture(scope="module")
def tiny():
    """(model, tokenizer): a randomly initialised BrgSA small enough for the CPU interpreter."""
    torch.manual_seed(0)
    texts = [f"There is {c.lower()}. {c} is present. {c} is not present." for c in CLASSES]
    tok = D.train_tokenizer(texts * 3 + ["normal chest patient findings seen"], vocab_size=200)
    cfg = replace(PRESETS["tiny"], image_size=(16, 16, 8), crop_size=(16, 16, 8),
                  spacing=(20.0, 20.0, 40.0),
                  patch_size=(8, 8, 4), vit_width=32, vit_depth=1, vit_heads=2,
                  vocab_size=tok.get_vocab_size(), text_width=32, text_depth=1, text_heads=2,
                  text_mlp=64, embed_dim=32, bank_size=16)
    return BrgSA(cfg).eval(), tok


def make_records(root, n_patients=10, seed=0):
    """Two reconstructions per patient (same report, same labels), CT-RATE names, cached .npy."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    records = []
    for p in range(n_patients):
        lab = (rng.random(18) < 0.35).astype(np.float32)
        lab[p % 18] = 1.0
        report = f"Patient {p}. " + " ".join(f"{c} is seen." for c, l in zip(CLASSES, lab) if l)
        for r in (1, 2):
            name = f"valid_{p}_a_{r}"
            np.save(root / f"{name}.npy", rng.integers(-1000, 1000, (16, 16, 8)).astype(np.int16))
            records.append(D.Record(name, str(root / f"{name}.npy"), report, lab))
    return records


def test_scores_follow_each_protocol(tiny):
    model, tok = tiny
    device = torch.device("cpu")
    v = torch.randn(5, 32, generator=torch.Generator().manual_seed(0))
    bank, classes = model.bank.weight.detach(), ["Cardiomegaly", "Lung nodule"]
    # BrgSA with the model's own prompt: the paper's "There is {}", or the tiny preset's "{}."
    assert (PRESETS["paper"].prompt, PRESETS["tiny"].prompt) == ("There is {}", "{}.")
    for prompt in ("There is {}", "{}."):
        model.cfg = replace(model.cfg, prompt=prompt)
        with torch.no_grad():
            t = E.embed_texts(model, tok, [prompt.format(c) for c in classes], device)
            v_hat = cmki.cmki_reference(v, bank, model.scale)
            ref = 0.5 * (F.normalize(v, dim=-1) @ F.normalize(t, dim=-1).T
                         + F.normalize(v_hat, dim=-1) @ F.normalize(t, dim=-1).T)
        got = E.score_volumes(model, tok, v, classes, E.EvalConfig(), device)
        np.testing.assert_allclose(got, ref.numpy(), atol=1e-5)
    other = E.score_volumes(model, tok, v, classes, E.EvalConfig(templates=("There is {}",)), device)
    assert not np.allclose(other, got, atol=1e-3)  # a --template replaces the model's prompt
    # CT-CLIP: softmax over (present, not present) of the BrgSA similarity / tau
    with torch.no_grad():
        tp = E.embed_texts(model, tok, [f"{c} is present." for c in classes], device)
        tn = E.embed_texts(model, tok, [f"{c} is not present." for c in classes], device)
        sp, sn = (cmki.zero_shot_scores(v, x, bank, model.scale) for x in (tp, tn))
        ref = torch.softmax(torch.stack([sp, sn]) / model.cfg.tau, dim=0)[0]
    got = E.score_volumes(model, tok, v, classes, E.EvalConfig(protocol="ctclip"), device)
    np.testing.assert_allclose(got, ref.numpy(), atol=1e-5)
    # an ensemble is the mean of its templates' scores
    tpls = ("There is {}", "{} seen")
    got = E.score_volumes(model, tok, v, classes, E.EvalConfig(templates=tpls), device)
    ref = np.mean([E.score_volumes(model, tok, v, classes, E.EvalConfig(templates=(t,)), device)
                   for t in tpls], 0)
    np.testing.assert_allclose(got, ref, atol=1e-6)


def test_prompt_texts_protocols_and_templates():
    cfg = E.EvalConfig()
    assert E.prompt_texts(["Cardiomegaly"], cfg, "There is {}") == [["There is Cardiomegaly"]]
    assert E.prompt_texts(["A", "B"], E.EvalConfig(protocol="ctclip"), "{}.") == \
        [["A is present.", "A is not present.", "B is present.", "B is not present."]]
    assert E.prompt_texts(["A", "B"], E.EvalConfig(templates=("There is {}", "{} seen")), "{}.") == \
        [["There is A", "There is B"], ["A seen", "B seen"]]
    with pytest.raises(ValueError, match="POS"):
        E.prompt_texts(["A"], E.EvalConfig(protocol="ctclip", templates=("{} is present.",)), "{}.")
    with pytest.raises(ValueError, match="protocol"):
        E.prompt_texts(["A"], E.EvalConfig(protocol="clip"), "{}.")


def test_zero_shot_end_to_end_and_round_trip(tiny, tmp_path):
    model, tok = tiny
    records = make_records(tmp_path / "vol")
    loader = D.eval_loader(records, 8)
    r = E.zero_shot(model, tok, loader, CLASSES, torch.device("cpu"), E.EvalConfig(n_boot=200))
    assert r["n_volumes"] == 20 and set(r["auc"]) == set(CLASSES)
    assert r["rows"]["n_calib"] + r["rows"]["n_test"] == 20 and r["rows"]["n_calib"] % 2 == 0
    assert r["protocol"]["prompts"][0][CLASSES.index("Cardiomegaly")] == "Cardiomegaly."  # tiny's
    lo, hi = r["per_class"]["Cardiomegaly"]["auc_ci"]
    assert lo <= r["auc"]["Cardiomegaly"] <= hi and lo < hi
    # retrieval: 10 unique reports for 20 volumes; the gap of both embedding spaces
    v2r = r["retrieval"]["raw"]["volume_to_report"]
    assert v2r["n_queries"] == 20 and v2r["n_items"] == 10 and v2r["R@10"] == 1.0
    assert r["retrieval"]["raw"]["report_to_volume"]["n_items"] == 20
    assert set(r["modality_gap"]) == {"raw", "bank"} and 0 <= r["modality_gap"]["raw"]["probe_acc"] <= 1
    path = AF.write_result(r, tmp_path / "out", plots=False)
    saved = json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"{c} in eval.json"))
    assert saved["macro_auc"] == pytest.approx(r["macro_auc"]) and "arrays" not in saved
    assert "calibration" in saved["rows"]["calibrated"] and saved["bootstrap"]["n"] == 200
    with open(tmp_path / "out" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 19 and float(rows[-1]["auc"]) == pytest.approx(r["macro_auc"])
    # score-file mode on the files written by the model run reproduces every AUROC
    again = AF.evaluate_score_files(tmp_path / "out" / "scores.csv", tmp_path / "out" / "labels.csv",
                                   n_boot=0)
    assert again["auc"] == r["auc"] or all(a == b or (math.isnan(a) and math.isnan(b))
                                           for a, b in zip(again["auc"].values(), r["auc"].values()))
    assert np.array_equal(again["arrays"]["scores"], r["arrays"]["scores"])  # exact round trip


def _checkpoint(model, tok, path):
    torch.save(dict(model=model.state_dict(), model_config=asdict(model.cfg),
                    tokenizer=tok.to_str()), path)
    return path


def test_cli_model_mode_external_calibration_and_single_scan(tiny, tmp_path, capsys):
    model, tok = tiny
    ckpt = _checkpoint(model, tok, tmp_path / "ckpt.pt")
    preprocess.write_index(tmp_path / "set" / "valid", make_records(tmp_path / "set" / "valid" / "v", 8, seed=1))
    cal = [replace(r, name=r.name.replace("valid_", "valid_9")) for r in
           make_records(tmp_path / "cal" / "valid" / "v", 6, seed=2)]
    preprocess.write_index(tmp_path / "cal" / "valid", cal)
    from prepare import summarize
    # a training-run cache that summarises every report alike: retrieval must embed these texts
    reports = {r.report for r in preprocess.load_index(tmp_path / "set" / "valid")}
    lines = [json.dumps(dict(key=summarize.report_key(x), source="rules", summary=["Same summary."]))
             for x in reports]
    (tmp_path / "summaries.jsonl").write_text("\n".join(lines) + "\n")
    r = E.main(["--ckpt", str(ckpt), "--data", str(tmp_path / "set"), "--out_dir", str(tmp_path / "o"),
                "--calib_data", str(tmp_path / "cal"), "--n_boot", "50", "--no_plots",
                "--protocol", "ctclip", "--summaries", str(tmp_path / "summaries.jsonl")])
    assert len(reports) == 8 and "1 unique report texts" in r["retrieval_note"]
    out = capsys.readouterr().out
    assert "macro mean" in out and "opt ACC" in out and "cal ACC" in out and "R@10" in out
    assert r["rows"]["n_calib"] == 12 and r["rows"]["n_test"] == 16 and r["n_volumes"] == 16
    assert "separate calibration set" in r["rows"]["calibrated"]
    assert all(0 <= s <= 1 for s in r["arrays"]["scores"].ravel())  # ctclip: P(present)
    assert json.loads((tmp_path / "o" / "eval.json").read_text())["protocol"]["name"] == "ctclip"
    # single scan: a real NIfTI is preprocessed on the fly to the model's grid
    affine = np.diag([5.0, 5.0, 10.0, 1.0])
    vol = np.random.default_rng(0).integers(-1000, 1000, (40, 36, 20)).astype(np.int16)
    nib.save(nib.Nifti1Image(vol, affine), tmp_path / "scan.nii.gz")
    scores = E.main(["--ckpt", str(ckpt), "--volume", str(tmp_path / "scan.nii.gz"),
                     "--findings", "pleural effusion", "lung nodule"])
    assert list(scores) == ["pleural effusion", "lung nodule"]
    hu, sp = D.load_nifti(tmp_path / "scan.nii.gz")
    hu = D.preprocess_volume(hu, sp, model.cfg.spacing, model.cfg.image_size)
    x = D.normalize(torch.from_numpy(hu))
    with torch.no_grad():
        ref = E.score_volumes(model, tok, model.visual(x[None, None]), ["lung nodule"], E.EvalConfig(),
                              torch.device("cpu"))
    assert scores["lung nodule"] == pytest.approx(float(ref[0, 0]), abs=1e-5)
    out = capsys.readouterr().out
    assert f"| {'lung nodule':34s} | {scores['lung nodule']:+.4f} |" in out
    # a model of the synthetic set says so under its scores; one trained on a named --data does not
    assert "trained only on synthetic phantoms" in out and "are not diagnoses" in out
    real = tmp_path / "real.pt"
    torch.save(dict(torch.load(ckpt, weights_only=True), trained_on="/data/ct-rate"), real)
    E.main(["--ckpt", str(real), "--volume", str(tmp_path / "scan.nii.gz"), "--findings", "lung nodule"])
    assert "synthetic" not in capsys.readouterr().out
    # calibrated calls from the eval.json of the data-set run (same protocol required)
    saved = json.loads((tmp_path / "o" / "eval.json").read_text())
    thr = saved["per_class"]["Lung nodule"]["calibrated"]["threshold"]
    E.main(["--ckpt", str(ckpt), "--volume", str(tmp_path / "scan.nii.gz"), "--findings", "Lung nodule",
            "--protocol", "ctclip", "--thresholds", str(tmp_path / "o" / "eval.json")])
    s = E.score_scan(model, tok, tmp_path / "scan.nii.gz", ["Lung nodule"], torch.device("cpu"),
                     E.EvalConfig(protocol="ctclip"))["Lung nodule"]
    call = "positive" if s > thr else "negative"
    assert f"{call} (> {thr:+.3f})" in capsys.readouterr().out
    with pytest.raises(ValueError, match="protocol 'ctclip', not 'brgsa'"):
        AF.read_thresholds(tmp_path / "o" / "eval.json", "brgsa")


MADE_UP = ["Glowing spleen", "Banana rib", "Cloudy lobe"]  # class names no code knows


def _own_folder(root, n=24, seed=3):
    """n small NIfTI scans (one in a sub-folder) and a labels CSV of made-up 0/1 classes whose
    first column is named 'scan' and holds file names with extension (or the relative path)."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        rel = f"sub/scan{i}.nii.gz" if i == 0 else f"scan{i}.nii.gz"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        vol = rng.integers(-1000, 1000, (40, 36, 20)).astype(np.int16)
        nib.save(nib.Nifti1Image(vol, np.diag([-5.0, -5.0, 10.0, 1.0])), root / rel)
        lab = rng.random(len(MADE_UP)) < 0.4
        lab[i % len(MADE_UP)] = True
        rows.append([rel] + [str(int(v)) for v in lab])
    with open(root.parent / "labels.csv", "w", newline="") as f:
        csv.writer(f).writerows([["scan"] + MADE_UP] + rows)
    return root.parent / "labels.csv", {volume_name(r[0]): [float(v) for v in r[1:]] for r in rows}


def volume_name(rel):
    return rel.replace("/", "__")[: -len(".nii.gz")]


def test_own_folder_with_made_up_classes_end_to_end(tiny, tmp_path, capsys):
    """Own scans + labels CSV -> python -m prepare.preprocess --dataset folder --labels -> eval.py
    with prompts written from the CSV's class names; small calibration splits are warned about;
    --split is refused for a folder; unlabelled folders get a clear error, not torch.cat's."""
    model, tok = tiny
    model = BrgSA(replace(model.cfg, image_size=(48, 48, 32), crop_size=(48, 48, 32),
                                 spacing=(7.0, 7.0, 10.0))).eval()
    ckpt = _checkpoint(model, tok, tmp_path / "ckpt.pt")  # the `tiny` preprocessing grid
    labels_csv, truth = _own_folder(tmp_path / "scans")
    (tmp_path / "scans" / "extra.nii.gz").write_bytes((tmp_path / "scans" / "scan1.nii.gz").read_bytes())
    code = preprocess.preprocess_main(["--dataset", "folder", "--root", str(tmp_path / "scans"),
                                       "--labels", str(labels_csv), "--out", str(tmp_path / "cache"),
                                       "--preset", "tiny", "--workers", "1"])
    err = capsys.readouterr().err
    assert code == 1 and "extra: no row for 'extra'" in err  # no label: reported, not dropped silently
    r = E.main(["--ckpt", str(ckpt), "--data", str(tmp_path / "cache"), "--out_dir", str(tmp_path / "o"),
                "--n_boot", "20", "--no_plots"])
    assert r["classes"] == MADE_UP and r["n_volumes"] == len(truth)
    assert r["protocol"]["prompts"] == [[f"{c}." for c in MADE_UP]]  # the checkpoint's own prompt
    got = dict(zip(r["arrays"]["names"], r["arrays"]["labels"].tolist()))
    assert got == truth
    j = r["arrays"]["names"].index("sub__scan0")  # scores are the model's on the cached volume
    v = model.visual(D.load_volume(tmp_path / "cache" / "volumes" / "sub__scan0.npy")[None])
    ref = E.score_volumes(model, tok, v, MADE_UP, E.EvalConfig(), torch.device("cpu"))
    np.testing.assert_allclose(r["arrays"]["scores"][j], ref[0], atol=1e-5)
    err = capsys.readouterr().err
    assert "picked on only" in err and "fewer than 20" in err and r["rows"]["n_calib"] < 20
    assert json.loads((tmp_path / "o" / "eval.json").read_text())["notes"] == r["notes"]
    with pytest.raises(ValueError, match="--split valid: .* has no splits"):
        E.main(["--ckpt", str(ckpt), "--data", str(tmp_path / "cache"), "--split", "valid",
                "--out_dir", str(tmp_path / "o2"), "--n_boot", "0", "--no_plots"])
    # the same folder without labels in the cache: --label_csv gives the classes, or a clear error
    assert preprocess.preprocess_main(["--dataset", "folder", "--root", str(tmp_path / "scans"), "--out",
                                       str(tmp_path / "bare"), "--preset", "tiny", "--workers", "1"]) == 0
    base = ["--ckpt", str(ckpt), "--data", str(tmp_path / "bare"), "--n_boot", "0", "--no_plots"]
    with pytest.raises(ValueError, match="carry no labels; give --label_csv"):
        E.main(base + ["--out_dir", str(tmp_path / "o3")])
    (tmp_path / "scans" / "extra.nii.gz").unlink()  # every volume of --data needs a label row
    with open(labels_csv, "a") as f:
        f.write("extra.nii.gz,1,0,1\n")
    r2 = E.main(base + ["--out_dir", str(tmp_path / "o4"), "--label_csv", str(labels_csv)])
    assert r2["classes"] == MADE_UP and len(r2["arrays"]["names"]) == len(truth) + 1


def test_own_folder_labels_errors_and_split_refused(tmp_path, capsys):
    labels_csv, _ = _own_folder(tmp_path / "scans", n=2)
    args = ["--dataset", "folder", "--root", str(tmp_path / "scans"), "--out", str(tmp_path / "c"),
            "--preset", "tiny", "--workers", "1"]
    with pytest.raises(SystemExit):
        preprocess.preprocess_main(args + ["--split", "valid"])
    assert "--split is for CT-RATE only" in capsys.readouterr().err
    (tmp_path / "bad.csv").write_text("scan,Glowing spleen\nscan1.nii.gz,maybe\n")
    assert preprocess.preprocess_main(args + ["--labels", str(tmp_path / "bad.csv")]) == 1
    err = capsys.readouterr().err
    assert "bad.csv: line 2 ('scan1.nii.gz'): label 'maybe' for class 'Glowing spleen'; expected 0 or 1" in err
    (tmp_path / "one.csv").write_text("scan\nscan1.nii.gz\n")
    assert preprocess.preprocess_main(args + ["--labels", str(tmp_path / "one.csv")]) == 1
    assert "at least one class column" in capsys.readouterr().err


def flat(d, prefix=""):
    """Nested dict of numbers / [lo, hi] lists -> {path: float}, for approximate comparison."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flat(v, f"{prefix}{k}/"))
        else:
            out.update({f"{prefix}{k}/{i}": x for i, x in enumerate(v)} if isinstance(v, list)
                       else {prefix + k: v})
    return out


def test_score_file_mode_shuffled_score_columns_and_rows(tmp_path):
    rng = np.random.default_rng(3)
    names = [f"valid_{i}_a_1" for i in range(50)]
    labels = rng.integers(0, 2, (50, 3))
    scores = labels + rng.normal(0, 0.7, (50, 3))
    head = ["VolumeName", "x", "y", "z"]
    _write(tmp_path / "l.csv", head, [[n, *map(str, r)] for n, r in zip(names, labels)])
    _write(tmp_path / "s.csv", head, [[n, *(repr(float(x)) for x in r)] for n, r in zip(names, scores)])
    perm, rows = [2, 0, 1], rng.permutation(50)
    _write(tmp_path / "s2.csv", ["VolumeName"] + [["x", "y", "z"][i] for i in perm],
           [[names[k], *(repr(float(scores[k, i])) for i in perm)] for k in rows])
    a = AF.evaluate_score_files(tmp_path / "s.csv", tmp_path / "l.csv", n_boot=100)
    b = AF.evaluate_score_files(tmp_path / "s2.csv", tmp_path / "l.csv", n_boot=100)
    for c in "xyz":
        j = "xyz".index(c)
        assert b["auc"][c] == pytest.approx(E.auroc(scores[:, j], labels[:, j]))
        assert b["auprc"][c] == pytest.approx(a["auprc"][c])
    # patients are resampled and split by name, not by row position: every number is order-free
    assert flat(b["per_class"]) == pytest.approx(flat(a["per_class"]))
    assert flat(b["macro"]) == pytest.approx(flat(a["macro"]))
    _write(tmp_path / "dup.csv", ["VolumeName", "x"], [["v1", "0.1"], ["v1", "0.2"]])
    with pytest.raises(ValueError, match="duplicate"):
        AF.read_score_csv(tmp_path / "dup.csv")
    _write(tmp_path / "nan.csv", ["VolumeName", "x"], [["v1", "nan"]])
    with pytest.raises(ValueError, match="NaN"):
        AF.read_score_csv(tmp_path / "nan.csv")


def test_classes_option_maps_radchest_and_checks_labels(tmp_path):
    recs = make_records(tmp_path, 2)
    classes, score_map = T.class_setup("ctrate", recs)
    assert classes == CLASSES and score_map is None
    classes, score_map = T.class_setup("radchest", recs)
    assert len(classes) == 16 and "Calcification" in classes
    s = np.arange(36, dtype=float).reshape(2, 18)
    mapped = score_map(s)
    assert mapped[0, classes.index("Calcification")] == max(s[0, 1], s[0, 4])
    with pytest.raises(ValueError, match="Calcification"):
        T.select_labels(recs, classes)
    lt, _ = T.class_setup("ctrate_lt", recs)
    assert len(lt) == 15
    _write(tmp_path / "lt.csv", ["VolumeName"] + lt, [[r.name] + ["1"] * 15 for r in recs[:3]])
    with pytest.raises(ValueError, match="have no labels"):
        T.select_labels(recs, lt, tmp_path / "lt.csv")
    picked = T.select_labels(recs, CLASSES[::-1])
    assert np.array_equal(picked[0].labels, recs[0].labels[::-1])
    with pytest.raises(ValueError, match="--classes"):
        T.class_setup("mimic", recs)


def test_plots_written_or_skipped_with_a_message(tiny, tmp_path, monkeypatch, capsys):
    model, tok = tiny
    classes = CLASSES[:3]  # three panels render quickly
    loader = D.eval_loader(T.select_labels(make_records(tmp_path / "v", 6), classes), 12)
    r = E.zero_shot(model, tok, loader, classes, torch.device("cpu"), E.EvalConfig(n_boot=0))
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    AF.write_result(r, tmp_path / "without", plots=True)
    assert "matplotlib is not installed" in capsys.readouterr().out
    assert not list((tmp_path / "without").glob("*.png"))
    assert (tmp_path / "without" / "eval.json").is_file()
    monkeypatch.undo()
    pytest.importorskip("matplotlib")
    AF.write_result(r, tmp_path / "with", plots=True)
    for name in ("roc_curves.png", "modality_gap.png"):
        assert (tmp_path / "with" / name).read_bytes()[:4] == b"\x89PNG"


def test_help_lists_every_flag_with_its_default(capsys, help_lacks_defaults):
    assert help_lacks_defaults("options:\n  --x X   the x\n  --y Y   y\n    (default: 1)\n") == ["--x"]
    with pytest.raises(SystemExit):
        E.main(["--help"])
    out = capsys.readouterr().out
    assert "--label_csv" in out and "--calib_split" in out and help_lacks_defaults(out) == []


# ----------------------------------------------------------------------------- bad input

REPO = Path(E.__file__).parent


class NotPlainData:
    """Stands for any pickled object a weights_only load must refuse (it would run its code)."""


def test_read_checkpoint_refuses_bad_files_by_name(tiny, tmp_path):
    model, tok = tiny
    good = _checkpoint(model, tok, tmp_path / "good.pt")
    cases = {"missing.pt": None, "text.pt": b"not a checkpoint", "torn.pt": good.read_bytes()[:2000],
             "empty.pt": b""}
    for name, content in cases.items():
        if content is not None:
            (tmp_path / name).write_bytes(content)
        with pytest.raises((ValueError, FileNotFoundError), match=rf"{name}") as err:
            read_checkpoint(tmp_path / name)
        assert "weights_only" not in str(err.value)
        assert "corrupt or truncated" in str(err.value) or name == "missing.pt", str(err.value)
    torch.save({"model": NotPlainData()}, tmp_path / "pickled.pt")
    with pytest.raises(ValueError, match=r"pickled\.pt: holds objects other than tensors") as err:
        read_checkpoint(tmp_path / "pickled.pt")
    assert "weights_only" not in str(err.value)
    torch.save(dict(model={}, model_config=dict(asdict(model.cfg), moe=True), tokenizer=""),
               tmp_path / "newer.pt")
    with pytest.raises(ValueError, match=r"newer\.pt: model_config has field\(s\) \['moe'\]"):
        read_checkpoint(tmp_path / "newer.pt")


def run_eval(*args):
    return subprocess.run([sys.executable, "eval.py", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=120)


def test_cli_bad_checkpoint_and_device_exit_nonzero_without_a_traceback(tmp_path):
    (tmp_path / "ckpt.pt").write_bytes(b"PK\x03\x04 torn")
    res = run_eval("--ckpt", str(tmp_path / "ckpt.pt"), "--volume", "x.nii.gz")
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert f"{tmp_path / 'ckpt.pt'}: corrupt or truncated checkpoint" in res.stderr
    assert "weights_only" not in res.stderr
    res = run_eval("--device", "cuda:7", "--scores", "s.csv", "--labels", "l.csv")
    assert res.returncode == 1 and "Traceback" not in res.stderr and "--device cuda:7" in res.stderr


def test_single_scan_refuses_findings_and_volumes_it_cannot_score(tiny, tmp_path, capsys):
    """Empty, too long or unknown-word findings; NaN, all-zero and raw (no intercept) volumes:
    each refused with its reason; --allow_non_hu scores an unusual volume anyway."""
    model, tok = tiny
    ckpt = str(_checkpoint(model, tok, tmp_path / "ckpt.pt"))
    affine = np.diag([5.0, 5.0, 10.0, 1.0])
    ct = np.random.default_rng(0).integers(-1000, 1000, (40, 36, 20)).astype(np.int16)
    volumes = {"ct": ct, "zero": np.zeros_like(ct), "raw": ct + 1024,
               "nan": np.where(ct > 900, np.nan, ct).astype(np.float32)}
    for name, vol in volumes.items():
        nib.save(nib.Nifti1Image(vol, affine), tmp_path / f"{name}.nii.gz")
    np.save(tmp_path / "zero.npy", np.zeros(model.cfg.image_size, np.int16))
    scan = ["--ckpt", ckpt, "--volume", str(tmp_path / "ct.nii.gz"), "--findings"]
    for findings, message in [([""], "an empty finding"),
                              (["effusion " * 200], "tokens as a prompt; the text encoder reads at most"),
                              (["pleural 積液"], "words the tokenizer cannot read ['積液']")]:
        with pytest.raises(ValueError, match=re.escape(message)):
            E.main(scan + findings)
    for name, message in [("zero.nii.gz", "no air"), ("raw.nii.gz", "no air"),
                          ("nan.nii.gz", "NaN or inf"), ("zero.npy", "no air")]:
        with pytest.raises(ValueError, match=rf"{re.escape(name)}: .*{message}"):
            E.main(["--ckpt", ckpt, "--volume", str(tmp_path / name)])
    scores = E.main(["--ckpt", ckpt, "--volume", str(tmp_path / "zero.nii.gz"), "--allow_non_hu",
                     "--findings", "cardiomegaly"])
    assert np.isfinite(scores["cardiomegaly"])
    res = run_eval("--ckpt", ckpt, "--volume", str(tmp_path / "raw.nii.gz"))
    assert res.returncode == 1 and "Traceback" not in res.stderr and "--allow_non_hu" in res.stderr


def test_macro_mean_states_its_classes_and_no_positive_is_an_error(tmp_path, capsys):
    names = [f"v{i}" for i in range(40)]
    rng = np.random.default_rng(0)
    _write(tmp_path / "s.csv", ["VolumeName", "A", "B"], [[n, *rng.random(2)] for n in names])
    _write(tmp_path / "l.csv", ["VolumeName", "A", "B"], [[n, i % 2, 0] for i, n in enumerate(names)])
    out = ["--out_dir", str(tmp_path / "o"), "--n_boot", "0", "--no_plots"]
    result = E.main(["--scores", str(tmp_path / "s.csv"), "--labels", str(tmp_path / "l.csv")] + out)
    text = capsys.readouterr()
    assert "over 1 of 2 classes" in text.out and "left out of the macro mean: ['B']" in text.err
    assert result["macro_auc"] == result["auc"]["A"]
    _write(tmp_path / "l0.csv", ["VolumeName", "A", "B"], [[n, 0, 0] for n in names])
    out[1] = str(tmp_path / "o0")
    with pytest.raises(ValueError, match=r"l0\.csv: no class has both positive and negative labels"):
        E.main(["--scores", str(tmp_path / "s.csv"), "--labels", str(tmp_path / "l0.csv")] + out)
    assert not (tmp_path / "o0").exists()


@pytest.mark.parametrize("flags, message", [
    (["--batch_size", "0"], "--batch_size must be >= 1"),
    (["--workers", "-1"], "--workers must be >= 0"),
    (["--calib_fraction", "1.5"], "--calib_fraction must be in [0, 1), got 1.5"),
    (["--n_boot", "-1"], "--n_boot must be >= 0"),
])
def test_bad_flags_are_refused_before_any_data_is_read(flags, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        E.main(["--ckpt", "nowhere.pt", "--data", "nowhere"] + flags)


def test_unknown_class_set_is_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit):
        E.main(["--ckpt", "nowhere.pt", "--data", "nowhere", "--classes", "lung"])
    assert "--classes: invalid choice: 'lung'" in capsys.readouterr().err



def test_weights_of_another_config_give_a_short_message(tiny, tmp_path):
    model, tok = tiny
    torch.save(dict(model=model.state_dict(), model_config=asdict(replace(model.cfg, embed_dim=16)),
                    tokenizer=tok.to_str()), tmp_path / "mixed.pt")
    with pytest.raises(ValueError, match=r"mixed\.pt: weights do not match the stored config "
                                         r"\(size mismatch .*; \d+ more\)") as err:
        E.load_checkpoint(tmp_path / "mixed.pt", torch.device("cpu"))
    assert "\n" not in str(err.value)
# ----------------------------------------------------------------------------- grounding maps

FINDING = "pleural effusion"


def _known_answer_model(tok):
    """A BrgSA whose answer is known by construction: patch token channel 31 (the one the sin-cos
    table leaves at zero) is K x the patch's mean input, the image head maps that channel onto the
    prompt embedding t of FINDING and the other channels onto random directions, and the bank holds
    only +t and -t. A bright patch's token is then ~ +t (score ~ +1), a dark one ~ -t: the map's
    maximum is the brightest patch."""
    torch.manual_seed(0)
    cfg = replace(PRESETS["tiny"], image_size=(32, 32, 16), crop_size=(32, 32, 16),
                  spacing=(10.0, 10.0, 20.0),
                  patch_size=(8, 8, 4), vit_width=32, vit_depth=0, vit_heads=2, input_centering=False,
                  vocab_size=tok.get_vocab_size(), text_width=32, text_depth=1, text_heads=2,
                  text_mlp=64, embed_dim=32, bank_size=16)
    model = BrgSA(cfg).eval()
    t = E.embed_texts(model, tok, [cfg.prompt.format(FINDING)], torch.device("cpu"))[0]
    t_hat = t / t.norm()
    with torch.no_grad():
        w = model.visual.patch_embed.weight
        w.zero_()
        w[31] = 100.0 / w[31].numel()
        model.visual.patch_embed.bias.zero_()
        model.visual.head.weight.normal_()
        model.visual.head.weight[:, 31] = 10.0 * t_hat
        model.visual.head.bias.zero_()
        model.bank.weight.copy_(torch.cat([t_hat.expand(8, -1), -t_hat.expand(8, -1)]))
    return model


def _scene():
    """Canonical-RAS HU (40, 24, 20) at 9 x 11 x 18 mm (x cropped, y padded, z cropped by the
    preset), tissue at 0 HU with noise, one 1000 HU block: the finding, at a known place."""
    hu = np.random.default_rng(3).normal(0.0, 30.0, (40, 24, 20)).astype(np.float32)
    hu[:, :, :2] = -1000.0
    box = (slice(29, 40), slice(5, 12), slice(6, 10))  # x: to the edge, past the crop
    hu[box] = 1000.0
    return hu, box


def _save(hu_ras, path, lps):
    """Write the RAS array as an RAS or an LPS NIfTI of the same physical scene -> (path, affine)."""
    sp = np.array([9.0, 11.0, 18.0])
    if lps:  # file axes run right-to-left and anterior-to-posterior
        affine = np.diag([-sp[0], -sp[1], sp[2], 1.0])
        affine[:3, 3] = [(hu_ras.shape[0] - 1) * sp[0], (hu_ras.shape[1] - 1) * sp[1], 0.0]
        data = hu_ras[::-1, ::-1, :]
    else:
        affine, data = np.diag([*sp, 1.0]), hu_ras
    affine[:3, 3] -= [100.0, 50.0, 20.0]  # an arbitrary origin
    nib.save(nib.Nifti1Image(np.ascontiguousarray(data).astype(np.int16), affine), path)
    return path, nib.load(str(path)).affine


@pytest.mark.parametrize("lps", [False, True], ids=["RAS", "LPS"])
def test_heatmap_keeps_input_grid_and_points_at_the_finding(tiny, tmp_path, lps, capsys):
    _, tok = tiny
    model = _known_answer_model(tok)
    ckpt = _checkpoint(model, tok, tmp_path / "ckpt.pt")
    hu, box = _scene()
    path, affine = _save(hu, tmp_path / "scan.nii.gz", lps)
    E.main(["--ckpt", str(ckpt), "--volume", str(path), "--findings", FINDING, "lung nodule",
            "--heatmap", str(tmp_path / "maps")])
    printed = capsys.readouterr().out
    assert "heat maps (score)" in printed
    out = nib.load(str(tmp_path / "maps" / "scan_pleural_effusion.nii.gz"))
    src = nib.load(str(path))
    assert out.shape == src.shape and np.array_equal(out.affine, src.affine)
    assert (tmp_path / "maps" / "scan_lung_nodule.nii.gz").is_file()
    heat = np.asarray(out.dataobj)
    peak = np.array(np.unravel_index(np.argmax(heat), heat.shape))
    world = affine[:3, :3] @ peak + affine[:3, 3]
    ras, origin = np.diag([9.0, 11.0, 18.0]), np.array([-100.0, -50.0, -20.0])  # both files alike
    lo = ras @ [s.start for s in box] + origin  # world mm of the block's first and last voxel
    hi = ras @ [s.stop - 1 for s in box] + origin
    assert np.all(world >= lo - 1e-6) and np.all(world <= hi + 1e-6), (world, lo, hi)
    assert heat.max() > 0.5 and np.median(heat) < -0.9  # bright block ~ +t, tissue ~ -t
    # the printed maximum: that voxel, at its scanner coordinates in mm
    line = next(x for x in printed.splitlines() if x.startswith(f"eval: {FINDING}: the map's maximum"))
    assert f"voxel {tuple(int(i) for i in peak)}" in line
    assert "({:.1f}, {:.1f}, {:.1f}) mm".format(*world) in line



def test_heatmap_bad_input_is_named(tiny, tmp_path):
    model, tok = tiny
    ckpt = _checkpoint(model, tok, tmp_path / "ckpt.pt")
    path, _ = _save(_scene()[0], tmp_path / "scan.nii.gz", lps=True)
    base = ["--ckpt", str(ckpt), "--volume", str(path), "--heatmap", str(tmp_path / "maps")]
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="--heatmap .*file/sub: cannot write there"):
        E.main(base[:-1] + [str(tmp_path / "file" / "sub"), "--findings", FINDING])
    (tmp_path / "notes.nii.gz").write_text("not an image")
    with pytest.raises(ValueError, match="notes.nii.gz: not a readable NIfTI"):
        E.main(base[:3] + [str(tmp_path / "notes.nii.gz")] + base[4:] + ["--findings", FINDING])
    np.save(tmp_path / "small.npy", np.zeros((8, 8, 8), np.int16))
    with pytest.raises(ValueError, match=r"small.npy: preprocessed volume \(8, 8, 8\)"):
        E.main(base[:3] + [str(tmp_path / "small.npy")] + base[4:] + ["--findings", FINDING])


def test_data_mode_heatmaps_and_grounding_table(tiny, tmp_path, capsys):
    from prepare import phantom
    model, tok = tiny
    ckpt = _checkpoint(model, tok, tmp_path / "ckpt.pt")
    root = phantom.generate(tmp_path / "synth", n=4, valid_fraction=0.5, seed=1, workers=1,
                            log=lambda *a: None, masks=True)
    base = ["--ckpt", str(ckpt), "--data", str(root), "--out_dir", str(tmp_path / "o"), "--n_boot", "20"]
    E.main(base + ["--heatmap", str(tmp_path / "maps"), "--heatmap_n", "1", "--findings", FINDING])
    maps = sorted((tmp_path / "maps").glob("*.nii.gz"))
    assert [m.name for m in maps] == ["valid_1_a_1_pleural_effusion.nii.gz"]
    src = nib.load(str(next(root.rglob("valid_1_a_1.nii.gz"))))
    out = nib.load(str(maps[0]))
    assert out.shape == src.shape and np.array_equal(out.affine, src.affine)
    summary = E.main(base + ["--grounding"])
    labels = T.read_csv(root / "multi_abnormality_labels" / "valid_predicted_labels.csv")
    positives = {c for row in labels for c in CLASSES if row[c] == "1"}
    assert set(summary["per_finding"]) == positives and summary["missing_masks"] == 0
    table = capsys.readouterr().out
    assert "pointing ±1 patch" in table and "macro mean" in table
    rows = T.read_csv(tmp_path / "o" / "grounding.csv")
    assert rows[-1]["finding"] == "macro mean" and len(rows) == len(positives) + 1
    for e in summary["per_finding"].values():
        assert 0 <= e["chance"] <= e["chance_patch"] <= 1 and 0 <= e["auroc"] <= 1
    with pytest.raises(ValueError, match="--grounding scores label classes"):
        E.main(base + ["--grounding", "--findings", "lung"])
    plain = phantom.generate(tmp_path / "plain", n=2, valid_fraction=0.5, seed=1, workers=1,
                             log=lambda *a: None)
    with pytest.raises(ValueError, match="no finding mask found"):
        E.main(["--ckpt", str(ckpt), "--data", str(plain), "--out_dir", str(tmp_path / "o2"),
                "--grounding"])


def test_heatmap_png_written_or_skipped_with_a_message(tiny, tmp_path, monkeypatch, capsys):
    _, tok = tiny
    model = _known_answer_model(tok)
    ckpt = _checkpoint(model, tok, tmp_path / "ckpt.pt")
    path, _ = _save(_scene()[0], tmp_path / "scan.nii.gz", lps=True)
    args = ["--ckpt", str(ckpt), "--volume", str(path), "--findings", FINDING]
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    E.main(args + ["--heatmap", str(tmp_path / "without")])
    assert "matplotlib is not installed, heat map PNGs skipped" in capsys.readouterr().out
    assert not list((tmp_path / "without").glob("*.png"))
    assert (tmp_path / "without" / "scan_pleural_effusion.nii.gz").is_file()
    monkeypatch.undo()
    pytest.importorskip("matplotlib")
    E.main(args + ["--heatmap", str(tmp_path / "with")])
    assert (tmp_path / "with" / "scan_pleural_effusion.png").read_bytes()[:4] == b"\x89PNG"


def test_spreadsheet_score_and_label_files_read_as_the_plain_ones(tmp_path, spreadsheet_csv):
    """Score and label CSVs saved by a spreadsheet (byte-order mark, CRLF, every field quoted,
    volume names holding commas and quotes) give exactly the plain files' result."""
    rng = np.random.default_rng(8)
    names = [f'scan {i}, "series" {i % 3}' for i in range(30)]
    labels = rng.integers(0, 2, (30, 2))
    scores = labels + rng.normal(0, 0.8, (30, 2))
    head = ["VolumeName", "Lung nodule", "Pleural effusion"]
    srows = [head] + [[n, *(repr(float(x)) for x in r)] for n, r in zip(names, scores)]
    lrows = [head] + [[n, *map(str, r)] for n, r in zip(names, labels)]
    _write(tmp_path / "s.csv", srows[0], srows[1:])
    _write(tmp_path / "l.csv", lrows[0], lrows[1:])
    plain = AF.evaluate_score_files(tmp_path / "s.csv", tmp_path / "l.csv", n_boot=50)
    sheet = AF.evaluate_score_files(spreadsheet_csv(tmp_path / "s2.csv", srows),
                                    spreadsheet_csv(tmp_path / "l2.csv", lrows), n_boot=50)
    assert (tmp_path / "s2.csv").read_bytes()[:3] == b"\xef\xbb\xbf" and b"\r\n" in (tmp_path / "l2.csv").read_bytes()
    assert sheet["classes"] == plain["classes"] == head[1:]
    assert sheet["arrays"]["names"] == names and np.array_equal(sheet["arrays"]["scores"], scores)
    assert flat(sheet["per_class"]) == flat(plain["per_class"])


def _damaged_scans(folder) -> dict:
    """{file: what eval.py must say about it}: the ways a scan arrives broken or in another form."""
    folder.mkdir(parents=True, exist_ok=True)
    ct = np.random.default_rng(1).integers(-1000, 1000, (40, 36, 20)).astype(np.int16)
    good = nib.Nifti1Image(ct, np.diag([5.0, 5.0, 10.0, 1.0]))
    nib.save(good, folder / "whole.nii.gz")
    (folder / "truncated.nii.gz").write_bytes((folder / "whole.nii.gz").read_bytes()[:3000])
    nib.save(nib.Nifti1Image(np.stack([ct, ct], -1), np.diag([5.0, 5.0, 10.0, 1.0])), folder / "4d.nii.gz")
    singular = np.diag([5.0, 5.0, 10.0, 1.0])
    singular[:3, 2] = singular[:3, 0]  # the third voxel axis along the first: no volume
    nib.save(nib.Nifti1Image(ct, singular), folder / "singular.nii.gz")
    zero = nib.Nifti1Image(ct, np.diag([5.0, 5.0, 10.0, 1.0]))
    zero.header["pixdim"][3] = 0.0
    nib.save(zero, folder / "zero_spacing.nii")
    dicom = folder / "series"
    dicom.mkdir(exist_ok=True)
    for i in range(3):  # a DICOM series folder: the 'DICM' mark at byte 128 of each slice
        (dicom / f"{i}.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\0" * 64)
    return {"truncated.nii.gz": "cannot read the voxel data", "4d.nii.gz": "expected a 3-D volume",
            "singular.nii.gz": "affine is singular", "zero_spacing.nii": "voxel spacing must be three positive",
            "series": "convert a DICOM series first, e.g. dcm2niix", "series/0.dcm": "a DICOM file"}


def test_damaged_or_unusual_scans_each_get_one_line(tiny, tmp_path):
    """eval.py --volume on each damaged scan, and --data on an empty or a wrong folder: exit 1 with
    one line naming the file and the problem, no traceback; prepare.preprocess lists each damaged
    scan of a folder with its reason and goes on."""
    model, tok = tiny
    ckpt = str(_checkpoint(model, tok, tmp_path / "ckpt.pt"))
    cases = _damaged_scans(tmp_path / "scans")
    for name, message in cases.items():
        res = run_eval("--ckpt", ckpt, "--volume", str(tmp_path / "scans" / name), "--findings", "mass")
        err = res.stderr.strip().splitlines()
        assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr
        assert err[-1].startswith("eval.py: error:") and name.split("/")[-1] in err[-1] and message in err[-1], err
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("not a data set")
    for folder in ("empty", "notes"):
        res = run_eval("--ckpt", ckpt, "--data", str(tmp_path / folder), "--out_dir", str(tmp_path / "o"))
        assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr
        assert folder in res.stderr.strip().splitlines()[-1]
    code = preprocess.preprocess_main(["--dataset", "folder", "--root", str(tmp_path / "scans"), "--out",
                                       str(tmp_path / "c"), "--preset", "tiny", "--workers", "1"])
    failed = (tmp_path / "c" / "failed.txt").read_text()
    assert code == 1 and all(n in failed for n in ("truncated", "4d", "singular", "zero_spacing"))
    assert [r.name for r in preprocess.load_index(tmp_path / "c")] == ["whole"]


def test_evaluation_is_fp32_by_default_as_the_official_inference(tiny, tmp_path):
    """The volumes are embedded in fp32 unless --dtype bfloat16 asks for autocast: the scores of a
    fixed model equal an fp32 reference computed here to 1e-6; bf16 moves them by far more."""
    model, tok = tiny
    recs = make_records(tmp_path / "v", 5)
    loader = D.eval_loader(recs, 4)
    with torch.no_grad():
        v_ref = torch.cat([model.visual(b["volume"].float()) for b in loader]).double()
        t = torch.stack([model.text(*[x[0:1] for x in D.tokenize(tok, [f"{c}."])])[0] for c in CLASSES]).double()
        D_ = model.bank.weight.double()
        cos = lambda a, b: F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T  # noqa: E731
        ref = 0.5 * (cos(v_ref, t) + cos(torch.softmax(v_ref @ D_.T, -1) @ D_, t))
    r = E.zero_shot(model, tok, loader, CLASSES, torch.device("cpu"), E.EvalConfig(n_boot=0))
    assert r["protocol"]["dtype"] == "float32"
    np.testing.assert_allclose(r["arrays"]["scores"], ref.numpy(), rtol=0, atol=1e-6)
    bf16 = E.zero_shot(model, tok, loader, CLASSES, torch.device("cpu"),
                       E.EvalConfig(n_boot=0, dtype="bfloat16"))
    assert np.abs(bf16["arrays"]["scores"] - ref.numpy()).max() > 1e-4


def test_findings_in_other_letters_many_or_unknown_are_scored_or_refused_in_one_line(tiny, tmp_path, capsys):
    """Accented Latin letters are read (the tokenizer strips accents); hundreds of findings are
    scored in one call; a word the text tower never learned is scored with a warning naming it and
    what the score then rests on (non-Latin script is refused: test_single_scan_refuses_...)."""
    model, tok = tiny
    ckpt = str(_checkpoint(model, tok, tmp_path / "ckpt.pt"))
    nib.save(nib.Nifti1Image(np.random.default_rng(0).integers(-1000, 1000, (40, 36, 20)).astype(np.int16),
                             np.diag([5.0, 5.0, 10.0, 1.0])), tmp_path / "ct.nii.gz")
    scan = ["--ckpt", ckpt, "--volume", str(tmp_path / "ct.nii.gz"), "--findings"]
    many = [f"{a} and {b}" for a in CLASSES for b in CLASSES[:12]]  # 216 findings
    scores = E.main(scan + many)
    assert len(scores) == len(many) and all(np.isfinite(list(scores.values())))
    accented = E.main(scan + ["Cardiomégalie", "cardiomegaly"])
    assert np.isfinite(accented["Cardiomégalie"])
    capsys.readouterr()
    E.main(scan + ["spiculated", "cardiomegaly spiculated"])
    err = capsys.readouterr().err
    assert "'spiculated' never appeared as a word in training" in err
    assert "the score rests on letters alone" in err and "the score rests on ['cardiomegaly']" in err
