"""Resampling geometry: our preprocessing (data.py) against the official SimpleITK one, voxel by voxel.

Ours: canonical RAS, trilinear `interpolate(align_corners=False)` (output voxel j at (j + 1/2) t from
the edge), size floor(n s / t), crop/pad floor((n - T) / 2) in on the low RAS side, stored rounded.
Official (BrgSA's `process_nii_sitk`): SimpleITK's linear resampler in the file's voxel order with
the origin kept (output j at input index j t / s), size round(n s / t), crop ceil((n - T) / 2) /
pad floor((T - n) / 2) on the file's low side, stored as int16 (truncated). Reported in RAS order:
per axis the sizes, crop/pad starts and offsets between the grids before and after crop/pad, by
those rules and measured on a volume whose HU is the position in mm; then |dHU| between the stored
volumes. The official side is SimpleITK when importable (no project dependency; the emulation below
is then checked against it), else the emulation.

    python benchmarks/official_geometry.py [--ct CT.nii.gz --source "its origin"] [--append]

--ct: a NIfTI CT in HU, e.g. pyradiomics' lung1 case (pyradiomics 3.1.0 source distribution on
PyPI, as NIfTI); without it a synthetic chest stored LPS (as DICOM converters write it), of
--shape X Y Z at --spacing SX SY SZ mm (default 512 x 512 x 300 at 0.75 x 0.75 x 1.0).
"""
import argparse
import datetime
import math
import platform
import sys
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import data  # noqa: E402
from model import PRESETS  # noqa: E402

try:
    import SimpleITK as sitk
except ImportError:
    sitk = None
T_SPACING, T_SHAPE = PRESETS["paper"].spacing, PRESETS["paper"].image_size  # RAS (X, Y, Z)


