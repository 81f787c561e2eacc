"""The ITK bridge: RAS <-> LPS, arrays <-> ITK images on flipped and tilted grids, rigid matrices <-> Euler
transforms, and ITK's thread setting restored."""

from __future__ import annotations

import itk
import numpy as np
import pytest

from medmeta_plugin.registration.itk_bridge import (
    LPS,
    deterministic_registration,
    euler_from_matrix,
    from_itk,
    matrix_from_transform,
    shrunk,
    to_itk,
)
from medmeta_plugin.registration.placement import rotation_matrix


def _rigid(rotation_deg, translation) -> np.ndarray:
    matrix = np.eye(4)
    matrix[:3, :3] = rotation_matrix(rotation_deg)
    matrix[:3, 3] = translation
    return matrix


def _affine(spacing, rotation_deg=(0.0, 0.0, 0.0), origin=(0.0, 0.0, 0.0)) -> np.ndarray:
    affine = np.eye(4)
    affine[:3, :3] = rotation_matrix(rotation_deg) * np.asarray(spacing)[None, :]
    affine[:3, 3] = origin
    return affine


@pytest.fixture(scope="module")
def volume() -> np.ndarray:
    """Distinct values in every voxel, shape (5, 6, 7): any misplaced voxel shows."""
    return np.random.default_rng(0).normal(size=(5, 6, 7)).astype(np.float32)


def test_lps_is_its_own_inverse() -> None:
    np.testing.assert_array_equal(LPS @ LPS, np.eye(4))
    matrix = _rigid((10.0, -20.0, 5.0), (3.0, 4.0, 5.0))
    np.testing.assert_allclose(LPS @ (LPS @ matrix @ LPS) @ LPS, matrix, atol=1e-12)


# ----- rigid matrices <-> Euler transforms ------------------------------------------------------------------
RIGID = [
    ((0.0, 0.0, 0.0), (0.0, 0.0, 0.0), (0.0, 0.0, 0.0)),
    ((0.0, 0.0, 0.0), (12.0, -7.0, 150.0), (0.0, 0.0, 0.0)),  # a pure translation
    ((20.0, 0.0, 0.0), (0.0, 0.0, 0.0), (0.0, 0.0, 0.0)),  # about R (a head's nod)
    ((0.0, -15.0, 8.0), (-30.0, 5.0, 2.0), (-50.0, 20.0, 300.0)),  # about an off-origin centre
    ((35.0, 40.0, -25.0), (100.0, -100.0, 60.0), (10.0, -10.0, 0.0)),  # large, every axis
    ((0.0, 0.0, 179.0), (1.0, 2.0, 3.0), (5.0, 5.0, 5.0)),  # nearly a half turn
]


@pytest.mark.parametrize(("rotation_deg", "translation", "centre"), RIGID)
def test_euler_from_matrix_round_trips_through_matrix_from_transform(
    rotation_deg, translation, centre
) -> None:
    matrix = _rigid(rotation_deg, translation)
    euler = euler_from_matrix(matrix, np.asarray(centre))
    np.testing.assert_allclose(matrix_from_transform(euler), matrix, atol=1e-9)
    np.testing.assert_allclose(LPS[:3, :3] @ np.asarray(centre), np.asarray(euler.GetCenter()), atol=1e-9)


@pytest.mark.parametrize(("rotation_deg", "translation", "centre"), RIGID)
def test_matrix_maps_ras_points_as_itk_maps_lps_points(rotation_deg, translation, centre) -> None:
    matrix = _rigid(rotation_deg, translation)
    euler = euler_from_matrix(matrix, np.asarray(centre))
    for point in ([0.0, 0.0, 0.0], [30.0, -40.0, 120.0], [-75.5, 12.25, -8.0]):
        lps = LPS[:3, :3] @ np.asarray(point)
        moved = LPS[:3, :3] @ np.asarray(euler.TransformPoint([float(x) for x in lps]))
        np.testing.assert_allclose(moved, (matrix @ np.r_[point, 1.0])[:3], atol=1e-9)


@pytest.mark.parametrize("scale", [(1.1, 1.1, 1.1), (0.9, 1.0, 1.2)])
def test_euler_from_matrix_keeps_the_nearest_rotation_of_a_scaled_matrix(scale) -> None:
    rigid = _rigid((10.0, 20.0, -5.0), (4.0, 5.0, 6.0))
    scaled = rigid.copy()
    scaled[:3, :3] = rigid[:3, :3] @ np.diag(scale)
    result = matrix_from_transform(euler_from_matrix(scaled, np.zeros(3)))
    np.testing.assert_allclose(result[:3, :3] @ result[:3, :3].T, np.eye(3), atol=1e-9)
    np.testing.assert_allclose(result[:3, :3], rigid[:3, :3], atol=0.02)
    np.testing.assert_allclose(result[:3, 3], rigid[:3, 3], atol=1e-9)


