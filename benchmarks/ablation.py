"""Does the knowledge bank help? BrgSA against its ablations, over seeds, on two data sets.

    python benchmarks/ablation.py --reports REPORTS.csv    # 4 methods x 3 seeds x 2 sets (~1 h on 2 cores)
    python benchmarks/ablation.py --sets synthetic --seeds 0 --methods brgsa clip   # one pair
    python benchmarks/ablation.py --preset small --sets synthetic --methods brgsa clip --seeds 0 1
    python benchmarks/ablation.py --sets real_text --reports REPORTS.csv --folds 5  # 5-fold real text
    python benchmarks/ablation.py --merge a.csv b.csv    # one table from runs made in parallel

REPORTS.csv: the 400 real chest-CT reports with the 18 labels of CT-CLIP's text classifier data
(github.com/ibrahimethemhamamci/CT-CLIP, CC BY-NC-SA 4.0): report_text and one 0/1 column per label.

Methods (cmki.METHODS, train.py --method): brgsa (alpha L_MSE + beta L_INFO + gamma L_INFO-R, score
1/2 [cos(v, t) + cos(v_hat, t)]), clip (beta L_INFO only, score cos(v, t): plain contrastive
alignment), no_mse (alpha = 0), no_info_r (gamma = 0). Everything else is train.py's default
recipe, so each row differs from brgsa in the objective (and, for clip, the score) only.

Data sets: synthetic = the default's 1000 synthetic scans with template reports (seed 0's set for
every run; --seed changes the model's init, the data order and the validation split);
real_text = synthetic scans drawn from the labels of the 400 shared real chest-CT reports, each
paired with its real report text (prepare/phantom.py --reports): 320 train, 80 held out, whose
scans are drawn from the labels of reports never trained on; with --folds K, each of the K folds
holds out its own block of 400 / K reports (prepare/phantom.py --fold), and a row's spread is over
seeds and folds together. --preset picks the model and training recipe (train.py --preset) and the
stored voxel size of the generated sets (prepare/phantom.py --voxels).

Per run: held-out macro AUROC under both protocols (paper: one prompt per class; CT-CLIP: present
vs not present), the modality gap of the raw (v, t) and bank-mapped (v_hat, t_hat) pairs on the
held-out set, and a linear probe on v (ridge regression on the training volumes' embeddings with
their labels, scored on the held-out volumes): what the image encoder holds, the ceiling a
zero-shot score could reach with a perfect text side. Writes <out>.csv (one row per run), <out>.md
(the table, also printed) and, with matplotlib installed, <out>.png.
"""
import argparse
import csv
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cmki  # noqa: E402
import data as data_lib  # noqa: E402
import eval as eval_lib  # noqa: E402
import train  # noqa: E402
from model import PRESETS  # noqa: E402
from prepare import phantom  # noqa: E402
from prepare.inputs import training_inputs  # noqa: E402
from prepare.preprocess import ensure_cache  # noqa: E402

def data_set(name: str, work: Path, reports_csv: Path, preset: str = "tiny", fold=None,
             folds: int = 5) -> Path:
    """The raw CT-RATE-layout root of a data set, generated (and preprocessed) once under work:
    work/<name>[_fold<k>][_small]/dataset, stored finer than the preset's grid."""
    voxels = "small" if preset == "small" else "tiny"
    folder = work / f"{name}{'' if fold is None else f'_fold{fold}'}{'' if voxels == 'tiny' else '_' + voxels}"
    root = folder / "dataset"
    if not root.is_dir():
        if name == "synthetic":
            phantom.generate(folder, n=1000, seed=0, voxels=voxels)
        else:
            phantom.generate(folder, seed=0, reports_csv=reports_csv, voxels=voxels, fold=fold, folds=folds)
    for split in ("train", "valid"):  # into <root>/../cache_<preset>, which train.py then reuses
        ensure_cache(root, split, PRESETS[preset])
    return root


@torch.no_grad()
def linear_probe(model, train_recs, held_out, ridge: float = 1.0) -> float:
    """Macro AUROC on the held-out volumes of a ridge regression from v to the labels, fitted on
    the training volumes (standardised embeddings, one output per class, closed form)."""
    model.eval()
    cpu = torch.device("cpu")
    (a, ya, _), (b, yb, _) = (eval_lib.embed_volumes(model, data_lib.eval_loader(r, 64), cpu)
                              for r in (train_recs, held_out))
    a, b = a.double().numpy(), b.double().numpy()
    mu, sd = a.mean(0), a.std(0) + 1e-8
    xa, xb = (a - mu) / sd, (b - mu) / sd
    xa, xb = np.c_[xa, np.ones(len(xa))], np.c_[xb, np.ones(len(xb))]
    w = np.linalg.solve(xa.T @ xa + ridge * np.eye(xa.shape[1]), xa.T @ np.asarray(ya, np.float64))
    scores, yb = xb @ w, np.asarray(yb)
    aucs = [eval_lib.auroc(scores[:, j], yb[:, j]) for j in range(yb.shape[1])
            if 0 < yb[:, j].sum() < len(yb)]
    return float(np.mean(aucs))


