"""Search grids: a scan lands where its affine says whatever its voxel order, inside its field of view only,
with air in class 0 and the body in equal quantile classes; input checks name the argument."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from medmeta_plugin.registration.grids import (
    air_threshold,
    check_volume,
    otsu_threshold,
    search_grid,
    soft_tissue_window,
)
from medmeta_plugin.registration.placement import rotation_matrix

SPACING_MM = 6.0  # the placement search's default grid (PlacementConfig.spacing_mm)


def _affine(spacing: tuple[float, ...], rotation_deg=(0.0, 0.0, 0.0), origin=(0.0, 0.0, 0.0)) -> np.ndarray:
    """Voxel-to-world matrix (4, 4): axes turned by a rotation vector (degrees), then scaled by spacing."""
    affine = np.eye(4)
    affine[:3, :3] = rotation_matrix(rotation_deg) * np.asarray(spacing)[None, :]
    affine[:3, 3] = origin
    return affine


def _world(shape: tuple[int, ...], affine: np.ndarray) -> np.ndarray:
    """World position (RAS mm) of every voxel centre, shape (3, X, Y, Z)."""
    index = np.indices(shape).reshape(3, -1)
    return (affine[:3, :3] @ index + affine[:3, 3:4]).reshape(3, *shape)


def _reordered(array: np.ndarray, affine: np.ndarray, order: tuple[int, ...], flips: tuple[int, ...]):
    """The same scan stored in another voxel order: axes permuted by ``order`` then ``flips`` reversed, with
    the affine changed so that every voxel keeps its world position."""
    out = np.transpose(array, order)
    index = np.eye(4)[:, [*order, 3]]  # new voxel index -> old voxel index
    for axis in flips:
        out = np.flip(out, axis)
        flip = np.eye(4)
        flip[axis, axis], flip[axis, 3] = -1.0, out.shape[axis] - 1
        index = index @ flip
    return np.ascontiguousarray(out), affine @ index


@pytest.fixture(scope="module")
def graded_body() -> tuple[np.ndarray, np.ndarray]:
    """An asymmetric body in air, 40 x 36 x 24 voxels of 2 x 2.5 x 4 mm: an ellipsoid of graded soft tissue
    holding six blobs of other intensities, lightly blurred, with noise."""
    rng = np.random.default_rng(7)
    shape = (40, 36, 24)
    index = np.indices(shape).astype(np.float64)
    centre = (np.array(shape) - 1) / 2
    radius = (
        ((index - centre[:, None, None, None]) / (np.array(shape) * 0.4)[:, None, None, None]) ** 2
    ).sum(0)
    image = np.where(radius < 1, 1.0 + 0.3 * index[0] / shape[0], 0.0)
    for _ in range(6):
        where = rng.uniform(0.3, 0.7, 3) * np.array(shape)
        distance = np.sqrt(((index - where[:, None, None, None]) ** 2).sum(0))
        image[distance < rng.uniform(2, 5)] = rng.uniform(0.2, 2.0)
    image = ndimage.gaussian_filter(image, 1.0) + rng.normal(0, 0.02, shape)
    return image.astype(np.float32), _affine((2.0, 2.5, 4.0), origin=(-40.0, -30.0, -20.0))


# ----- search_grid ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("order", "flips"),
    [
        ((0, 1, 2), ()),  # as stored
        ((0, 1, 2), (0, 1)),  # LPS voxel order
        ((2, 0, 1), (0,)),  # slices first, reversed
        ((1, 2, 0), (0, 1, 2)),  # every axis moved and reversed
        ((0, 2, 1), (2,)),  # coronal order
    ],
)
def test_search_grid_is_the_same_whatever_the_voxel_order(graded_body, order, flips) -> None:
    image, affine = graded_body
    stored, stored_affine = _reordered(image, affine, order, flips)
    reference = search_grid(image, affine, SPACING_MM, 6)
    grid = search_grid(stored, stored_affine, SPACING_MM, 6)
    np.testing.assert_allclose(grid.affine, reference.affine, atol=1e-9)
    assert grid.image.shape == reference.image.shape
    np.testing.assert_allclose(grid.image.numpy(), reference.image.numpy(), atol=1e-4)
    assert bool((grid.fov == reference.fov).all())
    # Classes are quantiles: a voxel within float noise of an edge may fall either side.
    assert float((grid.bins != reference.bins).float().mean()) < 1e-3


@pytest.mark.parametrize(
    ("spacing", "rotation_deg", "origin"),
    [
        ((2.0, 2.0, 2.0), (0.0, 0.0, 0.0), (0.0, 0.0, 0.0)),
        ((1.0, 1.5, 5.0), (0.0, 0.0, 180.0), (120.0, -80.0, 40.0)),  # LPS axes, anisotropic, off-origin
        ((1.5, 1.5, 3.0), (0.0, 0.0, 30.0), (-60.0, 10.0, 300.0)),  # tilted about S
        ((2.0, 1.2, 2.5), (25.0, -15.0, 10.0), (5.0, 5.0, 5.0)),  # oblique
    ],
)
def test_search_grid_puts_the_body_where_the_affine_says(spacing, rotation_deg, origin) -> None:
    # A ball of radius 25 mm of noisy tissue (a uniform one would be all clipped to one value by the soft
    # tissue window, air included), centred 15 mm off the scan's centre along each voxel axis, in air.
    shape = (72, 64, 40)
    affine = _affine(spacing, rotation_deg, origin)
    centre_index = (np.array(shape) - 1) / 2 + 15.0 / np.asarray(spacing)
    centre = (affine @ np.r_[centre_index, 1.0])[:3]
    distance = np.linalg.norm(_world(shape, affine) - centre[:, None, None, None], axis=0)
    tissue = np.random.default_rng(1).normal(100.0, 5.0, shape)
    image = np.where(distance < 25.0, tissue, 0.0).astype(np.float32)
    grid = search_grid(image, affine, SPACING_MM, 6)
    body = grid.body.nonzero().double().mean(0).numpy()
    np.testing.assert_allclose((grid.affine @ np.r_[body, 1.0])[:3], centre, atol=SPACING_MM / 4)
    volume = float(grid.body.sum()) * SPACING_MM**3
    assert volume == pytest.approx(4 / 3 * np.pi * 25.0**3, rel=0.25)
    np.testing.assert_allclose(grid.affine[:3, :3], np.eye(3) * SPACING_MM)  # axis-aligned RAS


@pytest.mark.parametrize("rotation_deg", [(0.0, 0.0, 0.0), (0.0, 0.0, 30.0), (20.0, 0.0, 35.0)])
def test_fov_is_true_only_inside_the_scan(rotation_deg) -> None:
    # Body everywhere (graded tissue, dark corner to bright corner): the grid keeps the scan's whole box.
    shape, spacing = (60, 50, 40), (2.0, 2.0, 2.0)
    affine = _affine(spacing, rotation_deg, (-30.0, 20.0, 10.0))
    image = (1.0 + np.indices(shape).sum(0) / 10.0).astype(np.float32)
    image[:4] = 0.0  # an air layer, so Otsu has two classes
    grid = search_grid(image, affine, SPACING_MM, 6)
    to_scan = np.linalg.inv(affine) @ grid.affine
    index = np.indices(tuple(grid.fov.shape)).reshape(3, -1)
    voxel = (to_scan[:3, :3] @ index + to_scan[:3, 3:4]).T
    size = np.array(shape)
    inside = ((voxel >= -0.5 - 1e-6) & (voxel <= size - 0.5 + 1e-6)).all(1)
    deep = ((voxel >= 1.0) & (voxel <= size - 2.0)).all(1)  # more than a scan voxel inside
    fov = grid.fov.numpy().reshape(-1)
    assert not (fov & ~inside).any(), "a grid voxel outside the scan is marked as seen"
    assert fov[deep].all(), "a grid voxel well inside the scan is marked as unseen"
    # Oblique scans leave corners of the axis-aligned grid unseen; those hold no body.
    assert not (grid.body.numpy().reshape(-1) & ~fov).any()


@pytest.mark.parametrize(
    ("bins", "scale", "offset"), [(3, 1.0, 0.0), (6, 1.0, 0.0), (10, 1.0, 0.0), (6, 3000.0, -1024.0)]
)
def test_classes_are_air_then_equal_quantiles_of_the_body(graded_body, bins, scale, offset) -> None:
    image, affine = graded_body
    grid = search_grid(image * scale + offset, affine, SPACING_MM, bins)
    classes = grid.bins.numpy()
    assert classes.min() == 0 and classes.max() == bins - 1
    # Air: world points farther than 10 mm outside the ellipsoid hold class 0.
    world = _world(tuple(grid.bins.shape), grid.affine)
    index = np.linalg.inv(affine[:3, :3]) @ (world.reshape(3, -1) - affine[:3, 3:4])
    centre, semi = (np.array(image.shape) - 1) / 2, np.array(image.shape) * 0.4
    outside = ((((index.T - centre) / (semi + 10.0 / np.diag(affine)[:3])) ** 2).sum(1) > 1).reshape(
        classes.shape
    )
    assert outside.any() and (classes[outside] == 0).all()
    assert (classes[~grid.fov.numpy()] == 0).all()
    counts = np.bincount(classes[classes > 0], minlength=bins)[1:]
    np.testing.assert_allclose(counts / counts.sum(), 1 / (bins - 1), atol=0.02)


def test_classes_do_not_depend_on_the_intensity_scale(graded_body) -> None:
    image, affine = graded_body
    reference = search_grid(image, affine, SPACING_MM, 6).bins
    hounsfield = search_grid(image * 3000.0 - 1024.0, affine, SPACING_MM, 6).bins
    assert float((reference != hounsfield).float().mean()) < 1e-3


@pytest.mark.parametrize("value", [0.0, 5.0, -1024.0])
def test_a_blank_scan_has_no_body(value) -> None:
    # No contrast at all (an empty or failed acquisition): nothing in it is body, so placement can refuse it.
    grid = search_grid(np.full((40, 40, 40), value, np.float32), np.diag([3.0, 3.0, 3.0, 1.0]), SPACING_MM, 6)
    assert int(grid.body.sum()) == 0, f"a blank scan of {value} has {int(grid.body.sum())} body voxels"


# ----- soft_tissue_window and otsu_threshold ---------------------------------------------------------------
@pytest.fixture(scope="module")
def air_and_body() -> np.ndarray:
    """Half air (0 +- 1), half body (100 +- 10), shape (20, 20, 20)."""
    rng = np.random.default_rng(3)
    values = rng.normal(0.0, 1.0, (20, 20, 20))
    values[10:] = rng.normal(100.0, 10.0, (10, 20, 20))
    return values.astype(np.float32)


@pytest.mark.parametrize(("scale", "offset"), [(1.0, 0.0), (0.01, 0.0), (20.0, -1024.0)])
def test_soft_tissue_window_clips_to_the_body_percentiles(air_and_body, scale, offset) -> None:
    values = air_and_body * scale + offset
    out = soft_tissue_window(values)
    assert out.shape == values.shape and out.dtype == np.float32
    low, high = np.percentile(values[10:], [2, 98])
    np.testing.assert_allclose([out.min(), out.max()], [low, high], rtol=1e-5)
    between = (values > low) & (values < high)
    np.testing.assert_array_equal(out[between], values[between])
    assert (out[:10] == out.min()).all()  # the air is the body's darkest value now


def _one_bright_voxel() -> np.ndarray:
    values = np.zeros((4, 4, 4))
    values[1, 2, 3] = 5.0
    return values


@pytest.mark.parametrize("values", [np.zeros((4, 4, 4)), np.full((4, 4, 4), 7.0), _one_bright_voxel()])
def test_soft_tissue_window_leaves_a_scan_without_body_percentiles_unchanged(values) -> None:
    # No contrast, or a single voxel above the threshold: no percentiles to clip to.
    out = soft_tissue_window(values)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, values)


@pytest.mark.parametrize(("air", "body"), [(0.0, 100.0), (-1000.0, 40.0), (0.1, 0.9)])
def test_otsu_threshold_falls_between_air_and_body(air, body) -> None:
    rng = np.random.default_rng(0)
    spread = (body - air) / 20
    values = np.r_[rng.normal(air, spread, 3000), rng.normal(body, spread, 1000)]
    threshold = otsu_threshold(values)
    assert air + 3 * spread < threshold < body - 3 * spread


@pytest.mark.parametrize(
    ("air", "dark", "bright"),
    [(0.0, 100.0, 600.0), (-1000.0, -100.0, 40.0), (10.0, 40.0, 1000.0)],  # an MR, a CT, a dark MR body
)
def test_air_threshold_falls_between_air_and_the_darkest_tissue(air, dark, bright) -> None:
    """Otsu alone splits the bright tissue from the rest (air and dark tissue together, on an MR); the air
    threshold falls below the dark tissue, whichever modality's scale."""
    rng = np.random.default_rng(0)
    spread = (dark - air) / 15
    values = np.r_[
        rng.normal(air, spread, 3000), rng.normal(dark, spread, 3000), rng.normal(bright, spread, 600)
    ]
    threshold = air_threshold(values)
    assert air + 3 * spread < threshold < dark - 3 * spread
    assert air_threshold(values, max_values=1000) == pytest.approx(threshold, abs=3 * spread)


