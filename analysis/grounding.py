"""Grounding heat maps: where a model sees a finding, written on the scan's own grid, and scored.

Each patch token gets an embedding exactly as the pooled token does (model.ViT3D.patch_embeddings:
u_i = head(LN(x_i)), plus the read-out of its own position under position pooling) and is scored
against the finding's prompt like a whole volume: `score` = 1/2 [cos(u_i, t) + cos(CMKI(u_i), t)]
(the zero-shot rule), `raw` = cos(u_i, t) (the official get_attention_heatmaps.py map). With mean
or position pooling v = mean_i u_i, so the raw map is each patch's term of cos(v, t) up to the
common factor 1/|v|: a decomposition of the score, not a saliency guess.

The patch map is trilinearly interpolated between patch centres and carried back through the
preprocessing (RAS reorientation, resampling, centre crop/pad) onto the input's voxel grid, and
written as a NIfTI with the input's own affine (plus a PNG of axial, coronal and sagittal slices
through its maximum when matplotlib is installed). The grounding score compares such maps with the
synthetic set's painted masks (python -m prepare.phantom --masks): the pointing game beside its
chance level, and the AUROC of map values inside vs outside the mask.

    python eval.py --ckpt out/best.pt --volume scan.nii.gz --findings "pleural effusion" --heatmap maps
    python eval.py --ckpt out/best.pt --data DIR/dataset --grounding --out_dir out/grounding
"""
import gzip
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

import cmki
import data as data_lib
from analysis.files import csv_text, fmt, jsonable, writable_dir
from analysis.metrics import auroc, percentile_ci
from model import BrgSA, ModelConfig
from prepare.files import atomic_write, write_text
from prepare.phantom import mask_path
from prepare.preprocess import ctrate_jobs

HEATMAP_KINDS = ("score", "raw")


# ----------------------------------------------------------------------------- maps

@torch.no_grad()
def patch_maps(model: BrgSA, x: torch.Tensor, prompts: list, kind: str = "score") -> torch.Tensor:
    """Where the model sees each finding: (B, 1, X, Y, Z) model input -> (B, F, gx, gy, gz).

    prompts: the findings' prompt embeddings, one (F, d) tensor per prompt template
    (eval.prompt_embeddings); the maps of several templates are averaged."""
    if kind not in HEATMAP_KINDS:
        raise ValueError(f"--heatmap_kind must be one of {HEATMAP_KINDS}, got {kind!r}")
    tokens, grid = model.visual.tokens(x)
    u = model.visual.patch_embeddings(tokens).float()  # (B, T, d) one embedding per patch
    flat = u.reshape(-1, u.shape[-1])  # (B*T, d)
    score = cmki.cosine_scores if kind == "raw" else model.zero_shot_scores
    s = torch.stack([score(flat, t) for t in prompts]).mean(0)  # (B*T, F)
    return s.reshape(len(x), *grid, -1).permute(0, 4, 1, 2, 3)  # (B, F, gx, gy, gz)


# ----------------------------------------------------------------------------- from the patch grid to the input's voxel grid

def _axis_weights(n: int, s: float, t: float, m: int, p: int):
    """One canonical axis of n voxels at s mm, resampled to t mm and centre-cropped/padded to m
    voxels of p-voxel patches (data.preprocess_volume) -> (W (n, m // p) linear interpolation of the
    patch grid at each input voxel, inside (n,) bool: the voxel lies in the model's field of view)."""
    r = int(n * (s / t))  # F.interpolate's output length: floor(n * scale)
    offset = (r - m) // 2 if r >= m else -((m - r) // 2)  # resampled index of model voxel 0
    k = np.arange(n)
    mu = (k + 0.5) * (s / t) - 0.5 - offset  # input voxel k in model voxel coordinates
    g = m // p
    gamma = np.clip((mu + 0.5) / p - 0.5, 0, g - 1)  # patch-grid coordinate, patch centres at integers
    i0 = np.floor(gamma).astype(int)
    i1, f = np.minimum(i0 + 1, g - 1), gamma - i0
    W = np.zeros((n, g))
    np.add.at(W, (k, i0), 1 - f)
    np.add.at(W, (k, i1), f)
    return W, (mu >= -0.5) & (mu <= m - 0.5)


@dataclass
class Geometry:
    """How the model's patch grid sits in an input volume's own voxel grid (file axis order)."""
    shape: tuple          # the input's array shape (as stored, e.g. (X, Y, Z) or (X, Y, Z, 1))
    affine: np.ndarray    # the input's affine, copied unchanged onto every heat map
    axes: tuple           # canonical RAS axis of each file axis
    weights: list         # per file axis: (n_i, g_axes[i]) interpolation weights
    inside: np.ndarray    # bool (n0, n1, n2): voxels inside the model's field of view
    tolerance: tuple      # one patch in input voxels, per file axis
    header: object = None  # the input's NIfTI header (qform / sform codes), None for .npy


