"""Zero-shot diagnosis, retrieval and the modality gap of a BrgSA checkpoint, measured honestly.

Two zero-shot protocols (SPEC section 3); prompt embeddings are computed once, not per volume:
  brgsa   the model's prompt: the paper's "There is {name}" (the tiny preset's "{name}.", phrased as
          its training summaries are);  Score(V, c) = 1/2 [cos(v, t_c) + cos(v_hat, t_c)],
          v_hat = CMKI(v) through the knowledge bank (the paper's and official code's rule).
  ctclip  prompts "{name} is present." / "{name} is not present."; softmax over the pair of
          similarities / tau (CT-CLIP's rule, on the same BrgSA similarity).
User templates and per-class synonym lists make a prompt ensemble: the mean of the prompts' scores.

Metrics per class and as a macro mean: AUROC, AUPRC, and ACC / weighted F1 / precision
/ recall / specificity at two thresholds: `roc_corner`, the ROC-corner threshold picked on the
evaluated rows themselves (the field's convention: optimistic), and `calibrated`, the same rule
applied on a separate, patient-disjoint calibration split and then frozen (the honest number).
Percentile bootstrap 95% intervals resample patients (or volumes) with replacement.
With report texts: report->volume and volume->report Recall@{1,5,10,50,100} and mAP, and the
modality gap (centroid distance, true vs random pair cosine, linear-probe accuracy) of the raw
(v, t) and the bank-mapped (v_hat, t_hat) embeddings.
Grounding (where the model sees a finding): each patch token, through the image head, is scored
against the finding's prompt like a whole volume; the patch map is written as a NIfTI on the input's
own grid and affine (and a PNG); --grounding scores such maps against the synthetic set's painted
masks (pointing game with its chance level, AUROC of map values inside vs outside the mask).
Outputs in --out_dir: eval.json (every number, its interval and which rows it uses), metrics.csv,
scores.csv + labels.csv (re-evaluable with --scores/--labels), roc_curves.png and modality_gap.png
(matplotlib is optional: without it the plots are skipped with a message).
The metrics are plain numpy (no scipy / scikit-learn), each checked in tests/test_eval.py against a
brute-force reference:
    AUROC = P(s_pos > s_neg) + 1/2 P(s_pos = s_neg)     (Mann-Whitney U / (n_pos n_neg), ties half)
    AUPRC = sum_k (R_k - R_{k-1}) P_k                     (average precision over distinct scores)
    ROC-corner threshold: the operating point closest to (FPR, TPR) = (0, 1); predict score > threshold.
One engine computes every threshold-based number: a class's scores are sorted once and cut into runs
of equal value; a row of weights (how often each volume was drawn) is summed per run, and cumulative
sums give AUROC, AUPRC and the confusion matrix at every candidate threshold. A block of bootstrap
resamples is a (B, N) weight matrix, so 1000 resamples cost a few (B, N) array passes per class.

Sections, in reading order: the zero-shot protocol (prompts, scores, diagnosis, retrieval and gap),
score files and single scans, grounding maps and their score, what this file reads and writes, the
numpy metrics everything rests on, and the command line.

    python eval.py --ckpt out/best.pt --data data_synth/n1000_seed0/dataset --out_dir out
    python eval.py --ckpt out/best.pt --data cache/mine --out_dir eval_mine  # own scans: made by
        # python -m prepare.preprocess --dataset folder --root DIR --labels CSV --out cache/mine;
        # prompts from the CSV's class columns
    python eval.py --scores S.csv --labels L.csv --out_dir D          # precomputed scores
    python eval.py --ckpt out/best.pt --volume scan.nii.gz --findings "pleural effusion" "lung nodule"
    python eval.py --ckpt out/best.pt --volume scan.nii.gz --findings "pleural effusion" --heatmap maps
    python eval.py --ckpt out/best.pt --data data_synth/grounding/dataset --grounding --out_dir out/grounding
    python eval.py --help                                              # every flag
"""
import argparse
import csv
import io
import json
import math
import pickle
import re
import sys
import warnings
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

import cmki
import data as data_lib
from model import BrgSA, ModelConfig
from prepare import summarize
from prepare.phantom import mask_path
from prepare.preprocess import ctrate_jobs, ensure_cache

RETRIEVAL_KS = (1, 5, 10, 50, 100)
THRESHOLDED = ("acc", "f1", "precision", "recall", "specificity")
PROMPT = ModelConfig.prompt  # the paper's zero-shot prompt, "There is {}" (a model's own: its cfg.prompt)
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

def prompt_set(classes, cfg: EvalConfig, prompt: str = PROMPT) -> list:
    """-> [(class index, prompt or (positive, negative) pair)] for every class x name x template;
    `prompt` is the brgsa protocol's template when cfg gives none (the model's ModelConfig.prompt)."""
    if cfg.protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {cfg.protocol!r}; expected one of {sorted(PROTOCOLS)}")
    if not len(classes):
        raise ValueError("no classes to score: give the data labels (--label_csv) or --findings")
    unknown = sorted(set(cfg.synonyms) - set(classes))
    if unknown:
        raise ValueError(f"synonyms given for unknown classes {unknown}; classes are {list(classes)}")
    out = []
    default = (prompt,) if cfg.protocol == "brgsa" else PROTOCOLS[cfg.protocol]
    for template in cfg.templates or default:
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
    prompts = prompt_set(classes, cfg, model.cfg.prompt)
    if cfg.protocol == "brgsa":
        t = embed_texts(model, tokenizer, [p for _, p in prompts], device)
        per_prompt = model.zero_shot_scores(v, t)  # (N, P)
    else:
        t = embed_texts(model, tokenizer, [x for _, p in prompts for x in p], device)
        sim = model.zero_shot_scores(v, t)  # (N, 2P): present, not present, ...
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
    if not vs:
        raise ValueError("no volumes to evaluate (the data set or split is empty)")
    return torch.cat(vs), np.concatenate(labels), names


# ----------------------------------------------------------------------------- diagnosis metrics

def _rows_note(n_main, n_calib, n_test, cfg, external):
    where = "a separate calibration set" if external else "a patient-grouped calibration split"
    main = "the test rows" if cfg.exclude_calib else "all evaluated rows"
    return dict(threshold_free=f"AUROC / AUPRC: {main} ({n_main} volumes)",
                roc_corner=f"threshold picked and scored on {main} ({n_main} volumes): optimistic",
                calibrated=(f"threshold picked on {where} ({n_calib} volumes), scored on "
                            f"{n_test} test volumes" if n_calib else "no calibration rows"))


