"""ImageMeta: the affine is direction times spacing plus origin, ``from_affine`` inverts it for any rotated,
flipped, anisotropic grid, and an affine that is not 4x4, not 3D or not invertible is refused by name."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from medmeta_plugin.io import ImageMeta


def _rotation(angles_deg: tuple[float, float, float]) -> np.ndarray:
    """Rotation about x, then y, then z (degrees), shape (3, 3)."""
    ax, ay, az = np.deg2rad(angles_deg)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _affine(direction: np.ndarray, spacing: tuple[float, ...], origin: tuple[float, ...]) -> np.ndarray:
    affine = np.eye(4)
    affine[:3, :3] = direction * np.asarray(spacing)[None, :]
    affine[:3, 3] = origin
    return affine


def test_affine_maps_a_voxel_index_to_its_world_point() -> None:
    # Array axis 0 runs along world -y, axis 1 along +z, axis 2 along +x (a permuted, flipped grid).
    direction = ((0.0, 0.0, 1.0), (-1.0, 0.0, 0.0), (0.0, 1.0, 0.0))
    meta = ImageMeta((2.0, 3.0, 4.0), (10.0, 20.0, 30.0), direction, (5, 6, 7))
    affine = meta.affine
    assert affine.shape == (4, 4) and affine.dtype == np.float64
    np.testing.assert_array_equal(affine[3], [0.0, 0.0, 0.0, 1.0])
    # Voxel (1, 2, 3): 1 * 2 mm along -y, 2 * 3 mm along +z, 3 * 4 mm along +x.
    np.testing.assert_allclose(affine @ [1, 2, 3, 1], [10.0 + 12.0, 20.0 - 2.0, 30.0 + 6.0, 1.0])
    np.testing.assert_allclose(affine @ [0, 0, 0, 1], [10.0, 20.0, 30.0, 1.0])


def test_affine_is_a_new_array_each_time() -> None:
    meta = ImageMeta((1.0, 1.0, 1.0), (0.0, 0.0, 0.0), ((1, 0, 0), (0, 1, 0), (0, 0, 1)), (2, 2, 2))
    meta.affine[0, 3] = 99.0
    assert meta.affine[0, 3] == 0.0


@settings(max_examples=30, deadline=None)
@given(
    angles=st.tuples(*[st.floats(-180, 180)] * 3),
    spacing=st.tuples(*[st.floats(0.05, 8.0)] * 3),
    origin=st.tuples(*[st.floats(-500, 500)] * 3),
    flips=st.tuples(*[st.sampled_from([-1.0, 1.0])] * 3),
    shape=st.tuples(*[st.integers(1, 600)] * 3),
)
def test_from_affine_inverts_affine(
    angles: tuple, spacing: tuple, origin: tuple, flips: tuple, shape: tuple
) -> None:
    """Any rotation, flip, anisotropic spacing and origin: from_affine recovers them; .affine rebuilds A."""
    direction = _rotation(angles) @ np.diag(flips)
    affine = _affine(direction, spacing, origin)
    meta = ImageMeta.from_affine(affine, shape)
    np.testing.assert_allclose(meta.spacing, spacing, rtol=1e-12)
    np.testing.assert_allclose(meta.origin, origin, rtol=0, atol=1e-12)
    np.testing.assert_allclose(meta.direction, direction, atol=1e-12)
    np.testing.assert_allclose(np.linalg.norm(meta.direction, axis=0), 1.0, atol=1e-12)
    np.testing.assert_allclose(meta.affine, affine, atol=1e-9)
    assert meta.shape == shape
    again = ImageMeta.from_affine(meta.affine, meta.shape)
    np.testing.assert_allclose(again.spacing, meta.spacing, rtol=1e-12)
    np.testing.assert_allclose(again.direction, meta.direction, atol=1e-12)


def test_from_affine_gives_plain_python_tuples_and_copies_extra() -> None:
    extra = {"modality": "CT"}
    meta = ImageMeta.from_affine(np.diag([2, 3, 4, 1]).tolist(), (np.int64(5), 6, 7), "scan.nii", extra)
    assert meta.spacing == (2.0, 3.0, 4.0) and all(type(v) is float for v in meta.spacing)
    assert meta.shape == (5, 6, 7) and all(type(v) is int for v in meta.shape)
    assert meta.direction == ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0))
    assert meta.source == "scan.nii" and meta.extra == {"modality": "CT"}
    extra["modality"] = "MR"  # the caller's dict is not shared
    assert meta.extra == {"modality": "CT"}
    assert ImageMeta.from_affine(np.eye(4), (1, 1, 1)).extra == {}


def test_extra_is_not_part_of_equality_and_meta_is_frozen() -> None:
    a = ImageMeta.from_affine(np.eye(4), (2, 2, 2), "a", {"SeriesInstanceUID": "1.2"})
    b = ImageMeta.from_affine(np.eye(4), (2, 2, 2), "a", {"SeriesInstanceUID": "9.9"})
    assert a == b
    assert a != ImageMeta.from_affine(np.diag([1, 1, 2, 1]), (2, 2, 2), "a")
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.spacing = (1.0, 1.0, 1.0)  # type: ignore[misc]


def _with(row: int, col: int, value: float) -> np.ndarray:
    affine = np.eye(4)
    affine[row, col] = value
    return affine


INVALID = [
    pytest.param(
        np.eye(3), (2, 2, 2), "scan.nii", r"scan\.nii: affine must be 4x4, got shape \(3, 3\)", id="3x3"
    ),
    pytest.param(np.eye(4)[:3], (2, 2, 2), "", r"image: affine must be 4x4, got shape \(3, 4\)", id="3x4"),
    pytest.param(
        np.eye(4), (4, 5), "scan.nii", r"scan\.nii: expected a 3D spatial shape, got \(4, 5\)", id="2d"
    ),
    pytest.param(
        np.eye(4), (1, 4, 5, 6), "", r"image: expected a 3D spatial shape, got \(1, 4, 5, 6\)", id="4d"
    ),
    pytest.param(_with(1, 1, 0.0), (2, 2, 2), "s", r"s: affine is singular or not finite", id="zero-column"),
    pytest.param(_with(0, 2, np.nan), (2, 2, 2), "s", r"s: affine is singular or not finite", id="nan"),
    pytest.param(_with(2, 2, np.inf), (2, 2, 2), "s", r"s: affine is singular or not finite", id="inf"),
]


@pytest.mark.parametrize(("affine", "shape", "source", "match"), INVALID)
def test_invalid_affines_are_refused_naming_the_source(
    affine: np.ndarray, shape: tuple[int, ...], source: str, match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        ImageMeta.from_affine(affine, shape, source=source)


def test_a_rank_deficient_affine_is_refused() -> None:
    affine = np.eye(4)
    affine[:3, 1] = (1.0, 0.0, 0.0)  # axis 1 runs along axis 0: every column non-zero, determinant 0
    with pytest.raises(ValueError, match="singular"):
        ImageMeta.from_affine(affine, (2, 2, 2), source="flat.nii")
