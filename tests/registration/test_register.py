"""register(): placement, then the rigid, affine and B-spline stages, on phantoms moved and scaled by known
transforms."""

from __future__ import annotations

import itk
import numpy as np
import pytest
from scipy import ndimage

from medmeta_plugin.registration import (
    Registration,
    deterministic_registration,
    register,
    soft_tissue_window,
    warp_to,
)
from tests.registration.conftest import dice, moved

# A fixed point p is seen at p + SHIFT in the moved scan.
SHIFT = (8.0, -6.0, 10.0)


@pytest.fixture(scope="module")
def shifted(phantom: tuple[np.ndarray, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The phantom stored flipped along x with its world moved by SHIFT: image, mask and matrix."""
    image, mask, affine = phantom
    return image[::-1].copy(), mask[::-1].copy(), moved(image.shape, affine, SHIFT)


@pytest.mark.parametrize("transform", ["rigid", "affine"])
def test_registration_recovers_a_shift_across_orientations(
    phantom: tuple[np.ndarray, ...], shifted: tuple[np.ndarray, ...], transform: str
) -> None:
    image, mask, affine = phantom
    moving, moving_mask, moving_affine = shifted
    result = register(image, affine, moving, moving_affine, transform=transform)
    probe = np.array([10.0, -4.0, 6.0, 1.0])
    # The placement is sure and within a voxel of its 6 mm search grid; the local stages finish at 2x the
    # 2 mm voxels, so their error stays under one of those 4 mm voxels.
    assert result.sure and result.placement is not None and result.placement.sure
    assert np.linalg.norm((result.placement.matrix @ probe)[:3] - probe[:3] - SHIFT) < 6.0
    np.testing.assert_allclose((result.matrix @ probe)[:3], probe[:3] + SHIFT, atol=3.0)
    assert result.seconds >= result.placement.seconds > 0
    carried = warp_to(moving_mask, moving_affine, image.shape, affine, result.matrix) > 0.5
    unregistered = warp_to(moving_mask, moving_affine, image.shape, affine, np.eye(4)) > 0.5
    assert dice(carried, mask > 0.5) > 0.8
    assert dice(unregistered, mask > 0.5) < dice(carried, mask > 0.5) - 0.3


def test_a_given_start_skips_the_placement(phantom: tuple[np.ndarray, ...], shifted: tuple) -> None:
    image, _, affine = phantom
    moving, _, moving_affine = shifted
    truth = np.eye(4)
    truth[:3, 3] = SHIFT
    result = register(image, affine, moving, moving_affine, transform="rigid", initial=truth)
    assert result.placement is None and result.sure  # nothing was placed, so nothing is flagged unsure
    np.testing.assert_allclose(result.matrix[:3, 3], SHIFT, atol=3.0)


@pytest.fixture(scope="module")
def enlarged(phantom: tuple[np.ndarray, ...]) -> tuple[np.ndarray, np.ndarray, Registration, Registration]:
    """The phantom as another, 15% larger patient (the same voxels at 2.3 mm, shifted): its mask, and the
    rigid and the affine registration of it onto the phantom."""
    image, mask, affine = phantom
    moving_affine = np.diag([2.3, 2.3, 2.3, 1.0])
    moving_affine[:3, 3] = -48.0 * 1.15 + np.array([6.0, -4.0, 8.0])
    rigid = register(image, affine, image, moving_affine, transform="rigid")
    scaled = register(image, affine, image, moving_affine, transform="affine")
    return moving_affine, mask, rigid, scaled


def test_affine_registration_recovers_a_size_difference(
    phantom: tuple[np.ndarray, ...], enlarged: tuple
) -> None:
    image, mask, affine = phantom
    moving_affine, moving_mask, rigid, scaled = enlarged
    assert rigid.transform == "rigid" and scaled.transform == "affine"
    np.testing.assert_allclose(np.linalg.svd(scaled.matrix[:3, :3], compute_uv=False), 1.15, atol=0.05)
    assert scaled.metric <= rigid.metric

    def carried(result: Registration) -> float:
        out = warp_to(moving_mask, moving_affine, image.shape, affine, result.matrix) > 0.5
        return dice(out, mask > 0.5)

    # The finest level works at 2x the 2 mm voxels: a 5 mm sphere keeps a voxel of error (0.75 measured,
    # 0.64 rigid).
    assert carried(scaled) > 0.7
    assert carried(scaled) > carried(rigid) + 0.05


def test_an_implausible_affine_stage_is_rejected(phantom: tuple[np.ndarray, ...], enlarged: tuple) -> None:
    image, _, affine = phantom
    moving_affine, _, rigid, _ = enlarged
    # The true scale, 1.15, exceeds the bound: the rigid result is kept, as it would be for a degenerate fit.
    result = register(image, affine, image, moving_affine, transform="affine", max_scale=1.1)
    assert result.transform == "rigid"
    np.testing.assert_allclose(result.matrix, rigid.matrix, atol=1e-6)


def test_deterministic_registration_repeats_exactly(phantom: tuple[np.ndarray, ...]) -> None:
    image, _, affine = phantom
    moving_affine = np.diag([2.3, 2.3, 2.3, 1.0])
    moving_affine[:3, 3] = -55.2
    before = itk.MultiThreaderBase.GetGlobalDefaultNumberOfThreads()
    with deterministic_registration():
        assert itk.MultiThreaderBase.GetGlobalDefaultNumberOfThreads() == 1
        first, second = (register(image, affine, image, moving_affine) for _ in range(2))
    assert itk.MultiThreaderBase.GetGlobalDefaultNumberOfThreads() == before
    np.testing.assert_array_equal(first.matrix, second.matrix)
    assert first.metric == second.metric
    assert first.placement.confidence == second.placement.confidence


def _bulged(image: np.ndarray, mask: np.ndarray, shift_mm: float) -> tuple[np.ndarray, np.ndarray]:
    """The phantom with its first structure's neighbourhood pushed ``shift_mm`` along x and the rest of the
    body left in place: a deformation no global transform undoes."""
    centre = np.argwhere(mask > 0.5).mean(0)
    grid = np.indices(image.shape, dtype=np.float64)
    weight = np.exp(-((grid - centre[:, None, None, None]) ** 2).sum(0) / (2 * 6.0**2))
    grid[0] -= weight * shift_mm / 2.0  # voxels of 2 mm; pulling the sample point back pushes content on
    moved_image = ndimage.map_coordinates(image, grid, order=1, mode="nearest")
    return moved_image.astype(np.float32), ndimage.map_coordinates(mask, grid, order=1)


def test_bspline_stage_follows_a_local_deformation(phantom: tuple[np.ndarray, ...]) -> None:
    image, mask, affine = phantom
    moving, moving_mask = _bulged(image, mask, shift_mm=8.0)
    with deterministic_registration():
        global_fit = register(image, affine, moving, affine, transform="affine")
        deformed = register(image, affine, moving, affine, transform="bspline")
        again = register(image, affine, moving, affine, transform="bspline")
    assert global_fit.bspline is None and deformed.transform == "bspline" and deformed.bspline is not None
    np.testing.assert_array_equal(deformed.bspline[1], again.bspline[1])  # repeats on one ITK thread

    def carried(result: Registration) -> float:
        out = warp_to(moving_mask, affine, image.shape, affine, result.matrix, result.bspline)
        return dice(out > 0.5, mask > 0.5)

    assert carried(deformed) > carried(global_fit) + 0.05


def test_soft_tissue_window_ignores_air_and_bone() -> None:
    rng = np.random.default_rng(0)
    volume = np.full((20, 20, 20), -1000.0, np.float32)  # air
    volume[4:16, 4:16, 4:16] = rng.normal(40.0, 10.0, (12, 12, 12))  # soft tissue
    volume[9:11, 9:11, 9:11] = 1500.0  # a little bone
    window = soft_tissue_window(volume)
    assert -20 < window.min() < 40 and 40 < window.max() < 100


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"fixed": np.zeros((4, 4))}, "3D array"),
        ({"fixed_affine": np.zeros((4, 4))}, "invertible"),
        ({"moving": np.full((4, 4, 4), np.nan)}, "NaN"),
        ({"iterations": 0}, "iterations"),
        ({"transform": "demons"}, "unknown transform"),
        ({"max_scale": 1.0}, "max_scale"),
        ({"initial": np.eye(3)}, "initial"),
        ({}, "needs a body"),  # two empty scans: nothing to place
    ],
)
def test_bad_input_is_rejected(kwargs: dict, match: str) -> None:
    args = {
        "fixed": np.zeros((4, 4, 4)),
        "fixed_affine": np.eye(4),
        "moving": np.zeros((4, 4, 4)),
        "moving_affine": np.eye(4),
    }
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        register(**args)
