"""place() is a function of two images and their affines: real scans cropped, stored in other voxel orders
and moved in the scanner's world come back at the known transform; swapping the scans inverts it; a head
against an abdomen comes back unsure rather than wrong. Configuration and inputs are checked.

The scans are the real cases shipped in ``sample_apps/data/real``, on the app's 3 mm RAS working grid
(:func:`medmeta_plugin.app.grid.load_working`). Each ``place`` call takes 1-5 s on two cores, so every pair
is placed once per module and the cases are few, each standing for one kind of field of view.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from medmeta_plugin.io import read_image, resample
from medmeta_plugin.registration.grids import otsu_threshold
from medmeta_plugin.registration.placement import (
    TIE_MARGIN,
    Placement,
    PlacementConfig,
    confidence,
    place,
    rotation_matrix,
    tie_scale,
)
from medmeta_plugin.transforms import normalize_intensity

REAL = Path(__file__).resolve().parents[2] / "sample_apps" / "data" / "real"
SOURCES = {
    "ct": "ct_abdomen_a/image.nii.gz",  # abdominal CT, 366 x 303 x 336 mm
    "mr": "mr_abdomen_d/image.nii.gz",  # abdominal MR, a 60 mm slab
    "brain1": "mr_brain_tumour_1/image.nrrd",  # brain MR, 6.5 mm slices
    "brain2": "mr_brain_tumour_2/image.nrrd",
}
WORKING_MM = 3.0  # the app's default working grid (--conf spacing 3)
# Two voxels of the working grid: the placement's own 6 mm search grid, refined rigidly at that level.
TOLERANCE_MM = 2 * WORKING_MM


@pytest.fixture(scope="module")
def scans() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Each real scan as the app serves it: (X, Y, Z) normalised intensities and its RAS voxel-to-world
    matrix on the 3 mm working grid."""
    out = {}
    for name, path in SOURCES.items():
        array, meta = read_image(REAL / path)
        work, working = resample(array, meta, spacing=(WORKING_MM,) * 3, orientation="RAS")
        out[name] = (normalize_intensity(work)[0], working.affine)
    return out


@dataclass(frozen=True)
class Acquisition:
    """How a scan of a pair is made from a source: a slab, a voxel order and a scanner pose.

    Attributes:
        source: key of :data:`SOURCES`.
        slab: (low, high) mm above the bottom of the source's field of view along S; None: the whole scan.
        order, flips: voxel axes permuted, then reversed (the world content unchanged).
        rotation_deg: rotation vector (RAS, degrees) turning the world content about its body centre.
        translation: world shift (mm) applied after the rotation.
    """

    source: str
    slab: tuple[float, float] | None = None
    order: tuple[int, int, int] = (0, 1, 2)
    flips: tuple[int, ...] = ()
    rotation_deg: tuple[float, float, float] = (0.0, 0.0, 0.0)
    translation: tuple[float, float, float] = (0.0, 0.0, 0.0)

    def make(self, scans) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The scan's array and affine, and its world motion W (4, 4): a source point p is at W p here."""
        array, affine = scans[self.source]
        if self.slab is not None:
            low, high = (int(round(mm / WORKING_MM)) for mm in self.slab)
            array, affine = array[:, :, low:high], affine @ _translation((0.0, 0.0, float(low)))
        array, affine = _stored(array, affine, self.order, self.flips)
        motion = _translation(self.translation) @ _turn(self.rotation_deg, _body_centre(array, affine))
        return array, motion @ affine, motion


def _translation(shift) -> np.ndarray:
    matrix = np.eye(4)
    matrix[:3, 3] = shift
    return matrix


def _turn(rotation_deg, centre: np.ndarray) -> np.ndarray:
    """A world rotation about ``centre`` (RAS mm), shape (4, 4)."""
    matrix = np.eye(4)
    matrix[:3, :3] = rotation_matrix(rotation_deg)
    matrix[:3, 3] = centre - matrix[:3, :3] @ centre
    return matrix


def _stored(array: np.ndarray, affine: np.ndarray, order, flips) -> tuple[np.ndarray, np.ndarray]:
    """The same scan with its voxel axes permuted by ``order`` and then ``flips`` reversed, the affine changed
    so that every voxel keeps its world position."""
    out = np.transpose(array, order)
    index = np.eye(4)[:, [*order, 3]]  # new voxel index -> old voxel index
    for axis in flips:
        out = np.flip(out, axis)
        flip = np.eye(4)
        flip[axis, axis], flip[axis, 3] = -1.0, out.shape[axis] - 1
        index = index @ flip
    return np.ascontiguousarray(out), affine @ index


