"""Preprocessing and loader benchmark for data.py: our pipeline against the official SimpleITK way.

1. One 512x512x300 int16 chest CT (.nii.gz, 0.75 x 0.75 x 1.0 mm, LPS affine) is taken to
   256x256x128 at 1.5 x 1.5 x 3.0 mm by the project's pipeline (read + HU + resample + crop/pad +
   clip + save .npy) on ONE thread (torch.set_num_threads(1)), with ISA-L's inflate (`isal`) and
   with the standard library's zlib; per-stage wall-clock medians, min/median totals and process
   CPU time. If SimpleITK happens to be importable, the same job done the SimpleITK way (the
   official code's reader and linear resampler, then crop and clip) is timed in the same rounds,
   interleaved with ours, as the reference; it is not a project dependency.
2. Loader throughput from a preprocessed cache of paper-size 256x256x128 volumes with random
   224x224x112 training crops (VolumeTextDataset in a DataLoader), with 1 and 2 worker processes.

    python benchmarks/preprocess_bench.py [--ct CT.nii.gz] [--repeats 5] [--volumes 16] [--batches 12]

--ct takes a real chest CT to upsample into the test volume, e.g. pyradiomics' lung1 case
(`data/lung1_image.nrrd` in the pyradiomics 3.1.0 source distribution on PyPI, saved as NIfTI);
without it a drawn phantom chest is used.
"""
import argparse
import statistics
import sys
import tempfile
import time
import tracemalloc
import zlib
from functools import partial
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import data  # noqa: E402
from model import PRESETS  # noqa: E402
from prepare.preprocess import save_npy_atomic  # noqa: E402

SHAPE, SPACING = (512, 512, 300), (0.75, 0.75, 1.0)
PAPER = dict(target_spacing=PRESETS["paper"].spacing, target_shape=PRESETS["paper"].image_size)


def make_ct(path, real=None, seed=0):
    """A 512x512x300 int16 HU chest: a real CT (`real`) upsampled when given, else a drawn
    phantom, plus scanner-like noise so that gzip sees realistic entropy."""
    rng = np.random.default_rng(seed)
    if real is not None:
        hu, sp = data.load_nifti(real)
        x = torch.from_numpy(np.ascontiguousarray(hu))[None, None]
        hu = torch.nn.functional.interpolate(x, size=SHAPE, mode="trilinear")[0, 0].numpy()
    else:
        axes = [np.linspace(-1, 1, n, dtype=np.float32) for n in SHAPE[:2]]
        g = np.meshgrid(*axes, indexing="ij")
        sl = np.where((g[0] / 0.9) ** 2 + (g[1] / 0.7) ** 2 < 1, 40.0, -1000.0)
        for cx in (-0.4, 0.4):
            sl[((g[0] - cx) / 0.3) ** 2 + (g[1] / 0.45) ** 2 < 1] = -850.0
        hu = np.repeat(sl[:, :, None], SHAPE[2], 2)
    raw = np.rint(hu + 1024 + rng.normal(0, 15, SHAPE).astype(np.float32)).clip(0, 4095)
    affine = np.diag([-SPACING[0], -SPACING[1], SPACING[2], 1.0])  # LPS, as DICOM converters write
    nib.save(nib.Nifti1Image(raw.astype(np.int16), affine), str(path))  # v1 style: needs -1024


def time_ours(src, out):
    cpu0, t = time.process_time(), [time.perf_counter()]
    raw, spacing = data.load_nifti(src)
    t.append(time.perf_counter())
    hu, rule = data.to_hu(raw, 1.0, -1024.0, out=raw)
    t.append(time.perf_counter())
    vol = data.preprocess_volume(hu, spacing, PAPER["target_spacing"], PAPER["target_shape"])
    t.append(time.perf_counter())
    save_npy_atomic(out, np.rint(vol).astype(np.int16))
    t.append(time.perf_counter())
    assert rule == "rescaled" and vol.shape == PAPER["target_shape"]
    stages = dict(zip(("read", "hu", "resample+crop+clip", "save"), np.diff(t)))
    return stages | {"total": t[-1] - t[0], "cpu": time.process_time() - cpu0}


def time_sitk(sitk, src, out):
    cpu0, t = time.process_time(), [time.perf_counter()]
    img = sitk.ReadImage(str(src))
    t.append(time.perf_counter())
    img = sitk.DICOMOrient(img, "LPS")  # ITK's native orientation
    img = sitk.Cast(img, sitk.sitkFloat32) * 1.0 - 1024.0
    t.append(time.perf_counter())
    sp_in, n_in = np.array(img.GetSpacing()), np.array(img.GetSize())
    t_sp = np.array(PAPER["target_spacing"])
    size = [int(v) for v in n_in * sp_in / t_sp]
    img = sitk.Resample(img, size, sitk.Transform(), sitk.sitkLinear, img.GetOrigin(),
                        tuple(t_sp), img.GetDirection(), -1024.0, sitk.sitkFloat32)
    vol = sitk.GetArrayFromImage(img).transpose(2, 1, 0)  # (z, y, x) -> (x, y, z)
    vol = np.clip(data.crop_or_pad(vol, PAPER["target_shape"]), -1000, 1000)
    t.append(time.perf_counter())
    np.save(out, np.rint(vol).astype(np.int16))
    t.append(time.perf_counter())
    stages = dict(zip(("read", "hu", "resample+crop+clip", "save"), np.diff(t)))
    return stages | {"total": t[-1] - t[0], "cpu": time.process_time() - cpu0}


