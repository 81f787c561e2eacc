"""check_label_geometry and resample: working grid and back restores the grid; errors say what differs."""

from __future__ import annotations

import dataclasses

import nibabel as nib
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from medmeta_plugin.io import ImageMeta, check_label_geometry, resample


def _shift(meta: ImageMeta, voxels, shape) -> ImageMeta:
    """The grid of ``meta`` moved by whole voxels (3,), with another shape."""
    translation = np.eye(4)
    translation[:3, 3] = voxels
    return ImageMeta.from_affine(meta.affine @ translation, shape, source="shifted")


@pytest.mark.parametrize("delta", [0.0, 4e-4])
def test_matching_geometry_passes_within_tolerance(make_meta, delta):
    image = make_meta(source="image.nii.gz")
    label = make_meta(origin=(10.5 + delta, -20.25, 33.0), source="label.nii.gz")
    check_label_geometry(image, label)


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"shape": (12, 10, 9)}, r"shape \(12, 10, 9\) != image shape \(12, 10, 8\)"),
        ({"spacing": (0.8, 0.9, 2.0)}, r"spacing differs by 1 mm \(label \[0\.8, 0\.9, 2\.0\] vs image"),
        ({"origin": (10.5, -20.25, 30.0)}, r"origin differs by 3 mm"),
        ({"direction": np.diag([1.0, 1.0, 1.0])}, r"direction differs by"),
    ],
)
def test_mismatching_geometry_names_both_files_and_the_difference(make_meta, changes, match):
    image = make_meta(source="image.nii.gz")
    label = make_meta(source="label.nrrd", **changes)
    named = r"label label\.nrrd does not match the geometry of image image\.nii\.gz: .*"
    with pytest.raises(ValueError, match=named + match):
        check_label_geometry(image, label)


def test_working_grid_has_the_spacing_and_closest_orientation(smooth, meta):
    array, work = resample(smooth, meta, spacing=(1.5, 1.5, 1.5), orientation="RAS")
    assert array.shape == (1, *work.shape) and array.dtype == np.float32
    np.testing.assert_allclose(work.spacing, 1.5)
    assert nib.aff2axcodes(work.affine) == ("R", "A", "S")
    # Reorienting keeps the 30 degree rotation: the voxel axes are not resampled onto the world axes.
    assert abs(work.direction[0][0]) == pytest.approx(np.cos(np.deg2rad(30.0)))
    assert work.source == meta.source


def test_round_trip_restores_the_grid_exactly_and_the_values_closely(smooth, meta):
    working, work = resample(smooth, meta, spacing=(1.5, 1.5, 1.5), orientation="RAS")
    back, back_meta = resample(working, work, reference=meta)
    assert back_meta == meta  # shape, spacing, origin and direction, exactly
    np.testing.assert_array_equal(back_meta.affine, meta.affine)
    # Trilinear interpolation twice on a function varying by ~0.07 per mm: a few hundredths.
    assert np.abs(back - smooth).max() < 0.06
    assert np.abs(back - smooth).mean() < 0.01


def test_reorienting_alone_is_exact(smooth, meta):
    oriented, oriented_meta = resample(smooth, meta, orientation="LPI")
    assert nib.aff2axcodes(oriented_meta.affine) == ("L", "P", "I")
    back, _ = resample(oriented, oriented_meta, reference=meta)
    np.testing.assert_array_equal(back, smooth)


def test_whole_voxel_shifts_are_exact(smooth, meta):
    target = _shift(meta, (2, 1, 0), (8, 8, 8))
    for mode in ("bilinear", "nearest"):
        shifted, _ = resample(smooth, meta, reference=target, mode=mode)
        np.testing.assert_allclose(shifted[0], smooth[0, 2:10, 1:9, :], atol=1e-6)


def test_nearest_keeps_label_values_and_dtype(label, meta):
    working, work = resample(label, meta, spacing=(1.0, 1.0, 1.0), orientation="RAS", mode="nearest")
    assert working.dtype == np.uint8
    assert set(np.unique(working)) <= set(np.unique(label))
    back, _ = resample(working, work, reference=meta, mode="nearest")
    assert back.dtype == np.uint8
    assert (back == label).mean() > 0.9  # only voxels at class borders may move


def test_nothing_to_do_returns_the_input(smooth, meta):
    array, same = resample(smooth, meta)
    assert array is smooth and same is meta


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    spacing=st.tuples(*[st.floats(0.5, 4.0)] * 3),
    orientation=st.sampled_from(["RAS", "LPS", "PIR", None]),
)
def test_any_working_grid_returns_to_the_original_grid(label, meta, spacing, orientation):
    working, work = resample(label, meta, spacing=spacing, orientation=orientation, mode="nearest")
    back, back_meta = resample(working, work, reference=meta, mode="nearest")
    assert back.shape == label.shape and back_meta == meta
    assert set(np.unique(back)) <= set(np.unique(label))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            {"mode": "cubic", "spacing": (1, 1, 1)},
            r"mode must be one of \('bilinear', 'nearest'\), got 'cubic'",
        ),
        ({"padding_mode": "edge", "spacing": (1, 1, 1)}, r"padding_mode must be one of .*got 'edge'"),
        ({"orientation": "RAX"}, r"orientation must be 3 axis codes .*got 'RAX'"),
        ({"orientation": "RRS"}, r"orientation must be 3 axis codes .*got 'RRS'"),
        (
            {"spacing": (1.0, -1.0, 1.0)},
            r"spacing must be 3 positive finite numbers \(mm\), got \(1\.0, -1\.0, 1\.0\)",
        ),
        ({"spacing": (1.0, 1.0)}, r"spacing must be 3 positive finite numbers"),
        (
            {"spacing": (1, 1, 1), "reference": "meta"},
            r"give either reference, or spacing and/or orientation",
        ),
    ],
)
def test_invalid_resample_arguments(smooth, meta, kwargs, match):
    kwargs = {key: meta if value == "meta" else value for key, value in kwargs.items()}
    with pytest.raises(ValueError, match=match):
        resample(smooth, meta, **kwargs)


def test_array_must_match_its_meta(smooth, meta):
    wrong = dataclasses.replace(meta, shape=(12, 10, 9), source="image.nii.gz")
    with pytest.raises(ValueError, match=r"image\.nii\.gz: array must have shape \(C, \*meta\.shape\)"):
        resample(smooth, wrong, spacing=(1.0, 1.0, 1.0))
