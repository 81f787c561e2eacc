"""The working grid: images and labels reach it the same way, results come back on the scan's own grid."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from medmeta_plugin.app.grid import (
    NATIVE_FACTOR,
    check_size,
    label_to_working,
    load_working,
    to_original_grid,
)
from medmeta_plugin.io import ImageMeta, write_image
from tests.app.conftest import GEOMETRIES, phantom

WORKING = (3.0, 3.0, 3.0)


@pytest.mark.parametrize("geometry", sorted(GEOMETRIES))
@pytest.mark.parametrize("divisor", [1, 8, 16])
def test_image_and_label_share_the_working_grid_and_the_label_comes_back_whole(
    tmp_path: Path, geometry: str, divisor: int
) -> None:
    meta = GEOMETRIES[geometry]
    image, label = phantom(meta, seed=4)
    image_path = write_image(tmp_path / "scan.nii.gz", image, meta)
    label_path = write_image(tmp_path / "label.nrrd", label, meta)
    volume = load_working(image_path, WORKING, divisor, max_voxels=10**7)
    # Padded to the divisor at the high end by repeating edge voxels; the unpadded part is the grid's shape.
    assert all(s % divisor == 0 for s in volume.image.shape[2:])
    assert volume.crop(volume.image).shape[2:] == volume.shape == volume.working.shape
    x, y, z = volume.shape
    torch.testing.assert_close(
        volume.image[..., x:, :, :], volume.image[..., x - 1 : x, :, :].expand_as(volume.image[..., x:, :, :])
    )
    assert np.allclose(volume.working.spacing, WORKING)
    # RAS axes: the working grid's direction is the identity whatever the scan's header says.
    np.testing.assert_allclose(np.asarray(volume.working.direction), np.eye(3), atol=1e-6)
    work_label = label_to_working(label_path, volume, divisor)
    assert work_label.shape == tuple(volume.image.shape[2:])
    assert (work_label[x:] == 0).all() and (work_label[:, y:] == 0).all(), "labels are zero-padded"
    assert set(np.unique(work_label)) == {0, 1, 2}
    back = to_original_grid(work_label[:x, :y, :z], volume)
    assert back.shape == (1, *meta.shape) and back.dtype == work_label.dtype
    # Nearest-neighbour both ways at a coarser grid: the structures come back where they were.
    for value in (1, 2):
        a, b = back[0] == value, label[0] == value
        assert 2 * (a & b).sum() / (a.sum() + b.sum()) > 0.7, value


def test_a_label_on_another_grid_is_refused(tmp_path: Path) -> None:
    image, _ = phantom(GEOMETRIES["ras"], seed=1)
    _, other = phantom(GEOMETRIES["lps"], seed=1)
    volume = load_working(write_image(tmp_path / "a.nii.gz", image, GEOMETRIES["ras"]), WORKING, 8, 10**7)
    with pytest.raises(ValueError):
        label_to_working(write_image(tmp_path / "b.nrrd", other, GEOMETRIES["lps"]), volume, 8)


def test_size_limits_name_the_file_and_the_limit(tmp_path: Path) -> None:
    meta = ImageMeta((1.0, 1.0, 1.0), (0.0, 0.0, 0.0), ((1, 0, 0), (0, 1, 0), (0, 0, 1)), (40, 40, 40))
    path = write_image(tmp_path / "fine.nii.gz", np.zeros((1, 40, 40, 40), np.float32), meta)
    native = 40**3 // NATIVE_FACTOR  # the scan's own 40^3 voxels are NATIVE_FACTOR x this
    check_size(path, WORKING, max_voxels=native)  # at 3 mm: 14^3 on the working grid, fits
    with pytest.raises(ValueError, match=r"fine\.nii\.gz.*working spacing.*max_voxels"):
        check_size(path, (1.0, 1.0, 1.0), max_voxels=native)  # 40^3 working voxels
    with pytest.raises(ValueError, match=rf"{NATIVE_FACTOR} x --conf max_voxels\); none of it read"):
        check_size(path, WORKING, max_voxels=native - 1)
    with pytest.raises(ValueError, match="max_voxels"):
        load_working(path, (1.0, 1.0, 1.0), 8, max_voxels=native)
    check_size(tmp_path, WORKING, max_voxels=1)  # a folder (a DICOM series) is checked file by file
