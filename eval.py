"""Zero-shot diagnosis, retrieval and the modality gap of a BrgSA checkpoint, measured honestly.

Two zero-shot protocols (SPEC section 3); prompt embeddings are computed once, not per volume:
  brgsa   prompt "There is {name}";  Score(V, c) = 1/2 [cos(v, t_c) + cos(v_hat, t_c)],
          v_hat = CMKI(v) through the knowledge bank (the paper's and official code's rule).
  ctclip  prompts "{name} is present." / "{name} is not present."; softmax over the pair of
          similarities / tau (CT-CLIP's rule, on the same BrgSA similarity).
User templates and per-class synonym lists make a prompt ensemble: the mean of the prompts' scores.

Metrics (metrics.py) per class and as a macro mean: AUROC, AUPRC, and ACC / weighted F1 / precision
/ recall / specificity at two thresholds: `roc_corner`, the ROC-corner threshold picked on the
evaluated rows themselves (the field's convention: optimistic), and `calibrated`, the same rule
applied on a separate, patient-disjoint calibration split and then frozen (the honest number).
Percentile bootstrap 95% intervals resample patients (or volumes) with replacement.
With report texts: report->volume and volume->report Recall@{1,5,10,50,100} and mAP, and the
modality gap (centroid distance, true vs random pair cosine, linear-probe accuracy) of the raw
(v, t) and the bank-mapped (v_hat, t_hat) embeddings.
Outputs in --out_dir: eval.json (every number, its interval and which rows it uses), metrics.csv,
scores.csv + labels.csv (re-evaluable with --scores/--labels), roc_curves.png and modality_gap.png
(matplotlib is optional: without it the plots are skipped with a message).
Inputs are read by eval_inputs.py and outputs written by eval_report.py; their public names are
re-exported here, so `eval.load_checkpoint`, `eval.write_result`, ... work.

    python eval.py --ckpt out/ckpt.pt --data data_synth/n1000_seed0/dataset --out_dir out
    python eval.py --scores S.csv --labels L.csv --out_dir D          # precomputed scores
    python eval.py --ckpt out/ckpt.pt --volume scan.nii.gz --findings "pleural effusion" "lung nodule"
    python eval.py --help                                              # every flag
"""
import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

import cmki
import data as data_lib
import metrics
from eval_inputs import (class_setup, load_checkpoint, read_score_csv, read_thresholds,  # noqa: F401
                         select_labels)
from eval_report import (THRESHOLDED, format_table, metrics_rows, print_scan,  # noqa: F401
                         write_plots, write_result)
from metrics import (auprc, auroc, binary_metrics, calibration_split, confusion_metrics,  # noqa: F401
                     modality_gap, patient_id, retrieval_metrics, roc_corner_threshold)
from model import BrgSA

PROMPT = "There is {}"  # the paper's zero-shot prompt, shared with nothing else in training
PROTOCOLS = {"brgsa": (PROMPT,), "ctclip": ("{} is present.|{} is not present.",)}


@dataclass
class EvalConfig:
    protocol: str = "brgsa"      # brgsa (the paper) or ctclip (present / not present pair)
    templates: tuple = ()        # prompt templates with "{}" (ctclip: "POS|NEG"); () = default
    synonyms: dict = field(default_factory=dict)  # class -> names to ensemble (default: the class)
    calib_fraction: float = 0.3  # patient-grouped share of the rows used only to pick thresholds
    exclude_calib: bool = False  # compute AUROC / AUPRC / roc_corner on the test rows only
    n_boot: int = 1000           # bootstrap resamples (0 = no intervals)
    boot_unit: str = "patient"   # resample patients (reconstructions move together) or volumes
    level: float = 0.95          # confidence level of the percentile intervals
    seed: int = 0                # calibration split, bootstrap and linear probe


# ----------------------------------------------------------------------------- prompts and scores

