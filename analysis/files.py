"""What eval.py writes and reads besides checkpoints: the tables it prints, eval.json, metrics.csv,
scores.csv / labels.csv (re-evaluable), the plots, and the score-file mode's CSVs.

    python eval.py --scores S.csv --labels L.csv --out_dir D    # evaluate precomputed scores
"""
import argparse
import csv
import io
import json
import math
from pathlib import Path

import numpy as np

from analysis.metrics import THRESHOLDED, evaluate_scores, roc_curve
from prepare.files import atomic_write, write_text


class DefaultsHelp(argparse.RawTextHelpFormatter):
    """eval.py --help: the description as written, each flag followed by its default unless its
    help already states it."""

    def _get_help_string(self, action):
        text, default = action.help or "", action.default
        if default == argparse.SUPPRESS or "default" in text:
            return text
        return f"{text} (default: {'empty' if default == '' else default})"


# ----------------------------------------------------------------------------- score files in

def read_score_csv(path) -> tuple:
    """CSV with the volume name first and one column per class -> (names, classes, (N, C) array)."""
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.reader(f))
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e})") from None
    if len(rows) < 2:
        raise ValueError(f"{path}: expected a header and at least one row")
    header, body = rows[0], rows[1:]
    short = next((i for i, r in enumerate(body) if len(r) != len(header)), None)
    if short is not None:
        raise ValueError(f"{path}: row {short + 2} has {len(body[short])} fields, "
                         f"the header has {len(header)}")
    try:
        values = np.array([[float(x) for x in r[1:]] for r in body], dtype=np.float64)
    except ValueError as e:
        raise ValueError(f"{path}: non-numeric value ({e})") from None
    names = [r[0] for r in body]
    if all(_is_number(x) for x in names):
        raise ValueError(f"{path}: the first column ({header[0]!r}) holds numbers, not volume names; "
                         f"expected the volume name first, then one column per class")
    dup = sorted({n for n in names if names.count(n) > 1}) if len(set(names)) < len(names) else []
    if dup:
        raise ValueError(f"{path}: duplicate volume names, e.g. {dup[:3]}")
    if not np.isfinite(values).all():
        raise ValueError(f"{path}: NaN or inf values")
    return names, header[1:], values


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def evaluate_score_files(scores_csv, labels_csv, **options) -> dict:
    """Score-file mode: rows matched by volume name, columns by class name (any order); options go
    to analysis.metrics.evaluate_scores."""
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
    bad = ~np.isin(labels, (0.0, 1.0))
    if bad.any():
        i, j = np.argwhere(bad)[0]
        raise ValueError(f"{labels_csv}: label {labels[i, j]:g} for {s_names[i]!r}, class "
                         f"{s_classes[j]!r}; expected 0 or 1 ({int(bad.sum())} such values)")
    result = evaluate_scores(scores, labels, s_classes, s_names, **options)
    result["source"] = dict(scores=str(scores_csv), labels=str(labels_csv))
    if len(l_names) > len(s_names):
        result["notes"].append(f"{len(l_names) - len(s_names)} labelled volumes of {labels_csv} "
                               f"have no score and are not evaluated")
    return result


def read_thresholds(path, protocol: str) -> dict:
    """{lower-cased class: calibrated threshold} from an eval.json made with the same protocol."""
    try:
        saved = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read the eval.json ({e})") from None
    made = (saved.get("protocol") or {}).get("name")
    if made != protocol:
        raise ValueError(f"{path}: thresholds were picked under protocol {made!r}, not {protocol!r}")
    return {c.lower(): m["calibrated"]["threshold"] for c, m in saved["per_class"].items()
            if (m.get("calibrated") or {}).get("threshold") is not None}

# ----------------------------------------------------------------------------- tables