def _body_centre(array: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """World position (RAS mm) of the centroid of the voxels above the Otsu threshold, shape (3,)."""
    index = np.argwhere(array > otsu_threshold(array)).mean(0)
    return (affine @ np.r_[index, 1.0])[:3]


def _gap(matrix: np.ndarray, truth: np.ndarray, point: np.ndarray) -> float:
    """How far apart two fixed -> moving matrices put a fixed world point (mm)."""
    return float(np.linalg.norm((matrix @ np.r_[point, 1.0] - truth @ np.r_[point, 1.0])[:3]))


@dataclass(frozen=True)
class Pair:
    fixed: Acquisition
    moving: Acquisition


# ----- (a) a scan cropped, stored and posed comes back at the known transform -------------------------------
# The CT covers 0-336 mm along S, the MR 0-60 mm, a brain 0-160 mm. Moving CTs are cut to what the fixed one
# needs to be "in the middle" or "at an end", which keeps each call near 2 s (on two quiet cores).
KNOWN: dict[str, Pair] = {
    "ct-40mm-slab-in-the-middle-sagittal-order": Pair(
        Acquisition("ct", slab=(150, 190), order=(2, 0, 1), flips=(0, 2)),
        Acquisition("ct", slab=(90, 250)),
    ),
    "ct-20mm-slab-at-the-top-coronal-moved-150mm": Pair(
        Acquisition("ct", slab=(316, 336), order=(0, 2, 1), flips=(1,), translation=(120.0, -150.0, 90.0)),
        Acquisition("ct", slab=(210, 336), flips=(0, 1)),
    ),
    # a partial overlap: each scan holds 40 mm the other lacks
    "ct-80mm-slab-at-the-bottom-half-in-a-moved-scan": Pair(
        Acquisition("ct", slab=(0, 80)),
        Acquisition("ct", slab=(40, 180), order=(1, 2, 0), flips=(0,), translation=(-150.0, 40.0, -100.0)),
    ),
    "mr-30mm-slab-in-the-middle-reversed": Pair(
        Acquisition("mr", slab=(15, 45), order=(2, 1, 0), flips=(0, 1)),
        Acquisition("mr", translation=(0.0, 0.0, 150.0)),
    ),
    "brain-moved-150mm-lps-order": Pair(
        Acquisition("brain1", order=(1, 0, 2), flips=(2,), translation=(100.0, -130.0, 150.0)),
        Acquisition("brain1", flips=(0, 1)),
    ),
    "brain-turned-20deg-about-r": Pair(
        Acquisition("brain1", rotation_deg=(20.0, 0.0, 0.0)),
        Acquisition("brain1"),
    ),
    "brain-60mm-slab-turned-17deg-oblique": Pair(
        Acquisition("brain1", slab=(60, 120), rotation_deg=(0.0, 12.0, -12.0)),
        Acquisition("brain1"),
    ),
}


@dataclass(frozen=True)
class Placed:
    fixed: tuple[np.ndarray, np.ndarray]
    moving: tuple[np.ndarray, np.ndarray]
    truth: np.ndarray  # fixed world -> moving world
    placement: Placement


@pytest.fixture(scope="module")
def placed(scans) -> dict[str, Placed]:
    """Every pair of :data:`KNOWN`, placed once."""
    out = {}
    for name, pair in KNOWN.items():
        fixed, fixed_affine, fixed_motion = pair.fixed.make(scans)
        moving, moving_affine, moving_motion = pair.moving.make(scans)
        placement = place(fixed, fixed_affine, moving, moving_affine)
        truth = moving_motion @ np.linalg.inv(fixed_motion)
        out[name] = Placed((fixed, fixed_affine), (moving, moving_affine), truth, placement)
    return out


@pytest.mark.parametrize("name", list(KNOWN))
def test_a_scan_cropped_stored_and_posed_comes_back_at_the_known_transform(placed, name) -> None:
    case = placed[name]
    centre = _body_centre(*case.fixed)
    error = _gap(case.placement.matrix, case.truth, centre)
    assert error <= TOLERANCE_MM, (
        f"{name}: placed {error:.1f} mm from the truth at the fixed body centre "
        f"(tolerance {TOLERANCE_MM} mm); {case.placement.to_dict()}"
    )
    rotation = case.placement.matrix[:3, :3]
    np.testing.assert_allclose(rotation @ rotation.T, np.eye(3), atol=1e-6)  # rigid
    assert 0.0 <= case.placement.confidence <= 1.0 and 0.0 < case.placement.overlap <= 1.0


# ----- (b) swapping the scans inverts the placement ---------------------------------------------------------
@pytest.mark.parametrize("name", ["ct-80mm-slab-at-the-bottom-half-in-a-moved-scan"])
def test_swapping_fixed_and_moving_inverts_the_placement(placed, name) -> None:
    case = placed[name]
    back = place(*case.moving, *case.fixed)
    centre = _body_centre(*case.fixed)
    gap = _gap(np.linalg.inv(back.matrix), case.placement.matrix, centre)
    assert gap <= TOLERANCE_MM, f"{name}: swapped placement {gap:.1f} mm from the inverse; {back.to_dict()}"


def test_swapping_two_subjects_inverts_the_placement(scans) -> None:
    # Two patients' brains: no truth here, but the answer must not depend on which scan is the query.
    forward = place(*scans["brain1"], *scans["brain2"])
    back = place(*scans["brain2"], *scans["brain1"])
    gap = _gap(np.linalg.inv(back.matrix), forward.matrix, _body_centre(*scans["brain1"]))
    assert gap <= TOLERANCE_MM, f"brain1 <-> brain2: {gap:.1f} mm; {forward.to_dict()}, {back.to_dict()}"


# ----- (c) no right answer: unsure rather than wrong --------------------------------------------------------
UNRELATED = {
    "brain-in-an-abdominal-ct": Pair(Acquisition("brain1"), Acquisition("ct", slab=(60, 280))),
    "abdominal-ct-slab-in-a-brain": Pair(Acquisition("ct", slab=(150, 230)), Acquisition("brain2")),
}


@pytest.mark.parametrize("name", list(UNRELATED))
def test_a_head_against_an_abdomen_comes_back_unsure(scans, name) -> None:
    pair = UNRELATED[name]
    fixed, fixed_affine, _ = pair.fixed.make(scans)
    moving, moving_affine, _ = pair.moving.make(scans)
    placement = place(fixed, fixed_affine, moving, moving_affine)
    assert not placement.sure, f"{name}: served as sure, {placement.to_dict()}"


# ----- configuration and rotations --------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"spacing_mm": 1.0, "bins": 3, "min_overlap": 1.0},
        {"spacing_mm": 20.0, "bins": 16, "min_overlap": 0.01, "peaks": 1, "refine": 1},
        {"rotations": ((0.0, 0.0, 0.0), (0.0, 0.0, 15.0), (0.0, 0.0, -15.0))},
        {"rotations": ((0, 0, 0),)},  # integers compare equal to the zero rotation
    ],
)
def test_placement_config_accepts_settings_in_range(kwargs) -> None:
    config = PlacementConfig(**kwargs)
    for key, value in kwargs.items():
        assert getattr(config, key) == value


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"spacing_mm": 0.5}, r"spacing_mm must be in \[1, 20\] mm, got 0.5"),
        ({"spacing_mm": 25.0}, r"spacing_mm .* got 25.0"),
        ({"spacing_mm": float("nan")}, r"spacing_mm .* got nan"),
        ({"bins": 2}, r"bins must be in \[3, 16\], got 2"),
        ({"bins": 17}, r"bins .* got 17"),
        ({"min_overlap": 0.0}, r"min_overlap must be in \(0, 1\], got 0.0"),
        ({"min_overlap": 1.5}, r"min_overlap .* got 1.5"),
        ({"peaks": 0}, r"peaks and refine must be >= 1, got 0 and 4"),
        ({"refine": 0}, r"peaks and refine .* got 4 and 0"),
        ({"rotations": ()}, r"rotations must start with \(0, 0, 0\), got \(\)"),
        ({"rotations": ((10.0, 0.0, 0.0), (0.0, 0.0, 0.0))}, r"rotations must start with \(0, 0, 0\)"),
    ],
)
def test_placement_config_rejects_settings_out_of_range(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        PlacementConfig(**kwargs)


@pytest.mark.parametrize(
    ("rotation_deg", "before", "after"),
    [
        ((0.0, 0.0, 0.0), (1.0, 2.0, 3.0), (1.0, 2.0, 3.0)),
        ((0.0, 0.0, 90.0), (1.0, 0.0, 0.0), (0.0, 1.0, 0.0)),  # about S: R turns to A
        ((90.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0)),  # about R: A turns to S
        ((0.0, 90.0, 0.0), (0.0, 0.0, 1.0), (1.0, 0.0, 0.0)),  # about A: S turns to R
        ((0.0, 0.0, -180.0), (1.0, 1.0, 5.0), (-1.0, -1.0, 5.0)),
        ((10.0, 10.0, 10.0), (1.0, 1.0, 1.0), (1.0, 1.0, 1.0)),  # a point on the axis stays
    ],
)
def test_rotation_matrix_turns_about_the_vector_by_its_length(rotation_deg, before, after) -> None:
    rotation = rotation_matrix(rotation_deg)
    np.testing.assert_allclose(rotation @ np.asarray(before), after, atol=1e-12)
    np.testing.assert_allclose(rotation @ rotation.T, np.eye(3), atol=1e-12)
    assert np.linalg.det(rotation) == pytest.approx(1.0)
    angle = np.degrees(np.arccos(np.clip((np.trace(rotation) - 1) / 2, -1, 1)))
    assert angle == pytest.approx(np.linalg.norm(rotation_deg), abs=1e-6)


# ----- confidence -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("gradients, outline", [(0.45, 0.95), (0.3, 0.7), (0.6, 0.98)])
def test_confidence_falls_to_zero_at_a_tie_and_rises_with_the_margin(gradients, outline) -> None:
    margins = np.linspace(0.0, 12.0, 121)
    values = np.array([confidence(m, gradients, outline) for m in margins])
    assert values[0] == 0.0, "two distinct answers scoring the same: a guess"
    assert (np.diff(values) >= 0).all() and ((values >= 0.0) & (values <= 1.0)).all()
    # below the tie margin scaled linearly: half the margin, about half the value (the curve itself rises a
    # little with the margin too)
    assert confidence(TIE_MARGIN / 2, gradients, outline) == pytest.approx(
        confidence(TIE_MARGIN, gradients, outline) / 2, rel=0.1
    )
    assert confidence(10.0, gradients, outline) == confidence(11.0, gradients, outline), "margin is capped"


def test_tie_scale_is_one_from_the_tie_margin_up_and_linear_below_elementwise() -> None:
    margins = np.array([0.0, TIE_MARGIN / 4, TIE_MARGIN / 2, TIE_MARGIN, 3.0, -1.0])
    np.testing.assert_allclose(tie_scale(margins), [0.0, 0.25, 0.5, 1.0, 1.0, 0.0])
    assert float(tie_scale(TIE_MARGIN / 2)) == pytest.approx(0.5)


def test_a_near_tie_is_unsure_however_well_outlines_and_edges_agree() -> None:
    # The abdomen-ct-to-mr copy that was carried wrongly: margin 0.03, gradients 0.445, outline 0.951.
    assert confidence(0.03, 0.445, 0.951) < PlacementConfig().threshold
    assert confidence(1.79, 0.445, 0.951) >= PlacementConfig().threshold


# ----- invalid inputs ---------------------------------------------------------------------------------------
def _tissue(shape: tuple[int, int, int], body: tuple[slice, slice, slice]) -> np.ndarray:
    """Air holding a box of noisy tissue (noise: a uniform body would be one value after the soft tissue
    window, and so would the air around it)."""
    out = np.zeros(shape, np.float32)
    out[body] = np.random.default_rng(0).normal(100.0, 5.0, shape)[body]
    return out


_GRID = np.diag([3.0, 3.0, 3.0, 1.0])
_BODY = _tissue((24, 24, 24), (slice(4, 20),) * 3)
_PLATE = _tissue((70, 70, 14), (slice(5, 65), slice(5, 65), slice(5, 9)))  # 180 x 180 x 12 mm
_ROD = _tissue((14, 14, 70), (slice(5, 9), slice(5, 9), slice(5, 65)))  # 12 x 12 x 180 mm
_NAN = _BODY.copy()
_NAN[3, 3, 3] = np.nan
_INF_AFFINE = _GRID.copy()
_INF_AFFINE[0, 3] = np.inf


@pytest.mark.parametrize(
    ("fixed", "fixed_affine", "moving", "moving_affine", "match"),
    [
        (_BODY[0], _GRID, _BODY, _GRID, r"fixed must be a 3D array"),
        (_BODY, _GRID, _NAN, _GRID, r"moving holds NaN or infinite values"),
        (_BODY, np.diag([3.0, 3.0, 0.0, 1.0]), _BODY, _GRID, r"fixed_affine must be an invertible 4x4"),
        (_BODY, _GRID, _BODY, _INF_AFFINE, r"moving_affine holds NaN or infinite values"),
        (np.zeros((24, 24, 24), np.float32), _GRID, _BODY, _GRID, r"placement needs a body in both scans"),
        (_BODY, _GRID, np.full((24, 24, 24), -1024.0, np.float32), _GRID, r"needs a body in both scans"),
        # a plate and a rod cross in 8 % of the rod at most: below min_overlap (30 %) everywhere
        (_PLATE, _GRID, _ROD, _GRID, r"no relative position where the two scans' bodies overlap"),
    ],
    ids=[
        "fixed-2d",
        "moving-nan",
        "fixed-singular",
        "moving-affine-inf",
        "fixed-blank",
        "moving-blank",
        "no-overlap",
    ],
)
def test_place_rejects_with_the_argument_named(fixed, fixed_affine, moving, moving_affine, match) -> None:
    with pytest.raises(ValueError, match=match):
        place(fixed, fixed_affine, moving, moving_affine)
