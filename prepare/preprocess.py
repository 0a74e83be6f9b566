"""The preprocessing cache: raw CT-RATE / RAD-ChestCT / NIfTI folders -> int16 .npy + index.csv.

Each volume goes through data.py's pipeline (canonical RAS, HU, trilinear resampling
to the preset's spacing, centre crop/pad, clip) once, in a process pool, and is stored as a
memory-mappable int16 .npy (exact: HU is clipped to [-1000, 1000]) so that training never decodes
gzip or resamples. Runs are resumable (done.jsonl lists finished volumes; .npy files are written
atomically); a bad volume is reported with its reason, listed in failed.txt and skipped.
index.csv (name, .npy path, report, source spacing, HU rule, labels) is what data.load_dataset reads.

    python -m prepare.preprocess --dataset ctrate --root CT-RATE --split train --out cache/train \
        --preset paper --workers 8
    python -m prepare.preprocess --dataset folder --root my_scans --labels my_labels.csv \
        --out cache/mine --preset paper       # own scans; labels: name + any 0/1 class columns
"""
import argparse
import csv
import json
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from data import CTRATE_CLASSES, Record, load_nifti, preprocess_volume, to_hu, volume_key
from model import PRESETS
from prepare.files import (WriteError, atomic_write, exit_code, run_lock, sigterm_as_interrupt,
                           worker_signals)
from prepare.tables import (RADCHEST_CLASSES, RADCHEST_SPACING, CTRateTables, label_columns,
                            read_csv, read_labels, read_radchest_labels, read_radchest_npz)


# ----------------------------------------------------------------------------- one volume

def save_npy_atomic(path, arr):
    """np.save through a temp file + os.replace (prepare.files.atomic_write): a crash never
    leaves a half-written .npy, and a full disk is a WriteError naming the file."""
    return atomic_write(path, lambda f: np.save(f, arr))


def _read_source(job):
    """Job dict -> (HU float32 (X, Y, Z) canonical, spacing (3,), rule)."""
    if job["kind"] == "npz":  # RAD-ChestCT: HU already, fixed spacing, z flipped vs CT-RATE
        return read_radchest_npz(job["src"], job["spacing"]) + ("already_hu",)
    raw, spacing = load_nifti(job["src"], spacing=job.get("spacing"))
    if job.get("slope") is None:  # no metadata: trust the header's scaling
        return raw, spacing, "header"
    hu, rule = to_hu(raw, job["slope"], job["intercept"], out=raw)
    return hu, spacing, rule


# What a CT in Hounsfield units looks like: finite, above -3100 (scanners write -3024 outside the
# field of view) and below int16's ceiling, with some air at about -1000 HU (outside the body, lungs,
# bowel). Raw scanner values without their slope/intercept, or an all-zero volume, have no air.
HU_PLAUSIBLE = (-3100.0, 32767.0)
AIR_HU = (-1100.0, -900.0)
MIN_AIR_FRACTION = 0.001


def check_hu(hu, what, override="--allow_non_hu", allow=False):
    """Raise ValueError unless `hu` looks like a CT in HU (see HU_PLAUSIBLE); `what` names the file
    in the message, `override` the flag that sets `allow` for unusual data, which skips every test
    but the one for NaN / inf (those never give a meaningful score)."""
    hu = np.asarray(hu)
    lo, hi = float(hu.min()), float(hu.max())  # NaN propagates, inf shows: no extra finite pass
    if not (np.isfinite(lo) and np.isfinite(hi)):
        bad = hu.size - np.count_nonzero(np.isfinite(hu))
        raise ValueError(f"{what}: {bad} NaN or inf voxels; expected finite Hounsfield units")
    if allow:
        return
    if lo < HU_PLAUSIBLE[0] or hi > HU_PLAUSIBLE[1]:
        raise ValueError(f"{what}: values from {lo:g} to {hi:g} are not Hounsfield units (expected "
                         f"within [{HU_PLAUSIBLE[0]:g}, {HU_PLAUSIBLE[1]:g}]); {override} skips this check")
    sub = hu[::2, ::2, ::2] if hu.ndim == 3 else hu  # a fraction needs no full pass
    air = np.count_nonzero((sub >= AIR_HU[0]) & (sub <= AIR_HU[1])) / max(sub.size, 1)
    if air < MIN_AIR_FRACTION:
        raise ValueError(f"{what}: no air ({air:.2%} of voxels within [{AIR_HU[0]:g}, {AIR_HU[1]:g}] "
                         f"HU, expected at least {MIN_AIR_FRACTION:.1%}; values {lo:g} to {hi:g}): "
                         f"not a CT in HU (raw values without slope/intercept? an empty volume?); "
                         f"{override} skips this check")


