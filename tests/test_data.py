"""Tests for data.py: NIfTI I/O and orientation, HU rules, resampling, datasets, loaders, tokenizer.

Real volumes and reports come from ../shared/data (skipped when absent); everything else is built
in tmp_path from seeded synthetic arrays.   Run: python -m pytest tests/test_data.py -q
"""
import csv
import gzip

import nibabel as nib
import numpy as np
import pytest
import torch

import data
from prepare import preprocess, pretrained, tables


def write_nifti(path, arr, affine, slope=None, inter=None):
    img = nib.Nifti1Image(arr, affine)
    if slope is not None:
        img.header.set_slope_inter(slope, inter)
    nib.save(img, str(path))
    return path


def chest(shape, rng):
    """A crude chest in HU (X, Y, Z): air, a soft-tissue body, two lungs, noise."""
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    hu = np.full(shape, -1000.0)
    hu[(x / 0.9) ** 2 + (y / 0.7) ** 2 < 1] = 40.0
    for cx in (-0.4, 0.4):
        hu[((x - cx) / 0.3) ** 2 + (y / 0.45) ** 2 < 1] = -850.0
    return np.rint(hu + rng.normal(0, 10, shape)).astype(np.int16)


# ----------------------------------------------------------------------------- load_nifti

def test_load_nifti_reorients_to_ras_with_spacing(tmp_path):
    # file axes: 0 -> S (3 mm), 1 -> L (1 mm, i.e. -R), 2 -> P (2 mm, i.e. -A)
    n0, n1, n2 = 5, 6, 7
    affine = np.array([[0, -1.0, 0, 10], [0, 0, -2.0, 20], [3.0, 0, 0, -30], [0, 0, 0, 1]])
    arr = np.zeros((n0, n1, n2), np.int16)
    i, j, k = 1, 2, 3
    arr[i, j, k] = 500
    path = write_nifti(tmp_path / "lps.nii.gz", arr, affine, slope=2.0, inter=-1024.0)
    vol, spacing = data.load_nifti(path)
    assert vol.dtype == np.float32 and vol.shape == (n1, n2, n0)
    np.testing.assert_allclose(spacing, [1.0, 2.0, 3.0])
    # x grows to the right: file axis 1 counted leftwards, so x = n1 - 1 - j; likewise y
    assert tuple(np.argwhere(vol == 500 * 2 - 1024)[0]) == (n1 - 1 - j, n2 - 1 - k, i)
    assert vol.min() == -1024.0  # header scaling applied
    # RAS world position of the marker is the same before and after
    canon = nib.as_closest_canonical(nib.load(str(path)))
    world = affine @ [i, j, k, 1]
    np.testing.assert_allclose(canon.affine @ [n1 - 1 - j, n2 - 1 - k, i, 1], world)


def test_load_nifti_spacing_override_follows_axes(tmp_path):
    affine = np.array([[0, -1.0, 0, 0], [0, 0, -1.0, 0], [1.0, 0, 0, 0], [0, 0, 0, 1]])
    path = write_nifti(tmp_path / "a.nii.gz", np.zeros((4, 5, 6), np.int16), affine)
    _, spacing = data.load_nifti(path, spacing=(5.0, 0.7, 0.8))  # file axis order
    np.testing.assert_allclose(spacing, [0.7, 0.8, 5.0])


def test_load_nifti_accepts_trailing_singleton(tmp_path):
    arr = np.arange(24, dtype=np.int16).reshape(2, 3, 4, 1)
    path = write_nifti(tmp_path / "4d.nii.gz", arr, np.diag([1.0, 1.0, 2.0, 1.0]))
    vol, spacing = data.load_nifti(path)
    np.testing.assert_array_equal(vol, arr[..., 0])
    np.testing.assert_allclose(spacing, [1, 1, 2])


# ----------------------------------------------------------------------------- HU rules

