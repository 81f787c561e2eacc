"""Shape primitives and textures: every shape is non-empty and lies within its stated bounding radius (the
synthetic phantoms crop each structure to that ball), draws are seeded, textures keep their documented
ranges, and the two helpers (random rotations, smooth noise) have the properties they promise.

The module checks no input (its callers do), so there is no table of invalid cases.
"""

from __future__ import annotations

import numpy as np
import pytest

from medmeta_plugin.episodes.primitives import SHAPES, TEXTURES, Shape, random_rotation, smooth_noise

SEEDS = range(8)  # draws per shape: the random parameters move across their ranges


def _grid(extent: float, n: int) -> np.ndarray:
    """Points of a cube [-extent, extent]^3 with ``n`` points per axis, shape (3, n, n, n)."""
    axis = np.linspace(-extent, extent, n)
    return np.stack(np.meshgrid(axis, axis, axis, indexing="ij"))


GRID = _grid(1.6, 49)  # reaches past every radius (the largest is about 1.5: a thick Bezier tube)
NORMS = np.sqrt((GRID**2).sum(axis=0))
FINE = _grid(1.0, 41)  # a step of 0.05 units: the thinnest part (a plate 0.2 thick) holds points


# Known and kept: any tighter bound changes every star phantom (the crop box, and so the texture draws),
# and with it the data the shipped backbone was trained on; the overrun lies within the 3-width margin
# synthetic.py crops with, so no phantom is cut.
STAR_OVERRUN = pytest.mark.xfail(
    strict=True,
    reason="_star (primitives.py:155-156) bounds the radius function by 1.1x its largest value at a spike "
    "direction, which is not always enough: star_lumpy drawn with seed 0 has inside points out to "
    "|v| = 1.011 > Shape.radius = 1.0",
)
BOUNDED = [pytest.param(n, marks=STAR_OVERRUN) if n == "star_lumpy" else n for n in sorted(SHAPES)]


@pytest.mark.parametrize("name", BOUNDED)
def test_every_shape_is_non_empty_and_within_its_radius(name: str) -> None:
    for seed in SEEDS:
        shape = SHAPES[name](np.random.default_rng(seed))
        assert isinstance(shape, Shape) and 0.5 < shape.radius < 1.6, (seed, shape.radius)
        distance = shape.sdf(GRID)
        assert distance.shape == GRID.shape[1:] and np.isfinite(distance).all()
        inside = distance < 0
        assert int((shape.sdf(FINE) < 0).sum()) >= 20, f"seed {seed}: the shape is (almost) empty"
        farthest = float(NORMS[inside].max())
        assert farthest <= shape.radius + 1e-9, f"seed {seed}: a point at {farthest:.3f} > {shape.radius:.3f}"


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_shape_distances_grow_away_from_the_shape(name: str) -> None:
    """Outside the bounding ball the signed distance is positive and keeps growing outward, so the
    occupancy ramp built on it fades to nothing (only its sign and rough slope are used)."""
    shape = SHAPES[name](np.random.default_rng(3))
    direction = np.random.default_rng(4).standard_normal((3, 16))
    direction /= np.linalg.norm(direction, axis=0)
    near = shape.sdf(direction * (shape.radius + 0.1))
    far = shape.sdf(direction * (shape.radius + 1.0))
    assert (near > 0).all() and (far > near).all()


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_shapes_are_seeded(name: str) -> None:
    a, b = SHAPES[name](np.random.default_rng(11)), SHAPES[name](np.random.default_rng(11))
    np.testing.assert_array_equal(a.sdf(FINE), b.sdf(FINE))
    assert a.radius == b.radius
    c = SHAPES[name](np.random.default_rng(12))
    assert not np.array_equal(a.sdf(FINE), c.sdf(FINE)), "another seed, another shape"


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_shapes_take_points_of_any_batch_shape(name: str) -> None:
    """``sdf`` maps (3, ...) to (...): a flat list of points gives what the same points in a grid give."""
    shape = SHAPES[name](np.random.default_rng(5))
    points = FINE[:, ::4, ::4, ::4]
    flat = shape.sdf(points.reshape(3, -1))
    assert flat.shape == (points[0].size,)
    np.testing.assert_allclose(flat, shape.sdf(points).ravel())


def _texture_inputs() -> tuple[np.ndarray, np.ndarray]:
    """Local coordinates (3, 16, 16, 16) of the unit ball's box, and the relative depth (16, 16, 16) in the
    ball (0 on and outside its surface, 1 at its centre)."""
    v = _grid(1.0, 16)
    depth = np.clip(1.0 - np.sqrt((v**2).sum(axis=0)), 0.0, 1.0)
    return v, depth


# Texture -> the range its factor keeps for local coordinates within the unit ball's box (|v_i| <= 1):
# 1 + amplitude * (a bounded pattern); from the amplitudes drawn in primitives.py.
TEXTURE_RANGES = {
    "smooth": (1.0, 1.0),
    "striped": (1.0 - 0.55, 1.0 + 0.55),
    "speckled": (1.0, 3.0),
    "gradient": (1.0 - 0.7 * np.sqrt(3), 1.0 + 0.7 * np.sqrt(3)),
    "core": (1.0 - 1.8, 1.0),
    "layered": (1.0 - 0.7, 1.0 + 0.7),
    "noisy": (-np.inf, np.inf),  # Gaussian: checked by its moments below
}


def test_every_texture_has_a_range() -> None:
    assert set(TEXTURE_RANGES) == set(TEXTURES)