def one_run(set_name: str, root: Path, method: str, seed: int, out: Path, preset: str = "tiny",
            fold=None) -> dict:
    """train.py's recipe of `preset` with --method and --seed on root -> one CSV row."""
    t0 = time.time()
    tag = f"{set_name}{'' if fold is None else f'_fold{fold}'}{'' if preset == 'tiny' else '_' + preset}"
    run_dir = out / f"{tag}_{method}_seed{seed}"
    args = [f"--data={root}", f"--preset={preset}", f"--method={method}", f"--seed={seed}",
            f"--out_dir={run_dir}", "--log_interval=100",
            "--resume=auto"]  # a rerun continues a crashed run, re-scores a done one
    result = train.main(args)
    model, _, ckpt = eval_lib.load_checkpoint(run_dir / "best.pt", torch.device("cpu"))
    cfg = train.parse_args(args)  # the run's own splits, summaries cached in run_dir, its tokenizer
    inputs = training_inputs(cfg, model.cfg, 0, ckpt["tokenizer"], log=lambda *a: None)
    fit, held_out = inputs.train, inputs.held_out
    gap = result.get("modality_gap", {})
    row = dict(set=set_name, preset=preset, fold="" if fold is None else fold, method=method, seed=seed,
               macro_auc=result["macro_auc"], macro_auc_ctclip=result["macro_auc_ctclip_protocol"],
               probe_auc=linear_probe(model, fit, held_out), selected_step=result["selected_step"],
               steps=result["step"], seconds=round(time.time() - t0, 1))
    for space in ("raw", "bank"):
        for k in ("centroid_distance", "true_pair_cos", "random_pair_cos"):
            row[f"{space}_{k}"] = gap.get(space, {}).get(k, float("nan"))
    return row


def mean_sd(xs) -> str:
    xs = [x for x in xs if x == x]
    if not xs:
        return "n/a"
    return f"{statistics.mean(xs):.3f} ± {statistics.stdev(xs):.3f}" if len(xs) > 1 else f"{xs[0]:.3f}"


def table(rows: list) -> str:
    head = ("| data set | preset | method | runs (seeds x folds) | macro AUROC (paper protocol) | macro AUROC (CT-CLIP protocol) "
            "| linear probe on v | gap raw: centroid dist / cos true pairs | gap bank: centroid dist "
            "/ cos true pairs | s per run |\n|---|---|---|---:|---|---|---|---|---|---:|")
    lines = [head]
    for r in rows:  # rows of CSVs written before the preset and fold columns
        r.setdefault("preset", "tiny")
        r.setdefault("fold", "")
    sets = list(dict.fromkeys((r["set"], r["preset"]) for r in rows))
    order = lambda k: (sets.index(k[:2]), list(cmki.METHODS).index(k[2]))  # noqa: E731
    keys = sorted(dict.fromkeys((r["set"], r["preset"], r["method"]) for r in rows), key=order)
    for s, pr, m in keys:
        rs = [r for r in rows if (r["set"], r["preset"], r["method"]) == (s, pr, m)]
        folds = sorted({r["fold"] for r in rs if r["fold"] != ""})
        runs = f"{len(rs)}" + (f" ({len(rs) // len(folds)} x {len(folds)} folds)" if folds else "")
        col = lambda k: [float(r[k]) for r in rs]  # noqa: E731
        gaps = [f"{mean_sd(col(f'{sp}_centroid_distance'))} / {mean_sd(col(f'{sp}_true_pair_cos'))}"
                for sp in ("raw", "bank")]
        lines.append(f"| {s} | {pr} | {m} | {runs} | {mean_sd(col('macro_auc'))} | "
                     f"{mean_sd(col('macro_auc_ctclip'))} | {mean_sd(col('probe_auc'))} | "
                     f"{gaps[0]} | {gaps[1]} | {statistics.mean(col('seconds')):.0f} |")
    return "\n".join(lines)


