"""Shape primitives and internal textures from which the synthetic structure families are built.

A primitive draws its random parameters from a ``np.random.Generator`` and returns a :class:`Shape`: a
signed-distance-like function of local coordinates (negative inside) and the radius of a ball that holds the
shape. Every primitive fits in the unit ball, so a family's ``size`` is the structure's bounding radius.
Textures modulate a structure's contrast inside it; they return a field with values around 1.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

__all__ = ["SHAPES", "TEXTURES", "Shape", "random_rotation", "smooth_noise"]

SDF = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class Shape:
    """A drawn primitive.

    Attributes:
        sdf: local coordinates, shape (3, ...) -> signed distance, shape (...), negative inside; exact or
            a close approximation near the surface (only its sign and rough slope are used).
        radius: every inside point ``v`` has ``|v| <= radius`` (about 1).
    """

    sdf: SDF
    radius: float


def random_rotation(rng: np.random.Generator) -> np.ndarray:
    """A uniformly random 3x3 rotation matrix (QR of a Gaussian matrix, signs fixed)."""
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], cell: float) -> np.ndarray:
    """Zero-mean, unit-std noise that varies over about ``cell`` voxels (a coarse grid, linearly upsampled).

    Upsampling a coarse grid costs a fraction of a Gaussian filter of the same smoothness at 48^3.
    """
    coarse_shape = tuple(max(2, int(np.ceil(n / cell)) + 1) for n in shape)
    coarse = rng.standard_normal(coarse_shape)
    field = ndimage.zoom(coarse, [n / c for n, c in zip(shape, coarse_shape)], order=1, grid_mode=False)
    field = field[tuple(slice(0, n) for n in shape)]
    return (field - field.mean()) / (field.std() + 1e-8)


def _col(x: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Reshape a 3-vector ``x`` to broadcast against points ``v`` of shape (3, ...)."""
    return np.asarray(x).reshape(3, *([1] * (v.ndim - 1)))


def _norm(v: np.ndarray) -> np.ndarray:
    return np.sqrt((v * v).sum(axis=0))


