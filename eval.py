"""Zero-shot diagnosis with a BrgSA checkpoint: any abnormality written as text, scored on any CT.

The protocol of the paper (section 4) and the official inference (zero_shot_3d.py):
  1. embed every volume once, in fp32:       v = ViT3D(volume)                      (N, d)
  2. embed one prompt per class, once:       t_c = TextEncoder("There is {c}")      (C, d)
     (the CPU presets, whose text tower never saw "There is", use the prompt "{c}.")
  3. score every pair:                       score(V, c) = 1/2 [cos(v, t_c) + cos(CMKI(v), t_c)]
  4. per class, the AUROC of the scores against the labels; the macro mean over the classes.
CT-CLIP's protocol is the second option (--protocol ctclip): "{c} is present." vs "{c} is not
present.", a softmax over the pair of similarities / tau.

Everything reported beyond that — bootstrap intervals, thresholded metrics on a calibration split,
the official bootstrap procedure, retrieval and the modality gap, grounding heat maps, the tables and
files — comes from the instruments in analysis/, which this file calls.

    python eval.py --ckpt out/best.pt --data data_synth/n1000_seed0/dataset --out_dir out
    python eval.py --ckpt out/best.pt --volume scan.nii.gz --findings "pleural effusion" "lung nodule"
    python eval.py --ckpt out/best.pt --volume scan.nii.gz --findings "pleural effusion" --heatmap maps
    python eval.py --ckpt out/best.pt --data DIR/dataset --grounding --out_dir out/grounding
    python eval.py --scores S.csv --labels L.csv --out_dir D         # precomputed scores
    python eval.py --help                                            # every flag
"""
import argparse
import math
import re
import sys
from dataclasses import dataclass

import numpy as np
import torch

import data as data_lib
from analysis import files, grounding, metrics, official, retrieval
from model import BrgSA, pick_device
from prepare import summarize
from prepare.files import checkpoint_config, read_checkpoint
from prepare.preprocess import check_hu, records_of
from prepare.tables import CLASS_SETS, class_setup, select_labels

CTCLIP_TEMPLATE = "{} is present.|{} is not present."


@dataclass
class EvalConfig:
    protocol: str = "brgsa"      # brgsa (the paper) or ctclip (present / not present pair)
    templates: tuple = ()        # prompt templates with "{}" (ctclip: "POS|NEG"); () = the model's
    dtype: str = "float32"       # the embedding's precision: float32 (official) or bfloat16 (faster)
    calib_fraction: float = 0.3  # patient-grouped share of the rows used only to pick thresholds
    n_boot: int = 1000           # bootstrap resamples (0 = no intervals)
    boot_unit: str = "patient"   # resample patients (reconstructions move together) or volumes
    seed: int = 0                # calibration split, bootstrap and linear probe

    def metric_options(self) -> dict:
        return dict(calib_fraction=self.calib_fraction, n_boot=self.n_boot,
                    boot_unit=self.boot_unit, seed=self.seed)


# ----------------------------------------------------------------------------- the protocol

def load_checkpoint(path, device):
    """-> (model in eval mode, tokenizer, checkpoint dict); weights_only loading, clear errors."""
    ckpt = read_checkpoint(path)
    model = BrgSA(checkpoint_config(ckpt))
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:  # torch lists every mismatched tensor: the first two say enough
        lines = [line.strip() for line in str(e).splitlines()[1:] if line.strip()]
        raise ValueError(f"{path}: weights do not match the stored config ({'; '.join(lines[:2])}"
                         f"{f'; {len(lines) - 2} more' if len(lines) > 2 else ''})") from None
    return model.to(device).eval(), data_lib.tokenizer_from_string(ckpt["tokenizer"]), ckpt


@torch.no_grad()
def embed_volumes(model: BrgSA, loader, device, dtype: str = "float32"):
    """Step 1 -> v (N, d) float32 on device, labels (N, C) numpy, names list."""
    vs, labels, names = [], [], []
    for batch in loader:
        with torch.autocast(device.type, torch.bfloat16, enabled=dtype == "bfloat16"):
            vs.append(model.visual(batch["volume"].to(device, non_blocking=True)).float())
        labels.append(batch["labels"].numpy())
        names += list(batch["name"])
    if not vs:
        raise ValueError("no volumes to evaluate (the data set or split is empty)")
    return torch.cat(vs), np.concatenate(labels), names