def input_geometry(shape, affine, spacing_ras, cfg: ModelConfig, header=None) -> Geometry:
    """Geometry of a NIfTI input: its axes reoriented to RAS as data.load_nifti does (nibabel's
    io_orientation, the closest axes for an oblique affine), spacing_ras (3,) in RAS order as the
    preprocessing used it, then each RAS axis resampled and cropped/padded as the preset does."""
    ornt = nib.orientations.io_orientation(np.asarray(affine))
    axes, weights, inside, tol = [], [], [], []
    for i in range(3):
        a, flip = int(ornt[i, 0]), ornt[i, 1] < 0
        s, t, p = float(spacing_ras[a]), float(cfg.spacing[a]), int(cfg.patch_size[a])
        W, ok = _axis_weights(int(shape[i]), s, t, int(cfg.image_size[a]), p)
        axes.append(a)
        weights.append(W[::-1] if flip else W)  # file index f is canonical index n - 1 - f
        inside.append(ok[::-1] if flip else ok)
        tol.append(max(1, int(round(p * t / s))))
    mask = inside[0][:, None, None] & inside[1][None, :, None] & inside[2][None, None, :]
    return Geometry(tuple(shape), np.asarray(affine, np.float64), tuple(axes), weights, mask,
                    tuple(tol), header)


def model_geometry(cfg: ModelConfig) -> Geometry:
    """Geometry of a preprocessed (.npy) input: the model's own grid, canonical RAS, centred affine."""
    affine = np.diag([*cfg.spacing, 1.0])
    affine[:3, 3] = -(np.asarray(cfg.image_size) - 1) / 2 * np.asarray(cfg.spacing)
    return input_geometry(cfg.image_size, affine, cfg.spacing, cfg)


def to_input_grid(patch_map, geom: Geometry) -> np.ndarray:
    """(gx, gy, gz) patch-grid map -> float32 map of geom.shape: trilinear between patch centres,
    edge patches held out to the field of view's border; voxels the model never saw (cropped
    away) get the map's minimum."""
    G = np.asarray(patch_map, np.float64).transpose(geom.axes)  # axis i = RAS axis of file axis i
    W0, W1, W2 = geom.weights
    heat = np.einsum("ia,jb,kc,abc->ijk", W0, W1, W2, G, optimize=True)
    heat[~geom.inside] = G.min()
    return heat.astype(np.float32).reshape(geom.shape)

# ----------------------------------------------------------------------------- writing maps

def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")


def write_heatmap(heat, geom: Geometry, path) -> Path:
    """float32 NIfTI with the input's own affine (and qform / sform codes): overlays in any viewer."""
    img = nib.Nifti1Image(np.asarray(heat, np.float32), geom.affine)
    if geom.header is not None:
        img.set_qform(geom.header.get_qform(), int(geom.header["qform_code"]))
        img.set_sform(geom.header.get_sform(), int(geom.header["sform_code"]))
    img.header.set_xyzt_units("mm")
    data = nib.Nifti1Image.to_bytes(img)
    return atomic_write(path, lambda f: f.write(gzip.compress(data, compresslevel=1, mtime=0)))


def peak_mm(heat, geom: Geometry, hu_ras=None) -> tuple:
    """(voxel index, world coordinates in mm) of a map's maximum inside the model's field of view
    (and inside the body, given the scan in RAS: _outside_air)."""
    heat = np.asarray(heat).reshape(geom.inside.shape)
    keep = geom.inside
    if hu_ras is not None:  # the air mask is found in RAS, then put back in the file's axis order
        ornt = nib.orientations.io_orientation(geom.affine)
        back = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt("RAS"), ornt)
        keep = keep & ~nib.orientations.apply_orientation(_outside_air(np.asarray(hu_ras)), back)
    ijk = np.unravel_index(np.argmax(np.where(keep, heat, -np.inf)), heat.shape)
    return tuple(int(i) for i in ijk), tuple(float(v) for v in (geom.affine @ [*ijk, 1.0])[:3])