@pytest.mark.parametrize("name", sorted(TEXTURES))
def test_textures_are_fields_around_one_in_their_range(name: str) -> None:
    v, depth = _texture_inputs()
    low, high = TEXTURE_RANGES[name]
    for seed in SEEDS:
        factor = np.asarray(TEXTURES[name](np.random.default_rng(seed), v, depth))
        assert factor.shape == depth.shape and np.isfinite(factor).all()
        assert low - 1e-9 <= factor.min() and factor.max() <= high + 1e-9, (seed, factor.min(), factor.max())


@pytest.mark.parametrize("name", sorted(TEXTURES))
def test_textures_are_seeded(name: str) -> None:
    v, depth = _texture_inputs()
    a = TEXTURES[name](np.random.default_rng(2), v, depth)
    b = TEXTURES[name](np.random.default_rng(2), v, depth)
    np.testing.assert_array_equal(a, b)
    if name != "smooth":
        assert not np.array_equal(a, TEXTURES[name](np.random.default_rng(3), v, depth))


def test_smooth_texture_is_exactly_one() -> None:
    v, depth = _texture_inputs()
    factor = TEXTURES["smooth"](np.random.default_rng(0), v, depth)
    assert factor.dtype == np.float32 and (factor == 1.0).all()


def test_noisy_texture_varies_about_one() -> None:
    v, depth = _texture_inputs()
    factor = TEXTURES["noisy"](np.random.default_rng(0), v, depth)
    assert factor.mean() == pytest.approx(1.0, abs=1e-6)
    assert 0.2 - 1e-6 <= factor.std() <= 0.4 + 1e-6  # the drawn amplitude times a unit-std noise


def test_speckled_texture_marks_a_few_percent_of_voxels() -> None:
    v, depth = _texture_inputs()
    factor = TEXTURES["speckled"](np.random.default_rng(0), v, depth)
    speckles = factor > 1.0
    assert 0.02 < speckles.mean() < 0.14  # drawn as 4-10% of the voxels
    assert (factor[speckles] >= 2.0).all() and (factor[~speckles] == 1.0).all()


def test_core_texture_inverts_the_centre_and_keeps_the_rim() -> None:
    """Rim-enhancing: the factor is 1 near the surface (depth < 0.35), falls with depth, and is negative
    (the opposite contrast) in the core (depth >= 0.65)."""
    depth = np.linspace(0.0, 1.0, 101)
    v = np.zeros((3, 101))
    factor = TEXTURES["core"](np.random.default_rng(0), v, depth)
    assert (factor[depth < 0.35] == 1.0).all()
    assert (np.diff(factor) <= 1e-12).all()
    assert (factor[depth >= 0.65] < 0).all()


def test_layered_texture_depends_on_depth_only() -> None:
    v, depth = _texture_inputs()
    a = TEXTURES["layered"](np.random.default_rng(0), v, depth)
    b = TEXTURES["layered"](np.random.default_rng(0), np.flip(v, axis=1), depth)
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("seed", range(6))
def test_random_rotations_are_proper_rotations(seed: int) -> None:
    q = random_rotation(np.random.default_rng(seed))
    assert q.shape == (3, 3)
    np.testing.assert_allclose(q @ q.T, np.eye(3), atol=1e-12)
    assert np.linalg.det(q) == pytest.approx(1.0)


def test_random_rotations_are_seeded_and_spread_over_all_directions() -> None:
    np.testing.assert_array_equal(
        random_rotation(np.random.default_rng(1)), random_rotation(np.random.default_rng(1))
    )
    rng = np.random.default_rng(0)
    rotations = np.stack([random_rotation(rng) for _ in range(2000)])
    # Uniform over SO(3): every entry averages zero, and each rotated axis is uniform on the sphere.
    np.testing.assert_allclose(rotations.mean(axis=0), 0.0, atol=0.05)
    np.testing.assert_allclose((rotations[:, :, 0] ** 2).mean(axis=0), 1 / 3, atol=0.03)


@pytest.mark.parametrize(
    ("shape", "cell"),
    [((48, 48, 48), 3.0), ((20, 18, 16), 6.0), ((7, 5, 9), 1.0), ((32, 32), 4.0), ((10, 1, 10), 2.0)],
)
def test_smooth_noise_has_zero_mean_unit_std_and_the_shape_asked(shape: tuple[int, ...], cell: float) -> None:
    field = smooth_noise(np.random.default_rng(0), shape, cell)
    assert field.shape == shape and np.isfinite(field).all()
    assert field.mean() == pytest.approx(0.0, abs=1e-9)
    assert field.std() == pytest.approx(1.0, abs=1e-6)


def test_smooth_noise_is_seeded() -> None:
    a = smooth_noise(np.random.default_rng(4), (16, 16, 16), 3.0)
    np.testing.assert_array_equal(a, smooth_noise(np.random.default_rng(4), (16, 16, 16), 3.0))
    assert not np.array_equal(a, smooth_noise(np.random.default_rng(5), (16, 16, 16), 3.0))


def _neighbour_correlation(field: np.ndarray) -> float:
    return float(np.corrcoef(field[:-1].ravel(), field[1:].ravel())[0, 1])


def test_smooth_noise_varies_over_about_cell_voxels() -> None:
    """Neighbouring voxels are more alike the larger the cell; over a few cells they are independent."""
    rng = np.random.default_rng(0)
    fine, coarse = smooth_noise(rng, (48, 48, 48), 2.0), smooth_noise(rng, (48, 48, 48), 8.0)
    assert (
        0.3 < _neighbour_correlation(fine) < _neighbour_correlation(coarse)
        and _neighbour_correlation(coarse) > 0.9
    )
    far = float(np.corrcoef(coarse[:-24].ravel(), coarse[24:].ravel())[0, 1])
    assert abs(far) < 0.2
