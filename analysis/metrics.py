"""The measuring engine behind eval.py: AUROC, AUPRC and thresholded metrics with bootstrap intervals.

eval.py computes one AUROC the plain way (the rank formula); this file computes every number of the
diagnosis table at once, for the point estimate and for each bootstrap resample, and is tested equal
to eval.auroc. One engine: a class's scores are sorted once and cut into runs of equal value; a row
of weights (how often each volume was drawn) is summed per run, and cumulative sums give AUROC,
AUPRC and the confusion matrix at every candidate threshold. A block of bootstrap resamples is a
(B, N) weight matrix, so 1000 resamples cost a few (B, N) array passes per class.

    AUROC = P(s_pos > s_neg) + 1/2 P(s_pos = s_neg)     (Mann-Whitney U / (n_pos n_neg), ties half)
    AUPRC = sum_k (R_k - R_{k-1}) P_k                     (average precision over distinct scores)
    ROC-corner threshold: the operating point closest to (FPR, TPR) = (0, 1); predict score > threshold.

Thresholds are reported two ways: `roc_corner`, picked on the evaluated rows themselves (the field's
convention: optimistic), and `calibrated`, picked on a separate, patient-disjoint calibration split
and then frozen (the honest number). Percentile bootstrap intervals resample patients (or volumes).
analysis/official.py reproduces the official BrgSA procedure instead.

    python -c "import analysis.metrics"   # a library; eval.py is the command line
"""
import math
import re
import warnings

import numpy as np

THRESHOLDED = ("acc", "f1", "precision", "recall", "specificity")
MIN_CALIB_VOLUMES, MIN_CALIB_PER_CLASS = 20, 5  # below these a frozen threshold is mostly noise


# ----------------------------------------------------------------------------- the eval.json layout

def evaluate_scores(scores, labels, classes, names=None, calib=None, calib_fraction: float = 0.3,
                    n_boot: int = 1000, boot_unit: str = "patient", level: float = 0.95,
                    seed: int = 0) -> dict:
    """(N, C) scores and 0/1 labels -> the eval.json layout (per class, macro, CIs, which rows).

    names: volume names (patient grouping for the calibration split and the bootstrap; rows are
    their own patients when None). calib: (scores, labels, names) of a separate calibration set;
    otherwise calib_fraction of the patients is held out of `scores` to pick thresholds. AUROC,
    AUPRC and the ROC-corner operating point use every evaluated row; the calibrated threshold is
    scored on the rows outside the calibration split. n_boot resamples of boot_unit ("patient":
    reconstructions move together, or "volume") give percentile intervals at `level`.
    """
    scores, labels = np.asarray(scores, np.float64), np.asarray(labels) > 0
    n = len(scores)
    names = [str(i) for i in range(n)] if names is None else list(names)
    groups = [patient_id(x) for x in names]
    if calib is not None:
        scores = np.vstack([scores, np.asarray(calib[0], np.float64)])
        labels = np.vstack([labels, np.asarray(calib[1]) > 0])
        groups += ["calib:" + patient_id(x) for x in calib[2]]
        is_cal = np.r_[np.zeros(n, bool), np.ones(len(calib[0]), bool)]
    else:
        is_cal = calibration_split(groups, labels, calib_fraction, seed)
    evaluated = np.arange(len(scores)) < n
    test = evaluated & ~is_cal
    main = evaluated
    if boot_unit not in ("patient", "volume"):
        raise ValueError(f"boot_unit must be 'patient' or 'volume', got {boot_unit!r}")
    unit = np.unique(groups if boot_unit == "patient" else np.arange(len(scores)),
                     return_inverse=True)[1]
    point, boot = diagnosis(scores, labels, main, is_cal if is_cal.any() else None, test,
                                    unit, is_cal.astype(int), n_boot, seed)
    result = dict(n_volumes=int(n), classes=list(classes),
                  rows=dict(n_main=int(main.sum()), n_calib=int(is_cal.sum()), n_test=int(test.sum()),
                            **_rows_note(int(main.sum()), int(is_cal.sum()), int(test.sum()), calib is not None)),
                  **summarize_diagnosis(point, boot, classes, labels[main].sum(0), level))
    for j, m in enumerate(result["per_class"].values()):
        if m.get("calibrated"):  # what the calibrated numbers rest on, per class
            m["calibrated"].update(positives_calib=int(labels[is_cal, j].sum()),
                                   positives_test=int(labels[test, j].sum()))
    result["auc"] = {c: m["auc"] for c, m in result["per_class"].items()}
    result["auprc"] = {c: m["auprc"] for c, m in result["per_class"].items()}
    result["macro_auc"], result["macro_auprc"] = result["macro"]["auc"], result["macro"]["auprc"]
    if boot is not None:
        result["bootstrap"] = dict(n=n_boot, unit=boot_unit, level=level, seed=seed,
                                   n_units=int(unit.max() + 1), method="percentile",
                                   valid_resamples={c: int(np.isfinite(boot["auc"][:, j]).sum())
                                                    for j, c in enumerate(classes)})
    result["arrays"] = dict(names=names, scores=scores[:n], labels=labels[:n].astype(int),
                            calib_rows=is_cal[:n], main_rows=main[:n])
    # what a reader of the numbers must know: classes left out of the macro mean, thin calibration
    left_out = [c for c, m in result["per_class"].items() if not math.isfinite(m["auc"])]
    result["notes"] = ([f"{len(left_out)} of {len(classes)} classes have no positive or no negative "
                        f"among the evaluated rows and are left out of the macro mean: {left_out}"]
                       if left_out else [])
    result["notes"] += calibration_warnings(labels[is_cal], classes,
                                            calib is not None or calib_fraction > 0)
    return result

