"""Retrieval and the modality gap: how close the two modalities' embeddings sit, raw and through the bank.

With report texts beside the volumes, eval.py reports report -> volume and volume -> report
Recall@{1,5,10,50,100} and mAP in three similarity spaces (cos(v, t): L_INFO's; cos(v_hat, t_hat):
L_INFO-R's; and the zero-shot rule), and the modality gap of the raw (v, t) and the bank-mapped
(v_hat, t_hat) pairs: centroid distance (Liang et al. 2022, "Mind the Gap"), true vs random pair
cosine, and how well a linear probe tells the modalities apart. The paper's claim is that the bank
narrows this gap.

    python -c "import analysis.retrieval"   # a library; eval.py is the command line
"""
import numpy as np
import torch

import cmki
from model import BrgSA
from prepare import summarize

RETRIEVAL_KS = (1, 5, 10, 50, 100)


def report_texts(reports: list, summaries: dict = None) -> list:
    """The text each volume's report is embedded as: its summary sentences joined (as training
    sees them at evaluation), or the raw report when it has no summary."""
    out, summaries = [], dict(summaries or {})
    for r in reports:
        if r not in summaries:
            try:
                summaries[r] = summarize.summarize(r)
            except ValueError:  # empty report: nothing to summarise
                summaries[r] = []
        sents = [s for s in summaries[r] if s and s.strip()]
        out.append(" ".join(sents) if sents else r)
    return out


@torch.no_grad()
def retrieval_and_gap(model: BrgSA, v: torch.Tensor, t: torch.Tensor, report_ids, seed=0):
    """Report <-> volume retrieval in three similarity spaces and the modality gap of (v, t) and
    (v_hat, t_hat). v (N, d) one row per volume; t (R, d) one row per unique report text;
    report_ids (N,) the report row of each volume (reconstructions share a report)."""
    bank = model.bank.weight.float()
    v_hat, t_hat = cmki.cmki(v, bank, model.scale), cmki.cmki(t, bank, model.scale)
    spaces = {"raw": cmki.cosine_scores(v, t),                    # cos(v, t): L_INFO's space
              "bank": cmki.cosine_scores(v_hat, t_hat),           # cos(v_hat, t_hat): L_INFO-R's
              "score": model.zero_shot_scores(v, t)}  # the zero-shot rule
    report_ids = np.asarray(report_ids)
    relevant = report_ids[:, None] == np.arange(len(t))[None, :]  # (N, R)
    retrieval = {k: dict(volume_to_report=retrieval_metrics(s.cpu().numpy(), relevant),
                         report_to_volume=retrieval_metrics(s.cpu().numpy().T, relevant.T))
                 for k, s in spaces.items()}
    # Volumes sharing a report text form one group: their pairs are not "random", and the probe
    # never sees the same text on both sides of its train / test split.
    pairs = {"raw": (v, t[report_ids]), "bank": (v_hat, t_hat[report_ids])}
    gap = {k: modality_gap(a.cpu().numpy(), b.cpu().numpy(), report_ids, seed)
           for k, (a, b) in pairs.items()}
    points = {k: (l2_normalize(a.cpu().numpy()), l2_normalize(b.cpu().numpy()))
              for k, (a, b) in pairs.items()}
    return retrieval, gap, points


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
