"""Episode augmentations: the config refuses what is not a probability or a gamma range; with every
probability at 0 nothing changes; each intensity augmentation does what it says to the image only; the
spatial one keeps image and mask aligned, the mask binary and padded with background; a seed reproduces all.

(The flip of whole episodes is the sampler's, tested in ``test_sampler.py``.)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import pytest
from monai.transforms import Compose

from medmeta_plugin.episodes.augment import AugmentConfig, intensity_augmentation, spatial_augmentation

Build = Callable[[AugmentConfig], Compose]
Check = Callable[[np.ndarray, np.ndarray, AugmentConfig], None]

PROBABILITIES = ("p_flip", "p_affine", "p_noise", "p_scale_intensity", "p_contrast", "p_bias")
INTENSITY_OFF = {"p_noise": 0.0, "p_scale_intensity": 0.0, "p_contrast": 0.0, "p_bias": 0.0}
SHAPES = [(1, 16, 16, 16), (2, 16, 24, 20)]


def _only(**kwargs: float) -> AugmentConfig:
    """A config with every augmentation off except those given."""
    return AugmentConfig(**{**INTENSITY_OFF, "p_affine": 0.0, "p_flip": 0.0, **kwargs})


def _run(transform: Compose, data: dict[str, np.ndarray], seed: int = 0) -> dict[str, np.ndarray]:
    transform.set_random_state(seed=seed)
    out = transform({k: v.copy() for k, v in data.items()})
    return {k: np.asarray(v) for k, v in out.items()}


def _box_item(shape: tuple[int, ...]) -> dict[str, np.ndarray]:
    """An image equal to its mask, a box off-centre: any misalignment of the two shows."""
    label = np.zeros((1, *shape[1:]), np.float32)
    label[0, 3 : shape[1] // 2 + 2, 4 : shape[2] - 5, 2 : shape[3] // 2 + 3] = 1.0
    return {"image": np.repeat(label, shape[0], axis=0), "label": label}


def _noise_item(shape: tuple[int, ...], seed: int = 0) -> dict[str, np.ndarray]:
    """A normalised-looking image (mean 0, std 1) and a box mask."""
    image = np.random.default_rng(seed).normal(size=shape).astype(np.float32)
    return {"image": image, "label": _box_item(shape)["label"]}


@pytest.mark.parametrize("name", PROBABILITIES)
@pytest.mark.parametrize("value", [0.0, 1.0])
def test_probabilities_at_the_bounds_are_accepted(name: str, value: float) -> None:
    assert getattr(AugmentConfig(**{name: value}), name) == value


@pytest.mark.parametrize("name", PROBABILITIES)
@pytest.mark.parametrize("value", [-0.1, 1.01])
def test_probabilities_outside_zero_one_are_refused_by_name(name: str, value: float) -> None:
    with pytest.raises(ValueError, match=rf"{name} must be a probability in \[0, 1\], got {value}"):
        AugmentConfig(**{name: value})


@pytest.mark.parametrize("gamma", [(1.5, 0.7), (-1.0, 1.0), (0.0, 0.0)])
def test_gamma_must_be_an_increasing_positive_range(gamma: tuple[float, float]) -> None:
    with pytest.raises(ValueError, match=rf"gamma must be a range of positive numbers, got \({gamma[0]}"):
        AugmentConfig(gamma=gamma)


def test_a_single_gamma_is_a_valid_range_and_the_config_is_frozen() -> None:
    config = AugmentConfig(gamma=(1.2, 1.2))
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.p_noise = 1.0  # type: ignore[misc]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("build", [intensity_augmentation, spatial_augmentation])
def test_every_probability_zero_changes_nothing(shape: tuple[int, ...], build: Build) -> None:
    item = _noise_item(shape)
    out = _run(build(_only()), item)
    np.testing.assert_array_equal(out["image"], item["image"])
    np.testing.assert_array_equal(out["label"], item["label"])


def _noise_is_small_and_additive(before: np.ndarray, after: np.ndarray, config: AugmentConfig) -> None:
    residual = after - before
    assert 0 < residual.std() <= 1.1 * config.noise_std  # std drawn in [0, noise_std]
    assert abs(residual.mean()) < 0.05


def _scale_is_one_factor(before: np.ndarray, after: np.ndarray, config: AugmentConfig) -> None:
    ratio = after / before
    np.testing.assert_allclose(ratio, ratio.flat[0], rtol=1e-4)  # one factor for every voxel
    assert ratio.flat[0] != pytest.approx(1.0)
    assert 1 - config.scale_intensity - 1e-6 <= ratio.flat[0] <= 1 + config.scale_intensity + 1e-6


def _contrast_keeps_mean_and_std(before: np.ndarray, after: np.ndarray, config: AugmentConfig) -> None:
    assert np.abs(after - before).max() > 0.05
    assert after.mean() == pytest.approx(before.mean(), abs=1e-4)
    assert after.std() == pytest.approx(before.std(), rel=1e-4)


def _bias_is_positive_and_multiplicative(
    before: np.ndarray, after: np.ndarray, config: AugmentConfig
) -> None:
    assert np.abs(after - before).max() > 0.05
    # A positive smooth field times the image: no voxel changes sign, zero stays zero.
    np.testing.assert_array_equal(np.sign(after), np.sign(before))
    assert (after / before).min() > 0


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize(
    ("name", "check"),
    [
        ("p_noise", _noise_is_small_and_additive),
        ("p_scale_intensity", _scale_is_one_factor),
        ("p_contrast", _contrast_keeps_mean_and_std),
        ("p_bias", _bias_is_positive_and_multiplicative),
    ],
)
@pytest.mark.parametrize("build", [intensity_augmentation, spatial_augmentation])
def test_each_intensity_augmentation_changes_the_image_only(
    shape: tuple[int, ...], name: str, check: Check, build: Build
) -> None:
    config = _only(**{name: 1.0})
    item = _noise_item(shape, seed=3)
    out = _run(build(config), item, seed=5)
    assert out["image"].shape == shape and out["image"].dtype == np.float32
    np.testing.assert_array_equal(out["label"], item["label"])
    check(item["image"], out["image"], config)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("shape", SHAPES)
def test_rotation_and_scaling_keep_image_and_mask_aligned_and_the_mask_binary(
    seed: int, shape: tuple[int, ...]
) -> None:
    item = _box_item(shape)
    out = _run(spatial_augmentation(_only(p_affine=1.0, rotate_deg=30.0, scale=0.2)), item, seed)
    image, label = out["image"], out["label"]
    assert image.shape == shape and label.shape == (1, *shape[1:])
    assert set(np.unique(label)) == {0.0, 1.0}
    assert not np.array_equal(label, item["label"]), "the affine moved nothing"
    for c in range(shape[0]):
        inside = image[c] > 0.5
        dice = 2 * (inside & (label[0] > 0)).sum() / (inside.sum() + label.sum())
        assert dice > 0.95, f"image channel {c} and mask disagree (Dice {dice:.3f})"


def test_the_image_is_padded_with_its_border_and_the_mask_with_background() -> None:
    ones = np.ones((1, 16, 16, 16), np.float32)
    out = _run(
        spatial_augmentation(_only(p_affine=1.0, rotate_deg=45.0, scale=0.0)), {"image": ones, "label": ones}
    )
    np.testing.assert_allclose(out["image"], 1.0, atol=1e-5)  # border values: still all ones
    assert 0 < (out["label"] == 0).sum() < out["label"].size // 2  # the corners rotated in are background


def test_a_zero_range_affine_is_the_identity() -> None:
    item = _noise_item((1, 16, 16, 16))
    out = _run(spatial_augmentation(_only(p_affine=1.0, rotate_deg=0.0, scale=0.0)), item)
    np.testing.assert_allclose(out["image"], item["image"], atol=1e-5)
    np.testing.assert_array_equal(out["label"], item["label"])


@pytest.mark.parametrize("build", [intensity_augmentation, spatial_augmentation])
def test_a_seed_reproduces_the_augmentation_and_another_seed_does_not(build: Build) -> None:
    config = AugmentConfig(p_affine=1.0, p_noise=1.0, p_scale_intensity=1.0, p_contrast=1.0, p_bias=1.0)
    item = _noise_item((1, 16, 16, 16))
    first, again, other = (
        _run(build(config), item, 7),
        _run(build(config), item, 7),
        _run(build(config), item, 8),
    )
    np.testing.assert_array_equal(first["image"], again["image"])
    np.testing.assert_array_equal(first["label"], again["label"])
    assert not np.allclose(first["image"], other["image"])
