"""CT data for BrgSA: NIfTI I/O, HU conversion, resampling, crop/pad, normalisation, the report
tokenizer, and the datasets and loaders over preprocessed caches.

Follows the paper's / official code's preprocessing (SPEC section 5): reorient to canonical RAS
(nibabel `as_closest_canonical`), HU = raw * slope + intercept where the volume is not already in HU
(CT-RATE v1 vs v2 "fixed" volumes), trilinear resampling to 1.5 x 1.5 x 3.0 mm, centre crop/pad to
256 x 256 x 128 (pad -1024 HU), clip to [-1000, 1000], and the official intensity normalisation
((HU + 1000) / 1000 - 1 - 0.4978) / 0.2449. Reports become token ids through a BERT-style WordPiece
tokenizer (Hugging Face `tokenizers`). Training and evaluation read a preprocessed directory: one
memory-mappable int16 `.npy` per volume and an index.csv (name, file, report, labels), so they never
decode gzip or resample. Those directories are written by prepare/preprocess.py:

    python -m prepare.preprocess --dataset ctrate --root CT-RATE --split train --out cache/train \
        --preset paper --workers 8
"""
import csv
import json
import zipfile
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

PREPROCESS = {
    "tiny": dict(target_spacing=(7.0, 7.0, 10.0), target_shape=(48, 48, 32)),
    "small": dict(target_spacing=(3.5, 3.5, 5.0), target_shape=(96, 96, 64)),
    "paper": dict(target_spacing=(1.5, 1.5, 3.0), target_shape=(256, 256, 128)),
}
HU_MIN, HU_MAX, PAD_HU = -1000.0, 1000.0, -1024.0
NORM_MEAN, NORM_STD = 0.4978, 0.2449  # official constants, applied after mapping HU to [-1, 1]

# ----------------------------------------------------------------------------- classes

CTRATE_CLASSES = (
    "Medical material", "Arterial wall calcification", "Cardiomegaly", "Pericardial effusion",
    "Coronary artery wall calcification", "Hiatal hernia", "Lymphadenopathy", "Emphysema",
    "Atelectasis", "Lung nodule", "Lung opacity", "Pulmonary fibrotic sequela", "Pleural effusion",
    "Mosaic attenuation pattern", "Peribronchial thickening", "Consolidation", "Bronchiectasis",
    "Interlobular septal thickening",
)
# RAD-ChestCT's 16 classes (SPEC section 5): the two calcification classes merge, Mosaic drops out
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



# ----------------------------------------------------------------------------- volumes

