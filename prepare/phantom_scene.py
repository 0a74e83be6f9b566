"""The synthetic chest scene of phantom.py: geometry, normal anatomy, the 18 findings, rendering.

Each scan is a procedural chest (body wall, ribs, spine, lungs, airways, heart, aorta, upper abdomen)
drawn in millimetres, so one scene can be sampled on any grid (a second reconstruction is the same
scene on another grid with other noise). Each of the 18 CT-RATE abnormalities paints a signature big
enough to survive the tiny preset's 7 x 7 x 10 mm voxels, where a calcified spot covers 1-2 voxels
and a nodule ~6; at the small preset's 3.5 x 3.5 x 5 mm they cover ~10 and ~55. The class list and
its indices live here because every painter is keyed by them.

    python -c "import prepare.phantom_scene"   # a library; prepare/phantom.py is the command line
"""
import numpy as np

CLASSES = ["Medical material", "Arterial wall calcification", "Cardiomegaly", "Pericardial effusion",
           "Coronary artery wall calcification", "Hiatal hernia", "Lymphadenopathy", "Emphysema",
           "Atelectasis", "Lung nodule", "Lung opacity", "Pulmonary fibrotic sequela", "Pleural effusion",
           "Mosaic attenuation pattern", "Peribronchial thickening", "Consolidation", "Bronchiectasis",
           "Interlobular septal thickening"]
(MATERIAL, ARTERIAL, CARDIOMEGALY, PERICARDIAL, CORONARY, HERNIA, LYMPH, EMPHYSEMA, ATELECTASIS, NODULE,
 OPACITY, FIBROSIS, PLEURAL, MOSAIC, PERIBRONCHIAL, CONSOLIDATION, BRONCHIECTASIS, SEPTAL) = range(18)

FOV_MM = (344.0, 344.0, 340.0)   # stored field of view; the tiny preset keeps 336 x 336 x 320 mm of it
FIELD_HALF_MM = 200.0            # random fields live on a lattice over +-200 mm, so they are grid-free


# ----------------------------------------------------------------------------- geometry helpers

class Grid:
    """Voxel centres in mm in canonical RAS order (+x right, +y anterior, +z superior)."""

    def __init__(self, shape, spacing):
        self.shape, self.spacing = tuple(int(n) for n in shape), tuple(float(s) for s in spacing)
        self.axes = [((np.arange(n) - (n - 1) / 2) * s).astype(np.float32) for n, s in zip(shape, spacing)]
        self.x, self.y, self.z = (a.reshape([-1 if i == k else 1 for i in range(3)]) for k, a in enumerate(self.axes))
        self._weights = {}

    def box(self, lo, hi):
        """Slices of the voxels inside [lo, hi] (mm per axis) and their open local coordinates."""
        sl = []
        for a, l, h, s in zip(self.axes, lo, hi, self.spacing):
            i0, i1 = max(0, int(np.ceil((l - a[0]) / s))), min(len(a), int(np.floor((h - a[0]) / s)) + 1)
            sl.append(slice(i0, max(i0, i1)))
        return tuple(sl), (self.x[sl[0]], self.y[:, sl[1]], self.z[:, :, sl[2]])

    def field(self, rng, lattice):
        """Smooth random field (X, Y, Z): N(0,1) values on a coarse lattice, trilinearly interpolated."""
        F = rng.standard_normal(lattice).astype(np.float32)
        Wx, Wy, Wz = (self._interp(k, m) for k, m in enumerate(lattice))
        out = np.tensordot(Wx, F, axes=(1, 0))          # (X, b, c)
        out = np.einsum("jb,ibc->ijc", Wy, out)          # (X, Y, c)
        return out @ Wz.T                                # (X, Y, Z)

    def _interp(self, k, m):
        if (k, m) not in self._weights:
            t = np.clip((self.axes[k] + FIELD_HALF_MM) / (2 * FIELD_HALF_MM) * (m - 1), 0, m - 1.001)
            i0 = np.floor(t).astype(int)
            W = np.zeros((len(t), m), np.float32)
            W[np.arange(len(t)), i0], W[np.arange(len(t)), i0 + 1] = 1 - (t - i0), t - i0
            self._weights[k, m] = W
        return self._weights[k, m]


