"""warp_to() and signed_distance_mm(): masks carried through a registration, distances to their boundary."""

from __future__ import annotations

import itk
import numpy as np
import pytest

from medmeta_plugin.registration import signed_distance_mm, warp_to
from medmeta_plugin.registration.itk_bridge import LPS, to_itk
from medmeta_plugin.registration.stages import bspline_transform
from tests.registration.conftest import moved


def _translation(shift_mm: tuple[float, float, float]) -> np.ndarray:
    matrix = np.eye(4)
    matrix[:3, 3] = shift_mm
    return matrix


def _centroid_mm(mask: np.ndarray, affine: np.ndarray) -> np.ndarray:
    index = np.argwhere(mask > 0.5).mean(0)
    return (affine @ np.r_[index, 1.0])[:3]


@pytest.mark.parametrize(
    ("shift_mm", "flipped"),
    [
        ((0.0, 0.0, 0.0), False),
        ((8.0, -6.0, 10.0), False),
        ((0.0, 0.0, 0.0), True),
        ((8.0, -6.0, 10.0), True),
    ],
)
def test_warp_carries_a_mask_to_where_the_matrix_says(
    phantom: tuple[np.ndarray, ...], shift_mm: tuple[float, float, float], flipped: bool
) -> None:
    """A support scan whose content lies ``shift_mm`` away (stored in another voxel order or not), carried
    through the matrix that says so, lands on the query's own mask."""
    _, mask, affine = phantom
    if flipped:
        support, support_affine = mask[::-1].copy(), moved(mask.shape, affine, shift_mm)
    else:
        support, support_affine = mask, affine.copy()
        support_affine[:3, 3] += shift_mm
    out = warp_to(support, support_affine, mask.shape, affine, _translation(shift_mm))
    assert out.shape == mask.shape and out.dtype == np.float32
    np.testing.assert_allclose(out, mask, atol=1e-4)
    # Through the identity instead, the mask stays where the support scan has it: shift_mm away.
    stays = warp_to(support, support_affine, mask.shape, affine, np.eye(4))
    if any(shift_mm):
        np.testing.assert_allclose(
            _centroid_mm(stays, affine), _centroid_mm(mask, affine) + shift_mm, atol=1.0
        )


def test_warp_through_a_deformation_matches_itk_exact_resampling(phantom: tuple[np.ndarray, ...]) -> None:
    # warp_to samples the deformation as a displacement field every 4 voxels; ITK's own resampling through the
    # B-spline (every voxel evaluated) must give the same mask.
    _, mask, affine = phantom
    reference = to_itk(np.zeros(mask.shape, np.float32), affine)
    bspline = itk.BSplineTransform[itk.D, 3, 3].New()
    itk.BSplineTransformInitializer[type(bspline), itk.Image[itk.F, 3]].New(
        Transform=bspline, Image=reference, TransformDomainMeshSize=[3] * 3
    ).InitializeTransform()
    rng = np.random.default_rng(0)
    parameters = rng.uniform(-4.0, 4.0, bspline.GetNumberOfParameters())  # control points moved up to 4 mm
    deformation = (np.array(bspline.GetFixedParameters()), parameters)
    matrix = _translation((2.0, -1.0, 3.0))
    fast = warp_to(mask, affine, mask.shape, affine, matrix, deformation)

    lps = LPS @ matrix @ LPS
    linear = itk.AffineTransform[itk.D, 3].New()
    linear.SetMatrix(itk.matrix_from_array(np.ascontiguousarray(lps[:3, :3])))
    linear.SetTranslation([float(t) for t in lps[:3, 3]])
    composite = itk.CompositeTransform[itk.D, 3].New()
    composite.AddTransform(linear)
    composite.AddTransform(bspline_transform(*deformation))
    exact = itk.resample_image_filter(
        to_itk(mask, affine), transform=composite, reference_image=reference, use_reference_image=True
    )
    assert np.abs(fast - mask).max() > 0.5, "the deformation moves the mask"
    np.testing.assert_allclose(fast, itk.array_from_image(exact).transpose(2, 1, 0), atol=0.05)


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (0.5, 1.0, 2.0)])
def test_signed_distance_is_in_mm_and_negative_inside(spacing: tuple[float, float, float]) -> None:
    affine = np.diag([*spacing, 1.0])
    shape = tuple(int(round(40 / s)) for s in spacing)
    grid = np.stack(np.meshgrid(*[np.arange(n) * s for n, s in zip(shape, spacing)], indexing="ij"), -1)
    ball = np.linalg.norm(grid - 20.0, axis=-1) < 10.0
    distance = signed_distance_mm(ball, affine)
    centre = tuple(int(round(20 / s)) for s in spacing)
    assert distance.shape == ball.shape and distance.dtype == np.float32
    assert (distance[ball] <= 0).all() and (distance[~ball] > 0).all()
    # 10 mm deep, less up to one voxel (the outermost voxels are at 0): in voxels it would read 4 to 20.
    assert -10.5 < distance[centre] < -7.5
    assert np.isinf(signed_distance_mm(np.zeros((4, 4, 4)), np.eye(4))).all()
    assert (signed_distance_mm(np.ones((4, 4, 4)), np.eye(4)) == -np.inf).all()  # all inside, no boundary


