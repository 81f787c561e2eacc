"""The field-of-view suite: an acquisition keeps the world content where its source had it (whatever the voxel
order, header tilt or spacing) and moves it by exactly the scanner pose; a pair's truth maps the fixed scan's
structures onto the moving scan's; the suite scores only held-out and development structures.

All scans are tiny synthetic sources (labelled balls in a trunk), either handed to the private pair maker
directly or written as a real-data folder in ``tmp_path`` that ``MEDMETA_REAL_DATA`` points at.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from medmeta_plugin.benchmarks import fov
from medmeta_plugin.benchmarks.fov import BRAIN_CORRESPONDENCES, FovPair, Scan, fov_pairs, world_error
from medmeta_plugin.episodes.splits import ABDOMEN_DEV, ABDOMEN_HELDOUT, BRAIN_DEV, BRAIN_HELDOUT
from medmeta_plugin.io import ImageMeta, write_image
from medmeta_plugin.paths import real_data_root
from medmeta_plugin.registration.placement import rotation_matrix

Balls = dict[str, tuple[tuple[float, float, float], float]]

# Four held-out abdominal organs and one structure meta-training uses (the liver, never scored) as balls
# (world centre mm, radius mm) in a trunk centred on the origin.
ABDOMEN: Balls = {
    "kidney_left": ((-30.0, 0.0, 0.0), 14.0),
    "kidney_right": ((30.0, 5.0, -5.0), 14.0),
    "gallbladder": ((10.0, -25.0, 20.0), 10.0),
    "pancreas": ((-5.0, 20.0, -20.0), 12.0),
    "liver": ((25.0, 25.0, 10.0), 10.0),
}
# The elastic part of another subject displaces by up to 6 mm (fov._other_subject), scaled by up to 1.1.
ELASTIC_MM = 6.0 * 1.1
# A structure's centroid on the 3 mm working grid: within half a voxel of where it lies.
HALF_VOXEL_MM = fov.WORKING_SPACING / 2


def _grid(
    shape: tuple[int, int, int],
    spacing: tuple[float, float, float],
    turn_deg: tuple[float, float, float] = (0.0, 0.0, 0.0),
    centre: tuple[float, float, float] = (0.0, 0.0, 0.0),
) -> np.ndarray:
    """The voxel-to-world matrix of ``shape`` voxels of ``spacing`` mm, turned by ``turn_deg`` (a rotation
    vector, degrees), the grid's centre at ``centre`` (world mm)."""
    affine = np.eye(4)
    affine[:3, :3] = rotation_matrix(turn_deg) * np.asarray(spacing)[None, :]
    affine[:3, 3] = np.asarray(centre) - affine[:3, :3] @ ((np.asarray(shape) - 1) / 2)
    return affine


def _phantom(
    shape: tuple[int, int, int], affine: np.ndarray, balls: Balls, seed: int = 0, organ_gain: float = 0.8
) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    """A trunk (a cylinder along the world's S axis, 80 % of the grid's width) holding labelled balls.

    Returns:
        image (X, Y, Z) float32, label (X, Y, Z) int16 (ball ``i`` has value ``i + 1``) and the names.
    """
    index = np.indices(shape).reshape(3, -1).T
    world = index @ affine[:3, :3].T + affine[:3, 3]
    centre = affine[:3, :3] @ ((np.asarray(shape) - 1) / 2) + affine[:3, 3]
    half = np.abs(fov._corners(shape, affine) - centre).max(0)
    trunk = (((world - centre)[:, :2] / (0.8 * half[:2])) ** 2).sum(1) <= 1.0
    label = np.zeros(len(world), np.int16)
    for value, (ball, radius) in enumerate(balls.values(), start=1):
        label[np.linalg.norm(world - np.asarray(ball), axis=1) <= radius] = value
    rng = np.random.default_rng(seed)
    image = 1.0 * trunk + organ_gain * (label > 0) + 0.05 * rng.normal(size=len(world))
    names = {name: value for value, name in enumerate(balls, start=1)}
    return image.reshape(shape).astype(np.float32), label.reshape(shape), names


def _source(kind: str = "ct", turn_deg: tuple[float, float, float] = (4.0, -3.0, 6.0)) -> fov._Source:
    """A source scan of the abdominal balls, 2.5 x 3 x 4 mm voxels, stored slightly turned in the world."""
    shape = (48, 40, 30)
    affine = _grid(shape, (2.5, 3.0, 4.0), turn_deg)
    image, label, names = _phantom(shape, affine, ABDOMEN)
    return fov._Source(image, label, affine, names, kind)