def _ellipsoid(g, c, r):
    """(slices, q) over the bounding box of the ellipsoid centre c, semi-axes r; q <= 1 inside."""
    c, r = np.asarray(c, np.float32), np.asarray(r, np.float32)
    sl, (x, y, z) = g.box(c - r, c + r)
    return sl, ((x - c[0]) / r[0]) ** 2 + ((y - c[1]) / r[1]) ** 2 + ((z - c[2]) / r[2]) ** 2


def _segdist(x, y, z, p0, p1):
    """Distance (mm) from points (open grids x, y, z) to the segment p0-p1."""
    d = p1 - p0
    t = np.clip(((x - p0[0]) * d[0] + (y - p0[1]) * d[1] + (z - p0[2]) * d[2]) / max(float(d @ d), 1e-6), 0, 1)
    return np.sqrt((x - p0[0] - t * d[0]) ** 2 + (y - p0[1] - t * d[1]) ** 2 + (z - p0[2] - t * d[2]) ** 2)


def _capsule(g, p0, p1, r):
    """(slices, dist) over the bounding box of the segment p0-p1 padded by r; dist in mm to the segment."""
    p0, p1 = np.asarray(p0, np.float32), np.asarray(p1, np.float32)
    sl, (x, y, z) = g.box(np.minimum(p0, p1) - r, np.maximum(p0, p1) + r)
    return sl, _segdist(x, y, z, p0, p1)


def _paint_tube(vol, g, p0, p1, lumen, wall, wall_hu, within=None):
    """An airway: wall ring of outer radius `wall` at wall_hu around an air lumen (optionally inside a mask)."""
    sl, d = _capsule(g, p0, p1, wall)
    m = np.ones(d.shape, bool) if within is None else within[sl]
    vol[sl][(d < wall) & m] = wall_hu
    vol[sl][(d < lumen) & m] = -990.0


# ----------------------------------------------------------------------------- scene: normal anatomy

def _anatomy(rng, big_heart):
    """Draw the normal anatomy (all in mm); the draw count never depends on the labels."""
    A = {}
    c = rng.uniform([-10, -10, -12], [10, 6, 12])
    A["c"], A["body"], A["fat"] = c, rng.uniform([135, 100], [158, 118]), rng.uniform(8, 20)
    A["cav"] = cav = A["body"] - A["fat"] - 16                      # thoracic cavity semi-axes (x, y)
    A["zb"], A["zt"] = c[2] - rng.uniform(85, 100), c[2] + rng.uniform(130, 145)   # lung base, apex
    lax, lay = 0.47 * cav[0] * rng.uniform(0.94, 1.04), 0.88 * cav[1]
    domes = rng.uniform(20, 32, 2) + [0, 8]                         # the right dome sits higher (liver)
    A["lungs"] = [(c[0] + s * 0.53 * cav[0], c[1] - 0.06 * cav[1], lax, lay, dome, s)
                  for s, dome in zip((-1, 1), domes)]               # (cx, cy, ax, ay, dome, side) left, right
    scale = rng.uniform([0.9, 1.32], [1.04, 1.48])[1 if big_heart else 0]
    hr = np.array([50.0, 42.0, 46.0]) * scale
    A["heart_r"] = hr
    A["heart_c"] = np.array([c[0] - 20 - 0.5 * (hr[0] - 50), c[1] + 0.25 * cav[1] - 0.3 * (hr[1] - 42),
                             A["zb"] + 0.7 * hr[2] + 6])
    A["blood"], A["lung_hu"], A["ra"] = rng.uniform(90, 170), rng.uniform(-870, -825), rng.uniform(11, 14.5)
    A["ty"] = c[1] - cav[1] + 50                                     # trachea y, in front of the spine
    A["z_arch"] = A["zt"] - rng.uniform(35, 50)
    A["z_car"] = A["z_arch"] - 22
    h = A["heart_c"]
    top = np.array([c[0] - 25, c[1] - 5, A["z_arch"] + 8])
    desc = np.array([c[0] - 24, c[1] - cav[1] + 32, A["z_arch"]])
    A["aorta"] = [(np.array([c[0] + 14, h[1] - 8, h[2]]), np.array([c[0] + 14, h[1] - 8, A["z_arch"]])),
                  (np.array([c[0] + 14, h[1] - 8, A["z_arch"]]), top), (top, desc),
                  (desc, desc - [0, 0, A["z_arch"] - A["zb"] + 40])]
    A["hila"] = [np.array([lx - s * 0.55 * lax, A["ty"] + 5, A["z_car"] - 30]) for lx, *_, s in A["lungs"]]
    A["bronchi"] = []                                               # hilum -> upper, posterior-basal, anterior-basal, lateral
    for hl, (lx, ly, _, _, _, s) in zip(A["hila"], A["lungs"]):
        for dx, dy, z in ((0.1, 0.1, A["zt"] - 45), (0.2, -0.55, A["zb"] + 35), (0.25, 0.45, A["zb"] + 45),
                          (0.6, 0.0, A["z_car"] - 30)):
            A["bronchi"].append((hl, np.array([lx + s * dx * lax, ly + dy * lay, z]) + rng.uniform(-8, 8, 3)))
    A["spine"] = (c[1] - cav[1] + 12, rng.uniform(16, 20))
    A["ribs"] = (rng.uniform(26, 32), rng.uniform(0, 30))              # period, phase (mm)
    A["stomach"] = rng.random() < 0.6
    return A