def prompt_set(classes, cfg: EvalConfig) -> list:
    """-> [(class index, prompt or (positive, negative) pair)] for every class x name x template."""
    if cfg.protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {cfg.protocol!r}; expected one of {sorted(PROTOCOLS)}")
    unknown = sorted(set(cfg.synonyms) - set(classes))
    if unknown:
        raise ValueError(f"synonyms given for unknown classes {unknown}; classes are {list(classes)}")
    out = []
    for template in cfg.templates or PROTOCOLS[cfg.protocol]:
        parts = template.split("|")
        n_parts = 2 if cfg.protocol == "ctclip" else 1
        if len(parts) != n_parts or any(p.count("{}") != 1 for p in parts):
            want = "'POS {}|NEG {}'" if cfg.protocol == "ctclip" else "one '{}'"
            raise ValueError(f"template {template!r} for protocol {cfg.protocol}: expected {want}")
        for j, c in enumerate(classes):
            for name in cfg.synonyms.get(c, [c]):
                texts = tuple(p.format(name) for p in parts)
                out.append((j, texts if cfg.protocol == "ctclip" else texts[0]))
    return out


@torch.no_grad()
def embed_texts(model: BrgSA, tokenizer, texts: list, device, batch_size: int = 256) -> torch.Tensor:
    out = []
    for i in range(0, len(texts), batch_size):
        ids, mask = data_lib.tokenize(tokenizer, texts[i:i + batch_size], model.cfg.max_len)
        out.append(model.text(ids.to(device), mask.to(device)).float())
    return torch.cat(out)  # (T, d)


@torch.no_grad()
def score_volumes(model: BrgSA, tokenizer, v: torch.Tensor, classes, cfg: EvalConfig, device):
    """(N, d) image embeddings -> (N, C) numpy scores under cfg's protocol and prompt ensemble."""
    prompts = prompt_set(classes, cfg)
    bank = model.bank.weight.float()
    if cfg.protocol == "brgsa":
        t = embed_texts(model, tokenizer, [p for _, p in prompts], device)
        per_prompt = cmki.zero_shot_scores(v, t, bank, model.scale)  # (N, P)
    else:
        t = embed_texts(model, tokenizer, [x for _, p in prompts for x in p], device)
        sim = cmki.zero_shot_scores(v, t, bank, model.scale)  # (N, 2P): present, not present, ...
        # softmax over (present, not present) = sigmoid of the logit difference
        per_prompt = torch.sigmoid((sim[:, 0::2] - sim[:, 1::2]) / model.cfg.tau)
    idx = torch.tensor([j for j, _ in prompts], device=per_prompt.device)
    total = torch.zeros(len(v), len(classes), device=per_prompt.device).index_add_(1, idx, per_prompt)
    return (total / torch.bincount(idx, minlength=len(classes))).cpu().numpy().astype(np.float64)


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


# ----------------------------------------------------------------------------- diagnosis metrics

def _rows_note(n_main, n_calib, n_test, cfg, external):
    where = "a separate calibration set" if external else "a patient-grouped calibration split"
    main = "the test rows" if cfg.exclude_calib else "all evaluated rows"
    return dict(threshold_free=f"AUROC / AUPRC: {main} ({n_main} volumes)",
                roc_corner=f"threshold picked and scored on {main} ({n_main} volumes): optimistic",
                calibrated=(f"threshold picked on {where} ({n_calib} volumes), scored on "
                            f"{n_test} test volumes" if n_calib else "no calibration rows"))


def evaluate_scores(scores, labels, classes, names=None, cfg: EvalConfig = None, calib=None) -> dict:
    """(N, C) scores and 0/1 labels -> the eval.json layout (per class, macro, CIs, which rows).

    names: volume names (patient grouping for the calibration split and the bootstrap; rows are
    their own patients when None). calib: (scores, labels, names) of a separate calibration set;
    otherwise cfg.calib_fraction of the patients is held out of `scores` to pick thresholds.
    """
    cfg = cfg or EvalConfig()
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
        is_cal = calibration_split(groups, labels, cfg.calib_fraction, cfg.seed)
    evaluated = np.arange(len(scores)) < n
    test = evaluated & ~is_cal
    main = test if cfg.exclude_calib else evaluated
    if cfg.boot_unit not in ("patient", "volume"):
        raise ValueError(f"boot_unit must be 'patient' or 'volume', got {cfg.boot_unit!r}")
    unit = np.unique(groups if cfg.boot_unit == "patient" else np.arange(len(scores)),
                     return_inverse=True)[1]
    point, boot = metrics.diagnosis(scores, labels, main, is_cal if is_cal.any() else None, test,
                                    unit, is_cal.astype(int), cfg.n_boot, cfg.seed)
    result = dict(n_volumes=int(n), classes=list(classes),
                  rows=dict(n_main=int(main.sum()), n_calib=int(is_cal.sum()), n_test=int(test.sum()),
                            **_rows_note(int(main.sum()), int(is_cal.sum()), int(test.sum()), cfg,
                                         calib is not None)),
                  **metrics.summarize_diagnosis(point, boot, classes, labels[main].sum(0), cfg.level))
    for j, m in enumerate(result["per_class"].values()):
        if m.get("calibrated"):  # what the calibrated numbers rest on, per class
            m["calibrated"].update(positives_calib=int(labels[is_cal, j].sum()),
                                   positives_test=int(labels[test, j].sum()))
    result["auc"] = {c: m["auc"] for c, m in result["per_class"].items()}
    result["auprc"] = {c: m["auprc"] for c, m in result["per_class"].items()}
    result["macro_auc"], result["macro_auprc"] = result["macro"]["auc"], result["macro"]["auprc"]
    if boot is not None:
        result["bootstrap"] = dict(n=cfg.n_boot, unit=cfg.boot_unit, level=cfg.level, seed=cfg.seed,
                                   n_units=int(unit.max() + 1), method="percentile",
                                   valid_resamples={c: int(np.isfinite(boot["auc"][:, j]).sum())
                                                    for j, c in enumerate(classes)})
    result["arrays"] = dict(names=names, scores=scores[:n], labels=labels[:n].astype(int),
                            calib_rows=is_cal[:n], main_rows=main[:n])
    return result