def load_nifti(path, spacing=None):
    """Read a NIfTI CT -> (float32 (X, Y, Z) array in canonical RAS order, spacing (3,) mm).

    The reorientation is nibabel's `as_closest_canonical` (io_orientation + apply_orientation),
    done on views so the full-resolution volume is never copied through a transpose; the returned
    array keeps the file's memory layout (typically Fortran order) and preprocess_volume resamples
    it in that layout. Header scaling (scl_slope/scl_inter) is applied by nibabel. Spacing is the
    header's pixdim permuted to RAS, or `spacing` (given in the file's own axis order) instead.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        img = nib.load(str(path))
    except Exception as e:  # nibabel raises several types for "not an image"
        raise ValueError(f"{path}: not a readable NIfTI file ({e})") from e
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise ValueError(f"{path}: expected a NIfTI image, got {type(img).__name__}")
    shape = img.shape
    if not (len(shape) == 3 or (len(shape) == 4 and shape[3] == 1)):
        raise ValueError(f"{path}: expected a 3-D volume (X, Y, Z), got shape {shape}")
    ornt = nib.orientations.io_orientation(img.affine)  # row i: (RAS axis, flip) of file axis i
    # nibabel's header check silently turns a 0 mm voxel into 1 mm: read pixdim as written
    zooms = _raw_pixdim(path, img) if spacing is None else np.asarray(spacing, np.float64).ravel()
    if zooms.shape != (3,) or not np.all(np.isfinite(zooms)) or np.any(zooms <= 0):
        raise ValueError(f"{path}: voxel spacing must be three positive numbers, "
                         f"got {zooms.tolist()}")
    try:
        raw = _read_voxels(path, img)
    except Exception as e:  # truncated gzip: EOFError, zlib.error, OSError, ValueError ...
        raise ValueError(f"{path}: cannot read the voxel data ({type(e).__name__}: {e})") from e
    if raw.ndim == 4:
        raw = raw[..., 0]
    if raw.dtype.kind == "f" and not np.isfinite(raw).all():
        raise ValueError(f"{path}: volume contains NaN or inf voxels")
    arr = nib.orientations.apply_orientation(raw, ornt)  # a view: flips and a transpose
    zooms = zooms[np.argsort(ornt[:, 0])]  # RAS axis ornt[i, 0] takes file axis i's spacing
    return _float32_like(arr), zooms


def _float32_like(a):
    """float32 copy of `a` in a's own memory layout (flips undone): one pass, no transpose.

    (numpy's astype takes a slow buffered path for Fortran-ordered or flipped int16 input.)
    """
    order = np.argsort([-abs(st) for st in a.strides], kind="stable")  # slowest axis first
    out = np.empty([a.shape[i] for i in order], np.float32).transpose(np.argsort(order))
    out[...] = a
    return out


def _inflate_module():
    """The gzip inflater: ISA-L's (package `isal`) when installed, else the standard library's.

    Both expose zlib's decompressobj(wbits=31) and give the same bytes; ISA-L inflates a CT
    .nii.gz ~1.8x faster on one core (benchmarks/preprocess_bench.py), and inflating is most of
    the preprocessing time.
    """
    try:
        from isal import isal_zlib
    except ImportError:
        return zlib
    return isal_zlib


INFLATE = _inflate_module()


def _read_voxels(path, img):
    """Voxel array of a NIfTI image in file order (header scaling applied, float32 if scaled).

    A .nii.gz is inflated (INFLATE: ISA-L or zlib) straight into one preallocated buffer, so memory
    stays at the decompressed size plus one chunk: nibabel's gzip reader (GzipFile + a second CRC
    pass) is ~1.6x slower than even zlib here. Anything else goes through nibabel's array proxy.
    """
    if not str(path).endswith(".gz"):
        return np.asanyarray(img.dataobj)
    proxy = img.dataobj  # nibabel keeps the on-disk layout here (the header's copy is reset)
    dtype, shape, offset = np.dtype(proxy.dtype), tuple(proxy.shape), int(proxy.offset)
    count = int(np.prod(shape))
    buf = np.empty(offset + count * dtype.itemsize, np.uint8)
    inflate, pos = INFLATE.decompressobj(wbits=31), 0  # 31: expect a gzip wrapper
    with open(path, "rb") as f:
        while pos < buf.size and (chunk := f.read(1 << 22)):
            out = inflate.decompress(chunk)
            k = min(len(out), buf.size - pos)
            buf[pos:pos + k] = np.frombuffer(out, np.uint8, k)
            pos += k
    if pos < buf.size:
        raise EOFError(f"file ends after {pos} of {buf.size} bytes (truncated download?)")
    arr = np.frombuffer(buf, dtype, count, offset).reshape(shape, order=proxy.order)
    slope, inter = float(proxy.slope), float(proxy.inter)
    if slope == 1.0 and inter == 0.0:
        return arr
    arr = _float32_like(arr)
    arr *= np.float32(slope)
    arr += np.float32(inter)
    return arr


def _raw_pixdim(path, img):
    """pixdim[1:4] as written in the file, before nibabel's header fixes."""
    with nib.openers.ImageOpener(str(path)) as f:
        hdr = type(img.header).from_fileobj(f, check=False)
    return np.asarray(hdr["pixdim"][1:4], np.float64)


