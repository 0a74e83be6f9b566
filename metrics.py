"""Evaluation metrics in plain numpy: diagnosis (AUROC, AUPRC, thresholds), bootstrap, retrieval, gap.

No scipy or scikit-learn: every number is computed here and checked in tests/test_metrics.py against
brute-force references. Definitions:

    AUROC = P(s_pos > s_neg) + 1/2 P(s_pos = s_neg)       (Mann-Whitney U / (n_pos n_neg), ties half)
    AUPRC = sum_k (R_k - R_{k-1}) P_k                       (average precision over distinct scores,
                                                             scikit-learn's definition, no interpolation)
    ROC-corner threshold: the operating point closest to (FPR, TPR) = (0, 1) (CT-CLIP's and BrgSA's
    evaluation scripts); predictions are `score > threshold`.

One engine computes all threshold-based numbers: the scores of a class are sorted once and cut into
runs of equal value; a row of weights (how often each volume was drawn) is summed per run, and
cumulative sums give AUROC, AUPRC and the confusion matrix at every candidate threshold. A block of
bootstrap resamples is a (B, N) weight matrix, so 1000 resamples cost a handful of (B, N) array
passes per class; the point estimate is the same computation with all weights 1. Rows outside a
subset (calibration vs test) simply get weight 0.

    python -c "import metrics"   # a library; eval.py is the command line
"""
import re
import warnings

import numpy as np

RETRIEVAL_KS = (1, 5, 10, 50, 100)


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


# ----------------------------------------------------------------------------- single-shot helpers

def auroc(scores, labels) -> float:
    """Area under the ROC curve, ties counted half; nan when only one class is present."""
    return float(ranked_metrics(scores, labels, np.ones((1, len(scores))))["auc"][0])


def auprc(scores, labels) -> float:
    """Average precision (area under the precision-recall step curve); nan without a positive."""
    return float(ranked_metrics(scores, labels, np.ones((1, len(scores))))["auprc"][0])


def roc_corner_threshold(scores, labels) -> float:
    """Threshold whose (FPR, TPR) lies closest to (0, 1); predictions are `score > threshold`.

    Every distinct score is a candidate (the official scripts scan a 0..1 grid, which assumes
    probabilities; cosine scores live in [-1, 1]). Ties in distance go to the lowest threshold.
    """
    return float(ranked_metrics(scores, labels, np.ones((1, len(scores))))["threshold"][0])


def binary_metrics(pred, labels) -> dict:
    """Metrics of fixed 0/1 predictions (see confusion_metrics) as plain floats."""
    pred, y = np.asarray(pred).astype(bool), np.asarray(labels).astype(bool)
    m = confusion_metrics((pred & y).sum(), (pred & ~y).sum(), (~pred & y).sum(), (~pred & ~y).sum())
    return {k: float(v) for k, v in m.items()}


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


# ----------------------------------------------------------------------------- retrieval

def retrieval_metrics(sim, relevant, ks=RETRIEVAL_KS, block: int = 512) -> dict:
    """Recall@K and mean average precision of ranking items by similarity, per query.

    sim (Q, G) similarities, relevant (Q, G) bool. Ties are ranked pessimistically (an item's rank
    counts every item scoring at least as high), so a constant similarity retrieves nothing
    for free. Recall@K: fraction of queries with a relevant item in the top K. Queries without a
    relevant item are left out (counted in n_queries_without_match).
    """
    sim, relevant = np.asarray(sim, np.float64), np.asarray(relevant, bool)
    q, g = np.nonzero(relevant)
    rank = np.empty(len(q), np.int64)
    for a in range(0, len(q), block):  # (block, G) comparisons at a time
        b = slice(a, a + block)
        rank[b] = (sim[q[b]] >= sim[q[b], g[b]][:, None]).sum(1)
    # Precision at each relevant item = (# relevant of its query ranked at or above it) / rank.
    key = q * (sim.shape[1] + 1) + rank
    srt = np.sort(key)
    hits = np.searchsorted(srt, key, "right") - np.searchsorted(srt, q * (sim.shape[1] + 1), "left")
    queries = np.unique(q)
    n_rel = np.bincount(q, minlength=len(sim))[queries]
    ap = np.bincount(q, weights=hits / rank, minlength=len(sim))[queries] / n_rel
    best = np.full(len(sim), np.iinfo(np.int64).max)
    np.minimum.at(best, q, rank)
    best = best[queries]
    out = {f"R@{k}": float(np.mean(best <= k)) if len(queries) else float("nan") for k in ks}
    out.update(mAP=float(ap.mean()) if len(queries) else float("nan"), n_queries=int(len(queries)),
               n_items=int(sim.shape[1]), n_queries_without_match=int(len(sim) - len(queries)))
    return out


