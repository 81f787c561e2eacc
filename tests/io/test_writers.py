"""write_image: round trips through NIfTI and NRRD keep values and geometry; writes are atomic."""

from __future__ import annotations

import nibabel as nib
import nrrd
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from medmeta_plugin.io import ImageMeta, read_image, read_label, write_image
from medmeta_plugin.io import writers as writers_module

WRITABLE = [".nii.gz", ".nii", ".nrrd"]


@pytest.mark.parametrize("suffix", WRITABLE)
def test_image_round_trip_keeps_values_and_geometry(tmp_path, suffix, volume, meta, same_geometry):
    path = write_image(tmp_path / f"image{suffix}", volume, meta)
    array, read_meta = read_image(path)
    assert array.shape == (1, *volume.shape) and array.dtype == np.float32
    np.testing.assert_array_equal(array[0], volume)
    same_geometry(read_meta, meta)
    np.testing.assert_allclose(read_meta.affine, meta.affine, atol=1e-5)
    assert read_meta.source == str(path)


@pytest.mark.parametrize("suffix", WRITABLE)
def test_multichannel_round_trip(tmp_path, suffix, volume, meta, same_geometry):
    channels = np.stack([volume, 2 * volume, -volume])
    array, read_meta = read_image(write_image(tmp_path / f"image{suffix}", channels, meta))
    np.testing.assert_array_equal(array, channels)
    same_geometry(read_meta, meta)


@pytest.mark.parametrize("suffix", WRITABLE)
def test_label_is_written_with_an_integer_dtype(tmp_path, suffix, label, meta):
    path = write_image(tmp_path / f"label{suffix}", label.astype(np.int64), meta)
    on_disk = nib.load(path).get_data_dtype() if "nii" in suffix else nrrd.read_header(str(path))["type"]
    assert on_disk in (np.uint8, "uint8", "unsigned char")
    read, _ = read_label(path, meta)
    assert read.dtype == np.uint8
    np.testing.assert_array_equal(read, label)


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        (np.array([0, 255]), np.uint8),
        (np.array([-1, 300]), np.int16),
        (np.array([0, 70000]), np.int32),
        (np.array([True, False]), np.uint8),
        (np.array([0.5, 1.0]), np.float32),
    ],
)
def test_disk_dtype_is_the_smallest_that_holds_the_values(tmp_path, make_meta, values, expected):
    meta = make_meta(shape=(2, 1, 1))
    path = write_image(tmp_path / "small.nii.gz", values.reshape(1, 2, 1, 1), meta)
    assert nib.load(path).get_data_dtype() == expected


def test_nrrd_is_written_in_lps_space_as_itk_reads_it(tmp_path, volume, meta):
    sitk = pytest.importorskip("SimpleITK")
    for name in ("image.nrrd", "image.nii.gz"):
        image = sitk.ReadImage(str(write_image(tmp_path / name, volume, meta)))
        lps = np.diag([-1.0, -1.0, 1.0]) @ np.asarray(meta.direction)
        np.testing.assert_allclose(image.GetOrigin(), np.multiply(meta.origin, [-1, -1, 1]), atol=1e-4)
        np.testing.assert_allclose(np.reshape(image.GetDirection(), (3, 3)), lps, atol=1e-5)
        np.testing.assert_allclose(image.GetSpacing(), meta.spacing, atol=1e-5)
        np.testing.assert_array_equal(sitk.GetArrayFromImage(image).transpose(2, 1, 0), volume)


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch, volume, meta):
    path = write_image(tmp_path / "image.nii.gz", volume, meta)
    before = path.read_bytes()

    def crash(temp_path, array, meta):
        temp_path.write_bytes(b"half a file")
        raise RuntimeError("disk full")

    monkeypatch.setattr(writers_module, "_write_nifti", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        write_image(path, volume + 1, meta)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["image.nii.gz"]


@pytest.mark.parametrize(
    ("name", "array_shape", "match"),
    [
        ("image.png", (12, 10, 8), r"image\.png: unknown image file extension '\.png'"),
        ("image.nhdr", (12, 10, 8), r"image\.nhdr: cannot write nrrd files; writable extensions"),
        ("image.mha", (12, 10, 8), r"image\.mha: cannot write metaimage files"),
        ("missing/image.nii.gz", (12, 10, 8), r"image\.nii\.gz: the folder .*missing does not exist"),
        (
            "image.nii.gz",
            (12, 10, 7),
            r"image\.nii\.gz: array must have shape .*\(12, 10, 8\), got \(12, 10, 7\)",
        ),
        ("image.nii.gz", (1, 1, 12, 10, 8), r"image\.nii\.gz: array must have shape"),
    ],
)
def test_invalid_writes_name_the_file_and_the_problem(tmp_path, meta, name, array_shape, match):
    with pytest.raises(ValueError, match=match):
        write_image(tmp_path / name, np.zeros(array_shape, np.float32), meta)


def test_integer_values_beyond_int32_are_rejected(tmp_path, make_meta):
    with pytest.raises(ValueError, match=r"big\.nrrd: integer values \[0, 4294967296\] do not fit int32"):
        write_image(tmp_path / "big.nrrd", np.array([0, 2**32]).reshape(2, 1, 1), make_meta(shape=(2, 1, 1)))


def _orthonormal(vector: list[float]) -> np.ndarray:
    """A rotation (3, 3) from a non-zero 4-vector read as a quaternion."""
    w, x, y, z = np.asarray(vector) / np.linalg.norm(vector)
    return np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
            [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
            [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
        ]
    )


geometries = st.builds(
    lambda quaternion, flips, spacing, origin, shape: (
        _orthonormal(quaternion) @ np.diag(flips),
        spacing,
        origin,
        shape,
    ),
    st.lists(st.floats(-1, 1), min_size=4, max_size=4).filter(lambda q: np.linalg.norm(q) > 0.1),
    st.lists(st.sampled_from([-1.0, 1.0]), min_size=3, max_size=3),
    st.tuples(*[st.floats(0.1, 5.0)] * 3),
    st.tuples(*[st.floats(-500.0, 500.0)] * 3),
    st.tuples(*[st.integers(1, 6)] * 3),
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(geometry=geometries, suffix=st.sampled_from([".nii.gz", ".nrrd"]))
def test_any_geometry_survives_a_round_trip(tmp_path_factory, make_meta, geometry, suffix):
    direction, spacing, origin, shape = geometry
    meta: ImageMeta = make_meta(direction=direction, spacing=spacing, origin=origin, shape=shape)
    array = np.random.default_rng(1).normal(size=shape).astype(np.float32)
    path = write_image(tmp_path_factory.mktemp("prop") / f"image{suffix}", array, meta)
    read, read_meta = read_image(path)
    np.testing.assert_array_equal(read[0], array)
    assert read_meta.shape == meta.shape
    # NIfTI stores the affine as float32: compare relative to the largest coordinate.
    np.testing.assert_allclose(read_meta.affine, meta.affine, atol=1e-6 * max(1.0, np.abs(origin).max()) * 4)