# ----- arrays <-> ITK images ------------------------------------------------------------------------------
GRIDS = [
    ((1.0, 1.0, 1.0), (0.0, 0.0, 0.0), (0.0, 0.0, 0.0)),  # RAS
    ((-0.8, -0.8, 3.0), (0.0, 0.0, 0.0), (120.0, 100.0, -40.0)),  # LPS voxel order (DICOM)
    ((1.5, -2.0, -3.0), (0.0, 0.0, 0.0), (-10.0, 20.0, 30.0)),  # y and z reversed
    ((0.7, 0.7, 5.0), (15.0, -10.0, 30.0), (3.0, -4.0, 5.0)),  # tilted
]


@pytest.mark.parametrize(("spacing", "rotation_deg", "origin"), GRIDS)
def test_to_itk_and_back_returns_the_array_on_its_world_grid(volume, spacing, rotation_deg, origin) -> None:
    affine = _affine(spacing, rotation_deg, origin)
    image = to_itk(volume, affine)
    np.testing.assert_array_equal(from_itk(image, volume.shape), volume)
    assert tuple(itk.size(image)) == volume.shape  # ITK's (i, j, k) are the array's (X, Y, Z)
    view = itk.array_view_from_image(image)  # ITK's NumPy view is (Z, Y, X)
    for index in [(0, 0, 0), (4, 0, 6), (1, 5, 2)]:
        assert view[index[::-1]] == volume[index]
        world = LPS[:3, :3] @ np.asarray(image.TransformIndexToPhysicalPoint([int(i) for i in index]))
        np.testing.assert_allclose(world, (affine @ np.r_[index, 1.0])[:3], atol=1e-6)


@pytest.mark.parametrize(("factor", "expected"), [(1, (5, 6, 7)), (2, (5, 6, 7)), (3, (5, 6, 7))])
def test_shrunk_keeps_at_least_four_voxels_per_axis(volume, factor, expected) -> None:
    affine = _affine((1.0, 2.0, 3.0), origin=(10.0, 20.0, 30.0))
    out = shrunk(to_itk(volume, affine), factor)
    assert tuple(itk.size(out)) == expected
    factors = np.array([factor if n >= 4 * factor else 1 for n in volume.shape])
    np.testing.assert_allclose(np.asarray(itk.spacing(out)), np.array([1.0, 2.0, 3.0]) * factors)


@pytest.mark.parametrize(
    ("shape", "factor", "expected"),
    [((16, 9, 7), 2, (8, 4, 7)), ((16, 12, 40), 4, (4, 12, 10)), ((8, 8, 8), 2, (4, 4, 4))],
)
def test_shrunk_shrinks_the_axes_that_keep_four_voxels(shape, factor, expected) -> None:
    volume = np.random.default_rng(1).normal(size=shape).astype(np.float32)
    out = shrunk(to_itk(volume, _affine((1.0, 2.0, 3.0))), factor)
    assert tuple(itk.size(out)) == expected


@pytest.mark.parametrize("thickness", [2, 3])  # a 3D scan has at least 2 voxels per axis
def test_shrunk_smooths_a_slab_thinner_than_four_voxels(thickness) -> None:
    # ITK's recursive Gaussian refuses axes under 4 voxels; a 20 mm slab at 6 mm slices has 3.
    volume = np.random.default_rng(0).normal(size=(20, 18, thickness)).astype(np.float32)
    out = shrunk(to_itk(volume, _affine((3.0, 3.0, 6.0))), 2)
    assert tuple(itk.size(out)) == (10, 9, thickness)
    smoothed = itk.array_from_image(out)
    assert np.isfinite(smoothed).all() and smoothed.std() < volume.std()


def test_deterministic_registration_runs_itk_on_one_thread_and_restores_the_setting() -> None:
    threader = itk.MultiThreaderBase
    before = threader.GetGlobalDefaultNumberOfThreads()
    with deterministic_registration():
        assert threader.GetGlobalDefaultNumberOfThreads() == 1
    assert threader.GetGlobalDefaultNumberOfThreads() == before
    with pytest.raises(RuntimeError, match="inside"), deterministic_registration():
        raise RuntimeError("inside")
    assert threader.GetGlobalDefaultNumberOfThreads() == before


# ----- invalid ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("call", "error"),
    [
        (lambda: euler_from_matrix(np.eye(3), np.zeros(3)), ValueError),  # not 4x4
        (lambda: euler_from_matrix(np.full((4, 4), np.nan), np.zeros(3)), np.linalg.LinAlgError),
        (lambda: from_itk(to_itk(np.zeros((4, 4, 4)), np.eye(4)), (4, 4, 5)), ValueError),  # wrong shape
        (lambda: shrunk(to_itk(np.zeros((4, 4, 4)), np.eye(4)), 0), RuntimeError),  # no smoothing at 0
    ],
    ids=["matrix-3x3", "matrix-nan", "from-itk-shape", "shrink-by-0"],
)
def test_bridge_refuses_what_it_cannot_convert(call, error) -> None:
    with pytest.raises(error):
        call()
