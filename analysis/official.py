"""The official BrgSA evaluation procedure, reproduced number for number.

What the official code's bootstrap_evaluation/bootstrap_performance.py and get_metric.py do with a
model's (N, C) scores and labels, so that our results compare with the paper's tables:
1. per class, one threshold on all rows: the distinct score t closest to (FPR, TPR) = (0, 1) for the
   rule `score > t` (TPR = 0 without positives, FPR = 0 without negatives), candidates scanned
   ascending with `<=`, so ties go to the highest threshold; then frozen;
2. 5000 volume-level resamples, resample i drawn by np.random.seed(i) and
   np.random.choice(N, N, replace=True); in each, per class, scikit-learn's AUROC (nan without both
   classes), average precision (0 without a positive: scikit-learn >= 1.1), and at the frozen
   threshold weighted F1, accuracy, precision and recall (zero_division = 0: precision 0 when
   nothing is predicted positive, recall 0 without a positive);
3. per class and metric over the resamples: the mean and the standard deviation (ddof 1) of the
   finite values (pandas), and the 2.5 / 97.5 percentiles (np.percentile, which gives nan when a
   resample was nan); an "Overall" row holds the mean over the classes of each of those four
   (nan-skipping for mean and std as pandas, plain numpy for the percentiles).
Our own procedure (analysis/metrics.py) differs on purpose: thresholds re-picked in every
resample, patient-level resampling, the point estimate as the headline, a calibration split.

    python eval.py --scores S.csv --labels L.csv --bootstrap official
"""
import warnings

import numpy as np

from analysis.metrics import Runs, confusion_at, confusion_metrics, ranked_metrics

METRICS = ("auc", "auprc", "f1", "acc", "precision", "recall")  # the official columns
STATS = ("mean", "std", "lo", "hi")


def official_threshold(scores, labels) -> float:
    """Step 1 above: the distinct score t closest to the ROC corner for `score > t`, the highest on
    ties. With one class only its rate is taken as 0, as the official code does."""
    runs = Runs(scores)
    P, T = runs.sums(np.ones((1, len(scores))), np.asarray(labels).astype(bool))
    cum_p, cum_n = np.cumsum(P[:, 0]), np.cumsum(T[:, 0] - P[:, 0])  # at or below each distinct score
    tpr = 1.0 - cum_p / cum_p[-1] if cum_p[-1] else np.zeros_like(cum_p)
    fpr = 1.0 - cum_n / cum_n[-1] if cum_n[-1] else np.zeros_like(cum_n)
    d = np.square(1.0 - tpr) + np.square(fpr)
    return float(runs.values[len(d) - 1 - np.argmin(d[::-1])])  # the last minimum


def resample_metrics(scores, labels, threshold: float, weights) -> dict:
    """Step 2 for one class: (B, N) draw counts -> {metric: (B,)} as scikit-learn computes them."""
    r = ranked_metrics(scores, labels, weights)
    c = confusion_at(scores, labels, np.full(len(weights), threshold), weights)
    m = confusion_metrics(**c)
    has_pos = c["tp"] + c["fn"] > 0
    return dict(auc=r["auc"], auprc=np.where(has_pos, r["auprc"], 0.0), f1=m["f1"], acc=m["acc"],
                precision=m["precision"], recall=np.where(has_pos, m["recall"], 0.0))


def _stats(samples: np.ndarray) -> dict:
    """Step 3: (n_boot, C) -> {stat: (C,)}."""
    with warnings.catch_warnings():  # a class with no finite value: nan, as pandas gives
        warnings.simplefilter("ignore", RuntimeWarning)
        return dict(mean=np.nanmean(samples, 0), std=np.nanstd(samples, 0, ddof=1),
                    lo=np.percentile(samples, 2.5, axis=0), hi=np.percentile(samples, 97.5, axis=0))


def official_bootstrap(scores, labels, classes, n_boot: int = 5000, block: int = 250) -> dict:
    """Steps 1-3 on (N, C) scores and 0/1 labels -> {"per_class": {class: {metric: {stat}}},
    "overall": {metric: {stat}}, "thresholds": {class: t}, "n": n_boot}."""
    scores, labels = np.asarray(scores, np.float64), np.asarray(labels) > 0
    N, C = scores.shape
    thr = [official_threshold(scores[:, j], labels[:, j]) for j in range(C)]
    samples = {k: np.empty((n_boot, C)) for k in METRICS}
    for a in range(0, n_boot, block):
        draws = []
        for i in range(a, min(a + block, n_boot)):
            np.random.seed(i)  # the official draw, on numpy's global generator
            draws.append(np.bincount(np.random.choice(N, size=N, replace=True), minlength=N))
        w = np.stack(draws).astype(np.float64)  # (B, N) how often each volume was drawn
        for j in range(C):
            for k, v in resample_metrics(scores[:, j], labels[:, j], thr[j], w).items():
                samples[k][a:a + len(w), j] = v
    stats = {k: _stats(v) for k, v in samples.items()}
    per_class = {c: {k: {s: float(stats[k][s][j]) for s in STATS} for k in METRICS}
                 for j, c in enumerate(classes)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        overall = {k: {s: float(np.nanmean(stats[k][s]) if s in ("mean", "std") else
                                np.mean(stats[k][s])) for s in STATS} for k in METRICS}
    return dict(n=n_boot, unit="volume", per_class=per_class, overall=overall,
                thresholds={c: thr[j] for j, c in enumerate(classes)},
                note="official BrgSA procedure: thresholds frozen on all rows, volume resamples "
                     "(seed i); per class the mean, std and 2.5/97.5 percentiles over the "
                     "resamples, Overall = their mean over the classes")


def format_official(result: dict) -> str:
    """Markdown: one row per class and the Overall row, each metric as mean ± std [2.5, 97.5]."""
    names = dict(auc="AUROC", auprc="AUPRC", f1="F1 (weighted)", acc="ACC", precision="Precision",
                 recall="Recall")
    head = "| class | " + " | ".join(names[k] for k in METRICS) + " |"
    lines = [head, "|---" * (len(METRICS) + 1) + "|"]
    for name, m in list(result["per_class"].items()) + [("Overall", result["overall"])]:
        cells = [f"{m[k]['mean']:.4f} ± {m[k]['std']:.4f} [{m[k]['lo']:.3f}, {m[k]['hi']:.3f}]"
                 for k in METRICS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