def _outside_air(hu_ras: np.ndarray) -> np.ndarray:
    """Air outside the body in a RAS volume: in each axial slice, the air before the first and after
    the last body voxel (darker than -500 HU, or the scan's 1st percentile + 500 when it is not in
    HU) along x or along y. Lungs and airways are enclosed by the body, so they stay in."""
    lo = np.percentile(hu_ras[::2, ::2, ::2], 1)
    body = hu_ras >= (-500.0 if lo < -500 else lo + 500.0)
    out = np.zeros(body.shape, bool)
    for axis in (0, 1):
        before = np.cumsum(body, axis) == 0
        after = np.flip(np.cumsum(np.flip(body, axis), axis), axis) == 0
        out |= before | after
    return out


def write_heatmap_png(heat, hu_ras, geom: Geometry, peak, path, title: str) -> bool:
    """Axial, coronal and sagittal slices through the map's maximum, in RAS with their aspect in
    mm (radiological view: the patient's right on the left, anterior on the left in the sagittal
    plane), the map over the scan with the air outside the body left uncoloured; False without
    matplotlib. heat and peak (a voxel index): on the input's own grid; hu_ras: the scan in RAS."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    ornt = nib.orientations.io_orientation(geom.affine)  # as data.load_nifti reorients
    heat = nib.orientations.apply_orientation(np.asarray(heat).reshape(geom.inside.shape), ornt)
    peak = [peak[list(ornt[:, 0]).index(a)] for a in range(3)]  # the file index in RAS order ...
    peak = [n - 1 - p if ornt[list(ornt[:, 0]).index(a), 1] < 0 else p
            for a, (p, n) in enumerate(zip(peak, heat.shape))]  # ... counted from R, A, S
    mm = np.sqrt((geom.affine[:3, :3] ** 2).sum(0))[np.argsort(ornt[:, 0])]  # voxel size per RAS axis
    hu = np.asarray(hu_ras).reshape(heat.shape)
    heat = np.ma.masked_where(_outside_air(hu), heat)
    lo, hi = np.percentile(hu[::2, ::2, ::2], [1, 99])
    # (name, the axis cut, (horizontal, vertical) axes, flip the horizontal, edge letters L R B T)
    planes = (("axial", 2, (0, 1), True, "RLPA"), ("coronal", 1, (0, 2), True, "RLIS"),
              ("sagittal", 0, (1, 2), True, "APIS"))
    fig, axes = plt.subplots(1, 3, figsize=(11, 4))
    for ax, (name, a, (h, v), flip, letters) in zip(axes, planes):
        cut = [slice(None)] * 3
        cut[a] = peak[a]
        img, m = hu[tuple(cut)].T, heat[tuple(cut)].T  # rows along the vertical axis
        img, m = (img[:, ::-1], m[:, ::-1]) if flip else (img, m)
        kw = dict(origin="lower", aspect=mm[v] / mm[h], interpolation="nearest")
        ax.imshow(img, cmap="gray", vmin=lo, vmax=hi, **kw)
        shown = ax.imshow(m, cmap="jet", alpha=0.45, **kw)
        ax.set_title(f"{name} (slice {peak[a]})", fontsize=8)
        for (x, y, ha, va), text in zip(((0.01, 0.5, "left", "center"), (0.99, 0.5, "right", "center"),
                                         (0.5, 0.01, "center", "bottom"), (0.5, 0.99, "center", "top")),
                                        letters):
            ax.text(x, y, text, color="yellow", fontsize=8, transform=ax.transAxes, ha=ha, va=va)
        ax.axis("off")
    fig.colorbar(shown, ax=list(axes), shrink=0.8, label="cosine score (not a probability)")
    fig.suptitle(f"{title}; air outside the body left uncoloured", fontsize=9)
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)
    return True


def scan_input(path, cfg: ModelConfig):
    """A single scan -> (model input (1, 1, X, Y, Z), Geometry, HU in RAS order)."""
    path = Path(path)
    if path.suffix == ".npy":
        hu = np.load(path)
        if tuple(hu.shape) != tuple(cfg.image_size):
            raise ValueError(f"{path}: preprocessed volume {hu.shape}, the model expects "
                             f"{tuple(cfg.image_size)}")
        geom, shown = model_geometry(cfg), hu
    else:
        raw, spacing = data_lib.load_nifti(path)  # checks the file, the shape and the spacing
        img = nib.load(str(path))
        geom = input_geometry(img.shape, img.affine, spacing, cfg, img.header)
        hu, shown = data_lib.preprocess_volume(raw, spacing, cfg.spacing, cfg.image_size), raw
    x = data_lib.normalize(torch.from_numpy(np.asarray(hu, np.float32)))[None, None]
    return x, geom, shown


def write_scan_heatmaps(maps, geom: Geometry, hu_ras, name: str, findings, out_dir,
                        kind: str = "score") -> list:
    """One scan's patch maps (F, gx, gy, gz) -> out_dir/<name>_<finding>.nii.gz on the scan's own
    grid (+ a .png of three planes through the maximum when matplotlib is installed); prints where
    each map's maximum lies. -> [(path, finding, voxel index, scanner mm)]."""
    written, png = [], True
    for f, m in zip(findings, maps):
        heat = to_input_grid(m, geom)
        base = Path(out_dir) / f"{name}_{_slug(f)}"
        path = write_heatmap(heat, geom, base.with_name(base.name + ".nii.gz"))
        ijk, xyz = peak_mm(heat, geom, hu_ras)
        png = png and write_heatmap_png(heat, hu_ras, geom, ijk, base.with_name(base.name + ".png"),
                                        f"{name}: {f} ({kind} map)")
        print(f"eval: {f}: the map's maximum in the body at voxel {ijk} = ({xyz[0]:.1f}, {xyz[1]:.1f}, "
              f"{xyz[2]:.1f}) mm in the scan's world coordinates (NIfTI: RAS) -> {path.name}")
        written.append((path, f, ijk, xyz))
    if not png:
        print("eval: matplotlib is not installed, heat map PNGs skipped (the NIfTI maps are written)")
    return written


