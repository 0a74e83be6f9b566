"""Label tables and class sets: CT-RATE's and RAD-ChestCT's CSVs, label CSVs of one's own scans, and
which classes an evaluation scores.

CT-RATE ships one metadata, one report and one label CSV per split; volumes are matched across them
by name, with or without the .nii.gz extension. RAD-ChestCT labels come as "<abnormality>*<location>"
columns, OR-ed here into its 16 classes (CT-RATE's 18 with the two calcification classes merged and
Mosaic attenuation dropped), and ctrate_to_radchest maps CT-RATE scores onto those classes the same
way. A label CSV of one's own names the volume in its first (or VolumeName) column and has one 0/1
column per class, any names. CSVs are read as spreadsheets save them too (byte-order mark, CRLF,
quoted fields with commas, quotes and newlines): data.read_csv.

    python -c "import prepare.tables"   # a library; prepare/preprocess.py and eval.py use it
"""
import csv
import zipfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from data import CTRATE_CLASSES, volume_key

# RAD-ChestCT's 16 classes: the two calcification classes merge, Mosaic drops out
RADCHEST_CLASSES = (
    "Medical material", "Calcification", "Cardiomegaly", "Pericardial effusion", "Hiatal hernia",
    "Lymphadenopathy", "Emphysema", "Atelectasis", "Lung nodule", "Lung opacity",
    "Pulmonary fibrotic sequela", "Pleural effusion", "Peribronchial thickening", "Consolidation",
    "Bronchiectasis", "Interlobular septal thickening",
)

# the paper's 15 under-represented abnormalities on CT-RATE validation (prompt order)
CTRATE_LT_CLASSES = (
    "Pneumonia", "Pneumothorax", "Empyema", "Tuberculosis", "Pulmonary fibrosis", "Lung cyst",
    "Bronchial thickening", "Lung mass", "Osteophyte", "Rib fracture", "Atherosclerosis",
    "Pericardial calcification", "Spondylosis", "Pleural calcification", "Pneumomediastinum",
)
RADCHEST_SPACING = (0.8, 0.8, 0.8)  # mm, isotropic as released
CLASS_SETS = ("auto", "ctrate", "ctrate_lt", "radchest")



# ----------------------------------------------------------------------------- CSV tables

def read_csv(path, required=()):
    """Rows of a UTF-8 CSV as dicts; a clear error names the file and any missing column."""
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f, strict=True)  # strict: an unterminated quote is an error
            rows = list(reader)
            fields = reader.fieldnames or []
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e})") from e
    except csv.Error as e:  # e.g. a quote left open swallowing the rows after it
        raise ValueError(f"{path}: malformed CSV near line {reader.line_num} ({e}); "
                         f"check for an unterminated quote") from None
    missing = [c for c in required if c not in fields]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}; found {fields}")
    torn = next((i for i, r in enumerate(rows) if None in r or None in r.values()), None)
    if torn is not None:  # DictReader puts extra fields under None and fills missing ones with None
        raise ValueError(f"{path}: data row {torn + 1} does not have the header's {len(fields)} "
                         f"fields (an unterminated quote?)")
    return rows


def find_split_csv(folder, split):
    """The one CSV in `folder` for `split` (train -> train*.csv, valid -> valid*/validation*)."""
    folder = Path(folder)
    prefixes = ("valid", "validation") if split == "valid" else (split,)
    hits = sorted(p for p in folder.glob("*.csv") if p.name.lower().startswith(prefixes))
    if len(hits) != 1:
        raise FileNotFoundError(f"{folder}: expected one CSV for split '{split}', found "
                                f"{[p.name for p in hits]}")
    return hits[0]


class CTRateTables:
    """Metadata, reports and labels of one CT-RATE split, keyed by volume name (no extension)."""

    def __init__(self, root, split):
        self.root = Path(root)
        self.meta_csv = find_split_csv(self.root / "metadata", split)
        self.report_csv = find_split_csv(self.root / "radiology_text_reports", split)
        self.label_csv = find_split_csv(self.root / "multi_abnormality_labels", split)
        meta_cols = ("VolumeName", "XYSpacing", "ZSpacing", "RescaleSlope", "RescaleIntercept")
        self.meta = {volume_key(r["VolumeName"]): r for r in read_csv(self.meta_csv, meta_cols)}
        rep_cols = ("VolumeName", "Findings_EN", "Impressions_EN")
        self.reports = {volume_key(r["VolumeName"]): r for r in read_csv(self.report_csv, rep_cols)}
        self.labels = read_labels(self.label_csv)

    def _row(self, table, csv_path, name):
        if name not in table:
            raise ValueError(f"{csv_path}: unknown volume name '{name}' (not listed in this CSV)")
        return table[name]

    def entry(self, name):
        """-> dict(report, labels (18,), spacing (3,) in file axis order, slope, intercept)."""
        m = self._row(self.meta, self.meta_csv, name)
        try:
            xy = [float(v) for v in m["XYSpacing"].strip("[]() ").replace(",", " ").split()]
            spacing = (xy[0], xy[1], float(m["ZSpacing"]))
            slope, intercept = float(m["RescaleSlope"]), float(m["RescaleIntercept"])
        except (ValueError, IndexError) as e:
            raise ValueError(f"{self.meta_csv}: bad spacing/rescale for '{name}' ({e})") from e
        r = self._row(self.reports, self.report_csv, name)
        parts = (r["Findings_EN"], r["Impressions_EN"])
        report = " ".join(t.strip() for t in parts if t and t.strip())
        if not report:
            raise ValueError(f"{self.report_csv}: empty report for '{name}'")
        labels = self._row(self.labels, self.label_csv, name)
        return dict(report=report, labels=labels, spacing=spacing, slope=slope, intercept=intercept)


