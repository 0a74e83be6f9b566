"""The CSV tables of CT-RATE and RAD-ChestCT: metadata, reports and labels, for prepare/preprocess.py.

CT-RATE ships one metadata, one report and one label CSV per split (SPEC section 5); volumes are
matched across them by name, with or without the .nii.gz extension. RAD-ChestCT labels come as
"<abnormality>*<location>" columns, OR-ed here into its 16 classes (CT-RATE's 18 with the two
calcification classes merged and Mosaic attenuation dropped), and ctrate_to_radchest maps CT-RATE
scores onto those classes the same way. The class lists, CSV reading
and label tables shared with evaluation live in data.py.

    python -c "import prepare.tables"   # a library; prepare/preprocess.py is the command line
"""
from pathlib import Path

import numpy as np

from data import RADCHEST_CLASSES, read_csv, read_labels, volume_key


# ----------------------------------------------------------------------------- CSV tables

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