# ----------------------------------------------------------------------------- the grounding score

def grounding_metrics(heat, mask, geom: Geometry) -> dict:
    """One finding's map against its painted mask, both on the input grid, over the voxels the
    model saw. hit: the map's maximum lies in the mask; hit_patch: within one patch of it (the mask
    dilated by a box of one patch per axis); chance / chance_patch: the hit rate of a uniformly random
    point (the volume fraction of the mask / of the dilated mask); auroc: map values inside vs
    outside the mask (chance 0.5)."""
    inside = geom.inside
    heat = np.asarray(heat).reshape(inside.shape)
    m = np.asarray(mask).reshape(inside.shape) > 0
    peak = np.unravel_index(np.argmax(np.where(inside, heat, -np.inf)), heat.shape)
    near = torch.from_numpy(m.astype(np.float32))[None, None]
    for a, k in enumerate(geom.tolerance):  # box dilation, one axis at a time
        size, pad = [1, 1, 1], [0, 0, 0]
        size[a], pad[a] = 2 * k + 1, k
        near = torch.nn.functional.max_pool3d(near, size, stride=1, padding=pad)
    near = near[0, 0].numpy() > 0
    return dict(hit=float(m[peak]), hit_patch=float(near[peak]), chance=float(m[inside].mean()),
                chance_patch=float(near[inside].mean()), auroc=auroc(heat[inside], m[inside]))