def fmt(x, digits=3):
    return "  —  " if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def format_table(result: dict) -> str:
    """Markdown: one row per class and the macro mean; retrieval and gap tables when present.

    opt = ROC-corner threshold picked on the evaluated rows (optimistic), cal = threshold picked on
    the calibration rows and scored on the test rows (see result["rows"])."""
    has_cal = any(m.get("calibrated") for m in result["per_class"].values())
    protos = ("roc_corner", "calibrated") if has_cal else ("roc_corner",)
    heads = [f"{p} {k}" for p in ("opt", "cal")[:len(protos)]
             for k in ("ACC", "F1", "Prec", "Rec", "Spec")]
    lines = [f"| {'abnormality':34s} |  pos | {'AUROC [95% CI]':20s} | AUPRC | "
             + " | ".join(heads) + " |",
             f"|{'-' * 36}|------|{'-' * 22}|-------|"
             + "|".join("-" * (len(h) + 2) for h in heads) + "|"]

    def row(name, pos, m):
        ci = m.get("auc_ci") if not math.isnan(m["auc"]) else None
        auc = fmt(m["auc"]) + (f" [{fmt(ci[0])}, {fmt(ci[1])}]" if ci else "")
        cells = [f"{fmt(m.get(p, {}).get(k)):>{len(h)}s}" for p in protos
                 for k, h in zip(THRESHOLDED, heads)]
        return (f"| {name:34s} | {pos:>4} | {auc:20s} | {fmt(m['auprc'])} | "
                + " | ".join(cells) + " |")

    for name, m in result["per_class"].items():
        lines.append(row(name, m["positives"], m))
    lines.append(row("macro mean", "", result["macro"]))
    rows = result.get("rows", {})
    lines.append("opt = ROC-corner threshold picked on the evaluated rows (optimistic)" + (
        f"; cal = picked on {rows.get('n_calib')} calibration volumes, scored on "
        f"{rows.get('n_test')} test volumes" if has_cal else ""))
    if result.get("retrieval"):
        first = next(iter(result["retrieval"].values()))["volume_to_report"]
        ks = [k for k in first if k.startswith("R@")]
        lines += ["", "| similarity | direction        | " + " | ".join(f"{k:>5s}" for k in ks)
                  + " |  mAP  |",
                  "|------------|------------------|" + "|".join("-------" for _ in ks) + "|-------|"]
        for space, d in result["retrieval"].items():
            for direction, m in d.items():
                lines.append(f"| {space:10s} | {direction:16s} | " + " | ".join(fmt(m[k]) for k in ks)
                             + f" | {fmt(m['mAP'])} |")
    if result.get("modality_gap"):
        lines += ["", "| embeddings          | centroid dist | cos true pairs | cos random pairs "
                  "| probe acc |", "|---------------------|---------------|----------------|"
                  "------------------|-----------|"]
        for space, m in result["modality_gap"].items():
            label = "raw (v, t)" if space == "raw" else "bank (v_hat, t_hat)"
            lines.append(f"| {label:19s} | {fmt(m['centroid_distance']):>13s} | "
                         f"{fmt(m['true_pair_cos']):>14s} | {fmt(m['random_pair_cos']):>16s} | "
                         f"{fmt(m['probe_acc']):>9s} |")
    return "\n".join(lines)


def print_scan(volume, scores: dict, thresholds: dict, protocol: str):
    """Single-scan mode's table: each finding's score and, given calibrated thresholds, its call."""
    kind = "cosine score, not a probability" if protocol == "brgsa" else "P(present)"
    print(f"| {'finding':34s} |  score  | calibrated call |\n"
          f"|{'-' * 36}|---------|-----------------|")
    for f, s in scores.items():
        thr = thresholds.get(f.lower())
        call = "—" if thr is None else f"{'positive' if s > thr else 'negative'} (> {thr:+.3f})"
        print(f"| {f:34s} | {s:+.4f} | {call:15s} |")
    print(f"{volume}: {protocol} protocol ({kind})" + (
        "" if thresholds else "; give --thresholds eval.json for calibrated calls"))

# ----------------------------------------------------------------------------- files out

def jsonable(x):
    """nan -> null (strict JSON), numpy scalars -> Python numbers."""
    if isinstance(x, dict):
        return {k: jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, (float, np.floating)):
        return None if math.isnan(x) else float(x)
    return x.item() if isinstance(x, np.generic) else x


def writable_dir(path, flag: str) -> Path:
    """Create `path` if needed and prove it takes a file; a clear error names the flag otherwise."""
    out = Path(path)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write_test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ValueError(f"{flag} {out}: cannot write there ({e.strerror or e})") from None
    return out


def csv_text(header, rows) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    return buf.getvalue()


def metrics_rows(result: dict):
    """Flat per-class rows (and the macro row) for metrics.csv: every number with its interval."""
    cols = ["auc", "auprc"] + [f"{p}_{k}" for p in ("roc_corner", "calibrated") for k in THRESHOLDED]
    header = ["class", "positives", "threshold_roc_corner", "threshold_calibrated"]
    header += [x for c in cols for x in (c, f"{c}_lo", f"{c}_hi")]
    rows = []
    for name, m in list(result["per_class"].items()) + [("macro mean", result["macro"])]:
        flat = {k: m.get(k) for k in ("auc", "auprc", "auc_ci", "auprc_ci")}
        for p in ("roc_corner", "calibrated"):
            for k, v in (m.get(p) or {}).items():
                flat[f"{p}_{k}"] = v
        cells = [name, m.get("positives", ""), flat.get("roc_corner_threshold", ""),
                 flat.get("calibrated_threshold", "")]
        for c in cols:
            ci = flat.get(f"{c}_ci") or ["", ""]
            cells += [flat.get(c, ""), *ci]
        rows.append(["" if isinstance(x, float) and math.isnan(x) else x for x in cells])
    return header, rows


