"""Uploads too large to serve are refused from their header, before their data is read or inflated: a
NIfTI whose header declares far more voxels than ``max_voxels``, and a gzip bomb (a .nii.gz that inflates to
gigabytes), as an image upload, a label and a scan sent with an inference request."""

from __future__ import annotations

import bz2
import functools
import io
import resource
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medmeta_plugin.app.grid import check_size
from medmeta_plugin.io import ImageMeta, declared_size, write_image
from tests.app.conftest import save_label

# 1024^3 uint8 voxels: 1 GiB inflated, ~1 MiB compressed.
BOMB_SHAPE = (1024, 1024, 1024)


def _bomb(path: Path, shape: tuple[int, int, int] = BOMB_SHAPE) -> Path:
    """A .nii.gz whose header declares ``shape`` (uint8) and whose gzip stream inflates to all of it."""
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(np.uint8)
    header.set_zooms((1.0, 1.0, 1.0))
    header["vox_offset"] = 352
    raw = header.binaryblock + b"\0" * 4
    compressor = zlib.compressobj(9, zlib.DEFLATED, 31)  # gzip container
    chunk = bytes(1 << 24)
    parts = [compressor.compress(raw)]
    total = int(np.prod(shape))
    for _ in range(total // len(chunk)):
        parts.append(compressor.compress(chunk))
    parts.append(compressor.flush())
    path.write_bytes(b"".join(parts))
    return path


def test_declared_size_reads_the_header_of_each_format(tmp_path: Path) -> None:
    meta = ImageMeta((2.0, 1.5, 3.0), (0.0, 0.0, 0.0), ((1, 0, 0), (0, 1, 0), (0, 0, 1)), (6, 5, 4))
    mha = tmp_path / "x.mha"  # a MetaImage as ITK writes one: text header, then the raw voxels
    header = "ObjectType = Image\nNDims = 3\nDimSize = 6 5 4\nElementSpacing = 2 1.5 3\n"
    mha.write_bytes((header + "ElementType = MET_FLOAT\nElementDataFile = LOCAL\n").encode() + bytes(480))
    for suffix in (".nii.gz", ".nrrd", ".mha"):
        path = mha if suffix == ".mha" else write_image(tmp_path / f"x{suffix}", np.zeros((1, 6, 5, 4)), meta)
        size = declared_size(path)
        assert size is not None and size.shape == (6, 5, 4) and size.channels == 1, suffix
        assert size.spacing == pytest.approx((2.0, 1.5, 3.0)), suffix
    assert declared_size(tmp_path) is None  # a folder: a DICOM series, checked file by file


def test_a_gzip_bomb_is_refused_without_inflating(tmp_path: Path) -> None:
    bomb = _bomb(tmp_path / "bomb.nii.gz")
    assert bomb.stat().st_size < 8 << 20
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(ValueError, match="declares .* none of it read"):
        check_size(bomb, (3.0, 3.0, 3.0), max_voxels=64**3)
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mb < 200, "the check must not inflate the 1 GiB stream"
    # Within the native limit but not on the working grid: refused by the working-grid estimate.
    with pytest.raises(ValueError, match="working spacing"):
        check_size(bomb, (1.0, 1.0, 1.0), max_voxels=300_000_000)
    check_size(bomb, (8.0, 8.0, 8.0), max_voxels=300_000_000)  # fits both limits: passes


def test_oversized_uploads_get_a_4xx_and_nothing_is_stored(app_client, studies, tmp_path: Path) -> None:
    bomb = _bomb(tmp_path / "bomb.nii.gz").read_bytes()
    before = sorted(p.name for p in studies["studies"].iterdir())
    response = app_client.put(
        "/datastore/", params={"image": "bomb"}, files={"file": ("bomb.nii.gz", io.BytesIO(bomb))}
    )
    assert response.status_code == 413 and "declares" in response.json()["detail"], response.text
    assert sorted(p.name for p in studies["studies"].iterdir()) == before
    label = _bomb(tmp_path / "label.nii.gz", (512, 512, 512))
    response = save_label(app_client, "a", label, [{"name": "ball", "idx": 1}])
    assert response.status_code == 400 and "declares" in response.json()["detail"], response.text
    response = app_client.post(
        "/infer/medmeta", params={"output": "json"}, files={"file": ("scan.nii.gz", io.BytesIO(bomb))}
    )
    assert 400 <= response.status_code < 500, response.text


@functools.cache
def _zeros_stream(encoding: str, inflated: int) -> bytes:
    """``inflated`` zero bytes compressed with ``encoding`` (gzip or bzip2), made once per run."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, 31) if encoding == "gzip" else bz2.BZ2Compressor(9)
    chunk = bytes(1 << 24)
    parts = [compressor.compress(chunk) for _ in range(inflated // len(chunk))]
    return b"".join([*parts, compressor.flush()])


def _nrrd_bomb(path: Path, encoding: str = "gzip", inflated: int = 1 << 30, detached: bool = False) -> Path:
    """A NRRD whose header declares a 24^3 uint8 label on image ``a``'s grid and whose compressed data
    inflates to ``inflated`` bytes (pynrrd would inflate all of it before comparing)."""
    header = (
        f"NRRD0004\ntype: uint8\ndimension: 3\nsizes: 24 24 24\nencoding: {encoding}\n"
        "space: right-anterior-superior\nspace directions: (2,0,0) (0,2,0) (0,0,2)\nspace origin: (0,0,0)\n"
    )
    data = _zeros_stream(encoding, inflated)
    if detached:
        (path.parent / f"{path.stem}.raw.gz").write_bytes(data)
        path.write_text(header + f"data file: {path.stem}.raw.gz\n\n")
    else:
        path.write_bytes((header + "\n").encode() + data)
    return path


@pytest.mark.parametrize(
    "encoding, detached",
    [("gzip", False), ("gzip", True), ("bzip2", False)],
    ids=["gzip", "detached", "bzip2"],
)
def test_a_nrrd_whose_stream_inflates_past_its_header_is_refused_unread(
    tmp_path: Path, encoding: str, detached: bool
) -> None:
    from medmeta_plugin.io import read_label

    suffix = ".nhdr" if detached else ".nrrd"
    bomb = _nrrd_bomb(
        tmp_path / f"bomb{suffix}", encoding, (1 << 30) if encoding == "gzip" else 1 << 27, detached
    )
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(ValueError, match="inflates to more than .* bytes, the most its header declares"):
        read_label(bomb)
    assert (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024 < 100, "nothing was inflated"
    # The same file whose stream is what the header says reads as usual.
    meta = ImageMeta((2.0, 2.0, 2.0), (0.0, 0.0, 0.0), ((1, 0, 0), (0, 1, 0), (0, 0, 1)), (24, 24, 24))
    fine = write_image(tmp_path / "fine.nrrd", np.ones((1, 24, 24, 24), np.uint8), meta)
    assert read_label(fine)[0].sum() == 24**3


def test_a_nrrd_bomb_label_is_a_400_and_stores_nothing(app_client, studies, tmp_path: Path) -> None:
    bomb = _nrrd_bomb(tmp_path / "label.nrrd")
    response = save_label(app_client, "a", bomb, [{"name": "ball", "idx": 1}])
    assert response.status_code == 400 and "inflates to more than" in response.json()["detail"], response.text
    assert app_client.get("/datastore/", params={"output": "all"}).json()["objects"]["a"]["labels"] == {}
