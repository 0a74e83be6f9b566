"""metrics.py against hand-computed cases and brute-force references written here (no sklearn)."""
import itertools
import math

import numpy as np
import pytest

import metrics as M


# ----------------------------------------------------------------------------- brute-force references

def brute_auroc(s, y):
    pos, neg = s[y == 1], s[y == 0]
    wins = sum((p > n) + 0.5 * (p == n) for p, n in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


def brute_auprc(s, y):
    """AP = sum_k (R_k - R_{k-1}) P_k over the distinct scores, highest first."""
    ap, prev_recall = 0.0, 0.0
    for thr in sorted(set(s), reverse=True):
        pred = s >= thr
        recall = (pred & (y == 1)).sum() / (y == 1).sum()
        ap += (recall - prev_recall) * (pred & (y == 1)).sum() / pred.sum()
        prev_recall = recall
    return ap


def brute_corner(s, y):
    """(distance, -threshold) minimised over every candidate: the lowest threshold wins ties."""
    cands = [min(s) - 1.0] + sorted(set(s))
    best = min(cands, key=lambda c: (math.hypot(1 - ((s > c) & (y == 1)).sum() / (y == 1).sum(),
                                                ((s > c) & (y == 0)).sum() / (y == 0).sum()), c))
    return best


def brute_ranks(sim_row, rel_row):
    """Pessimistic 1-based rank of each relevant item: items scoring at least as high."""
    return [int((sim_row >= sim_row[g]).sum()) for g in np.flatnonzero(rel_row)]


# ----------------------------------------------------------------------------- AUROC / AUPRC / threshold

def test_auprc_hand_cases():
    # thresholds 0.9: P 1, R 1/2; 0.8: P 1/2, R 1/2; 0.7: P 2/3, R 1 -> 1/2 * 1 + 1/2 * 2/3
    assert M.auprc(np.array([0.9, 0.8, 0.7, 0.6]), np.array([1, 0, 1, 0])) == pytest.approx(5 / 6)
    # a tie between a positive and a negative at the top: P 1/2 at R 1/2, then P 2/3 at R 1
    assert M.auprc(np.array([0.5, 0.5, 0.2]), np.array([1, 0, 1])) == pytest.approx(0.25 + 1 / 3)
    assert M.auprc(np.array([0.3, 0.2, 0.1]), np.array([1, 1, 0])) == 1.0
    assert np.isnan(M.auprc(np.array([0.3, 0.2]), np.array([0, 0])))


@pytest.mark.parametrize("seed", range(6))
def test_ranked_metrics_match_brute_force_with_ties(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(6, 50))
    y = rng.integers(0, 2, n)
    y[:2] = [0, 1]
    s = rng.integers(0, 5 + seed, n) / 4.0  # few distinct values: many ties
    assert M.auroc(s, y) == pytest.approx(brute_auroc(s, y), abs=1e-12)
    assert M.auprc(s, y) == pytest.approx(brute_auprc(s, y), abs=1e-12)
    thr = M.roc_corner_threshold(s, y)
    assert thr == brute_corner(s, y)
    r = M.ranked_metrics(s, y, np.ones((1, n)))
    pred = s > thr
    assert (r["tp"][0], r["fp"][0]) == ((pred & (y == 1)).sum(), (pred & (y == 0)).sum())


def test_weights_equal_repeated_rows():
    """A weight row is the same as repeating each volume that many times (how bootstrap works)."""
    rng = np.random.default_rng(3)
    n = 40
    s, y = rng.integers(0, 8, n) / 7.0, rng.integers(0, 2, n)
    w = rng.integers(0, 3, (5, n)).astype(np.float64)
    r = M.ranked_metrics(s, y, w)
    for b in range(5):
        rs, ry = np.repeat(s, w[b].astype(int)), np.repeat(y, w[b].astype(int))
        assert r["auc"][b] == pytest.approx(brute_auroc(rs, ry), abs=1e-12)
        assert r["auprc"][b] == pytest.approx(brute_auprc(rs, ry), abs=1e-12)
        pred = rs > r["threshold"][b]  # same operating point as the unweighted search on the repeats
        ref = rs > brute_corner(rs, ry)
        assert np.array_equal(pred, ref)
        assert r["tp"][b] == (pred & (ry == 1)).sum() and r["tn"][b] == (~pred & (ry == 0)).sum()


def test_roc_corner_ties_go_to_the_lowest_threshold():
    # inverted scores: "all positive" (FPR 1, TPR 1) and "none" (0, 0) are both at distance 1
    assert M.roc_corner_threshold(np.array([0.1, 0.2]), np.array([1, 0])) == pytest.approx(-0.9)
    # (0.5, 1) and (0, 0.5) are equally close: the lower threshold (more positives) wins
    s, y = np.array([0.1, 0.2, 0.3, 0.4]), np.array([0, 1, 0, 1])
    assert M.roc_corner_threshold(s, y) == brute_corner(s, y) == 0.1


def test_single_class_rows_are_nan():
    r = M.ranked_metrics(np.array([0.1, 0.2, 0.3]), np.array([1, 1, 0]), np.array([[1.0, 1.0, 0.0]]))
    assert np.isnan(r["auc"][0]) and np.isnan(r["threshold"][0]) and np.isnan(r["tp"][0])


def test_confusion_metrics_hand_case_and_conventions():
    m = M.confusion_metrics(tp=4, fp=1, fn=0, tn=3)
    assert float(m["acc"]) == pytest.approx(7 / 8)
    assert float(m["f1"]) == pytest.approx((8 / 9 * 4 + 6 / 7 * 4) / 8)
    assert float(m["precision"]) == pytest.approx(0.8) and float(m["recall"]) == 1.0
    assert float(m["specificity"]) == pytest.approx(0.75)
    none = M.binary_metrics(np.zeros(4, bool), np.array([0, 1, 0, 1]))
    assert none["precision"] == 0.0 and none["recall"] == 0.0 and none["specificity"] == 1.0
    assert none["f1"] == pytest.approx((0 * 2 + 2 / 3 * 2) / 4)
    assert math.isnan(M.binary_metrics(np.ones(2, bool), np.array([0, 0]))["recall"])


def test_confusion_at_matches_direct_count():
    rng = np.random.default_rng(0)
    s, y = rng.random(30), rng.integers(0, 2, 30)
    w = rng.integers(0, 3, (4, 30)).astype(float)
    thr = np.array([0.2, 0.5, np.nan, 0.9])
    c = M.confusion_at(s, y, thr, w)
    for b in (0, 1, 3):
        pred = s > thr[b]
        assert c["tp"][b] == (w[b] * (pred & (y == 1))).sum()
        assert c["tn"][b] == (w[b] * (~pred & (y == 0))).sum()
    assert np.isnan(c["fp"][2])


def test_roc_curve_endpoints_and_area():
    rng = np.random.default_rng(1)
    s, y = rng.integers(0, 6, 50) / 5, rng.integers(0, 2, 50)
    fpr, tpr = M.roc_curve(s, y)
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0, 0, 1, 1)
    assert np.trapezoid(tpr, fpr) == pytest.approx(M.auroc(s, y))  # trapezoids = ties counted half