def prompt_texts(classes, cfg: EvalConfig, model_prompt: str) -> list:
    """One list of texts per template: a prompt per class (brgsa), or the (present, not present)
    pair of each class in turn (ctclip)."""
    if cfg.protocol not in ("brgsa", "ctclip"):
        raise ValueError(f"unknown protocol {cfg.protocol!r}; expected brgsa or ctclip")
    if not len(classes):
        raise ValueError("no classes to score: give the data labels (--label_csv) or --findings")
    out = []
    for template in cfg.templates or ((model_prompt,) if cfg.protocol == "brgsa" else (CTCLIP_TEMPLATE,)):
        parts = template.split("|")
        if len(parts) != (2 if cfg.protocol == "ctclip" else 1) or any(p.count("{}") != 1 for p in parts):
            want = "'POS {}|NEG {}'" if cfg.protocol == "ctclip" else "one '{}'"
            raise ValueError(f"template {template!r} for protocol {cfg.protocol}: expected {want}")
        out.append([p.format(c) for c in classes for p in parts])
    return out


@torch.no_grad()
def embed_texts(model: BrgSA, tokenizer, texts: list, device, batch_size: int = 256) -> torch.Tensor:
    """Step 2 -> (T, d) float32."""
    out = []
    for i in range(0, len(texts), batch_size):
        ids, mask = data_lib.tokenize(tokenizer, texts[i:i + batch_size], model.cfg.max_len)
        out.append(model.text(ids.to(device), mask.to(device)).float())
    return torch.cat(out)


@torch.no_grad()
def score_volumes(model: BrgSA, tokenizer, v: torch.Tensor, classes, cfg: EvalConfig, device):
    """Step 3: (N, d) image embeddings -> (N, C) float64 numpy scores (several templates: the mean)."""
    per_template = []
    for texts in prompt_texts(classes, cfg, model.cfg.prompt):
        s = model.zero_shot_scores(v, embed_texts(model, tokenizer, texts, device))  # (N, C) or (N, 2C)
        if cfg.protocol == "ctclip":  # softmax over (present, not present) = sigmoid of the difference
            s = torch.sigmoid((s[:, 0::2] - s[:, 1::2]) / model.cfg.tau)
        per_template.append(s)
    return torch.stack(per_template).mean(0).cpu().numpy().astype(np.float64)