def grounding_summary(rows, n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> dict:
    """Per finding (and the macro mean over findings): mean of each metric over its volumes and a
    percentile bootstrap interval of the mean AUROC (volumes resampled). A finding "beats chance"
    when the interval's lower end is above 0.5; the pointing game is reported beside its chance."""
    keys = ("hit", "hit_patch", "chance", "chance_patch", "auroc")
    rng, out = np.random.default_rng(seed), {}
    for f in dict.fromkeys(r["finding"] for r in rows):
        mine = [r for r in rows if r["finding"] == f and not math.isnan(r["auroc"])]
        if not mine:
            continue
        entry = {k: float(np.mean([r[k] for r in mine])) for k in keys}
        a = np.array([r["auroc"] for r in mine])
        draws = a[rng.integers(0, len(a), (max(n_boot, 1), len(a)))].mean(1)
        lo, hi = percentile_ci(draws, level)
        out[f] = dict(n=len(mine), **entry, auroc_ci=[float(lo), float(hi)],
                      beats_chance=bool(lo > 0.5))
    macro = {k: float(np.mean([e[k] for e in out.values()])) for k in keys} if out else {}
    return dict(per_finding=out, macro=macro)


GROUNDING_COLUMNS = ("finding", "n", "hit", "chance", "hit_patch", "chance_patch", "auroc",
                     "auroc_lo", "auroc_hi", "beats_chance")


def grounding_rows(summary: dict):
    """grounding_summary -> (header, rows) for grounding.csv (the macro row last)."""
    rows = []
    for f, e in list(summary["per_finding"].items()) + [("macro mean", summary["macro"])]:
        ci = e.get("auroc_ci", ["", ""])
        rows.append([f, e.get("n", ""), e["hit"], e["chance"], e["hit_patch"], e["chance_patch"],
                     e["auroc"], *ci, e.get("beats_chance", "")])
    return list(GROUNDING_COLUMNS), rows


def format_grounding(summary: dict, kind: str) -> str:
    """Markdown table of grounding_summary (pointing game beside its chance level, AUROC and CI)."""
    lines = [f"| finding ({kind} map) | n | pointing | chance | pointing ±1 patch | chance | "
             "AUROC in vs out [95% CI] | beats chance |", "|---|---|---|---|---|---|---|---|"]
    for f, e in list(summary["per_finding"].items()) + [("macro mean", summary["macro"])]:
        ci = e.get("auroc_ci")
        auc = fmt(e["auroc"]) + (f" [{fmt(ci[0])}, {fmt(ci[1])}]" if ci else "")
        verdict = {True: "yes", False: "no"}.get(e.get("beats_chance"), "")
        lines.append(f"| {f} | {e.get('n', '')} | {fmt(e['hit'])} | {fmt(e['chance'])} | "
                     f"{fmt(e['hit_patch'])} | {fmt(e['chance_patch'])} | {auc} | {verdict} |")
    return "\n".join(lines)


def data_sources(path, split) -> dict:
    """{volume name: source NIfTI path} of a CT-RATE-layout --data; {} for a preprocessed dir."""
    try:
        jobs, _ = ctrate_jobs(path, split)
    except (FileNotFoundError, ValueError):
        return {}
    return {j["name"]: Path(j["src"]) for j in jobs}


@torch.no_grad()
def run(model: BrgSA, records, prompts, findings, device, sources: dict, heatmap_dir=None,
        heatmap_n: int = 0, kind: str = "score", grounding: bool = False, n_boot: int = 1000,
        seed: int = 0) -> dict:
    """Maps of records' volumes: written for the first heatmap_n (to heatmap_dir), and with
    grounding, scored against the masks of prepare.phantom --masks for every positive finding of
    every volume. sources: data_sources() of the data set. -> the grounding summary ({} without)."""
    classes = list(records[0].classes)
    if grounding:
        unknown = [f for f in findings if f not in classes]
        if unknown:
            raise ValueError(f"--findings {unknown}: --grounding scores label classes of --data, "
                             f"one of {classes}")
        if not sources:
            raise ValueError("--grounding needs a CT-RATE-layout --data with masks (python -m "
                             "prepare.phantom --masks)")
    rows, missing = [], 0
    for i, r in enumerate(records if grounding else records[:heatmap_n]):
        src = sources.get(r.name)
        img = nib.load(str(src)) if src is not None else None
        geom = (input_geometry(img.shape, img.affine, r.spacing, model.cfg, img.header)
                if img is not None else model_geometry(model.cfg))
        x = data_lib.load_volume(r.npy_path)[None].to(device)  # (1, 1, X, Y, Z)
        maps = patch_maps(model, x, prompts, kind)[0].cpu().numpy()
        if heatmap_dir is not None and i < heatmap_n:
            hu_ras = data_lib.load_nifti(src)[0] if src is not None else np.load(r.npy_path)
            write_scan_heatmaps(maps, geom, hu_ras, r.name, findings, heatmap_dir, kind)
        for f, m in zip(findings, maps):
            if not grounding or src is None or not r.labels[classes.index(f)]:
                continue
            path = mask_path(src.parents[3], src.name, f)
            if not path.is_file():
                missing += 1
                continue
            mask = np.asanyarray(nib.load(str(path)).dataobj)
            rows.append(dict(finding=f, volume=r.name, **grounding_metrics(to_input_grid(m, geom),
                                                                           mask, geom)))
    if heatmap_dir is not None:
        print(f"eval: heat maps of {min(heatmap_n, len(records))} volumes -> {heatmap_dir}")
    if not grounding:
        return {}
    if not rows:
        raise ValueError("no finding mask found in --data (write the set with python -m "
                         "prepare.phantom --masks)")
    rows.sort(key=lambda r: findings.index(r["finding"]))  # table rows in --findings order
    summary = grounding_summary(rows, n_boot, seed)
    summary.update(kind=kind, volumes=len(records), pairs=len(rows), missing_masks=missing)
    return summary


def write_grounding(summary: dict, out_dir) -> Path:
    """Print the grounding table and write grounding.md, grounding.csv and grounding.json."""
    table = format_grounding(summary, summary["kind"])
    print(table)
    od = writable_dir(out_dir, "--out_dir")
    write_text(od / "grounding.md", table + "\n")
    write_text(od / "grounding.csv", csv_text(*grounding_rows(summary)))
    write_text(od / "grounding.json", json.dumps(jsonable(summary), indent=2))
    missing = summary["missing_masks"]
    print(f"grounding of {summary['pairs']} (volume, finding) pairs in {summary['volumes']} volumes"
          + (f", {missing} positive findings without a mask" if missing else "") + f" -> {od}")
    return od