def _rows_note(n_main, n_calib, n_test, external):
    where = "a separate calibration set" if external else "a patient-grouped calibration split"
    main = "all evaluated rows"
    return dict(threshold_free=f"AUROC / AUPRC: {main} ({n_main} volumes)",
                roc_corner=f"threshold picked and scored on {main} ({n_main} volumes): optimistic",
                calibrated=(f"threshold picked on {where} ({n_calib} volumes), scored on "
                            f"{n_test} test volumes" if n_calib else "no calibration rows"))

def calibration_warnings(labels_cal, classes, wanted: bool) -> list:
    """Plain warnings when the calibration rows (N_cal, C) are too few to pick thresholds that
    mean anything: fewer than MIN_CALIB_VOLUMES volumes, or classes with fewer than
    MIN_CALIB_PER_CLASS positives or negatives among them. wanted: calibration was asked for."""
    n = len(labels_cal)
    if n == 0:
        return ["no calibration rows: the data set is too small for --calib_fraction, so there "
                "are no calibrated thresholds (give --calib_data)"] if wanted else []
    out = []
    if n < MIN_CALIB_VOLUMES:
        out.append(f"calibrated thresholds were picked on only {n} volume(s) (fewer than "
                   f"{MIN_CALIB_VOLUMES}): the calibrated numbers are anecdotal; give more data "
                   f"or a separate --calib_data")
    pos = np.asarray(labels_cal).sum(0)
    thin = [c for c, p in zip(classes, pos) if min(p, n - p) < MIN_CALIB_PER_CLASS]
    if thin:
        out.append(f"{len(thin)} of {len(classes)} classes have fewer than {MIN_CALIB_PER_CLASS} "
                   f"positive or negative calibration volumes, so their thresholds rest on a "
                   f"handful of scans: {', '.join(thin[:5])}{', ...' if len(thin) > 5 else ''}")
    return out

# ----------------------------------------------------------------------------- the engine