# ----------------------------------------------------------------------------- bootstrap

def test_bootstrap_weights_resample_groups_within_strata():
    groups = np.array([0, 0, 1, 2, 2, 2, 3, 4])
    strata = np.array([0, 0, 0, 0, 0, 0, 1, 1])
    w = M.bootstrap_weights(groups, strata, 500, np.random.default_rng(0))
    assert w.shape == (500, 8)
    assert np.all(w[:, 0] == w[:, 1]) and np.all(w[:, 3] == w[:, 5])  # a patient moves as one
    # 3 groups drawn in stratum 0, 2 in stratum 1, in every resample
    assert np.all(w[:, [0, 2, 3]].sum(1) == 3) and np.all(w[:, 6:].sum(1) == 2)
    assert w[:, 2].mean() == pytest.approx(1.0, abs=0.15) and w[:, 2].std() > 0.5  # really random
    again = M.bootstrap_weights(groups, strata, 500, np.random.default_rng(0))
    assert np.array_equal(w, again)


def test_bootstrap_interval_covers_truth_at_nominal_rate():
    """Binormal scores with known AUROC Phi(d / sqrt 2): the 95% interval covers it ~95% of the time."""
    d, n_pos, n_neg, reps = 1.0, 60, 90, 150
    truth = 0.5 * (1 + math.erf(d / 2))  # Phi(d / sqrt(2))
    rng = np.random.default_rng(7)
    covered, widths = 0, []
    for r in range(reps):
        s = np.r_[rng.normal(d, 1, n_pos), rng.normal(0, 1, n_neg)][:, None]
        y = np.r_[np.ones(n_pos), np.zeros(n_neg)][:, None]
        rows = np.ones(len(s), bool)
        _, boot = M.diagnosis(s, y, rows, None, rows, np.arange(len(s)), np.zeros(len(s), int),
                              n_boot=400, seed=r)
        lo, hi = M.percentile_ci(boot["auc"][:, 0])
        covered += lo <= truth <= hi
        widths.append(hi - lo)
    assert 0.88 <= covered / reps <= 0.99, f"coverage {covered / reps:.3f}"
    # the width matches the normal-theory standard error of an AUROC at this size (Hanley-McNeil)
    q1, q2 = truth / (2 - truth), 2 * truth ** 2 / (1 + truth)
    se = math.sqrt((truth * (1 - truth) + (n_pos - 1) * (q1 - truth ** 2)
                    + (n_neg - 1) * (q2 - truth ** 2)) / (n_pos * n_neg))
    assert np.mean(widths) == pytest.approx(2 * 1.96 * se, rel=0.2)