def write_result(result: dict, out_dir, plots: bool = False) -> Path:
    """eval.json (everything but the raw arrays), metrics.csv, and with the arrays: scores.csv,
    labels.csv (re-evaluable with --scores/--labels), roc_curves.png and modality_gap.png."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    arrays = result.get("arrays")
    summary = {k: v for k, v in result.items() if k != "arrays"}
    path = out / "eval.json"
    write_text(path, json.dumps(jsonable(summary), indent=2))
    write_text(out / "metrics.csv", csv_text(*metrics_rows(result)))
    if arrays is not None:
        # repr: the shortest text that reads back to the same float, so files re-evaluate exactly
        for fname, key, text in (("scores.csv", "scores", lambda x: repr(float(x))),
                                 ("labels.csv", "labels", str)):
            rows = [[n] + [text(x) for x in r] for n, r in zip(arrays["names"], arrays[key])]
            write_text(out / fname, csv_text(["VolumeName"] + list(result["classes"]), rows))
        if plots:
            write_plots(result, out)
    return path


def write_plots(result: dict, out: Path) -> list:
    """ROC curve per class with both operating points, and the 2-D PCA of the modality gap.

    matplotlib is optional: without it the plots are skipped with a message."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("eval: matplotlib is not installed, skipping the plots (pip install matplotlib)")
        return []
    a, classes = result["arrays"], result["classes"]
    cols = min(6, len(classes))
    n_rows = -(-len(classes) // cols)
    fig, axes = plt.subplots(n_rows, cols, figsize=(2.6 * cols, 2.6 * n_rows), squeeze=False)
    for ax in axes.flat[len(classes):]:
        ax.axis("off")
    for j, (c, ax) in enumerate(zip(classes, axes.flat)):
        main, s, y = a["main_rows"], a["scores"][:, j], a["labels"][:, j]
        fpr, tpr = roc_curve(s[main], y[main])
        ax.plot(fpr, tpr, lw=1.2)
        ax.plot([0, 1], [0, 1], ":", color="grey", lw=0.8)
        m = result["per_class"][c]
        for proto, rows, marker in (("roc_corner", main, "o"), ("calibrated", ~a["calib_rows"], "s")):
            ok = m.get(proto) and math.isfinite(m[proto]["threshold"])
            if ok and 0 < y[rows].sum() < rows.sum():
                pred = s[rows] > m[proto]["threshold"]
                ax.plot((pred & (y[rows] == 0)).sum() / (y[rows] == 0).sum(),
                        (pred & (y[rows] == 1)).sum() / y[rows].sum(), marker, ms=5, label=proto)
        ax.set_title(f"{c[:28]}\nAUROC {fmt(m['auc'])}", fontsize=7)
        ax.tick_params(labelsize=6)
    axes.flat[0].legend(fontsize=6, loc="lower right")
    fig.suptitle("ROC per class (x FPR, y TPR): roc_corner = threshold picked on the evaluated rows "
                 "(optimistic), calibrated = frozen threshold on the test rows", fontsize=8)
    fig.tight_layout()
    written = [out / "roc_curves.png"]
    atomic_write(written[0], lambda f: fig.savefig(f, format="png", dpi=110))
    plt.close(fig)
    if "gap_points" in a:
        fig, axes = plt.subplots(1, 2, figsize=(9, 4.6))
        for ax, (space, (vi, ti)) in zip(axes, a["gap_points"].items()):
            x = np.vstack([vi, ti])
            x = x - x.mean(0)
            xy = x @ np.linalg.svd(x, full_matrices=False)[2][:2].T  # joint 2-D PCA of both modalities
            # Same scale in both panels (unit-norm rows): the shrinking of the gap is seen, not rescaled.
            ax.set(xlim=(-1.05, 1.05), ylim=(-1.05, 1.05), aspect="equal")
            ax.scatter(*xy[:len(vi)].T, s=6, alpha=0.6, label="image")
            ax.scatter(*xy[len(vi):].T, s=6, alpha=0.6, label="text")
            g = result["modality_gap"][space]
            ax.set_title(f"{'v, t' if space == 'raw' else 'v_hat, t_hat'}: centroid distance "
                         f"{fmt(g['centroid_distance'])}, probe {fmt(g['probe_acc'])}", fontsize=8)
            ax.legend(fontsize=7)
        fig.tight_layout()
        written.append(out / "modality_gap.png")
        atomic_write(written[-1], lambda f: fig.savefig(f, format="png", dpi=110))
        plt.close(fig)
    return written