def _paint_body(vol, g, A):
    """Air, subcutaneous fat, muscle, mediastinal fat / abdomen, ribs, spine, sternum."""
    (c, (bx, by), cav), x, y, z = (A["c"], A["body"], A["cav"]), g.x, g.y, g.z
    e = lambda ax, ay, dy=0.0: ((x - c[0]) / ax) ** 2 + ((y - c[1] - dy) / ay) ** 2   # (X, Y, 1)
    vol[...] = np.where(e(bx, by) <= 1, -100.0, vol)
    vol[...] = np.where(e(bx - A["fat"], by - A["fat"]) <= 1, 45.0, vol)
    dia = np.full(e(1, 1).shape, A["zb"], np.float32)                # diaphragm height (X, Y, 1)
    for lx, ly, ax, ay, dome, s in A["lungs"]:
        r2 = ((x - lx) / ax) ** 2 + ((y - ly) / ay) ** 2
        half = (x - c[0]) * s >= 0
        dia = np.where(half, A["zb"] + dome * (1 - np.minimum(r2, 1)), dia)
    cavity = e(cav[0], cav[1]) <= 1
    abdomen = np.where(x > c[0] - 10, 60.0, 45.0)                   # liver on the right
    vol[...] = np.where(cavity, np.where(z < dia, abdomen, -95.0), vol)
    ribs = (e(cav[0] + 9, cav[1] + 9) <= 1) & ~cavity & (np.abs(x - c[0]) > 25)
    period, phase = A["ribs"]
    vol[ribs & (np.mod(z + 0.35 * (y - c[1]) + phase, period) < 8)] = 650.0
    ys, rs = A["spine"]
    sp2 = (x - c[0]) ** 2 + (y - ys) ** 2
    vol[...] = np.where(sp2 < rs ** 2, np.where(np.mod(z + phase, 28) < 6, 90.0, 350.0), vol)
    arch2 = (x - c[0]) ** 2 + (y - ys + rs + 12) ** 2
    vol[...] = np.where((arch2 < 14 ** 2) & (arch2 >= 8 ** 2), 550.0, np.where(arch2 < 8 ** 2, 25.0, vol))
    vol[...] = np.where((((x - c[0]) / 16) ** 2 + ((y - c[1] - cav[1] - 6) / 6) ** 2 <= 1)
                        & (z > A["zb"] + 20) & (z < A["zt"] - 10), 420.0, vol)
    if A["stomach"]:
        sl, q = _ellipsoid(g, (c[0] - 0.45 * cav[0], c[1] + 0.1 * cav[1], A["zb"] - 20), (26, 22, 18))
        vol[sl][(q <= 1) & (g.y[:, sl[1]] > c[1] + 0.1 * cav[1])] = -990.0
    return dia