def official(vol, s, t, shape, use_sitk=sitk is not None):
    """The official geometry on a file-order (X, Y, Z) float64 volume -> float64, before int16."""
    size = [int(round(n * a / b)) for n, a, b in zip(vol.shape, s, t)]
    if use_sitk:  # origin 0, direction identity: only their being kept matters
        img = sitk.GetImageFromArray(vol.transpose(2, 1, 0))  # SimpleITK arrays are (Z, Y, X)
        img.SetSpacing([float(v) for v in s])
        f = sitk.ResampleImageFilter()
        f.SetOutputSpacing([float(v) for v in t]), f.SetSize(size), f.SetInterpolator(sitk.sitkLinear)
        f.SetOutputOrigin(img.GetOrigin()), f.SetOutputDirection(img.GetDirection())
        y = sitk.GetArrayFromImage(f.Execute(img)).transpose(2, 1, 0)  # default pixel value 0
    else:  # emulation: linear interpolation is separable
        x, inside = torch.from_numpy(vol), torch.ones((), dtype=torch.bool)
        for ax, (n, a, b, m) in enumerate(zip(vol.shape, s, t, size)):
            p = torch.arange(m, dtype=torch.float64) * (b / a)  # input index of output voxel j
            i0, w = p.floor().long().clamp(max=n - 1), (p - p.floor()).view([-1 if d == ax else 1
                                                                             for d in range(3)])
            x = torch.lerp(x.index_select(ax, i0), x.index_select(ax, (i0 + 1).clamp(max=n - 1)), w)
            inside = inside & (p < n - 0.5).view(w.shape)  # ITK: within the outer half voxel
        y = torch.where(inside, x, 0.0).numpy()
    out, src, dst = np.full(shape, data.PAD_HU), [], []
    for n, m in zip(y.shape, shape):  # crop: the odd voxel off the low side; pad: on the high one
        lo, pad, k = max(math.ceil((n - m) / 2), 0), max((m - n) // 2, 0), min(n, m)
        src.append(slice(lo, lo + k)), dst.append(slice(pad, pad + k))
    out[tuple(dst)] = y[tuple(src)]
    return np.clip(out, data.HU_MIN, data.HU_MAX)


def predict(n, s, t, flipped, T):
    """Sizes, crop/pad starts (RAS low side) and offsets (ours minus official, mm) by the rules."""
    m, m2 = int(n * (s / t)), int(round(n * s / t))  # torch floors the size, the official rounds
    grid = (m2 * t - n * s) - (t - s) / 2 if flipped else (t - s) / 2  # flipped: anchored high
    c, c2 = (m - T) // 2 if m >= T else -((T - m) // 2), math.ceil((m2 - T) / 2)
    c2 = m2 - T - c2 if flipped else c2  # the official's file-order start, seen from RAS low
    return m, m2, grid, c, c2, grid + (c - c2) * t


def synthetic_ct(path, shape, spacing, seed=0):
    """A drawn chest (body, spine, lungs above a domed diaphragm) with noise, int16 HU, LPS."""
    g = np.meshgrid(*[np.linspace(-1, 1, n, dtype=np.float32) for n in shape], indexing="ij")
    hu = np.where((g[0] / 0.9) ** 2 + (g[1] / 0.7) ** 2 < 1, 40.0, -1000.0).astype(np.float32)
    for cx in (-0.4, 0.4):
        r2 = ((g[0] - cx) / 0.3) ** 2 + (g[1] / 0.45) ** 2
        hu[(r2 < 1) & (g[2] > 0.6 * (1 - r2) - 0.8)] = -850.0
    hu[g[0] ** 2 + (g[1] - 0.5) ** 2 < 0.01] = 700.0
    hu += np.random.default_rng(seed).normal(0, 15, shape).astype(np.float32)
    nib.save(nib.Nifti1Image(np.rint(hu).astype(np.int16), np.diag([-1, -1, 1, 1] * np.r_[spacing, 1])),
             str(path))
    return path


HEADER = """# Resampling geometry: ours vs the official SimpleITK pipeline

Offsets: ours minus official, mm along RAS. The official grid starts at the file's first voxel, so
on an axis the file stores against RAS it is anchored at the RAS high end: offset (m t - n s) -
(t - s) / 2 for the official size m, not (t - s) / 2. Crop/pad start: the resampled voxel at output
0 (negative: padding). Body: from the first to the last voxel above -500 HU of each x row (lungs
included). Truncation alone: the official float volume truncated vs rounded. A max |dHU| near 2000
is an edge slab that one side pads and the other fills with data (rounded vs floored size).
"""


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ct", help="NIfTI CT in HU; default: a synthetic chest")
    ap.add_argument("--source", help="where the CT comes from, in words (for the report)")
    ap.add_argument("--shape", type=int, nargs=3, default=(512, 512, 300), help="synthetic CT")
    ap.add_argument("--spacing", type=float, nargs=3, default=(0.75, 0.75, 1.0), help="its mm")
    ap.add_argument("--out", default=str(Path(__file__).with_suffix(".md")))
    ap.add_argument("--append", action="store_true", help="add to --out instead of replacing it")
    args = ap.parse_args()
    torch.set_num_threads(1)
    tmp = tempfile.TemporaryDirectory()
    path = args.ct or synthetic_ct(Path(tmp.name) / "synthetic.nii", args.shape, args.spacing)
    img = nib.load(str(path))
    ornt = nib.orientations.io_orientation(img.affine)
    ras = ornt[:, 0].astype(int)
    fax = np.argsort(ras)  # file axis i runs along RAS axis ras[i]; RAS axis a is file axis fax[a]
    hu_ras, s_ras = data.load_nifti(path)  # ours; the official gets the same HU in file order
    hu_file, s_file = img.get_fdata(dtype=np.float64), np.asarray(s_ras)[ras]
    ours = lambda v, shape: data.preprocess_volume(v, s_ras, T_SPACING, shape)  # noqa: E731
    off = lambda v, shape, *sk: nib.orientations.apply_orientation(official(  # noqa: E731
        v, s_file, [T_SPACING[a] for a in ras], [shape[a] for a in ras], *sk), ornt)

    flip = ornt[fax, 1] < 0
    pred = [predict(hu_ras.shape[a], s_ras[a], T_SPACING[a], flip[a], T_SHAPE[a]) for a in range(3)]
    rows = ["| axis | n | s -> t mm | file axis flipped | size ours / official | (t - s) / 2 | grid "
            "offset predicted / measured | crop/pad start ours / official | final offset predicted "
            "/ measured |", "|---|---|---|---|---|---|---|---|---|"]
    for a, (m, m2, grid, c, c2, final) in enumerate(pred):
        n, s, t = hu_ras.shape[a], float(s_ras[a]), T_SPACING[a]
        pos = ((np.arange(n)[::-1] if flip[a] else np.arange(n)) + 0.5) * s  # RAS mm, file order
        ramp = np.ascontiguousarray(np.broadcast_to(
            pos.reshape([-1 if d == fax[a] else 1 for d in range(3)]), hu_file.shape))
        ramp_ras = np.ascontiguousarray(nib.orientations.apply_orientation(ramp, ornt), np.float32)
        lo, hi, meas = 1.5 * s, min((n - 1.5) * s, 999.0), []  # off the edges: clamped neighbours
        for so, sf in (([p[0] for p in pred], [p[1] for p in pred]), (T_SHAPE, T_SHAPE)):
            y0, y1 = ours(ramp_ras, so), off(ramp, sf)  # before, then after crop/pad
            k = tuple(slice(0, min(p, q)) for p, q in zip(y0.shape, y1.shape))
            y0, y1 = y0[k], y1[k]
            ok = (y0 > lo) & (y0 < hi) & (y1 > lo) & (y1 < hi)
            meas.append(float(np.median((y0 - y1)[ok])))
        rows.append(f"| {'xyz'[a]} | {n} | {s:.4g} -> {t:g} | {'yes' if flip[a] else 'no'} | {m} / "
                    f"{m2} ({m - m2:+d}) | {(t - s) / 2:+.3f} | {grid:+.3f} / {meas[0]:+.3f} | {c} / "
                    f"{c2} ({c - c2:+d}) | {final:+.3f} / {meas[1]:+.3f} |")

    y_ours, y_off = ours(hu_ras, T_SHAPE), off(hu_file, T_SHAPE)  # the CT itself
    st_ours, st_off = np.rint(y_ours).astype(np.int16), np.trunc(y_off).astype(np.int16)
    b, x = st_ours > -500, np.arange(st_ours.shape[0])[:, None, None]
    body = b.any(0) & (x >= b.argmax(0)) & (x <= b.shape[0] - 1 - b[::-1].argmax(0))
    rows += ["", "| effect on the stored volume | mean abs dHU, all | max, all | mean abs dHU, body |"
             " max, body | voxels differing, all / body |", "|---|---|---|---|---|---|"]
    for what, u, v in (("stored int16 (geometry + truncation)", st_ours, st_off),
                       ("geometry alone (both rounded)", st_ours, np.rint(y_off)),
                       ("int16 truncation alone", np.rint(y_off), st_off)):
        d = np.abs(u.astype(np.float64) - v)
        rows.append(f"| {what} | {d.mean():.2f} | {d.max():.0f} | {d[body].mean():.2f} | "
                    f"{d[body].max():.0f} | {np.mean(d > 0):.1%} / {np.mean(d[body] > 0):.1%} |")
    ref = f"SimpleITK {sitk.Version.VersionString()}" if sitk else "the emulation (no SimpleITK)"
    if sitk is not None:
        y_emu = off(hu_file, T_SHAPE, False)
        ref += (f"; the emulation differs from it by at most {np.abs(y_emu - y_off).max():.1e} HU "
                f"before int16, in {np.count_nonzero(np.trunc(y_emu) != st_off)} stored voxels")
    cpu = [ln.split(":")[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")]
    name = args.source or (Path(args.ct).name if args.ct else "a synthetic chest (this script)")
    text = "\n".join([
        f"## {name}", "", f"{' x '.join(map(str, img.shape[:3]))} voxels (file axes "
        f"{''.join(nib.aff2axcodes(img.affine))}) to {' x '.join(map(str, T_SHAPE))} at "
        f"{' x '.join(f'{v:g}' for v in T_SPACING)} mm; body {body.mean():.1%} of the volume. "
        f"{datetime.date.today()}, {cpu[0] if cpu else platform.processor()}, Python "
        f"{platform.python_version()}, torch {torch.__version__}; official side: {ref}.", "",
        *rows]) + "\n"
    print(text)
    with open(args.out, "a" if args.append else "w") as f:
        f.write("\n" + text if args.append else HEADER + "\n" + text)


if __name__ == "__main__":
    main()
