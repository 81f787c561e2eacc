"""The one intensity preprocessing shared by meta-training, few-shot adaptation and inference, and the one
padding to the backbone's size divisor.

Every path that feeds an image to the model calls :func:`normalize_intensity` with the same
:class:`PreprocessConfig`, so the three can never drift apart. Images stay on their native voxel grid: nothing
here resamples (the episode sampler crops patches in voxels, and inference slides a window of the same
``patch_size``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["PAD_MODES", "PreprocessConfig", "normalize_intensity", "pad_to_multiple"]

#: ``replicate`` repeats the edge voxels (images: no artificial edge for the backbone to see), ``constant``
#: pads with zeros (label maps, masks, priors).
PAD_MODES = ("replicate", "constant")

# Below this standard deviation (after clipping) a channel is treated as constant and mapped to zeros rather
# than divided by ~0; float32 resolution of intensities of order 1e3 (CT HU) is ~1e-4.
_MIN_STD = 1e-6


@dataclass(frozen=True)
class PreprocessConfig:
    """Settings of the shared preprocessing.

    Attributes:
        lower_percentile: intensities below this percentile of each channel are clipped to it. 0.5 / 99.5 are
            nnU-Net's CT clipping percentiles; they also remove MR's bright outliers (vessels, fat) without
            a modality switch.
        upper_percentile: intensities above this percentile of each channel are clipped to it.
        patch_size: spatial size ``(X, Y, Z)`` of the patches seen by the model in training episodes and by
            the sliding window at inference.
    """

    lower_percentile: float = 0.5
    upper_percentile: float = 99.5
    patch_size: tuple[int, int, int] = (32, 32, 32)

    def __post_init__(self) -> None:
        if not 0.0 <= self.lower_percentile < self.upper_percentile <= 100.0:
            raise ValueError(
                "percentiles must satisfy 0 <= lower_percentile < upper_percentile <= 100, got "
                f"lower_percentile={self.lower_percentile}, upper_percentile={self.upper_percentile}."
            )
        if len(self.patch_size) != 3 or any(int(s) != s or s < 1 for s in self.patch_size):
            raise ValueError(f"patch_size must be three positive integers, got {self.patch_size!r}.")


def _percentile(values: torch.Tensor, q: float) -> torch.Tensor:
    """Linear-interpolation percentile (numpy's default method) of a 1D tensor.

    ``torch.quantile`` refuses inputs over 2**24 elements (a 512x512x64 CT already has more), so the two order
    statistics around the percentile come from ``kthvalue`` instead.
    """
    position = q / 100.0 * (values.numel() - 1)
    lower = int(np.floor(position))
    upper = min(lower + 1, values.numel() - 1)
    low_value = values.kthvalue(lower + 1).values
    if upper == lower:
        return low_value
    high_value = values.kthvalue(upper + 1).values
    return low_value + (high_value - low_value) * (position - lower)


def _normalize_torch(image: torch.Tensor, config: PreprocessConfig) -> torch.Tensor:
    channels = []
    for channel in image.to(torch.float32):
        flat = channel.reshape(-1)
        low, high = _percentile(flat, config.lower_percentile), _percentile(flat, config.upper_percentile)
        clipped = channel.clamp(low, high)
        std = clipped.std(unbiased=False)
        channels.append(torch.zeros_like(clipped) if std < _MIN_STD else (clipped - clipped.mean()) / std)
    return torch.stack(channels)


def _normalize_numpy(image: np.ndarray, config: PreprocessConfig) -> np.ndarray:
    # The same computation as _normalize_torch (tests check they agree); numpy avoids torch's per-op thread
    # start-up, which dominates on the small volumes of training episodes.
    channels = []
    for channel in image.astype(np.float32, copy=False):
        low, high = np.percentile(channel, (config.lower_percentile, config.upper_percentile))
        clipped = np.clip(channel, low, high)
        std = clipped.std()
        channels.append(np.zeros_like(clipped) if std < _MIN_STD else (clipped - clipped.mean()) / std)
    return np.stack(channels).astype(np.float32, copy=False)


def normalize_intensity(
    image: np.ndarray | torch.Tensor, config: PreprocessConfig | None = None
) -> np.ndarray | torch.Tensor:
    """Clip each channel to its percentiles, then shift and scale it to zero mean and unit variance.

    The statistics are computed over the whole volume of each channel, so CT (Hounsfield units) and MR
    (arbitrary units) come out on one scale. A constant channel becomes zeros (never NaN).

    Args:
        image: channel-first volume, shape (C, X, Y, Z), any real dtype; a numpy array or a torch tensor on
            any device.
        config: the shared preprocessing settings; defaults to :class:`PreprocessConfig()`.

    Returns:
        The normalised volume, shape (C, X, Y, Z), float32, of the same type as ``image`` (numpy array, or
        tensor on the same device).

    Raises:
        TypeError: if ``image`` is neither a numpy array nor a torch tensor, or has a bool or complex dtype.
        ValueError: if ``image`` is not 4D, is empty, or holds NaN or infinite values.
    """
    config = config or PreprocessConfig()
    if isinstance(image, np.ndarray):
        if image.dtype == np.bool_ or not np.issubdtype(image.dtype, np.number) or np.iscomplexobj(image):
            raise TypeError(f"image must have a real numeric dtype, got {image.dtype}.")
        finite = bool(np.isfinite(image).all())
    elif isinstance(image, torch.Tensor):
        if image.dtype == torch.bool or image.is_complex():
            raise TypeError(f"image must have a real numeric dtype, got {image.dtype}.")
        finite = bool(torch.isfinite(image).all())
    else:
        raise TypeError(f"image must be a numpy array or a torch tensor, got {type(image).__name__}.")
    size = image.size if isinstance(image, np.ndarray) else image.numel()
    if image.ndim != 4 or size == 0:
        raise ValueError(
            f"image must be a non-empty channel-first (C, X, Y, Z) volume, got shape {tuple(image.shape)}."
        )
    if not finite:
        raise ValueError("image holds NaN or infinite values; replace them before normalising.")
    if isinstance(image, np.ndarray):
        return _normalize_numpy(image, config)
    return _normalize_torch(image, config)


def pad_to_multiple(tensor: torch.Tensor, divisor: int, mode: str = "constant") -> torch.Tensor:
    """``tensor`` (..., X, Y, Z) padded at the high end of its last three axes to multiples of ``divisor``.

    The one padding of the package: the app's working grid, the benchmarks and the refiner pad this way, so
    a voxel keeps its index and :meth:`WorkingVolume.crop <medmeta_plugin.app.grid.WorkingVolume.crop>`
    (``[..., :X, :Y, :Z]``) undoes it.

    Args:
        tensor: at least three dimensions, the last three spatial.
        divisor: the size divisor (the backbone's, ``2 ** (levels - 1)``), >= 1.
        mode: one of :data:`PAD_MODES`.

    Returns:
        A new tensor (the input itself when nothing needs padding), same dtype and device.

    Raises:
        ValueError: for fewer than three dimensions, a divisor below 1 or an unknown mode.
    """
    if tensor.dim() < 3 or divisor < 1 or mode not in PAD_MODES:
        raise ValueError(
            f"pad_to_multiple needs (..., X, Y, Z), a divisor >= 1 and a mode in {PAD_MODES}; got shape "
            f"{tuple(tensor.shape)}, divisor {divisor}, mode {mode!r}."
        )
    shape = tuple(tensor.shape[-3:])
    pad = [p for s in reversed(shape) for p in (0, -s % divisor)]
    if not any(pad):
        return tensor
    if mode == "constant":
        return torch.nn.functional.pad(tensor, pad)
    lead = tensor.shape[:-3]
    flat = tensor.reshape(1, -1, *shape)  # replicate padding of 3 axes wants (N, C, X, Y, Z)
    if not flat.is_floating_point():
        raise ValueError(f"replicate padding needs a floating-point tensor, got {tensor.dtype}.")
    out = torch.nn.functional.pad(flat, pad, mode="replicate")
    return out.reshape(*lead, *out.shape[-3:])