# ----------------------------------------------------------------------------- RAD-ChestCT labels

# RAD-ChestCT abnormalities (label columns "<abnormality>*<location>") behind each of its 16 classes.
# "Medical material" ORs the 11 device labels of the official BrgSA mapping; the official code keeps
# heart valve replacement and sternotomy as long-tail classes of their own (its RAD-ChestCT-LT list),
# so they are not medical material there. devices="all" adds them back (both are implanted metal and
# a radiologist would call them medical material), at the cost of numbers that differ from the paper.
RADCHEST_DEVICES = ("catheter_or_port", "chest_tube", "clip", "gi_tube", "hardware",
                    "pacemaker_or_defib", "staple", "stent", "suture", "tracheal_tube",
                    "breast_implant")
RADCHEST_DEVICES_EXTRA = ("heart_valve_replacement", "sternotomy")
RADCHEST_SOURCES = {
    "Medical material": RADCHEST_DEVICES, "Calcification": ("calcification",),
    "Cardiomegaly": ("cardiomegaly",), "Pericardial effusion": ("pericardial_effusion",),
    "Hiatal hernia": ("hernia",), "Lymphadenopathy": ("lymphadenopathy",),
    "Emphysema": ("emphysema",), "Atelectasis": ("atelectasis",),
    "Lung nodule": ("nodule", "nodulegr1cm"), "Lung opacity": ("opacity",),
    "Pulmonary fibrotic sequela": ("scarring",), "Pleural effusion": ("pleural_effusion",),
    "Peribronchial thickening": ("bronchial_wall_thickening",),
    "Consolidation": ("consolidation",), "Bronchiectasis": ("bronchiectasis",),
    "Interlobular septal thickening": ("septal_thickening",),
}


def radchest_sources(devices: str = "official") -> dict:
    """RADCHEST_SOURCES with "Medical material" as the official 11 devices or "all" 13."""
    if devices not in ("official", "all"):
        raise ValueError(f"RAD-ChestCT devices must be 'official' or 'all', got {devices!r}")
    extra = RADCHEST_DEVICES_EXTRA if devices == "all" else ()
    return {**RADCHEST_SOURCES, "Medical material": RADCHEST_DEVICES + extra}


def read_radchest_labels(path, name_column="NoteAcc_DEID", devices: str = "official"):
    """{volume: float32 (16,)} from a RAD-ChestCT abnormality x location label CSV.

    Columns "<abnormality>*<location>" (or a bare "<abnormality>") are OR-ed per abnormality, then
    per class over radchest_sources(devices). A class with none of its abnormalities present is an
    error.
    """
    sources = radchest_sources(devices)
    rows = read_csv(path, (name_column,))
    by_abn = {}
    for c in (rows[0] if rows else {}):
        if c != name_column:
            by_abn.setdefault(c.split("*")[0].strip().lower(), []).append(c)
    missing = [k for k, v in sources.items() if not any(a in by_abn for a in v)]
    if missing:
        raise ValueError(f"{path}: no label columns for class(es) {missing} "
                         f"(expected e.g. {sources[missing[0]][0]}*<location>)")
    cols = [[c for a in sources[k] for c in by_abn.get(a, [])] for k in RADCHEST_CLASSES]
    out = {}
    for row in rows:
        try:
            out[volume_key(row[name_column])] = np.array(
                [max(float(row[c]) for c in cs) > 0 for cs in cols], np.float32)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{path}: bad label value for '{row[name_column]}' ({e})") from e
    return out


# ----------------------------------------------------------------------------- label CSVs and class sets