# ----------------------------------------------------------------------------- modality gap

def l2_normalize(x):
    x = np.asarray(x, np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def linear_probe_accuracy(a, b, groups=None, seed: int = 0, steps: int = 500, l2: float = 1e-4):
    """Held-out accuracy of logistic regression telling rows of `a` (image) from rows of `b` (text).

    Pairs are split in half by group (a pair's image and text stay on the same side); full-batch
    Nesterov gradient descent with step 1/L, L an upper bound of the loss curvature. 0.5 means the
    two modalities are linearly indistinguishable, 1.0 that a hyperplane separates them.
    """
    n = len(a)
    groups = np.arange(n) if groups is None else np.asarray(groups)
    uniq, inv = np.unique(groups, return_inverse=True)
    if len(uniq) < 2:
        return float("nan")
    train_g = np.random.default_rng(seed).permutation(len(uniq))[: len(uniq) // 2]
    train = np.isin(inv, train_g)
    x = np.vstack([a, b])
    y = np.r_[np.zeros(n), np.ones(n)]
    tr, te = np.r_[train, train], ~np.r_[train, train]
    mu = x[tr].mean(0)
    x = np.hstack([x - mu, np.ones((2 * n, 1))])  # centred, bias column
    lipschitz = 0.25 * np.mean((x[tr] ** 2).sum(1)) + l2
    w = z = np.zeros(x.shape[1])
    for k in range(steps):
        p = 1.0 / (1.0 + np.exp(-np.clip(x[tr] @ z, -50, 50)))
        w_next = z - (x[tr].T @ (p - y[tr]) / tr.sum() + l2 * z) / lipschitz
        z = w_next + k / (k + 3) * (w_next - w)
        w = w_next
    return float(np.mean((x[te] @ w > 0) == (y[te] > 0.5)))


def modality_gap(a, b, groups=None, seed: int = 0) -> dict:
    """Gap between paired embeddings a_i (image) and b_i (text), on L2-normalised rows.

    centroid_distance: || mean(a_n) - mean(b_n) || (Liang et al. 2022, "Mind the Gap");
    true_pair_cos: mean cos(a_i, b_i); random_pair_cos: mean cos(a_i, b_j) over every pair of
    different groups (exactly the expectation of a random pairing, computed from group sums in
    O(N d), no N x N matrix); probe_acc: linear_probe_accuracy.
    """
    an, bn = l2_normalize(a), l2_normalize(b)
    n = len(an)
    groups = np.arange(n) if groups is None else np.asarray(groups)
    _, inv = np.unique(groups, return_inverse=True)
    sa, sb = np.zeros((inv.max() + 1, an.shape[1])), np.zeros((inv.max() + 1, an.shape[1]))
    np.add.at(sa, inv, an)
    np.add.at(sb, inv, bn)
    sizes = np.bincount(inv)
    same_sum = np.einsum("gd,gd->", sa, sb)  # sum of cos over pairs inside a group (true pairs too)
    n_other = n * n - (sizes ** 2).sum()
    other = (an.sum(0) @ bn.sum(0) - same_sum) / n_other if n_other else float("nan")
    return dict(centroid_distance=float(np.linalg.norm(an.mean(0) - bn.mean(0))),
                true_pair_cos=float(np.einsum("nd,nd->n", an, bn).mean()),
                random_pair_cos=float(other),
                probe_acc=linear_probe_accuracy(an, bn, groups, seed))