MIN_CALIB_VOLUMES, MIN_CALIB_PER_CLASS = 20, 5  # below these a frozen threshold is mostly noise


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
    point, boot = diagnosis(scores, labels, main, is_cal if is_cal.any() else None, test,
                                    unit, is_cal.astype(int), cfg.n_boot, cfg.seed)
    result = dict(n_volumes=int(n), classes=list(classes),
                  rows=dict(n_main=int(main.sum()), n_calib=int(is_cal.sum()), n_test=int(test.sum()),
                            **_rows_note(int(main.sum()), int(is_cal.sum()), int(test.sum()), cfg,
                                         calib is not None)),
                  **summarize_diagnosis(point, boot, classes, labels[main].sum(0), cfg.level))
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
    # what a reader of the numbers must know: classes left out of the macro mean, thin calibration
    left_out = [c for c, m in result["per_class"].items() if not math.isfinite(m["auc"])]
    result["notes"] = ([f"{len(left_out)} of {len(classes)} classes have no positive or no negative "
                        f"among the evaluated rows and are left out of the macro mean: {left_out}"]
                       if left_out else [])
    result["notes"] += calibration_warnings(labels[is_cal], classes,
                                            calib is not None or cfg.calib_fraction > 0)
    return result


# ----------------------------------------------------------------------------- retrieval and gap

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
    for j, p in prompt_set(prompt_classes, cfg, model.cfg.prompt):
        prompts.setdefault(prompt_classes[j], []).append(p)
    rule = "cos(v, t)" if model.cfg.method == "clip" else "1/2 [cos(v, t) + cos(v_hat, t)]"
    result["protocol"] = dict(name=cfg.protocol, prompts=prompts, score=(
        rule if cfg.protocol == "brgsa" else f"softmax over (present, not present) of {rule} / tau"),
        ensemble="mean of the prompts' scores per class")
    result["prompt"] = model.cfg.prompt if cfg.protocol == "brgsa" and not cfg.templates else None
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
    bad = ~np.isin(labels, (0.0, 1.0))
    if bad.any():
        i, j = np.argwhere(bad)[0]
        raise ValueError(f"{labels_csv}: label {labels[i, j]:g} for {s_names[i]!r}, class "
                         f"{s_classes[j]!r}; expected 0 or 1 ({int(bad.sum())} such values)")
    result = evaluate_scores(scores, labels, s_classes, s_names, cfg)
    result["source"] = dict(scores=str(scores_csv), labels=str(labels_csv))
    if len(l_names) > len(s_names):
        result["notes"].append(f"{len(l_names) - len(s_names)} labelled volumes of {labels_csv} "
                               f"have no score and are not evaluated")
    return result


def check_findings(tokenizer, findings, cfg: EvalConfig, mcfg: ModelConfig):
    """--findings: each must be a name whose prompts fit the text encoder's max_len tokens without
    truncation and whose words the tokenizer knows (an [UNK] token carries no meaning)."""
    unk = tokenizer.token_to_id("[UNK]")
    tokenizer.no_truncation()  # data.tokenize sets both again before every use
    tokenizer.no_padding()
    for f in findings:
        if not f.strip():
            raise ValueError("--findings: an empty finding; expected abnormality names such as "
                             "'pleural effusion'")
        for _, prompt in prompt_set([f], cfg, mcfg.prompt):
            for text in (prompt,) if isinstance(prompt, str) else prompt:
                enc = tokenizer.encode(text)
                if len(enc.ids) > mcfg.max_len:
                    raise ValueError(f"--findings: {f[:60]!r}... is {len(enc.ids)} tokens as a prompt; "
                                     f"the text encoder reads at most {mcfg.max_len}")
                if unk is not None and unk in enc.ids:
                    words = sorted({w for w in re.findall(r"\w+", text)  # words, not punctuation
                                    if unk in tokenizer.encode(w, add_special_tokens=False).ids})
                    raise ValueError(f"--findings: {f!r} has words the tokenizer does not know "
                                     f"{words}: they would all read as [UNK]")


@torch.no_grad()
def score_scan(model: BrgSA, tokenizer, path, findings, device, cfg: EvalConfig = None,
               allow_non_hu: bool = False) -> dict:
    """One CT (NIfTI in HU, or a preprocessed .npy at the model's grid) -> {finding: score}.

    The scan is resampled and cropped on the fly exactly as the data cache would store it; unless
    allow_non_hu, a volume that does not look like a CT in HU is refused (data.check_hu)."""
    path, cfg = Path(path), cfg or EvalConfig()
    check_findings(tokenizer, findings, cfg, model.cfg)
    if path.suffix == ".npy":
        try:
            hu = np.load(path)
        except (OSError, ValueError) as e:
            raise ValueError(f"{path}: not a readable .npy array ({e})") from None
        if tuple(hu.shape) != tuple(model.cfg.image_size):
            raise ValueError(f"{path}: preprocessed volume {hu.shape}, the model expects "
                             f"{tuple(model.cfg.image_size)}")
    else:
        hu, spacing = data_lib.load_nifti(path)
    data_lib.check_hu(hu, path, allow=allow_non_hu)
    if path.suffix != ".npy":
        hu = data_lib.preprocess_volume(hu, spacing, model.cfg.spacing, model.cfg.image_size)
    x = data_lib.normalize(torch.from_numpy(np.asarray(hu, np.float32)))[None, None].to(device)
    v = model.visual(x).float()  # (1, d)
    scores = score_volumes(model, tokenizer, v, list(findings), cfg, device)[0]
    return dict(zip(findings, scores.tolist()))


# ----------------------------------------------------------------------------- grounding maps

HEATMAP_KINDS = ("score", "raw", "bank")


@torch.no_grad()
def patch_maps(model: BrgSA, tokenizer, x: torch.Tensor, findings, cfg: EvalConfig = None,
               kind: str = "score") -> torch.Tensor:
    """Where the model sees each finding: (B, 1, X, Y, Z) model input -> (B, F, gx, gy, gz).

    Every patch token gets an embedding as the pooled token does (ViT3D.patch_embeddings: u_i =
    head(LN(x_i)), plus the patch position's own read-out under position pooling) and is scored
    against the finding's prompt embeddings t like a whole volume: score = 1/2 [cos(u_i, t) +
    cos(CMKI(u_i), t)] (the zero-shot rule), raw = cos(u_i, t), bank = cos(CMKI(u_i), t); a prompt
    ensemble is averaged. With mean or position pooling (the tiny preset) v = mean_i u_i, so the raw
    map is the per-patch term of cos(v, t) before the division by |v|: a decomposition, not a
    saliency guess.
    """
    if kind not in HEATMAP_KINDS:
        raise ValueError(f"--heatmap_kind must be one of {HEATMAP_KINDS}, got {kind!r}")
    cfg = cfg or EvalConfig()
    brgsa_cfg = replace(cfg, protocol="brgsa", templates=cfg.templates if cfg.protocol == "brgsa" else ())
    prompts = prompt_set(list(findings), brgsa_cfg, model.cfg.prompt)  # the model's prompt (or --template)
    t = embed_texts(model, tokenizer, [p for _, p in prompts], x.device)  # (P, d)
    tokens, grid = model.visual.tokens(x)
    u = model.visual.patch_embeddings(tokens).float()  # (B, T, d) one embedding per patch
    flat, bank = u.reshape(-1, u.shape[-1]), model.bank.weight.float()
    if kind == "raw":
        s = cmki.cosine_scores(flat, t)
    elif kind == "bank":
        s = cmki.cosine_scores(cmki.cmki(flat, bank, model.scale), t)
    else:
        s = model.zero_shot_scores(flat, t)  # (B*T, P)
    idx = torch.tensor([j for j, _ in prompts], device=s.device)
    per = torch.zeros(len(flat), len(findings), device=s.device).index_add_(1, idx, s)
    per = per / torch.bincount(idx, minlength=len(findings))  # (B*T, F) ensemble mean
    return per.reshape(len(x), *grid, len(findings)).permute(0, 4, 1, 2, 3)  # (B, F, gx, gy, gz)