def _lungs(vol, g, A, rng):
    """Lung mask (X, Y, Z) with textured parenchyma; returns the mask and lung coordinates used by findings."""
    x, y, z, c = g.x, g.y, g.z, A["c"]
    t = np.clip((z - A["zb"]) / (A["zt"] - A["zb"]), 0, 1)              # 0 at the base, 1 at the apex
    f2 = np.clip((1 - t) / 0.5, 1e-3, 1)                              # cross-section shrinks toward the apex
    mask, rn2 = np.zeros(g.shape, bool), np.full(g.shape, 9.0, np.float32)
    for lx, ly, ax, ay, dome, s in A["lungs"]:
        r2 = ((x - lx) / ax) ** 2 + ((y - ly) / ay) ** 2
        m = (r2 <= f2) & (z >= A["zb"] + dome * (1 - np.minimum(r2, 1))) & ((x - c[0]) * s > 14)
        mask |= m
        rn2 = np.where(m, r2 / f2, rn2)                               # normalised radius^2: ~1 at the pleura
    mask &= ((x - c[0]) / A["cav"][0]) ** 2 + ((y - c[1]) / A["cav"][1]) ** 2 <= 1
    ys, rs = A["spine"]
    mask &= (x - c[0]) ** 2 + (y - ys) ** 2 > (rs + 14) ** 2
    sl, q = _ellipsoid(g, A["heart_c"], A["heart_r"] + 12)
    mask[sl] &= q > 1
    for p0, p1 in A["aorta"]:
        sl, d = _capsule(g, p0, p1, A["ra"] + 6)
        mask[sl] &= d > A["ra"] + 5
    vol[mask] = (A["lung_hu"] + 25 * g.field(rng, (12, 12, 8)))[mask]
    return dict(mask=mask, rn2=rn2, t=np.broadcast_to(t, g.shape))


# ----------------------------------------------------------------------------- scene: findings
# Each painter draws from its own generator, so switching one label on or off leaves the rest of the
# scene identical (the tests rely on this). `L` holds the lung mask and lung coordinates.

def _lung_point(A, rng, side, t_range, r_max=0.7):
    """A random point inside one lung (side -1 left, +1 right) at relative height t in t_range."""
    lx, ly, ax, ay, _, _ = A["lungs"][0 if side < 0 else 1]
    t, r, phi = rng.uniform(*t_range), r_max * np.sqrt(rng.random()), rng.uniform(0, 2 * np.pi)
    w = np.sqrt(min(1.0, (1 - t) / 0.5))
    return np.array([lx + r * ax * w * np.cos(phi), ly + r * ay * w * np.sin(phi), A["zb"] + t * (A["zt"] - A["zb"])])


def _point_in_lung(g, A, L, rng, side, t_range, r_max=0.7):
    """_lung_point redrawn (up to 30 times) until it falls inside the current lung mask."""
    for _ in range(30):
        p = _lung_point(A, rng, side, t_range, r_max)
        idx = tuple(int(np.clip(np.rint((v - a[0]) / s), 0, len(a) - 1)) for v, a, s in zip(p, g.axes, g.spacing))
        if L["mask"][idx]:
            break
    return p


def _sides(rng):
    return [[-1], [1], [-1, 1]][rng.integers(3)]


def _side_mask(g, A, sides):
    """(X, 1, 1) mask of the chosen lung side(s): [-1] left, [1] right, [-1, 1] both."""
    if len(sides) == 2:
        return np.ones((1, 1, 1), bool)
    return (g.x - A["c"][0]) * sides[0] > 0


def _mosaic(vol, g, A, L, rng):          # geographic dark/bright lobular patches with sharp borders
    F, amp = g.field(rng, (10, 10, 7)), rng.uniform(80, 110)
    vol[L["mask"]] += np.where(F > 0, -amp, amp)[L["mask"]]


def _emphysema(vol, g, A, L, rng):       # darker upper zones riddled with -990 HU holes
    w = np.clip((L["t"] - 0.25) / 0.35, 0, 1)
    G = g.field(rng, (28, 28, 14)) + 1.2 * w
    m = L["mask"]
    vol[m] -= (45 * w)[m]
    vol[m & (G > np.quantile(G[m], 1 - rng.uniform(0.18, 0.3)))] = -990.0


def _opacity(vol, g, A, L, rng):         # ground-glass patches around -500 HU
    m = L["mask"] & _side_mask(g, A, _sides(rng))
    F = g.field(rng, (9, 9, 6))
    m &= F > np.quantile(F[m], 1 - rng.uniform(0.1, 0.25))
    vol[m] = rng.uniform(-560, -440) + 0.3 * (vol[m] - A["lung_hu"])


