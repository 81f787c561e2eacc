"""Global placement: where one scan lies in another, over the whole extent of both, and how sure that is.

Local registration (:mod:`~medmeta_plugin.registration.stages`) only finds the optimum nearest to where it
starts. Two scans of different patients, scanners or fields of view (a 40 mm slab against a whole abdomen,
a brain at another scanner pose) start anywhere, so a placement stage finds the start first:

1. Both scans are resampled onto coarse axis-aligned RAS grids (:func:`~medmeta_plugin.registration.grids.
   search_grid`): voxel order, header orientation and spacing no longer matter.
2. For every integer shift of one grid against the other (the whole extent of both, by FFT), the
   similarity of :mod:`~medmeta_plugin.registration.similarity` over the overlap of the two fields of view,
   kept only where the bodies overlap by at least ``min_overlap`` of the smaller body. With ``rotations``
   the fixed grid is also turned by each rotation first (the patient's own pose).
3. The best ``peaks`` shifts per rotation, at least ``separation_mm`` apart, are candidates; the best
   ``refine`` of them are refined by a rigid registration at the coarse level and scored again.
4. The best refined candidate is the placement. Its confidence (:func:`confidence`) comes from how far it
   stands out - its margin over the best candidate that puts the scan more than ``distinct_mm`` elsewhere
   (a second, different answer that is nearly as good is a guess, not a finding) - from how well the two
   scans' edges agree there, and from how well their bodies' outlines do (a head in an abdomen does not
   fit its outline, however its inner edges happen to match).

Every matrix maps a fixed (query) world point, RAS mm, to the moving (support) world point on it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from medmeta_plugin.registration.grids import SearchGrid, check_volume, search_grid
from medmeta_plugin.registration.itk_bridge import euler_from_matrix, matrix_from_transform
from medmeta_plugin.registration.pyramid import Pyramid
from medmeta_plugin.registration.similarity import (
    Correlator,
    MovingSpectra,
    outline_agreement,
    resample_grid,
    shift_maps,
    similarity_at,
)
from medmeta_plugin.registration.stages import optimise

__all__ = ["Placement", "PlacementConfig", "place", "rotation_matrix"]


@dataclass(frozen=True)
class PlacementConfig:
    """Settings of :func:`place`; the defaults are the app's and the benchmarks'.

    Attributes:
        spacing_mm: the search grids' voxel size.
        bins: intensity classes per scan for mutual information (air plus body quantiles).
        min_overlap: least body overlap of a candidate, as a fraction of the smaller scan's body.
        peaks: candidates kept per rotation; separation_mm: least distance between two of them.
        rotations: rotation vectors (degrees, RAS) of the fixed scan tried; ``(0, 0, 0)`` must be first.
        refine: best candidates refined by a rigid registration and scored again.
        distinct_mm: a candidate farther than this from the best (at the fixed scan's body centre) is a
            different answer; the best of those sets the margin.
        threshold: least confidence of a placement that is served as sure, chosen on the development pairs
            (docs/benchmarks/placement.md: how many wrong and right placements fall on each side).
    """

    spacing_mm: float = 6.0
    bins: int = 6
    min_overlap: float = 0.3
    peaks: int = 4
    separation_mm: float = 25.0
    rotations: tuple[tuple[float, float, float], ...] = ((0.0, 0.0, 0.0),)
    refine: int = 4
    distinct_mm: float = 30.0
    threshold: float = 0.6

    def __post_init__(self) -> None:
        if not 1.0 <= self.spacing_mm <= 20.0:
            raise ValueError(f"spacing_mm must be in [1, 20] mm, got {self.spacing_mm}.")
        if not 3 <= self.bins <= 16:
            raise ValueError(f"bins must be in [3, 16], got {self.bins}.")
        if not 0.0 < self.min_overlap <= 1.0:
            raise ValueError(f"min_overlap must be in (0, 1], got {self.min_overlap}.")
        if self.peaks < 1 or self.refine < 1:
            raise ValueError(f"peaks and refine must be >= 1, got {self.peaks} and {self.refine}.")
        if not self.rotations or tuple(self.rotations[0]) != (0.0, 0.0, 0.0):
            raise ValueError(f"rotations must start with (0, 0, 0), got {self.rotations}.")


@dataclass(frozen=True)
class Placement:
    """Where the fixed scan lies in the moving one (the start of the local registration stages).

    Attributes:
        matrix: 4x4 world transform (RAS mm), fixed point -> moving point, rigid.
        score: the chosen candidate's similarity (z-score units of this pair's shift maps).
        margin: its score minus that of the best candidate placing the scan more than ``distinct_mm``
            away (``score`` itself when there is none).
        overlap: body overlap at the placement, as a fraction of the smaller scan's body.
        gradients: the normalised gradient fields' agreement at the placement, in [0, 1] (not z-scored).
        outline: Dice of the two bodies' outlines where both scans see (:func:`~medmeta_plugin.registration.
            similarity.outline_agreement`).
        confidence: in [0, 1], from margin, gradients and outline (:func:`confidence`).
        sure: ``confidence >= threshold``: the placement is served as a finding, else flagged as a guess.
        seconds: wall time.
        candidates: (score, matrix) of every refined candidate, best first.
    """

    matrix: np.ndarray
    score: float
    margin: float
    overlap: float
    gradients: float
    outline: float
    confidence: float
    sure: bool
    seconds: float
    candidates: tuple[tuple[float, np.ndarray], ...] = field(default=(), repr=False)

    def to_dict(self) -> dict[str, float | bool]:
        """The figures a client is told (rounded), for the infer response and the log."""
        return {
            "confidence": round(self.confidence, 3),
            "sure": self.sure,
            "score": round(self.score, 2),
            "margin": round(self.margin, 2),
            "overlap": round(self.overlap, 3),
            "gradients": round(self.gradients, 3),
            "outline": round(self.outline, 3),
        }


def rotation_matrix(rotation_deg: tuple[float, float, float] | np.ndarray) -> np.ndarray:
    """The 3x3 rotation of a rotation vector in degrees (axis times angle, Rodrigues' formula)."""
    vector = np.deg2rad(np.asarray(rotation_deg, dtype=np.float64))
    angle = float(np.linalg.norm(vector))
    if angle < 1e-12:
        return np.eye(3)
    k = vector / angle
    cross = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return np.eye(3) + np.sin(angle) * cross + (1 - np.cos(angle)) * cross @ cross


# How confidence is computed: a logistic curve of three figures of the chosen placement, fitted on the
# development pairs of the field-of-view suite (docs/benchmarks/placement.md), where a placement is wrong if
# it lies more than 30 mm from the truth along the body axis or pairs a head with an abdomen. The margin is
# capped (a placement with no rival at all is not infinitely sure). The outline replaced the Otsu body's
# Dice, which on MR follows whichever tissue the sequence makes bright. The score itself is left out: as a
# z-score over every shift it grows with the number of shifts a thin slab has in a long scan, so a head
# slab in an abdomen scored as high as a right placement (docs/benchmarks/placement.md).
CONFIDENCE_WEIGHTS = {"margin": 0.239, "gradients": 12.413, "outline": 7.571}
CONFIDENCE_BIAS = -11.028
MARGIN_CAP = 10.0
# A near tie between two distinct answers is a guess whatever the other figures say: below this margin the
# curve's value is scaled down linearly to 0 at a tie. The logistic gives the margin little weight (it is
# weak evidence over most of its range), so a copy of the abdominal CT placed on the MR with a rival 30+ mm
# away scoring 0.03 below it came out 0.85 sure and its mask was carried (abdomen-ct-to-mr, 5 shots). On the
# development and first test pairs every placement with a margin under 0.5 was wrong but one right one
# (0.17, flagged by the curve already); right ones start at 1.14 (docs/benchmarks/placement.md).
TIE_MARGIN = 0.5
# Voxels the rigid refinement of a candidate samples (a seeded regular grid): 0.09 s a candidate where all
# of a 6 mm grid's voxels took 0.2-0.5 s, for a start that the local stages refine again anyway.
REFINE_SAMPLES = 10_000


def confidence(margin: float, gradients: float, outline: float) -> float:
    """The probability, by the development suite, that a placement with these figures is right.

    A logistic curve of the three figures, scaled down linearly below a margin of ``TIE_MARGIN`` (a near tie
    of two distinct answers is a guess; 0 at an exact tie).

    Args:
        margin: :attr:`Placement.margin` (capped at ``MARGIN_CAP``); gradients: :attr:`Placement.gradients`;
        outline: :attr:`Placement.outline`.
    """
    figures = {"margin": min(margin, MARGIN_CAP), "gradients": gradients, "outline": outline}
    z = CONFIDENCE_BIAS + sum(CONFIDENCE_WEIGHTS[k] * v for k, v in figures.items())
    return float(tie_scale(margin)) / (1.0 + float(np.exp(-z)))


def tie_scale(margin: float | np.ndarray) -> float | np.ndarray:
    """The factor in [0, 1] the confidence's curve is scaled by: 1 from ``TIE_MARGIN`` up, falling linearly
    to 0 at a tie (a margin of 0); elementwise for an array of margins."""
    return np.clip(np.asarray(margin, dtype=np.float64) / TIE_MARGIN, 0.0, 1.0)


def _rotated(grid: SearchGrid, rotation: np.ndarray, centre: np.ndarray, bins: int) -> SearchGrid:
    """The grid's content turned by ``rotation`` about ``centre`` (RAS mm), resampled onto the same grid."""
    turn = np.eye(4)
    turn[:3, :3] = rotation
    turn[:3, 3] = centre - rotation @ centre
    # content'(p) = content(turn^-1 p): resample through turn^-1 as a fixed -> moving matrix onto itself
    image, classes, fov, outline = resample_grid(grid, grid, np.linalg.inv(turn), grid.outline[None].float())
    return SearchGrid(image, fov, classes, grid.affine, outline[0] > 0.5)


def _body_centre(grid: SearchGrid) -> np.ndarray:
    """World position (RAS mm) of the body's centre of mass on a grid, shape (3,)."""
    index = grid.body.nonzero().double().mean(0).numpy() if grid.body.any() else np.array(grid.body.shape) / 2
    return (grid.affine @ np.r_[index, 1.0])[:3]


class _Scorer:
    """A refined candidate's score on the scale of the identity rotation's shift maps."""

    def __init__(self, fixed: SearchGrid, moving: SearchGrid, bins: int, stats: tuple[float, ...]) -> None:
        self.fixed, self.moving, self.bins, self.stats = fixed, moving, bins, stats

    def __call__(self, matrix: np.ndarray) -> tuple[float, int, float]:
        """(score, body overlap in voxels, gradient agreement) at ``matrix``."""
        mi, gradients, overlap = similarity_at(self.fixed, self.moving, matrix, self.bins)
        mi_mean, mi_std, g_mean, g_std = self.stats
        return (mi - mi_mean) / mi_std + (gradients - g_mean) / g_std, overlap, gradients


def place(
    fixed: np.ndarray,
    fixed_affine: np.ndarray,
    moving: np.ndarray,
    moving_affine: np.ndarray,
    config: PlacementConfig | None = None,
    pyramids: tuple[Pyramid, Pyramid] | None = None,
) -> Placement:
    """Find where the fixed scan lies in the moving one, over the whole extent of both (module docstring).

    Args:
        fixed: the query scan, shape (X, Y, Z), any intensity scale; fixed_affine: its 4x4 voxel-to-world
            matrix (RAS mm), any voxel order, orientation and spacing.
        moving: the support (labelled) scan, shape (X', Y', Z'); moving_affine: its matrix.
        config: search settings (:class:`PlacementConfig`).
        pyramids: the two scans' ITK levels (fixed, moving) when the caller reuses them afterwards
            (:func:`~medmeta_plugin.registration.register`); made here otherwise.

    Returns:
        The :class:`Placement` (rigid fixed -> moving matrix, score, margin, confidence).

    Raises:
        ValueError: if an array is not 3D or holds NaN/inf, an affine is not an invertible 4x4 matrix, or
            the scans share no shift with enough body overlap (e.g. one of them holds no body).
    """
    config = config or PlacementConfig()
    fixed, fixed_affine = check_volume(fixed, fixed_affine, "fixed")
    moving, moving_affine = check_volume(moving, moving_affine, "moving")
    start = time.perf_counter()
    grid_f = search_grid(fixed, fixed_affine, config.spacing_mm, config.bins)
    grid_m = search_grid(moving, moving_affine, config.spacing_mm, config.bins)
    smaller = min(int(grid_f.body.sum()), int(grid_m.body.sum()))
    if smaller < 8:
        raise ValueError(
            f"placement needs a body in both scans: {int(grid_f.body.sum())} and {int(grid_m.body.sum())} "
            f"body voxels at {config.spacing_mm} mm."
        )
    correlator = Correlator(grid_f.image.shape, grid_m.image.shape)
    spectra = MovingSpectra(grid_m, correlator, config.bins)
    centre = _body_centre(grid_f)
    candidates: list[tuple[float, np.ndarray]] = []
    stats = None
    radius = max(1, int(round(config.separation_mm / config.spacing_mm)))
    for rotation_deg in config.rotations:
        rotation = rotation_matrix(rotation_deg)
        grid = grid_f if stats is None else _rotated(grid_f, rotation, centre, config.bins)
        maps = shift_maps(grid, correlator, spectra, config.bins, config.min_overlap * smaller)
        valid = maps.body_overlap >= config.min_overlap * smaller
        if not valid.any():
            continue
        if stats is None:  # the identity rotation's maps set the scale every candidate is scored on
            mi, gr = maps.mutual_information[valid], maps.gradients[valid]
            stats = (float(mi.mean()), float(mi.std()) + 1e-9, float(gr.mean()), float(gr.std()) + 1e-9)
        score = (maps.mutual_information - stats[0]) / stats[1] + (maps.gradients - stats[2]) / stats[3]
        score = torch.where(valid, score, torch.full_like(score, -torch.inf))
        turn = np.eye(4)
        turn[:3, :3] = rotation
        turn[:3, 3] = centre - rotation @ centre
        for _ in range(config.peaks):
            flat = int(torch.argmax(score))
            value = float(score.view(-1)[flat])
            if not np.isfinite(value):
                break
            index = np.unravel_index(flat, score.shape)
            _suppress(score, index, radius)
            shift = np.eye(4)
            shift[:3, 3] = grid_m.affine[:3, 3] - grid.affine[:3, 3] + correlator.shift(index) * grid.spacing
            candidates.append((value, shift @ turn))
    if stats is None or not candidates:
        raise ValueError(
            "placement found no relative position where the two scans' bodies overlap by at least "
            f"{config.min_overlap:.0%} of the smaller one."
        )
    candidates.sort(key=lambda c: -c[0])
    scorer = _Scorer(grid_f, grid_m, config.bins, stats)
    pyramids = pyramids or (Pyramid(fixed, fixed_affine), Pyramid(moving, moving_affine))
    refined = _refine(pyramids, candidates[: config.refine], centre, scorer)
    best_score, best, overlap, gradients = refined[0]
    others = [s for s, m, _, _ in refined[1:] if _distance(m, best, centre) > config.distinct_mm]
    others += [s for s, m in candidates[config.refine :] if _distance(m, best, centre) > config.distinct_mm]
    margin = best_score - max(others) if others else best_score
    outline = outline_agreement(grid_f, grid_m, best)
    conf = confidence(margin, gradients, outline)
    return Placement(
        matrix=best,
        score=best_score,
        margin=margin,
        overlap=overlap / smaller,
        gradients=gradients,
        outline=outline,
        confidence=conf,
        sure=conf >= config.threshold,
        seconds=time.perf_counter() - start,
        candidates=tuple((s, m) for s, m, _, _ in refined),
    )


def _suppress(score: torch.Tensor, index: tuple[int, ...], radius: int) -> None:
    """Set the shifts within ``radius`` voxels of ``index`` to -inf (circularly: maps wrap around)."""
    ranges = [np.arange(i - radius, i + radius + 1) % n for i, n in zip(index, score.shape)]
    score[np.ix_(*ranges)] = -torch.inf


def _distance(a: np.ndarray, b: np.ndarray, point: np.ndarray) -> float:
    """How far apart two fixed -> moving matrices put one fixed point (mm)."""
    p = np.r_[point, 1.0]
    return float(np.linalg.norm((a @ p - b @ p)[:3]))


def _refine(
    pyramids: tuple[Pyramid, Pyramid],
    candidates: list[tuple[float, np.ndarray]],
    centre: np.ndarray,
    scorer: _Scorer,
) -> list[tuple[float, np.ndarray, int, float]]:
    """Each candidate refined rigidly (ITK, Mattes MI, at the search's coarse level) and scored again, as
    (score, matrix, body overlap, gradient agreement); best first. A refinement that fails or leaves the
    overlap keeps the candidate as it was."""
    spacing = scorer.fixed.spacing
    levels = [p.level(max(1, int(round(spacing / p.voxel_mm)))) for p in pyramids]
    out = []
    for _, matrix in candidates:
        rigid = euler_from_matrix(matrix, centre)
        try:
            optimise(levels[0], levels[1], rigid, iterations=50, max_samples=REFINE_SAMPLES)
            refined = matrix_from_transform(rigid)
        except RuntimeError:
            refined = matrix
        score, overlap, gradients = scorer(refined)
        if overlap == 0:
            score, overlap, gradients = scorer(matrix)
            refined = matrix
        out.append((score, refined, overlap, gradients))
    out.sort(key=lambda c: -c[0])
    return out