def _axis_weights(n: int, s: float, t: float, m: int, p: int):
    """One canonical axis of n voxels at s mm, resampled to t mm and centre-cropped/padded to m
    voxels of p-voxel patches (data.preprocess_volume) -> (W (n, m // p) linear interpolation of the
    patch grid at each input voxel, inside (n,) bool: the voxel lies in the model's field of view)."""
    r = int(n * (s / t))  # F.interpolate's output length: floor(n * scale)
    offset = (r - m) // 2 if r >= m else -((m - r) // 2)  # resampled index of model voxel 0
    k = np.arange(n)
    mu = (k + 0.5) * (s / t) - 0.5 - offset  # input voxel k in model voxel coordinates
    g = m // p
    gamma = np.clip((mu + 0.5) / p - 0.5, 0, g - 1)  # patch-grid coordinate, patch centres at integers
    i0 = np.floor(gamma).astype(int)
    i1, f = np.minimum(i0 + 1, g - 1), gamma - i0
    W = np.zeros((n, g))
    np.add.at(W, (k, i0), 1 - f)
    np.add.at(W, (k, i1), f)
    return W, (mu >= -0.5) & (mu <= m - 0.5)


@dataclass
class Geometry:
    """How the model's patch grid sits in an input volume's own voxel grid (file axis order)."""
    shape: tuple          # the input's array shape (as stored, e.g. (X, Y, Z) or (X, Y, Z, 1))
    affine: np.ndarray    # the input's affine, copied unchanged onto every heat map
    axes: tuple           # canonical RAS axis of each file axis
    weights: list         # per file axis: (n_i, g_axes[i]) interpolation weights
    inside: np.ndarray    # bool (n0, n1, n2): voxels inside the model's field of view
    tolerance: tuple      # one patch in input voxels, per file axis
    header: object = None  # the input's NIfTI header (qform / sform codes), None for .npy


def input_geometry(shape, affine, spacing_ras, cfg: ModelConfig, header=None) -> Geometry:
    """Geometry of a NIfTI input: its axes reoriented to RAS as data.load_nifti does (nibabel's
    io_orientation, the closest axes for an oblique affine), spacing_ras (3,) in RAS order as the
    preprocessing used it, then each RAS axis resampled and cropped/padded as the preset does."""
    ornt = nib.orientations.io_orientation(np.asarray(affine))
    axes, weights, inside, tol = [], [], [], []
    for i in range(3):
        a, flip = int(ornt[i, 0]), ornt[i, 1] < 0
        s, t, p = float(spacing_ras[a]), float(cfg.spacing[a]), int(cfg.patch_size[a])
        W, ok = _axis_weights(int(shape[i]), s, t, int(cfg.image_size[a]), p)
        axes.append(a)
        weights.append(W[::-1] if flip else W)  # file index f is canonical index n - 1 - f
        inside.append(ok[::-1] if flip else ok)
        tol.append(max(1, int(round(p * t / s))))
    mask = inside[0][:, None, None] & inside[1][None, :, None] & inside[2][None, None, :]
    return Geometry(tuple(shape), np.asarray(affine, np.float64), tuple(axes), weights, mask,
                    tuple(tol), header)


def model_geometry(cfg: ModelConfig) -> Geometry:
    """Geometry of a preprocessed (.npy) input: the model's own grid, canonical RAS, centred affine."""
    affine = np.diag([*cfg.spacing, 1.0])
    affine[:3, 3] = -(np.asarray(cfg.image_size) - 1) / 2 * np.asarray(cfg.spacing)
    return input_geometry(cfg.image_size, affine, cfg.spacing, cfg)


def to_input_grid(patch_map, geom: Geometry) -> np.ndarray:
    """(gx, gy, gz) patch-grid map -> float32 map of geom.shape: trilinear between patch centres,
    edge patches held out to the field of view's border; voxels the model never saw (cropped
    away) get the map's minimum."""
    G = np.asarray(patch_map, np.float64).transpose(geom.axes)  # axis i = RAS axis of file axis i
    W0, W1, W2 = geom.weights
    heat = np.einsum("ia,jb,kc,abc->ijk", W0, W1, W2, G, optimize=True)
    heat[~geom.inside] = G.min()
    return heat.astype(np.float32).reshape(geom.shape)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")


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


def write_heatmap(heat, geom: Geometry, path) -> Path:
    """float32 NIfTI with the input's own affine (and qform / sform codes): overlays in any viewer."""
    img = nib.Nifti1Image(np.asarray(heat, np.float32), geom.affine)
    if geom.header is not None:
        img.set_qform(geom.header.get_qform(), int(geom.header["qform_code"]))
        img.set_sform(geom.header.get_sform(), int(geom.header["sform_code"]))
    img.header.set_xyzt_units("mm")
    nib.save(img, str(path))
    return Path(path)


