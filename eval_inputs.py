"""What eval.py reads: checkpoints, score CSVs, calibrated thresholds, and the label classes.

A checkpoint written by train.py is loaded with weights_only=True and its stored ModelConfig and
tokenizer; score and label CSVs have the volume name first and one column per class (SPEC section 4);
thresholds come from an eval.json made under the same zero-shot protocol; --classes picks CT-RATE's
18, CT-RATE-LT's 15 or RAD-ChestCT's 16 classes (18 CT-RATE prompts mapped by
data.ctrate_to_radchest). eval.py re-exports every public name (`eval.load_checkpoint`, ...).

    python -c "import eval_inputs"   # a library; eval.py is the command line
"""
import csv
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

import data as data_lib
from model import BrgSA, ModelConfig


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
    dup = sorted({n for n in names if names.count(n) > 1}) if len(set(names)) < len(names) else []
    if dup:
        raise ValueError(f"{path}: duplicate volume names, e.g. {dup[:3]}")
    if not np.isfinite(values).all():
        raise ValueError(f"{path}: NaN or inf values")
    return names, header[1:], values


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


def class_setup(name: str, records):
    """--classes -> (label class names, score_map or None). auto: whatever the records carry."""
    have = tuple(records[0].classes) if records else data_lib.CTRATE_CLASSES
    if name == "auto":
        name = "radchest" if have == getattr(data_lib, "RADCHEST_CLASSES", None) else "records"
    if name == "records":
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
        table = data_lib.read_labels(label_csv, classes)
        missing = [r.name for r in records if r.name not in table]
        if missing:
            raise ValueError(f"{label_csv}: {len(missing)} volumes of {what} have no labels, "
                             f"e.g. {missing[:3]}")
        lab = {r.name: table[r.name] for r in records}
    else:
        have = list(records[0].classes)
        missing = [c for c in classes if c not in have]
        if missing:
            raise ValueError(f"{what}: no label column for classes {missing} (give --label_csv)")
        lab = {r.name: np.asarray(r.labels)[[have.index(c) for c in classes]] for r in records}
    return [replace(r, labels=lab[r.name], classes=tuple(classes)) for r in records]