@pytest.mark.parametrize("slope,intercept", [(1.0, -1024.0), (0.5, -1024.0)])
def test_to_hu_v1_rescales_and_v2_is_left_alone(slope, intercept):
    hu = chest((24, 24, 12), np.random.default_rng(0)).astype(np.float32)
    raw_v1 = (hu - intercept) / slope
    raw_v1[:3] = -2000  # outside-FOV padding of some scanners, far below any air
    out, rule = data.to_hu(raw_v1, slope, intercept)
    assert rule == "rescaled"
    np.testing.assert_allclose(out[3:], hu[3:], atol=1e-3)
    out, rule = data.to_hu(hu, slope, intercept)  # v2 "fixed": stored in HU already
    assert rule == "already_hu"
    np.testing.assert_array_equal(out, hu)


def test_to_hu_identity_and_airless_volumes():
    soft = np.full((8, 8, 8), 40.0, np.float32)
    assert data.to_hu(soft, 1, 0)[1] == "already_hu"
    out, rule = data.to_hu(soft + 1024, 1, -1024)  # no air either way: raw minimum decides
    assert rule == "rescaled" and np.allclose(out, 40.0)


# ----------------------------------------------------------------------------- resampling

@pytest.mark.parametrize("shape,s,t", [((40, 30, 20), (0.7, 0.8, 2.5), (1.5, 1.5, 3.0)),
                                       ((9, 11, 7), (3.0, 2.0, 5.0), (1.0, 1.5, 2.0))])
def test_resample_linear_ramp_is_exact(shape, s, t):
    # value = linear function of the physical position of the voxel centre (outer edge = origin)
    g = [(np.arange(n) + 0.5) * sp for n, sp in zip(shape, s)]
    coef = np.array([3.0, -2.0, 1.5])
    f = lambda X, Y, Z: coef[0] * X + coef[1] * Y + coef[2] * Z - 100.0  # noqa: E731
    hu = f(*np.meshgrid(*g, indexing="ij")).astype(np.float32)
    out_shape = tuple(int(n * a / b) for n, a, b in zip(shape, s, t))
    out = data.preprocess_volume(hu, s, t, out_shape)
    assert out.shape == out_shape and out.dtype == np.float32
    go = [(np.arange(n) + 0.5) * sp for n, sp in zip(out_shape, t)]
    want = f(*np.meshgrid(*go, indexing="ij"))
    # only output centres whose linear stencil lies inside the input (edges clamp)
    inner = tuple(slice(int(np.ceil(sp / 2 / tp)) + 1, n - int(np.ceil(sp / tp)) - 1)
                  for sp, tp, n in zip(s, t, out_shape))
    err = np.abs(out[inner] - want[inner])
    assert out[inner].size > 0 and err.max() < 1e-3, f"max err {err.max()}, mean {err.mean()}"


def test_crop_pad_clip():
    hu = np.full((10, 4, 6), 3000.0, np.float32)
    hu[5, 2, 3] = -3000.0
    out = data.preprocess_volume(hu, (1.0, 1.0, 1.0), (1.0, 1.0, 1.0), (6, 8, 6))
    assert out.shape == (6, 8, 6)
    # x: crop keeps indices 2..7; y: padded 2 + 4 + 2 with -1024, clipped to -1000
    assert np.all(out[:, :2] == -1000) and np.all(out[:, 6:] == -1000)
    assert out[3, 4, 3] == -1000 and out.max() == 1000  # marker moved by the crop; clip at 1000
    assert np.count_nonzero(out[:, 2:6] == 1000) == 6 * 4 * 6 - 1


def test_normalize_official_constants():
    hu = np.array([-1000.0, 0.0, 1000.0])
    want = (np.array([-1.0, 0.0, 1.0]) - 0.4978) / 0.2449
    np.testing.assert_allclose(data.normalize(hu), want, rtol=1e-12)
    np.testing.assert_allclose(data.normalize(torch.tensor(hu)).numpy(), want, rtol=1e-12)


