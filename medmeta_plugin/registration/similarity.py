"""Similarity of two scans for every relative shift at once, normalised over the voxels both scans saw.

Two measures, each computed for all integer shifts of the moving search grid against the fixed one with
FFT cross-correlations (so the search covers the whole extent of both scans, not a window around their
centres):

- **Mutual information** of the intensity classes (:attr:`~medmeta_plugin.registration.grids.SearchGrid.
  bins`): the joint histogram at shift t counts, for each pair of classes (a, b), the voxels x with class a
  in the fixed scan and class b at x + t in the moving one - a cross-correlation of two indicator volumes.
  Histograms and marginals are taken over the overlap of the two fields of view alone, so a 20 mm slab is
  scored on its 20 mm, not diluted by the rest of the other scan. Classes are quantiles of each body's
  intensities, so the measure does not care which modality is brighter where (CT and MR).
- **Normalised gradient fields** (Haber and Modersitzki): the squared cosine between the two scans'
  intensity gradients, summed over the overlap and divided by each field's energy there. Edges are where
  organs meet in any modality; the square ignores the edge's sign (fat bright on an MR, dark on a CT).

The two are put on one scale per pair (each as z-scores over the shifts with enough overlap) and added.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from medmeta_plugin.registration.grids import SearchGrid

__all__ = [
    "Correlator",
    "MovingSpectra",
    "ShiftMaps",
    "outline_agreement",
    "resample_grid",
    "shift_maps",
    "similarity_at",
]


def _fast_length(n: int) -> int:
    """The smallest m >= n whose prime factors are 2, 3 and 5 (FFTs of such lengths are fastest)."""
    while True:
        m = n
        for p in (2, 3, 5):
            while m % p == 0:
                m //= p
        if m == 1:
            return n
        n += 1


class Correlator:
    """Cross-correlations ``C(t) = sum_x f(x) m(x + t)`` of fixed- and moving-grid volumes for every shift t.

    Args:
        fixed_shape: shape of the fixed search grid (X, Y, Z); moving_shape: of the moving one.
    """

    def __init__(self, fixed_shape: tuple[int, ...], moving_shape: tuple[int, ...]) -> None:
        self.moving_shape = tuple(int(s) for s in moving_shape)
        self.size = tuple(_fast_length(int(a) + int(b) - 1) for a, b in zip(fixed_shape, moving_shape))

    def spectrum(self, volume: torch.Tensor) -> torch.Tensor:
        """The zero-padded real FFT of a volume of either grid."""
        return torch.fft.rfftn(volume.float(), s=self.size)

    def correlate(self, fixed: torch.Tensor, moving: torch.Tensor) -> torch.Tensor:
        """``C(t)`` from two spectra, shape :attr:`size`; an index's shift is :meth:`shift`."""
        return torch.fft.irfftn(torch.conj(fixed) * moving, s=self.size)

    def shift(self, index: tuple[int, ...]) -> np.ndarray:
        """The voxel shift t (moving voxel = fixed voxel + t) of a correlation map's index, shape (3,)."""
        return np.array(
            [i if i < m else i - s for i, m, s in zip(index, self.moving_shape, self.size)], dtype=np.float64
        )


@dataclass
class ShiftMaps:
    """Similarity of the two grids at every shift, each of shape :attr:`Correlator.size`.

    Attributes:
        mutual_information: of the intensity classes over the overlap of the fields of view (nats); 0 at the
            shifts whose body overlap is below the ``min_body`` of :func:`shift_maps`.
        gradients: normalised gradient fields' squared cosine over the overlap, in [0, 1].
        body_overlap: voxels of body in both scans.
    """

    mutual_information: torch.Tensor
    gradients: torch.Tensor
    body_overlap: torch.Tensor


def _xlogx(x: torch.Tensor) -> torch.Tensor:
    return torch.special.xlogy(x, x)