def _fibrosis(vol, g, A, L, rng):        # irregular reticular strands, subpleural, basal or apical
    F = g.field(rng, (22, 22, 12))
    zone = L["t"] < rng.uniform(0.45, 0.65) if rng.random() < 0.75 else L["t"] > 0.55
    m = L["mask"] & (L["rn2"] > 0.45) & zone & (np.abs(F) < 0.09) & _side_mask(g, A, _sides(rng))
    vol[m] = rng.uniform(-120, -20)


def _septal(vol, g, A, L, rng):          # regular polygonal lattice of thin lines in the lung periphery
    P, th, ph = rng.uniform(18, 24), rng.uniform(0, np.pi / 2), rng.uniform(0, 24, 2)
    u = np.mod(g.x * np.cos(th) + g.y * np.sin(th) + ph[0], P) < 3.5
    v = np.mod(-g.x * np.sin(th) + g.y * np.cos(th) + ph[1], P) < 3.5
    m = L["mask"] & (L["rn2"] > 0.4) & (u | v)
    vol[m] = rng.uniform(-400, -300)


def _consolidation(vol, g, A, L, rng):   # dense lobar region with air bronchograms
    F = g.field(rng, (14, 14, 8))
    for side in _sides(rng):
        p = _point_in_lung(g, A, L, rng, side, (0.1, 0.6), 0.5)
        R = rng.uniform(35, 55, 3) * [1, 1, 1.2]
        sl, (x, y, z) = g.box(p - R, p + R)
        m = (((x - p[0]) / R[0]) ** 2 + ((y - p[1]) / R[1]) ** 2 + ((z - p[2]) / R[2]) ** 2 <= 1)
        m &= L["mask"][sl] & (F[sl] > -0.6)
        vol[sl][m] = rng.uniform(20, 45)
        for _ in range(rng.integers(2, 4)):      # air bronchograms: air tubes inside the dense region
            vol[sl][m & (_segdist(x, y, z, p, p + rng.uniform(-0.8, 0.8, 3) * R) < 2.5)] = -900.0


def _atelectasis(vol, g, A, L, rng):     # dense plate-like bands in the lower lobes
    for side in _sides(rng):
        p = _point_in_lung(g, A, L, rng, side, (0.08, 0.4), 0.6)
        n = np.array([rng.uniform(-0.5, 0.5), rng.uniform(0.5, 1.0), rng.uniform(-0.6, 0.6)])
        n /= np.linalg.norm(n)
        R, T = rng.uniform(35, 60), rng.uniform(10, 16)
        sl, (x, y, z) = g.box(p - R, p + R)
        d = (x - p[0]) * n[0] + (y - p[1]) * n[1] + (z - p[2]) * n[2]
        r2 = (x - p[0]) ** 2 + (y - p[1]) ** 2 + (z - p[2]) ** 2 - d ** 2
        vol[sl][(np.abs(d) < T / 2) & (r2 < R ** 2) & L["mask"][sl]] = rng.uniform(20, 60)


def _nodule(vol, g, A, L, rng):          # one to four solid spheres, 16-28 mm across
    for _ in range(rng.integers(1, 5)):
        r = rng.uniform(8, 14)
        sl, q = _ellipsoid(g, _point_in_lung(g, A, L, rng, rng.choice([-1, 1]), (0.1, 0.8)), (r, r, r))
        vol[sl][(q <= 1) & L["mask"][sl]] = rng.uniform(20, 60)


def _pleural(vol, g, A, L, rng):         # dependent fluid: lung below a horizontal (constant-y) level
    for side in _sides(rng):
        _, ly, _, ay, _, _ = A["lungs"][0 if side < 0 else 1]
        level = ly - ay + rng.uniform(25, 50) * (1 - 0.5 * L["t"])
        m = L["mask"] & (g.y < level) & _side_mask(g, A, [side])
        vol[m] = rng.uniform(5, 20)
        L["mask"] = L["mask"] & ~m


PARENCHYMA = [(MOSAIC, _mosaic), (EMPHYSEMA, _emphysema), (OPACITY, _opacity), (FIBROSIS, _fibrosis),
              (SEPTAL, _septal), (CONSOLIDATION, _consolidation), (ATELECTASIS, _atelectasis),
              (NODULE, _nodule), (PLEURAL, _pleural)]