def test_diagnosis_point_estimates_and_calibrated_threshold():
    rng = np.random.default_rng(2)
    n = 120
    y = rng.integers(0, 2, (n, 2))
    s = y + rng.normal(0, 0.8, (n, 2))
    calib = np.zeros(n, bool)
    calib[rng.permutation(n)[:40]] = True
    point, boot = M.diagnosis(s, y, np.ones(n, bool), calib, ~calib, np.arange(n), calib.astype(int),
                              n_boot=50, seed=0)
    for j in range(2):
        assert point["auc"][j] == pytest.approx(brute_auroc(s[:, j], y[:, j]))
        assert point["roc_corner"]["threshold"][j] == M.roc_corner_threshold(s[:, j], y[:, j])
        thr = M.roc_corner_threshold(s[calib, j], y[calib, j])
        assert point["calibrated"]["threshold"][j] == thr
        ref = M.binary_metrics(s[~calib, j] > thr, y[~calib, j])
        for k in ("acc", "f1", "precision", "recall", "specificity"):
            assert point["calibrated"][k][j] == pytest.approx(ref[k])
    assert boot["auc"].shape == (50, 2) and boot["calibrated"]["acc"].shape == (50, 2)
    assert np.std(boot["calibrated"]["threshold"][:, 0]) > 0  # thresholds are re-picked per resample


def test_bootstrap_speed_scale_runs(capsys):
    """1000 resamples x 18 classes x 3000 volumes is the CT-RATE size; run a tenth of it here."""
    rng = np.random.default_rng(0)
    y = rng.random((3000, 18)) < 0.1
    s = y + rng.normal(0, 1, y.shape)
    rows = np.ones(3000, bool)
    point, boot = M.diagnosis(s, y, rows, None, rows, np.arange(3000) // 2, np.zeros(3000, int),
                              n_boot=100, seed=0)
    assert np.all(np.isfinite(boot["auc"])) and boot["auc"].shape == (100, 18)
    lo, hi = M.percentile_ci(boot["auc"])
    assert np.all(lo < point["auc"]) and np.all(point["auc"] < hi)


# ----------------------------------------------------------------------------- calibration split

def test_patient_id():
    assert M.patient_id("valid_12_a_2") == "valid_12"
    assert M.patient_id("train_1_b_1") == "train_1"
    assert M.patient_id("trn00042") == "trn00042"


def test_calibration_split_groups_patients_and_covers_rare_classes():
    rng = np.random.default_rng(0)
    names = [f"valid_{p}_a_{r}" for p in range(200) for r in (1, 2)]
    groups = [M.patient_id(x) for x in names]
    labels = np.repeat(rng.random((200, 3)) < [0.3, 0.05, 0.0], 2, axis=0)
    labels[:8, 2] = True  # a class on 4 patients only
    for seed in range(5):
        mask = M.calibration_split(groups, labels, 0.3, seed=seed)
        assert np.array_equal(mask[0::2], mask[1::2])  # reconstructions never straddle
        assert 59 <= mask[0::2].sum() <= 61  # 30% of 200 patients, to within one
        for j in range(3):  # every class has positives on both sides
            n_cal = labels[mask, j].sum() // 2
            n_all = labels[:, j].sum() // 2
            assert math.floor(0.3 * n_all) - 1 <= n_cal <= math.ceil(0.3 * n_all) + 1
            assert 0 < n_cal < n_all, f"class {j}: {n_cal} of {n_all} patients in calibration"
    mask = M.calibration_split(groups, labels, 0.3, seed=1)
    assert np.array_equal(mask, M.calibration_split(groups, labels, 0.3, seed=1))
    assert not np.array_equal(mask, M.calibration_split(groups, labels, 0.3, seed=2))
    small = M.calibration_split(np.arange(15), labels[:15], 0.3, seed=0)
    assert 4 <= small.sum() <= 5  # small sets keep the fraction too
    assert not M.calibration_split(groups, labels, 0.0).any()
    with pytest.raises(ValueError, match="fraction"):
        M.calibration_split(groups, labels, 1.0)