def to_hu(raw, slope, intercept, out=None):
    """Apply DICOM rescaling unless the volume already is in HU -> (hu float32, rule).

    rule is "rescaled" or "already_hu". CT-RATE v2 ("fixed") volumes are stored in HU although the
    metadata still lists slope/intercept; rescaling them again shifts air to about -2000 HU. The
    test is where the air is: count voxels within 100 HU of -1000 under both readings (on a
    subsample) and pick the reading with more air; a volume with no air falls back to its minimum.
    `out=raw` rescales a float32 `raw` in place (the preprocessing pipeline owns its array).
    """
    raw = np.asarray(raw, dtype=np.float32)
    slope, intercept = float(slope), float(intercept)
    if slope == 1.0 and intercept == 0.0:
        return raw, "already_hu"
    sub = raw[::4, ::4, ::2] if raw.ndim == 3 else raw
    air_as_is = np.count_nonzero(np.abs(sub + 1000.0) < 100.0)
    air_rescaled = np.count_nonzero(np.abs(sub * slope + intercept + 1000.0) < 100.0)
    if air_as_is > air_rescaled or (air_as_is == air_rescaled == 0 and raw.min() < -500.0):
        return raw, "already_hu"
    hu = np.multiply(raw, np.float32(slope), out=out)
    hu += np.float32(intercept)
    return hu, "rescaled"


def crop_or_pad(x, shape, fill=PAD_HU):
    """Centre crop / pad a (X, Y, Z) array to `shape`; padding uses `fill`."""
    out = np.full(shape, fill, dtype=x.dtype)
    src, dst = [], []
    for n, m in zip(x.shape, shape):
        if n >= m:  # crop: keep the centre m of n
            a = (n - m) // 2
            src.append(slice(a, a + m)), dst.append(slice(0, m))
        else:  # pad: place n in the centre of m
            a = (m - n) // 2
            src.append(slice(0, n)), dst.append(slice(a, a + n))
    out[tuple(dst)] = x[tuple(src)]
    return out


def preprocess_volume(hu, spacing, target_spacing=(1.5, 1.5, 3.0), target_shape=(256, 256, 128)):
    """Resample (trilinear) to `target_spacing`, centre crop/pad to `target_shape`, clip HU.

    Voxel centres are handled in physical space: with the volume's outer edge as origin, input voxel
    i sits at (i + 1/2) * s and output voxel j at (j + 1/2) * t, i.e. at input index
    (j + 1/2) * t / s - 1/2, which is exactly `interpolate(scale_factor=s / t, align_corners=False)`
    with the scale factor kept (not recomputed from the rounded size).
    Returns float32 HU of `target_shape`, clipped to [-1000, 1000] (padding -1024 clips to -1000).
    """
    hu = np.asarray(hu)
    if hu.ndim != 3:
        raise ValueError(f"expected a (X, Y, Z) volume, got shape {hu.shape}")
    # resample in memory order (a NIfTI volume is Fortran-ordered): transposing a 512x512x300
    # array costs more than the whole resampling, so permute the small output instead
    order = tuple(int(a) for a in np.argsort([-abs(st) for st in hu.strides], kind="stable"))
    hu = hu.transpose(order)
    if hu.dtype != np.float32 or not hu.flags.c_contiguous:
        hu = _float32_like(hu)
    s = np.asarray(spacing, np.float64)
    t = np.asarray(target_spacing, np.float64)
    if s.shape != (3,) or np.any(~np.isfinite(s)) or np.any(s <= 0) or np.any(t <= 0):
        raise ValueError(f"spacing must be three positive numbers, got {spacing} -> "
                         f"{target_spacing}")
    scale = tuple(float(s[a] / t[a]) for a in order)  # in memory order, like hu
    if any(int(n * f) < 1 for n, f in zip(hu.shape, scale)):
        raise ValueError(f"volume at {s.tolist()} mm is smaller than one {t.tolist()} mm voxel")
    with torch.no_grad():
        y = F.interpolate(torch.from_numpy(hu)[None, None], scale_factor=scale, mode="trilinear",
                          align_corners=False, recompute_scale_factor=False)[0, 0]
    y = y.numpy().transpose(np.argsort(order))  # back to (X', Y', Z')
    y = crop_or_pad(y, tuple(target_shape))
    return np.clip(y, HU_MIN, HU_MAX, out=y)


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


def normalize(hu):
    """HU -> model input: (HU + 1000) / 1000 - 1, then (x - 0.4978) / 0.2449. numpy or torch."""
    x = (hu + 1000.0) / 1000.0 - 1.0
    return (x - NORM_MEAN) / NORM_STD