def write_heatmap_png(heat, volume, path, title: str) -> bool:
    """Three orthogonal slices through the map's maximum over the scan; False without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    heat = np.asarray(heat).reshape(np.asarray(heat).shape[:3])
    peak = np.unravel_index(np.argmax(heat), heat.shape)
    fig, axes = plt.subplots(1, 3, figsize=(10, 3.6))
    for ax, a in zip(axes, range(3)):
        cut = [slice(None)] * 3
        cut[a] = peak[a]
        if volume is not None:  # raw or HU: window by percentiles
            vol = np.asarray(volume).reshape(heat.shape)
            lo, hi = np.percentile(vol[::2, ::2, ::2], [1, 99])
            ax.imshow(vol[tuple(cut)].T, cmap="gray", origin="lower", vmin=lo, vmax=hi)
        im = ax.imshow(heat[tuple(cut)].T, cmap="jet", origin="lower", alpha=0.45)
        ax.set_title(f"file axis {a} = {peak[a]}", fontsize=8)
        ax.axis("off")
    fig.colorbar(im, ax=list(axes), shrink=0.8)
    fig.suptitle(title, fontsize=9)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def _heatmap_input(path, cfg: ModelConfig):
    """A single scan -> (model input (1, 1, X, Y, Z), Geometry, HU in file order or None)."""
    path = Path(path)
    if path.suffix == ".npy":
        hu = np.load(path)
        if tuple(hu.shape) != tuple(cfg.image_size):
            raise ValueError(f"{path}: preprocessed volume {hu.shape}, the model expects "
                             f"{tuple(cfg.image_size)}")
        geom, shown = model_geometry(cfg), hu
    else:
        raw, spacing = data_lib.load_nifti(path)  # checks the file, the shape and the spacing
        img = nib.load(str(path))
        geom = input_geometry(img.shape, img.affine, spacing, cfg, img.header)
        hu = data_lib.preprocess_volume(raw, spacing, cfg.spacing, cfg.image_size)
        shown = np.asanyarray(img.dataobj)
    x = data_lib.normalize(torch.from_numpy(np.asarray(hu, np.float32)))[None, None]
    return x, geom, shown


def write_scan_heatmaps(maps, geom: Geometry, shown, name: str, findings, out_dir,
                        kind: str = "score") -> list:
    """One scan's patch maps (F, gx, gy, gz) -> out_dir/<name>_<finding>.nii.gz on the scan's own
    grid (+ a .png of three slices through the maximum when matplotlib is installed)."""
    written, png = [], True
    for f, m in zip(findings, maps):
        heat = to_input_grid(m, geom)
        base = Path(out_dir) / f"{name}_{_slug(f)}"
        written.append(write_heatmap(heat, geom, base.with_name(base.name + ".nii.gz")))
        png = png and write_heatmap_png(heat, shown, base.with_name(base.name + ".png"),
                                        f"{name}: {f} ({kind})")
    if not png:
        print("eval: matplotlib is not installed, heat map PNGs skipped (the NIfTI maps are written)")
    return written


# ----------------------------------------------------------------------------- grounding score

def grounding_metrics(heat, mask, geom: Geometry) -> dict:
    """One finding's map against its painted mask, both on the input grid, over the voxels the
    model saw. hit: the map's maximum lies in the mask; hit_patch: within one patch of it (the mask
    dilated by a box of one patch per axis); chance / chance_patch: the hit rate of a uniformly random
    point (the volume fraction of the mask / of the dilated mask); auroc: map values inside vs
    outside the mask (chance 0.5)."""
    inside = geom.inside
    heat = np.asarray(heat).reshape(inside.shape)
    m = np.asarray(mask).reshape(inside.shape) > 0
    peak = np.unravel_index(np.argmax(np.where(inside, heat, -np.inf)), heat.shape)
    near = torch.from_numpy(m.astype(np.float32))[None, None]
    for a, k in enumerate(geom.tolerance):  # box dilation, one axis at a time
        size, pad = [1, 1, 1], [0, 0, 0]
        size[a], pad[a] = 2 * k + 1, k
        near = torch.nn.functional.max_pool3d(near, size, stride=1, padding=pad)
    near = near[0, 0].numpy() > 0
    return dict(hit=float(m[peak]), hit_patch=float(near[peak]), chance=float(m[inside].mean()),
                chance_patch=float(near[inside].mean()), auroc=auroc(heat[inside], m[inside]))


def grounding_summary(rows, n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> dict:
    """Per finding (and the macro mean over findings): mean of each metric over its volumes and a
    percentile bootstrap interval of the mean AUROC (volumes resampled). A finding "beats chance"
    when the interval's lower end is above 0.5; the pointing game is reported beside its chance."""
    keys = ("hit", "hit_patch", "chance", "chance_patch", "auroc")
    rng, out = np.random.default_rng(seed), {}
    for f in dict.fromkeys(r["finding"] for r in rows):
        mine = [r for r in rows if r["finding"] == f and not math.isnan(r["auroc"])]
        if not mine:
            continue
        entry = {k: float(np.mean([r[k] for r in mine])) for k in keys}
        a = np.array([r["auroc"] for r in mine])
        draws = a[rng.integers(0, len(a), (max(n_boot, 1), len(a)))].mean(1)
        lo, hi = percentile_ci(draws, level)
        out[f] = dict(n=len(mine), **entry, auroc_ci=[float(lo), float(hi)],
                      beats_chance=bool(lo > 0.5))
    macro = {k: float(np.mean([e[k] for e in out.values()])) for k in keys} if out else {}
    return dict(per_finding=out, macro=macro)


GROUNDING_COLUMNS = ("finding", "n", "hit", "chance", "hit_patch", "chance_patch", "auroc",
                     "auroc_lo", "auroc_hi", "beats_chance")


def grounding_rows(summary: dict):
    """grounding_summary -> (header, rows) for grounding.csv (the macro row last)."""
    rows = []
    for f, e in list(summary["per_finding"].items()) + [("macro mean", summary["macro"])]:
        ci = e.get("auroc_ci", ["", ""])
        rows.append([f, e.get("n", ""), e["hit"], e["chance"], e["hit_patch"], e["chance_patch"],
                     e["auroc"], *ci, e.get("beats_chance", "")])
    return list(GROUNDING_COLUMNS), rows


def format_grounding(summary: dict, kind: str) -> str:
    """Markdown table of grounding_summary (pointing game beside its chance level, AUROC and CI)."""
    lines = [f"| finding ({kind} map) | n | pointing | chance | pointing ±1 patch | chance | "
             "AUROC in vs out [95% CI] | beats chance |", "|---|---|---|---|---|---|---|---|"]
    for f, e in list(summary["per_finding"].items()) + [("macro mean", summary["macro"])]:
        ci = e.get("auroc_ci")
        auc = _fmt(e["auroc"]) + (f" [{_fmt(ci[0])}, {_fmt(ci[1])}]" if ci else "")
        verdict = {True: "yes", False: "no"}.get(e.get("beats_chance"), "")
        lines.append(f"| {f} | {e.get('n', '')} | {_fmt(e['hit'])} | {_fmt(e['chance'])} | "
                     f"{_fmt(e['hit_patch'])} | {_fmt(e['chance_patch'])} | {auc} | {verdict} |")
    return "\n".join(lines)


def _data_sources(path, split) -> dict:
    """{volume name: source NIfTI path} of a CT-RATE-layout --data; {} for a preprocessed dir."""
    try:
        jobs, _ = ctrate_jobs(path, split)
    except (FileNotFoundError, ValueError):
        return {}
    return {j["name"]: Path(j["src"]) for j in jobs}