# ----------------------------------------------------------------------------- retrieval and gap

def report_texts(reports: list, summaries: dict = None) -> list:
    """The text each volume's report is embedded as: its summary sentences joined (as training
    sees them at evaluation), or the raw report when it has no summary."""
    import summarize  # only needed when reports are given
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
              "score": cmki.zero_shot_scores(v, t, bank, model.scale)}  # the zero-shot rule
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
    points = {k: (metrics.l2_normalize(a.cpu().numpy()), metrics.l2_normalize(b.cpu().numpy()))
              for k, (a, b) in pairs.items()}
    return retrieval, gap, points


# ----------------------------------------------------------------------------- the model protocol

def _records_of(loader):
    return getattr(getattr(loader, "dataset", None), "records", None)


def zero_shot(model: BrgSA, tokenizer, loader, classes: list, device, cfg: EvalConfig = None,
              calib_loader=None, summaries: dict = None, score_map=None, embedded=None) -> dict:
    """Zero-shot diagnosis of every volume of loader, plus retrieval and the modality gap when the
    loader's records carry reports. classes name the label columns; prompts are written for them,
    or, with score_map, for the CT-RATE classes whose (N, 18) scores score_map maps onto them.
    embedded: loader's embed_volumes() output when the caller already has it."""
    cfg = cfg or EvalConfig()
    model.eval()
    prompt_classes = data_lib.CTRATE_CLASSES if score_map else classes
    v, labels, names = embedded if embedded is not None else embed_volumes(model, loader, device)

    def scores_of(v_):
        s = score_volumes(model, tokenizer, v_, prompt_classes, cfg, device)
        return np.asarray(score_map(s), np.float64) if score_map else s

    calib = None
    if calib_loader is not None:
        vc, lc, nc = embed_volumes(model, calib_loader, device)
        calib = (scores_of(vc), lc, nc)
    result = evaluate_scores(scores_of(v), labels, classes, names, cfg, calib)
    prompts = {}
    for j, p in prompt_set(prompt_classes, cfg):
        prompts.setdefault(prompt_classes[j], []).append(p)
    result["protocol"] = dict(name=cfg.protocol, prompts=prompts, score=(
        "1/2 [cos(v, t) + cos(v_hat, t)]" if cfg.protocol == "brgsa" else
        "softmax over (present, not present) of 1/2 [cos(v, t) + cos(v_hat, t)] / tau"),
        ensemble="mean of the prompts' scores per class")
    result["prompt"] = PROMPT if cfg.protocol == "brgsa" and not cfg.templates else None
    records = _records_of(loader)
    reports = [r.report for r in records] if records is not None else []
    if reports and len(reports) == len(names) and all(r and r.strip() for r in reports):
        texts = report_texts(reports, summaries)
        uniq = list(dict.fromkeys(texts))
        index = {x: i for i, x in enumerate(uniq)}
        t = embed_texts(model, tokenizer, uniq, device)
        result["retrieval"], result["modality_gap"], points = retrieval_and_gap(
            model, v, t, [index[x] for x in texts], cfg.seed)
        result["retrieval_note"] = (f"{len(uniq)} unique report texts (summaries joined) for "
                                    f"{len(names)} volumes; ties ranked pessimistically")
        result["arrays"]["gap_points"] = points
    else:
        result["retrieval_note"] = "no report texts with these volumes: retrieval and gap skipped"
    return result


