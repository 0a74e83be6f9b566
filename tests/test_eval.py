"""eval.py metrics on hand-checkable cases, against brute force, and score-file mode on real scores."""
import csv
import itertools

import numpy as np
import pytest

import eval as E


def brute_auroc(s, y):
    """P(pos > neg) + 0.5 P(tie) by counting every positive-negative pair."""
    pos, neg = s[y == 1], s[y == 0]
    wins = sum((p > n) + 0.5 * (p == n) for p, n in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


def test_auroc_hand_cases():
    assert E.auroc(np.array([0.1, 0.2, 0.3, 0.4]), np.array([0, 0, 1, 1])) == 1.0
    assert E.auroc(np.array([0.4, 0.3, 0.2, 0.1]), np.array([0, 0, 1, 1])) == 0.0
    assert E.auroc(np.array([0.5, 0.5, 0.5]), np.array([0, 1, 1])) == 0.5  # all tied
    # 2 positives, 2 negatives: pairs (0.8>0.3) (0.8>0.6) (0.4>0.3) (0.4<0.6) -> 3/4
    assert E.auroc(np.array([0.8, 0.4, 0.3, 0.6]), np.array([1, 1, 0, 0])) == 0.75
    assert np.isnan(E.auroc(np.array([0.1, 0.2]), np.array([1, 1])))


@pytest.mark.parametrize("seed", range(5))
def test_auroc_matches_pair_counting_with_ties(seed):
    rng = np.random.default_rng(seed)
    n = rng.integers(5, 60)
    y = rng.integers(0, 2, n)
    y[:2] = [0, 1]
    s = rng.integers(0, 6, n).astype(float)  # few distinct values: many ties
    assert E.auroc(s, y) == pytest.approx(brute_auroc(s, y), abs=1e-12)


def test_roc_corner_threshold_and_metrics():
    s = np.array([0.1, 0.2, 0.35, 0.4, 0.6, 0.7, 0.8, 0.9])
    y = np.array([0, 0, 0, 1, 0, 1, 1, 1])
    thr = E.roc_corner_threshold(s, y)
    # score > 0.35 gives TPR 1, FPR 1/4 (distance 0.25); no other threshold is closer to (0, 1).
    assert thr == pytest.approx(0.35)
    m = E.binary_metrics(s > thr, y)
    # TP 4, FP 1, TN 3, FN 0: acc 7/8; F1(pos) = 8/9 (support 4), F1(neg) = 6/7 (support 4)
    assert m["acc"] == pytest.approx(7 / 8)
    assert m["f1"] == pytest.approx((8 / 9 + 6 / 7) / 2)
    assert m["precision"] == pytest.approx(4 / 5)
    assert m["recall"] == 1.0 and m["specificity"] == pytest.approx(3 / 4)


def test_evaluate_scores_macro_and_layout():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, (40, 3))
    scores = labels + rng.normal(0, 0.1, (40, 3))
    scores[:, 2] = rng.normal(size=40)  # one class is noise
    r = E.evaluate_scores(scores, labels, ["a", "b", "c"])
    assert r["auc"]["a"] == 1.0 and r["auc"]["b"] == 1.0
    assert r["macro_auc"] == pytest.approx(np.mean([1.0, 1.0, E.auroc(scores[:, 2], labels[:, 2])]))
    table = E.format_table(r)
    assert "macro mean" in table and table.count("\n") == 5


def _write(path, header, rows):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def test_score_file_mode_reproduces_official_brgsa(shared_data, tmp_path):
    scores = shared_data / "brgsa_official" / "ctrate_lt_scores.csv"
    labels = shared_data / "brgsa_official" / "ctrate_lt_labels.csv"
    r = E.evaluate_score_files(scores, labels)
    assert r["n_volumes"] == 3039 and len(r["auc"]) == 15
    assert r["macro_auc"] == pytest.approx(0.8148, abs=5e-5)
    # Shuffle the label file's columns and rows: matching is by name, so nothing changes.
    with open(labels) as f:
        rows = list(csv.reader(f))
    header, body = rows[0], rows[1:]
    perm = [0] + list(np.random.default_rng(1).permutation(np.arange(1, len(header))))
    body = [[row[i] for i in perm] for row in body][::-1]
    _write(tmp_path / "l.csv", [header[i] for i in perm], body)
    r2 = E.evaluate_score_files(scores, tmp_path / "l.csv")
    assert r2["auc"] == pytest.approx(r["auc"])
    out = E.main(["--scores", str(scores), "--labels", str(tmp_path / "l.csv"),
                  "--out_dir", str(tmp_path / "o")])
    assert (tmp_path / "o" / "eval.json").is_file() and out["macro_auc"] == r["macro_auc"]


def test_score_file_errors_name_the_problem(tmp_path):
    _write(tmp_path / "s.csv", ["VolumeName", "A", "B"], [["v1", "0.1", "0.2"], ["v2", "0.3", "0.1"]])
    _write(tmp_path / "l.csv", ["VolumeName", "A"], [["v1", "0"], ["v2", "1"]])
    with pytest.raises(ValueError, match=r"l\.csv.*\['B'\]"):
        E.evaluate_score_files(tmp_path / "s.csv", tmp_path / "l.csv")
    _write(tmp_path / "l2.csv", ["VolumeName", "B", "A"], [["v1", "0", "1"], ["v9", "1", "0"]])
    with pytest.raises(ValueError, match="have no labels.*v2"):
        E.evaluate_score_files(tmp_path / "s.csv", tmp_path / "l2.csv")
    _write(tmp_path / "bad.csv", ["VolumeName", "A"], [["v1", "high"]])
    with pytest.raises(ValueError, match="non-numeric"):
        E.read_score_csv(tmp_path / "bad.csv")
