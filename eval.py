"""Zero-shot diagnosis: score every CT against every abnormality written as text, and measure it.

Protocol of the paper (section 3, "zero-shot"): the prompt for class c is "There is {c}" (lower-cased
by the tokenizer, as training text is), its embedding t_c is computed once, and

    Score(V, c) = 1/2 [cos(v, t_c) + cos(v_hat, t_c)],   v_hat = CMKI(v) through the knowledge bank.

Metrics per class and their macro mean: AUROC (rank statistic, ties counted half), and ACC, weighted
F1 and precision of the positive class at the ROC-corner threshold (the operating point closest to
(FPR, TPR) = (0, 1), as CT-CLIP's and BrgSA's evaluation scripts choose it; it is picked on the
evaluated set itself, so these three numbers are optimistic).

    python eval.py --ckpt out/ckpt.pt --data data_synth/dataset --split valid --out_dir out
    python eval.py --scores S.csv --labels L.csv --out_dir D        # precomputed scores
"""
import argparse
import csv
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch

import cmki
import data as data_lib
from model import BrgSA, ModelConfig

PROMPT = "There is {}"  # the paper's zero-shot prompt, shared with nothing else in training


# ----------------------------------------------------------------------------- metrics

def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve = P(score of a positive > score of a negative) + 1/2 P(tie).

    Computed from average ranks (Mann-Whitney U); nan when only one class is present.
    """
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels).astype(bool)
    n_pos, n_neg = labels.sum(), (~labels).sum()
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    ranks = np.empty(len(scores))
    # Average rank within each run of tied scores (1-based ranks).
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_scores)) + 1]
    ends = np.r_[starts[1:], len(scores)]
    avg = (starts + ends + 1) / 2.0
    ranks[order] = np.repeat(avg, ends - starts)
    u = ranks[labels].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def roc_corner_threshold(scores: np.ndarray, labels: np.ndarray) -> float:
    """Threshold whose (FPR, TPR) lies closest to the ROC corner (0, 1); predictions are score > thr.

    Every distinct score is tried (the official scripts scan a 0..1 grid, which assumes
    probabilities; BrgSA's cosine scores live in [-1, 1], so an exact scan is used instead).
    """
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels).astype(bool)
    cand = np.unique(scores)
    cand = np.r_[cand[0] - 1.0, cand]  # the "everything positive" threshold as well
    pred = scores[None, :] > cand[:, None]  # (T, N)
    tpr = (pred & labels).sum(1) / max(labels.sum(), 1)
    fpr = (pred & ~labels).sum(1) / max((~labels).sum(), 1)
    dist = np.hypot(1.0 - tpr, fpr)
    return float(cand[np.argmin(dist)])


def binary_metrics(pred: np.ndarray, labels: np.ndarray) -> dict:
    """ACC, weighted F1 (F1 of each class weighted by its support) and precision of the positives."""
    pred, labels = np.asarray(pred).astype(bool), np.asarray(labels).astype(bool)
    tp, fp = (pred & labels).sum(), (pred & ~labels).sum()
    fn, tn = (~pred & labels).sum(), (~pred & ~labels).sum()

    def f1(tp_, fp_, fn_):
        return 2 * tp_ / (2 * tp_ + fp_ + fn_) if tp_ + fp_ + fn_ else 0.0

    n = len(labels)
    f1_w = (f1(tp, fp, fn) * (tp + fn) + f1(tn, fn, fp) * (tn + fp)) / n
    return dict(acc=float((tp + tn) / n), f1=float(f1_w),
                precision=float(tp / (tp + fp)) if tp + fp else 0.0,
                recall=float(tp / (tp + fn)) if tp + fn else float("nan"),
                specificity=float(tn / (tn + fp)) if tn + fp else float("nan"))


def evaluate_scores(scores: np.ndarray, labels: np.ndarray, classes: list) -> dict:
    """(N, C) scores and 0/1 labels -> per-class and macro metrics (the eval.json layout)."""
    per_class = {}
    for j, name in enumerate(classes):
        s, y = scores[:, j], labels[:, j]
        m = dict(auc=auroc(s, y), positives=int(y.sum()))
        if 0 < y.sum() < len(y):
            thr = roc_corner_threshold(s, y)
            m.update(threshold=thr, **binary_metrics(s > thr, y))
        per_class[name] = m
    result = dict(n_volumes=int(len(scores)), classes=list(classes), per_class=per_class)
    for key in ("auc", "acc", "f1", "precision"):
        vals = [m[key] for m in per_class.values() if key in m and not math.isnan(m[key])]
        result[f"macro_{key}"] = float(np.mean(vals)) if vals else float("nan")
    result["auc"] = {name: m["auc"] for name, m in per_class.items()}
    return result


def format_table(result: dict) -> str:
    lines = [f"| {'abnormality':34s} |  pos | AUROC |  ACC  |  F1   | Prec  |",
             f"|{'-' * 36}|------|-------|-------|-------|-------|"]
    for name, m in result["per_class"].items():
        cells = [f"{m.get(k, float('nan')):.3f}" for k in ("auc", "acc", "f1", "precision")]
        lines.append(f"| {name:34s} | {m['positives']:4d} | " + " | ".join(cells) + " |")
    cells = [f"{result[f'macro_{k}']:.3f}" for k in ("auc", "acc", "f1", "precision")]
    lines.append(f"| {'macro mean':34s} |      | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_result(result: dict, out_dir) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "eval.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2))
    tmp.replace(path)
    return path


# ----------------------------------------------------------------------------- embeddings

@torch.no_grad()
def embed_texts(model: BrgSA, tokenizer, texts: list, device) -> torch.Tensor:
    ids, mask = data_lib.tokenize(tokenizer, texts, model.cfg.max_len)
    return model.text(ids.to(device), mask.to(device)).float()  # (C, d)


@torch.no_grad()
def embed_volumes(model: BrgSA, loader, device, log_every: int = 0):
    """-> v (N, d) float32 on device, labels (N, C) numpy, names list."""
    vs, labels, names = [], [], []
    for i, batch in enumerate(loader):
        with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
            vs.append(model.visual(batch["volume"].to(device, non_blocking=True)).float())
        labels.append(batch["labels"].numpy())
        names += list(batch["name"])
        if log_every and (i + 1) % log_every == 0:
            print(f"eval: embedded {len(names)} volumes", flush=True)
    return torch.cat(vs), np.concatenate(labels), names


def zero_shot(model: BrgSA, tokenizer, loader, classes: list, device) -> dict:
    """The paper's protocol on every volume of loader; prompts are embedded once."""
    model.eval()
    t = embed_texts(model, tokenizer, [PROMPT.format(c) for c in classes], device)
    v, labels, names = embed_volumes(model, loader, device)
    scores = cmki.zero_shot_scores(v, t, model.bank.weight.float(), model.scale).cpu().numpy()
    result = evaluate_scores(scores, labels, classes)
    result["prompt"] = PROMPT
    return result


# ----------------------------------------------------------------------------- command line

def load_checkpoint(path, device):
    """-> (model, tokenizer, checkpoint dict); weights_only loading, clear error on mismatch."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("model", "model_config", "tokenizer"):
        if key not in ckpt:
            raise ValueError(f"{path}: not a BrgSA checkpoint (missing '{key}')")
    cfg = ModelConfig(**{k: tuple(v) if isinstance(v, list) else v
                         for k, v in ckpt["model_config"].items()})
    model = BrgSA(cfg)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise ValueError(f"{path}: weights do not match the stored config: {e}") from None
    return model.to(device).eval(), data_lib.tokenizer_from_string(ckpt["tokenizer"]), ckpt


def read_score_csv(path) -> tuple:
    """CSV with the volume name first and one column per class -> (names, classes, (N, C) array)."""
    path = Path(path)
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    if len(rows) < 2:
        raise ValueError(f"{path}: expected a header and at least one row")
    header, body = rows[0], rows[1:]
    try:
        values = np.array([[float(x) for x in r[1:]] for r in body], dtype=np.float64)
    except ValueError as e:
        raise ValueError(f"{path}: non-numeric value ({e})") from None
    return [r[0] for r in body], header[1:], values


def evaluate_score_files(scores_csv, labels_csv) -> dict:
    """Score-file mode: rows matched by volume name, columns by class name (any order)."""
    s_names, s_classes, scores = read_score_csv(scores_csv)
    l_names, l_classes, labels = read_score_csv(labels_csv)
    missing = [c for c in s_classes if c not in l_classes]
    if missing:
        raise ValueError(f"{labels_csv}: no label column for classes {missing}")
    row = {n: i for i, n in enumerate(l_names)}
    unknown = [n for n in s_names if n not in row]
    if unknown:
        raise ValueError(f"{labels_csv}: {len(unknown)} volumes of {scores_csv} have no labels, "
                         f"e.g. {unknown[:3]}")
    idx = np.array([row[n] for n in s_names])
    labels = labels[idx][:, [l_classes.index(c) for c in s_classes]]
    return evaluate_scores(scores, labels, s_classes)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--ckpt", help="checkpoint written by train.py (model, config and tokenizer)")
    p.add_argument("--data", help="data set: a CT-RATE-layout root or a preprocessed directory")
    p.add_argument("--split", default="valid", help="which split of --data to evaluate")
    p.add_argument("--out_dir", default="out", help="where eval.json is written")
    p.add_argument("--scores", help="score-file mode: CSV of precomputed per-volume scores")
    p.add_argument("--labels", help="score-file mode: CSV of 0/1 labels, matched by name")
    p.add_argument("--batch_size", type=int, default=8, help="volumes per forward pass")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    args = p.parse_args(argv)
    if args.scores or args.labels:
        if not (args.scores and args.labels):
            p.error("--scores and --labels go together")
        result = evaluate_score_files(args.scores, args.labels)
    else:
        if not (args.ckpt and args.data):
            p.error("give --ckpt and --data (or --scores and --labels)")
        device = torch.device(("cuda" if torch.cuda.is_available() else "cpu")
                              if args.device == "auto" else args.device)
        model, tokenizer, _ = load_checkpoint(args.ckpt, device)
        records = data_lib.load_dataset(args.data, args.split, model.cfg)
        loader = data_lib.eval_loader(records, args.batch_size)
        result = zero_shot(model, tokenizer, loader, data_lib.CTRATE_CLASSES, device)
    print(format_table(result))
    print(f"macro AUROC {result['macro_auc']:.4f} over {len(result['auc'])} classes, "
          f"{result['n_volumes']} volumes; eval.json -> {write_result(result, args.out_dir)}")
    return result


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"eval.py: error: {e}")