def _mark(masks, k, shape, sl, m):
    """Add the box-local bool mask m (at slices sl) to finding k's mask; nothing when masks is None."""
    if masks is not None:
        masks.setdefault(k, np.zeros(shape, bool))[sl] |= m


def _heart(vol, g, A, labels, rng, masks=None):
    """Pericardial fluid rim (if any), myocardium and contrast blood pool, coronary calcium (if any).

    masks: the pericardial rim outside the heart, the whole (enlarged) heart, the coronary spots."""
    c, r = A["heart_c"], A["heart_r"]
    if labels[PERICARDIAL]:
        sl, q = _ellipsoid(g, c, r + rng.uniform(9, 18))
        vol[sl][q <= 1] = rng.uniform(5, 18)
        _mark(masks, PERICARDIAL, g.shape, sl, q <= 1)
    sl, q = _ellipsoid(g, c, r)
    vol[sl][q <= 1] = 55.0
    if masks is not None:
        heart = np.zeros(g.shape, bool)
        heart[sl] = q <= 1
        if labels[PERICARDIAL]:
            masks[PERICARDIAL] &= ~heart
        if labels[CARDIOMEGALY]:
            masks[CARDIOMEGALY] = heart
    sl, q = _ellipsoid(g, c, r - 8)
    vol[sl][q <= 1] = A["blood"]
    if labels[CORONARY]:                   # bright spots on the anterior-left heart surface (coronary course)
        for _ in range(rng.integers(5, 11)):
            phi, el = rng.uniform(np.pi / 3, 1.15 * np.pi), rng.uniform(-0.3, 0.7)
            p = c + r * [np.cos(phi) * np.cos(el), np.sin(phi) * np.cos(el), np.sin(el)]
            s = rng.uniform(4, 6.5)
            sl, q = _ellipsoid(g, p, (s, s, s))
            vol[sl][q <= 1] = rng.uniform(1500, 2200)
            _mark(masks, CORONARY, g.shape, sl, q <= 1)


def _aorta(vol, g, A, labels, rng, masks=None):
    """Contrast-filled aorta (ascending, arch, descending); wall calcium spots if labelled."""
    for p0, p1 in A["aorta"]:
        sl, d = _capsule(g, p0, p1, A["ra"])
        vol[sl][d < A["ra"]] = A["blood"]
    if labels[ARTERIAL]:
        segs = A["aorta"][1:]
        for _ in range(rng.integers(8, 17)):
            p0, p1 = segs[rng.integers(len(segs))]
            u = rng.standard_normal(3)
            u -= u @ (p1 - p0) / ((p1 - p0) @ (p1 - p0)) * (p1 - p0)   # perpendicular to the vessel axis
            p = p0 + rng.random() * (p1 - p0) + (A["ra"] - 1) * u / np.linalg.norm(u)
            s = rng.uniform(4, 6.5)
            sl, q = _ellipsoid(g, p, (s, s, s))
            vol[sl][q <= 1] = rng.uniform(1500, 2200)
            _mark(masks, ARTERIAL, g.shape, sl, q <= 1)


def _nodes(vol, g, A, rng):              # enlarged soft-tissue nodes in mediastinal fat, hila, axillae
    c, ty, zc, (bx, _), fat = A["c"], A["ty"], A["z_car"], A["body"], A["fat"]
    stations = [(c[0] + 22, ty + 5, zc + 25), (c[0] - 20, ty + 10, zc + 20), (c[0], ty - 10, zc - 22),
                A["hila"][0] + [12, 0, -5], A["hila"][1] + [-12, 0, -5], (c[0] + 5, ty + 45, zc + 15),
                (c[0] + bx - fat - 30, c[1] + 10, zc + 5), (c[0] - bx + fat + 30, c[1] + 10, zc + 5)]
    for k in rng.choice(len(stations), rng.integers(2, 6), replace=False):
        sl, q = _ellipsoid(g, stations[k], rng.uniform([10, 9, 12], [16, 14, 20]))
        vol[sl][q <= 1] = rng.uniform(30, 50)