def plot(rows: list, path: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    sets = list(dict.fromkeys(r["set"] for r in rows))
    fig, axes = plt.subplots(1, len(sets), figsize=(5 * len(sets), 3.5), squeeze=False)
    for ax, s in zip(axes[0], sets):
        methods = list(dict.fromkeys(r["method"] for r in rows if r["set"] == s))
        for i, m in enumerate(methods):
            ys = [float(r["macro_auc"]) for r in rows if (r["set"], r["method"]) == (s, m)]
            ax.scatter([i] * len(ys), ys, color="tab:blue")
            ax.hlines(np.mean(ys), i - 0.25, i + 0.25, color="black")
        ax.set_xticks(range(len(methods)), methods)
        ax.set_title(s)
        ax.set_ylabel("held-out macro AUROC (paper protocol)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", default=list(cmki.METHODS), choices=list(cmki.METHODS),
                   help="objectives to compare (default: all)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2],
                   help="training seeds (init, data order, validation split) (default: 0 1 2)")
    p.add_argument("--sets", nargs="+", default=["synthetic", "real_text"],
                   choices=["synthetic", "real_text"], help="data sets (default: both)")
    p.add_argument("--reports", type=Path, default=None,
                   help="CSV of real reports with the 18 labels (report_text + 18 columns), "
                        "required for real_text (default: none)")
    p.add_argument("--preset", default="tiny", choices=["tiny", "small"],
                   help="train.py --preset of every run; the generated sets are stored finer than "
                        "its grid (default: tiny)")
    p.add_argument("--folds", type=int, default=0,
                   help="real_text: K-fold estimate, each fold holding out 400 / K reports; 0 = the "
                        "one split of the last 80 reports (default: 0)")
    p.add_argument("--fold", nargs="+", type=int, default=None,
                   help="with --folds: only these folds (default: all), e.g. to share them between "
                        "two processes")
    p.add_argument("--work", type=Path, default=Path("out/ablation"),
                   help="data sets and one run folder per (set, method, seed) (default: out/ablation)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/ablation"),
                   help="writes OUT.csv, OUT.md and OUT.png (default: benchmarks/ablation)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads per run (default 0: torch's choice; 1 when running two "
                        "of these side by side on 2 cores)")
    p.add_argument("--merge", nargs="+", type=Path, metavar="CSV",
                   help="only write the table (to --out) from the rows of these earlier CSVs")
    a = p.parse_args(argv)
    if a.merge:
        rows = [r for path in a.merge for r in csv.DictReader(open(path, newline=""))]
        return report(rows, a.out, f"ablation: {len(rows)} runs from {len(a.merge)} file(s)")
    if a.threads:
        torch.set_num_threads(a.threads)
    if "real_text" in a.sets and a.reports is None:
        p.error("real_text needs --reports CSV (the real reports with their 18 labels), or --sets synthetic")
    if "real_text" in a.sets and not a.reports.is_file():
        sys.exit(f"ablation: {a.reports}: no such reports CSV (give --reports, or --sets synthetic)")
    if a.folds == 1 or a.folds < 0 or (a.fold and not all(0 <= k < a.folds for k in a.fold)):
        p.error(f"--folds must be 0 or >= 2 and every --fold in [0, --folds), got {a.folds}, {a.fold}")
    folds = (a.fold or list(range(a.folds))) if a.folds else [None]
    jobs = [(s, k) for s in a.sets for k in (folds if s == "real_text" else [None])]
    rows, t0 = [], time.time()
    total = len(jobs) * len(a.methods) * len(a.seeds)
    for set_name, fold in jobs:
        root = data_set(set_name, a.work, a.reports, a.preset, fold, a.folds)
        for seed in a.seeds:
            for method in a.methods:
                print(f"ablation: run {len(rows) + 1}/{total}: {set_name}"
                      f"{'' if fold is None else f' fold {fold}'}, {a.preset}, {method}, seed {seed} "
                      f"({time.time() - t0:.0f} s so far)", flush=True)
                rows.append(one_run(set_name, root, method, seed, a.work, a.preset, fold))
                write_csv(rows, a.out.with_suffix(".csv"))  # after every run
    report(rows, a.out, f"ablation: {len(rows)} runs in {time.time() - t0:.0f} s")


def write_csv(rows: list, path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def report(rows: list, out: Path, what: str):
    """The rows (out.csv), the table (printed and written to out.md) and, with matplotlib, out.png."""
    text = table(rows)
    write_csv(rows, out.with_suffix(".csv"))
    out.with_suffix(".md").write_text(text + "\n")
    print(text)
    drawn = plot(rows, out.with_suffix(".png"))
    print(f"{what}; wrote {out.with_suffix('.csv')}, {out.with_suffix('.md')}"
          f"{', ' + str(out.with_suffix('.png')) if drawn else ''}")


if __name__ == "__main__":
    main()
