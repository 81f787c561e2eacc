"""ITK's side of registration: LPS <-> RAS, NumPy arrays <-> ITK images, transforms <-> 4x4 matrices.

Every public function of :mod:`medmeta_plugin.registration` takes arrays on their own voxel grid plus a 4x4
voxel-to-world matrix in RAS millimetres (the :class:`~medmeta_plugin.io.ImageMeta` convention). ITK works
in LPS; the conversion happens here and nowhere else (:mod:`monai.data.itk_torch_bridge` converts images).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import itk
import numpy as np
import torch
from monai.data import MetaTensor
from monai.data.itk_torch_bridge import itk_image_to_metatensor, metatensor_to_itk_image

__all__ = [
    "LPS",
    "deterministic_registration",
    "euler_from_matrix",
    "from_itk",
    "matrix_from_transform",
    "shrunk",
    "to_itk",
]

#: RAS <-> LPS, its own inverse: ``LPS @ m @ LPS`` turns a RAS world matrix into an LPS one and back.
LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


def to_itk(array: np.ndarray, affine: np.ndarray) -> itk.Image:
    """A float32 ITK image of ``array`` (X, Y, Z) on the grid of ``affine`` (voxel-to-world, RAS mm)."""
    tensor = MetaTensor(
        torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)), affine=torch.as_tensor(affine)
    )
    tensor.meta["space"] = "RAS"
    return metatensor_to_itk_image(tensor, channel_dim=None)


def from_itk(image: itk.Image, shape: tuple[int, int, int]) -> np.ndarray:
    """An ITK image back as a float32 array of shape ``shape`` (X, Y, Z), in the voxel order :func:`to_itk`
    was given."""
    out = itk_image_to_metatensor(image, channel_dim=None)
    return np.asarray(out.array, dtype=np.float32).reshape(tuple(int(s) for s in shape))


def shrunk(image: itk.Image, factor: int) -> itk.Image:
    """Smoothed (sigma half the new voxel size), shrunk by ``factor`` along each axis of 4 factor or more."""
    spacing = np.asarray(itk.spacing(image), dtype=np.float64)
    # An axis is shrunk only if 4 voxels remain (ITK's recursive Gaussians, the metric's gradients among them,
    # need 4): a 20 mm slab at 3 mm keeps its 7 voxels.
    factors = [factor if size >= 4 * factor else 1 for size in itk.size(image)]
    sigma = float(factor * spacing.mean() / 2)
    if min(itk.size(image)) < 4:  # ITK's recursive Gaussian needs 4 voxels per axis (a thin slab has fewer)
        smooth = itk.discrete_gaussian_image_filter(image, variance=sigma**2, use_image_spacing=True)
    else:
        smooth = itk.smoothing_recursive_gaussian_image_filter(image, sigma=sigma)
    return itk.shrink_image_filter(smooth, shrink_factors=factors)


def matrix_from_transform(transform: itk.Transform) -> np.ndarray:
    """The 4x4 RAS world matrix of an ITK matrix-offset transform (Euler, affine)."""
    lps = np.eye(4)
    lps[:3, :3] = itk.array_from_matrix(transform.GetMatrix())
    lps[:3, 3] = np.asarray(transform.GetOffset())
    return LPS @ lps @ LPS


def euler_from_matrix(matrix: np.ndarray, centre: np.ndarray) -> itk.Euler3DTransform:
    """An ITK rigid transform equal to ``matrix`` (4x4, RAS world, fixed -> moving), rotating about
    ``centre`` (RAS mm, shape (3,)); the rotation part is projected onto the nearest rotation first."""
    lps = LPS @ np.asarray(matrix, dtype=np.float64) @ LPS
    u, _, vt = np.linalg.svd(lps[:3, :3])
    rotation = u @ np.diag([1.0, 1.0, np.sign(np.linalg.det(u @ vt))]) @ vt
    c = LPS[:3, :3] @ np.asarray(centre, dtype=np.float64)
    euler = itk.Euler3DTransform[itk.D].New()
    euler.SetCenter([float(x) for x in c])
    euler.SetMatrix(itk.matrix_from_array(np.ascontiguousarray(rotation)))
    # x -> R (x - c) + c + t  must equal  x -> R x + offset
    euler.SetTranslation([float(t) for t in lps[:3, 3] + rotation @ c - c])
    return euler


@contextlib.contextmanager
def deterministic_registration() -> Iterator[None]:
    """Within the block, ITK runs on one thread, so a registration of the same scans repeats exactly.

    ITK sums its metric over worker threads in no fixed order, so two runs can end at slightly different
    transforms. The setting is process-wide (ITK's global default, read when its filters are created), so
    this is for a process that registers one pair at a time, such as a benchmark run; the previous default
    is restored. The placement search runs in torch, whose thread count is the caller's to set.
    """
    threader = itk.MultiThreaderBase
    before = threader.GetGlobalDefaultNumberOfThreads()
    threader.SetGlobalDefaultNumberOfThreads(1)
    try:
        yield
    finally:
        threader.SetGlobalDefaultNumberOfThreads(before)