def _hernia(vol, g, A, rng):             # stomach above the diaphragm behind the heart: wall, fluid, air cap
    r = rng.uniform(20, 32)
    p = np.array([A["c"][0] + rng.uniform(5, 15), A["spine"][0] + A["spine"][1] + r + 2, A["zb"] + rng.uniform(10, 25)])
    sl, q = _ellipsoid(g, p, (r, r, r * rng.uniform(0.9, 1.2)))
    vol[sl][q <= 1] = 45.0
    inner = q <= (1 - 3.5 / r) ** 2
    vol[sl][inner] = 20.0
    vol[sl][inner & (g.y[:, sl[1]] > p[1] + rng.uniform(-0.2, 0.3) * r)] = -990.0


def _airways(vol, g, A, labels, L, rng, masks=None):
    """Segmental bronchi (thick walls if peribronchial thickening), dilated bronchi, main bronchi, trachea.

    masks: the segmental bronchi when their walls are thick, the dilated bronchi."""
    thick = labels[PERIBRONCHIAL]
    wall, wall_hu = (rng.uniform(8, 10), rng.uniform(10, 50)) if thick else (5.0, -300.0)
    before = vol.copy() if masks is not None else None
    for p0, p1 in A["bronchi"]:
        _paint_tube(vol, g, p0, p1, 3.5, wall, wall_hu, within=L["mask"])
    if thick and masks is not None:
        masks[PERIBRONCHIAL] = vol != before
    if labels[BRONCHIECTASIS]:             # dilated air tubes with thin walls reaching the lower-lobe periphery
        before = vol.copy() if masks is not None else None
        for side in _sides(rng):
            hl = A["hila"][0 if side < 0 else 1] + [0, 0, -20]
            for _ in range(rng.integers(2, 4)):
                tip = _point_in_lung(g, A, L, rng, side, (0.05, 0.35), 0.8)
                lumen = rng.uniform(6, 9)
                _paint_tube(vol, g, hl + 0.3 * (tip - hl), tip, lumen, lumen + 2.5, 0.0, within=L["mask"])
        if masks is not None:
            masks[BRONCHIECTASIS] = vol != before
    top = np.array([A["c"][0], A["ty"], FOV_MM[2]])
    car = np.array([A["c"][0], A["ty"], A["z_car"]])
    for hl in A["hila"]:
        _paint_tube(vol, g, car, hl, 6.0, 8.0, 30.0)
    _paint_tube(vol, g, top, car, 9.0, 11.5, 30.0)


def _device(vol, g, A, rng):             # metal: pacemaker + lead, chest port + catheter, or sternotomy wires
    c, (bx, by), fat, kind = A["c"], A["body"], A["fat"], rng.integers(3)
    if kind == 2:
        for z in A["z_car"] - rng.uniform(0, 20) - np.arange(rng.integers(4, 7)) * rng.uniform(22, 28):
            sl, q = _ellipsoid(g, (c[0], c[1] + A["cav"][1] + 6, z), (13, 6, 4.5))
            vol[sl][q <= 1] = 2800.0
        return
    s = -1 if kind == 0 else 1               # pacemaker on the left, port on the right
    x = c[0] + s * 0.45 * bx
    box = np.array([x, c[1] + by * np.sqrt(1 - 0.45 ** 2) - 0.5 * fat - 4, A["z_car"] + rng.uniform(10, 40)])
    sl, q = _ellipsoid(g, box, (25, 8, 20) if kind == 0 else (17, 8, 17))
    vol[sl][q <= 1] = rng.uniform(2400, 3000)
    tip = A["heart_c"] + ([0.4, 0.2, -0.3] if kind == 0 else [0.45, 0.0, 0.9]) * A["heart_r"]
    mid = np.array([c[0] + s * 25, A["ty"] + 25, A["z_arch"] + 10])
    for p0, p1 in ((box, mid), (mid, tip)):
        sl, d = _capsule(g, p0, p1, 3.5)
        vol[sl][d < 3.5] = 2500.0


# ----------------------------------------------------------------------------- rendering