CHEST_LUNG_MIN = 0.04  # lung_fraction below which a scan is flagged: 0.18-0.21 on the real chest CT
                       # of pyradiomics' lung1 case (paper / tiny grid), 0.026-0.028 on a real head CT, >= 0.053
                       # on 1118 synthetic chests (prepare/phantom.py, seed 0)


def lung_fraction(vol):
    """Share of lung-density voxels (-950 < HU < -600) in the central half of the in-plane field of
    view of a preprocessed (X, Y, Z) volume: a chest CT shows its lungs there, a head scan hardly
    any. A cheap plausibility check that flags, never drops."""
    X, Y = vol.shape[:2]
    c = vol[X // 4: X - X // 4, Y // 4: Y - Y // 4]
    return float(np.count_nonzero((c > -950) & (c < -600)) / max(c.size, 1))


def _prepare_one(job):
    """Worker: read, convert, resample, crop/pad, clip and save one volume; never raises."""
    try:
        hu, spacing, rule = _read_source(job)
        check_hu(hu, job["src"], allow=job.get("allow_non_hu", False))
        vol = preprocess_volume(hu, spacing, job["target_spacing"], job["target_shape"])
        save_npy_atomic(job["out"], np.rint(vol).astype(np.int16))  # exact: HU clipped to ±1000
        return dict(name=job["name"], status="done", spacing=[float(v) for v in spacing],
                    hu_rule=rule, lung_fraction=round(lung_fraction(vol), 4))
    except WriteError as e:  # a full disk fails every volume after it: the run must stop
        return dict(name=job["name"], status="fatal", reason=str(e))
    except Exception as e:  # the pool must survive any bad file; the reason goes to the log
        reason = str(e) if isinstance(e, (ValueError, OSError)) else f"{type(e).__name__}: {e}"
        return dict(name=job["name"], status="failed", reason=reason)


def _worker_init():
    torch.set_num_threads(1)  # one process per core; intra-op threads would oversubscribe
    worker_signals()


# ----------------------------------------------------------------------------- resumable runs

def _check_settings(cache_dir, settings):
    path = cache_dir / "settings.json"
    if path.is_file():
        old = json.loads(path.read_text())
        if old != settings:
            raise ValueError(f"{path}: cache was built with {old}, asked for {settings}; "
                             f"use another cache dir")
    else:
        path.write_text(json.dumps(settings))


class _Progress:
    """One status line on stderr: rewritten in place on a terminal, every ~10% otherwise."""

    def __init__(self, label, total):
        self.label, self.total, self.t0 = label, total, time.time()
        self.tty, self.last, self.shown = sys.stderr.isatty(), -1, -1

    def update(self, n, counts, final=False):
        step = max(1, self.total // 10)
        if final and not self.tty and n == self.shown:
            return  # that line is already out
        if not (final or self.tty or n // step != self.last):
            return
        self.last, self.shown = n // step, n
        rate = (counts["done"] + counts["failed"]) / max(time.time() - self.t0, 1e-9)
        msg = (f"[{self.label}] {n}/{self.total} done={counts['done']} skipped={counts['skipped']} "
               f"failed={counts['failed']} ({rate:.1f} vol/s)")
        end = "\n" if final or not self.tty else ""
        print(("\r" if self.tty else "") + msg, end=end, file=sys.stderr, flush=True)


def _read_done(path):
    """{name: result} from done.jsonl; a torn last line (a killed run) is ignored."""
    done = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                d = json.loads(line)
                done[d["name"]] = d
            except (json.JSONDecodeError, KeyError, TypeError):
                continue
    return done


def _map(fn, jobs, workers):
    """fn(job) per job in completion order; a process pool (fork where available) if workers > 1."""
    if workers <= 1 or len(jobs) <= 1:
        yield from map(fn, jobs)
        return
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    chunk = max(1, min(16, len(jobs) // (8 * workers)))
    with ctx.Pool(workers, initializer=_worker_init) as pool:
        yield from pool.imap_unordered(fn, jobs, chunksize=chunk)


def _log_failure(log, name, reason, counts):
    print(f"[failed] {name}: {reason}", file=sys.stderr, flush=True)
    log.write(f"{name}\t{reason}\n")
    log.flush()
    counts["failed"] += 1


def run_preprocess(jobs, cache_dir, target_spacing, target_shape, workers=2, label="preprocess",
                   failed=(), classes=CTRATE_CLASSES, allow_non_hu=False):
    """Preprocess `jobs` into cache_dir (resumable), write index.csv -> (records, counts).

    A job is a dict(name, src, kind "nifti"/"npz", spacing or None, slope, intercept, report,
    labels). A volume whose .npy exists and is listed in done.jsonl is skipped; a bad volume is
    reported on stderr with its reason and listed in failed.txt, and the run goes on. `failed`
    holds (name, reason) pairs already known to be bad (e.g. a volume missing from a CSV). A volume
    that does not look like a CT in HU fails (check_hu) unless allow_non_hu.
    """
    cache_dir = Path(cache_dir)
    (cache_dir / "volumes").mkdir(parents=True, exist_ok=True)
    with run_lock(cache_dir / ".lock", "preprocess"):  # one writer per cache
        return _run(jobs, cache_dir, target_spacing, target_shape, workers, label, failed, classes,
                    allow_non_hu)


def _run(jobs, cache_dir, target_spacing, target_shape, workers, label, failed, classes, allow_non_hu):
    _check_settings(cache_dir, dict(target_spacing=[float(v) for v in target_spacing],
                                    target_shape=[int(v) for v in target_shape], dtype="int16"))
    done = _read_done(cache_dir / "done.jsonl")
    counts, todo = dict(done=0, skipped=0, failed=0), []
    for job in jobs:
        job.update(out=str(cache_dir / "volumes" / f"{job['name']}.npy"), allow_non_hu=allow_non_hu,
                   target_spacing=tuple(target_spacing), target_shape=tuple(target_shape))
        if job["name"] in done and Path(job["out"]).is_file():
            counts["skipped"] += 1
        else:
            done.pop(job["name"], None)
            todo.append(job)
    progress = _Progress(label, len(jobs) + len(failed))
    log_path = cache_dir / "done.jsonl"
    torn = log_path.is_file() and not log_path.read_bytes().endswith(b"\n")
    with open(log_path, "a") as log, open(cache_dir / "failed.txt", "w") as bad:
        log.write("\n" if torn else "")  # end a line torn by a killed run before appending
        for name, reason in failed:
            _log_failure(bad, name, reason, counts)
        for res in _map(_prepare_one, todo, workers):
            if res["status"] == "fatal":
                raise WriteError(res["reason"])
            if res["status"] == "done":
                done[res["name"]], counts["done"] = res, counts["done"] + 1
                if res["lung_fraction"] < CHEST_LUNG_MIN:
                    print(f"[warning] {res['name']}: {100 * res['lung_fraction']:.1f}% lung-density "
                          f"voxels in the central field of view: not a chest CT? (kept)",
                          file=sys.stderr, flush=True)
                log.write(json.dumps(res) + "\n")
                log.flush()
            else:
                _log_failure(bad, res["name"], res["reason"], counts)
            progress.update(sum(counts.values()), counts)
    progress.update(sum(counts.values()), counts, final=True)
    records = [Record(j["name"], j["out"], j["report"], j["labels"],
                      tuple(done[j["name"]]["spacing"]), done[j["name"]]["hu_rule"], tuple(classes))
               for j in jobs if j["name"] in done]
    write_index(cache_dir, records)
    return records, counts


# ----------------------------------------------------------------------------- index.csv: written here, read by train.py and eval.py

INDEX_FIXED = ("volume", "npy", "report", "spacing_x", "spacing_y", "spacing_z", "hu_rule")


def write_index(cache_dir, records):
    """index.csv: volume, npy (relative to cache_dir), report, source spacing, HU rule, labels."""
    cache_dir = Path(cache_dir)
    classes = records[0].classes if records else CTRATE_CLASSES
    tmp = cache_dir / f".index.csv.{os.getpid()}.tmp"
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(INDEX_FIXED + tuple(classes))
        for r in records:
            npy = os.path.relpath(r.npy_path, cache_dir)
            sp = [f"{v:.10g}" for v in r.spacing] if len(r.spacing) == 3 else ["", "", ""]
            w.writerow([r.name, npy, r.report, *sp, r.hu_rule] + [f"{v:g}" for v in r.labels])
    os.replace(tmp, cache_dir / "index.csv")


def load_index(cache_dir):
    """Read a preprocessed dir (its index.csv) back -> list[Record] with absolute npy paths."""
    cache_dir = Path(cache_dir)
    path = cache_dir / "index.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no index.csv (not a preprocessed directory)")
    with open(path, newline="", encoding="utf-8-sig") as f:
        fields = csv.DictReader(f).fieldnames or []
    rows = read_csv(path, INDEX_FIXED)
    classes = tuple(c for c in fields if c not in INDEX_FIXED)
    records = []
    for r in rows:
        sp = tuple(float(r[k]) for k in ("spacing_x", "spacing_y", "spacing_z") if r[k])
        labels = np.array([float(r[c]) for c in classes], np.float32)
        records.append(Record(r["volume"], str(cache_dir / r["npy"]), r["report"], labels, sp,
                              r["hu_rule"], classes))
    return records


def find_index(path, split):
    """The preprocessed dir of `split` under `path` (<path>/<split> or <path> itself), or None."""
    for d in (Path(path) / split, Path(path)):
        if (d / "index.csv").is_file():
            return d
    return None


def load_dataset(path, split, model_cfg=None):
    """Records of one split of a preprocessed dir (written by prepare/preprocess.py).

    path: <path>/<split>/index.csv, or <path>/index.csv whose CT-RATE names are filtered by the
    split prefix. model_cfg (its .spacing and .image_size), when given, must match the dir's
    settings.json: a model never reads volumes made for another grid.
    """
    path = Path(path)
    d = find_index(path, split)
    if d is None:
        raise FileNotFoundError(f"{path}: no index.csv (not a preprocessed directory); make one with "
                                f"python -m prepare.preprocess --root {path} --out DIR")
    if model_cfg is not None and (d / "settings.json").is_file():
        want = tuple(float(v) for v in model_cfg.spacing), tuple(int(v) for v in model_cfg.image_size)
        have = json.loads((d / "settings.json").read_text())
        have = tuple(have["target_spacing"]), tuple(have["target_shape"])
        if have != want:
            raise ValueError(f"{d}: preprocessed at {have[0]} mm -> {have[1]}, "
                             f"but {want[0]} mm -> {want[1]} was asked for")
    records = load_index(d)
    if d == path / split or not any(r.name.startswith(("train", "valid")) for r in records):
        return records  # RAD-ChestCT / a plain folder: no split in the names
    records = [r for r in records if r.name.startswith(split)]  # one index for several splits
    if not records:
        raise ValueError(f"{d / 'index.csv'}: no volume of split '{split}'")
    return records


# ----------------------------------------------------------------------------- CT-RATE

def _ctrate_root(root):
    """Accept the CT-RATE root or its `dataset/` sub-folder (the Hugging Face layout)."""
    root = Path(root)
    if not (root / "metadata").is_dir() and (root / "dataset" / "metadata").is_dir():
        return root / "dataset"
    return root


def ctrate_jobs(root, split):
    """Volumes of one CT-RATE split found on disk -> (jobs, failed (name, reason) pairs)."""
    root = _ctrate_root(root)
    tables = CTRateTables(root, split)
    files = sorted(p for p in (root / split).glob("*/*/*") if p.name.endswith((".nii.gz", ".nii")))
    if not files:
        raise FileNotFoundError(f"{root / split}: no volumes in <split>_<p>/<split>_<p>_<s>/")
    jobs, failed = [], []
    for f in files:
        name = volume_key(f.name)
        try:
            e = tables.entry(name)
        except ValueError as err:
            failed.append((name, str(err)))
            continue
        jobs.append(dict(name=name, src=str(f), kind="nifti", spacing=e["spacing"],
                         slope=e["slope"], intercept=e["intercept"], report=e["report"],
                         labels=e["labels"]))
    return jobs, failed


def prepare_ctrate(root, split, cache_dir, target_spacing=(1.5, 1.5, 3.0),
                   target_shape=(256, 256, 128), workers=2):
    """Preprocess one CT-RATE split into cache_dir (one int16 .npy per volume + index.csv).

    Volumes come from ROOT/<split>/ on disk; spacing, rescaling, report and labels from the split's
    CSVs (the metadata spacing replaces the header's, which CT-RATE does not keep right). Already cached volumes are
    skipped; bad volumes are logged and skipped. -> list[Record] of the volumes that are ready.
    """
    jobs, failed = ctrate_jobs(root, split)
    records, _ = run_preprocess(jobs, cache_dir, target_spacing, target_shape, workers,
                                label=f"ctrate {split}", failed=failed)
    return records


def preprocess_settings(preset, shape=None):
    """-> (cache name, target spacing, target shape) of a model.PRESETS name, a ModelConfig (its
    .spacing and .image_size) or a spacing tuple with `shape`; the name is the preset's when the
    grid is one, else a tag of the grid."""
    if isinstance(preset, str):
        if preset not in PRESETS:
            raise ValueError(f"unknown preset '{preset}', expected one of {sorted(PRESETS)}")
        preset = PRESETS[preset]
    if hasattr(preset, "spacing"):
        preset, shape = preset.spacing, preset.image_size
    spacing, shape = tuple(float(v) for v in preset), tuple(int(v) for v in shape)
    for name, cfg in PRESETS.items():
        if (tuple(cfg.spacing), tuple(cfg.image_size)) == (spacing, shape):
            return name, spacing, shape
    return "x".join(f"{v:g}" for v in spacing) + "mm_" + "x".join(map(str, shape)), spacing, shape


def ensure_cache(path, split, preset, shape=None, workers=2, cache_dir=None, out_dir=None):
    """A preprocessed dir for `split` of `path` -> the dir data.load_dataset reads.

    path is returned as it is when it already holds an index.csv; a raw CT-RATE root is
    preprocessed (resumably) into cache_dir. Default: an existing <root>/../cache_<preset>/<split>
    (the synthetic set's, written by train.py) is reused; otherwise the cache goes under the
    user's out_dir as <out_dir>/cache_<preset>/<root's folder name>/<split>, never beside a possibly read-only data
    root (only when out_dir is None).
    preset: a model.PRESETS name, a ModelConfig, or a target spacing together with `shape`.
    """
    if find_index(path, split) is not None:
        return Path(path)
    if not (_ctrate_root(path) / "metadata").is_dir():
        what = "no such folder" if not Path(path).is_dir() else "empty" if not any(Path(path).iterdir()) \
            else "neither a preprocessed dir (index.csv) nor a CT-RATE layout (metadata/, reports, labels)"
        raise FileNotFoundError(f"{path}: not a data set ({what}); give a CT-RATE root, a cache of "
                                f"python -m prepare.preprocess, or a set of python -m prepare.phantom")
    if preset is None:
        raise ValueError(f"{path}: a raw data set needs a preset (or spacing and shape) to "
                         f"preprocess it; found no index.csv")
    name, spacing, shape = preprocess_settings(preset, shape)
    beside = Path(path).resolve().parent / f"cache_{name}" / split
    if cache_dir is None:
        reuse = (beside / "index.csv").is_file() or out_dir is None
        cache_dir = beside if reuse else Path(out_dir) / f"cache_{name}" / Path(path).resolve().name / split
    prepare_ctrate(path, split, Path(cache_dir), spacing, shape, workers)
    return Path(cache_dir)


def records_of(path, split, model_cfg, out_dir, workers: int = 1, flag: str = "--split"):
    """Records of `split` of a data set for evaluation (eval.py --data / --calib_data), a raw
    CT-RATE root preprocessed first under out_dir. split None means "valid" where the data has
    splits; an explicit split is refused for a data set without splits (a folder of one's own
    scans) instead of being ignored."""
    cache = ensure_cache(path, split or "valid", model_cfg, workers=workers, out_dir=out_dir)
    records = load_dataset(cache, split or "valid", model_cfg)
    has_splits = find_index(cache, split or "valid") == Path(cache) / (split or "valid") or any(
        r.name.startswith(("train_", "valid_")) for r in records)
    if split is not None and not has_splits:
        raise ValueError(f"{flag} {split}: {path} has no splits (its volume names carry no "
                         f"train_/valid_ prefix); leave {flag} out to evaluate every volume")
    if not records:
        raise ValueError(f"{path}: no volumes to evaluate")
    return records


# ----------------------------------------------------------------------------- RAD-ChestCT, folders

def radchest_jobs(root, labels_csv=None, devices="official"):
    """RAD-ChestCT .npz volumes under root -> (jobs, failed). Labels from labels_csv or from the
    *Abnormality_and_Location_Labels*.csv files in root; devices: which device labels make
    "Medical material" (prepare/tables.py)."""
    root = Path(root)
    found = sorted(root.rglob("*Abnormality_and_Location*.csv"))
    csvs = [Path(labels_csv)] if labels_csv else found
    if not csvs:
        raise FileNotFoundError(f"{root}: no *Abnormality_and_Location_Labels*.csv (give --labels)")
    labels = {}
    for c in csvs:
        labels.update(read_radchest_labels(c, devices=devices))
    files = sorted(root.rglob("*.npz"))
    if not files:
        raise FileNotFoundError(f"{root}: no .npz volumes")
    jobs, failed = [], []
    for f in files:
        name = volume_key(f.name)
        if name not in labels:
            failed.append((name, f"unknown volume name '{name}' (not in {[c.name for c in csvs]})"))
            continue
        jobs.append(dict(name=name, src=str(f), kind="npz", spacing=RADCHEST_SPACING, slope=None,
                         intercept=None, report="", labels=labels[name]))
    return jobs, failed


def folder_jobs(root, labels_csv=None):
    """Every NIfTI under root, spacing and scaling from its header -> (jobs, failed, classes).

    Without labels_csv the volumes carry no labels (classes ()). With it, the CSV's first column
    (or its VolumeName column) names the volume, as a file name with or without the extension or
    a path relative to root, and every other column is a 0/1 class of any name; a volume with no
    row is failed with that reason, so nothing is dropped silently.
    """
    root = Path(root)
    files = sorted(p for p in root.rglob("*") if p.name.endswith((".nii.gz", ".nii")))
    if not files:
        raise FileNotFoundError(f"{root}: no .nii/.nii.gz files")
    names = [volume_key(str(f.relative_to(root)).replace(os.sep, "__")) for f in files]
    table, classes = (read_folder_labels(labels_csv) if labels_csv else ({}, ()))
    jobs, failed = [], []
    for f, name in zip(files, names):
        lab = table.get(name, table.get(volume_key(f.name))) if labels_csv else np.zeros(0, np.float32)
        if lab is None:
            failed.append((name, f"no row for '{name}' in {labels_csv}"))
            continue
        jobs.append(dict(name=name, src=str(f), kind="nifti", spacing=None, slope=None,
                         intercept=None, report="", labels=lab))
    return jobs, failed, classes


def read_folder_labels(path):
    """A labels CSV of one's own -> ({volume key: float32 (C,)}, class names).

    Columns as data.label_columns reads them (VolumeName or the first column names the volume,
    every other column is a 0/1 class); names are keyed like folder volumes (extension dropped,
    "/" -> "__").
    """
    name_col, classes = label_columns(path)
    table = read_labels(path, classes, name_col,
                        key=lambda n: volume_key(n.strip().replace("/", "__")))
    if not table:
        raise ValueError(f"{path}: no label rows")
    return table, classes


# ----------------------------------------------------------------------------- command line

def preprocess_main(argv=None):
    """`python -m prepare.preprocess ...`: build a preprocessed dir (int16 .npy + index.csv)."""
    p = argparse.ArgumentParser(prog="python -m prepare.preprocess", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dataset", choices=("ctrate", "radchest", "folder"), default="ctrate",
                   help="ctrate: CT-RATE layout; radchest: RAD-ChestCT .npz; folder: any NIfTI "
                        "scans (header spacing and scaling), labels from --labels")
    p.add_argument("--root", required=True, help="CT-RATE root, .npz dir or NIfTI dir")
    p.add_argument("--split", choices=("train", "valid"), default=None,
                   help="CT-RATE split (ctrate only; None means train)")
    p.add_argument("--out", required=True, help="output dir: volumes/*.npy, index.csv, logs")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="worker processes")
    p.add_argument("--preset", choices=sorted(PRESETS), default="paper", help="the model preset whose "
                   "grid the volumes are made for: " + "; ".join(
                       f"{k}: {c.image_size} voxels of {c.spacing} mm" for k, c in PRESETS.items()))
    p.add_argument("--labels", help="radchest: label CSV (None: found under --root); folder: "
                   "CSV of volume name + one 0/1 column per class, any class names")
    p.add_argument("--allow_non_hu", action="store_true", help="keep volumes that do not look like "
                   "a CT in HU (no air, values out of range) instead of failing them")
    p.add_argument("--radchest_devices", choices=("official", "all"), default="official",
                   help="RAD-ChestCT 'Medical material': the official 11 device labels, or all 13 "
                        "(adds heart_valve_replacement and sternotomy)")
    a = p.parse_args(argv)
    if a.split is not None and a.dataset != "ctrate":
        p.error(f"--split is for CT-RATE only: a {a.dataset} dataset has no splits (every volume "
                f"under --root is preprocessed); leave --split out")
    try:
        with sigterm_as_interrupt():
            records, counts = _preprocess(a)
    except (ValueError, FileNotFoundError) as e:  # a problem with the data set as a whole
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM: every finished volume is whole and kept
        print(f"\ninterrupted: the finished volumes are kept in {a.out} (done.jsonl); rerun the same "
              f"command to do the rest", file=sys.stderr)
        return exit_code(e)
    rules = {}
    for r in records:
        rules[r.hu_rule] = rules.get(r.hu_rule, 0) + 1
    print(f"summary: done={counts['done']} skipped={counts['skipped']} failed={counts['failed']}"
          f" | HU rules {rules} | index {Path(a.out) / 'index.csv'} ({len(records)} volumes)"
          + (f" | failures listed in {Path(a.out) / 'failed.txt'}" if counts["failed"] else ""))
    if counts["failed"]:
        print(f"error: {counts['failed']} volume(s) failed (reasons above and in "
              f"{Path(a.out) / 'failed.txt'}); the {len(records)} good ones are in the index",
              file=sys.stderr)
        return 1
    return 0


def _preprocess(a):
    if a.dataset == "ctrate":
        (jobs, failed), classes = ctrate_jobs(a.root, a.split or "train"), CTRATE_CLASSES
    elif a.dataset == "radchest":
        (jobs, failed), classes = radchest_jobs(a.root, a.labels, a.radchest_devices), RADCHEST_CLASSES
    else:
        jobs, failed, classes = folder_jobs(a.root, a.labels)
    _, spacing, shape = preprocess_settings(a.preset)
    return run_preprocess(jobs, a.out, spacing, shape, a.workers, f"{a.dataset} {a.preset}", failed,
                          classes, a.allow_non_hu)


if __name__ == "__main__":
    sys.exit(preprocess_main())