@torch.no_grad()
def run_grounding(args, cfg: EvalConfig, device) -> dict:
    """--data with --heatmap / --grounding: heat maps of the first --heatmap_n volumes, and the
    grounding score of every volume's positive findings against the masks of prepare.phantom --masks."""
    if args.heatmap_n < 0:
        raise ValueError(f"--heatmap_n must be >= 0, got {args.heatmap_n}")
    model, tokenizer, _ = load_checkpoint(args.ckpt, device)
    out = writable_dir(args.heatmap, "--heatmap") if args.heatmap else None
    records = load_split(args.data, args.split, model.cfg, args)
    classes = list(records[0].classes)
    findings = list(args.findings or classes)
    check_findings(tokenizer, findings, cfg, model.cfg)
    sources = _data_sources(args.data, args.split or "valid")
    if args.grounding:
        unknown = [f for f in findings if f not in classes]
        if unknown:
            raise ValueError(f"--findings {unknown}: --grounding scores label classes of --data, "
                             f"one of {classes}")
        if not sources:
            raise ValueError(f"--grounding needs a CT-RATE-layout --data with masks (python -m "
                             f"prepare.phantom --masks), got {args.data}")
    rows, missing = [], 0
    for i, r in enumerate(records if args.grounding else records[:args.heatmap_n]):
        src = sources.get(r.name)
        img = nib.load(str(src)) if src is not None else None
        geom = (input_geometry(img.shape, img.affine, r.spacing, model.cfg, img.header)
                if img is not None else model_geometry(model.cfg))
        x = data_lib.load_volume(r.npy_path)[None].to(device)  # (1, 1, X, Y, Z)
        maps = patch_maps(model, tokenizer, x, findings, cfg, args.heatmap_kind)[0].cpu().numpy()
        if out is not None and i < args.heatmap_n:
            shown = np.asanyarray(img.dataobj) if img is not None else np.load(r.npy_path)
            write_scan_heatmaps(maps, geom, shown, r.name, findings, out, args.heatmap_kind)
        for f, m in zip(findings, maps):
            if not args.grounding or src is None or not r.labels[classes.index(f)]:
                continue
            path = mask_path(src.parents[3], src.name, f)
            if not path.is_file():
                missing += 1
                continue
            mask = np.asanyarray(nib.load(str(path)).dataobj)
            rows.append(dict(finding=f, volume=r.name, **grounding_metrics(to_input_grid(m, geom),
                                                                           mask, geom)))
    if out is not None:
        print(f"eval: heat maps of {min(args.heatmap_n, len(records))} volumes -> {out}")
    if not args.grounding:
        return {}
    if not rows:
        raise ValueError(f"{args.data}: no finding mask found (write the set with python -m "
                         f"prepare.phantom --masks)")
    rows.sort(key=lambda r: findings.index(r["finding"]))  # table rows in --findings order
    summary = grounding_summary(rows, cfg.n_boot, cfg.seed)
    summary.update(kind=args.heatmap_kind, volumes=len(records), pairs=len(rows), missing_masks=missing)
    write_grounding(summary, args.out_dir)
    return summary


def write_grounding(summary: dict, out_dir) -> Path:
    """Print the grounding table and write grounding.md, grounding.csv and grounding.json."""
    table = format_grounding(summary, summary["kind"])
    print(table)
    od = writable_dir(out_dir, "--out_dir")
    _write_atomic(od / "grounding.md", table + "\n")
    _write_atomic(od / "grounding.csv", _csv_text(*grounding_rows(summary)))
    _write_atomic(od / "grounding.json", json.dumps(_jsonable(summary), indent=2))
    missing = summary["missing_masks"]
    print(f"grounding of {summary['pairs']} (volume, finding) pairs in {summary['volumes']} volumes"
          + (f", {missing} positive findings without a mask" if missing else "") + f" -> {od}")
    return od


# ----------------------------------------------------------------------------- what eval.py reads

def read_checkpoint(path) -> dict:
    """A checkpoint file -> its dict, with weights_only loading (nothing in it is executed).

    Every way a file can fail to be a BrgSA checkpoint (missing, truncated, corrupt, pickled objects
    that are not plain data, keys or config fields this code does not know) becomes one ValueError
    or FileNotFoundError that names the file; torch's own message is kept out because it advises
    weights_only=False, which would execute an untrusted file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "unsupported global" in str(e).lower():  # torch's refusal of a pickled class
            raise ValueError(f"{path}: holds objects other than tensors and plain data, so it was "
                             f"not loaded (not a checkpoint written by train.py)") from None
        raise ValueError(f"{path}: corrupt or truncated checkpoint, cannot be read") from None
    except Exception as e:  # truncated zip, bad magic number, EOF: torch raises several types
        raise ValueError(f"{path}: corrupt or truncated checkpoint, cannot be read "
                         f"({type(e).__name__})") from None
    missing = [k for k in ("model", "model_config", "tokenizer")
               if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise ValueError(f"{path}: not a BrgSA checkpoint (missing {missing})")
    known = {f.name for f in fields(ModelConfig)}
    unknown = sorted(set(ckpt["model_config"]) - known)
    if unknown:
        raise ValueError(f"{path}: model_config has field(s) {unknown} that this code's ModelConfig "
                         f"does not know (written by another version?)")
    return ckpt


def checkpoint_config(ckpt: dict) -> ModelConfig:
    """The ModelConfig stored in a checkpoint read by read_checkpoint (lists back to tuples)."""
    return ModelConfig(**{k: tuple(v) if isinstance(v, list) else v
                          for k, v in ckpt["model_config"].items()})


def load_checkpoint(path, device):
    """-> (model, tokenizer, checkpoint dict); weights_only loading, clear error on mismatch."""
    ckpt = read_checkpoint(path)
    model = BrgSA(checkpoint_config(ckpt))
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:  # torch lists every mismatched tensor: the first two say enough
        lines = [line.strip() for line in str(e).splitlines()[1:] if line.strip()]
        raise ValueError(f"{path}: weights do not match the stored config ({'; '.join(lines[:2])}"
                         f"{f'; {len(lines) - 2} more' if len(lines) > 2 else ''})") from None
    return model.to(device).eval(), data_lib.tokenizer_from_string(ckpt["tokenizer"]), ckpt


def parse_device(name: str) -> torch.device:
    """--device (auto, cpu, cuda, cuda:N) -> torch.device; a clear error when it is not there."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device: expected auto, cpu, cuda or cuda:N, got {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA GPU is available here (use cpu or auto)")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: only {torch.cuda.device_count()} GPU(s) here")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device: expected auto, cpu, cuda or cuda:N, got {name!r}")
    return device


def read_score_csv(path) -> tuple:
    """CSV with the volume name first and one column per class -> (names, classes, (N, C) array)."""
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8") as f:
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


CLASS_SETS = ("auto", "ctrate", "ctrate_lt", "radchest")


def class_setup(name: str, records, label_csv=None):
    """--classes -> (label class names, score_map or None). auto: RAD-ChestCT's mapping for
    RAD-ChestCT records, else the class columns of --label_csv when given (any names: the
    prompts are written from them), else the classes the records carry."""
    have = tuple(records[0].classes) if records else data_lib.CTRATE_CLASSES
    if name == "auto":
        name = ("radchest" if have == data_lib.RADCHEST_CLASSES else
                "label_csv" if label_csv else "records")
    if name == "label_csv":
        return list(data_lib.label_columns(label_csv)[1]), None
    if name == "records":
        if not have:
            raise ValueError("--data: its volumes carry no labels; give --label_csv CSV (volume "
                             "name, then one 0/1 column per class) or preprocess the folder with "
                             "python -m prepare.preprocess --dataset folder --labels CSV")
        return list(have), None
    if name == "ctrate":
        return list(data_lib.CTRATE_CLASSES), None
    if name == "radchest":  # 18 CT-RATE prompts, mapped to RAD-ChestCT's 16 classes
        return list(data_lib.RADCHEST_CLASSES), data_lib.ctrate_to_radchest
    if name == "ctrate_lt":
        return list(data_lib.CTRATE_LT_CLASSES), None
    raise ValueError(f"unknown --classes {name!r}; expected auto, ctrate, ctrate_lt or radchest")