# Stored voxel sizes (mm), drawn per scan from these (in-plane, slice) ranges: coarser than the 1.5 mm
# of CT-RATE to stay fast, finer than the preset's grid so that resampling is real work (in-plane
# ~0.6 and slices ~0.85 of it). "tiny": ~4.3 x 4.3 x 8.5 for the tiny preset's 7 x 7 x 10 mm (80 x 80 x 40
# voxels); "small": ~2.15 x 2.15 x 4.25 for the small preset's 3.5 x 3.5 x 5 mm (160 x 160 x 80 voxels).
STORED_SPACING = {"tiny": ((4.0, 4.6), (8.0, 9.0)), "small": ((2.0, 2.3), (4.0, 4.5))}


def draw_spacing(rng, voxels="tiny"):
    """A stored voxel size (mm) from STORED_SPACING[voxels]; the same rng draws whatever the range."""
    if voxels not in STORED_SPACING:
        raise ValueError(f"voxels must be one of {sorted(STORED_SPACING)}, got {voxels!r}")
    (xy_lo, xy_hi), (z_lo, z_hi) = STORED_SPACING[voxels]
    sxy, sz = rng.uniform(xy_lo, xy_hi), rng.uniform(z_lo, z_hi)
    return (round(sxy, 4), round(sxy, 4), round(sz, 4))


def _painted(vol, masks, k, paint):
    """Run paint(); with masks given, store the voxels it changed as finding k's mask."""
    before = vol.copy() if masks is not None else None
    paint()
    if masks is not None:
        masks[k] = vol != before


def _settle(vol, masks, values):
    """Remember the values just painted under every new mask (render_volume's last step compares)."""
    for k, m in (masks or {}).items():
        values.setdefault(k, vol[m].copy())


def render_volume(labels, rng, spacing=None, noise_seed=None, masks=None, voxels="tiny"):
    """Render one chest for an 18-label vector -> (hu float32 (X, Y, Z) in canonical RAS order, spacing).

    All draws from `rng` happen up front and never depend on the labels, so the same rng state with
    and without one label gives the same scene apart from that finding. `spacing`/`noise_seed`
    override the drawn grid and noise: a second reconstruction of the same scene.
    masks: a dict that receives {class index: bool (X, Y, Z)} for every positive finding: the voxels
    its painter set that nothing drawn later painted over (cardiomegaly: the enlarged heart).
    Recording draws nothing, so the volume is the same with or without it. voxels: the
    STORED_SPACING range the grid is drawn from when `spacing` is None (the scene does not change)."""
    labels = np.asarray(labels).astype(bool)
    seeds = rng.integers(0, 2 ** 63, size=3 + len(CLASSES))       # anatomy, noise, grid, one per class
    sub = lambda k: np.random.default_rng(seeds[3 + k])
    spacing = tuple(spacing) if spacing is not None else draw_spacing(np.random.default_rng(seeds[2]), voxels)
    shape = [int(round(f / s)) for f, s in zip(FOV_MM, spacing)]
    g = Grid(shape, spacing)
    arng = np.random.default_rng(seeds[0])
    A = _anatomy(arng, labels[CARDIOMEGALY])
    vol = np.full(g.shape, -1000.0, np.float32)
    _paint_body(vol, g, A)
    L = _lungs(vol, g, A, arng)
    values = {}
    for k, painter in PARENCHYMA:
        if labels[k]:
            _painted(vol, masks, k, lambda: painter(vol, g, A, L, sub(k)))
            _settle(vol, masks, values)
    _heart(vol, g, A, labels, sub(CORONARY), masks)
    _settle(vol, masks, values)
    _aorta(vol, g, A, labels, sub(ARTERIAL), masks)
    _settle(vol, masks, values)
    for k, painter in ((LYMPH, _nodes), (HERNIA, _hernia)):
        if labels[k]:
            _painted(vol, masks, k, lambda: painter(vol, g, A, sub(k)))
            _settle(vol, masks, values)
    _airways(vol, g, A, labels, L, sub(BRONCHIECTASIS), masks)
    _settle(vol, masks, values)
    if labels[MATERIAL]:
        _painted(vol, masks, MATERIAL, lambda: _device(vol, g, A, sub(MATERIAL)))
    for k, m in (masks or {}).items():  # drop what a later painter covered
        m[m] = vol[m] == values.get(k, vol[m])
    nrng = np.random.default_rng(seeds[1] if noise_seed is None else noise_seed)
    vol += nrng.standard_normal(g.shape, dtype=np.float32) * np.float32(nrng.uniform(10, 20))
    return vol, spacing
