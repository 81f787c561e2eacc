"""Fixtures of the registration tests: a phantom scan and the same scan stored in other orientations."""

from __future__ import annotations

import numpy as np
import pytest

from medmeta_plugin.episodes import make_case


def make_phantom() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A 48^3 phantom at 2 mm in RAS and the mask of its first structure.

    Returns:
        image (X, Y, Z) float32, mask (X, Y, Z) float32 in {0, 1}, and the 4x4 voxel-to-world matrix.
    """
    case = make_case(["sphere_bright", "box_bright_striped", "rounded_box_dark"], seed=3)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] = (-48.0, -48.0, -48.0)
    return case.image[0], (case.label[0] == 1).astype(np.float32), affine


def moved(shape: tuple[int, ...], affine: np.ndarray, shift_mm: tuple[float, float, float]) -> np.ndarray:
    """The matrix of the same voxels stored flipped along x (LAS), with the world moved by ``shift_mm``: for
    ``array[::-1]`` it gives a scan whose content lies ``shift_mm`` away in world space, in another
    orientation."""
    flip = np.eye(4)
    flip[0, 0], flip[0, 3] = -1.0, shape[0] - 1
    out = affine @ flip
    out[:3, 3] += shift_mm
    return out


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / max(a.sum() + b.sum(), 1))


@pytest.fixture(scope="module")
def phantom() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return make_phantom()