def time_ours_zlib(src, out):
    """Our pipeline with the standard library's inflate (what runs when `isal` is absent)."""
    fast, data.INFLATE = data.INFLATE, zlib
    try:
        return time_ours(src, out)
    finally:
        data.INFLATE = fast


def bench_preprocess(tmp, repeats, real=None):
    """Time the pipelines interleaved (one run of each per round), so that load from other
    processes on the machine hits them alike; report per-stage medians and min/median totals."""
    torch.set_num_threads(1)
    src = tmp / "ct_512x512x300.nii.gz"
    make_ct(src, real)
    pipes = {f"ours ({data.INFLATE.__name__} inflate)": time_ours}
    if data.INFLATE is not zlib:
        pipes["ours (zlib inflate, no isal)"] = time_ours_zlib
    try:
        import SimpleITK as sitk
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
        pipes[f"SimpleITK {sitk.Version.VersionString()} way"] = partial(time_sitk, sitk)
    except ImportError:
        sitk = None
    runs = {name: [] for name in pipes}
    for _ in range(repeats + 1):  # round 0 warms the page cache and allocator: dropped
        for name, fn in pipes.items():
            runs[name].append(fn(src, tmp / "out.npy"))
    print(f"\npreprocess one {SHAPE} int16 CT ({src.stat().st_size / 1e6:.0f} MB .nii.gz) -> "
          f"{PAPER['target_shape']}, 1 thread, {repeats} interleaved rounds")
    cols = ("read", "hu", "resample+crop+clip", "save")
    print(f"{'pipeline (median s per stage)':<36}" + "".join(f"{c:>20}" for c in cols)
          + f"{'total min':>11}{'total med':>11}{'cpu med':>9}")
    med = {}
    for name, rs in runs.items():
        rs = rs[1:]
        m = {k: statistics.median(r[k] for r in rs) for k in rs[0]}
        med[name] = m["total"]
        print(f"{name:<36}" + "".join(f"{m[c]:>19.3f}s" for c in cols)
              + f"{min(r['total'] for r in rs):>10.3f}s{m['total']:>10.3f}s{m['cpu']:>8.3f}s")
    if sitk is None:
        print("(SimpleITK not installed: no reference row)")
    else:
        ref = list(runs)[-1]
        for name in list(runs)[:-1]:
            ratios = [a["total"] / b["total"] for a, b in zip(runs[name][1:], runs[ref][1:])]
            cpu = statistics.median(r["cpu"] for r in runs[name][1:]) / statistics.median(
                r["cpu"] for r in runs[ref][1:])
            print(f"{name} / SimpleITK: median total {med[name] / med[ref]:.2f}x, "
                  f"per round {min(ratios):.2f}-{max(ratios):.2f}x, median cpu {cpu:.2f}x")
    print_read_memory(src)
    print("wall-clock seconds; cpu = process CPU seconds (robust to other load)")


def print_read_memory(src):
    """Peak memory numpy allocates while reading (tracemalloc sees numpy's buffers), as a
    multiple of the decompressed int16 volume."""
    img = nib.load(str(src))
    size = np.prod(img.shape) * img.get_data_dtype().itemsize
    for what, fn in (("inflate (_read_voxels)", lambda: data._read_voxels(src, img)),
                     ("load_nifti (+ float32 copy)", lambda: data.load_nifti(src))):
        tracemalloc.start()
        fn()
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        print(f"peak memory, {what}: {peak / 1e6:.0f} MB = {peak / size:.2f}x the "
              f"{size / 1e6:.0f} MB decompressed volume")


def bench_loader(tmp, n_volumes, n_batches, batch_size=2):
    rng = np.random.default_rng(0)
    shape = PAPER["target_shape"]
    records = []
    for i in range(n_volumes):
        path = tmp / f"vol{i}.npy"
        np.save(path, rng.integers(-1000, 1000, shape, dtype=np.int16))
        records.append(data.Record(f"vol{i}", str(path), f"report {i}", np.zeros(18, np.float32)))
    ds = data.VolumeTextDataset(records, {}, crop_size=(224, 224, 112), train=True, seed=0)
    print(f"\nloader: {n_volumes} cached {shape} int16 volumes (page cache warm), random "
          f"224x224x112 crops, batch {batch_size}")
    print(f"{'workers':>8}{'volumes/s':>12}{'MB/s (float32 out)':>22}")
    for workers in (1, 2):
        loader = torch.utils.data.DataLoader(ds, batch_size, shuffle=True, num_workers=workers,
                                             persistent_workers=True, drop_last=True)
        it = iter(loader)
        next(it)  # worker start-up is not throughput
        t0, n = time.perf_counter(), 0
        for _ in range(n_batches):
            try:
                batch = next(it)
            except StopIteration:
                it = iter(loader)
                batch = next(it)
            n += batch["volume"].shape[0]
        dt = time.perf_counter() - t0
        mb = n * 224 * 224 * 112 * 4 / 1e6
        print(f"{workers:>8}{n / dt:>12.1f}{mb / dt:>22.0f}")
        del it, loader


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ct", type=Path, help="a real chest CT (.nii.gz) to build the test volume from")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--volumes", type=int, default=16)
    p.add_argument("--batches", type=int, default=12)
    a = p.parse_args()
    print(f"torch {torch.__version__}, numpy {np.__version__}, nibabel {nib.__version__}, "
          f"{torch.get_num_threads()} CPU threads available")
    with tempfile.TemporaryDirectory() as d:
        bench_preprocess(Path(d), a.repeats, a.ct)
    with tempfile.TemporaryDirectory() as d:
        bench_loader(Path(d), a.volumes, a.batches)


if __name__ == "__main__":
    main()
