"""The in-context refiner: a network that reads a scan beside the mask registration carried onto it.

A structure's labelled scans, placed and registered onto a new scan, carry their masks over
(:mod:`medmeta_plugin.adapt.atlas`); where the two patients differ, the carried boundary misses the image's.
The refiner learns the local skill of moving a carried boundary onto the edges under it - a skill that does
not depend on which structure it is, so it transfers to structures it never saw (issue 18; figures in
``docs/benchmarks/incontext.md``). It is a :class:`~medmeta_plugin.networks.Backbone3D` with two input
channels (the scan and the carried prior) and a 1x1x1 head, trained by ``medmeta benchmark incontext
--save``, shipped as ``sample_apps/backbone/refiner.safetensors`` + ``.json``.

:func:`refine_prior` is how every user runs it: on the box of the carried prior and a margin around it
(the region where the boundary can move), its intensities standardised as in training.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from medmeta_plugin.networks.backbone import Backbone3D, BackboneConfig
from medmeta_plugin.transforms import pad_to_multiple

__all__ = [
    "CARRIED_FLOOR",
    "KEEP_SIMILARITY",
    "REFINER_MARGIN_MM",
    "Refiner",
    "carried_similarity",
    "keeps_carried",
    "refine_prior",
    "refiner_box",
]

#: How far around the carried prior the refiner looks (mm): the training carries move a boundary by up to
#: 12 mm of shift and 9 mm of warp (:class:`~medmeta_plugin.episodes.carried.CarryConfig`).
REFINER_MARGIN_MM = 24.0
#: A carried prior above this marks where the structure may be: the box is drawn around it, and a prior with
#: none of it is empty (nothing to refine).
CARRIED_FLOOR = 0.05
# The smallest box edge (voxels), the training crops' edge: instance normalisation sees a context like theirs.
MIN_BOX = 48
#: A carried scan that correlates with the query this well on the refiner's box (:func:`carried_similarity`)
#: matches it as a rescan of one patient does: the carried mask is kept, not refined. The refiner learned to
#: correct the misalignment between two anatomies; where there is none it can only add its own error. Read
#: between the values of development structures (docs/BENCHMARKS.md#in-context-refinement).
KEEP_SIMILARITY = 0.92


class Refiner(nn.Module):
    """Scan and carried prior in, the structure's logits out: a two-channel backbone and a 1x1x1 head.

    Args:
        features: the backbone's channels per level, finest first.
    """

    def __init__(self, features: tuple[int, ...] = (16, 32, 64, 128)) -> None:
        super().__init__()
        self.backbone = Backbone3D(BackboneConfig(in_channels=2, features=tuple(features)))
        self.head = nn.Conv3d(self.backbone.feature_channels, 1, kernel_size=1)

    @property
    def divisor(self) -> int:
        """Input edges must be multiples of this."""
        return 2 ** (len(self.backbone.config.features) - 1)

    def forward(self, image: torch.Tensor, carried: torch.Tensor) -> torch.Tensor:
        """Logits, shape (B, 1, X, Y, Z), of images (B, 1, X, Y, Z) with their carried priors (same shape)."""
        return self.head(self.backbone(torch.cat([image, carried], 1)).features)


def _box(prior: torch.Tensor, margin: tuple[int, int, int], divisor: int) -> tuple[slice, slice, slice]:
    """The voxels of ``prior`` (X, Y, Z) above :data:`CARRIED_FLOOR`, grown by ``margin`` voxels per axis,
    at least :data:`MIN_BOX` and a multiple of ``divisor`` per axis where the scan allows, clipped to the
    scan."""
    where = (prior > CARRIED_FLOOR).nonzero()
    if where.numel() == 0:
        raise ValueError("the carried prior is empty: there is nothing to refine.")
    box = []
    for axis, size in enumerate(prior.shape):
        lo, hi = int(where[:, axis].min()) - margin[axis], int(where[:, axis].max()) + 1 + margin[axis]
        want = max(hi - lo, MIN_BOX)
        want = min(math.ceil(want / divisor) * divisor, size)
        centre = (lo + hi) // 2
        start = min(max(centre - want // 2, 0), size - want)
        box.append(slice(start, start + want))
    return box[0], box[1], box[2]


def refiner_box(
    prior: torch.Tensor, spacing_mm: tuple[float, float, float], divisor: int
) -> tuple[slice, slice, slice]:
    """Where the refiner runs: the box of ``prior`` (X, Y, Z) above :data:`CARRIED_FLOOR` and
    :data:`REFINER_MARGIN_MM` around it, at least :data:`MIN_BOX` voxels an edge and a multiple of
    ``divisor`` where the scan allows.

    Raises:
        ValueError: if the prior is empty.
    """
    margin = tuple(math.ceil(REFINER_MARGIN_MM / s) for s in spacing_mm)
    return _box(prior, margin, divisor)  # type: ignore[arg-type]


def carried_similarity(
    image: torch.Tensor,
    carried_images: tuple[torch.Tensor, ...],
    prior: torch.Tensor,
    spacing_mm: tuple[float, float, float],
    divisor: int,
) -> float | None:
    """How closely the labelled scans, carried onto the query, match it where the refiner would run: the
    mean over scans of their Pearson correlation with ``image`` on :func:`refiner_box` of ``prior``.

    Args:
        image: the query on its working grid, shape (X, Y, Z); carried_images: each labelled scan carried
            onto that grid (:attr:`~medmeta_plugin.adapt.atlas.CarriedPrior.images`), the same shape.
        prior: the carried prior on that grid, (X, Y, Z); spacing_mm, divisor: as :func:`refiner_box`.

    Returns:
        The correlation in [-1, 1]; None without carried images or when the prior is empty (nothing was
        carried onto this scan, so there is nothing to refine or keep).
    """
    if not carried_images or not bool((prior > CARRIED_FLOOR).any()):
        return None
    box = refiner_box(prior, spacing_mm, divisor)
    query = image[box].float().flatten()
    query = (query - query.mean()) / (query.std(correction=0) + 1e-6)
    values = []
    for carried in carried_images:
        other = carried[box].float().flatten()
        other = (other - other.mean()) / (other.std(correction=0) + 1e-6)
        values.append(float((query * other).mean()))
    return float(np.mean(values))


def keeps_carried(similarity: float | None) -> bool:
    """Whether the carried mask is kept rather than refined: the labelled scans match the query as a rescan
    does (``similarity`` from :func:`carried_similarity` at least :data:`KEEP_SIMILARITY`); False without a
    similarity."""
    return similarity is not None and similarity >= KEEP_SIMILARITY


@torch.no_grad()
def refine_prior(
    model: Refiner,
    image: torch.Tensor,
    prior: torch.Tensor,
    spacing_mm: tuple[float, float, float],
    blind: bool = False,
) -> tuple[torch.Tensor, tuple[slice, slice, slice]]:
    """The refiner's logits of a structure on the box around its carried prior.

    Args:
        model: the refiner (eval mode).
        image: the scan on its working grid, shape (X, Y, Z), float.
        prior: the carried prior on the same grid, shape (X, Y, Z), in [0, 1] (the mean of the labelled
            scans' carried masks).
        spacing_mm: the grid's voxel size, to turn :data:`REFINER_MARGIN_MM` into voxels.
        blind: give the network the box but an empty carried channel (an ablation: what the scan alone says).

    Returns:
        Logits on the box, shape of ``image[box]``, float32 on the CPU, and the box (slices of the grid).

    Raises:
        ValueError: if the shapes differ or the prior is empty.
    """
    if image.shape != prior.shape or image.dim() != 3:
        raise ValueError(f"image and prior must be (X, Y, Z) of one shape, got {image.shape}, {prior.shape}.")
    box = refiner_box(prior, spacing_mm, model.divisor)
    crop = image[box].float()
    crop = (crop - crop.mean()) / (crop.std() + 1e-6)  # as the training crops are
    carried = torch.zeros_like(crop) if blind else prior[box].float()
    shape = crop.shape
    device = next(model.parameters()).device
    x = pad_to_multiple(crop[None, None], model.divisor, "replicate").to(device)
    c = pad_to_multiple(carried[None, None], model.divisor).to(device)
    logits = model(x, c)[0, 0, : shape[0], : shape[1], : shape[2]]
    return logits.float().cpu(), box