class Runs:
    """The scores of one class sorted ascending and cut into runs of equal value."""

    def __init__(self, scores: np.ndarray):
        self.order = np.argsort(scores, kind="mergesort")
        s = np.asarray(scores, dtype=np.float64)[self.order]
        self.starts = np.r_[0, np.flatnonzero(np.diff(s)) + 1]
        self.values = s[self.starts]  # (G,) the distinct scores, ascending

    def sums(self, w: np.ndarray, y: np.ndarray):
        """(B, N) per-volume weights, (N,) bool labels -> (G, B) positive and total weight per run.

        Runs go along the first axis so that the cumulative sums below run down contiguous rows,
        vectorised over the B resamples (several times faster than along the last axis)."""
        ws = w.T[self.order]  # (N, B), sorted by score
        pos = ws * y[self.order][:, None]
        if len(self.starts) == len(ws):  # no ties: every run is one volume
            return pos, ws
        return np.add.reduceat(pos, self.starts, axis=0), np.add.reduceat(ws, self.starts, axis=0)

def _div(a, b):
    """a / b elementwise, nan where b == 0 (no warning)."""
    a, b = np.broadcast_arrays(np.asarray(a, np.float64), np.asarray(b, np.float64))
    out = np.full(a.shape, np.nan)
    np.divide(a, b, out=out, where=b != 0)
    return out

def ranked_metrics(scores, labels, weights, threshold_only: bool = False) -> dict:
    """AUROC, AUPRC and the ROC-corner operating point of one class for each row of weights.

    scores, labels (N,); weights (B, N) >= 0 (float32 is exact for draw counts and twice as fast).
    -> dict of (B,) arrays: auc, auprc, threshold, tp, fp, fn, tn (the weighted confusion matrix at
    that threshold). nan where a weight row holds no positive or no negative.
    """
    runs = Runs(scores)
    P, T = runs.sums(weights, np.asarray(labels).astype(bool))  # (G, B) positive / all weight per run
    cum_p, cum_t = np.cumsum(P, 0), np.cumsum(T, 0)  # weight with score <= each run's value
    cum_n = cum_t - cum_p
    n_pos, n_neg = cum_p[-1].astype(np.float64), cum_n[-1].astype(np.float64)
    ok = (n_pos > 0) & (n_neg > 0)
    inv_pos, inv_neg = 1.0 / np.where(ok, n_pos, 1.0), 1.0 / np.where(ok, n_neg, 1.0)
    out = {}
    if not threshold_only:
        # Each positive beats the negatives of lower runs and ties half of its own run's negatives.
        u = np.einsum("gb,gb->b", P, cum_n - 0.5 * (T - P), dtype=np.float64)
        out["auc"] = np.where(ok, u * inv_pos * inv_neg, np.nan)
        # Predicting "score >= run k" keeps every run from k up: precision at each recall step.
        kept_pos, kept = cum_p[-1] - cum_p + P, cum_t[-1] - cum_t + T
        prec = np.divide(kept_pos, kept, out=np.zeros_like(kept), where=kept > 0)
        out["auprc"] = np.where(n_pos > 0, np.einsum("gb,gb->b", P, prec, dtype=np.float64)
                                / np.where(n_pos > 0, n_pos, 1.0), np.nan)
    # Candidates, ascending: below every score (all positive: FPR = TPR = 1, distance 1), then
    # "score > run k" for each run k, which misses cum_p[k] positives and rejects cum_n[k] negatives.
    d = np.square(cum_p * inv_pos.astype(cum_p.dtype))
    d += np.square(1.0 - cum_n * inv_neg.astype(cum_n.dtype))
    k = np.argmin(d, axis=0)  # first minimum: the lowest threshold wins ties
    cols = np.arange(d.shape[1])
    take = d[k, cols] < 1.0  # a tie with "all positive" (distance 1) goes to "all positive"
    missed = np.where(take, cum_p[k, cols], 0.0)
    rejected = np.where(take, cum_n[k, cols], 0.0)
    out.update(threshold=np.where(ok, np.where(take, runs.values[k], runs.values[0] - 1.0), np.nan),
               tp=np.where(ok, n_pos - missed, np.nan), fp=np.where(ok, n_neg - rejected, np.nan),
               fn=np.where(ok, missed, np.nan), tn=np.where(ok, rejected, np.nan))
    return out

