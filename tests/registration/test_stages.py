"""The local stages on their own, on block-averaged levels of the registration phantom moved by known maps.

- :func:`optimise` recovers known translations to a fraction of a voxel of the level it runs on, and small
  rotations as far as its ``relaxation`` lets it; it stays at the truth when started there, moves the
  transform in place and returns the metric where it stopped; its first step is ``step_mm`` long; sampling
  is seeded and a cap above the voxel count changes nothing; a slab thinner than 4 voxels is optimised too;
  no overlap is ITK's ``RuntimeError``.
- :func:`affine_stage` starts where the rigid stage ended (its centre, matrix and translation) without
  touching it, recovers a difference in size the rigid stage cannot, and gives None where ITK fails.
- :func:`bspline_transform` keeps its parameters exactly and, with every control point moved alike, moves
  every point of its domain alike.
- :func:`bspline_stage` fits :data:`BSPLINE_MESH` cells per axis over the query scan, follows a local
  deformation no global transform undoes, improves the metric, repeats exactly on one ITK thread, and gives
  None where ITK fails.

A level here is the phantom averaged over blocks of ``factor``^3 voxels, each block's value placed at its
centre, so a moved scan (the same voxels under another voxel-to-world matrix) has an exact truth. The
product's own levels (:class:`~medmeta_plugin.registration.pyramid.Pyramid`) are not exact in that sense:
see :func:`test_the_product_levels_of_a_moved_copy_keep_the_truth_as_optimum`.
"""

from __future__ import annotations

import itk
import numpy as np
import pytest
from scipy import ndimage

from medmeta_plugin.registration import deterministic_registration
from medmeta_plugin.registration.itk_bridge import LPS, euler_from_matrix, matrix_from_transform, to_itk
from medmeta_plugin.registration.placement import rotation_matrix
from medmeta_plugin.registration.pyramid import Pyramid
from medmeta_plugin.registration.stages import (
    BSPLINE_MESH,
    affine_stage,
    bspline_stage,
    bspline_transform,
    optimise,
)

IMAGE = itk.Image[itk.F, 3]
# Points inside the phantom's body (RAS mm; its 48^3 grid at 2 mm spans -48..46 mm), where errors are read.
PROBES = np.array([[0.0, 0.0, 0.0], [20.0, -15.0, 10.0], [-18.0, 16.0, -12.0], [12.0, 18.0, 20.0]])
FINE_MM = 4.0  # the voxel of the 2x level, where the stages finish (the phantom's voxels are 2 mm)


def _world(rotation_deg=(0.0, 0.0, 0.0), translation=(0.0, 0.0, 0.0), scale=(1.0, 1.0, 1.0)) -> np.ndarray:
    """A 4x4 RAS world map ``p -> R S p + t``."""
    matrix = np.eye(4)
    matrix[:3, :3] = rotation_matrix(rotation_deg) @ np.diag(scale)
    matrix[:3, 3] = translation
    return matrix


def _error_mm(matrix: np.ndarray, truth: np.ndarray) -> float:
    """The largest distance (mm) between where ``matrix`` and ``truth`` put the probe points."""
    points = np.c_[PROBES, np.ones(len(PROBES))].T
    return float(np.linalg.norm((matrix @ points - truth @ points)[:3], axis=0).max())


def _mattes(fixed: itk.Image, moving: itk.Image, transform: itk.Transform) -> float:
    """Mattes mutual information of the pair under ``transform``, evaluated by ITK on every fixed voxel."""
    metric = itk.MattesMutualInformationImageToImageMetricv4[IMAGE, IMAGE].New(NumberOfHistogramBins=32)
    metric.SetFixedImage(fixed)
    metric.SetMovingImage(moving)
    metric.SetMovingTransform(transform)
    metric.Initialize()
    return float(metric.GetValue())