def _segment_distance(v: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Distance from points ``v`` (3, ...) to the segment ``a``-``b``."""
    pa, ba = v - _col(a, v), _col(b - a, v)
    h = np.clip((pa * ba).sum(axis=0) / max(float((ba * ba).sum()), 1e-12), 0.0, 1.0)
    return _norm(pa - ba * h)


def _polyline_tube(points: np.ndarray, radii: np.ndarray) -> Shape:
    """A union of capsules along consecutive ``points`` (N, 3) with per-segment ``radii`` (N-1,)."""

    def sdf(v: np.ndarray) -> np.ndarray:
        return np.min(
            [_segment_distance(v, points[i], points[i + 1]) - radii[i] for i in range(len(radii))], axis=0
        )

    return Shape(sdf, float(np.linalg.norm(points, axis=1).max() + radii.max()))


def _ellipsoid(rng: np.random.Generator) -> Shape:
    axes = np.array([1.0, rng.uniform(0.75, 1.0), rng.uniform(0.6, 1.0)])
    # Scaling the unit-sphere distance by the shortest semi-axis keeps it a lower bound of the true distance.
    return Shape(lambda v: (_norm(v / _col(axes, v)) - 1.0) * axes.min(), 1.0)


def _box(rng: np.random.Generator, rounding: float = 0.0) -> Shape:
    h = np.array([rng.uniform(0.6, 0.7), rng.uniform(0.45, 0.65), rng.uniform(0.4, 0.6)])
    r = rounding * h.min()

    def sdf(v: np.ndarray) -> np.ndarray:
        q = np.abs(v) - _col(h - r, v)
        return _norm(np.maximum(q, 0.0)) + np.minimum(q.max(axis=0), 0.0) - r

    return Shape(sdf, float(np.linalg.norm(h)))


def _cylinder(rng: np.random.Generator) -> Shape:
    r, h = rng.uniform(0.35, 0.5), rng.uniform(0.7, 0.85)
    return Shape(lambda v: np.maximum(np.hypot(v[0], v[1]) - r, np.abs(v[2]) - h), float(np.hypot(r, h)))


def _bezier_tube(rng: np.random.Generator) -> Shape:
    control = rng.uniform(-0.7, 0.7, size=(4, 3))
    control[0], control[3] = -control[3], control[3]  # ends on opposite sides, so the tube spans the ball
    t = np.linspace(0.0, 1.0, 11)[:, None]
    weights = [(1 - t) ** 3, 3 * t * (1 - t) ** 2, 3 * t**2 * (1 - t), t**3]
    points = sum(w * c for w, c in zip(weights, control))
    return _polyline_tube(points, np.full(10, rng.uniform(0.18, 0.26)))


def _torus(rng: np.random.Generator) -> Shape:
    big, small = rng.uniform(0.6, 0.7), rng.uniform(0.2, 0.3)
    return Shape(lambda v: np.hypot(np.hypot(v[0], v[1]) - big, v[2]) - small, big + small)


def _shell(rng: np.random.Generator) -> Shape:
    radius, half = rng.uniform(0.7, 0.82), rng.uniform(0.1, 0.16)
    return Shape(lambda v: np.abs(_norm(v) - radius) - half, radius + half)


def _lobulated(rng: np.random.Generator) -> Shape:
    n = int(rng.integers(3, 7))
    centres = rng.normal(scale=0.25, size=(n, 3))
    sigmas = rng.uniform(0.2, 0.3, size=n)
    # Each Gaussian alone exceeds the 0.5 threshold within 1.18 sigma; n of them, within sigma*sqrt(2 ln 2n).
    radius = float((np.linalg.norm(centres, axis=1) + sigmas * np.sqrt(2 * np.log(2 * n))).max())
    mean_sigma = float(sigmas.mean())

    def sdf(v: np.ndarray) -> np.ndarray:
        field = sum(
            np.exp(-((v - _col(c, v)) ** 2).sum(axis=0) / (2 * s * s)) for c, s in zip(centres, sigmas)
        )
        # As a distance: for one Gaussian, sigma * sqrt(-2 ln field) is the distance to its centre, so this is
        # the distance to the field = 0.5 surface; it keeps growing far away (0.5 - field would saturate).
        g = -2.0 * np.log(np.maximum(field, 1e-30))
        return mean_sigma * (np.sign(g) * np.sqrt(np.abs(g)) - np.sqrt(2 * np.log(2)))

    return Shape(sdf, radius)


def _star(rng: np.random.Generator, spikes: tuple[int, int], power: tuple[float, float]) -> Shape:
    n = int(rng.integers(*spikes))
    dirs = rng.standard_normal((n, 3))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    amps, p = rng.uniform(0.4, 0.8, size=n), rng.uniform(*power)

    def bump(unit: np.ndarray) -> np.ndarray:
        cos = np.tensordot(dirs, unit, axes=(1, 0))
        return 1.0 + (amps.reshape(-1, *([1] * (cos.ndim - 1))) * np.maximum(cos, 0.0) ** p).sum(axis=0)

    # The radius function peaks at (or within a few percent of) a spike direction; 10% margin covers that.
    base = 1.0 / (1.1 * bump(dirs.T).max())

    def sdf(v: np.ndarray) -> np.ndarray:
        r = _norm(v)
        return (r - base * bump(v / np.maximum(r, 1e-6))) * 0.7

    return Shape(sdf, 1.0)


def _plate(rng: np.random.Generator) -> Shape:
    half, b = rng.uniform(0.1, 0.16), rng.uniform(0.6, 1.0)
    return Shape(lambda v: np.maximum(np.abs(v[2]) - half, (np.hypot(v[0], v[1] / b) - 0.95) * b), 1.0)


def _vessel_tree(rng: np.random.Generator) -> Shape:
    points, radii = [], []
    stack = [(np.array([0.0, 0.0, -1.0]), np.array([0.0, 0.0, 1.0]), 0.55, rng.uniform(0.2, 0.26), 0)]
    while stack:
        start, direction, length, radius, depth = stack.pop()
        end = start + direction * length
        points.append((start, end))
        radii.append(radius)
        if depth < 3:
            for _ in range(2):
                child = direction + rng.normal(scale=0.6, size=3)
                stack.append((end, child / np.linalg.norm(child), length * 0.7, radius * 0.8, depth + 1))
    ends = np.array([p for seg in points for p in seg])
    shift, scale = ends.mean(axis=0), np.linalg.norm(ends - ends.mean(axis=0), axis=1).max() + max(radii)
    segments = [((a - shift) / scale, (b - shift) / scale) for a, b in points]
    radii_local = np.array(radii) / scale

    def sdf(v: np.ndarray) -> np.ndarray:
        return np.min([_segment_distance(v, a, b) - r for (a, b), r in zip(segments, radii_local)], axis=0)

    return Shape(sdf, 1.0)


def _sphere_cluster(rng: np.random.Generator) -> Shape:
    n = int(rng.integers(3, 8))
    radii = rng.uniform(0.16, 0.24, size=n)
    centres = rng.standard_normal((n, 3))
    centres *= (rng.uniform(0.0, 1.0, size=(n, 1)) ** (1 / 3) * (0.95 - radii[:, None])) / np.linalg.norm(
        centres, axis=1, keepdims=True
    )

    def sdf(v: np.ndarray) -> np.ndarray:
        return np.min([_norm(v - _col(c, v)) - r for c, r in zip(centres, radii)], axis=0)

    return Shape(sdf, 0.95)


def _capsule(rng: np.random.Generator) -> Shape:
    h, r = rng.uniform(0.4, 0.55), rng.uniform(0.32, 0.42)
    return _polyline_tube(np.array([[-h, 0.0, 0.0], [h, 0.0, 0.0]]), np.array([r]))


def _dumbbell(rng: np.random.Generator) -> Shape:
    r, neck, offset = rng.uniform(0.3, 0.38), rng.uniform(0.1, 0.16), rng.uniform(0.5, 0.58)
    ends = np.array([[-offset, 0.0, 0.0], [offset, 0.0, 0.0]])

    def sdf(v: np.ndarray) -> np.ndarray:
        balls = [_norm(v - _col(e, v)) - r for e in ends]
        return np.minimum(np.minimum(*balls), _segment_distance(v, ends[0], ends[1]) - neck)

    return Shape(sdf, offset + r)


def _octahedron(rng: np.random.Generator) -> Shape:
    s = rng.uniform(0.85, 1.0)
    return Shape(lambda v: (np.abs(v).sum(axis=0) - s) * 0.577, s)


def _dome(rng: np.random.Generator) -> Shape:
    radius, base = rng.uniform(0.8, 0.9), rng.uniform(0.3, 0.4)

    def sdf(v: np.ndarray) -> np.ndarray:
        lifted = v.copy()
        lifted[2] = v[2] + base
        return np.maximum(_norm(lifted) - radius, -lifted[2])

    return Shape(sdf, float(np.hypot(radius, base)))


def _annulus(rng: np.random.Generator) -> Shape:
    big, half_width, half_height = rng.uniform(0.6, 0.7), rng.uniform(0.12, 0.2), rng.uniform(0.18, 0.3)

    def sdf(v: np.ndarray) -> np.ndarray:
        return np.maximum(np.abs(np.hypot(v[0], v[1]) - big) - half_width, np.abs(v[2]) - half_height)

    return Shape(sdf, float(np.hypot(big + half_width, half_height)))


def _infiltrative(rng: np.random.Generator) -> Shape:
    k = 6
    freqs = rng.normal(scale=4.0, size=(k, 3))
    phases, weights = rng.uniform(0, 2 * np.pi, size=k), rng.uniform(0.5, 1.0, size=k)
    amp = rng.uniform(0.2, 0.3) / weights.sum()
    base = 0.95 - amp * weights.sum()

    def sdf(v: np.ndarray) -> np.ndarray:
        wave = sum(
            w * np.sin(np.tensordot(f, v, axes=(0, 0)) + ph) for f, ph, w in zip(freqs, phases, weights)
        )
        return (_norm(v) - base + amp * wave) * 0.7

    return Shape(sdf, 0.95)


def _crescent(rng: np.random.Generator) -> Shape:
    radius, bite, offset = 0.9, rng.uniform(0.7, 0.82), rng.uniform(0.35, 0.5)
    centre = np.array([offset, 0.0, 0.0])
    return Shape(lambda v: np.maximum(_norm(v) - radius, bite - _norm(v - _col(centre, v))), radius)


def _cone(rng: np.random.Generator) -> Shape:
    base_r, bottom, top = rng.uniform(0.6, 0.72), -0.7, 0.7
    slope = base_r / (top - bottom)

    def sdf(v: np.ndarray) -> np.ndarray:
        side = (np.hypot(v[0], v[1]) - slope * (top - v[2])) / np.sqrt(1 + slope**2)
        return np.maximum(np.maximum(side, bottom - v[2]), v[2] - top)

    return Shape(sdf, float(max(np.hypot(base_r, bottom), top)))


def _helix(rng: np.random.Generator) -> Shape:
    coil, turns, radius = rng.uniform(0.45, 0.6), rng.uniform(1.5, 2.5), rng.uniform(0.14, 0.18)
    angle = np.linspace(0.0, 2 * np.pi * turns, int(12 * turns) + 1)
    points = np.stack(
        [coil * np.cos(angle), coil * np.sin(angle), np.linspace(-0.7, 0.7, angle.size)], axis=1
    )
    return _polyline_tube(points, np.full(angle.size - 1, radius))


#: Primitive name -> draw(rng) -> Shape.
SHAPES: dict[str, Callable[[np.random.Generator], Shape]] = {
    "ellipsoid": _ellipsoid,
    "box": _box,
    "rounded_box": lambda rng: _box(rng, rounding=0.6),
    "cylinder": _cylinder,
    "tube": _bezier_tube,
    "torus": _torus,
    "shell": _shell,
    "lobulated": _lobulated,
    "star_spiky": lambda rng: _star(rng, spikes=(5, 10), power=(8.0, 16.0)),
    "star_lumpy": lambda rng: _star(rng, spikes=(3, 7), power=(2.0, 4.0)),
    "plate": _plate,
    "vessel_tree": _vessel_tree,
    "sphere_cluster": _sphere_cluster,
    "capsule": _capsule,
    "dumbbell": _dumbbell,
    "octahedron": _octahedron,
    "dome": _dome,
    "annulus": _annulus,
    "infiltrative": _infiltrative,
    "crescent": _crescent,
    "cone": _cone,
    "helix": _helix,
}


def _flat(rng: np.random.Generator, v: np.ndarray, depth: np.ndarray) -> np.ndarray:
    return np.ones(depth.shape, dtype=np.float32)


def _noisy(rng: np.random.Generator, v: np.ndarray, depth: np.ndarray) -> np.ndarray:
    return 1.0 + rng.uniform(0.2, 0.4) * smooth_noise(rng, depth.shape, cell=3.0)


def _striped(rng: np.random.Generator, v: np.ndarray, depth: np.ndarray) -> np.ndarray:
    direction = random_rotation(rng)[:, 0]
    phase = np.tensordot(direction, v, axes=(0, 0)) * 2 * np.pi * rng.uniform(2.0, 3.5) + rng.uniform(
        0, 2 * np.pi
    )
    return 1.0 + rng.uniform(0.35, 0.55) * np.sin(phase)


def _speckled(rng: np.random.Generator, v: np.ndarray, depth: np.ndarray) -> np.ndarray:
    return 1.0 + rng.uniform(1.0, 2.0) * (rng.random(depth.shape) < rng.uniform(0.04, 0.1))


def _gradient(rng: np.random.Generator, v: np.ndarray, depth: np.ndarray) -> np.ndarray:
    direction = random_rotation(rng)[:, 0]
    return 1.0 + rng.uniform(0.4, 0.7) * np.tensordot(direction, v, axes=(0, 0))


def _core(rng: np.random.Generator, v: np.ndarray, depth: np.ndarray) -> np.ndarray:
    # Rim-enhancing lesion: the centre takes the opposite contrast of the rim (necrotic or cystic core).
    x = np.clip((depth - 0.35) / 0.3, 0.0, 1.0)
    return 1.0 - rng.uniform(1.3, 1.8) * x * x * (3 - 2 * x)


def _layered(rng: np.random.Generator, v: np.ndarray, depth: np.ndarray) -> np.ndarray:
    return 1.0 + rng.uniform(0.5, 0.7) * np.cos(2 * np.pi * rng.uniform(2.0, 3.5) * depth)


#: Texture name -> draw(rng, local coords (3, ...), relative depth in [0, 1] (...)) -> contrast factor (...).
TEXTURES: dict[str, Callable[[np.random.Generator, np.ndarray, np.ndarray], np.ndarray]] = {
    "smooth": _flat,
    "noisy": _noisy,
    "striped": _striped,
    "speckled": _speckled,
    "gradient": _gradient,
    "core": _core,
    "layered": _layered,
}