# ----------------------------------------------------------------------------- score files and single scans

def evaluate_score_files(scores_csv, labels_csv, cfg: EvalConfig = None) -> dict:
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
    result = evaluate_scores(scores, labels, s_classes, s_names, cfg)
    result["source"] = dict(scores=str(scores_csv), labels=str(labels_csv))
    if len(l_names) > len(s_names):
        result["notes"] = [f"{len(l_names) - len(s_names)} labelled volumes of {labels_csv} have "
                           f"no score and are not evaluated"]
    return result


@torch.no_grad()
def score_scan(model: BrgSA, tokenizer, path, findings, device, cfg: EvalConfig = None) -> dict:
    """One CT (NIfTI in HU, or a preprocessed .npy at the model's grid) -> {finding: score}.

    The scan is resampled and cropped on the fly exactly as the data cache would store it."""
    path = Path(path)
    if path.suffix == ".npy":
        hu = np.load(path)
        if tuple(hu.shape) != tuple(model.cfg.image_size):
            raise ValueError(f"{path}: preprocessed volume {hu.shape}, the model expects "
                             f"{tuple(model.cfg.image_size)}")
    else:
        raw, spacing = data_lib.load_nifti(path)
        hu = data_lib.preprocess_volume(raw, spacing, model.cfg.spacing, model.cfg.image_size)
    x = data_lib.normalize(torch.from_numpy(np.asarray(hu, np.float32)))[None, None].to(device)
    v = model.visual(x).float()  # (1, d)
    scores = score_volumes(model, tokenizer, v, list(findings), cfg or EvalConfig(), device)[0]
    return dict(zip(findings, scores.tolist()))


# ----------------------------------------------------------------------------- command line

def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--ckpt", help="checkpoint written by train.py (model, config and tokenizer)")
    p.add_argument("--data", help="data set: a CT-RATE-layout root or a preprocessed directory")
    p.add_argument("--split", default="valid", help="which split of --data to evaluate")
    p.add_argument("--out_dir", default="out", help="where eval.json, CSVs and plots are written")
    p.add_argument("--scores", help="score-file mode: CSV of precomputed per-volume scores")
    p.add_argument("--labels", help="score-file mode: CSV of 0/1 labels, matched by name")
    p.add_argument("--volume", help="single-scan mode: a NIfTI CT in HU (or a preprocessed .npy)")
    p.add_argument("--findings", nargs="+", help="single-scan mode: abnormalities to score "
                                                 "(default: the 18 CT-RATE classes)")
    p.add_argument("--summaries", help="summary cache (JSONL) of the training run, e.g. "
                   "out/summaries_rules.jsonl; reports missing from it are summarised with the rules")
    p.add_argument("--thresholds", help="single-scan mode: eval.json whose calibrated thresholds "
                   "turn scores into positive / negative calls")
    p.add_argument("--classes", default="auto", help="label classes with --data: auto (what the "
                   "data carries), ctrate (18), ctrate_lt (15, needs --label_csv), radchest (16: "
                   "18 CT-RATE prompts mapped, calcifications merged by max)")
    p.add_argument("--label_csv", help="labels for --data from this CSV (VolumeName + class columns)")
    p.add_argument("--protocol", default="brgsa", choices=sorted(PROTOCOLS),
                   help="brgsa: 'There is {}', 1/2[cos(v,t)+cos(v_hat,t)]; ctclip: present / not "
                        "present pair, softmax")
    p.add_argument("--template", action="append", default=[], help="prompt template with {} "
                   "(repeatable, scores averaged); ctclip: 'POS {}|NEG {}'")
    p.add_argument("--synonyms", help="JSON {class: [names...]}: prompt ensemble over the names")
    p.add_argument("--calib_fraction", type=float, default=0.3, help="patient-grouped share of the "
                   "evaluated rows used only to pick the calibrated thresholds (0 = none)")
    p.add_argument("--calib_data", help="pick calibrated thresholds on this data set instead")
    p.add_argument("--calib_split", default="valid", help="split of --calib_data")
    p.add_argument("--exclude_calib", action="store_true", help="compute AUROC, AUPRC and the "
                   "ROC-corner metrics on the test rows only (default: on all evaluated rows)")
    p.add_argument("--n_boot", type=int, default=1000, help="bootstrap resamples (0 = no intervals)")
    p.add_argument("--boot_unit", default="patient", choices=["patient", "volume"],
                   help="resampling unit: patient (reconstructions move together) or volume")
    p.add_argument("--seed", type=int, default=0, help="calibration split, bootstrap, linear probe")
    p.add_argument("--no_plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--batch_size", type=int, default=8, help="volumes per forward pass")
    p.add_argument("--workers", type=int, default=0, help="data-loader worker processes")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    return p