@pytest.mark.parametrize("scale", [1.0, 300.0])
def test_a_scan_without_air_is_brighter_than_air_everywhere(scale) -> None:
    """One mode of intensities (a field of view inside the body, a scan of noise): Otsu cuts it in two, but
    neither half is air, so the whole scan is; a constant scan is no body at all."""
    values = np.random.default_rng(2).normal(0.0, scale, 20_000)
    assert air_threshold(values) == -np.inf
    assert air_threshold(np.full(100, 5.0)) == 5.0
    grid = search_grid(
        values.reshape(40, 25, 20).astype(np.float32), np.diag([3.0, 3.0, 3.0, 1.0]), SPACING_MM, bins=6
    )
    np.testing.assert_array_equal(grid.outline.numpy(), grid.fov.numpy())


def _dark_body_with_bright_rim(shape=(40, 40, 12)) -> np.ndarray:
    """An MR-like slab: air (0) around an elliptic body of dark tissue (100) with a bright blob (600) inside
    and a bright rim on one side only, so the bright voxels enclose nothing."""
    x, y, _ = np.indices(shape)
    inside = ((x - 20) / 16) ** 2 + ((y - 20) / 12) ** 2 <= 1
    image = np.where(inside, 100.0, 0.0)
    image[inside & (x > 30)] = 600.0
    image[16:20, 16:20] = 600.0
    return image + np.random.default_rng(1).normal(0, 3, shape)