def confusion_at(scores, labels, thresholds, weights) -> dict:
    """Weighted confusion matrix of `score > threshold`; thresholds (B,), weights (B, N) -> (B,) each."""
    y = np.asarray(labels).astype(bool)
    thr = np.asarray(thresholds, np.float64)
    pred = (np.asarray(scores, np.float64)[None, :] > thr[:, None]).astype(weights.dtype)  # (B, N)
    n_pos = weights[:, y].sum(1, dtype=np.float64)
    n_neg = weights[:, ~y].sum(1, dtype=np.float64)
    tp = np.einsum("bn,bn->b", pred[:, y], weights[:, y], dtype=np.float64)
    fp = np.einsum("bn,bn->b", pred[:, ~y], weights[:, ~y], dtype=np.float64)
    out = dict(tp=tp, fp=fp, fn=n_pos - tp, tn=n_neg - fp)
    return {k: np.where(np.isnan(thr), np.nan, v) for k, v in out.items()}

def confusion_metrics(tp, fp, fn, tn) -> dict:
    """ACC, weighted F1 (each class's F1 weighted by its support), precision, recall, specificity.

    Precision is 0 when nothing is predicted positive (scikit-learn's zero_division=0); recall and
    specificity are nan when the rows hold no positive / no negative.
    """
    tp, fp, fn, tn = (np.asarray(a, np.float64) for a in (tp, fp, fn, tn))
    n = tp + fp + fn + tn
    f1_pos = np.nan_to_num(_div(2 * tp, 2 * tp + fp + fn))
    f1_neg = np.nan_to_num(_div(2 * tn, 2 * tn + fn + fp))
    precision = np.where(tp + fp > 0, _div(tp, tp + fp), 0.0)
    out = dict(acc=_div(tp + tn, n), f1=_div(f1_pos * (tp + fn) + f1_neg * (tn + fp), n),
               precision=np.where(np.isnan(n), np.nan, precision),
               recall=_div(tp, tp + fn), specificity=_div(tn, tn + fp))
    return out

def auroc(scores, labels) -> float:
    """AUROC of one class from the engine (one row of unit weights); eval.auroc computes the same
    number from ranks (tested equal)."""
    return float(ranked_metrics(scores, labels, np.ones((1, len(scores))))["auc"][0])


def auprc(scores, labels) -> float:
    """Average precision of one class from the engine; nan without a positive."""
    return float(ranked_metrics(scores, labels, np.ones((1, len(scores))))["auprc"][0])


def roc_corner_threshold(scores, labels) -> float:
    """Threshold whose (FPR, TPR) lies closest to (0, 1); predictions are `score > threshold`.

    Every distinct score is a candidate, as in the official BrgSA script (CT-CLIP's scans a 0..1
    grid, which assumes probabilities; cosine scores live in [-1, 1]). Ties in distance go to the
    lowest threshold (more positives); official_threshold gives the official rule (the highest).
    """
    return float(ranked_metrics(scores, labels, np.ones((1, len(scores))))["threshold"][0])

def roc_curve(scores, labels):
    """-> (fpr, tpr) arrays from (0, 0) to (1, 1), one point per distinct score (for plots)."""
    runs = Runs(scores)
    P, T = runs.sums(np.ones((1, len(scores))), np.asarray(labels).astype(bool))
    P, N = P[::-1, 0], (T - P)[::-1, 0]  # descending score
    tpr = np.r_[0.0, np.cumsum(P)] / max(P.sum(), 1.0)
    fpr = np.r_[0.0, np.cumsum(N)] / max(N.sum(), 1.0)
    return fpr, tpr

# ----------------------------------------------------------------------------- bootstrap

def bootstrap_weights(groups, strata, n_boot: int, rng) -> np.ndarray:
    """(n_boot, N) draw counts: within each stratum, its groups are drawn with replacement.

    groups (N,) int: the resampling unit of each row (a patient, or the row itself); strata (N,) int:
    the parts resampled separately (calibration and test rows keep their sizes). A volume's weight
    is the number of times its group was drawn, so reconstructions of one patient move together.
    """
    groups, strata = np.asarray(groups), np.asarray(strata)
    uniq, inv = np.unique(groups, return_inverse=True)
    counts = np.zeros((n_boot, len(uniq)), np.float32)  # small integers: exact in float32
    group_stratum = np.zeros(len(uniq), dtype=strata.dtype)
    group_stratum[inv] = strata
    for s in np.unique(group_stratum):
        members = np.flatnonzero(group_stratum == s)  # group indices of this stratum
        draws = members[rng.integers(0, len(members), (n_boot, len(members)))]  # (B, P_s)
        flat = (draws + len(uniq) * np.arange(n_boot)[:, None]).ravel()
        counts += np.bincount(flat, minlength=n_boot * len(uniq)).reshape(n_boot, len(uniq))
    return counts[:, inv]