def _mutual_information(joint: torch.Tensor) -> torch.Tensor:
    """MI (nats) of joint counts of shape (A, B, ...) over their first two axes, per trailing index."""
    n = joint.sum((0, 1)).clamp(min=1.0)
    cross = _xlogx(joint).sum((0, 1)) - _xlogx(joint.sum(1)).sum(0) - _xlogx(joint.sum(0)).sum(0)
    return torch.log(n) + cross / n


def _gradient_products(normal: torch.Tensor) -> list[torch.Tensor]:
    """The 6 distinct products n_i n_j of a normalised gradient field, off-diagonal ones doubled, so that
    ``sum_k a_k * b_k`` over two fields' lists is ``(n_a . n_b)^2``."""
    return [normal[i] * normal[j] * (1.0 if i == j else np.sqrt(2.0)) for i in range(3) for j in range(i, 3)]


class MovingSpectra:
    """The moving grid's spectra, computed once and reused for every rotation of the fixed grid."""

    def __init__(self, moving: SearchGrid, correlator: Correlator, bins: int) -> None:
        self.classes = torch.stack(
            [correlator.spectrum((moving.bins == b) & moving.fov) for b in range(bins)]
        )
        normal = moving.normal
        self.products = torch.stack([correlator.spectrum(p) for p in _gradient_products(normal)])
        self.fov = correlator.spectrum(moving.fov.float())
        self.body = correlator.spectrum(moving.body & moving.fov)
        self.energy = correlator.spectrum(normal.square().sum(0))


def shift_maps(
    fixed: SearchGrid, correlator: Correlator, moving: MovingSpectra, bins: int, min_body: float = 0.0
) -> ShiftMaps:
    """:class:`ShiftMaps` of a fixed grid against a moving one's :class:`MovingSpectra`.

    The joint histogram is never held whole (bins^2 maps): MI is accumulated one fixed class at a time as
    ``log N + (sum C log C - sum A log A - sum B log B) / N`` over counts C, their marginals A and B, and only
    at the shifts whose body overlap reaches ``min_body`` voxels (the only ones a caller scores; MI is 0
    elsewhere): the logarithms are most of the work.
    """
    size, dims = correlator.size, (1, 2, 3)
    # Body overlap first, from the two bodies directly (the sum of the body classes' counts, by linearity).
    body = correlator.correlate(correlator.spectrum(fixed.body & fixed.fov), moving.body).clamp_(min=0)
    keep = (body >= min_body).view(-1).nonzero().squeeze(1)
    cross = torch.zeros(keep.numel())
    fixed_marginal = torch.zeros(keep.numel())
    moving_marginal = torch.zeros((bins, keep.numel()))
    for b in range(bins):
        spectrum = correlator.spectrum((fixed.bins == b) & fixed.fov)
        counts = torch.fft.irfftn(torch.conj(spectrum)[None] * moving.classes, s=size, dim=dims)
        counts = counts.view(bins, -1)[:, keep].clamp_(min=0)
        cross += _xlogx(counts).sum(0)
        fixed_marginal += _xlogx(counts.sum(0))
        moving_marginal += counts
    total = moving_marginal.sum(0).clamp(min=1.0)
    cross = cross - fixed_marginal - _xlogx(moving_marginal).sum(0)
    mutual_information = torch.zeros(size)
    mutual_information.view(-1)[keep] = torch.log(total) + cross / total
    normal = fixed.normal
    products = torch.stack([correlator.spectrum(p) for p in _gradient_products(normal)])
    agreement = torch.fft.irfftn((torch.conj(products) * moving.products).sum(0), s=size)
    energy_fixed = correlator.correlate(correlator.spectrum(normal.square().sum(0)), moving.fov)
    energy_moving = correlator.correlate(correlator.spectrum(fixed.fov.float()), moving.energy)
    gradients = agreement / torch.sqrt(energy_fixed.clamp(min=1e-3) * energy_moving.clamp(min=1e-3))
    return ShiftMaps(mutual_information, gradients, body)


