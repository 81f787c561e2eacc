"""Deformed, intensity-augmented copies of real cases: several "subjects" from one scan.

The real data here has one or two scans per structure, but an episode needs k + q distinct cases. A copy
applies a seeded random affine (rotation, scaling, shear) and a smooth elastic deformation to image and
label together, and a random gamma, gain and bias field to the image, so support and query differ in
pose, shape and contrast as scans of different subjects would. The brain benchmark uses the same copies
(the template is a single subject).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import dataclass, replace

import numpy as np
from monai.transforms import Compose, Rand3DElasticd, RandAdjustContrastd, RandBiasFieldd, RandScaleIntensityd

from medmeta_plugin.episodes.cases import Case, load_case

__all__ = ["CopyConfig", "deformed_copies"]


@dataclass(frozen=True)
class CopyConfig:
    """Strength of the deformation and intensity changes.

    Attributes:
        rotate_deg: largest rotation about each axis (inter-subject head or body pose varies by ~10 degrees).
        scale: largest relative zoom per axis (organ sizes vary by tens of percent between adults).
        elastic_sigma: smoothness of the elastic field, in voxels.
        elastic_magnitude: range of its magnitude, in voxels.
        gamma: range of the contrast gamma.
    """

    rotate_deg: float = 10.0
    scale: float = 0.15
    elastic_sigma: tuple[float, float] = (6.0, 9.0)
    elastic_magnitude: tuple[float, float] = (0.0, 4.0)
    gamma: tuple[float, float] = (0.7, 1.5)


def _load_copy(case: Case, seed: int, config: CopyConfig) -> tuple[np.ndarray, np.ndarray | None]:
    image, label = load_case(case)
    keys = ["image"] if label is None else ["image", "label"]
    modes = ["bilinear"] if label is None else ["bilinear", "nearest"]
    angle = np.deg2rad(config.rotate_deg)
    transform = Compose(
        [
            Rand3DElasticd(
                keys,
                sigma_range=config.elastic_sigma,
                magnitude_range=config.elastic_magnitude,
                prob=1.0,
                rotate_range=(angle, angle, angle),
                scale_range=(config.scale,) * 3,
                mode=modes,
                padding_mode="border",
            ),
            RandAdjustContrastd("image", prob=1.0, gamma=config.gamma),
            RandScaleIntensityd("image", factors=0.2, prob=1.0),
            RandBiasFieldd("image", coeff_range=(0.0, 0.1), prob=0.5),
        ]
    )
    transform.set_random_state(seed=seed)
    data = {"image": image.astype(np.float32)}
    if label is not None:
        data["label"] = label.astype(np.float32)
    out = transform(data)
    new_image = np.asarray(out["image"], dtype=np.float32)
    new_label = None if label is None else np.rint(np.asarray(out["label"])).astype(label.dtype)
    return new_image, new_label


def deformed_copies(
    cases: Iterable[Case], n_copies: int, seed: int, config: CopyConfig | None = None
) -> list[Case]:
    """``n_copies`` seeded deformed copies of each case (the originals are not included).

    Args:
        cases: cases to copy (on disk or in memory).
        n_copies: copies per case.
        seed: determines every copy; copy ``i`` of a case is the same whatever other cases are given.
        config: deformation strength.

    Returns:
        In-memory cases ``<case_id>-copy<i>`` in the original's dataset, with its structures and targets.

    Raises:
        ValueError: if ``n_copies`` < 1.
    """
    if isinstance(n_copies, bool) or not isinstance(n_copies, int) or n_copies < 1:
        raise ValueError(f"n_copies must be a positive integer, got {n_copies!r}.")
    config = config or CopyConfig()
    copies = []
    for case in cases:
        # The case uid enters the seed so two cases never get the same deformation.
        base = int(np.random.default_rng([seed, *case.uid.encode()]).integers(0, 2**31 - 1))
        for i in range(n_copies):
            copies.append(
                replace(
                    case,
                    case_id=f"{case.case_id}-copy{i}",
                    image_path=None,
                    label_path=None,
                    loader=functools.partial(_load_copy, case, base + i, config),
                )
            )
    return copies
