"""A scan's ITK images for the local stages, made once per registration and shared by placement's
refinement and the rigid/affine stages (both read the windowed scan at the same shrink factors)."""

from __future__ import annotations

import itk
import numpy as np

from medmeta_plugin.registration.grids import soft_tissue_window
from medmeta_plugin.registration.itk_bridge import shrunk, to_itk

__all__ = ["Pyramid"]


class Pyramid:
    """The soft-tissue windowed ITK image of one scan and its smoothed, shrunk levels, each made on first use.

    Args:
        array: the scan, shape (X, Y, Z); affine: its 4x4 voxel-to-world matrix (RAS mm).
    """

    def __init__(self, array: np.ndarray, affine: np.ndarray) -> None:
        self.array, self.affine = array, affine
        self._image: itk.Image | None = None
        self._levels: dict[int, itk.Image] = {}

    @property
    def voxel_mm(self) -> float:
        """The scan's mean voxel size (mm)."""
        return float(np.linalg.norm(np.asarray(self.affine)[:3, :3], axis=0).mean())

    def level(self, factor: int) -> itk.Image:
        """The image smoothed and shrunk by ``factor`` (:func:`~.itk_bridge.shrunk`)."""
        if factor not in self._levels:
            if self._image is None:
                self._image = to_itk(soft_tissue_window(self.array), self.affine)
            self._levels[factor] = shrunk(self._image, factor)
        return self._levels[factor]
