"""Similarity maps over every shift: the FFT maps agree with the direct computation at each integer shift,
a grid matches itself best unshifted, and a map index reads back as the shift it stands for."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from medmeta_plugin.registration.grids import SearchGrid, search_grid
from medmeta_plugin.registration.similarity import (
    Correlator,
    MovingSpectra,
    ShiftMaps,
    resample_grid,
    shift_maps,
    similarity_at,
)

SPACING_MM = 6.0
BINS = 6


def _body(shape: tuple[int, int, int], seed: int) -> np.ndarray:
    """An ellipsoid body in air holding six blobs of other intensities, blurred, with noise."""
    rng = np.random.default_rng(seed)
    index = np.indices(shape).astype(np.float64)
    centre = (np.array(shape) - 1) / 2
    semi = np.array(shape) * 0.4
    radius = (((index - centre[:, None, None, None]) / semi[:, None, None, None]) ** 2).sum(0)
    image = np.where(radius < 1, 1.0, 0.0)
    for _ in range(6):
        where = rng.uniform(0.3, 0.7, 3) * np.array(shape)
        distance = np.sqrt(((index - where[:, None, None, None]) ** 2).sum(0))
        image[distance < rng.uniform(2, 5)] = rng.uniform(0.2, 2.0)
    return (ndimage.gaussian_filter(image, 1.0) + rng.normal(0, 0.02, shape)).astype(np.float32)


def _grid(image: np.ndarray, origin: tuple[float, float, float]) -> SearchGrid:
    affine = np.diag([3.0, 3.0, 3.0, 1.0])
    affine[:3, 3] = origin
    return search_grid(image, affine, SPACING_MM, BINS)


def _maps(fixed: SearchGrid, moving: SearchGrid, bins: int = BINS) -> tuple[Correlator, ShiftMaps]:
    correlator = Correlator(tuple(fixed.image.shape), tuple(moving.image.shape))
    return correlator, shift_maps(fixed, correlator, MovingSpectra(moving, correlator, bins), bins)


def _translation(fixed: SearchGrid, moving: SearchGrid, shift: tuple[int, int, int]) -> np.ndarray:
    """The world matrix (fixed -> moving) under which fixed voxel i lies on moving voxel i + shift."""
    matrix = np.eye(4)
    matrix[:3, 3] = moving.affine[:3, 3] - fixed.affine[:3, 3] + np.asarray(shift) * SPACING_MM
    return matrix


@pytest.fixture(scope="module")
def pairs() -> dict[str, tuple[SearchGrid, SearchGrid]]:
    """Grid pairs (fixed, moving): two bodies apart in the world, and a 30 mm slab cut through a body (its
    grid's edges cross the body) against that whole body, and the reverse."""
    whole = _body((40, 36, 30), seed=2)
    slab = whole[:, :, 12:22]
    return {
        "two-bodies": (_grid(_body((30, 26, 22), 1), (-40, -30, -20)), _grid(whole, (10, 5, -7))),
        "slab-in-body": (_grid(slab, (0.0, 0.0, 36.0)), _grid(whole, (0.0, 0.0, 0.0))),
        "body-around-slab": (_grid(whole, (0.0, 0.0, 0.0)), _grid(slab, (0.0, 0.0, 36.0))),
    }


@pytest.fixture(scope="module")
def maps(pairs) -> dict[str, tuple[Correlator, ShiftMaps]]:
    return {name: _maps(*pair) for name, pair in pairs.items()}


def _index(correlator: Correlator, shift: tuple[int, int, int]) -> tuple[int, ...]:
    return tuple(int(t) % s for t, s in zip(shift, correlator.size))


# (pair, shift): the true placement of the slab is shift (0, 0, +-6) (36 mm at 6 mm voxels).
SHIFTS = [
    ("two-bodies", (0, 0, 0)),
    ("two-bodies", (1, -2, 3)),
    ("two-bodies", (-3, -3, -2)),
    ("two-bodies", (-4, 3, -3)),
    ("two-bodies", (5, 5, 3)),
    ("slab-in-body", (0, 0, 6)),
    ("slab-in-body", (1, -1, 4)),
    ("body-around-slab", (0, 0, -6)),
    ("body-around-slab", (-2, 0, -8)),
]
SHIFT_IDS = [f"{pair}{list(shift)}" for pair, shift in SHIFTS]


@pytest.mark.parametrize(("pair", "shift"), SHIFTS, ids=SHIFT_IDS)
def test_mutual_information_and_overlap_at_a_shift_equal_similarity_at(pairs, maps, pair, shift) -> None:
    fixed, moving = pairs[pair]
    correlator, at_shifts = maps[pair]
    index = _index(correlator, shift)
    np.testing.assert_array_equal(correlator.shift(index), shift)
    mi, _, overlap = similarity_at(fixed, moving, _translation(fixed, moving, shift), BINS)
    assert overlap > 0
    # The maps are float32 FFTs of voxel counts: round-off of ~1e-3 counts, ~1e-5 nats.
    assert float(at_shifts.body_overlap[index]) == pytest.approx(overlap, abs=0.01)
    assert float(at_shifts.mutual_information[index]) == pytest.approx(mi, abs=1e-4)


@pytest.mark.parametrize(("pair", "shift"), SHIFTS, ids=SHIFT_IDS)
def test_gradient_agreement_at_a_shift_equals_similarity_at(pairs, maps, pair, shift) -> None:
    # placement scores its refined candidates with similarity_at on the scale of the maps' statistics and
    # compares them with unrefined candidates read off the maps, so the two must be one quantity.
    fixed, moving = pairs[pair]
    correlator, at_shifts = maps[pair]
    _, gradients, _ = similarity_at(fixed, moving, _translation(fixed, moving, shift), BINS)
    from_map = float(at_shifts.gradients[_index(correlator, shift)])
    assert from_map == pytest.approx(gradients, abs=1e-3), (
        f"{pair} at shift {shift}: FFT map {from_map:.4f}, similarity_at {gradients:.4f}"
    )


@pytest.mark.parametrize(("seed", "bins"), [(1, 3), (1, 6), (2, 6), (2, 12)])
def test_a_grid_matches_itself_best_unshifted(seed, bins) -> None:
    grid = search_grid(_body((30, 26, 22), seed), np.diag([3.0, 3.0, 3.0, 1.0]), SPACING_MM, bins)
    correlator, at_shifts = _maps(grid, grid, bins)
    # Over the shifts the placement considers: bodies overlapping by 30 % (PlacementConfig.min_overlap).
    valid = at_shifts.body_overlap >= 0.3 * float(grid.body.sum())
    for name in ("mutual_information", "gradients"):
        values = torch.where(
            valid, getattr(at_shifts, name), torch.full_like(at_shifts.gradients, -torch.inf)
        )
        best = np.unravel_index(int(torch.argmax(values)), values.shape)
        np.testing.assert_array_equal(correlator.shift(best), (0, 0, 0), err_msg=name)
    # Unshifted, the joint histogram is diagonal: MI is the entropy of the classes in the field of view.
    counts = torch.bincount(grid.bins[grid.fov], minlength=bins).double()
    p = counts[counts > 0] / counts.sum()
    entropy = float(-(p * p.log()).sum())
    assert float(at_shifts.mutual_information[0, 0, 0]) == pytest.approx(entropy, abs=1e-4)
    assert float(at_shifts.body_overlap[0, 0, 0]) == pytest.approx(float(grid.body.sum()), abs=0.01)


@pytest.mark.parametrize(
    ("fixed_at", "moving_at"),
    [
        ((0, 0, 0), (0, 0, 0)),
        ((2, 3, 1), (0, 0, 0)),  # moving voxel = fixed voxel + t, t negative on every axis
        ((0, 0, 0), (3, 7, 2)),  # the largest positive shift
        ((6, 4, 5), (0, 0, 0)),  # the most negative shift
        ((5, 0, 2), (1, 6, 2)),  # mixed signs and zero
    ],
)
def test_correlator_reads_an_index_back_as_its_shift(fixed_at, moving_at) -> None:
    fixed, moving = torch.zeros(7, 5, 6), torch.zeros(4, 8, 3)
    fixed[fixed_at], moving[moving_at] = 1.0, 1.0
    correlator = Correlator(tuple(fixed.shape), tuple(moving.shape))
    assert all(s >= f + m - 1 for s, f, m in zip(correlator.size, fixed.shape, moving.shape))
    correlation = correlator.correlate(correlator.spectrum(fixed), correlator.spectrum(moving))
    assert tuple(correlation.shape) == correlator.size
    index = np.unravel_index(int(torch.argmax(correlation)), correlation.shape)
    assert float(correlation[index]) == pytest.approx(1.0, abs=1e-5)
    np.testing.assert_array_equal(correlator.shift(index), np.subtract(moving_at, fixed_at))


def test_correlator_gives_every_shift_one_index() -> None:
    correlator = Correlator((7, 5, 6), (4, 8, 3))
    for axis, (f, m) in enumerate(zip((7, 5, 6), (4, 8, 3))):
        index = [0, 0, 0]
        shifts = []
        for i in range(correlator.size[axis]):
            index[axis] = i
            shifts.append(int(correlator.shift(tuple(index))[axis]))
        # Shifts from -(F - 1) to M - 1 are all represented, each once (the rest of the padding is unused).
        assert set(range(-(f - 1), m)) <= set(shifts) and len(set(shifts)) == len(shifts)


@pytest.mark.parametrize("offset_mm", [(1000.0, 0.0, 0.0), (0.0, -500.0, 300.0)])
def test_similarity_at_a_transform_without_overlap_is_zero(pairs, offset_mm) -> None:
    fixed, moving = pairs["two-bodies"]
    matrix = np.eye(4)
    matrix[:3, 3] = offset_mm
    assert similarity_at(fixed, moving, matrix, BINS) == (0.0, 0.0, 0)


def test_resample_grid_through_the_identity_returns_the_grid(pairs) -> None:
    grid = pairs["two-bodies"][0]
    image, classes, fov = resample_grid(grid, grid, np.eye(4))
    np.testing.assert_allclose(image.numpy(), grid.image.numpy(), atol=1e-5)
    assert bool((classes == grid.bins).all()) and bool((fov == grid.fov).all())


@pytest.mark.parametrize("pair", ["two-bodies", "slab-in-body", "body-around-slab"])
def test_mutual_information_only_where_bodies_overlap_equals_the_whole_map_there(pairs, pair) -> None:
    """``min_body`` skips the logarithms of the shifts nobody scores: where bodies overlap by at least it,
    MI is what the whole map holds; elsewhere 0; the other maps are untouched."""
    fixed, moving = pairs[pair]
    correlator, whole = _maps(fixed, moving)
    spectra = MovingSpectra(moving, correlator, BINS)
    least = 0.3 * min(float(fixed.body.sum()), float(moving.body.sum()))
    kept = shift_maps(fixed, correlator, spectra, BINS, min_body=least)
    where = whole.body_overlap >= least
    assert 0 < int(where.sum()) < where.numel()
    torch.testing.assert_close(kept.body_overlap, whole.body_overlap)
    torch.testing.assert_close(kept.gradients, whole.gradients)
    torch.testing.assert_close(kept.mutual_information[where], whole.mutual_information[where])
    assert (kept.mutual_information[~where] == 0).all()