def _centroid(label: np.ndarray, affine: np.ndarray, value: int) -> np.ndarray:
    """World centroid (mm) of the voxels of ``label`` equal to ``value``."""
    return (affine @ np.r_[np.argwhere(label == value).mean(0), 1.0])[:3]


def _write_source(
    folder: Path, image: np.ndarray, label: np.ndarray, affine: np.ndarray, names: dict[str, int]
) -> None:
    """A real-data folder as the suite reads it: image, label and ``labels.json`` (``{value: name}``)."""
    folder.mkdir(parents=True)
    meta = ImageMeta.from_affine(affine, image.shape)
    write_image(folder / "image.nii.gz", image[None].astype(np.float32), meta)
    write_image(folder / "label.nii.gz", label[None].astype(np.uint8), meta)
    (folder / "labels.json").write_text(json.dumps({str(v): n for n, v in names.items()}))


def _seen_by_both_gap(pair: FovPair, name: str, truth: np.ndarray) -> tuple[float, int]:
    """How far ``truth`` puts the fixed scan's part of structure ``name`` from the moving scan's, both taken
    where the other scan's grid also lies (so slabs cut them alike): the distance between the two centroids
    in the moving world (mm) and the fewer voxels of the two parts."""
    fixed, moving = pair.fixed, pair.moving

    def inside(points: np.ndarray, scan: Scan) -> np.ndarray:
        voxel = np.rint(_map(np.linalg.inv(scan.affine), points)).astype(int)
        return ((voxel >= 0) & (voxel < np.array(scan.label.shape))).all(1)

    carried = _map(truth @ fixed.affine, np.argwhere(fixed.mask(name)))
    target = _map(moving.affine, np.argwhere(moving.mask(name)))
    carried = carried[inside(carried, moving)]
    target = target[inside(_map(np.linalg.inv(truth), target), fixed)]
    if not len(carried) or not len(target):
        return float("inf"), 0
    return float(np.linalg.norm(carried.mean(0) - target.mean(0))), min(len(carried), len(target))