def test_the_outline_covers_the_whole_body_where_the_otsu_body_misses_dark_tissue() -> None:
    """The outline is everything brighter than air, filled per axial slice: on a dark body with bright parts
    it is the whole body, where the Otsu body (the bright voxels) is not."""
    image = _dark_body_with_bright_rim()
    grid = search_grid(image, np.diag([3.0, 3.0, 3.0, 1.0]), SPACING_MM, bins=6)
    x, y, _ = np.indices(image.shape)
    truth = (((x - 20) / 16) ** 2 + ((y - 20) / 12) ** 2 <= 1).mean()
    fov = grid.fov.numpy()
    outline, body = grid.outline.numpy()[fov].sum(), grid.body.numpy()[fov].sum()
    # Voxel counts on the 6 mm grid against the body's volume (3 mm voxels, 8 per grid voxel).
    expected = truth * image.size / 8
    assert abs(outline - expected) < 0.15 * expected, (outline, expected)
    assert body < 0.6 * expected, (body, expected)
    assert not (grid.outline & ~grid.fov).any()


# ----- check_volume --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("array", "affine"),
    [
        (np.zeros((4, 5, 6), np.float64), np.eye(4)),
        (np.zeros((2, 2, 2), np.int16), np.diag([-0.5, 0.7, 5.0, 1.0])),
        (np.ones((3, 4, 5), np.float32), _affine((1.0, 2.0, 3.0), (10.0, 20.0, 30.0), (1e4, -1e4, 0.0))),
    ],
)
def test_check_volume_accepts_3d_finite_arrays_on_invertible_grids(array, affine) -> None:
    out, out_affine = check_volume(array, affine, "fixed")
    assert out.dtype == np.float32 and out.shape == array.shape
    assert out_affine.dtype == np.float64
    np.testing.assert_array_equal(out_affine, affine)


