"""A training run's inputs in one call: the data set and its splits, the report summaries, the tokenizer.

train.py calls training_inputs() once. With no --data the synthetic chest-CT set is generated first
(prepare/phantom.py); a raw CT-RATE root is preprocessed once into a cache (prepare/preprocess.py);
every report is summarised (prepare/summarize.py: the offline rules by default, or a finished cache
of `python -m prepare.summarize`, e.g. an LLM's); and a WordPiece vocabulary is built from the
training summaries (data.train_tokenizer) unless the run resumes or loads a pretrained BERT.

    python -c "import prepare.inputs"   # a library; train.py is the command line
"""
import os
from dataclasses import dataclass
from pathlib import Path

import torch

import data as data_lib
from prepare import phantom, pretrained, summarize
from prepare.preprocess import ensure_cache, load_dataset
from prepare.summarize_llm import SummaryError

SUMMARY_BACKENDS = ("rules", "rules_report")  # computed here; an LLM's come as a cache file
PREP_WORKERS = max(2, min(8, os.cpu_count() or 2))  # processes generating and preprocessing volumes


@dataclass
class Inputs:
    train: list          # data.Record of the training volumes (the validation split taken out)
    val: list            # the validation split: training reports held back to pick best.pt
    held_out: list       # the data set's valid split, scored once at the end
    summaries: dict      # {report text: [summary sentences]}
    tokenizer: str       # the tokenizer as JSON (tokenizers' to_str), as checkpoints carry it
    trained_on: str      # "synthetic" (a prepare.phantom set) or the --data path


def training_inputs(cfg, model_cfg, vocab_size: int, tokenizer: str = None, log=print) -> Inputs:
    """cfg: train.py's TrainConfig (data, synth_dir, synth_n, seed, out_dir, val_fraction,
    summaries, text_weights); tokenizer: the resumed checkpoint's, if any."""
    root = Path(cfg.data) if cfg.data else synthetic_set(cfg, log)
    out = Path(cfg.out_dir)
    splits = []
    for split in ("train", "valid"):  # a raw CT-RATE root is preprocessed (once) into a cache
        cache = ensure_cache(root, split, model_cfg, workers=PREP_WORKERS,
                             out_dir=out if cfg.data else None)  # the user's root: cache under out_dir
        splits.append(load_dataset(cache, split, model_cfg))
    train, val = split_validation(with_reports(splits[0], root, log), cfg.val_fraction, cfg.seed)
    recs = [r for r in train + val + splits[1] if r.report.strip()]
    summaries = summaries_of(cfg.summaries, [r.report for r in recs], [r.name for r in recs], out, log)
    if tokenizer is None and cfg.text_weights:
        tokenizer = pretrained.load_tokenizer(Path(cfg.text_weights) / "vocab.txt").to_str()
    if tokenizer is None:
        texts = [s for r in train for s in summaries.get(r.report, [r.report])]
        tokenizer = data_lib.train_tokenizer(texts, vocab_size, out / "tokenizer.json").to_str()
    synthetic = not cfg.data or (root / phantom.MARKER).is_file()
    return Inputs(train, val, splits[1], summaries, tokenizer, "synthetic" if synthetic else str(root))


def synthetic_set(cfg, log) -> Path:
    """The synthetic set of this preset, seed and size, generated once under --synth_dir."""
    voxels = "small" if cfg.preset == "small" else "tiny"  # stored finer than the preset's grid
    synth = Path(cfg.synth_dir) / f"n{cfg.synth_n}_seed{cfg.seed}{'_small' if voxels == 'small' else ''}"
    root = synth / "dataset"
    if not root.is_dir():
        log(f"train: generating the synthetic data set in {synth}")
        phantom.generate(synth, n=cfg.synth_n, seed=cfg.seed, workers=PREP_WORKERS, voxels=voxels)
    return root


def with_reports(records, where, log):
    """The training records that have a report (an empty one teaches nothing); an error when none
    has, e.g. a NIfTI-folder cache, which carries no reports."""
    kept = [r for r in records if r.report.strip()]
    if not kept:
        raise ValueError(f"{where}: none of the {len(records)} training volumes has a report; BrgSA "
                         f"trains on volume-report pairs (give a data set with a reports CSV)")
    if len(kept) < len(records):
        log(f"train: {len(records) - len(kept)} training volumes have an empty report and are left out")
    return kept


def split_validation(records, fraction: float, seed: int):
    """-> (training records, validation records): a seeded share of the training *reports* held
    back to select the checkpoint. A report's volumes (reconstructions) stay on one side, and the
    share comes from the training split only, so it never touches the held-out split."""
    if not fraction:
        return records, []
    reports = sorted({r.report for r in records})
    n_val = max(1, round(fraction * len(reports)))
    if n_val >= len(reports):
        raise ValueError(f"--val_fraction={fraction} leaves no training report of {len(reports)}")
    order = torch.randperm(len(reports), generator=torch.Generator().manual_seed(seed)).tolist()
    held = {reports[i] for i in order[:n_val]}
    return [r for r in records if r.report not in held], [r for r in records if r.report in held]


def summaries_of(source: str, reports: list, names: list, out: Path, log=print) -> dict:
    """{report: summary sentences}: computed by an offline backend into out/summaries_<backend>.jsonl
    (resumable), or read from a finished cache file; a report without one is an error."""
    if source in SUMMARY_BACKENDS:
        cache = out / f"summaries_{source}.jsonl"
        try:
            summaries = summarize.summarize_all(reports, cache_path=cache, backend=source, names=names)
        except SummaryError as e:
            raise ValueError(f"summarization ({source}): {e}") from None
    else:
        cache = Path(source)
        if not cache.is_file():
            raise FileNotFoundError(f"--summaries {source}: neither a backend ({', '.join(SUMMARY_BACKENDS)}) "
                                    f"nor a summary cache file")
        by_key = summarize.load_cache(cache)
        summaries = {r: by_key[k] for r in set(reports) if (k := summarize.report_key(r)) in by_key}
    missing = len(set(reports) - set(summaries))
    if missing:
        raise ValueError(f"{missing} of {len(set(reports))} reports have no summary in {cache}; "
                         f"complete it with python -m prepare.summarize (a rerun into the same --out "
                         f"does only the missing ones), or train with --summaries rules")
    log(f"train: summaries of {len(summaries)} reports from {cache}")
    return summaries