def _block_level(array: np.ndarray, affine: np.ndarray, factor: int) -> tuple[np.ndarray, np.ndarray]:
    """``array`` (X, Y, Z) averaged over blocks of ``factor``^3 voxels, and the matrix of block centres."""
    shape = [n // factor for n in array.shape]
    blocks = array[: shape[0] * factor, : shape[1] * factor, : shape[2] * factor]
    blocks = blocks.reshape(shape[0], factor, shape[1], factor, shape[2], factor).mean(axis=(1, 3, 5))
    to_blocks = np.diag([factor, factor, factor, 1.0])
    to_blocks[:3, 3] = (factor - 1) / 2
    return blocks.astype(np.float32), affine @ to_blocks


@pytest.fixture(scope="module")
def scan(phantom: tuple[np.ndarray, ...]):
    """``(factor, truth=I, array=phantom) -> itk.Image``: a level of the phantom (or of another array on its
    grid) placed so that a fixed point p lies at ``truth @ p`` in it."""
    image, _, affine = phantom

    def level(factor: int, truth: np.ndarray | None = None, array: np.ndarray | None = None) -> itk.Image:
        blocks, matrix = _block_level(image if array is None else array, affine, factor)
        return to_itk(blocks, (np.eye(4) if truth is None else truth) @ matrix)

    return level


@pytest.fixture(scope="module")
def centre(phantom: tuple[np.ndarray, ...]) -> np.ndarray:
    """The phantom's centre (RAS mm), about which the stages rotate."""
    image, _, affine = phantom
    return (affine @ np.r_[(np.array(image.shape) - 1) / 2, 1.0])[:3]


def _identity(centre: np.ndarray) -> itk.Euler3DTransform:
    return euler_from_matrix(np.eye(4), centre)


# ----- optimise ---------------------------------------------------------------------------------------------
TRANSLATIONS = {
    "along x": (6.0, 0.0, 0.0),
    "oblique": (-4.0, 5.0, -3.0),
    "large": (8.0, -6.0, 10.0),
}
ROTATIONS = {
    "about z": _world(rotation_deg=(0.0, 0.0, 6.0)),
    "about y, shifted": _world(rotation_deg=(0.0, 5.0, 0.0), translation=(-3.0, 0.0, 2.0)),
    "oblique, shifted": _world(rotation_deg=(3.0, -2.0, 0.0), translation=(3.0, -2.0, 4.0)),
}


@pytest.mark.parametrize("shift", list(TRANSLATIONS.values()), ids=list(TRANSLATIONS))
def test_optimise_recovers_a_known_translation_to_a_fraction_of_a_voxel(scan, centre, shift) -> None:
    truth = _world(translation=shift)
    rigid = _identity(centre)
    value = optimise(scan(2), scan(2, truth), rigid, iterations=100)
    assert np.isfinite(value) and value < 0
    assert _error_mm(matrix_from_transform(rigid), truth) < FINE_MM / 4  # 0.05-0.11 mm measured


@pytest.mark.parametrize("truth", list(ROTATIONS.values()), ids=list(ROTATIONS))
def test_optimise_recovers_a_small_rotation_as_far_as_its_relaxation_lets_it(scan, centre, truth) -> None:
    """Each reversal of the gradient shrinks the step by ``relaxation`` and the run stops below
    ``min_step_mm``: with the defaults (0.6, 0.05 mm) that is after ~12 iterations, a fifth of the way."""
    start = _error_mm(np.eye(4), truth)
    errors = {}
    for relaxation, min_step_mm in ((0.6, 0.05), (0.9, 0.01)):
        rigid = _identity(centre)
        optimise(scan(2), scan(2, truth), rigid, 300, relaxation=relaxation, min_step_mm=min_step_mm)
        errors[relaxation] = _error_mm(matrix_from_transform(rigid), truth)
    assert errors[0.9] < FINE_MM / 4  # 0.2-0.7 mm measured
    assert errors[0.9] < errors[0.6] < start  # 1.6-2.1 mm measured with the defaults, from 2.0-2.6 mm


@pytest.mark.parametrize("truth", list(ROTATIONS.values()), ids=list(ROTATIONS))
def test_optimise_started_at_the_truth_stays_there(scan, centre, truth) -> None:
    rigid = euler_from_matrix(truth, centre)
    optimise(scan(2), scan(2, truth), rigid, iterations=100)
    assert _error_mm(matrix_from_transform(rigid), truth) < 0.5  # 0.06 mm measured


@pytest.mark.xfail(
    strict=True,
    reason="bug: itk_bridge.shrunk (itk_bridge.py:60) subsamples with ITK's ShrinkImageFilter, which places "
    "each output voxel at its block's centre but gives it one input voxel's value, the one a physical point "
    "half-way between two voxels rounds to; that value lies half an input voxel off its declared place, to a "
    "side set by the grid's direction and by float rounding, so the 2x levels of a scan and its rotated or "
    "flipped copy disagree by a whole input voxel (2 mm here) and the optimum moves off the truth by as much."
    " Kept for now: ITK's bin shrink (block means) fixes it and lifts the placement suite's Dice (+0.021 on "
    "the test split) but lowers CT -> MR of two patients (the app's pair 0.329 -> 0.286; see placement.md)",
)
@pytest.mark.parametrize("copy", ["rotated", "flipped along x"])
def test_the_product_levels_of_a_moved_copy_keep_the_truth_as_optimum(phantom, centre, copy) -> None:
    image, _, affine = phantom
    truth = ROTATIONS["about z"] if copy == "rotated" else np.eye(4)
    if copy == "rotated":
        moving = Pyramid(image, truth @ affine)
    else:  # the same voxels stored in the other order along x, on the same world positions
        flip = np.diag([-1.0, 1.0, 1.0, 1.0])
        flip[0, 3] = image.shape[0] - 1
        moving = Pyramid(image[::-1].copy(), affine @ flip)
    rigid = euler_from_matrix(truth, centre)
    optimise(Pyramid(image, affine).level(2), moving.level(2), rigid, iterations=100)
    assert _error_mm(matrix_from_transform(rigid), truth) < 0.5  # 0.06 mm on exact levels


def test_optimise_moves_the_transform_in_place_and_returns_the_metric_where_it_stopped(scan, centre) -> None:
    pair = (scan(2), scan(2, _world(translation=TRANSLATIONS["oblique"])))
    start = _mattes(*pair, _identity(centre))
    rigid = _identity(centre)
    value = optimise(*pair, rigid, iterations=100)
    assert not np.array_equal(matrix_from_transform(rigid), np.eye(4))
    assert value < start
    # ITK reports the value before its last (smallest) step: equal to the final metric up to that step.
    assert value == pytest.approx(_mattes(*pair, rigid), abs=0.01 * abs(value))


@pytest.mark.parametrize("step_mm", [0.5, 1.5, 3.0])
def test_the_first_step_is_step_mm_in_parameter_units_without_scales(scan, step_mm: float) -> None:
    translation = itk.TranslationTransform[itk.D, 3].New()
    pair = (scan(2), scan(2, _world(translation=TRANSLATIONS["oblique"])))
    optimise(*pair, translation, iterations=1, step_mm=step_mm, physical_scales=False)
    assert np.linalg.norm(np.asarray(translation.GetOffset())) == pytest.approx(step_mm, rel=1e-6)


@pytest.mark.parametrize("step_mm", [0.5, 2.0])
def test_the_first_step_moves_no_voxel_by_more_than_step_mm_with_physical_scales(
    phantom, scan, centre, step_mm: float
) -> None:
    image, _, affine = phantom
    rigid = _identity(centre)
    optimise(scan(2), scan(2, ROTATIONS["oblique, shifted"]), rigid, iterations=1, step_mm=step_mm)
    corners = np.array(np.meshgrid(*[[0, n - 1] for n in image.shape], indexing="ij")).reshape(3, -1)
    points = affine @ np.r_[corners, np.ones((1, corners.shape[1]))]
    shifts = np.linalg.norm((matrix_from_transform(rigid) @ points - points)[:3], axis=0)
    assert 0.5 * step_mm < shifts.max() <= 1.05 * step_mm


def test_sampling_is_seeded_and_a_cap_above_the_voxel_count_changes_nothing(scan, centre) -> None:
    truth = _world(translation=TRANSLATIONS["oblique"])
    pair = (scan(2), scan(2, truth))
    voxels = int(np.prod(itk.size(pair[0])))

    def run(max_samples: int | None) -> tuple[np.ndarray, float]:
        rigid = _identity(centre)
        value = optimise(*pair, rigid, iterations=50, max_samples=max_samples)
        return matrix_from_transform(rigid), value

    with deterministic_registration():
        full, capped_above = run(None), run(voxels)
        sampled, again = run(voxels // 4), run(voxels // 4)
    np.testing.assert_array_equal(full[0], capped_above[0])
    assert full[1] == capped_above[1]
    np.testing.assert_array_equal(sampled[0], again[0])
    assert sampled[1] == again[1]
    assert not np.array_equal(sampled[0], full[0]), "the cap samples fewer voxels"
    assert _error_mm(sampled[0], truth) < FINE_MM / 4


def test_a_slab_thinner_than_four_voxels_is_optimised(phantom, scan, centre) -> None:
    """ITK's recursive Gaussian gradients need 4 voxels per axis; a 3-slice slab is registered without."""
    image, _, affine = phantom
    blocks, matrix = _block_level(image, affine, 2)
    slab = to_itk(blocks[:, :, 10:13], matrix @ _world(translation=(0.0, 0.0, 10.0)))
    assert tuple(itk.size(slab)) == (24, 24, 3)
    truth = _world(translation=(5.0, -4.0, 0.0))
    rigid = _identity(centre)
    value = optimise(slab, scan(2, truth), rigid, iterations=100)
    assert np.isfinite(value)
    assert _error_mm(matrix_from_transform(rigid), truth) < FINE_MM


def test_optimise_without_overlap_raises_itks_runtime_error(scan, centre) -> None:
    far = scan(2, _world(translation=(1000.0, 0.0, 0.0)))
    with pytest.raises(RuntimeError):
        optimise(scan(2), far, _identity(centre), iterations=10)


# ----- affine_stage -----------------------------------------------------------------------------------------
def _pairs(scan, truth: np.ndarray) -> tuple[tuple[itk.Image, itk.Image], tuple[itk.Image, itk.Image]]:
    """The coarse (4x) and fine (2x) pairs of the phantom and its copy moved by ``truth``."""
    return (scan(4), scan(4, truth)), (scan(2), scan(2, truth))


def test_the_affine_stage_starts_where_the_rigid_stage_ended_and_leaves_it(scan, centre) -> None:
    # A rotation about the scan's centre is a large offset about the world origin: a start that dropped the
    # centre, the matrix or the translation would be tens of mm off, more than one step of each level undoes.
    truth = _world(rotation_deg=(0.0, 0.0, 12.0), translation=(4.0, -3.0, 2.0))
    rigid = euler_from_matrix(truth, centre + np.array([30.0, -20.0, 10.0]))
    before = np.array(rigid.GetParameters()), np.array(rigid.GetFixedParameters())
    result = affine_stage(rigid, *_pairs(scan, truth), iterations=1)
    assert result is not None
    affine, value = result
    assert isinstance(affine, itk.AffineTransform[itk.D, 3])
    np.testing.assert_allclose(np.asarray(affine.GetCenter()), np.asarray(rigid.GetCenter()))
    assert _error_mm(matrix_from_transform(affine), truth) < 1.0 + 0.5 + 0.1  # one step per level, 1 + 0.5 mm
    assert np.isfinite(value) and value < 0
    np.testing.assert_array_equal(np.array(rigid.GetParameters()), before[0])
    np.testing.assert_array_equal(np.array(rigid.GetFixedParameters()), before[1])


@pytest.mark.parametrize("scale", [(0.9, 0.9, 0.9), (1.08, 1.08, 1.08), (1.1, 1.0, 0.92)])
def test_the_affine_stage_recovers_a_size_difference_the_rigid_one_cannot(scan, centre, scale) -> None:
    about_centre = _world(translation=centre) @ _world(scale=scale) @ _world(translation=-centre)
    coarse, fine = _pairs(scan, about_centre)
    rigid = _identity(centre)
    rigid_value = optimise(*fine, rigid, iterations=100)
    result = affine_stage(rigid, coarse, fine, iterations=100)
    assert result is not None
    matrix = matrix_from_transform(result[0])
    singular = np.linalg.svd(matrix[:3, :3], compute_uv=False)
    np.testing.assert_allclose(singular, sorted(scale, reverse=True), atol=0.03)
    assert _error_mm(matrix, about_centre) < FINE_MM
    assert result[1] < rigid_value


def test_the_affine_stage_gives_none_where_itk_fails(scan, centre) -> None:
    rigid = euler_from_matrix(_world(translation=(1000.0, 0.0, 0.0)), centre)  # it left the moving scan
    assert affine_stage(rigid, *_pairs(scan, np.eye(4)), iterations=10) is None


# ----- bspline_transform ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mesh(scan) -> np.ndarray:
    """The fixed parameters of a B-spline of BSPLINE_MESH cells per axis over the phantom's 2x level."""
    bspline = itk.BSplineTransform[itk.D, 3, 3].New()
    itk.BSplineTransformInitializer[type(bspline), IMAGE].New(
        Transform=bspline, Image=scan(2), TransformDomainMeshSize=[BSPLINE_MESH] * 3
    ).InitializeTransform()
    return np.array(bspline.GetFixedParameters())


def test_bspline_transform_keeps_its_parameters_exactly(mesh: np.ndarray) -> None:
    parameters = np.random.default_rng(0).uniform(-5.0, 5.0, 3 * (BSPLINE_MESH + 3) ** 3)
    transform = bspline_transform(mesh, parameters)
    assert isinstance(transform, itk.BSplineTransform[itk.D, 3, 3])
    np.testing.assert_array_equal(np.array(transform.GetFixedParameters()), mesh)
    np.testing.assert_array_equal(np.array(transform.GetParameters()), parameters)


@pytest.mark.parametrize(
    "shift_lps", [(0.0, 0.0, 0.0), (2.0, 0.0, 0.0), (0.0, -3.0, 0.0), (0.0, 0.0, 1.5), (1.0, 2.0, -3.0)]
)
def test_control_points_moved_alike_move_every_point_alike(mesh: np.ndarray, shift_lps) -> None:
    """Cubic B-splines sum to one, so a uniform shift of the control points is that shift everywhere (ITK
    orders the parameters as every x shift, then every y, then every z)."""
    transform = bspline_transform(mesh, np.repeat(np.asarray(shift_lps), (BSPLINE_MESH + 3) ** 3))
    for point in PROBES:
        lps = LPS[:3, :3] @ point
        moved = np.asarray(transform.TransformPoint([float(x) for x in lps]))
        np.testing.assert_allclose(moved - lps, shift_lps, atol=1e-9)


# ----- bspline_stage ----------------------------------------------------------------------------------------
BULGE_MM = 8.0


@pytest.fixture(scope="module")
def bulged(phantom: tuple[np.ndarray, ...]) -> tuple[np.ndarray, np.ndarray]:
    """The phantom with its first structure's neighbourhood pushed BULGE_MM along +x (RAS) and the rest of
    the body left in place, and the structure's centre (RAS mm)."""
    image, mask, affine = phantom
    centre = np.argwhere(mask > 0.5).mean(0)
    grid = np.indices(image.shape, dtype=np.float64)
    weight = np.exp(-((grid - centre[:, None, None, None]) ** 2).sum(0) / (2 * 6.0**2))
    grid[0] -= weight * BULGE_MM / 2.0  # voxels of 2 mm; pulling the sample point back pushes content on
    moved = ndimage.map_coordinates(image, grid, order=1, mode="nearest").astype(np.float32)
    return moved, (affine @ np.r_[centre, 1.0])[:3]


def test_bspline_stage_follows_a_local_deformation_and_repeats_exactly(scan, centre, mesh, bulged) -> None:
    array, bulge_centre = bulged
    fine = (scan(2), scan(2, array=array))
    with deterministic_registration():
        result, again = (bspline_stage(_identity(centre), fine) for _ in range(2))
    assert result is not None and again is not None
    (fixed_parameters, parameters), value = result
    np.testing.assert_array_equal(fixed_parameters, mesh)  # BSPLINE_MESH cells over the fixed (query) scan
    assert parameters.shape == (3 * (BSPLINE_MESH + 3) ** 3,)
    np.testing.assert_array_equal(parameters, again[0][1])
    assert value == again[1]
    assert value < _mattes(*fine, _identity(centre)), "the deformation improves on the global transform"
    # The query's point at the bulge is moved towards where its content went (+x RAS is -x LPS): -1.7 mm
    # measured in 30 iterations, three times the pull on a point far from it.
    deformation = bspline_transform(fixed_parameters, parameters)

    def displacement(ras: np.ndarray) -> np.ndarray:
        lps = LPS[:3, :3] @ ras
        return LPS[:3, :3] @ (np.asarray(deformation.TransformPoint([float(x) for x in lps])) - lps)

    at_bulge, far = displacement(bulge_centre), displacement(np.array([-30.0, -30.0, -30.0]))
    assert at_bulge[0] > 1.0
    assert np.linalg.norm(at_bulge) > 2 * np.linalg.norm(far)


def test_bspline_stage_gives_none_where_itk_fails(scan, centre) -> None:
    # The global transform maps the query outside the support scan: the aligned image holds no body.
    far = euler_from_matrix(_world(translation=(1000.0, 0.0, 0.0)), centre)
    assert bspline_stage(far, (scan(2), scan(2))) is None