def select_labels(records, classes, label_csv=None, what="--data"):
    """Records with labels in `classes` order: from label_csv (matched by volume name) or their own
    columns (matched by class name); a clear error names what is missing."""
    if label_csv:
        table = data_lib.read_labels(label_csv, classes, data_lib.label_columns(label_csv)[0])
        # a folder volume 'sub__scan' (prepare.preprocess --dataset folder) also matches 'scan'
        lab = {r.name: table.get(r.name, table.get(r.name.split("__")[-1])) for r in records}
        missing = [n for n, v in lab.items() if v is None]
        if missing:
            raise ValueError(f"{label_csv}: {len(missing)} volumes of {what} have no labels, "
                             f"e.g. {missing[:3]}")
    else:
        have = list(records[0].classes) if records else []
        missing = [c for c in classes if c not in have]
        if missing:
            raise ValueError(f"{what}: no label column for classes {missing} (give --label_csv)")
        lab = {r.name: np.asarray(r.labels)[[have.index(c) for c in classes]] for r in records}
    return [replace(r, labels=lab[r.name], classes=tuple(classes)) for r in records]


# ----------------------------------------------------------------------------- what eval.py writes: tables

def _fmt(x, digits=3):
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
        auc = _fmt(m["auc"]) + (f" [{_fmt(ci[0])}, {_fmt(ci[1])}]" if ci else "")
        cells = [f"{_fmt(m.get(p, {}).get(k)):>{len(h)}s}" for p in protos
                 for k, h in zip(THRESHOLDED, heads)]
        return (f"| {name:34s} | {pos:>4} | {auc:20s} | {_fmt(m['auprc'])} | "
                + " | ".join(cells) + " |")

    for name, m in result["per_class"].items():
        lines.append(row(name, m["positives"], m))
    lines.append(row("macro mean", "", result["macro"]))
    if result.get("retrieval"):
        first = next(iter(result["retrieval"].values()))["volume_to_report"]
        ks = [k for k in first if k.startswith("R@")]
        lines += ["", "| similarity | direction        | " + " | ".join(f"{k:>5s}" for k in ks)
                  + " |  mAP  |",
                  "|------------|------------------|" + "|".join("-------" for _ in ks) + "|-------|"]
        for space, d in result["retrieval"].items():
            for direction, m in d.items():
                lines.append(f"| {space:10s} | {direction:16s} | " + " | ".join(_fmt(m[k]) for k in ks)
                             + f" | {_fmt(m['mAP'])} |")
    if result.get("modality_gap"):
        lines += ["", "| embeddings          | centroid dist | cos true pairs | cos random pairs "
                  "| probe acc |", "|---------------------|---------------|----------------|"
                  "------------------|-----------|"]
        for space, m in result["modality_gap"].items():
            label = "raw (v, t)" if space == "raw" else "bank (v_hat, t_hat)"
            lines.append(f"| {label:19s} | {_fmt(m['centroid_distance']):>13s} | "
                         f"{_fmt(m['true_pair_cos']):>14s} | {_fmt(m['random_pair_cos']):>16s} | "
                         f"{_fmt(m['probe_acc']):>9s} |")
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


# ----------------------------------------------------------------------------- what eval.py writes: files

def _jsonable(x):
    """nan -> null (strict JSON), numpy scalars -> Python numbers."""
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (float, np.floating)):
        return None if math.isnan(x) else float(x)
    return x.item() if isinstance(x, np.generic) else x