def resample_grid(
    moving: SearchGrid, fixed: SearchGrid, matrix: np.ndarray, fields: torch.Tensor | None = None
) -> tuple[torch.Tensor, ...]:
    """The moving grid's image, classes and field of view on the fixed grid through ``matrix`` (fixed world
    -> moving world): each (X, Y, Z) of the fixed grid; with ``fields`` (C, X', Y', Z') on the moving grid,
    also those, resampled linearly, (C, X, Y, Z)."""
    to_moving = np.linalg.inv(moving.affine) @ matrix @ fixed.affine
    shape = tuple(fixed.image.shape)
    index = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).reshape(-1, 3)
    source = index @ to_moving[:3, :3].T + to_moving[:3, 3]
    size = np.array(moving.image.shape)
    inside = torch.from_numpy(((source >= -0.5) & (source <= size - 0.5)).all(1).reshape(shape))
    normalised = 2 * source / np.maximum(size - 1, 1) - 1
    sample = torch.from_numpy(normalised[:, ::-1].astype(np.float32).copy()).view(1, *shape, 3)

    def at(volume: torch.Tensor, mode: str) -> torch.Tensor:
        channels = volume.float()[None] if volume.ndim == 3 else volume.float()
        out = torch.nn.functional.grid_sample(
            channels[None], sample, mode=mode, padding_mode="border", align_corners=True
        )
        return out[0, 0] if volume.ndim == 3 else out[0]

    fov = (at(moving.fov, "nearest") > 0.5) & inside
    out = (at(moving.image, "bilinear"), at(moving.bins, "nearest").long(), fov)
    return out if fields is None else (*out, at(fields, "bilinear") * fov)


def similarity_at(
    fixed: SearchGrid, moving: SearchGrid, matrix: np.ndarray, bins: int
) -> tuple[float, float, int]:
    """Mutual information, gradient agreement and body overlap (voxels) of the two grids at one transform.

    The same quantities as :func:`shift_maps` gives at a shift, for any ``matrix`` (4x4, fixed world ->
    moving world, RAS mm): the moving grid's classes and normalised gradient field (computed on its own
    grid, as the maps do) are resampled onto the fixed grid, the gradients turned into the fixed frame.
    """
    _, classes, fov, normal = resample_grid(moving, fixed, matrix, moving.normal)
    # A gradient in the moving frame, seen from the fixed frame: g_f = A^T g_m (A the linear part).
    n_moving = torch.einsum("ji,j...->i...", torch.from_numpy(matrix[:3, :3].astype(np.float32)), normal)
    both = fov & fixed.fov
    joint = torch.zeros(bins, bins)
    pairs = fixed.bins[both] * bins + classes[both]
    joint += torch.bincount(pairs, minlength=bins * bins).view(bins, bins).float()
    mi = float(_mutual_information(joint[..., None])[0])
    n_fixed = fixed.normal
    agreement = float(((n_fixed * n_moving).sum(0).square() * both).sum())
    energy_fixed = float((n_fixed.square().sum(0) * both).sum())
    energy_moving = float((n_moving.square().sum(0) * both).sum())
    gradients = agreement / np.sqrt(max(energy_fixed, 1e-3) * max(energy_moving, 1e-3))
    return mi, gradients, int(joint[1:, 1:].sum())


def outline_agreement(fixed: SearchGrid, moving: SearchGrid, matrix: np.ndarray) -> float:
    """Dice of the two bodies' outlines (:attr:`~medmeta_plugin.registration.grids.SearchGrid.outline`)
    where both scans see, at ``matrix`` (fixed world -> moving world).

    Two right placements of one body region coincide in outline (two adults' abdomens, two heads), across CT
    and MR too; a head placed in an abdomen does not, however well its inner edges happen to match
    (docs/benchmarks/placement.md has the development pairs' figures).
    """
    _, _, fov, outline = resample_grid(moving, fixed, matrix, moving.outline[None].float())
    both = fov & fixed.fov
    a, b = fixed.outline & both, (outline[0] > 0.5) & both
    total = int(a.sum() + b.sum())
    return float(2 * (a & b).sum() / total) if total else 0.0
