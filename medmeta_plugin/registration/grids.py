"""Scans on the placement search's grid: axis-aligned in RAS world space, isotropic, coarse.

Two scans may store their voxels in any order, with any header orientation (axial, coronal, sagittal,
oblique) and any spacing; resampled through their affines onto grids whose axes are the world's R, A and S
at one spacing, the two differ only by where the body lies (and by the patient's own pose), which is what
the search looks for. A grid keeps the mask of its scan's field of view, so a similarity is computed over
the voxels both scans saw, never over padding.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch
from scipy import ndimage

# Air kept around the body on a search grid, in voxels: its outline is part of what the search matches.
_MARGIN = 2

__all__ = [
    "SearchGrid",
    "air_threshold",
    "check_volume",
    "otsu_threshold",
    "search_grid",
    "soft_tissue_window",
]


@dataclass(frozen=True)
class SearchGrid:
    """A scan resampled for the placement search.

    Attributes:
        image: soft-tissue windowed intensities, shape (X, Y, Z), float32 (the scan's first and last
            values repeated outside its field of view).
        fov: inside the scan's field of view, shape (X, Y, Z), bool.
        bins: intensity class of each voxel, shape (X, Y, Z), int64: 0 outside the body (air, table), then
            ``1 .. bins - 1`` quantiles of the body's intensities, so a class means "darker than 30 % of
            this body", whatever the modality's scale.
        affine: the grid's 4x4 voxel-to-world matrix (RAS mm): the spacing on the diagonal, no rotation.
        outline: the body's outline in the field of view, shape (X, Y, Z), bool: everything brighter than
            air (:func:`air_threshold` of the unwindowed scan) and the body, each axial slice's holes
            filled. Unlike :attr:`body` alone it does not hang on which tissue a sequence makes bright (dark
            muscle and organs at an MR's surface), so two scans of one body region share it across CT and MR.
    """

    image: torch.Tensor
    fov: torch.Tensor
    bins: torch.Tensor
    affine: np.ndarray
    outline: torch.Tensor

    @property
    def body(self) -> torch.Tensor:
        """Voxels of the body in the field of view, shape (X, Y, Z), bool."""
        return self.bins > 0

    @property
    def spacing(self) -> float:
        return float(self.affine[0, 0])

    @cached_property
    def normal(self) -> torch.Tensor:
        """The normalised gradient field, shape (3, X, Y, Z), computed once per grid: the gradient over
        sqrt(|gradient|^2 + eps^2) inside the field of view, eps a fifth of the median gradient magnitude in
        the body (noise-sized gradients count for little)."""
        gradient = torch.stack(torch.gradient(self.image)) * self.fov
        magnitude = gradient.square().sum(0)
        inside = magnitude[self.body & (magnitude > 0)]
        eps2 = float(inside.median()) / 25.0 if inside.numel() else 1.0
        return gradient / torch.sqrt(magnitude + max(eps2, 1e-12))


def check_volume(array: np.ndarray, affine: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray]:
    """``array`` as float32 and ``affine`` as float64, or a ValueError naming ``name`` and what is wrong."""
    array = np.asarray(array)
    affine = np.asarray(affine, dtype=np.float64)
    if array.ndim != 3 or min(array.shape) < 2:
        raise ValueError(
            f"{name} must be a 3D array (X, Y, Z) with every size >= 2, got shape {array.shape}."
        )
    if affine.shape != (4, 4) or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise ValueError(f"{name}_affine must be an invertible 4x4 voxel-to-world matrix, got {affine!r}.")
    if not np.isfinite(affine).all():
        raise ValueError(f"{name}_affine holds NaN or infinite values.")
    if not np.isfinite(array).all():
        raise ValueError(f"{name} holds NaN or infinite values.")
    return array.astype(np.float32, copy=False), affine


def otsu_threshold(values: np.ndarray) -> float:
    """Otsu's threshold of ``values`` (any shape) over a 256-bin histogram: body above it, air below."""
    values = np.asarray(values, dtype=np.float32)
    if values.size == 0 or float(values.max()) - float(values.min()) <= 1e-6 * max(
        1.0, abs(float(values.max()))
    ):
        return float(values.max()) if values.size else 0.0  # a constant scan: nothing lies above it
    counts, edges = np.histogram(values, bins=256)
    centres = (edges[:-1] + edges[1:]) / 2
    below = np.cumsum(counts)
    above = below[-1] - below
    mass = np.cumsum(counts * centres)
    mean_below = mass / np.maximum(below, 1)
    mean_above = (mass[-1] - mass) / np.maximum(above, 1)
    return float(centres[np.argmax(below * above * (mean_below - mean_above) ** 2)])


# Between-class over total variance of an Otsu split at which it separates two modes rather than cutting one:
# about 64 % for a single Gaussian mode, 76-88 % between air and tissue on this project's real scans.
_TWO_MODES = 0.7


def _separation(values: np.ndarray, threshold: float) -> float:
    """Between-class variance of ``values`` split at ``threshold``, as a fraction of their variance (0 when
    one side is empty or the values are constant)."""
    dark, light = values[values < threshold], values[values >= threshold]
    total = float(values.var())
    if not dark.size or not light.size or total <= 0.0:
        return 0.0
    share = dark.size / values.size
    return share * (1 - share) * (float(dark.mean()) - float(light.mean())) ** 2 / total


def air_threshold(array: np.ndarray, max_values: int = 2_000_000) -> float:
    """The intensity between air and the darkest tissue; ``-inf`` where the scan holds no air.

    Otsu's threshold splits a body's bright tissue from the rest, and on an MR the rest holds dark organs and
    muscle with the air: there a second Otsu split of the values below the first falls between air and
    tissue. On a CT the first split already falls between air and body, and the values below it are air
    alone, which a second split would cut in two. A split is only taken where it separates two modes
    (:data:`_TWO_MODES`); where even the first does not, the scan has no air to split off (a field of view
    inside the body, or a scan of noise) and everything in it is brighter than air.

    Args:
        array: scan, any shape, any intensity scale (unwindowed); at most ``max_values`` of its values
            (evenly strided) are used.
    """
    values = np.asarray(array, dtype=np.float32).ravel()
    if values.size > max_values:
        values = values[:: values.size // max_values + 1]
    upper = otsu_threshold(values)
    if float(values.var()) > 0.0 and _separation(values, upper) < _TWO_MODES:
        return -np.inf
    below = values[values < upper]
    if below.size < 10:
        return upper
    lower = otsu_threshold(below)
    return lower if _separation(below, lower) >= _TWO_MODES else upper


def soft_tissue_window(array: np.ndarray) -> np.ndarray:
    """Clip a scan to the 2nd-98th percentiles of its body voxels (those above the Otsu threshold).

    Without it air and bone dominate a joint histogram and mutual information aligns the body outlines
    rather than the organs (on the CT -> MR pair the kidneys were missed altogether without it).

    Args:
        array: scan, shape (X, Y, Z), any intensity scale (Hounsfield units, MR units, normalised).

    Returns:
        The clipped scan, float32, same shape.
    """
    values = np.asarray(array, dtype=np.float32)
    body = values[values > otsu_threshold(values)]
    if body.size < 2:
        return values
    low, high = np.percentile(body, [2, 98])
    return np.clip(values, low, high)


def _corners(shape: tuple[int, ...], affine: np.ndarray) -> np.ndarray:
    """World positions (RAS mm) of the 8 outer corners of a grid's voxels, shape (8, 3)."""
    edges = [(-0.5, n - 0.5) for n in shape]
    index = np.array([[i, j, k, 1.0] for i in edges[0] for j in edges[1] for k in edges[2]])
    return (index @ affine.T)[:, :3]


def _smooth(volume: torch.Tensor, sigma: np.ndarray) -> torch.Tensor:
    """Separable Gaussian blur of a (X, Y, Z) volume, sigma in voxels per axis (0: that axis untouched)."""
    out = volume[None, None]
    for axis, s in enumerate(sigma):
        if s < 0.3:
            continue
        radius = max(1, int(np.ceil(2 * s)))
        x = torch.arange(-radius, radius + 1, dtype=torch.float32)
        kernel = torch.exp(-(x**2) / (2 * s**2))
        kernel = kernel / kernel.sum()
        shape = [1, 1, 1, 1, 1]
        shape[2 + axis] = kernel.numel()
        pad = [0, 0, 0, 0, 0, 0]
        pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = radius
        out = torch.nn.functional.conv3d(
            torch.nn.functional.pad(out, pad, mode="replicate"), kernel.view(shape)
        )
    return out[0, 0]


def search_grid(array: np.ndarray, affine: np.ndarray, spacing_mm: float, bins: int) -> SearchGrid:
    """Resample a scan onto an axis-aligned RAS grid of ``spacing_mm`` covering its field of view.

    Args:
        array: the scan, shape (X, Y, Z), any intensity scale; affine: its 4x4 voxel-to-world matrix (RAS).
        spacing_mm: the grid's voxel size; the scan is blurred to it first (no aliasing from fine scans).
        bins: intensity classes of :attr:`SearchGrid.bins` (air plus ``bins - 1`` body quantiles).

    Returns:
        The :class:`SearchGrid`.
    """
    above_air = torch.from_numpy(np.ascontiguousarray(np.asarray(array) > air_threshold(array)))
    array = soft_tissue_window(array)
    shape = np.array(array.shape)
    corners = _corners(array.shape, affine)
    low, high = corners.min(0), corners.max(0)
    size = np.maximum(np.round((high - low) / spacing_mm).astype(int), 1)
    grid = np.eye(4)
    grid[:3, :3] *= spacing_mm
    grid[:3, 3] = low + spacing_mm / 2
    source_spacing = np.linalg.norm(affine[:3, :3], axis=0)
    sigma = np.sqrt(np.maximum((spacing_mm / source_spacing) ** 2 - 1.0, 0.0)) / 2.0
    volume = _smooth(torch.from_numpy(np.ascontiguousarray(array)), sigma)
    to_source = np.linalg.inv(affine) @ grid
    index = np.stack(np.meshgrid(*[np.arange(n) for n in size], indexing="ij"), -1).reshape(-1, 3)
    source = index @ to_source[:3, :3].T + to_source[:3, 3]  # (N, 3) source voxel coordinates
    fov = ((source >= -0.5) & (source <= shape - 0.5)).all(1).reshape(tuple(size))
    normalised = 2 * source / np.maximum(shape - 1, 1) - 1  # grid_sample: [-1, 1] with align_corners
    sample = torch.from_numpy(normalised[:, ::-1].astype(np.float32).copy()).view(1, *size, 3)
    image = torch.nn.functional.grid_sample(
        volume[None, None], sample, mode="bilinear", padding_mode="border", align_corners=True
    )[0, 0]
    fov_t = torch.from_numpy(fov)
    classes = _classes(image, fov_t, bins)
    outline = torch.nn.functional.grid_sample(
        above_air.float()[None, None], sample, mode="bilinear", padding_mode="border", align_corners=True
    )[0, 0]
    outline = _filled(fov_t & (outline > 0.5), opening=True, union=classes > 0) & fov_t
    # Only the body (and its outline) and a margin of air around it: a tilted or re-posed scan's grid is
    # mostly padding, and the search's cost grows with the grid.
    body = ((classes > 0) | outline).nonzero()
    if body.shape[0]:
        low_i = (body.min(0).values - _MARGIN).clamp(min=0)
        high_i = torch.minimum(body.max(0).values + _MARGIN + 1, torch.tensor(image.shape))
        crop = tuple(slice(int(a), int(b)) for a, b in zip(low_i, high_i))
        image, fov_t, classes, outline = image[crop], fov_t[crop], classes[crop], outline[crop]
        grid[:3, 3] += low_i.numpy() * spacing_mm
    return SearchGrid(
        image.contiguous(), fov_t.contiguous(), classes.contiguous(), grid, outline.contiguous()
    )


def _classes(image: torch.Tensor, fov: torch.Tensor, bins: int) -> torch.Tensor:
    inside = image[fov]
    classes = torch.zeros(image.shape, dtype=torch.int64)
    if inside.numel() < bins:
        return classes
    body = _filled(fov & (image > otsu_threshold(inside.numpy()))) & fov
    values = image[body]
    if values.numel() < bins:
        return classes
    edges = torch.quantile(values, torch.linspace(0, 1, bins)[1:-1])
    classes[body] = 1 + torch.bucketize(values, edges)
    return classes


def _filled(mask: torch.Tensor, opening: bool = False, union: torch.Tensor | None = None) -> torch.Tensor:
    """A body from a mask of its voxels: closed (or, with ``opening``, opened: isolated noise above the
    air threshold removed), joined with ``union`` if given, then each axial slice's holes filled.

    Above Otsu's threshold lies the bright part of a body; on an MR the dark organs inside it (liver, spleen,
    muscle on many sequences) fall below and would count as air, so the body outline and its overlap with
    another scan's would be wrong. Slice by slice, since a slab is open at its ends.
    """
    # Padded with its own edge first: a closing erodes a body cut by the grid's border, which would move it.
    padded = np.pad(mask.numpy(), 1, mode="edge")
    morphology = ndimage.binary_opening if opening else ndimage.binary_closing
    body = morphology(padded, iterations=1)[1:-1, 1:-1, 1:-1]
    if union is not None:
        body |= union.numpy()
    for k in range(body.shape[2]):
        body[:, :, k] = ndimage.binary_fill_holes(body[:, :, k])
    return torch.from_numpy(body)