def _write_atomic(path: Path, text: str):
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def _csv_text(header, rows) -> str:
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
    _write_atomic(path, json.dumps(_jsonable(summary), indent=2))
    _write_atomic(out / "metrics.csv", _csv_text(*metrics_rows(result)))
    if arrays is not None:
        # repr: the shortest text that reads back to the same float, so files re-evaluate exactly
        for fname, key, fmt in (("scores.csv", "scores", lambda x: repr(float(x))),
                                ("labels.csv", "labels", str)):
            rows = [[n] + [fmt(x) for x in r] for n, r in zip(arrays["names"], arrays[key])]
            _write_atomic(out / fname, _csv_text(["VolumeName"] + list(result["classes"]), rows))
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
        ax.set_title(f"{c[:28]}\nAUROC {_fmt(m['auc'])}", fontsize=7)
        ax.tick_params(labelsize=6)
    axes.flat[0].legend(fontsize=6, loc="lower right")
    fig.suptitle("ROC per class (x FPR, y TPR): roc_corner = threshold picked on the evaluated rows "
                 "(optimistic), calibrated = frozen threshold on the test rows", fontsize=8)
    fig.tight_layout()
    written = [out / "roc_curves.png"]
    fig.savefig(written[0], dpi=110)
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
                         f"{_fmt(g['centroid_distance'])}, probe {_fmt(g['probe_acc'])}", fontsize=8)
            ax.legend(fontsize=7)
        fig.tight_layout()
        written.append(out / "modality_gap.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    return written


# ----------------------------------------------------------------------------- metrics: the engine

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


# ----------------------------------------------------------------------------- metrics: single-shot helpers

def auroc(scores, labels) -> float:
    """Area under the ROC curve, ties counted half; nan when only one class is present."""
    return float(ranked_metrics(scores, labels, np.ones((1, len(scores))))["auc"][0])


def auprc(scores, labels) -> float:
    """Average precision (area under the precision-recall step curve); nan without a positive."""
    return float(ranked_metrics(scores, labels, np.ones((1, len(scores))))["auprc"][0])


def roc_corner_threshold(scores, labels) -> float:
    """Threshold whose (FPR, TPR) lies closest to (0, 1); predictions are `score > threshold`.

    Every distinct score is a candidate, as in the official BrgSA script (CT-CLIP's scans a 0..1
    grid, which assumes probabilities; cosine scores live in [-1, 1]). Ties in distance go to the
    lowest threshold (more positives); official_threshold gives the official rule (the highest).
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


# ----------------------------------------------------------------------------- metrics: bootstrap

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


# ----------------------------------------------------------------------------- metrics: the official procedure

def official_threshold(scores, labels) -> float:
    """The official BrgSA threshold: the distinct score t closest to (FPR, TPR) = (0, 1) for the
    rule `score > t`, candidates scanned ascending with `<=`, so ties go to the *highest* threshold
    (bootstrap_evaluation/bootstrap_performance.py, find_ours_threshold). nan with one class only."""
    runs = Runs(scores)
    P, T = runs.sums(np.ones((1, len(scores))), np.asarray(labels).astype(bool))
    cum_p, cum_n = np.cumsum(P[:, 0]), np.cumsum(T[:, 0] - P[:, 0])  # at or below each distinct score
    if cum_p[-1] == 0 or cum_n[-1] == 0:
        return float("nan")
    d = np.square(cum_p / cum_p[-1]) + np.square(1.0 - cum_n / cum_n[-1])  # (1-TPR)^2 + FPR^2
    return float(runs.values[len(d) - 1 - np.argmin(d[::-1])])  # last minimum


def official_bootstrap(scores, labels, classes, n_boot: int = 5000, block: int = 250) -> dict:
    """The official BrgSA bootstrap: thresholds frozen on the full set (official_threshold), then
    n_boot volume-level resamples, resample i drawn by np.random.seed(i) and
    np.random.choice(N, N, replace=True); each metric's headline is its mean over the resamples.

    scores, labels (N, C) -> {"per_class": {class: {metric: mean}}, "macro": {...}, "n": n_boot}.
    Resamples without both classes of a class are left out of that class's mean (nan-mean).
    """
    scores, labels = np.asarray(scores, np.float64), np.asarray(labels) > 0
    N, C = scores.shape
    thr = np.array([official_threshold(scores[:, j], labels[:, j]) for j in range(C)])
    keys = ("auc", "auprc") + THRESHOLDED
    samples = {k: np.empty((n_boot, C)) for k in keys}
    for a in range(0, n_boot, block):
        idx = [np.random.RandomState(i).choice(N, size=N, replace=True)
               for i in range(a, min(a + block, n_boot))]
        w = np.stack([np.bincount(i, minlength=N) for i in idx]).astype(np.float32)  # (B, N) draws
        for j in range(C):
            r = ranked_metrics(scores[:, j], labels[:, j], w)
            c = confusion_at(scores[:, j], labels[:, j], np.full(len(w), thr[j]), w)
            ok = np.isfinite(r["auc"])  # the official script needs both classes in a resample
            m = dict(auc=r["auc"], auprc=r["auprc"], **confusion_metrics(**c))
            for k in keys:
                samples[k][a:a + len(w), j] = np.where(ok, m[k], np.nan)
    per_class = {c: dict(threshold=float(thr[j]),
                         **{k: float(_nanmean(samples[k][:, j], 0)) for k in keys})
                 for j, c in enumerate(classes)}
    macro = {k: float(_nanmean(_nanmean(samples[k], 1), 0)) for k in keys}
    return dict(n=n_boot, unit="volume", per_class=per_class, macro=macro,
                note="official BrgSA procedure: thresholds frozen on the full set, the mean over "
                     "volume-level resamples (seed i) is the headline; no interval")


# ----------------------------------------------------------------------------- metrics: calibration split

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


# ----------------------------------------------------------------------------- metrics: retrieval

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


# ----------------------------------------------------------------------------- metrics: modality gap

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


# ----------------------------------------------------------------------------- command line

class DefaultsHelp(argparse.RawTextHelpFormatter):
    """--help as written (the usage examples keep their layout), each flag followed by its default
    unless it has none or its help already states it."""

    def _get_help_string(self, action):
        text, default = action.help or "", action.default
        if default == argparse.SUPPRESS or "default" in text:
            return text
        return f"{text} (default: {'empty' if default == '' else default})"


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=DefaultsHelp)
    p.add_argument("--ckpt", help="checkpoint written by train.py (model, config and tokenizer): "
                                  "out_dir/best.pt, the model it kept, or out_dir/ckpt.pt, the last step")
    p.add_argument("--data", help="data set: a CT-RATE-layout root or a preprocessed directory")
    p.add_argument("--split", choices=("train", "valid"), help="which split of --data to "
                   "evaluate (None: valid where --data has splits; refused for a folder without)")
    p.add_argument("--out_dir", default="out", help="where eval.json, CSVs and plots are written")
    p.add_argument("--scores", help="score-file mode: CSV of precomputed per-volume scores")
    p.add_argument("--labels", help="score-file mode: CSV of 0/1 labels, matched by name")
    p.add_argument("--volume", help="single-scan mode: a NIfTI CT in HU (or a preprocessed .npy)")
    p.add_argument("--allow_non_hu", action="store_true", help="single-scan mode: score a volume "
                   "that does not look like a CT in HU (no air, values out of range); default: refuse")
    p.add_argument("--findings", nargs="+", help="single-scan mode: abnormalities to score "
                                                 "(None: the 18 CT-RATE classes)")
    p.add_argument("--summaries", help="summary cache (JSONL) of the training run, e.g. "
                   "out/summaries_rules.jsonl; reports missing from it are summarised with the rules")
    p.add_argument("--thresholds", help="single-scan mode: eval.json whose calibrated thresholds "
                   "turn scores into positive / negative calls")
    p.add_argument("--classes", default="auto", help="label classes with --data: auto (--label_csv's "
                   "class columns when given, else what the data carries), ctrate (18), ctrate_lt "
                   "(15, needs --label_csv), radchest (16: 18 CT-RATE prompts mapped, calcifications "
                   "merged by max)")
    p.add_argument("--label_csv", help="labels for --data from this CSV: VolumeName (or the first "
                   "column), then one 0/1 column per class; prompts are written from the class names")
    p.add_argument("--protocol", default="brgsa", choices=sorted(PROTOCOLS),
                   help="brgsa: the model's prompt ('There is {}'; tiny: '{}.'), 1/2[cos(v,t)+cos(v_hat,t)]; "
                        "ctclip: present / not present pair, softmax")
    p.add_argument("--template", action="append", default=[], help="prompt template with {} "
                   "(repeatable, scores averaged); ctclip: 'POS {}|NEG {}'")
    p.add_argument("--synonyms", help="JSON {class: [names...]}: prompt ensemble over the names")
    p.add_argument("--calib_fraction", type=float, default=0.3, help="patient-grouped share of the "
                   "evaluated rows used only to pick the calibrated thresholds (0 = none)")
    p.add_argument("--calib_data", help="pick calibrated thresholds on this data set instead")
    p.add_argument("--calib_split", choices=("train", "valid"), help="split of --calib_data "
                   "(None: valid where --calib_data has splits)")
    p.add_argument("--exclude_calib", action="store_true", help="compute AUROC, AUPRC and the "
                   "ROC-corner metrics on the test rows only (off: on all evaluated rows)")
    p.add_argument("--n_boot", type=int, default=1000, help="bootstrap resamples (0 = no intervals)")
    p.add_argument("--boot_unit", default="patient", choices=["patient", "volume"],
                   help="resampling unit: patient (reconstructions move together) or volume")
    p.add_argument("--seed", type=int, default=0, help="calibration split, bootstrap, linear probe")
    p.add_argument("--bootstrap", default="ours", choices=["ours", "official"],
                   help="ours: the intervals above only; official: also the official BrgSA numbers "
                        "(thresholds frozen on all rows, mean over 5000 volume resamples, seed i), "
                        "comparable with the paper's tables (default: ours)")
    p.add_argument("--no_plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--batch_size", type=int, default=8, help="volumes per forward pass")
    p.add_argument("--workers", type=int, default=0, help="data-loader worker processes")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--heatmap", metavar="DIR", help="write a grounding heat map per finding to DIR: "
                   "NIfTI on the input's own grid and affine (+ PNG with matplotlib); with --volume "
                   "for that scan, with --data for the first --heatmap_n volumes (default: none)")
    p.add_argument("--heatmap_n", type=int, default=4, help="--data mode: volumes that get heat "
                   "maps (default: 4)")
    p.add_argument("--heatmap_kind", default="score", choices=HEATMAP_KINDS, help="per-patch map: "
                   "score = 1/2[cos(u,t)+cos(u_hat,t)] (the zero-shot rule), raw = cos(u,t), "
                   "bank = cos(u_hat,t) (default: score)")
    p.add_argument("--grounding", action="store_true", help="with --data: score the maps against "
                   "the finding masks of prepare.phantom --masks (pointing game, AUROC in vs out) "
                   "instead of the diagnosis evaluation; writes grounding.md/.csv/.json to --out_dir "
                   "(default: off)")
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
    if args.batch_size < 1 or args.workers < 0:
        raise ValueError(f"--batch_size must be >= 1 and --workers >= 0, got {args.batch_size} "
                         f"and {args.workers}")
    if not 0.0 <= args.calib_fraction < 1.0:
        raise ValueError(f"--calib_fraction must be in [0, 1), got {args.calib_fraction}")
    if args.classes not in CLASS_SETS:  # checked here, before --data is preprocessed
        raise ValueError(f"unknown --classes {args.classes!r}; expected one of {list(CLASS_SETS)}")
    return EvalConfig(protocol=args.protocol, templates=tuple(args.template), synonyms=synonyms,
                      calib_fraction=args.calib_fraction, exclude_calib=args.exclude_calib,
                      n_boot=args.n_boot, boot_unit=args.boot_unit, seed=args.seed)


def load_split(path, split, model_cfg, args, flag="--split"):
    """Records of `split` of --data (or --calib_data), preprocessing a raw CT-RATE root under
    --out_dir. split None means "valid" where the data has splits; an explicit split is refused
    for a data set without splits (a folder of one's own scans) instead of being ignored."""
    cache = ensure_cache(path, split or "valid", model_cfg, workers=max(args.workers, 1),
                         out_dir=args.out_dir)
    records = data_lib.load_dataset(cache, split or "valid", model_cfg)
    has_splits = data_lib.find_index(cache, split or "valid") == Path(cache) / (split or "valid") or any(
        r.name.startswith(("train_", "valid_")) for r in records)
    if split is not None and not has_splits:
        raise ValueError(f"{flag} {split}: {path} has no splits (its volume names carry no "
                         f"train_/valid_ prefix); leave {flag} out to evaluate every volume")
    if not records:
        raise ValueError(f"{path}: no volumes to evaluate")
    return records


def _run_model(args, cfg, device):
    model, tokenizer, _ = load_checkpoint(args.ckpt, device)
    records = load_split(args.data, args.split, model.cfg, args)
    classes, score_map = class_setup(args.classes, records, args.label_csv)
    records = select_labels(records, classes, args.label_csv)
    calib_loader = None
    if args.calib_data:
        calib = load_split(args.calib_data, args.calib_split, model.cfg, args, "--calib_split")
        calib = select_labels(calib, classes, args.label_csv, "--calib_data")
        overlap = {r.name for r in calib} & {r.name for r in records}
        if overlap:
            raise ValueError(f"--calib_data shares {len(overlap)} volumes with --data, "
                             f"e.g. {sorted(overlap)[:3]}")
        calib_loader = data_lib.eval_loader(calib, args.batch_size, args.workers)
    loader = data_lib.eval_loader(records, args.batch_size, args.workers)
    summaries = None
    if args.summaries:  # the training run's cache: retrieval embeds exactly the texts it trained on
        cache = summarize.load_cache(args.summaries)
        keys = {r.report: summarize.report_key(r.report) for r in records}
        summaries = {text: cache[k] for text, k in keys.items() if k in cache}
    return zero_shot(model, tokenizer, loader, classes, device, cfg, calib_loader, summaries,
                     score_map)


def main(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    cfg = eval_config(args)
    device = parse_device(args.device)
    if args.volume:
        if not args.ckpt:
            p.error("--volume needs --ckpt")
        model, tokenizer, _ = load_checkpoint(args.ckpt, device)
        findings = args.findings or list(data_lib.CTRATE_CLASSES)
        out = writable_dir(args.heatmap, "--heatmap") if args.heatmap else None
        scores = score_scan(model, tokenizer, args.volume, findings, device, cfg, args.allow_non_hu)
        thresholds = read_thresholds(args.thresholds, cfg.protocol) if args.thresholds else {}
        print_scan(args.volume, scores, thresholds, cfg.protocol)
        if out is not None:
            x, geom, shown = _heatmap_input(args.volume, model.cfg)
            maps = patch_maps(model, tokenizer, x.to(device), findings, cfg, args.heatmap_kind)
            name = data_lib.volume_key(args.volume)
            written = write_scan_heatmaps(maps[0].cpu().numpy(), geom, shown, name, findings, out,
                                          args.heatmap_kind)
            print(f"eval: {len(written)} heat maps ({args.heatmap_kind}) -> {out}")
        return scores
    if args.scores or args.labels:
        if not (args.scores and args.labels):
            p.error("--scores and --labels go together")
        result = evaluate_score_files(args.scores, args.labels, cfg)
    else:
        if not (args.ckpt and args.data):
            p.error("give --ckpt and --data, --scores and --labels, or --ckpt and --volume")
        if args.heatmap or args.grounding:
            return run_grounding(args, cfg, device)
        result = _run_model(args, cfg, device)
    n_auc = sum(math.isfinite(a) for a in result["auc"].values())
    if n_auc == 0:
        raise ValueError(f"{args.labels or args.label_csv or args.data}: no class has both positive "
                         f"and negative labels among the {result['n_volumes']} evaluated volumes, "
                         f"so AUROC is undefined; nothing written")
    if args.bootstrap == "official":
        a = result["arrays"]
        result["official"] = official_bootstrap(a["scores"], a["labels"], result["classes"])
    print(format_table(result))
    path = write_result(result, args.out_dir, plots=not args.no_plots)
    rows = result["rows"]
    print(f"opt = ROC-corner threshold picked on the evaluated rows (optimistic); cal = picked on "
          f"{rows['n_calib']} calibration volumes, scored on {rows['n_test']} test volumes")
    for note in result["notes"]:
        print(f"note: {note}", file=sys.stderr)
    print(f"macro AUROC {result['macro_auc']:.4f} over {n_auc} of {len(result['auc'])} classes, "
          f"{result['n_volumes']} volumes; eval.json -> {path}")
    if "official" in result:
        o = result["official"]
        print(f"official bootstrap: macro AUROC {o['macro']['auc']:.4f}, F1 {o['macro']['f1']:.4f}, "
              f"ACC {o['macro']['acc']:.4f} (mean over {o['n']} volume resamples)")
    return result


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"eval.py: error: {e}")