def label_columns(path):
    """(volume-name column, class columns) of a labels CSV: the name column is VolumeName when
    present, else the first column; every other column is a class (any name)."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            header = next(csv.reader(f), [])
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e})") from e
    name = "VolumeName" if "VolumeName" in header else (header[0] if header else None)
    classes = tuple(c for c in header if c != name)
    if not classes:
        raise ValueError(f"{path}: expected a header with a volume-name column and at least one "
                         f"class column, got {header}")
    return name, classes


def read_labels(path, classes=CTRATE_CLASSES, name_column="VolumeName", key=volume_key):
    """{key(volume name): float32 (C,) 0/1 labels in `classes` order}; columns are matched by name
    (case and surrounding spaces ignored), so their order in the file is free (CT-RATE-LT's
    differs). A value other than 0 or 1 is an error naming the file, line, volume and class."""
    rows = read_csv(path, (name_column,))
    fields = {c.strip().lower(): c for c in (rows[0] if rows else {})}
    missing = [c for c in classes if c.strip().lower() not in fields]
    if missing:
        raise ValueError(f"{path}: missing class column(s) {missing}")
    cols = [fields[c.strip().lower()] for c in classes]
    out = {}
    for i, row in enumerate(rows, start=2):  # line 1 is the header
        for c in cols:
            try:
                ok = float(row[c]) in (0.0, 1.0)
            except (TypeError, ValueError):
                ok = False
            if not ok:
                raise ValueError(f"{path}: line {i} ('{row[name_column]}'): label {row[c]!r} for "
                                 f"class '{c}'; expected 0 or 1")
        out[key(row[name_column])] = np.array([float(row[c]) for c in cols], np.float32)
    return out


def ctrate_to_radchest(scores):
    """(N, 18) CT-RATE-class scores -> (N, 16) RAD-ChestCT-class scores (numpy or torch).

    Calcification = max(arterial wall, coronary artery wall calcification); Mosaic attenuation is
    dropped; every other class keeps its own column.
    """
    xp = torch if torch.is_tensor(scores) else np
    col = {c: scores[:, i] for i, c in enumerate(CTRATE_CLASSES)}
    col["Calcification"] = xp.maximum(col["Arterial wall calcification"],
                                      col["Coronary artery wall calcification"])
    return xp.stack([col[c] for c in RADCHEST_CLASSES], 1)


def class_setup(name: str, records, label_csv=None):
    """--classes -> (label class names, score_map or None). auto: RAD-ChestCT's mapping for
    RAD-ChestCT records, else the class columns of --label_csv when given (any names: the
    prompts are written from them), else the classes the records carry."""
    have = tuple(records[0].classes) if records else CTRATE_CLASSES
    if name == "auto":
        name = ("radchest" if have == RADCHEST_CLASSES else
                "label_csv" if label_csv else "records")
    if name == "label_csv":
        return list(label_columns(label_csv)[1]), None
    if name == "records":
        if not have:
            raise ValueError("--data: its volumes carry no labels; give --label_csv CSV (volume "
                             "name, then one 0/1 column per class) or preprocess the folder with "
                             "python -m prepare.preprocess --dataset folder --labels CSV")
        return list(have), None
    if name == "ctrate":
        return list(CTRATE_CLASSES), None
    if name == "radchest":  # 18 CT-RATE prompts, mapped to RAD-ChestCT's 16 classes
        return list(RADCHEST_CLASSES), ctrate_to_radchest
    if name == "ctrate_lt":
        return list(CTRATE_LT_CLASSES), None
    raise ValueError(f"unknown --classes {name!r}; expected auto, ctrate, ctrate_lt or radchest")


def select_labels(records, classes, label_csv=None, what="--data"):
    """Records with labels in `classes` order: from label_csv (matched by volume name) or their own
    columns (matched by class name); a clear error names what is missing."""
    if label_csv:
        table = read_labels(label_csv, classes, label_columns(label_csv)[0])
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


# ----------------------------------------------------------------------------- RAD-ChestCT volumes

def read_radchest_npz(path, spacing=RADCHEST_SPACING):
    """RAD-ChestCT .npz -> (HU float32 (X, Y, Z) in canonical RAS, spacing (3,)).

    The array under key "ct" is (slices, rows, columns) in DICOM display order: rows run anterior
    to posterior, columns patient right to left, and slice 0 is the most superior one (the z axis
    is flipped relative to CT-RATE). Transposing to (columns, rows, slices) and flipping all three
    axes gives R, A, S increasing.
    """
    try:
        with np.load(path) as z:
            if "ct" not in z.files:
                raise ValueError(f"{path}: no array 'ct' in the .npz (found {z.files})")
            ct = z["ct"]
    except (OSError, EOFError, zipfile.BadZipFile) as e:
        raise ValueError(f"{path}: not a readable .npz file ({e})") from e
    if ct.ndim != 3:
        raise ValueError(f"{path}: expected a 3-D 'ct' array (slices, rows, columns), "
                         f"got {ct.shape}")
    if ct.dtype.kind == "f" and not np.isfinite(ct).all():
        raise ValueError(f"{path}: volume contains NaN or inf voxels")
    hu = np.ascontiguousarray(ct.transpose(2, 1, 0)[::-1, ::-1, ::-1], dtype=np.float32)
    return hu, np.asarray(spacing, np.float64)