def _map(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Points, shape (N, 3) or (3,), through a 4x4 matrix."""
    return points @ matrix[:3, :3].T + matrix[:3, 3]


@pytest.fixture(autouse=True)
def fresh_sources() -> Iterator[None]:
    """The suite caches its sources by folder name: forget them around each test, so that no test sees
    another test's folder (or the real one)."""
    fov._source.cache_clear()
    fov._between.cache_clear()
    yield
    fov._source.cache_clear()
    fov._between.cache_clear()


# The tiny MR's organs lie 12 mm right, 7 mm anterior and 9 mm superior of the CT's (two patients).
MR_SHIFT = (12.0, 7.0, 9.0)


@pytest.fixture
def real_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A real-data folder of a tiny abdominal CT and MR (the MR a 60 mm slab of 5 mm slices, as the real one
    is); the MR's organs are the CT's, moved by :data:`MR_SHIFT`."""
    root = tmp_path / "real"
    for folder, shape, spacing, shift, seed in (
        ("ct_abdomen_a", (44, 36, 40), (3.0, 3.0, 3.0), (0.0, 0.0, 0.0), 0),
        ("mr_abdomen_d", (40, 34, 12), (3.0, 3.0, 5.0), MR_SHIFT, 1),
    ):
        affine = _grid(shape, spacing, centre=shift)
        balls = {n: (tuple(np.add(c, shift)), r) for n, (c, r) in ABDOMEN.items()}
        image, label, names = _phantom(shape, affine, balls, seed)
        _write_source(root / folder, image, label, affine, names)
    monkeypatch.setenv("MEDMETA_REAL_DATA", str(root))
    return root


# ----- fov_pairs ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"split": "val"}, "'val'"),
        ({"split": "Dev"}, "'Dev'"),
        ({"classes": ("ct-ct", "mr-ct")}, "'mr-ct'"),
        ({"classes": ("brains",)}, r"'brains'.*valid: \['ct-ct'"),
        ({"repeats": 0}, "got 0"),
        ({"repeats": -2}, "got -2"),
        ({"classes": ("mr-mr",)}, "real data not found at .*empty"),
    ],
)
def test_fov_pairs_rejects_invalid_input(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kwargs: dict, match: str
) -> None:
    (tmp_path / "empty").mkdir()
    monkeypatch.setenv("MEDMETA_REAL_DATA", str(tmp_path / "empty"))
    # fov_pairs is a generator: it checks its arguments when the first pair is asked for.
    with pytest.raises(ValueError, match=match):
        next(fov_pairs(**{"split": "dev", **kwargs}))


MR_MR = ("mr-mr/slab-in-full/mr_abdomen_d-to-mr_abdomen_d", "mr-mr/full-full/mr_abdomen_d-to-mr_abdomen_d")


@pytest.mark.parametrize(
    ("split", "classes", "names"),
    [
        ("dev", ("mr-mr",), [f"{n}/dev0" for n in MR_MR]),
        ("test", ("mr-mr",), [f"{n}/test0" for n in MR_MR]),
        ("dev", (), []),
    ],
)
def test_fov_pairs_of_a_tiny_mr(real_root: Path, split: str, classes: tuple[str, ...], names: list) -> None:
    pairs = list(fov_pairs(split, repeats=1, classes=classes))
    assert [p.name for p in pairs] == names
    for pair in pairs:
        assert (pair.split, pair.pair_class) == (split, "mr-mr")
        assert pair.extent == pair.name.split("/")[1]
        assert pair.truth is not None and pair.truth.shape == (4, 4) and np.isfinite(pair.truth).all()
        assert world_error(pair, pair.truth) == pytest.approx((0.0, 0.0), abs=1e-6)
        assert np.linalg.norm(pair.body_axis) == pytest.approx(1.0)
        assert set(pair.structures) <= set(ABDOMEN_HELDOUT + ABDOMEN_DEV)
        for scan in (pair.fixed, pair.moving):
            assert scan.image.dtype == np.float32 and scan.image.ndim == 3
            assert scan.label.shape == scan.image.shape
            # The app's working grid: 3 mm voxels (a header's tilt stays in the affine).
            np.testing.assert_allclose(np.linalg.norm(scan.affine[:3, :3], axis=0), 3.0, atol=1e-6)
            assert scan.description.startswith("mr: ")
        assert "liver" in pair.fixed.names and "liver" not in pair.structures, "the liver is never scored"
    if pairs:  # the whole scans: every organ scored
        assert set(pairs[1].structures) == set(ABDOMEN) - {"liver"}
    for pair in pairs:  # one source made two subjects: the truth leaves out the elastic part only
        for name in pair.structures:
            gap, seen = _seen_by_both_gap(pair, name, pair.truth)
            assert seen >= fov._MIN_VOXELS and gap < ELASTIC_MM + HALF_VOXEL_MM, (pair.name, name, gap)


def test_dev_and_test_pairs_differ(real_root: Path) -> None:
    dev = next(fov_pairs("dev", repeats=1, classes=("mr-mr",)))
    test = next(fov_pairs("test", repeats=1, classes=("mr-mr",)))
    assert dev.fixed.description != test.fixed.description
    assert not np.allclose(dev.truth, test.truth)


def test_truth_carries_every_structure_of_every_extent(
    real_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without the elastic part (whose zero mean the truth leaves out), the truth is exact: where both scans
    see a structure, the truth carries the fixed scan's part onto the moving scan's within a working voxel,
    slabs and whole scans alike."""
    other_subject = fov._other_subject
    monkeypatch.setattr(
        fov, "_other_subject", lambda s, rng: dataclasses.replace(other_subject(s, rng), elastic=None)
    )
    pairs = list(fov_pairs("dev", repeats=1, classes=("ct-ct",)))
    assert [p.extent for p in pairs] == [
        "slab-in-full",
        "slab-at-edge",
        "partial",
        "full-full",
        "full-in-slab",
    ]
    for pair in pairs:
        assert pair.structures, pair.name
        for name in pair.structures:
            gap, seen = _seen_by_both_gap(pair, name, pair.truth)
            assert seen >= fov._MIN_VOXELS and gap < fov.WORKING_SPACING, (pair.name, name, gap)
        # and the measure sees a truth 10 mm off along the body axis (by more than a working voxel: two
        # thin slabs that overlap in part cut each structure at both ends, which dampens the gap)
        along = np.eye(4)
        along[:3, 3] = 10.0 * pair.body_axis
        off = max(_seen_by_both_gap(pair, n, pair.truth @ along)[0] for n in pair.structures)
        assert off > fov.WORKING_SPACING, pair.name


def test_two_patients_pairs_carry_the_measured_translation(real_root: Path) -> None:
    """CT against MR: the base truth is the translation under which the shared organs overlap most (here the
    known :data:`MR_SHIFT`), in both directions of the pairs."""
    base = np.frombuffer(fov._between("ct_abdomen_a", "mr_abdomen_d"), dtype=np.float64).reshape(4, 4)
    np.testing.assert_allclose(base[:3, :3], np.eye(3))
    np.testing.assert_allclose(base[:3, 3], MR_SHIFT, atol=fov.WORKING_SPACING)
    pairs = list(fov_pairs("dev", repeats=1, classes=("ct-mr",)))
    assert [(p.extent, p.fixed.description[:2]) for p in pairs] == [
        ("slab-in-full", "mr"),
        ("slab-at-edge", "mr"),
        ("full-in-slab", "ct"),
        ("partial", "ct"),
    ]
    for pair in pairs:  # exact but for the base's 3 mm search step
        assert pair.structures and world_error(pair, pair.truth) == pytest.approx((0.0, 0.0), abs=1e-6)
        for name in pair.structures:
            gap, _ = _seen_by_both_gap(pair, name, pair.truth)
            assert gap < 2 * fov.WORKING_SPACING, (pair.name, name, gap)


# ----- one acquisition --------------------------------------------------------------------------------
# Seeds whose acquisitions (identity pose) span every voxel order and both handednesses (checked below).
SEEDS = (0, 1, 4, 6, 11, 14)


@pytest.mark.parametrize("seed", SEEDS)
def test_an_acquisition_keeps_the_world_content(seed: int) -> None:
    """Voxel order, axis flips, header tilt and spacing change the stored voxels, never where the content lies
    in the world: each ball's world centroid stays the source's, within the smallest voxel edge."""
    source = _source()
    rng = np.random.default_rng(seed)
    _, label, affine, _ = fov._acquire(source, fov._same_subject(), np.eye(4), None, rng, (1.0, 2.0))
    voxel = np.linalg.norm(affine[:3, :3], axis=0).min()
    for name, value in source.names.items():
        gap = _centroid(label, affine, value) - fov._centroid(source, name)
        assert np.linalg.norm(gap) < voxel, name


def test_the_acquisition_seeds_cover_every_voxel_order() -> None:
    """The seeds stand for all orientations and both handednesses (an LPS-like and an RAS-like order)."""
    orders, signs = set(), set()
    for seed in SEEDS:
        rng = np.random.default_rng(seed)
        _, _, affine, what = fov._acquire(_source(), fov._same_subject(), np.eye(4), None, rng, (1.5, 2.0))
        orders.add(what.split(", ")[1])
        signs.add(np.sign(np.linalg.det(affine[:3, :3])))
    assert orders == set(fov._ORIENTATIONS) and signs == {-1.0, 1.0}


@pytest.mark.parametrize("seed", SEEDS)
def test_a_pose_moves_the_content_by_exactly_that_pose(seed: int) -> None:
    source = _source()
    rng = np.random.default_rng(seed)
    pose = fov._rigid(rng, 20.0, 150.0)
    _, label, affine, _ = fov._acquire(source, fov._same_subject(), pose, None, rng, (1.0, 2.0))
    voxel = np.linalg.norm(affine[:3, :3], axis=0).min()
    for name, value in source.names.items():
        gap = _centroid(label, affine, value) - _map(pose, fov._centroid(source, name))
        assert np.linalg.norm(gap) < voxel, name


@pytest.mark.parametrize(("seed", "elastic"), [(s, e) for s in (0, 1, 2) for e in (False, True)])
def test_another_subject_moves_the_content_by_its_affine_part(seed: int, elastic: bool) -> None:
    """Another subject: content(p) = source(G p + elastic(p)); a ball at ``c`` in the source lies at
    ``pose G^-1 c``, exactly without the elastic part and within its few mm with it."""
    source = _source()
    rng = np.random.default_rng(seed)
    subject = fov._other_subject(source, rng)
    if not elastic:
        subject = dataclasses.replace(subject, elastic=None)
    assert subject.contrast_seed is not None, "another subject has its own contrast"
    pose = fov._rigid(rng, 5.0, 150.0)
    _, label, affine, _ = fov._acquire(source, subject, pose, None, rng, (1.0, 2.0))
    tolerance = np.linalg.norm(affine[:3, :3], axis=0).min() + (ELASTIC_MM if elastic else 0.0)
    for name, value in source.names.items():
        expected = _map(pose @ np.linalg.inv(subject.matrix), fov._centroid(source, name))
        assert np.linalg.norm(_centroid(label, affine, value) - expected) < tolerance, name


def test_a_slab_holds_a_slab_of_anatomy() -> None:
    """A slab of ``t`` mm of a source ``W x D`` mm across holds about ``W D t`` of anatomy, however the header
    is tilted (a tilted slab covers more levels at its sides, not more volume)."""
    shape, spacing = (50, 42, 50), 6.0
    affine = _grid(shape, (spacing,) * 3)
    label = np.ones(shape, np.int16)  # anatomy everywhere in the source's field of view
    source = fov._Source(np.ones(shape, np.float32), label, affine, {"body": 1}, "ct")
    levels = (0.0, 20.0)
    width, depth = shape[0] * spacing, shape[1] * spacing
    ratios = []
    for seed in range(8):
        rng = np.random.default_rng(seed)
        pose = fov._rigid(rng, 5.0, 150.0)
        _, acquired, grid, _ = fov._acquire(source, fov._same_subject(), pose, levels, rng, (1.5, 2.0))
        volume = (acquired > 0).sum() * abs(np.linalg.det(grid[:3, :3]))
        ratios.append(volume / (width * depth * (levels[1] - levels[0])))
    assert max(ratios) < 1.5, np.round(ratios, 2)


# ----- the truth between two real subjects ---------------------------------------------------------------
@pytest.mark.parametrize(
    ("shift", "turn_deg", "spacing"),
    [
        ((0.0, 0.0, 0.0), (0.0, 0.0, 0.0), (3.0, 3.0, 3.0)),
        ((17.0, -11.0, 25.0), (0.0, 0.0, 0.0), (2.5, 3.5, 4.0)),
        ((-24.0, 9.0, -13.0), (0.0, 8.0, -5.0), (2.0, 2.0, 5.0)),
    ],
)
def test_overlap_translation_recovers_a_known_shift(shift, turn_deg, spacing) -> None:
    """Labels only: the second scan's organs are dark where the first's are bright, stored on another grid,
    and the answer is still the shift, within the 3 mm of the search."""
    a = _source(turn_deg=(0.0, 0.0, 0.0))
    shape = (44, 40, 26)
    affine = _grid(shape, spacing, turn_deg, centre=shift)
    balls = {n: (tuple(np.add(c, shift)), r) for n, (c, r) in ABDOMEN.items()}
    image, label, names = _phantom(shape, affine, balls, seed=1, organ_gain=-0.6)
    b = fov._Source(image, label, affine, names, "mr")
    matrix = fov._overlap_translation(a, b)
    np.testing.assert_allclose(matrix[:3, :3], np.eye(3))
    np.testing.assert_allclose(matrix[:3, 3], shift, atol=fov.WORKING_SPACING)


# The DK structures of the brain template stand-in and their AAL counterparts (the cerebellum in two parts,
# merged under its DK name), with one AAL region of no DK counterpart that the suite drops.
BRAIN_BALLS: Balls = {
    "Left-Caudate": ((-14.0, 12.0, 12.0), 7.0),
    "Right-Pallidum": ((20.0, 0.0, 0.0), 6.0),
    "Left-Amygdala": ((-22.0, -4.0, -16.0), 6.0),
    "ctx-lh-precentral": ((-36.0, -10.0, 36.0), 8.0),
    "Left-Cerebellum-Cortex": ((-20.0, -50.0, -30.0), 12.0),
}
AAL = {
    "Caudate_L": 11,
    "Pallidum_R": 12,
    "Amygdala_L": 13,
    "Precentral_L": 14,
    "Cerebelum_6_L": 20,
    "Cerebelum_Crus1_L": 21,
    "Vermis_3": 30,
}


# The colin27 stand-in is the mni152 one, its world moved by this affine (scaled, turned and shifted).
BRAIN_AFFINE = np.eye(4)
BRAIN_AFFINE[:3, :3] = rotation_matrix((3.0, -2.0, 5.0)) @ np.diag([1.05, 0.95, 1.02])
BRAIN_AFFINE[:3, 3] = (4.0, -7.0, 12.0)


@pytest.fixture
def brains(real_root: Path) -> np.ndarray:
    """The two brain atlases beside the abdomen: DK labels in ``brain_mni152``, the same voxels under AAL
    labels in ``brain_colin27`` (its world moved by :data:`BRAIN_AFFINE`). Returns the cerebellum's mask."""
    shape = (40, 48, 40)
    affine = _grid(shape, (2.5, 2.5, 2.5))
    image, dk, names = _phantom(shape, affine, BRAIN_BALLS)
    aal = np.zeros_like(dk)
    for value, region in zip(names.values(), ("Caudate_L", "Pallidum_R", "Amygdala_L", "Precentral_L")):
        aal[dk == value] = AAL[region]
    cerebellum = dk == names["Left-Cerebellum-Cortex"]
    upper = np.indices(shape)[2] * affine[2, 2] + affine[2, 3] > BRAIN_BALLS["Left-Cerebellum-Cortex"][0][2]
    aal[cerebellum & upper], aal[cerebellum & ~upper] = AAL["Cerebelum_6_L"], AAL["Cerebelum_Crus1_L"]
    assert (aal == AAL["Cerebelum_6_L"]).any() and (aal == AAL["Cerebelum_Crus1_L"]).any()
    aal[32:35, 20:24, 18:22] = AAL["Vermis_3"]
    _write_source(real_root / "brain_mni152", image, dk, affine, names)
    _write_source(real_root / "brain_colin27", image, aal, BRAIN_AFFINE @ affine, AAL)
    return cerebellum


def test_two_brain_atlases_are_related_by_the_affine_of_their_centroids(brains: np.ndarray) -> None:
    colin = fov._source("brain_colin27")
    assert colin.kind == "brain" and set(colin.names) == set(BRAIN_BALLS), "AAL regions under DK names"
    np.testing.assert_array_equal(colin.label == colin.names["Left-Cerebellum-Cortex"], brains)
    base = np.frombuffer(fov._between("brain_mni152", "brain_colin27"), dtype=np.float64).reshape(4, 4)
    np.testing.assert_allclose(base, BRAIN_AFFINE, atol=1e-4)  # the NIfTI header stores float32


def test_head_abdomen_pairs_have_no_truth_and_score_nothing(brains: np.ndarray) -> None:
    pairs = list(fov_pairs("test", repeats=1, classes=("head-abdomen",)))
    assert [p.name.split("/")[2] for p in pairs] == [
        "brain_mni152-to-ct_abdomen_a",
        "brain_colin27-to-ct_abdomen_a",
        "mr_abdomen_d-to-brain_mni152",
        "ct_abdomen_a-to-brain_colin27",
    ]
    assert all(p.truth is None and p.structures == () for p in pairs)
    with pytest.raises(ValueError, match="no truth"):
        world_error(pairs[0], np.eye(4))


# ----- world_error ------------------------------------------------------------------------------------
def _pair(truth: np.ndarray | None, body_axis=(0.0, 0.0, 1.0), pair_class: str = "ct-ct") -> FovPair:
    """A pair whose fixed scan is a bright box in a dark 3 mm grid (its body)."""
    image = np.zeros((20, 20, 20), np.float32)
    image[5:15, 6:16, 4:14] = 1.0
    scan = Scan(image, _grid(image.shape, (3.0, 3.0, 3.0)), np.zeros(image.shape, np.int16), {}, "box")
    return FovPair(f"{pair_class}/full-full/box/dev0", pair_class, "full-full", "dev", scan, scan, truth, (),
                   np.asarray(body_axis))  # fmt: skip


TRUTH = fov._rigid(np.random.default_rng(3), 20.0, 150.0)


@pytest.mark.parametrize(
    ("offset", "body_axis", "along", "total"),
    [
        ((0.0, 0.0, 0.0), (0.0, 0.0, 1.0), 0.0, 0.0),
        ((0.0, 0.0, 10.0), (0.0, 0.0, 1.0), 10.0, 10.0),
        ((0.0, 0.0, -12.0), (0.0, 0.0, 1.0), 12.0, 12.0),
        ((3.0, 4.0, 0.0), (0.0, 0.0, 1.0), 0.0, 5.0),
        ((6.0, 0.0, 8.0), (0.6, 0.0, 0.8), 10.0, 10.0),
        ((8.0, 0.0, -6.0), (0.6, 0.0, 0.8), 0.0, 10.0),
    ],
)
def test_world_error_measures_an_offset_in_the_query_frame(offset, body_axis, along, total) -> None:
    """A matrix that first moves the query's points by ``offset`` (in the query's world) is ``offset`` away
    from the truth; for a rigid truth, a shift of the moving world is as far away."""
    pair = _pair(TRUTH, body_axis)
    shift = np.eye(4)
    shift[:3, 3] = offset
    assert world_error(pair, TRUTH @ shift) == pytest.approx((along, total), abs=1e-6)
    assert world_error(pair, shift @ TRUTH)[1] == pytest.approx(total, abs=1e-6)


def test_world_error_needs_a_truth() -> None:
    with pytest.raises(ValueError, match="head-abdomen/full-full/box/dev0 has no truth"):
        world_error(_pair(None, pair_class="head-abdomen"), np.eye(4))


# ----- what the suite scores --------------------------------------------------------------------------
def test_the_suite_scores_only_held_out_and_development_structures() -> None:
    """So that the suite evaluates nothing meta-training may use freely."""
    assert fov._ABDOMEN_SCORED and set(fov._ABDOMEN_SCORED) <= set(ABDOMEN_HELDOUT + ABDOMEN_DEV)
    assert fov._BRAIN_SCORED and set(fov._BRAIN_SCORED) <= set(BRAIN_HELDOUT + BRAIN_DEV)
    # Every held-out or development brain structure that AAL also labels is scored.
    assert set(fov._BRAIN_SCORED) == {n for n in BRAIN_HELDOUT + BRAIN_DEV if n in BRAIN_CORRESPONDENCES}


@pytest.mark.parametrize(
    ("dk", "aal"),
    [
        ("Left-Caudate", ("Caudate_L",)),
        ("Right-Pallidum", ("Pallidum_R",)),
        ("Left-Amygdala", ("Amygdala_L",)),
        ("ctx-lh-precentral", ("Precentral_L",)),
        ("ctx-rh-superiortemporal", ("Temporal_Sup_R",)),
        ("ctx-lh-pericalcarine", ("Calcarine_L",)),
        ("ctx-rh-transversetemporal", ("Heschl_R",)),
        ("ctx-lh-paracentral", ("Paracentral_Lobule_L",)),
        ("ctx-rh-parahippocampal", ("ParaHippocampal_R",)),
        (
            "Right-Cerebellum-Cortex",
            tuple(f"Cerebelum_{p}_R" for p in ("Crus1", "Crus2", "3", "4_5", "6", "7b", "8", "9", "10")),
        ),
    ],
)
def test_brain_correspondences_checked_by_hand(dk: str, aal: tuple[str, ...]) -> None:
    assert BRAIN_CORRESPONDENCES[dk] == aal


def test_brain_correspondences_map_dk_names_to_aal_names_of_the_same_side() -> None:
    dk_name = re.compile(r"^(?:(Left|Right)-[A-Z][A-Za-z]*(?:-[A-Z][A-Za-z]*)*|ctx-(lh|rh)-[a-z]+)$")
    aal_name = re.compile(r"^[A-Z][A-Za-z]*(?:_[A-Za-z0-9]+)*_([LR])$")
    regions = [region for regions in BRAIN_CORRESPONDENCES.values() for region in regions]
    assert len(regions) == len(set(regions)), "an AAL region belongs to one DK structure"
    for dk, aal in BRAIN_CORRESPONDENCES.items():
        match = dk_name.match(dk)
        assert match, f"{dk} is not a DK (aseg or cortical parcel) name"
        side = "L" if (match.group(1) or match.group(2)) in ("Left", "lh") else "R"
        for region in aal:
            found = aal_name.match(region)
            assert found and found.group(1) == side, f"{dk} -> {region}"


@pytest.mark.skipif(not real_data_root().is_dir(), reason="needs ../shared/data/real")
def test_scored_and_corresponding_names_are_labelled_in_the_real_data() -> None:
    """On the real cases (only their ``labels.json``, so this stays fast)."""

    def names(folder: str) -> set[str]:
        return set(json.loads((real_data_root() / folder / "labels.json").read_text()).values())

    assert set(BRAIN_CORRESPONDENCES) <= names("brain_mni152")
    assert {r for regions in BRAIN_CORRESPONDENCES.values() for r in regions} <= names("brain_colin27")
    assert set(fov._ABDOMEN_SCORED) <= names("ct_abdomen_a") & names("mr_abdomen_d")