def percentile_ci(samples, level: float = 0.95, axis: int = 0):
    """Percentile interval of bootstrap samples, ignoring nan (resamples without both classes)."""
    a = (1.0 - level) / 2.0 * 100.0
    with warnings.catch_warnings():  # a class with no valid resample gets a nan interval
        warnings.simplefilter("ignore", RuntimeWarning)
        lo, hi = np.nanpercentile(np.asarray(samples, np.float64), [a, 100.0 - a], axis=axis)
    return lo, hi

def _diagnosis_block(scores, labels, w, main, calib, test) -> dict:
    """All diagnosis metrics of every class for a block of weight rows w (B, N) -> (B, C) arrays."""
    B, C = len(w), scores.shape[1]
    out = dict(auc=np.empty((B, C)), auprc=np.empty((B, C)))
    protos = ("roc_corner", "calibrated") if calib is not None else ("roc_corner",)
    conf = {p: {k: np.empty((B, C)) for k in ("threshold", "tp", "fp", "fn", "tn")} for p in protos}
    # Each metric only looks at its own rows: slice them once per block, not per class.
    parts = {name: (rows, w[:, rows]) for name, rows in
             (("main", main), ("calib", calib), ("test", test)) if rows is not None}
    for j in range(C):
        s, y = scores[:, j], labels[:, j]
        rows, wr = parts["main"]
        r = ranked_metrics(s[rows], y[rows], wr)
        out["auc"][:, j], out["auprc"][:, j] = r["auc"], r["auprc"]
        for k in conf["roc_corner"]:
            conf["roc_corner"][k][:, j] = r[k]
        if calib is not None:  # threshold from the calibration rows, frozen, scored on the test rows
            rows, wr = parts["calib"]
            thr = ranked_metrics(s[rows], y[rows], wr, threshold_only=True)["threshold"]
            conf["calibrated"]["threshold"][:, j] = thr
            rows, wr = parts["test"]
            for k, v in confusion_at(s[rows], y[rows], thr, wr).items():
                conf["calibrated"][k][:, j] = v
    for p in protos:
        c = conf[p]
        out[p] = dict(threshold=c["threshold"],
                      **confusion_metrics(c["tp"], c["fp"], c["fn"], c["tn"]))
    out.setdefault("calibrated", None)
    return out

def diagnosis(scores, labels, main, calib, test, units, strata, n_boot=1000, seed=0, block=250):
    """Point estimates and bootstrap samples of every diagnosis metric.

    scores, labels (N, C); main, calib, test (N,) bool row masks: AUROC, AUPRC and the ROC-corner
    operating point use `main`; the calibrated threshold is picked on `calib` (None: no calibrated
    metrics) and scored on `test`. units (N,) int: the bootstrap's resampling unit per row;
    strata (N,) int: parts resampled separately. The calibration resample and the test resample
    are drawn together, so an interval covers the threshold's own sampling noise as well.
    -> (point: dict of (C,) arrays, boot: dict of (n_boot, C) arrays or None).
    """
    scores, labels = np.asarray(scores, np.float64), np.asarray(labels) > 0
    masks = [None if m is None else np.asarray(m, bool) for m in (main, calib, test)]
    point = _diagnosis_block(scores, labels, np.ones((1, len(scores))), *masks)
    point = {k: (v[0] if isinstance(v, np.ndarray) else v and {kk: vv[0] for kk, vv in v.items()})
             for k, v in point.items()}
    if n_boot <= 0:
        return point, None
    rng = np.random.default_rng(seed)
    parts = [_diagnosis_block(scores, labels, bootstrap_weights(units, strata, min(block, n_boot - a),
                                                                rng), *masks)
             for a in range(0, n_boot, block)]
    boot = {}
    for k, v in parts[0].items():
        if isinstance(v, np.ndarray):
            boot[k] = np.concatenate([p[k] for p in parts])
        else:
            boot[k] = v and {kk: np.concatenate([p[k][kk] for p in parts]) for kk in v}
    return point, boot

