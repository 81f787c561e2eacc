"""The shared intensity normalisation: scale-free, robust to outliers, NaN-free, same for numpy and torch.

(``medmeta_plugin/transforms.py`` is tested here, next to its main user, the episode sampler.)
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medmeta_plugin.transforms import PreprocessConfig, normalize_intensity, pad_to_multiple

RNG = np.random.default_rng(0)


def _ct() -> np.ndarray:
    """Air (-1000 HU) around soft tissue (40 HU) with a bone spot, stored as int16 like most CT files."""
    image = np.full((1, 24, 24, 24), -1000, dtype=np.int16)
    image[:, 4:20, 4:20, 4:20] = 40 + RNG.normal(0, 20, (16, 16, 16)).astype(np.int16)
    image[:, 10:12, 10:12, 10:12] = 1500
    return image


def _mr() -> np.ndarray:
    return np.abs(RNG.normal(300.0, 80.0, (1, 20, 16, 12))).astype(np.float32)


def _two_channels() -> np.ndarray:
    return np.concatenate([_mr()[:, :16, :16, :12] * 1000.0, RNG.normal(0.0, 1e-3, (1, 16, 16, 12))]).astype(
        np.float64
    )


def _constant() -> np.ndarray:
    return np.full((2, 8, 8, 8), 7.0, dtype=np.float32)


VALID = [
    pytest.param(_ct, id="ct-int16"),
    pytest.param(_mr, id="mr-float32"),
    pytest.param(_two_channels, id="two-channels-different-scales"),
    pytest.param(lambda: torch.from_numpy(_mr()), id="torch-tensor"),
    pytest.param(_constant, id="constant"),
]


@pytest.mark.parametrize("make", VALID)
def test_normalised_channels_have_zero_mean_unit_std(make) -> None:
    image = make()
    out = normalize_intensity(image)
    assert type(out) is type(image)
    assert tuple(out.shape) == tuple(image.shape)
    values = np.asarray(out)
    assert values.dtype == np.float32 and np.isfinite(values).all()
    for channel in values:
        if np.ptp(channel) == 0:
            np.testing.assert_array_equal(channel, 0.0)  # a constant channel becomes zeros, not NaN
        else:
            assert abs(channel.mean()) < 1e-4 and abs(channel.std() - 1.0) < 1e-3


@pytest.mark.parametrize("make", [_ct, _mr, _two_channels])
def test_numpy_and_torch_agree(make) -> None:
    """Training (numpy volumes) and inference (tensors, maybe on GPU) must preprocess identically."""
    image = make()
    np.testing.assert_allclose(
        normalize_intensity(image), normalize_intensity(torch.from_numpy(image)).numpy(), atol=1e-4
    )


@pytest.mark.parametrize(("scale", "shift"), [(1.0, 0.0), (3.5, -200.0), (0.01, 1000.0)])
def test_invariant_to_affine_intensity_changes(scale: float, shift: float) -> None:
    image = _mr().astype(np.float64)
    np.testing.assert_allclose(
        normalize_intensity(image * scale + shift), normalize_intensity(image), atol=1e-4
    )


def test_outliers_are_clipped() -> None:
    image = _mr()
    image[0, 0, 0, 0] = 1e7
    out = normalize_intensity(image)
    assert out.max() < 5.0  # without clipping this voxel would sit ~140 std above the mean


INVALID = [
    pytest.param(lambda: np.zeros((8, 8, 8)), ValueError, "shape", id="3d"),
    pytest.param(lambda: np.zeros((1, 0, 8, 8)), ValueError, "non-empty", id="empty"),
    pytest.param(lambda: np.full((1, 4, 4, 4), np.nan), ValueError, "NaN", id="nan"),
    pytest.param(lambda: torch.full((1, 4, 4, 4), float("inf")), ValueError, "infinite", id="inf-tensor"),
    pytest.param(lambda: np.zeros((1, 4, 4, 4), dtype=bool), TypeError, "dtype", id="bool"),
    pytest.param(lambda: np.zeros((1, 4, 4, 4), dtype=complex), TypeError, "dtype", id="complex"),
    pytest.param(lambda: [[[[0.0]]]], TypeError, "numpy array or a torch tensor", id="list"),
]


@pytest.mark.parametrize(("make", "error", "match"), INVALID)
def test_invalid_images_are_rejected(make, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        normalize_intensity(make())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"lower_percentile": 60.0, "upper_percentile": 50.0}, "lower_percentile=60.0"),
        ({"lower_percentile": -1.0}, "lower_percentile=-1.0"),
        ({"patch_size": (32, 32)}, r"patch_size .*\(32, 32\)"),
        ({"patch_size": (32, 0, 32)}, "patch_size"),
    ],
)
def test_invalid_config_is_rejected(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        PreprocessConfig(**kwargs)


def test_padding_reaches_the_divisor_at_the_high_end_and_crops_back() -> None:
    image = torch.arange(5 * 6 * 7, dtype=torch.float32).reshape(1, 5, 6, 7)
    out = pad_to_multiple(image, 4, "replicate")
    assert out.shape == (1, 8, 8, 8)
    torch.testing.assert_close(out[..., :5, :6, :7], image)
    torch.testing.assert_close(out[0, 7, :6, :7], image[0, 4])  # edge voxels repeated
    zeros = pad_to_multiple(image, 4)
    assert zeros.shape == (1, 8, 8, 8) and float(zeros[..., 5:, :, :].abs().sum()) == 0.0
    labels = torch.ones(2, 3, 3, 3, 3, dtype=torch.uint8)  # any leading dims; zeros for label maps
    padded = pad_to_multiple(labels, 2)
    assert padded.shape == (2, 3, 4, 4, 4) and padded.dtype == torch.uint8 and int(padded.sum()) == 2 * 3 * 27


def test_padding_a_divisible_shape_returns_the_input() -> None:
    image = torch.zeros(1, 8, 16, 8)
    assert pad_to_multiple(image, 8, "replicate") is image


@pytest.mark.parametrize(
    "tensor, divisor, mode",
    [
        (torch.zeros(4, 4), 2, "constant"),
        (torch.zeros(4, 4, 4), 0, "constant"),
        (torch.zeros(4, 4, 4), 2, "reflect"),
        (torch.zeros(3, 3, 3, dtype=torch.int64), 2, "replicate"),
    ],
)
def test_padding_rejects_bad_arguments(tensor: torch.Tensor, divisor: int, mode: str) -> None:
    with pytest.raises(ValueError):
        pad_to_multiple(tensor, divisor, mode)
