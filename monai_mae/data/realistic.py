"""Realistic CT phantoms: an upper-abdomen scan that behaves like real CT where segmentation needs it.

One phantom is a patient lying on a curved table, surrounded by air: skin and subcutaneous fat, a
muscle wall, lung bases with vessel-like texture under the ribs, the heart on the diaphragm, and in
the abdomen liver, spleen, two kidneys, pancreas, stomach (wall, fluid and gas), gallbladder, aorta
and vena cava packed between fatty, gas-filled bowel loops, so that organs of similar Hounsfield
values touch; spine, ribs and the muscles beside the spine. Organs are smooth random deformations of
template shapes, jittered in place and size per phantom; each organ is a small fraction of the volume.

The scanner is imitated too: every slice averages several thinner sub-slices (partial volume along
the slice axis), in-plane edges are blurred by a point-spread function, and a smooth additive bias and
spatially correlated noise are added. ``contrast``, ``noise_hu`` and ``bias_hu`` make a phantom harder.

Geometry is relative to the volume: the body fills about 84 % of the in-plane field of view and the
slices always span the same anatomy (lung bases to below the kidneys), so the content depends on the
shape only. :func:`realistic_spacing` gives the voxel size at which that patient is adult-sized.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

__all__ = ["REALISTIC_ORGANS", "check_realistic_options", "check_shape", "make_realistic_phantom", "realistic_spacing"]

#: Labelled structures of the realistic phantoms: label ``k`` is ``REALISTIC_ORGANS[k - 1]``. The first
#: five are the organs of the simple style's ``ORGAN_TYPES`` in the same order (kidney = both kidneys,
#: bone = spine and ribs, lung = both lungs with their vessels; stomach includes its contents).
REALISTIC_ORGANS: tuple[str, ...] = (
    "liver",
    "kidney",
    "bone",
    "lung",
    "spleen",
    "pancreas",
    "stomach",
    "aorta",
    "gallbladder",
)

_BODY = (165.0, 118.0)  # half width and half depth of the template body, in template mm
_FILL = 0.84  # fraction of the in-plane field of view the body spans
_TABLE_ROOM = 38.0  # air gap + table thickness below the body, template mm
_Z_RANGE = (-130.0, 150.0)  # template z of the first and last slice edge (0 ~ first lumbar vertebra)
_SUBSLICES = 3  # sub-slices averaged into one slice (partial volume along z)
_SOFT_CENTRE = 45.0  # HU that `contrast` pulls soft tissue towards
_AIR_HU = -1000.0
_DEFAULT_NOISE_HU = 15.0
_DEFAULT_BIAS_HU = 8.0
_MIN_SHAPE = 16

# soft tissue values (HU, before `contrast`), per-phantom spread +-_HU_SPREAD
_HU = dict(fat=-100.0, visceral_fat=-90.0, skin=20.0, muscle=50.0, bowel=32.0, bowel_fluid=15.0, liver=60.0)
_HU.update(spleen=50.0, kidney_cortex=40.0, kidney_medulla=30.0, pancreas=40.0, stomach_wall=42.0)
_HU.update(stomach_fluid=12.0, gallbladder=10.0, blood=42.0, heart=40.0, cartilage=120.0, cord=30.0, disc=85.0)
_HU_SPREAD = 4.0
_LUNG_HU = -860.0
_GAS_HU = -960.0
_TABLE_HU = 300.0


def realistic_spacing(shape: Sequence[int]) -> tuple[float, float, float]:
    """Voxel size (mm) at which a realistic phantom of ``shape`` shows an adult (a body ~330 mm wide).

    The phantom's content depends on its shape only (the body spans a fixed share of the field of view
    and the slices a fixed stretch of anatomy); this is the spacing that makes it life-sized, and the
    default spacing with which :func:`monai_mae.data.write_synthetic_dataset` writes the realistic style.

    Args:
        shape: volume shape (X, Y, Z).

    Returns:
        ``(sx, sy, sz)`` in mm; in-plane is isotropic, ``sz`` = 280 mm / Z.

    Raises:
        ValueError: for a shape that is not 3 ints >= 16.

    Examples::

        >>> [round(s, 2) for s in realistic_spacing((512, 512, 96))]
        [0.77, 0.77, 2.92]
    """
    nx, ny, nz = check_shape(shape)
    step = _in_plane_step(nx, ny)
    return step, step, (_Z_RANGE[1] - _Z_RANGE[0]) / nz


def check_shape(
    shape: Sequence[int], minimum: int = _MIN_SHAPE, context: str = " for style='realistic'"
) -> tuple[int, int, int]:
    """Return ``shape`` as a tuple of three ints, each at least ``minimum``, or raise a ValueError naming it."""
    try:
        dims = tuple(int(s) for s in shape)
    except TypeError as err:
        raise ValueError(f"shape must be a sequence of 3 ints, got {shape!r}.") from err
    if len(dims) != 3 or any(d < minimum for d in dims):
        raise ValueError(f"shape must be 3 ints, each >= {minimum}{context}, got {shape!r}.")
    return dims  # type: ignore[return-value]


def _in_plane_step(nx: int, ny: int) -> float:
    """Template mm per in-plane voxel: the body spans ``_FILL`` of x and, with the table, of y."""
    return max(2 * _BODY[0] / (_FILL * nx), (2 * _BODY[1] + _TABLE_ROOM + 20.0) / (0.9 * ny))


def _check_knob(value: float, name: str, low: float, high: float) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name} must be a number in [{low}, {high}], got {value!r}.") from err
    if not (math.isfinite(number) and low <= number <= high):
        raise ValueError(f"{name} must be a number in [{low}, {high}], got {value!r}.")
    return number


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], cells: Sequence[float]) -> np.ndarray:
    """Zero-mean, unit-std random field of ``shape`` with a correlation length of about ``cells`` voxels per axis.

    A coarse gaussian grid, one node per ``cells`` voxels, interpolated with gaussian weights axis by axis.
    """
    sizes = [max(2, int(math.ceil(n / c)) + 2) for n, c in zip(shape, cells)]
    field = rng.standard_normal(sizes).astype(np.float32)
    for axis, (n, g) in enumerate(zip(shape, sizes)):
        pos = (np.arange(n) + 0.5) / n * (g - 2) + 0.5  # voxel centres in coarse units
        weights = np.exp(-0.5 * ((pos[:, None] - np.arange(g)[None, :]) / 0.7) ** 2).astype(np.float32)
        weights /= weights.sum(axis=1, keepdims=True)
        field = np.moveaxis(np.tensordot(weights, np.moveaxis(field, axis, 0), axes=(1, 0)), 0, axis)
    field -= field.mean()
    std = float(field.std())
    return field / std if std > 0 else field


def _blur(volume: np.ndarray, sigma: float, axes: Sequence[int]) -> np.ndarray:
    """Gaussian blur of ``volume`` by ``sigma`` voxels along ``axes`` (edges repeated)."""
    radius = max(1, int(math.ceil(2.5 * sigma)))
    kernel = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    kernel /= kernel.sum()
    for axis in axes:
        pad = [(0, 0)] * volume.ndim
        pad[axis] = (radius, radius)
        padded = np.pad(volume, pad, mode="edge")
        out = np.zeros_like(volume)
        for offset, weight in enumerate(kernel):
            out += np.float32(weight) * np.take(padded, np.arange(offset, offset + volume.shape[axis]), axis=axis)
        volume = out
    return volume


def _tilt(rng: np.random.Generator, max_degrees: float) -> np.ndarray:
    """Rotation by a uniform angle in ``[0, max_degrees]`` about a random axis (Rodrigues' formula)."""
    axis = rng.standard_normal(3)
    axis /= np.linalg.norm(axis)
    angle = np.deg2rad(rng.uniform(0.0, max_degrees))
    k = np.array([[0.0, -axis[2], axis[1]], [axis[2], 0.0, -axis[0]], [-axis[1], axis[0], 0.0]])
    return np.eye(3) + np.sin(angle) * k + (1.0 - np.cos(angle)) * (k @ k)


def _rotation_y(degrees: float) -> np.ndarray:
    c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    return np.array([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])


class _Scene:
    """The fine voxel grid (``_SUBSLICES`` sub-slices per slice) and a painter on it.

    Template coordinates: mm of a 330 x 236 mm body, x towards the patient's right (RAS), y anterior,
    z superior; the body axis is x = y = 0. ``paint`` blends a structure given as a signed distance
    (template mm, negative inside) into the image with a one-voxel soft edge.
    """

    def __init__(self, dims: tuple[int, int, int], rng: np.random.Generator) -> None:
        nx, ny, nz = dims
        self.dims, self.nzf = dims, nz * _SUBSLICES
        self.step = _in_plane_step(nx, ny)
        self.size = rng.uniform(0.9, 1.0, 2)  # body scale in x and y: the patient's build
        # template -> fine-voxel index: i = x * size_x / step + ox, j = (y * size_y + yc) / step + oy
        centre_y = _TABLE_ROOM * self.size[1] / 2  # body and table centred in y
        self.origin = np.array([(nx - 1) / 2, (ny - 1) / 2 + centre_y / self.step])
        self.dz = (_Z_RANGE[1] - _Z_RANGE[0]) / self.nzf
        self.x = ((np.arange(nx) - self.origin[0]) * self.step / self.size[0]).astype(np.float32)
        self.y = ((np.arange(ny) - self.origin[1]) * self.step / self.size[1]).astype(np.float32)
        self.z = (_Z_RANGE[0] + (np.arange(self.nzf) + 0.5) * self.dz).astype(np.float32)
        self.edge = self.step / float(self.size.min())  # soft-edge width in template mm
        self.image = np.full((nx, ny, self.nzf), _AIR_HU, dtype=np.float32)
        self.label = np.zeros((nx, ny, self.nzf), dtype=np.uint8)
        self._displacement: list[np.ndarray] | None = None
        # a smooth displacement of every organ (not the body): sums of 3 plane waves per axis, ~7 mm
        self.waves = []  # per axis: (3 wave vectors, 3 phases, 3 amplitudes in mm)
        for _ in range(3):
            vectors = rng.uniform(-1, 1, (3, 3)) * 2 * np.pi / rng.uniform(150, 300, (3, 1))
            self.waves.append((vectors, rng.uniform(0, 2 * np.pi, 3), rng.uniform(2.0, 4.0, 3)))

    def box(self, lo: Sequence[float], hi: Sequence[float]) -> tuple[tuple[slice, slice, slice], list[np.ndarray]]:
        """Index box of the template-mm bounds ``lo..hi`` and the template coordinates in it, broadcastable."""
        slices = []
        for axis, coords in enumerate((self.x, self.y, self.z)):
            start = int(np.searchsorted(coords, lo[axis], side="left"))
            stop = int(np.searchsorted(coords, hi[axis], side="right"))
            slices.append(slice(start, max(start, stop)))
        return tuple(slices), self.box_grids(tuple(slices))  # type: ignore[arg-type]

    def displaced(self, box: tuple[slice, slice, slice]) -> list[np.ndarray]:
        """Template coordinates in ``box`` moved by the phantom's smooth organ displacement (computed once)."""
        if self._displacement is None:
            grids = self.box((-1e9,) * 3, (1e9,) * 3)[1]
            self._displacement = []
            for directions, phases, amplitudes in self.waves:
                shift = np.zeros(self.image.shape, dtype=np.float32)
                for d, p, a in zip(directions.astype(np.float32), phases, amplitudes):
                    shift += np.float32(a) * np.sin(d[0] * grids[0] + d[1] * grids[1] + d[2] * grids[2] + np.float32(p))
                self._displacement.append(shift)
        grids = self.box_grids(box)
        return [g + s[box] for g, s in zip(grids, self._displacement)]

    def box_grids(self, box: tuple[slice, slice, slice]) -> list[np.ndarray]:
        """The template coordinates of ``box``, broadcastable to its shape."""
        x, y, z = self.x[box[0]], self.y[box[1]], self.z[box[2]]
        return [x[:, None, None], y[None, :, None], z[None, None, :]]

    def paint(
        self, box: tuple[slice, slice, slice], sd: np.ndarray, hu: float | np.ndarray, label: int | None = 0
    ) -> None:
        """Blend ``hu`` into the image where the signed distance ``sd`` (box shape) is negative.

        The label becomes ``label`` where the structure covers at least half a voxel (``None`` keeps it).
        """
        occupancy = np.clip(0.5 - sd / self.edge, 0.0, 1.0).astype(np.float32)
        region = self.image[box]
        region += occupancy * (hu - region)
        if label is not None:
            self.label[box][occupancy >= 0.5] = label


def _blob(
    grids: Sequence[np.ndarray],
    centre: Sequence[float],
    radii: Sequence[float],
    rotation: np.ndarray,
    wobble: np.ndarray,
) -> np.ndarray:
    """Signed distance (along rays from the centre, mm) to a smoothly deformed rotated ellipsoid.

    ``wobble`` (8,) are the coefficients of a quadratic polynomial of the direction that scales the radius.
    """
    rot, rad, w = rotation.astype(np.float32), np.asarray(radii, np.float32), np.asarray(wobble, np.float32)
    d = [g - np.float32(c) for g, c in zip(grids, centre)]
    local = [(d[0] * rot[0, k] + d[1] * rot[1, k] + d[2] * rot[2, k]) / rad[k] for k in range(3)]
    n = np.sqrt(local[0] ** 2 + local[1] ** 2 + local[2] ** 2) + 1e-6
    u = [v / n for v in local]
    linear = w[0] * u[0] + w[1] * u[1] + w[2] * u[2]
    mixed = w[3] * u[0] * u[1] + w[4] * u[1] * u[2] + w[5] * u[0] * u[2]
    scale = 1.0 + linear + mixed + w[6] * (u[0] ** 2 - u[1] ** 2) + w[7] * (3 * u[2] ** 2 - 1)
    radius = np.sqrt(sum((v * r) ** 2 for v, r in zip(u, rad)))  # ray length to the undeformed surface
    return (n * radius - radius * scale).astype(np.float32)


def _tube(grids: Sequence[np.ndarray], points: np.ndarray, radii: np.ndarray) -> np.ndarray:
    """Signed distance to a tube of varying radius around the polyline through ``points`` (K, 3)."""
    best = None
    for p, r in zip(points, radii):
        dist = np.sqrt((grids[0] - p[0]) ** 2 + (grids[1] - p[1]) ** 2 + (grids[2] - p[2]) ** 2) - r
        best = dist if best is None else np.minimum(best, dist)
    return best.astype(np.float32)  # type: ignore[union-attr]


def _bezier(rng: np.random.Generator, control: Sequence[Sequence[float]], jitter: float, num: int) -> np.ndarray:
    """``num`` points of the quadratic Bezier curve through jittered ``control`` points (3, 3)."""
    c = np.asarray(control, dtype=float) + rng.uniform(-jitter, jitter, (3, 3))
    t = np.linspace(0.0, 1.0, num)[:, None]
    return (1 - t) ** 2 * c[0] + 2 * (1 - t) * t * c[1] + t**2 * c[2]


class _Anatomy:
    """Draws one patient into a :class:`_Scene`; ``labels`` maps organ names to their label (0 = unlabelled)."""

    def __init__(self, scene: _Scene, rng: np.random.Generator, contrast: float, labels: dict[str, int]) -> None:
        self.s, self.rng, self.labels = scene, rng, labels
        self.hu = {k: v + rng.uniform(-_HU_SPREAD, _HU_SPREAD) for k, v in _HU.items()}
        for k in self.hu:
            if k not in ("fat", "visceral_fat", "cartilage"):
                self.hu[k] = _SOFT_CENTRE + contrast * (self.hu[k] - _SOFT_CENTRE)
        dims = scene.dims
        texture_shape = (dims[0], dims[1], dims[2])
        cells = (2.0, 2.0, 1.0)
        self.texture = np.repeat(_smooth_noise(rng, texture_shape, cells), _SUBSLICES, axis=2)
        # body outline: superellipse whose half-axes breathe slowly along z
        self.shape_power = rng.uniform(2.1, 2.6)
        self.body_wave = (rng.uniform(0, 2 * np.pi), rng.uniform(0.02, 0.05))
        self.fat = rng.uniform(12.0, 30.0)  # subcutaneous fat, mm
        self.fat_phase = rng.uniform(0, 2 * np.pi)
        self.wall = rng.uniform(9.0, 14.0)  # muscle wall, mm
        self._body_cache: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        right_dome = (rng.uniform(55, 80), rng.uniform(-5, 15), rng.uniform(92, 108))  # (x, y, top z)
        self.domes = (right_dome, (rng.uniform(-80, -55), rng.uniform(-5, 15), rng.uniform(80, 95)))

    # ---- helpers on a box -------------------------------------------------------------------------
    def _texture(self, box: tuple[slice, slice, slice], name: str, amplitude: float) -> np.ndarray:
        return self.hu[name] + amplitude * self.texture[box]

    def _body(self, box: tuple[slice, slice, slice]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Depth below the skin (mm, along rays from the body axis), the fat and the fat + muscle thickness.

        Computed once on the whole fine grid, returned for ``box``.
        """
        if self._body_cache is None:
            x, y, z = self.s.box_grids((slice(None),) * 3)
            phase, amp = self.body_wave
            breathe = np.float32(1.0) + np.float32(amp) * np.sin(np.float32(2 * np.pi / 260.0) * z + np.float32(phase))
            half_y = np.where(y >= 0, np.float32(_BODY[1]), np.float32(_BODY[1] * 0.97))
            p = np.float32(self.shape_power)
            q = (np.abs(x / (np.float32(_BODY[0]) * breathe)) ** p + np.abs(y / (half_y * breathe)) ** p) ** (1 / p)
            r = np.sqrt(x**2 + y**2)
            depth = np.where(q > 1e-6, r / np.maximum(q, np.float32(1e-6)) - r, np.float32(_BODY[1]))
            theta = np.arctan2(y, x)
            fat = self.fat * (0.75 + 0.35 * np.sin(theta)) * (1.0 + 0.15 * np.sin(3 * theta + self.fat_phase)) + 2.0
            wall = fat + self.wall * (1.0 + 0.3 * np.abs(np.cos(theta)))
            self._body_cache = (depth.astype(np.float32), fat.astype(np.float32), wall.astype(np.float32))
        shape = self.s.image.shape
        return tuple(np.broadcast_to(a, shape)[box] for a in self._body_cache)  # type: ignore[return-value]

    def _cavity(self, box: tuple[slice, slice, slice]) -> np.ndarray:
        """Signed distance to the inside of the muscle wall (the abdominal and chest cavity) in ``box``."""
        depth, _, wall = self._body(box)
        return wall - depth

    def _dome(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Template z of the diaphragm above ``(x, y)``: two domes falling towards the sides and the back."""
        heights = [
            top - 55.0 * ((x - cx) / 100.0) ** 2 - 35.0 * ((y - cy) / 90.0) ** 2 - 25.0 * (y < -40) * ((-40 - y) / 60.0)
            for cx, cy, top in self.domes
        ]
        return np.maximum(np.maximum(heights[0], heights[1]), 25.0).astype(np.float32)  # recesses end near L1

    def _organ(
        self,
        centre: Sequence[float],
        radii: Sequence[float],
        base: np.ndarray | None = None,
        tilt: float = 12.0,
        wobble: float = 0.12,
        jitter: float = 6.0,
        spread: float = 0.1,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """A jittered organ template: centre, radii, rotation and the deformation coefficients."""
        rng = self.rng
        c = np.asarray(centre, float) + rng.uniform(-jitter, jitter, 3)
        r = np.asarray(radii, float) * rng.uniform(1 - spread, 1 + spread, 3)
        rot = (np.eye(3) if base is None else base) @ _tilt(rng, tilt)
        return c, r, rot, rng.uniform(-wobble, wobble, 8)

    def _blob_box(
        self, c: np.ndarray, r: np.ndarray, margin: float = 12.0
    ) -> tuple[tuple[slice, slice, slice], list[np.ndarray], list[np.ndarray]]:
        """The index box around an organ, its template coordinates and their displaced version."""
        reach = float(r.max()) * 1.3 + margin
        box, grids = self.s.box(c - reach, c + reach)
        return box, grids, self.s.displaced(box)

    # ---- the patient --------------------------------------------------------------------------------
    def draw(self) -> None:
        s = self.s
        everything_lo, everything_hi = (-400.0, -400.0, -400.0), (400.0, 400.0, 400.0)
        box, grids = s.box(everything_lo, everything_hi)
        x, y = grids[0], grids[1]
        # table: a plate curving up at the sides, below the body and an air gap
        top = -_BODY[1] - 24.0 + 0.0012 * x**2
        plate = np.maximum(np.maximum(y - top, top - 14.0 - y), np.abs(x) - 190.0)
        s.paint(box, np.broadcast_to(plate, s.image.shape), _TABLE_HU, None)
        depth, fat, wall = self._body(box)
        s.paint(box, -depth, self._texture(box, "skin", 4.0))
        s.paint(box, 2.0 - depth, self._texture(box, "fat", 6.0))
        s.paint(box, fat - depth, self._texture(box, "muscle", 5.0))
        cavity = wall - depth
        s.paint(box, cavity, self._texture(box, "visceral_fat", 6.0))
        del depth, fat, wall
        self._bowel()
        self._back_muscles()
        self._chest(cavity)
        del cavity
        self._kidney_fat()
        self._liver()
        self._vessels()
        self._spleen()
        self._stomach()
        self._pancreas()
        self._gallbladder()
        self._kidneys()
        self._aorta()
        self._spine()
        self._ribs()

    def _bowel(self) -> None:
        s, rng = self.s, self.rng
        box, grids = s.box((-170.0, -100.0, _Z_RANGE[0]), (170.0, 120.0, 80.0))
        shape = tuple(b.stop - b.start for b in box)
        cells = (18.0 / s.step, 18.0 / s.step, 18.0 / s.dz)
        loops = _smooth_noise(rng, shape, cells)
        gas = _smooth_noise(rng, shape, cells)
        cavity = self._cavity(box)
        limit = np.maximum(cavity, grids[2] - 40.0 - 20.0 * (grids[0] < 0))  # the upper left abdomen holds more
        scale = 6.0  # mm per unit of the field near its threshold
        bowel = np.maximum(limit, (0.15 - loops) * scale)
        s.paint(box, bowel, self._texture(box, "bowel", 8.0))
        s.paint(box, np.maximum(bowel + 3.0, (0.3 - loops) * scale), self._texture(box, "bowel_fluid", 5.0))
        s.paint(box, np.maximum(bowel + 3.0, (1.4 - gas + 0.01 * grids[1]) * scale), _GAS_HU)

    def _back_muscles(self) -> None:
        s = self.s
        box, grids = s.box((-100.0, -125.0, _Z_RANGE[0]), (100.0, -20.0, _Z_RANGE[1]))
        x, y, z = grids
        depth, fat, _ = self._body(box)
        for side in (1.0, -1.0):
            erector = np.sqrt(((x - side * 38.0) / 32.0) ** 2 + ((y + 92.0) / 22.0) ** 2) * 22.0 - 22.0
            s.paint(box, np.maximum(erector, fat - depth), self._texture(box, "muscle", 5.0))
            radius = np.clip(-(z + 5.0) * 0.22, 0.0, 22.0) + 1e-3  # psoas grows towards the pelvis
            psoas = np.sqrt(((x - side * 38.0) / radius) ** 2 + ((y + 58.0) / (radius * 0.8)) ** 2) * radius - radius
            s.paint(box, psoas, self._texture(box, "muscle", 5.0))

    def _chest(self, cavity_full: np.ndarray) -> None:
        s, rng = self.s, self.rng
        low = float(min(d[2] for d in self.domes)) - 90.0
        box, grids = s.box((-170.0, -120.0, low), (170.0, 120.0, _Z_RANGE[1] + 10.0))
        x, y, z = grids
        cavity = cavity_full[box]
        above = self._dome(x, y) - z
        lung = np.maximum(cavity, above)
        s.paint(box, lung, _LUNG_HU + 20.0 * self.texture[box], self.labels["lung"])
        shape = tuple(b.stop - b.start for b in box)
        cells = (7.0 / s.step, 7.0 / s.step, 7.0 / s.dz)
        a, b = _smooth_noise(rng, shape, cells), _smooth_noise(rng, shape, cells)
        hilum = 0.22 - 0.10 * np.clip(np.abs(x) / 140.0, 0.0, 1.0)  # thicker, denser vessels medially
        vessels = np.maximum(lung + 3.0, (np.sqrt(a**2 + b**2) - hilum) * 5.0)
        s.paint(box, vessels, self.hu["blood"], self.labels["lung"])
        # heart and the posterior mediastinum between the lungs
        c, r, rot, wob = self._organ((-15.0, 28.0, 158.0), (68.0, 58.0, 62.0), tilt=8.0)
        grid_d = s.displaced(box)
        heart = np.maximum(np.maximum(_blob(grid_d, c, r, rot, wob), cavity), above - 4.0)
        s.paint(box, heart, self._texture(box, "heart", 5.0))
        mediastinum = np.maximum(np.maximum(np.abs(x + 5.0) - 24.0, y - 20.0), np.maximum(above - 4.0, cavity))
        s.paint(box, mediastinum, self._texture(box, "visceral_fat", 20.0) + 40.0)

    def _kidney_fat(self) -> None:
        """Perirenal fat around both kidneys (drawn before liver and spleen, which may then touch the kidneys)."""
        self.kidneys = [
            self._organ((58.0, -58.0, -42.0), (27.0, 22.0, 52.0), _rotation_y(-14.0), tilt=8.0, wobble=0.08),
            self._organ((-58.0, -55.0, -25.0), (26.0, 22.0, 52.0), _rotation_y(14.0), tilt=8.0, wobble=0.08),
        ]
        for c, r, rot, wob in self.kidneys:
            box, _, grid_d = self._blob_box(c, r)
            self.s.paint(box, _blob(grid_d, c, r + 7.0, rot, wob), self._texture(box, "visceral_fat", 6.0))

    def _liver(self) -> None:
        s = self.s
        right = self._organ((62.0, 2.0, 30.0), (82.0, 88.0, 88.0), wobble=0.18, spread=0.08)
        left = self._organ((-22.0, 48.0, 52.0), (72.0, 34.0, 40.0), wobble=0.18, spread=0.12)
        lo = np.minimum(right[0] - right[1].max() * 1.3, left[0] - left[1].max() * 1.3) - 12.0
        hi = np.maximum(right[0] + right[1].max() * 1.3, left[0] + left[1].max() * 1.3) + 12.0
        box, grids = self.s.box(lo, hi)
        grid_d = self.s.displaced(box)
        liver = np.minimum(_blob(grid_d, *right), _blob(grid_d, *left))
        liver = np.maximum(np.maximum(liver, self._cavity(box)), grids[2] - self._dome(grids[0], grids[1]))
        s.paint(box, liver, self._texture(box, "liver", 6.0), self.labels["liver"])

    def _vessels(self) -> None:
        """The inferior vena cava, which runs through the back of the liver at a similar HU."""
        s, rng = self.s, self.rng
        points = _bezier(rng, ((24.0, -34.0, _Z_RANGE[0]), (26.0, -30.0, 20.0), (18.0, -20.0, _Z_RANGE[1])), 4.0, 24)
        box, grids = s.box(points.min(0) - 20.0, points.max(0) + 20.0)
        grid_d = s.displaced(box)
        s.paint(box, _tube(grid_d, points, np.full(len(points), rng.uniform(9.0, 12.0))), self.hu["blood"])

    def _spleen(self) -> None:
        c, r, rot, wob = self._organ((-100.0, -28.0, 42.0), (28.0, 52.0, 45.0), _rotation_y(0.0), tilt=15.0)
        box, grids, grid_d = self._blob_box(c, r)
        spleen = np.maximum(_blob(grid_d, c, r, rot, wob), self._cavity(box))
        spleen = np.maximum(spleen, grids[2] - self._dome(grids[0], grids[1]))
        self.s.paint(box, spleen, self._texture(box, "spleen", 5.0), self.labels["spleen"])

    def _stomach(self) -> None:
        c, r, rot, wob = self._organ((-58.0, 35.0, 52.0), (42.0, 36.0, 45.0), tilt=20.0, wobble=0.15)
        box, grids, grid_d = self._blob_box(c, r)
        stomach = np.maximum(_blob(grid_d, c, r, rot, wob), self._cavity(box))
        stomach = np.maximum(stomach, grids[2] - self._dome(grids[0], grids[1]))
        label = self.labels["stomach"]
        self.s.paint(box, stomach, self._texture(box, "stomach_wall", 5.0), label)
        inside = stomach + 4.0
        self.s.paint(box, inside, self._texture(box, "stomach_fluid", 4.0), label)
        level = c[1] + self.rng.uniform(0.0, 0.6) * r[1]  # gas floats anterior (the patient lies supine)
        self.s.paint(box, np.maximum(inside, level - grid_d[1]), _GAS_HU, label)

    def _pancreas(self) -> None:
        s, rng = self.s, self.rng
        points = _bezier(rng, ((34.0, -8.0, -28.0), (-10.0, 18.0, -8.0), (-82.0, -22.0, 15.0)), 6.0, 20)
        radii = np.linspace(16.0, 9.0, len(points)) * rng.uniform(0.85, 1.1)
        box, grids = s.box(points.min(0) - 25.0, points.max(0) + 25.0)
        grid_d = s.displaced(box)
        lobules = 2.5 * self.texture[box]  # a lobulated outline
        pancreas = _tube(grid_d, points, radii) + lobules
        s.paint(box, pancreas, self._texture(box, "pancreas", 9.0), self.labels["pancreas"])

    def _gallbladder(self) -> None:
        c, r, rot, wob = self._organ((48.0, 42.0, -30.0), (15.0, 17.0, 30.0), _rotation_y(-20.0), jitter=4.0)
        box, grids, grid_d = self._blob_box(c, r)
        body = np.maximum(_blob(grid_d, c, r, rot, wob), self._cavity(box))
        self.s.paint(box, body, self._texture(box, "gallbladder", 3.0), self.labels["gallbladder"])

    def _kidneys(self) -> None:
        for c, r, rot, wob in self.kidneys:
            box, _, grid_d = self._blob_box(c, r)
            kidney = _blob(grid_d, c, r, rot, wob)
            self.s.paint(box, kidney, self._texture(box, "kidney_cortex", 4.0), self.labels["kidney"])
            medulla = kidney + 7.0 + 2.5 * self.texture[box]
            self.s.paint(box, medulla, self._texture(box, "kidney_medulla", 3.0), self.labels["kidney"])

    def _aorta(self) -> None:
        s, rng = self.s, self.rng
        points = _bezier(rng, ((-12.0, -34.0, _Z_RANGE[0]), (-16.0, -38.0, 20.0), (-22.0, -42.0, _Z_RANGE[1])), 4.0, 24)
        radii = np.linspace(9.0, 13.0, len(points)) * rng.uniform(0.9, 1.1)
        box, grids = s.box(points.min(0) - 25.0, points.max(0) + 25.0)
        s.paint(box, _tube(s.displaced(box), points, radii), self.hu["blood"], self.labels["aorta"])

    def _spine(self) -> None:
        s, rng = self.s, self.rng
        bone = self.labels["bone"]
        box, grids = s.box((-60.0, -135.0, _Z_RANGE[0] - 10.0), (60.0, -30.0, _Z_RANGE[1] + 10.0))
        x, y, z = grids
        period, phase = rng.uniform(28.0, 34.0), rng.uniform(0.0, 40.0)
        cycle = np.mod(z + phase, period) - period / 2  # 0 in the middle of a vertebra
        body = np.sqrt((x / 24.0) ** 2 + ((y + 62.0) / 20.0) ** 2) * 20.0 - 20.0 + np.zeros_like(z)
        cortex = np.where(body > -2.0, 650.0, 230.0) + 30.0 * self.texture[box]
        s.paint(box, body, cortex, bone)
        disc = np.maximum(body + 1.0, np.abs(np.abs(cycle) - period / 2) - 3.5)
        s.paint(box, disc, self.hu["disc"], 0)
        canal = np.sqrt((x / 10.0) ** 2 + ((y + 93.0) / 8.5) ** 2) * 8.5 - 8.5
        arch = np.sqrt((x / 17.0) ** 2 + ((y + 95.0) / 15.0) ** 2) * 15.0 - 15.0
        arch = np.minimum(arch, np.sqrt((x / 5.5) ** 2 + ((y + 112.0) / 14.0) ** 2) * 5.5 - 5.5)  # spinous process
        arch = np.minimum(arch, np.maximum(np.abs(y + 86.0) - 5.0, np.abs(np.abs(x) - 30.0) - 14.0))  # transverse
        arch = np.maximum(arch, np.maximum(y + 80.0, np.abs(cycle) - period * 0.33))
        s.paint(box, arch + np.zeros_like(z), 500.0 + 40.0 * self.texture[box], bone)
        s.paint(box, canal + np.zeros_like(z), self.hu["cord"], 0)

    def _ribs(self) -> None:
        s, rng = self.s, self.rng
        bone = self.labels["bone"]
        first = _Z_RANGE[1] + rng.uniform(0.0, 26.0)
        for i in range(12):
            z0 = first - 27.0 * i  # where the rib leaves the spine
            if z0 < _Z_RANGE[0] - 10.0:
                break
            box, grids = s.box((-200.0, -140.0, z0 - 125.0), (200.0, 140.0, z0 + 10.0))
            if 0 in [b.stop - b.start for b in box]:
                continue
            x, y, z = grids
            depth, fat, wall = self._body(box)
            angle = np.abs(np.arctan2(x, -y)) / np.pi  # 0 at the spine, 1 at the sternum
            centre_z = z0 - 110.0 * angle**1.3
            reach = 0.85 if z0 > 40.0 else 0.55 - 0.04 * max(0.0, (40.0 - z0) / 27.0)  # lower ribs float
            along = np.sqrt(((depth - (fat + wall) / 2 - 2.0) / 4.0) ** 2 + ((z - centre_z) / 5.5) ** 2) * 4.0 - 4.0
            rib = np.maximum(along, np.maximum(0.12 - angle, angle - reach) * 200.0)
            s.paint(box, rib, np.where(along > -1.5, 700.0, 280.0).astype(np.float32), bone)
            if z0 > 40.0:
                cartilage = np.maximum(along, np.maximum(reach - angle, angle - 0.95) * 200.0)
                s.paint(box, cartilage, self.hu["cartilage"], 0)


def check_realistic_options(
    num_organs: int = 5,
    contrast: float = 1.0,
    noise_hu: float = _DEFAULT_NOISE_HU,
    bias_hu: float = _DEFAULT_BIAS_HU,
) -> tuple[float, float, float]:
    """Check the options of :func:`make_realistic_phantom` without drawing anything.

    Returns:
        ``(contrast, noise_hu, bias_hu)`` as floats.

    Raises:
        ValueError: naming the argument and its value when it is out of range.
    """
    is_int = isinstance(num_organs, (int, np.integer)) and not isinstance(num_organs, bool)
    if not is_int or not 0 <= num_organs <= len(REALISTIC_ORGANS):
        raise ValueError(
            f"num_organs must be an int in 0..{len(REALISTIC_ORGANS)} for style='realistic', got {num_organs!r}."
        )
    return (
        _check_knob(contrast, "contrast", 0.0, 2.0),
        _check_knob(noise_hu, "noise_hu", 0.0, 200.0),
        _check_knob(bias_hu, "bias_hu", 0.0, 200.0),
    )


def make_realistic_phantom(
    shape: Sequence[int] = (128, 128, 48),
    seed: int = 0,
    num_organs: int = 5,
    contrast: float = 1.0,
    noise_hu: float = _DEFAULT_NOISE_HU,
    bias_hu: float = _DEFAULT_BIAS_HU,
) -> tuple[np.ndarray, np.ndarray]:
    """One realistic upper-abdomen CT phantom and its labels, deterministically from ``seed``.

    Axes are (x, y, z) in voxels: x towards the patient's right, y anterior, z superior (RAS). The
    anatomy (see the module docstring) is always drawn; organs ``1..num_organs`` of
    :data:`REALISTIC_ORGANS` are labelled and all other voxels are 0. Each slice averages
    three sub-slices; the image is blurred in-plane by a 0.6-voxel gaussian, then gets a smooth
    additive bias of standard deviation ``bias_hu`` and in-plane correlated noise of standard deviation
    ``noise_hu``; values are clipped to [-1024, 3071] HU. Anatomy, noise and bias come from independent
    streams of the seed, so changing ``noise_hu`` or ``bias_hu`` leaves the anatomy and the labels as they were.

    Args:
        shape: volume shape (X, Y, Z), each at least 16. Defaults to ``(128, 128, 48)``.
        seed: seed of the phantom. Defaults to 0.
        num_organs: labelled organs, 0..9 (``REALISTIC_ORGANS[:num_organs]``). Defaults to 5.
        contrast: scale of the soft-tissue HU differences around 45 HU (1 = realistic, smaller = harder),
            in [0, 2]. Defaults to 1.0.
        noise_hu: standard deviation of the correlated noise in HU, in [0, 200]. Defaults to 15.
        bias_hu: standard deviation of the smooth additive bias in HU, in [0, 200]. Defaults to 8.

    Returns:
        ``(image, label)``: float32 image in HU and uint8 labels, both of ``shape``.

    Raises:
        ValueError: for a shape that is not 3 ints >= 16, or ``num_organs``, ``contrast``, ``noise_hu``
            or ``bias_hu`` out of range; the message names the argument and the value.

    Examples::

        >>> image, label = make_realistic_phantom((32, 32, 16), seed=1, num_organs=3)
        >>> image.shape, label.dtype, sorted(np.unique(label).tolist())
        ((32, 32, 16), dtype('uint8'), [0, 1, 2, 3])
    """
    dims = check_shape(shape)
    contrast, noise_hu, bias_hu = check_realistic_options(num_organs, contrast, noise_hu, bias_hu)
    anatomy_seed, bias_seed, noise_seed = np.random.SeedSequence(seed).spawn(3)
    labels = {name: (k + 1 if k < num_organs else 0) for k, name in enumerate(REALISTIC_ORGANS)}
    scene = _Scene(dims, np.random.default_rng(anatomy_seed))
    _Anatomy(scene, np.random.default_rng(anatomy_seed.spawn(1)[0]), contrast, labels).draw()
    nx, ny, nz = dims
    image = scene.image.reshape(nx, ny, nz, _SUBSLICES).mean(axis=3)
    label = np.ascontiguousarray(scene.label[:, :, _SUBSLICES // 2 :: _SUBSLICES])
    image = _blur(image, 0.6, axes=(0, 1))
    if bias_hu > 0:
        image += bias_hu * _smooth_noise(np.random.default_rng(bias_seed), dims, (nx / 3, ny / 3, nz / 2))
    if noise_hu > 0:
        noise = _blur(np.random.default_rng(noise_seed).standard_normal(dims, dtype=np.float32), 0.8, axes=(0, 1))
        image += noise * np.float32(noise_hu / float(noise.std()))
    np.clip(image, -1024.0, 3071.0, out=image)
    return image.astype(np.float32, copy=False), label
