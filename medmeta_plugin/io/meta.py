"""The metadata contract every reader returns: spacing, origin, direction and the RAS affine."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["ImageMeta"]


@dataclass(frozen=True)
class ImageMeta:
    """Geometry and provenance of a channel-first 3D image.

    World coordinates follow the NIfTI/MONAI convention (RAS+, millimetres). Voxel index ``(i, j, k)`` of the
    array's spatial axes maps to world point ``affine @ [i, j, k, 1]``.

    Attributes:
        spacing: voxel size in mm along the array's three spatial axes, shape (3,).
        origin: world position (RAS, mm) of voxel (0, 0, 0), shape (3,).
        direction: unit column vectors of the three array axes in RAS world space, shape (3, 3).
        shape: spatial shape ``(X, Y, Z)`` of the array (channels excluded).
        source: file or series the image was read from; named in every error about it.
        extra: format-specific metadata (e.g. DICOM ``SeriesInstanceUID``, modality).
    """

    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[tuple[float, float, float], ...]
    shape: tuple[int, int, int]
    source: str = ""
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def affine(self) -> np.ndarray:
        """The 4x4 voxel-to-world (RAS, mm) matrix, float64."""
        affine = np.eye(4)
        affine[:3, :3] = np.asarray(self.direction, dtype=np.float64) * np.asarray(self.spacing)[None, :]
        affine[:3, 3] = self.origin
        return affine

    @classmethod
    def from_affine(
        cls, affine: np.ndarray, shape: tuple[int, ...], source: str = "", extra: dict[str, Any] | None = None
    ) -> ImageMeta:
        """Build the metadata from a 4x4 voxel-to-world (RAS) affine.

        Args:
            affine: voxel-to-world matrix, shape (4, 4).
            shape: spatial shape ``(X, Y, Z)``.
            source: file or series name, for error messages.
            extra: format-specific metadata.

        Raises:
            ValueError: if ``affine`` is not 4x4, is singular, or ``shape`` is not 3D.
        """
        affine = np.asarray(affine, dtype=np.float64)
        if affine.shape != (4, 4):
            raise ValueError(f"{source or 'image'}: affine must be 4x4, got shape {affine.shape}.")
        if len(shape) != 3:
            raise ValueError(f"{source or 'image'}: expected a 3D spatial shape, got {tuple(shape)}.")
        linear = affine[:3, :3]
        spacing = np.linalg.norm(linear, axis=0)
        if np.any(spacing <= 0) or not np.all(np.isfinite(linear)):
            raise ValueError(f"{source or 'image'}: affine is singular or not finite: {affine.tolist()}.")
        direction = linear / spacing[None, :]
        # Unit columns: |det| is 1 on an orthogonal grid, less if sheared, 0 where two axes are parallel.
        if abs(float(np.linalg.det(direction))) < 1e-3:
            raise ValueError(
                f"{source or 'image'}: affine is singular (two voxel axes along one line): {affine.tolist()}."
            )
        return cls(
            spacing=tuple(float(s) for s in spacing),
            origin=tuple(float(o) for o in affine[:3, 3]),
            direction=tuple(tuple(float(v) for v in row) for row in direction),
            shape=tuple(int(s) for s in shape),
            source=source,
            extra=dict(extra or {}),
        )