def test_real_chest_ct_lesion_stays_in_place(shared_data):
    vols = shared_data / "ct_volumes"
    ct, sp = data.load_nifti(vols / "pyradiomics_lung1_ct_ds2.nii.gz")
    mask, sp_m = data.load_nifti(vols / "pyradiomics_lung1_lesion_mask_ds2.nii.gz")
    np.testing.assert_allclose(sp, [1.140625, 1.140625, 5.0])
    hu, rule = data.to_hu(ct, 1.0, -1024.0)
    assert rule == "already_hu" and hu.min() == -1024
    t, shape = (1.5, 1.5, 3.0), (256, 256, 128)
    out = data.preprocess_volume(hu, sp, t, shape)
    m = data.preprocess_volume(mask * 1000.0, sp_m, t, shape)  # mask as 0/1000 "HU", no clipping
    assert out.shape == shape and out.min() == -1000 and out.max() == 1000
    # physical centroid in mm from the volume's outer corner: input voxel i at (i + 1/2) s, output
    # voxel j at (j + a + 1/2) t where a is the crop start (or minus the padding) on that axis
    c_in = (np.argwhere(mask > 0).mean(0) + 0.5) * sp
    w = m.clip(0) / 1000.0
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1)
    c_out = ((idx * w[..., None]).sum((0, 1, 2)) / w.sum() + 0.5) * t
    resampled = np.array([int(n * a / b) for n, a, b in zip(mask.shape, sp, t)])
    shift = np.where(resampled > shape, (resampled - shape) // 2 * t,
                     -((shape - resampled) // 2) * t)
    err = np.abs(c_out + shift - c_in)
    assert np.all(err < np.array(t)), f"centroid moved by {err} mm"
    core = out[m > 900]  # voxels fully inside the lesion after resampling (5 mm slices blur it)
    assert core.size > 50 and -150 < np.median(core) < 150, f"lesion median HU {np.median(core)}"
    assert abs(np.median(core) - np.median(hu[mask > 0])) < 100


@pytest.mark.parametrize("inflater", ["default", "zlib"])
def test_fast_reader_is_bitwise_nibabels_reader(shared_data, monkeypatch, inflater):
    """The .nii.gz reader (ISA-L when installed, or the standard library's zlib) gives exactly
    nibabel's own voxels, dtype and layout, on every real volume."""
    import zlib
    if inflater == "zlib":
        monkeypatch.setattr(data, "INFLATE", zlib)
    files = sorted((shared_data / "ct_volumes").glob("*.nii.gz"))
    assert len(files) == 3
    for path in files:
        img = nib.load(str(path))
        want = np.asanyarray(img.dataobj)  # nibabel's GzipFile reader: the reference
        got = data._read_voxels(path, img)
        assert got.dtype == want.dtype and got.shape == want.shape, path.name
        assert got.tobytes(order="A") == want.tobytes(order="A"), f"{path.name}: voxels differ"
        assert np.array_equal(got, want)


@pytest.mark.parametrize("inflater", ["default", "zlib"])
def test_reader_checks_the_gzip_crc(monkeypatch, tmp_path, inflater):
    import zlib
    if inflater == "zlib":
        monkeypatch.setattr(data, "INFLATE", zlib)
    path = write_nifti(tmp_path / "v.nii.gz", chest((12, 10, 6), np.random.default_rng(2)), np.eye(4))
    blob = bytearray(path.read_bytes())
    blob[-6] ^= 0xFF  # a byte of the CRC-32 in the gzip trailer
    (tmp_path / "crc.nii.gz").write_bytes(bytes(blob))
    with pytest.raises(ValueError, match="crc.nii.gz: cannot read the voxel data"):
        data.load_nifti(tmp_path / "crc.nii.gz")


def test_reader_falls_back_to_zlib_without_isal(monkeypatch, tmp_path):
    """No `isal` package: the standard library inflates, and a truncated file is still caught."""
    import sys
    import zlib
    monkeypatch.setitem(sys.modules, "isal", None)  # import isal now raises ImportError
    assert data._inflate_module() is zlib
    monkeypatch.setattr(data, "INFLATE", data._inflate_module())
    arr = chest((17, 13, 9), np.random.default_rng(4))
    path = write_nifti(tmp_path / "v.nii.gz", arr, np.eye(4))
    got, _ = data.load_nifti(path)
    np.testing.assert_array_equal(got, arr.astype(np.float32))
    blob = path.read_bytes()
    (tmp_path / "cut.nii.gz").write_bytes(blob[: len(blob) - 40])
    with pytest.raises(ValueError, match="cut.nii.gz.*voxel data"):
        data.load_nifti(tmp_path / "cut.nii.gz")


# ----------------------------------------------------------------------------- bad inputs

def test_bad_volumes_raise_named_errors(tmp_path):
    good = write_nifti(tmp_path / "good.nii.gz", chest((16, 16, 8), np.random.default_rng(1)),
                       np.diag([1.0, 1.0, 2.0, 1.0]))
    blob = good.read_bytes()
    (tmp_path / "trunc.nii.gz").write_bytes(blob[: len(blob) // 2])
    (tmp_path / "text.nii.gz").write_bytes(gzip.compress(b"not an image at all" * 50))
    write_nifti(tmp_path / "flat.nii.gz", np.zeros((16, 16), np.int16), np.eye(4))
    write_nifti(tmp_path / "4d.nii.gz", np.zeros((4, 4, 4, 2), np.int16), np.eye(4))
    nan = np.zeros((4, 4, 4), np.float32)
    nan[1, 2, 3] = np.nan
    write_nifti(tmp_path / "nan.nii.gz", nan, np.eye(4))
    inf = np.zeros((4, 4, 4), np.float32)
    inf[0, 0, 0] = np.inf
    write_nifti(tmp_path / "inf.nii.gz", inf, np.eye(4))
    zero = nib.Nifti1Image(np.zeros((4, 4, 4), np.int16), np.eye(4))
    zero.header["pixdim"][2] = 0.0  # a header claiming 0 mm voxels
    nib.save(zero, str(tmp_path / "zero.nii"))
    raw = bytearray((tmp_path / "zero.nii").read_bytes())
    raw[80:84] = np.float32(0.0).tobytes()  # pixdim[1] (nibabel re-derives it from the affine)
    (tmp_path / "zero.nii").write_bytes(bytes(raw))
    cases = {"trunc.nii.gz": "voxel data", "text.nii.gz": "NIfTI", "flat.nii.gz": "3-D",
             "4d.nii.gz": "3-D", "nan.nii.gz": "NaN", "inf.nii.gz": "NaN or inf",
             "zero.nii": "spacing"}
    for name, what in cases.items():
        with pytest.raises(ValueError, match=what) as e:
            data.load_nifti(tmp_path / name)
        assert name in str(e.value)
    with pytest.raises(FileNotFoundError, match="missing.nii.gz"):
        data.load_nifti(tmp_path / "missing.nii.gz")
    with pytest.raises(ValueError, match="spacing"):
        data.load_nifti(good, spacing=(1.0, -1.0, 2.0))
    with pytest.raises(ValueError, match="spacing"):
        data.preprocess_volume(np.zeros((4, 4, 4)), (1.0, 0.0, 1.0))


# ----------------------------------------------------------------------------- datasets

def make_ctrate(root, split="train", n_patients=4, style="v1", seed=0, shape=(24, 20, 12)):
    """A miniature CT-RATE tree; patient 0 has two reconstructions sharing one report.

    Headers claim 1 mm voxels in LPS; the metadata CSV holds the true spacing (2, 2.5, 4) mm.
    v1 stores raw = HU + 1024 (needs the intercept), v2 stores HU (must not be rescaled).
    Returns {name: (hu (X, Y, Z) in file order, labels (18,), report)}.
    """
    rng = np.random.default_rng(seed)
    names = [f"{split}_{p}_a_{r}" for p in range(n_patients) for r in ((1, 2) if p == 0 else (1,))]
    truth = {}
    for name in names:
        hu = chest(shape, rng)
        p = name.rsplit("_", 2)[0]
        folder = root / split / p / name.rsplit("_", 1)[0]
        folder.mkdir(parents=True, exist_ok=True)
        stored = (hu.astype(np.int32) + 1024).astype(np.int16) if style == "v1" else hu
        write_nifti(folder / f"{name}.nii.gz", stored, np.diag([-1.0, -1.0, 1.0, 1.0]))
        labels = (rng.random(18) < 0.3).astype(np.float32)
        report = f"Findings for patient {p}. Impression {p}."
        truth[name] = (hu, labels if name.endswith("_1") else truth[names[0]][1], report)
    tag = "validation" if split == "valid" else split
    for sub in ("metadata", "radiology_text_reports", "multi_abnormality_labels"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    rows = [dict(VolumeName=f"{n}.nii.gz", XYSpacing="[2.0, 2.5]", ZSpacing="4.0",
                 RescaleSlope="1", RescaleIntercept="-1024") for n in names]
    write_csv(root / "metadata" / f"{tag}_metadata.csv", rows)
    rows = [dict(VolumeName=f"{n}.nii.gz", ClinicalInformation_EN="x", Technique_EN="y",
                 Findings_EN=r.split(" Impression")[0], Impressions_EN="Impression" + r.split(
                     " Impression")[1]) for n, (_, _, r) in truth.items()]
    write_csv(root / "radiology_text_reports" / f"{tag}_reports.csv", rows)
    cols = list(data.CTRATE_CLASSES)[::-1]  # deliberately another column order
    pos = {c: data.CTRATE_CLASSES.index(c) for c in cols}
    rows = [dict(VolumeName=f"{n}.nii.gz", **{c: int(lab[pos[c]]) for c in cols})
            for n, (_, lab, _) in truth.items()]
    write_csv(root / "multi_abnormality_labels" / f"{split}_predicted_labels.csv", rows)
    return truth


def write_csv(path, rows):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


T_SPACING, T_SHAPE = (4.0, 4.0, 8.0), (12, 12, 6)


def test_volume_text_dataset_sampling_crops_and_seeding(tmp_path):
    truth = make_ctrate(tmp_path / "ct", "train", n_patients=3)
    recs = preprocess.prepare_ctrate(tmp_path / "ct", "train", tmp_path / "c", T_SPACING, T_SHAPE, 1)
    reports = sorted({r.report for r in recs})
    sents = {reports[0]: [f"Finding {i}." for i in range(7)], reports[1]: ["A.", "B.", "C."]}
    ds = data.VolumeTextDataset(recs, sents, crop_size=(8, 10, 4), train=True, seed=3)
    assert len(ds) == 3  # train_0 has two reconstructions of one report
    by_report = {g[0].report: i for i, g in enumerate(ds.groups)}
    torch.manual_seed(0)
    seen_texts = set()
    for _ in range(30):
        item = ds[by_report[reports[0]]]
        words = item["text"].split(" ")
        assert item["volume"].shape == (1, 8, 10, 4) and item["volume"].dtype == torch.float32
        assert len(words) == 5 * 2 and len(set(words[1::2])) == 5  # 5 distinct sentences
        seen_texts.add(item["text"])
        t = ds[by_report[reports[1]]]["text"]
        assert sorted(t.split(" ")) == ["A.", "B.", "C."]
    assert len(seen_texts) > 10
    # each crop is the volume's own voxels at a random offset, and every offset gets drawn
    single = next(i for i, g in enumerate(ds.groups) if len(g) == 1)
    full = data.load_volume(ds.groups[single][0].npy_path)[0]
    starts = set()
    for _ in range(600):
        crop = ds[single]["volume"][0]
        hits = [(i, j, k) for i in range(5) for j in range(3) for k in range(3)
                if torch.equal(full[i:i + 8, j:j + 10, k:k + 4], crop)]
        assert hits, "a crop that is not a window of the volume"
        starts.add(hits[0])
    assert len(starts) == 5 * 3 * 3  # (12 - 8 + 1) x (12 - 10 + 1) x (6 - 4 + 1) offsets
    multi = ds.groups[[len(g) for g in ds.groups].index(2)]
    picks = {ds[ds.groups.index(multi)]["name"] for _ in range(20)}
    assert picks == {"train_0_a_1", "train_0_a_2"}
    item = ds[by_report[reports[2]]]
    assert item["text"] == reports[2]  # no summary: the raw report
    np.testing.assert_array_equal(item["labels"].numpy(), truth[item["name"]][1])
    # reproducible under torch seeding, different draw to draw
    torch.manual_seed(5)
    a = [ds[0] for _ in range(3)]
    torch.manual_seed(5)
    b = [ds[0] for _ in range(3)]
    for x, y in zip(a, b):
        assert x["text"] == y["text"] and torch.equal(x["volume"], y["volume"])
    ev = data.VolumeTextDataset(recs, sents, crop_size=(8, 10, 4), train=False)
    item = ev[by_report[reports[0]]]
    assert item["volume"].shape == (1,) + T_SHAPE and item["name"] == ev.groups[0][0].name
    assert item["text"] == " ".join(sents[reports[0]])
    hu = np.load(ev.groups[by_report[reports[0]]][0].npy_path).astype(np.float32)
    torch.testing.assert_close(item["volume"][0], data.normalize(torch.from_numpy(hu)))
    # sentences="random": 1 to min(5, n) distinct sentences, every count drawn
    rnd = data.VolumeTextDataset(recs, sents, crop_size=(8, 10, 4), train=True, seed=3,
                                 sentences="random")
    counts = [len(set(rnd[by_report[reports[0]]]["text"].split(" ")[1::2])) for _ in range(200)]
    assert set(counts) == {1, 2, 3, 4, 5}
    with pytest.raises(ValueError, match="sentences"):
        data.VolumeTextDataset(recs, sents, sentences="all")


def test_datasets_with_loader_workers_are_reproducible(tmp_path):
    make_ctrate(tmp_path / "ct", "train", n_patients=4)
    recs = preprocess.prepare_ctrate(tmp_path / "ct", "train", tmp_path / "c", T_SPACING, T_SHAPE, 1)
    ds = data.VolumeTextDataset(recs, {}, crop_size=(6, 6, 4), train=True, seed=1)

    def run():
        g = torch.Generator().manual_seed(7)
        dl = torch.utils.data.DataLoader(ds, batch_size=2, shuffle=True, num_workers=2, generator=g)
        return [(b["name"], b["volume"]) for b in dl]

    a, b = run(), run()
    assert all(x[0] == y[0] and torch.equal(x[1], y[1]) for x, y in zip(a, b))
    ev = data.VolumeDataset(recs)
    assert len(ev) == len(recs) and ev[0]["volume"].shape == (1,) + T_SHAPE
    assert set(ev[0]) == {"volume", "labels", "name"}


# ----------------------------------------------------------------------------- tokenizer

def test_tokenizer_on_real_reports(shared_data, tmp_path):
    rows = list(csv.DictReader(open(shared_data / "ctclip_reports_18labels" / "reports_shared.csv",
                                    encoding="utf-8")))
    texts = [r["report_text"] for r in rows]
    assert len(texts) == 400
    tok = data.train_tokenizer(texts, vocab_size=2000, path=tmp_path / "tok.json")
    assert [tok.token_to_id(t) for t in data.RESERVED_TOKENS] == [0, 1, 2, 3, 4]
    ids, mask = data.tokenize(tok, ["There is Atelectasis", texts[0], "Mosaïc ATTENUATION"], 97)
    assert ids.shape == mask.shape == (3, 97) and ids.dtype == mask.dtype == torch.long
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    n = int(mask[0].sum())
    assert ids[0, 0] == cls and ids[0, n - 1] == sep
    assert (ids[0, n:] == 0).all() and (mask[0, n:] == 0).all() and mask[0, :n].all()
    assert mask[1].all() and ids[1, -1] == sep  # a long report is truncated and still closed
    assert tok.decode(ids[0].tolist()) == "there is atelectasis"
    assert tok.decode(ids[2].tolist()) == "mosaic attenuation"  # lower-cased, accent stripped
    assert "[UNK]" not in tok.decode(ids[1].tolist(), skip_special_tokens=False)
    again = pretrained.load_tokenizer(tmp_path / "tok.json")
    assert torch.equal(data.tokenize(again, texts[:5])[0], data.tokenize(tok, texts[:5])[0])
    vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "vocab.txt").write_text("\n".join(t for t, _ in vocab) + "\n")
    bert = pretrained.load_tokenizer(tmp_path / "bert")
    assert torch.equal(data.tokenize(bert, texts[:5])[0], data.tokenize(tok, texts[:5])[0])
    with pytest.raises(FileNotFoundError):
        pretrained.load_tokenizer(tmp_path / "nothing")


def test_tokenizer_training_is_repeatable(shared_data):
    """The same texts give the same ids (the trainer's own tie order varies from call to call)."""
    rows = csv.DictReader(open(shared_data / "ctclip_reports_18labels" / "reports_shared.csv",
                               encoding="utf-8"))
    texts = [r["report_text"] for r in rows]
    first, second = (data.train_tokenizer(texts, vocab_size=1000) for _ in range(2))
    assert first.get_vocab() == second.get_vocab()
    ids, _ = data.tokenize(first, ["pneumopericardium zzyzx"])  # words outside the vocabulary
    assert first.decode(ids[0].tolist()) == "pneumopericardium zzyzx"  # are spelled in pieces
    with pytest.raises(ValueError, match="too small"):
        data.train_tokenizer(texts, vocab_size=20)


# ----------------------------------------------------------------------------- labels, loaders

def test_eval_loader_keeps_the_record_order_and_draws_no_global_randomness(tmp_path):
    make_ctrate(tmp_path / "ct", "train", n_patients=5)
    recs = preprocess.prepare_ctrate(tmp_path / "ct", "train", tmp_path / "c", T_SPACING, T_SHAPE, 1)
    torch.manual_seed(0)
    state = torch.get_rng_state()
    ev = data.eval_loader(recs, 4)
    assert [n for b in ev for n in b["name"]] == [r.name for r in recs]
    assert torch.equal(torch.get_rng_state(), state)  # evaluating mid-training leaves dropout's RNG
    mean = data.mean_volume(recs, limit=2)  # evenly spaced records, model-input units
    want = torch.stack([data.load_volume(recs[k].npy_path) for k in (0, len(recs) // 2)]).mean(0)
    torch.testing.assert_close(mean, want)


def test_check_hu_cases():
    """Real-looking HU passes; NaN, out-of-range values and no air are refused with the reason."""
    rng = np.random.default_rng(0)
    ct = rng.uniform(-1000, 1000, (20, 20, 10)).astype(np.float32)
    ct[:4] = -1000.0  # air
    preprocess.check_hu(ct, "ct")
    with pytest.raises(ValueError, match=r"x\.nii: 1 NaN or inf voxels"):
        preprocess.check_hu(np.where(np.arange(ct.size).reshape(ct.shape) == 7, np.nan, ct), "x.nii")
    with pytest.raises(ValueError, match="not Hounsfield units"):
        preprocess.check_hu(ct * 100, "x.nii", "--flag")
    with pytest.raises(ValueError, match=r"no air .*--flag skips"):
        preprocess.check_hu(ct + 1024, "x.nii", "--flag")


def test_read_csv_refuses_an_unterminated_quote(tmp_path):
    """A quote left open would swallow the next rows into one report: refused, naming the file."""
    path = tmp_path / "reports.csv"
    path.write_text('VolumeName,Findings_EN,Impressions_EN\n'
                    'a,"no effusion,none\n'
                    'b,"nodule",none\n'
                    'c,fine,none\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"reports\.csv: malformed CSV .*unterminated quote"):
        tables.read_csv(path, ("VolumeName",))
    path.write_text('VolumeName,Findings_EN,Impressions_EN\na,"open quote to the end\nb,x,y\n',
                    encoding="utf-8")
    with pytest.raises(ValueError, match=r"reports\.csv: .*(unterminated quote|header's 3 fields)"):
        tables.read_csv(path, ("VolumeName",))


def test_nan_voxels_are_refused_even_with_allow_non_hu():
    hu = np.full((8, 8, 4), -1000.0, np.float32)
    preprocess.check_hu(hu + 1000.0, "x", allow=True)  # no air, allowed
    hu[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="x: 1 NaN or inf voxels"):
        preprocess.check_hu(hu, "x", allow=True)