def auroc(scores, labels) -> float:
    """Step 4: P(s_pos > s_neg) + 1/2 P(s_pos = s_neg), from the ranks (Mann-Whitney U); nan when
    only one class is present. analysis/metrics.py computes the same number, with intervals."""
    s, y = np.asarray(scores, np.float64), np.asarray(labels).astype(bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    values, first, counts = np.unique(s, return_index=True, return_counts=True)  # sorted runs
    rank_of_value = np.searchsorted(values, s)
    mean_rank = (np.cumsum(counts) - (counts - 1) / 2.0)[rank_of_value]  # 1-based, ties averaged
    return float((mean_rank[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def macro_auc(scores, labels) -> float:
    """The mean AUROC over the classes that have both positives and negatives."""
    aucs = [auroc(scores[:, j], labels[:, j]) for j in range(scores.shape[1])]
    return float(np.nanmean(aucs)) if any(map(math.isfinite, aucs)) else float("nan")


def validation_auc(model: BrgSA, tokenizer, records, device, batch_size: int) -> float:
    """Steps 1-4 on a validation split, the model's own prompt: the number train.py keeps best.pt by."""
    v, labels, _ = embed_volumes(model, data_lib.eval_loader(records, batch_size), device)
    return macro_auc(score_volumes(model, tokenizer, v, data_lib.CTRATE_CLASSES, EvalConfig(), device),
                     labels)


def zero_shot(model: BrgSA, tokenizer, loader, classes, device, cfg: EvalConfig = None,
              calib_loader=None, summaries: dict = None, score_map=None) -> dict:
    """The protocol on every volume of loader, with the instruments' full report: per-class and
    macro AUROC, AUPRC and thresholded metrics with bootstrap intervals (analysis.metrics), and,
    when the records carry reports, retrieval and the modality gap (analysis.retrieval).
    score_map: the CT-RATE classes' (N, 18) scores -> the label classes' (RAD-ChestCT)."""
    cfg = cfg or EvalConfig()
    prompt_classes = data_lib.CTRATE_CLASSES if score_map else classes

    def scores_of(v):
        s = score_volumes(model, tokenizer, v, prompt_classes, cfg, device)
        return np.asarray(score_map(s), np.float64) if score_map else s

    v, labels, names = embed_volumes(model, loader, device, cfg.dtype)
    calib = None
    if calib_loader is not None:
        vc, lc, nc = embed_volumes(model, calib_loader, device, cfg.dtype)
        calib = (scores_of(vc), lc, nc)
    result = metrics.evaluate_scores(scores_of(v), labels, classes, names, calib,
                                     **cfg.metric_options())
    result["arrays"]["v"] = v  # (N, d) for another protocol on the same embeddings (train.py)
    rule = "cos(v, t)" if model.cfg.method == "clip" else "1/2 [cos(v, t) + cos(v_hat, t)]"
    result["protocol"] = dict(name=cfg.protocol, dtype=cfg.dtype, score=rule if cfg.protocol == "brgsa"
                              else f"softmax over (present, not present) of {rule} / tau",
                              prompts=prompt_texts(prompt_classes, cfg, model.cfg.prompt))
    records = getattr(loader.dataset, "records", None) or []
    reports = [r.report for r in records]
    if reports and len(reports) == len(names) and all(r and r.strip() for r in reports):
        texts = retrieval.report_texts(reports, summaries)
        uniq = list(dict.fromkeys(texts))
        index = {x: i for i, x in enumerate(uniq)}
        t = embed_texts(model, tokenizer, uniq, device)
        result["retrieval"], result["modality_gap"], result["arrays"]["gap_points"] = \
            retrieval.retrieval_and_gap(model, v, t, [index[x] for x in texts], cfg.seed)
        result["retrieval_note"] = (f"{len(uniq)} unique report texts (summaries joined) for "
                                    f"{len(names)} volumes; ties ranked pessimistically")
    return result


# ----------------------------------------------------------------------------- one scan

def check_findings(tokenizer, findings, cfg: EvalConfig, max_len: int, prompt: str) -> list:
    """--findings: refuse what cannot be scored (empty, longer than the text encoder's max_len
    tokens, or words that read as [UNK], e.g. non-Latin script) with one line; -> warnings for
    words the text tower never learned as words (read letter by letter), naming what the score
    then rests on."""
    unk, warnings = tokenizer.token_to_id("[UNK]"), []
    tokenizer.no_truncation()  # data.tokenize sets both again before every use
    tokenizer.no_padding()
    for f in findings:
        if not f.strip():
            raise ValueError("--findings: an empty finding; expected abnormality names such as "
                             "'pleural effusion'")
        for text in (t for texts in prompt_texts([f], cfg, prompt) for t in texts):
            enc = tokenizer.encode(text)
            if len(enc.ids) > max_len:
                raise ValueError(f"--findings: {f[:60]!r}... is {len(enc.ids)} tokens as a prompt; "
                                 f"the text encoder reads at most {max_len}")
        words = re.findall(r"\w+", f)
        pieces = {w: tokenizer.encode(w, add_special_tokens=False).tokens for w in words}
        bad = [w for w in words if unk is not None and unk in tokenizer.encode(w, add_special_tokens=False).ids]
        if bad:
            raise ValueError(f"--findings: {f!r} has words the tokenizer cannot read {bad}: characters "
                             f"its vocabulary never saw, which would all read as [UNK]")
        spelled = [w for w in words if len(pieces[w]) > 1 and  # mostly single letters
                   sum(len(p.lstrip("#")) == 1 for p in pieces[w]) * 2 > len(w)]
        if spelled:
            known = [w for w in words if w not in spelled]
            warnings.append(f"{f!r}: {', '.join(repr(w) for w in spelled)} never appeared as a word "
                            f"in training (read letter by letter: {' '.join(pieces[spelled[0]][:8])}"
                            f"{' ...' if len(pieces[spelled[0]]) > 8 else ''}); the score rests on "
                            + (f"{known}" if known else "letters alone and means little"))
    return warnings


def trained_on(ckpt: dict) -> str:
    """What a checkpoint's scans were: 'synthetic' (the phantom set) or the --data it named."""
    return ckpt.get("trained_on") or ("synthetic" if not ckpt.get("train_config", {}).get("data")
                                      else str(ckpt["train_config"]["data"]))


@torch.no_grad()
def score_scan(model: BrgSA, tokenizer, path, findings, device, cfg: EvalConfig = None,
               allow_non_hu: bool = False, scan=None) -> dict:
    """One CT (NIfTI in HU, or a preprocessed .npy at the model's grid) -> {finding: score}.

    The scan is resampled and cropped on the fly exactly as the data cache would store it (scan: that
    result, grounding.scan_input(path, model.cfg), when the caller has it already); unless
    allow_non_hu, a volume that does not look like a CT in HU is refused (prepare.preprocess.check_hu)."""
    cfg = cfg or EvalConfig()
    for w in check_findings(tokenizer, findings, cfg, model.cfg.max_len, model.cfg.prompt):
        print(f"warning: {w}", file=sys.stderr)
    x, _, hu = scan or grounding.scan_input(path, model.cfg)
    check_hu(hu, path, allow=allow_non_hu)
    with torch.autocast(device.type, torch.bfloat16, enabled=cfg.dtype == "bfloat16"):
        v = model.visual(x.to(device)).float()  # (1, d)
    scores = score_volumes(model, tokenizer, v, list(findings), cfg, device)[0]
    return dict(zip(findings, scores.tolist()))


# ----------------------------------------------------------------------------- command line

def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=files.DefaultsHelp)
    a = p.add_argument
    a("--ckpt", help="checkpoint written by train.py: out_dir/best.pt (the kept model) or ckpt.pt")
    a("--data", help="data set: a CT-RATE-layout root or a preprocessed directory")
    a("--split", choices=("train", "valid"), help="split of --data (None: valid where --data has "
      "splits; refused for a folder without)")
    a("--out_dir", default="out", help="where eval.json, CSVs and plots are written")
    a("--scores", help="score-file mode: CSV of precomputed per-volume scores")
    a("--labels", help="score-file mode: CSV of 0/1 labels, matched by name")
    a("--volume", help="single-scan mode: a NIfTI CT in HU (or a preprocessed .npy)")
    a("--findings", nargs="+", help="single-scan and heat-map modes: abnormalities to score "
      "(None: the 18 CT-RATE classes, or the classes of --data)")
    a("--thresholds", help="single-scan mode: eval.json whose calibrated thresholds turn scores "
      "into positive / negative calls")
    a("--allow_non_hu", action="store_true", help="score a volume that does not look like a CT in "
      "HU (no air, values out of range)")
    a("--summaries", help="the training run's summary cache (JSONL), e.g. out/summaries_rules.jsonl, "
      "so that retrieval embeds the texts it trained on; missing reports get the rules' summary")
    a("--classes", default="auto", choices=CLASS_SETS, help="label classes of --data: auto "
      "(--label_csv's columns, else the data's own), ctrate (18), ctrate_lt (15, with --label_csv), "
      "radchest (16: the 18 CT-RATE prompts mapped, calcifications merged by max)")
    a("--label_csv", help="labels for --data: VolumeName (or the first column), then one 0/1 "
      "column per class; the prompts are written from the class names")
    a("--protocol", default="brgsa", choices=("brgsa", "ctclip"), help="brgsa: the model's prompt, "
      "1/2[cos(v,t)+cos(v_hat,t)]; ctclip: present / not present pair, softmax")
    a("--template", action="append", default=[], help="prompt template with {} (repeatable, scores "
      "averaged); ctclip: 'POS {}|NEG {}' (default: the model's prompt)")
    a("--dtype", default="float32", choices=("float32", "bfloat16"), help="precision of the volume "
      "embedding: float32 as the official inference, or bfloat16 autocast (faster on a GPU)")
    a("--calib_fraction", type=float, default=0.3, help="patient-grouped share of the evaluated rows "
      "used only to pick the calibrated thresholds (0 = none)")
    a("--calib_data", help="pick calibrated thresholds on this data set instead")
    a("--calib_split", choices=("train", "valid"), help="split of --calib_data (None: valid where "
      "it has splits)")
    a("--n_boot", type=int, default=1000, help="bootstrap resamples (0 = no intervals)")
    a("--boot_unit", default="patient", choices=("patient", "volume"), help="bootstrap unit")
    a("--seed", type=int, default=0, help="calibration split, bootstrap and linear probe")
    a("--bootstrap", default="ours", choices=("ours", "official"), help="official: also the official "
      "BrgSA procedure (thresholds frozen on all rows, 5000 volume resamples, mean, std and 2.5/97.5 "
      "percentiles per class, Overall), comparable with the paper's tables")
    a("--no_plots", action="store_true", help="skip the PNG plots")
    a("--batch_size", type=int, default=8, help="volumes per forward pass")
    a("--workers", type=int, default=0, help="data-loader worker processes")
    a("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    a("--heatmap", metavar="DIR", help="write a grounding heat map per finding to DIR: NIfTI on the "
      "input's grid and affine (+ PNG); with --volume for that scan, with --data for the first "
      "--heatmap_n volumes")
    a("--heatmap_n", type=int, default=4, help="--data mode: volumes that get heat maps")
    a("--heatmap_kind", default="score", choices=grounding.HEATMAP_KINDS, help="score = "
      "1/2[cos(u,t)+cos(u_hat,t)] per patch (the zero-shot rule), raw = cos(u,t) (the official map)")
    a("--grounding", action="store_true", help="with --data: score the maps against the masks of "
      "prepare.phantom --masks (pointing game, AUROC in vs out) instead of the diagnosis; writes "
      "grounding.md/.csv/.json to --out_dir")
    return p


def eval_config(args) -> EvalConfig:
    for flag, value, low in (("--n_boot", args.n_boot, 0), ("--batch_size", args.batch_size, 1),
                             ("--workers", args.workers, 0), ("--heatmap_n", args.heatmap_n, 0)):
        if value < low:
            raise ValueError(f"{flag} must be >= {low}, got {value}")
    if not 0.0 <= args.calib_fraction < 1.0:
        raise ValueError(f"--calib_fraction must be in [0, 1), got {args.calib_fraction}")
    return EvalConfig(protocol=args.protocol, templates=tuple(args.template), dtype=args.dtype,
                      calib_fraction=args.calib_fraction, n_boot=args.n_boot,
                      boot_unit=args.boot_unit, seed=args.seed)


def run_scan(args, cfg: EvalConfig, device) -> dict:
    """--volume: one scan's scores (and calls, and heat maps), with what the model was trained on."""
    model, tokenizer, ckpt = load_checkpoint(args.ckpt, device)
    findings = args.findings or list(data_lib.CTRATE_CLASSES)
    out = files.writable_dir(args.heatmap, "--heatmap") if args.heatmap else None
    scan = grounding.scan_input(args.volume, model.cfg) if out else None  # read once for the maps too
    scores = score_scan(model, tokenizer, args.volume, findings, device, cfg, args.allow_non_hu, scan)
    thresholds = files.read_thresholds(args.thresholds, cfg.protocol) if args.thresholds else {}
    files.print_scan(args.volume, scores, thresholds, cfg.protocol)
    if trained_on(ckpt) == "synthetic":
        c = model.cfg
        print(f"note: this model was trained only on synthetic phantoms (prepare/phantom.py, "
              f"{'x'.join(map(str, c.image_size))} voxels of {'x'.join(f'{s:g}' for s in c.spacing)} "
              f"mm): its scores and calls on a real scan are not diagnoses")
    if out is not None:
        x, geom, hu_ras = scan
        prompts = [embed_texts(model, tokenizer, texts, device) for texts in
                   prompt_texts(findings, EvalConfig(templates=tuple(args.template)), model.cfg.prompt)]
        maps = grounding.patch_maps(model, x.to(device), prompts, args.heatmap_kind)
        written = grounding.write_scan_heatmaps(maps[0].cpu().numpy(), geom, hu_ras,
                                                data_lib.volume_key(args.volume), findings, out,
                                                args.heatmap_kind)
        print(f"eval: {len(written)} heat maps ({args.heatmap_kind}) -> {out}")
    return scores


def run_data(args, cfg: EvalConfig, device) -> dict:
    """--data: the protocol on a data set (or, with --heatmap / --grounding, its heat maps)."""
    model, tokenizer, _ = load_checkpoint(args.ckpt, device)
    load = dict(model_cfg=model.cfg, out_dir=args.out_dir, workers=max(args.workers, 1))
    records = records_of(args.data, args.split, **load)
    if args.heatmap or args.grounding:
        findings = list(args.findings or records[0].classes)
        for w in check_findings(tokenizer, findings, cfg, model.cfg.max_len, model.cfg.prompt):
            print(f"warning: {w}", file=sys.stderr)
        prompts = [embed_texts(model, tokenizer, texts, device) for texts in
                   prompt_texts(findings, EvalConfig(templates=tuple(args.template)), model.cfg.prompt)]
        out = files.writable_dir(args.heatmap, "--heatmap") if args.heatmap else None
        summary = grounding.run(model, records, prompts, findings, device,
                                grounding.data_sources(args.data, args.split or "valid"), out,
                                args.heatmap_n, args.heatmap_kind, args.grounding, cfg.n_boot, cfg.seed)
        if summary:
            grounding.write_grounding(summary, args.out_dir)
        return summary
    classes, score_map = class_setup(args.classes, records, args.label_csv)
    records = select_labels(records, classes, args.label_csv)
    calib_loader = None
    if args.calib_data:
        calib = records_of(args.calib_data, args.calib_split, flag="--calib_split", **load)
        calib = select_labels(calib, classes, args.label_csv, "--calib_data")
        overlap = {r.name for r in calib} & {r.name for r in records}
        if overlap:
            raise ValueError(f"--calib_data shares {len(overlap)} volumes with --data, "
                             f"e.g. {sorted(overlap)[:3]}")
        calib_loader = data_lib.eval_loader(calib, args.batch_size, args.workers)
    summaries = None
    if args.summaries:  # the training run's cache: retrieval embeds exactly the texts it trained on
        cache = summarize.load_cache(args.summaries)
        keys = {r.report: summarize.report_key(r.report) for r in records}
        summaries = {text: cache[k] for text, k in keys.items() if k in cache}
    return zero_shot(model, tokenizer, data_lib.eval_loader(records, args.batch_size, args.workers),
                     classes, device, cfg, calib_loader, summaries, score_map)


def report(result: dict, out_dir, bootstrap: str = "ours", plots: bool = True):
    """Print the tables and write eval.json and its CSVs (and plots) to out_dir."""
    if bootstrap == "official":
        a = result["arrays"]
        result["official"] = official.official_bootstrap(a["scores"], a["labels"], result["classes"])
    print(files.format_table(result))
    if "official" in result:
        print(f"\nofficial BrgSA procedure ({result['official']['n']} volume resamples, thresholds "
              f"frozen on all rows):\n{official.format_official(result['official'])}")
    path = files.write_result(result, out_dir, plots=plots)
    for note in result["notes"]:
        print(f"note: {note}", file=sys.stderr)
    return path


def main(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    cfg = eval_config(args)
    device = pick_device(args.device)
    if args.volume:
        if not args.ckpt:
            p.error("--volume needs --ckpt")
        return run_scan(args, cfg, device)
    if args.scores or args.labels:
        if not (args.scores and args.labels):
            p.error("--scores and --labels go together")
        result = files.evaluate_score_files(args.scores, args.labels, **cfg.metric_options())
    elif args.ckpt and args.data:
        result = run_data(args, cfg, device)
        if args.heatmap or args.grounding:
            return result
    else:
        p.error("give --ckpt and --data, --scores and --labels, or --ckpt and --volume")
    n_auc = sum(math.isfinite(a) for a in result["auc"].values())
    if n_auc == 0:
        raise ValueError(f"{args.labels or args.label_csv or args.data}: no class has both positive "
                         f"and negative labels among the {result['n_volumes']} evaluated volumes, "
                         f"so AUROC is undefined; nothing written")
    path = report(result, args.out_dir, args.bootstrap, plots=not args.no_plots)
    print(f"macro AUROC {result['macro_auc']:.4f} over {n_auc} of {len(result['auc'])} classes, "
          f"{result['n_volumes']} volumes; eval.json -> {path}")
    return result


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"eval.py: error: {e}")