def _nanmean(a, axis):
    with warnings.catch_warnings():  # a class with no finite value gives nan, not a warning
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(a, axis=axis)

def summarize_diagnosis(point, boot, classes, positives, level: float = 0.95) -> dict:
    """diagnosis() output -> {"per_class": {class: {...}}, "macro": {...}} of plain floats.

    Each metric `k` gets `k_ci` = [lo, hi] when boot is given. The macro mean is over the classes
    with a finite value; its interval is the percentile interval of the per-resample macro mean.
    """
    def entry(p, b, j):
        out = {"value": float(_nanmean(p, 0) if j is None else p[j])}
        if b is not None:
            lo, hi = percentile_ci(_nanmean(b, 1) if j is None else b[:, j], level)
            out["ci"] = [float(lo), float(hi)]
        return out

    def block(j):
        m = {}
        for key in ("auc", "auprc"):
            e = entry(point[key], boot and boot[key], j)
            m.update({key: e["value"], **({f"{key}_ci": e["ci"]} if "ci" in e else {})})
        for proto in ("roc_corner", "calibrated"):
            if point.get(proto) is None:
                continue
            m[proto] = {} if j is None else {"threshold": float(point[proto]["threshold"][j])}
            for key in ("acc", "f1", "precision", "recall", "specificity"):
                e = entry(point[proto][key], boot and boot[proto][key], j)
                m[proto].update({key: e["value"], **({f"{key}_ci": e["ci"]} if "ci" in e else {})})
        return m

    per_class = {c: dict(positives=int(positives[j]), **block(j)) for j, c in enumerate(classes)}
    return dict(per_class=per_class, macro=block(None))

# ----------------------------------------------------------------------------- calibration split

_CTRATE_NAME = re.compile(r"^([A-Za-z]+_\d+)_[A-Za-z]+_\d+$")

def patient_id(name: str) -> str:
    """CT-RATE names are {split}_{patient}_{scan}_{recon}: 'valid_12_a_2' -> 'valid_12'.

    Other names (RAD-ChestCT, custom sets) are their own patient.
    """
    m = _CTRATE_NAME.match(str(name))
    return m.group(1) if m else str(name)

def calibration_split(groups, labels, fraction: float, seed: int = 0) -> np.ndarray:
    """Bool mask (N,) of calibration rows: a seeded, group-level (patient) fraction of the rows.

    Patients are stratified by the rarest class they are positive for and sampled systematically
    (every 1/fraction-th patient of the stratum-sorted, shuffled list, random start): the overall
    share is the fraction to within one patient, and each stratum of n patients gives
    floor or ceil of n * fraction of them, so rare classes land in both parts where possible.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"calibration fraction must be in [0, 1), got {fraction}")
    labels = np.asarray(labels) > 0
    uniq, inv = np.unique(np.asarray(groups), return_inverse=True)
    pos = np.zeros((len(uniq), labels.shape[1]), bool)
    np.logical_or.at(pos, inv, labels)  # (P, C): patient positive for class
    rarity = np.where(pos, pos.sum(0)[None, :], len(uniq) + 1)  # patients with no positive: last
    rarest = np.argmin(rarity, 1)  # the stratum: a patient's rarest positive class
    rng = np.random.default_rng(seed)
    order = np.lexsort((rng.random(len(uniq)), rarest, rarity.min(1)))  # by stratum, shuffled within
    calib = np.zeros(len(uniq), bool)
    if fraction > 0:
        picks = np.arange(rng.random() / fraction, len(uniq), 1.0 / fraction).astype(int)
        calib[order[picks]] = True
    return calib[inv]