RADCHEST_SPACING = (0.8, 0.8, 0.8)  # mm, isotropic as released


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


# ----------------------------------------------------------------------------- report tokenizer

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]  # [PAD] = 0, as in BERT


def _normalizer():
    return normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                      strip_accents=True, lowercase=True)


def _bert_pipeline(tok):
    """BERT-style normaliser, pre-tokenizer, [CLS] ... [SEP] post-processor and decoder."""
    tok.normalizer = _normalizer()
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.add_special_tokens([t for t in SPECIAL_TOKENS if tok.token_to_id(t) is not None])
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    if cls is None or sep is None:
        raise ValueError("tokenizer vocabulary lacks [CLS] or [SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    tok.decoder = decoders.WordPiece()
    return tok


def train_tokenizer(texts, vocab_size=4096, path=None):
    """Build a WordPiece vocabulary from `texts` (BERT-style); save it as tokenizer.json to `path`.

    The vocabulary is the special tokens, every character seen (alone and as a "##" continuation,
    so that any word can be spelled), then whole words by frequency, ties in alphabetical order, up
    to vocab_size; a word outside it is split into the longest known pieces, as BERT does. We do not
    use tokenizers' WordPieceTrainer: its merges break frequency ties in hash-map order, so every
    call gives another vocabulary, and two identical training runs would not be identical.
    """
    norm, pre = _normalizer(), pre_tokenizers.BertPreTokenizer()  # as the tokenizer will split
    counts = Counter(w for t in texts for w, _ in pre.pre_tokenize_str(norm.normalize_str(t)))
    chars = sorted({c for w in counts for c in w})
    pieces = SPECIAL_TOKENS + chars + ["##" + c for c in chars]
    if vocab_size < len(pieces):
        raise ValueError(f"vocab_size={vocab_size} is too small: the special tokens and the "
                         f"{len(chars)} characters of the texts need {len(pieces)}")
    words = sorted((w for w in counts if len(w) > 1), key=lambda w: (-counts[w], w))
    pieces += words[: vocab_size - len(pieces)]
    vocab = {p: i for i, p in enumerate(pieces)}
    tok = _bert_pipeline(Tokenizer(models.WordPiece(vocab, unk_token="[UNK]")))
    if path is not None:
        path = Path(path)
        path = path / "tokenizer.json" if path.is_dir() else path
        path.parent.mkdir(parents=True, exist_ok=True)
        tok.save(str(path))
    return tok


def load_tokenizer(path):
    """Load a tokenizer.json or a BERT vocab.txt (or a folder holding either)."""
    path = Path(path)
    if path.is_dir():
        hits = [path / n for n in ("tokenizer.json", "vocab.txt") if (path / n).is_file()]
        if not hits:
            raise FileNotFoundError(f"{path}: holds neither tokenizer.json nor vocab.txt")
        path = hits[0]
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such tokenizer file")
    if path.suffix == ".json":
        try:
            return Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a plain Exception on bad JSON
            raise ValueError(f"{path}: not a tokenizers JSON file ({e})") from e
    vocab = models.WordPiece.read_file(str(path))
    return _bert_pipeline(Tokenizer(models.WordPiece(vocab, unk_token="[UNK]")))


def tokenizer_from_string(text):
    """The inverse of Tokenizer.to_str(): how checkpoints carry their tokenizer."""
    return Tokenizer.from_str(text)


def tokenize(tok, texts, max_len=97):
    """-> (input_ids, attention_mask), LongTensor (B, max_len): [CLS] text [SEP], truncated, padded.

    Sets the tokenizer's truncation/padding to max_len; padding uses the [PAD] id (0 in our vocab).
    """
    pad = tok.token_to_id("[PAD]")
    pad = 0 if pad is None else pad
    tok.enable_truncation(max_length=max_len)
    tok.enable_padding(pad_id=pad, pad_token="[PAD]", length=max_len)
    enc = tok.encode_batch(list(texts))
    ids = torch.tensor([e.ids for e in enc], dtype=torch.long)
    mask = torch.tensor([e.attention_mask for e in enc], dtype=torch.long)
    return ids, mask


# ----------------------------------------------------------------------------- tables and the preprocessed index

def read_csv(path, required=()):
    """Rows of a UTF-8 CSV as dicts; a clear error names the file and any missing column."""
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8") as f:
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


def volume_key(name):
    """'train_1_a_1.nii.gz' -> 'train_1_a_1' (CSV names come with and without the extension)."""
    name = Path(str(name).strip()).name
    for ext in (".nii.gz", ".nii", ".npz", ".npy"):
        if name.endswith(ext):
            return name[: -len(ext)]
    return name


def label_columns(path):
    """(volume-name column, class columns) of a labels CSV: the name column is VolumeName when
    present, else the first column; every other column is a class (any name)."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
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


@dataclass
class Record:
    """One preprocessed volume: its cached HU array and what goes with it."""
    name: str
    npy_path: str            # int16 HU, shape = the preset's target_shape, memory-mappable
    report: str              # Findings + " " + Impressions ("" where a data set has no reports)
    labels: np.ndarray       # float32 (C,), in the order of `classes`
    spacing: tuple = ()      # source voxel spacing (mm) in canonical RAS order
    hu_rule: str = ""        # "rescaled" / "already_hu" / "header" (header scaling trusted)
    classes: tuple = CTRATE_CLASSES



INDEX_FIXED = ("volume", "npy", "report", "spacing_x", "spacing_y", "spacing_z", "hu_rule")


def load_index(cache_dir):
    """Read a preprocessed dir (its index.csv) back -> list[Record] with absolute npy paths."""
    cache_dir = Path(cache_dir)
    path = cache_dir / "index.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no index.csv (not a preprocessed directory)")
    with open(path, newline="", encoding="utf-8") as f:
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


# ----------------------------------------------------------------------------- data sets and loaders

def preprocess_settings(preset, shape=None):
    """A PREPROCESS name, an object with .spacing/.image_size (ModelConfig) or a spacing tuple."""
    if isinstance(preset, str):
        if preset not in PREPROCESS:
            raise ValueError(f"unknown preset '{preset}', expected one of {sorted(PREPROCESS)}")
        p = PREPROCESS[preset]
        return preset, tuple(p["target_spacing"]), tuple(p["target_shape"])
    if hasattr(preset, "spacing"):
        preset, shape = preset.spacing, preset.image_size
    spacing, shape = tuple(float(v) for v in preset), tuple(int(v) for v in shape)
    for name, p in PREPROCESS.items():
        if tuple(p["target_spacing"]) == spacing and tuple(p["target_shape"]) == shape:
            return name, spacing, shape
    tag = "x".join(f"{v:g}" for v in spacing) + "mm_" + "x".join(map(str, shape))
    return tag, spacing, shape


def find_index(path, split):
    """The preprocessed dir of `split` under `path` (<path>/<split> or <path> itself), or None."""
    for d in (Path(path) / split, Path(path)):
        if (d / "index.csv").is_file():
            return d
    return None


def load_dataset(path, split, preset=None, shape=None):
    """Records of one split of a preprocessed dir (written by prepare/preprocess.py).

    path: <path>/<split>/index.csv, or <path>/index.csv whose CT-RATE names are filtered by the
    split prefix. preset: a PREPROCESS name, a ModelConfig (its .spacing and .image_size) or a
    target spacing tuple together with `shape`; when given, it must match the dir's settings.json.
    """
    path = Path(path)
    d = find_index(path, split)
    if d is None:
        raise FileNotFoundError(f"{path}: no index.csv (not a preprocessed directory); make one with "
                                f"python -m prepare.preprocess --root {path} --out DIR")
    if preset is not None and (d / "settings.json").is_file():
        want = preprocess_settings(preset, shape)[1:]
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


def _draw_rng(seed, index):
    """A numpy RNG for one __getitem__ call: fresh each call, reproducible under torch seeding.

    The salt comes from torch's generator, which DataLoader seeds per worker from its own
    generator, so runs repeat exactly with the same seeds and worker count.
    """
    salt = int(torch.randint(0, 2**62, ()).item())
    return np.random.default_rng([seed, index, salt])


def load_volume(npy_path, crop_size=None, rng=None):
    """Cached HU .npy -> normalised float32 tensor (1, X, Y, Z), randomly cropped when given
    crop_size and rng."""
    a = np.load(npy_path, mmap_mode="r")  # only the cropped part is read from disk
    if crop_size is not None and rng is not None:
        if any(c > n for c, n in zip(crop_size, a.shape)):
            raise ValueError(f"{npy_path}: crop {tuple(crop_size)} is larger than volume {a.shape}")
        start = [int(rng.integers(0, n - c + 1)) for n, c in zip(a.shape, crop_size)]
        a = a[tuple(slice(s, s + c) for s, c in zip(start, crop_size))]
    x = torch.from_numpy(np.asarray(a, dtype=np.float32))
    # normalize() folded into one in-place multiply-add: (HU / 1000 - mean) / std
    return x.mul_(1.0 / (1000.0 * NORM_STD)).add_(-NORM_MEAN / NORM_STD)[None]


class VolumeTextDataset(torch.utils.data.Dataset):
    """(volume, text) pairs for training: one item per unique report (SPEC section 3).

    A report with several volumes (reconstructions) picks one at random per draw (train) or the
    first (eval). Text: min(5, n) of the report's summary sentences in random order (train) or all
    in order (eval); the raw report when it has no summary. sentences="random" draws a random
    count from 1 to min(5, n) instead, so single sentences, shaped like the zero-shot prompts, are
    seen in training too (not the official rule; the tiny preset's default, see train.py).
    """

    def __init__(self, records, summaries=None, crop_size=None, train=True, seed=0,
                 sentences="paper"):
        if sentences not in ("paper", "random"):
            raise ValueError(f"sentences must be 'paper' or 'random', got {sentences!r}")
        groups = {}
        for r in records:
            groups.setdefault(r.report, []).append(r)
        self.groups = list(groups.values())
        self.summaries = summaries or {}
        self.crop_size, self.train, self.seed, self.sentences = crop_size, train, seed, sentences

    def __len__(self):
        return len(self.groups)

    def text(self, report, rng=None):
        sents = [s for s in self.summaries.get(report, []) if s and s.strip()]
        if not sents:
            return report
        if rng is None:
            return " ".join(sents)
        k = min(5, len(sents))
        if self.sentences == "random":
            k = int(rng.integers(1, k + 1))
        pick = rng.permutation(len(sents))[:k]
        return " ".join(sents[i] for i in pick)

    def __getitem__(self, i):
        group = self.groups[i]
        rng = _draw_rng(self.seed, i) if self.train else None
        r = group[int(rng.integers(len(group)))] if rng is not None else group[0]
        crop = self.crop_size if self.train else None
        return dict(volume=load_volume(r.npy_path, crop, rng), text=self.text(r.report, rng),
                    labels=torch.from_numpy(np.asarray(r.labels, np.float32)), name=r.name)


class VolumeDataset(torch.utils.data.Dataset):
    """Every volume (no grouping), full size, for evaluation: volume, labels, name."""

    def __init__(self, records):
        self.records = list(records)

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        r = self.records[i]
        return dict(volume=load_volume(r.npy_path),
                    labels=torch.from_numpy(np.asarray(r.labels, np.float32)), name=r.name)


def eval_loader(records, batch_size, workers=0):
    """A plain, ordered DataLoader over VolumeDataset(records) for evaluation."""
    return torch.utils.data.DataLoader(VolumeDataset(records), batch_size=batch_size, shuffle=False,
                                       num_workers=workers, pin_memory=torch.cuda.is_available())


def make_loader(dataset, batch_size, shuffle=True, workers=0, seed=0, drop_last=None):
    """DataLoader with a seeded shuffle, pinned memory on CUDA hosts, and persistent, prefetching
    workers when workers > 0. drop_last defaults to shuffle: a tiny last training batch has
    almost no negatives for the contrastive loss."""
    extra = dict(prefetch_factor=2, persistent_workers=True) if workers > 0 else {}
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle, num_workers=workers,
        generator=torch.Generator().manual_seed(seed), pin_memory=torch.cuda.is_available(),
        drop_last=shuffle if drop_last is None else drop_last, **extra)
