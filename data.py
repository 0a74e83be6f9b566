"""CT data for BrgSA: NIfTI I/O, HU conversion, resampling, crop/pad, normalisation, the report
tokenizer, and the datasets and loaders over preprocessed caches.

Follows the paper's / official code's preprocessing: reorient to canonical RAS
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
import zlib
from collections import Counter
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

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


# ----------------------------------------------------------------------------- volumes

def load_nifti(path, spacing=None):
    """Read a NIfTI CT -> (float32 (X, Y, Z) array in canonical RAS order, spacing (3,) mm).

    The reorientation is nibabel's `as_closest_canonical`, done on views (no transpose of the full
    volume: the array keeps the file's memory layout, which preprocess_volume resamples in). Header
    scaling (scl_slope/scl_inter) is applied. Spacing is the header's pixdim permuted to RAS, or
    `spacing` (in the file's own axis order). A file that is not a whole 3-D NIfTI CT (truncated,
    4-D, a degenerate affine, zero spacing, NaN voxels, a DICOM series) is refused by name.
    """
    path = Path(path)
    if path.is_dir() or _is_dicom(path):
        raise ValueError(f"{path}: a {'folder' if path.is_dir() else 'DICOM file'}, not a NIfTI file; "
                         f"convert a DICOM series first, e.g. dcm2niix -z y -o OUT_DIR {path}")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        img = nib.load(str(path))
    except Exception as e:  # nibabel raises several types for "not an image"
        raise ValueError(f"{path}: not a readable NIfTI file ({e})") from None
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise ValueError(f"{path}: expected a NIfTI image, got {type(img).__name__}")
    if not (len(img.shape) == 3 or (len(img.shape) == 4 and img.shape[3] == 1)):
        raise ValueError(f"{path}: expected a 3-D volume (X, Y, Z), got shape {img.shape} "
                         f"({'a time series or several volumes' if len(img.shape) == 4 else 'not 3-D'})")
    A = np.asarray(img.affine[:3, :3], np.float64)
    if not np.isfinite(A).all() or abs(np.linalg.det(A)) < 1e-12:
        raise ValueError(f"{path}: its affine is singular (voxel axes of zero length or in one plane), "
                         f"so the scan has no orientation; fix the header (qform / sform)")
    ornt = nib.orientations.io_orientation(img.affine)  # row i: (RAS axis, flip) of file axis i
    # nibabel's header check silently turns a 0 mm voxel into 1 mm: read pixdim as written
    zooms = _raw_pixdim(path, img) if spacing is None else np.asarray(spacing, np.float64).ravel()
    if zooms.shape != (3,) or not np.all(np.isfinite(zooms)) or np.any(zooms <= 0):
        raise ValueError(f"{path}: voxel spacing must be three positive numbers, got {zooms.tolist()}")
    try:
        raw = _read_voxels(path, img)
    except Exception as e:  # truncated gzip: EOFError, zlib.error, OSError, ValueError ...
        raise ValueError(f"{path}: cannot read the voxel data ({type(e).__name__}: {e})") from None
    raw = raw[..., 0] if raw.ndim == 4 else raw
    if raw.dtype.kind == "f" and not np.isfinite(raw).all():
        raise ValueError(f"{path}: volume contains NaN or inf voxels")
    arr = nib.orientations.apply_orientation(raw, ornt)  # a view: flips and a transpose
    return _float32_like(arr), zooms[np.argsort(ornt[:, 0])]  # RAS axis ornt[i, 0]: file axis i's


def _is_dicom(path) -> bool:
    """A DICOM file (the 'DICM' mark at byte 128), or a folder holding one."""
    path = Path(path)
    if path.is_dir():
        return any(_is_dicom(p) for p in sorted(path.iterdir())[:20] if p.is_file())
    try:
        with open(path, "rb") as f:
            return f.read(132)[128:] == b"DICM"
    except OSError:
        return False


def _float32_like(a):
    """float32 copy of `a` in a's own memory layout (flips undone): one pass, no transpose.

    (numpy's astype takes a slow buffered path for Fortran-ordered or flipped int16 input.)
    """
    order = np.argsort([-abs(st) for st in a.strides], kind="stable")  # slowest axis first
    out = np.empty([a.shape[i] for i in order], np.float32).transpose(np.argsort(order))
    out[...] = a
    return out


def _inflate_module():
    """ISA-L's gzip inflater (package `isal`) when installed, else zlib's: the same bytes, ~1.8x
    faster on one core (benchmarks/preprocess_bench.py); inflating is most of preprocessing."""
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


def normalize(hu):
    """HU -> model input: (HU + 1000) / 1000 - 1, then (x - 0.4978) / 0.2449. numpy or torch."""
    x = (hu + 1000.0) / 1000.0 - 1.0
    return (x - NORM_MEAN) / NORM_STD


# ----------------------------------------------------------------------------- report tokenizer

RESERVED_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]  # [PAD] = 0, as in BERT


def _normalizer():
    return normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                      strip_accents=True, lowercase=True)


def bert_tokenizer(vocab: dict) -> Tokenizer:
    """A WordPiece tokenizer over `vocab` ({piece: id}) with BERT's normaliser, pre-tokenizer,
    [CLS] ... [SEP] post-processor and decoder."""
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = _normalizer()
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.add_special_tokens([t for t in RESERVED_TOKENS if tok.token_to_id(t) is not None])
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
    pieces = RESERVED_TOKENS + chars + ["##" + c for c in chars]
    if vocab_size < len(pieces):
        raise ValueError(f"vocab_size={vocab_size} is too small: the special tokens and the "
                         f"{len(chars)} characters of the texts need {len(pieces)}")
    words = sorted((w for w in counts if len(w) > 1), key=lambda w: (-counts[w], w))
    pieces += words[: vocab_size - len(pieces)]
    vocab = {p: i for i, p in enumerate(pieces)}
    tok = bert_tokenizer(vocab)
    if path is not None:
        path = Path(path)
        path = path / "tokenizer.json" if path.is_dir() else path
        path.parent.mkdir(parents=True, exist_ok=True)
        tok.save(str(path))
    return tok


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


def volume_key(name):
    """'train_1_a_1.nii.gz' -> 'train_1_a_1' (CSV names come with and without the extension)."""
    name = Path(str(name).strip()).name
    for ext in (".nii.gz", ".nii", ".npz", ".npy"):
        if name.endswith(ext):
            return name[: -len(ext)]
    return name


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


# ----------------------------------------------------------------------------- data sets and loaders


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
    """(volume, text) pairs for training: one item per unique report.

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


def mean_volume(records, limit: int = 512) -> torch.Tensor:
    """Mean model-input volume (1, X, Y, Z) of up to `limit` records, evenly spaced: what input
    centering subtracts (model.ViT3D)."""
    picks = records[:: max(1, len(records) // limit)][:limit]
    return torch.stack([load_volume(r.npy_path) for r in picks]).mean(0)


def eval_loader(records, batch_size, workers=0):
    """A plain, ordered DataLoader over VolumeDataset(records) for evaluation. Its own generator
    seeds its workers, so that evaluating mid-training draws nothing from torch's global RNG
    (which a resumed run must find as the uninterrupted run left it)."""
    return torch.utils.data.DataLoader(VolumeDataset(records), batch_size=batch_size, shuffle=False,
                                       num_workers=workers, pin_memory=torch.cuda.is_available(),
                                       generator=torch.Generator())


# ----------------------------------------------------------------------------- the training loader
# A resumed run (or another worker count, or another rank split) must see exactly the batches and
# items the uninterrupted one would: the batches are a function of (seed, step), the items of
# (seed, step, index), and making the loader draws nothing from torch's global RNG.

class StepSeeded(torch.utils.data.Dataset):
    """Makes every training item a pure function of (seed, step, index).

    VolumeTextDataset draws an item's crop, summary sentences and reconstruction from a salt taken
    from torch's global RNG; in a DataLoader worker that state depends on the worker's seed and on
    how many items it served before. Reseeding torch's RNG from (seed, step, index) just before
    delegating pins the salt whichever process runs the item; fork_rng restores the caller's RNG.
    """

    def __init__(self, base, seed: int):
        self.base, self.seed = base, seed

    def __len__(self):
        return len(self.base)

    def __getitem__(self, key):
        step, i = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(((self.seed * 1_000_003 + step) * 1_000_003 + i) % 2**63)
            return self.base[i]


def rank_batches(n, batch_size, seed, start_step, rank=0, world=1, accum=1):
    """This rank's micro-batches of (step, index) pairs from start_step on: each epoch a fresh
    seeded permutation; each step's batch cut into accum * world chunks, rank r's micro-batch m
    being chunk m * world + r, so micro-batch m gathered over the ranks is one process's slice."""
    per_epoch, b, step = n // batch_size, batch_size // (world * accum), start_step
    while True:
        epoch, k = divmod(step, per_epoch)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch))
        idx = perm[k * batch_size:(k + 1) * batch_size].tolist()
        for m in range(accum):
            c = m * world + rank
            yield [(step, i) for i in idx[c * b:(c + 1) * b]]
        step += 1


def collate(items, tokenizer, max_len: int):
    volume = torch.stack([it["volume"] for it in items])  # (B, 1, X, Y, Z)
    ids, mask = tokenize(tokenizer, [it["text"] for it in items], max_len)
    width = int(mask.sum(1).max())  # padding past the longest text changes nothing: trim it
    return volume, ids[:, :width], mask[:, :width]


def train_loader(dataset, tokenizer_json: str, max_len: int, batch_size: int, seed: int,
                 start_step: int = 0, rank: int = 0, world: int = 1, accum: int = 1,
                 workers: int = 0, pin: bool = False):
    """(volume, ids, mask) micro-batches of a VolumeTextDataset for steps start_step, ..."""
    return torch.utils.data.DataLoader(
        StepSeeded(dataset, seed), num_workers=workers, pin_memory=pin,
        batch_sampler=rank_batches(len(dataset), batch_size, seed, start_step, rank, world, accum),
        collate_fn=partial(collate, tokenizer=tokenizer_from_string(tokenizer_json), max_len=max_len),
        generator=torch.Generator().manual_seed(seed), persistent_workers=workers > 0)