def eval_config(args) -> EvalConfig:
    synonyms = {}
    if args.synonyms:
        try:
            synonyms = json.loads(Path(args.synonyms).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{args.synonyms}: cannot read the synonyms JSON ({e})") from None
        good = isinstance(synonyms, dict) and all(
            isinstance(v, list) and v and all(isinstance(s, str) for s in v) for v in synonyms.values())
        if not good:
            raise ValueError(f"{args.synonyms}: expected {{class: [name, ...]}} with non-empty lists")
    if args.n_boot < 0:
        raise ValueError(f"--n_boot must be >= 0, got {args.n_boot}")
    return EvalConfig(protocol=args.protocol, templates=tuple(args.template), synonyms=synonyms,
                      calib_fraction=args.calib_fraction, exclude_calib=args.exclude_calib,
                      n_boot=args.n_boot, boot_unit=args.boot_unit, seed=args.seed)


def _run_model(args, cfg, device):
    model, tokenizer, _ = load_checkpoint(args.ckpt, device)
    records = data_lib.load_dataset(args.data, args.split, model.cfg, workers=max(args.workers, 1))
    classes, score_map = class_setup(args.classes, records)
    records = select_labels(records, classes, args.label_csv)
    calib_loader = None
    if args.calib_data:
        calib = data_lib.load_dataset(args.calib_data, args.calib_split, model.cfg,
                                      workers=max(args.workers, 1))
        calib = select_labels(calib, classes, args.label_csv, "--calib_data")
        overlap = {r.name for r in calib} & {r.name for r in records}
        if overlap:
            raise ValueError(f"--calib_data shares {len(overlap)} volumes with --data, "
                             f"e.g. {sorted(overlap)[:3]}")
        calib_loader = data_lib.eval_loader(calib, args.batch_size, args.workers)
    loader = data_lib.eval_loader(records, args.batch_size, args.workers)
    summaries = None
    if args.summaries:  # the training run's cache: retrieval embeds exactly the texts it trained on
        import summarize
        cache = summarize.load_cache(args.summaries)
        keys = {r.report: summarize.report_key(r.report) for r in records}
        summaries = {text: cache[k] for text, k in keys.items() if k in cache}
    return zero_shot(model, tokenizer, loader, classes, device, cfg, calib_loader, summaries,
                     score_map)


def main(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    cfg = eval_config(args)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu")
                          if args.device == "auto" else args.device)
    if args.volume:
        if not args.ckpt:
            p.error("--volume needs --ckpt")
        model, tokenizer, _ = load_checkpoint(args.ckpt, device)
        findings = args.findings or list(data_lib.CTRATE_CLASSES)
        scores = score_scan(model, tokenizer, args.volume, findings, device, cfg)
        thresholds = read_thresholds(args.thresholds, cfg.protocol) if args.thresholds else {}
        print_scan(args.volume, scores, thresholds, cfg.protocol)
        return scores
    if args.scores or args.labels:
        if not (args.scores and args.labels):
            p.error("--scores and --labels go together")
        result = evaluate_score_files(args.scores, args.labels, cfg)
    else:
        if not (args.ckpt and args.data):
            p.error("give --ckpt and --data, --scores and --labels, or --ckpt and --volume")
        result = _run_model(args, cfg, device)
    print(format_table(result))
    path = write_result(result, args.out_dir, plots=not args.no_plots)
    rows = result["rows"]
    print(f"opt = ROC-corner threshold picked on the evaluated rows (optimistic); cal = picked on "
          f"{rows['n_calib']} calibration volumes, scored on {rows['n_test']} test volumes")
    print(f"macro AUROC {result['macro_auc']:.4f} over {len(result['auc'])} classes, "
          f"{result['n_volumes']} volumes; eval.json -> {path}")
    return result


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"eval.py: error: {e}")