# ----------------------------------------------------------------------------- retrieval

def test_retrieval_hand_case():
    sim = np.array([[0.9, 0.1, 0.5, 0.2],    # relevant item 2 ranked 2nd -> AP 1/2
                    [0.3, 0.8, 0.7, 0.1],    # relevant items 1 (1st) and 3 (4th) -> AP (1 + 2/4)/2
                    [0.5, 0.5, 0.5, 0.5],    # constant: the relevant item 0 ranks 4th (pessimistic)
                    [0.1, 0.2, 0.3, 0.4]])   # no relevant item: left out
    rel = np.zeros((4, 4), bool)
    rel[0, 2] = rel[1, 1] = rel[1, 3] = rel[2, 0] = True
    m = M.retrieval_metrics(sim, rel, ks=(1, 2, 4))
    assert m["R@1"] == pytest.approx(1 / 3) and m["R@2"] == pytest.approx(2 / 3) and m["R@4"] == 1.0
    assert m["mAP"] == pytest.approx((0.5 + 0.75 + 0.25) / 3)
    assert m["n_queries"] == 3 and m["n_queries_without_match"] == 1


def test_retrieval_matches_brute_force():
    rng = np.random.default_rng(4)
    sim = rng.integers(0, 6, (30, 25)).astype(float)  # ties everywhere
    rel = rng.random((30, 25)) < 0.1
    m = M.retrieval_metrics(sim, rel, ks=(1, 5, 10), block=7)
    aps, best = [], []
    for q in range(30):
        ranks = sorted(brute_ranks(sim[q], rel[q]))
        if ranks:
            aps.append(np.mean([sum(r2 <= r for r2 in ranks) / r for r in ranks]))
            best.append(ranks[0])
    assert m["mAP"] == pytest.approx(np.mean(aps))
    for k in (1, 5, 10):
        assert m[f"R@{k}"] == pytest.approx(np.mean(np.array(best) <= k))


# ----------------------------------------------------------------------------- modality gap

def test_gap_on_separated_and_identical_clusters():
    rng = np.random.default_rng(0)
    d = 16
    e = np.eye(d)
    a = e[0] + 0.05 * rng.normal(size=(200, d))
    b = e[1] + 0.05 * rng.normal(size=(200, d))
    g = M.modality_gap(a, b)
    assert g["centroid_distance"] == pytest.approx(math.sqrt(2), abs=0.05)  # noise: not quite unit means
    assert abs(g["true_pair_cos"]) < 0.05 and abs(g["random_pair_cos"]) < 0.05
    assert g["probe_acc"] == 1.0
    same = M.modality_gap(a, a)
    assert same["centroid_distance"] == pytest.approx(0.0, abs=1e-12)
    assert same["true_pair_cos"] == pytest.approx(1.0) and same["probe_acc"] == 0.5
    # paired structure: each text sits next to its own image, far from the others
    x = rng.normal(size=(200, d))
    paired = M.modality_gap(x, x + 0.1 * rng.normal(size=(200, d)))
    assert paired["true_pair_cos"] > 0.95 and abs(paired["random_pair_cos"]) < 0.05


def test_random_pair_cosine_excludes_same_group_pairs():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(12, 5)), rng.normal(size=(12, 5))
    groups = np.repeat(np.arange(6), 2)
    an, bn = M.l2_normalize(a), M.l2_normalize(b)
    cos = an @ bn.T
    other = groups[:, None] != groups[None, :]
    g = M.modality_gap(a, b, groups)
    assert g["random_pair_cos"] == pytest.approx(cos[other].mean())
    assert g["true_pair_cos"] == pytest.approx(np.diag(cos).mean())
    assert g["centroid_distance"] == pytest.approx(np.linalg.norm(an.mean(0) - bn.mean(0)))


def test_linear_probe_tracks_separability():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(300, 8))
    shift = np.zeros(8)
    shift[0] = 0.5  # a partial overlap: accuracy Phi(0.5) ~ 0.69 for the best hyperplane
    acc = M.linear_probe_accuracy(x - shift, x[rng.permutation(300)] + shift, seed=0)
    assert 0.6 < acc < 0.78