@pytest.mark.parametrize("seed", range(6))
def test_a_limited_signed_distance_is_the_whole_map_clipped(seed: int) -> None:
    """With ``limit_mm`` the map is computed in the mask's grown bounding box only: it must equal the whole
    map clipped, for small and large structures, near the grid's edges and away from them."""
    rng = np.random.default_rng(seed)
    spacing = tuple(rng.uniform(0.5, 3.0, 3))
    shape = tuple(int(n) for n in rng.integers(12, 40, 3))
    mask = np.zeros(shape, dtype=bool)
    lo = [int(rng.integers(0, n - 2)) for n in shape]
    hi = [int(rng.integers(a + 1, min(n, a + 12) + 1)) for a, n in zip(lo, shape)]
    mask[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] = True
    mask &= rng.random(shape) > 0.1  # holes: boundaries inside the box too
    affine = np.diag([*spacing, 1.0])
    limit = float(rng.uniform(2.0, 20.0))
    whole = signed_distance_mm(mask, affine)
    limited = signed_distance_mm(mask, affine, limit_mm=limit)
    np.testing.assert_allclose(limited, np.clip(whole, -limit, limit), atol=1e-5)
    assert (signed_distance_mm(np.zeros((4, 4, 4)), np.eye(4), limit_mm=5.0) == 5.0).all()
    with pytest.raises(ValueError, match="limit_mm"):
        signed_distance_mm(mask, affine, limit_mm=0.0)


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (0.7, 1.5, 3.0)])
def test_signed_distance_equals_itks_signed_maurer_map(spacing: tuple[float, float, float]) -> None:
    """SciPy's transform stands in for ITK's (whose modules take seconds to load): the same map."""
    rng = np.random.default_rng(3)
    mask = np.zeros((24, 20, 16), dtype=bool)
    mask[4:18, 5:15, 3:11] = True
    mask[rng.random(mask.shape) < 0.03] = True  # specks and holes: many small boundaries
    mask[rng.random(mask.shape) < 0.03] = False
    mask[:, :, -1] |= mask[:, :, -2]  # the mask touches the grid's edge
    affine = np.diag([*spacing, 1.0])
    image = itk.cast_image_filter(
        to_itk(mask.astype(np.float32), affine), ttype=(itk.Image[itk.F, 3], itk.Image[itk.UC, 3])
    )
    reference = itk.signed_maurer_distance_map_image_filter(
        image, use_image_spacing=True, squared_distance=False, inside_is_positive=False
    )
    expected = itk.array_from_image(reference).transpose(2, 1, 0)  # ITK's (z, y, x) -> (x, y, z)
    np.testing.assert_allclose(signed_distance_mm(mask, affine), expected, atol=1e-4)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"moving": np.zeros((4, 4))}, "3D array"),
        ({"moving_affine": np.zeros((4, 4))}, "invertible"),
        ({"moving": np.full((4, 4, 4), np.inf)}, "infinite"),
        ({"matrix": np.eye(3)}, "4x4"),
    ],
)
def test_bad_warp_input_is_rejected(kwargs: dict, match: str) -> None:
    args = {
        "moving": np.zeros((4, 4, 4)),
        "moving_affine": np.eye(4),
        "fixed_shape": (4, 4, 4),
        "fixed_affine": np.eye(4),
        "matrix": np.eye(4),
    }
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        warp_to(**args)
