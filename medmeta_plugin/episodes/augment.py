"""MONAI augmentations of episode items, seeded per item so an episode is reproducible from its seed."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from monai.transforms import (
    Compose,
    RandAdjustContrastd,
    RandAffined,
    RandBiasFieldd,
    RandGaussianNoised,
    RandScaleIntensityd,
)

__all__ = ["AugmentConfig", "intensity_augmentation", "spatial_augmentation"]


@dataclass(frozen=True)
class AugmentConfig:
    """Probabilities and ranges of the augmentations, milder versions of nnU-Net's defaults.

    Intensities are augmented after :func:`medmeta_plugin.transforms.normalize_intensity`, so ranges are in
    units of the normalised image (std 1). The bias field is multiplicative on that zero-mean image, which
    scales local contrast smoothly (the phantoms already carry a physical, positive-domain bias field).

    Attributes:
        p_flip: probability per spatial axis of flipping a segmentation episode. One flip is drawn per episode
            and applied to support and query alike, so "left" structures stay on one side within an episode.
        p_affine: probability of a random rotation and scaling of a segmentation patch.
        rotate_deg: largest rotation about each axis, degrees (nnU-Net: 30; patches here are small).
        scale: largest relative zoom in or out (nnU-Net: 0.3).
        p_noise: probability of additive Gaussian noise, of std up to ``noise_std`` (nnU-Net: 0.1, p 0.1).
        noise_std: its largest standard deviation.
        p_scale_intensity: probability of multiplying intensities by ``1 + U(-s, s)``, s = scale_intensity.
        scale_intensity: its largest relative change.
        p_contrast: probability of a gamma change of contrast (nnU-Net: gamma 0.7-1.5, p 0.3).
        gamma: range of the gamma.
        p_bias: probability of a smooth multiplicative bias field.
        bias_coefficients: range of the bias field's polynomial coefficients (MONAI's default).
    """

    p_flip: float = 0.5
    p_affine: float = 0.3
    rotate_deg: float = 10.0
    scale: float = 0.1
    p_noise: float = 0.15
    noise_std: float = 0.1
    p_scale_intensity: float = 0.2
    scale_intensity: float = 0.1
    p_contrast: float = 0.2
    gamma: tuple[float, float] = (0.7, 1.5)
    p_bias: float = 0.15
    bias_coefficients: tuple[float, float] = (0.0, 0.1)

    def __post_init__(self) -> None:
        for name in ("p_flip", "p_affine", "p_noise", "p_scale_intensity", "p_contrast", "p_bias"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1], got {getattr(self, name)!r}.")
        if not 0.0 < self.gamma[0] <= self.gamma[1]:
            raise ValueError(f"gamma must be a range of positive numbers, got {self.gamma!r}.")


def intensity_augmentation(config: AugmentConfig) -> Compose:
    """Intensity-only augmentations of ``"image"`` (C, X, Y, Z); used alone for volume-level tasks.

    Spatial augmentation is left out there because a target may depend on geometry (a volume in mL changes
    with scaling, a side with flipping).
    """
    return Compose(
        [
            RandGaussianNoised("image", prob=config.p_noise, std=config.noise_std),
            RandScaleIntensityd("image", factors=config.scale_intensity, prob=config.p_scale_intensity),
            RandAdjustContrastd("image", prob=config.p_contrast, gamma=config.gamma, retain_stats=True),
            RandBiasFieldd("image", coeff_range=config.bias_coefficients, prob=config.p_bias),
        ]
    )


def spatial_augmentation(config: AugmentConfig) -> Compose:
    """Rotation and scaling of ``"image"`` (C, X, Y, Z) and ``"label"`` (1, X, Y, Z), then intensity ones.

    The label is resampled with nearest neighbour, so a binary mask stays binary; the image is padded with its
    border values and the label with background.
    """
    angle = float(np.deg2rad(config.rotate_deg))
    return Compose(
        [
            RandAffined(
                ("image", "label"),
                prob=config.p_affine,
                rotate_range=(angle, angle, angle),
                scale_range=(config.scale, config.scale, config.scale),
                mode=("bilinear", "nearest"),
                padding_mode=("border", "zeros"),
            ),
            intensity_augmentation(config),
        ]
    )