def _with(value: float, where: tuple[int, ...], base: np.ndarray) -> np.ndarray:
    out = base.astype(np.float64).copy()
    out[where] = value
    return out


_VOLUME = np.zeros((4, 4, 4), np.float32)


@pytest.mark.parametrize(
    ("name", "array", "affine", "match"),
    [
        ("fixed", np.zeros((4, 4), np.float32), np.eye(4), r"fixed must be a 3D array .* shape \(4, 4\)"),
        ("moving", np.zeros((1, 4, 4), np.float32), np.eye(4), r"moving must be a 3D array .* \(1, 4, 4\)"),
        ("fixed", np.zeros((2, 3, 4, 5)), np.eye(4), r"fixed must be a 3D array"),
        ("fixed", _with(np.nan, (1, 2, 3), _VOLUME), np.eye(4), r"fixed holds NaN or infinite"),
        ("moving", _with(np.inf, (0, 0, 0), _VOLUME), np.eye(4), r"moving holds NaN or infinite"),
        ("fixed", _VOLUME, np.diag([1.0, 1.0, 0.0, 1.0]), r"fixed_affine must be an invertible 4x4"),
        ("moving", _VOLUME, np.eye(3), r"moving_affine must be an invertible 4x4"),
        ("fixed", _VOLUME, _with(np.nan, (0, 3), np.eye(4)), r"fixed_affine holds NaN or infinite"),
        ("moving", _VOLUME, _with(np.inf, (2, 3), np.eye(4)), r"moving_affine holds NaN or infinite"),
        ("fixed", _VOLUME, _with(np.inf, (1, 1), np.eye(4)), r"fixed_affine"),
    ],
)
def test_check_volume_rejects_with_the_argument_named(name, array, affine, match) -> None:
    with pytest.raises(ValueError, match=match):
        check_volume(array, affine, name)
