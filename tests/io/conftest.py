"""Synthetic volumes and geometry shared by the io tests: small, anisotropic, rotated, flipped, off-origin.

Helpers are handed out as fixtures (``make_meta``, ``world_grid``, ``same_geometry``) rather than imported,
so the tests do not depend on how pytest names this conftest module.
"""

from __future__ import annotations

import numpy as np
import pytest

from medmeta_plugin.io import ImageMeta

SHAPE = (12, 10, 8)
SPACING = (0.8, 0.9, 3.0)
ORIGIN = (10.5, -20.25, 33.0)


def _rotation_z(degrees: float) -> np.ndarray:
    """Rotation about the world z axis, shape (3, 3)."""
    angle = np.deg2rad(degrees)
    cos, sin = np.cos(angle), np.sin(angle)
    return np.array([[cos, -sin, 0.0], [sin, cos, 0.0], [0.0, 0.0, 1.0]])


def _make_meta(
    direction: np.ndarray | None = None,
    spacing: tuple[float, float, float] = SPACING,
    origin: tuple[float, float, float] = ORIGIN,
    shape: tuple[int, int, int] = SHAPE,
    source: str = "synthetic",
) -> ImageMeta:
    """ImageMeta from a direction (3, 3) whose columns are the axes; default: x, z flipped, 30 deg about z."""
    if direction is None:
        direction = _rotation_z(30.0) @ np.diag([-1.0, 1.0, -1.0])
    affine = np.eye(4)
    affine[:3, :3] = np.asarray(direction) * np.asarray(spacing)[None, :]
    affine[:3, 3] = origin
    return ImageMeta.from_affine(affine, shape, source=source)


def _world_grid(meta: ImageMeta) -> np.ndarray:
    """World (RAS, mm) coordinates of every voxel centre, shape (3, X, Y, Z)."""
    index = np.stack(np.meshgrid(*[np.arange(n) for n in meta.shape], indexing="ij")).astype(np.float64)
    return np.einsum("ab,bxyz->axyz", meta.affine[:3, :3], index) + meta.affine[:3, 3, None, None, None]


def _assert_same_geometry(actual: ImageMeta, expected: ImageMeta, atol: float = 1e-5) -> None:
    """Shape equal; spacing, origin and direction equal to ``atol`` (float32 storage in NIfTI)."""
    assert tuple(actual.shape) == tuple(expected.shape)
    np.testing.assert_allclose(actual.spacing, expected.spacing, atol=atol)
    np.testing.assert_allclose(actual.origin, expected.origin, atol=atol)
    np.testing.assert_allclose(actual.direction, expected.direction, atol=atol)


@pytest.fixture
def make_meta():
    """The ImageMeta factory ``(direction=None, spacing, origin, shape, source) -> ImageMeta``."""
    return _make_meta


@pytest.fixture
def rotation_z():
    """``degrees -> (3, 3)`` rotation about the world z axis."""
    return _rotation_z


@pytest.fixture
def world_grid():
    """``meta -> (3, X, Y, Z)`` world coordinates of the voxel centres."""
    return _world_grid


@pytest.fixture
def same_geometry():
    """``(actual, expected, atol=1e-5) -> None``: assert two ImageMeta describe the same grid."""
    return _assert_same_geometry


@pytest.fixture
def meta() -> ImageMeta:
    """Default geometry: spacing (0.8, 0.9, 3.0) mm, rotated and flipped, origin away from 0."""
    return _make_meta()


@pytest.fixture
def volume() -> np.ndarray:
    """Integer-valued CT-like volume, shape (X, Y, Z) = (12, 10, 8), float32, values in [-1000, 2000)."""
    return np.random.default_rng(0).integers(-1000, 2000, SHAPE).astype(np.float32)


@pytest.fixture
def smooth(meta: ImageMeta) -> np.ndarray:
    """A smooth function of world position on ``meta``'s grid, shape (1, X, Y, Z), float32."""
    x, y, z = _world_grid(meta)
    return (np.sin(x / 15.0) + np.cos(y / 12.0) + z / 40.0).astype(np.float32)[None]


@pytest.fixture
def label(smooth: np.ndarray) -> np.ndarray:
    """Label map with classes 0, 1, 3 on ``meta``'s grid, shape (1, X, Y, Z), uint8."""
    return ((smooth > 0.6).astype(np.uint8) + 2 * (smooth > 1.2)).astype(np.uint8)
