"""Header-only size checks: ``declared_size`` reads shape, spacing and channels of each format without its
data (None where a header cannot say), and ``check_nrrd_inflation`` refuses a compressed NRRD stream exactly
when it inflates past the most its header allows, whatever the chunking, and lets everything else through.

The large gzip bombs (1 GiB streams, memory measured) are in ``tests/app/test_upload_limits.py``; the streams
here are a few bytes, so the boundary (allowed bytes pass, one more is refused) is checked exactly.
"""

from __future__ import annotations

import bz2
import zlib
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import nrrd
import numpy as np
import pytest

import medmeta_plugin.io.headers as headers
from medmeta_plugin.io import DeclaredSize, declared_size, read_image
from medmeta_plugin.io.headers import check_nrrd_inflation

# ---------------------------------------------------------------------------------------------- declared_size


def _nifti(name: str, shape: tuple[int, ...], zooms: tuple[float, ...]) -> Callable[[Path], Path]:
    def write(folder: Path) -> Path:
        image = nib.Nifti1Image(np.zeros(shape, np.float32), np.eye(4))
        image.header.set_zooms(zooms)
        nib.save(image, folder / name)
        return folder / name

    return write


def _nrrd(shape: tuple[int, ...], header: dict) -> Callable[[Path], Path]:
    def write(folder: Path) -> Path:
        nrrd.write(str(folder / "x.nrrd"), np.zeros(shape, np.uint8), header, index_order="F")
        return folder / "x.nrrd"

    return write


def _text(name: str, text: str, data: bytes = b"") -> Callable[[Path], Path]:
    def write(folder: Path) -> Path:
        (folder / name).write_bytes(text.encode("latin-1") + data)
        return folder / name

    return write


_NAN3 = [np.nan] * 3
_MHA = "ObjectType = Image\nNDims = {n}\nDimSize = {dims}\n{extra}ElementType = MET_UCHAR\n"

DECLARED = [
    pytest.param(_nifti("a.nii", (6, 5, 4), (2.0, 1.5, 3.0)), (6, 5, 4), (2.0, 1.5, 3.0), 1, id="nii"),
    pytest.param(_nifti("a.nii.gz", (6, 5), (2.0, 1.5)), (6, 5, 1), (2.0, 1.5, 1.0), 1, id="nifti-2d"),
    pytest.param(
        _nifti("a.nii.gz", (6, 5, 4, 3), (2.0, 1.5, 3.0, 1.0)), (6, 5, 4), (2.0, 1.5, 3.0), 3, id="nifti-4d"
    ),
    pytest.param(
        _nifti("a.nii.gz", (6, 5, 4, 1, 2), (2.0, 1.5, 3.0, 1.0, 1.0)),
        (6, 5, 4),
        (2.0, 1.5, 3.0),
        2,
        id="nifti-5d",
    ),
    pytest.param(
        _nrrd(
            (3, 6, 5, 4),
            {
                "space": "left-posterior-superior",
                "space directions": np.array([_NAN3, [2.0, 0, 0], [0, 1.5, 0], [0, 0, 3.0]]),
                "kinds": ["vector", "domain", "domain", "domain"],
            },
        ),
        (6, 5, 4),
        (2.0, 1.5, 3.0),
        3,
        id="nrrd-vector-axis",
    ),
    pytest.param(
        _nrrd(
            (6, 5, 4),
            {
                "space": "right-anterior-superior",
                "space directions": np.array([[-2.0, 0, 0], [0, 0, 1.5], [0, 3.0, 0]]),  # axes 1, 2 swapped
            },
        ),
        (6, 5, 4),
        (2.0, 1.5, 3.0),
        1,
        id="nrrd-oblique-directions",
    ),
    pytest.param(
        _nrrd((6, 5, 4), {"spacings": [2.0, 1.5, 3.0]}), (6, 5, 4), (2.0, 1.5, 3.0), 1, id="nrrd-spacings"
    ),
    pytest.param(_nrrd((6, 5, 4), {}), (6, 5, 4), (1.0, 1.0, 1.0), 1, id="nrrd-no-geometry"),
    pytest.param(_nrrd((6, 5), {"spacings": [2.0, 1.5]}), (6, 5, 1), (2.0, 1.5, 1.0), 1, id="nrrd-2d"),
    pytest.param(
        _text(
            "a.mha",
            _MHA.format(n=3, dims="6 5 4", extra="ElementNumberOfChannels = 3\nElementSpacing = 2 1.5 3\n")
            + "ElementDataFile = LOCAL\n",
            bytes(360),
        ),
        (6, 5, 4),
        (2.0, 1.5, 3.0),
        3,
        id="mha-channels",
    ),
    pytest.param(
        _text(
            "a.mha",
            _MHA.format(n=3, dims="6 5 4", extra="ElementSize = 2 1.5 3\n") + "ElementDataFile = LOCAL\n",
        ),
        (6, 5, 4),
        (2.0, 1.5, 3.0),
        1,
        id="mha-element-size",
    ),
    pytest.param(
        _text("a.mhd", _MHA.format(n=2, dims="6 5", extra="") + "ElementDataFile = a.raw\n"),
        (6, 5, 1),
        (1.0, 1.0, 1.0),
        1,
        id="mhd-2d-detached",
    ),
]


@pytest.mark.parametrize(("write", "shape", "spacing", "channels"), DECLARED)
def test_declared_size_reads_shape_spacing_and_channels(
    tmp_path: Path,
    write: Callable[[Path], Path],
    shape: tuple[int, int, int],
    spacing: tuple[float, float, float],
    channels: int,
) -> None:
    size = declared_size(write(tmp_path))
    assert isinstance(size, DeclaredSize)
    assert size.shape == shape and all(type(n) is int for n in size.shape)
    assert size.spacing == pytest.approx(spacing)
    assert size.channels == channels
    assert size.voxels == int(np.prod(shape)) * channels


NO_SIZE = [
    pytest.param(lambda folder: folder / "absent.nii.gz", id="missing"),
    pytest.param(lambda folder: folder, id="dicom-folder"),
    pytest.param(_text("a.png", "\x89PNG"), id="unknown-format"),
    pytest.param(_text("a.nrrd", "hello\n"), id="nrrd-not-nrrd"),
    pytest.param(_text("a.nii.gz", "not gzip at all"), id="nifti-garbage"),
    pytest.param(
        _text("a.mha", "ObjectType = Image\nNDims = 3\nElementDataFile = LOCAL\n"), id="mha-no-dimsize"
    ),
    pytest.param(_text("a.mha", "DimSize = six five four\nElementDataFile = LOCAL\n"), id="mha-bad-dimsize"),
]


@pytest.mark.parametrize("write", NO_SIZE)
def test_declared_size_is_none_where_the_header_cannot_say(
    tmp_path: Path, write: Callable[[Path], Path]
) -> None:
    assert declared_size(write(tmp_path)) is None


@pytest.mark.parametrize(
    ("size", "voxels"),
    [
        (DeclaredSize((10, 20, 30), (1.0, 1.0, 1.0), 1), 6000),
        (DeclaredSize((10, 20, 30), (1.0, 1.0, 1.0), 3), 18000),
        (
            DeclaredSize((100_000, 100_000, 100_000), (1.0, 1.0, 1.0), 2),
            2 * 10**15,
        ),  # no int32/int64 overflow
    ],
)
def test_voxels_counts_spatial_voxels_times_channels(size: DeclaredSize, voxels: int) -> None:
    assert size.voxels == voxels and type(size.voxels) is int


def test_declared_size_of_a_nrrd_with_kinds_matches_what_the_reader_reads(tmp_path: Path) -> None:
    header = {"kinds": ["vector", "domain", "domain", "domain"], "spacings": [np.nan, 2.0, 1.5, 3.0]}
    path = _nrrd((3, 6, 5, 4), header)(tmp_path)
    array, meta = read_image(path)
    assert array.shape == (3, 6, 5, 4) and meta.spacing == pytest.approx((2.0, 1.5, 3.0))  # the reader
    assert declared_size(path) == DeclaredSize((6, 5, 4), (2.0, 1.5, 3.0), 3)


# ------------------------------------------------------------------------------------- check_nrrd_inflation


def _compress(encoding: str, data: bytes) -> bytes:
    if encoding in ("gzip", "gz"):
        compressor = zlib.compressobj(9, zlib.DEFLATED, 31)  # gzip container
        return compressor.compress(data) + compressor.flush()
    return bz2.compress(data)


def _nrrd_header(sizes: tuple[int, ...], encoding: str, extra: str = "") -> str:
    return (
        f"NRRD0004\ntype: uint8\ndimension: {len(sizes)}\nsizes: {' '.join(map(str, sizes))}\n"
        f"encoding: {encoding}\n{extra}"
    )


def _attached(path: Path, sizes: tuple[int, ...], encoding: str, data: bytes, extra: str = "") -> Path:
    path.write_bytes((_nrrd_header(sizes, encoding, extra) + "\n").encode() + _compress(encoding, data))
    return path


def _allowed(sizes: tuple[int, ...], byte_skip: int = 0) -> int:
    """The most bytes the header allows: every voxel at 8 bytes (the widest NRRD type), plus its byte skip."""
    return int(np.prod(sizes)) * 8 + max(byte_skip, 0)


BOUNDARY = [
    pytest.param("gzip", (2, 2, 2), 0, id="gzip"),
    pytest.param("gz", (3, 1, 2), 0, id="gz"),
    pytest.param("bzip2", (2, 2, 2), 0, id="bzip2"),
    pytest.param("bz2", (4, 3), 0, id="bz2-2d"),
    pytest.param("gzip", (2, 2, 2), 100, id="gzip-byte-skip"),
    pytest.param("bzip2", (2, 3, 2), 7, id="bzip2-byte-skip"),
    pytest.param("gzip", (2, 2, 2), -1, id="gzip-byte-skip-minus-one"),
]


@pytest.mark.parametrize("chunk", [1, 5, 1 << 20], ids=["chunk1", "chunk5", "chunk1M"])
@pytest.mark.parametrize(("encoding", "sizes", "byte_skip"), BOUNDARY)
def test_a_stream_is_refused_exactly_when_it_inflates_past_the_header(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    encoding: str,
    sizes: tuple[int, ...],
    byte_skip: int,
    chunk: int,
) -> None:
    """Allowed bytes pass and one more byte is refused, whether the stream is read in 1-byte, 5-byte or 1 MiB
    chunks (the chunk size is the module's step; the streams here are far smaller than 1 MiB)."""
    monkeypatch.setattr(headers, "_CHUNK", chunk)
    allowed = _allowed(sizes, byte_skip)
    extra = f"byte skip: {byte_skip}\n" if byte_skip else ""
    check_nrrd_inflation(_attached(tmp_path / "fits.nrrd", sizes, encoding, bytes(allowed), extra))
    check_nrrd_inflation(
        _attached(tmp_path / "small.nrrd", sizes, encoding, bytes(int(np.prod(sizes))), extra)
    )
    big = _attached(tmp_path / "big.nrrd", sizes, encoding, bytes(allowed + 1), extra)
    with pytest.raises(
        ValueError, match=rf"big\.nrrd: its {encoding} data inflates to more than {allowed} bytes"
    ):
        check_nrrd_inflation(big)


@pytest.mark.parametrize("encoding", ["gzip", "bzip2"])
def test_a_detached_data_file_is_measured_and_named(tmp_path: Path, encoding: str) -> None:
    allowed = _allowed((2, 2, 2))
    header = tmp_path / "x.nhdr"
    header.write_text(_nrrd_header((2, 2, 2), encoding, "data file: x.raw.gz\n") + "\n")
    (tmp_path / "x.raw.gz").write_bytes(_compress(encoding, bytes(allowed)))
    check_nrrd_inflation(header)
    (tmp_path / "x.raw.gz").write_bytes(_compress(encoding, bytes(allowed + 1)))
    with pytest.raises(ValueError, match=rf"x\.raw\.gz: its {encoding} data inflates to more than {allowed}"):
        check_nrrd_inflation(header)


def _raw_overflowing(folder: Path) -> Path:
    # A raw stream is never inflated: far more bytes than declared is the full reader's business.
    path = folder / "raw.nrrd"
    path.write_bytes((_nrrd_header((2, 2, 2), "raw") + "\n").encode() + bytes(10_000))
    return path


def _text_encoding(folder: Path) -> Path:
    path = folder / "text.nrrd"
    path.write_text(_nrrd_header((2, 2, 2), "ascii") + "\n" + " ".join(["0"] * 1000))
    return path


def _detached_list(folder: Path) -> Path:
    path = folder / "list.nhdr"
    path.write_text(_nrrd_header((2, 2, 2), "gzip", "data file: LIST\n") + "\n" + "a.raw.gz\nb.raw.gz\n")
    return path


def _detached_pattern(folder: Path) -> Path:
    path = folder / "pattern.nhdr"
    (folder / "slice001.raw.gz").write_bytes(_compress("gzip", bytes(10_000)))
    path.write_text(_nrrd_header((2, 2, 2), "gzip", "data file: slice%03d.raw.gz 1 2 1\n") + "\n")
    return path


def _detached_missing(folder: Path) -> Path:
    path = folder / "missing.nhdr"
    path.write_text(_nrrd_header((2, 2, 2), "gzip", "data file: nowhere.raw.gz\n") + "\n")
    return path


def _no_header(folder: Path) -> Path:
    path = folder / "garbage.nrrd"
    path.write_bytes(b"PNG\x00\x01 not a nrrd\n\n" + _compress("gzip", bytes(10_000)))
    return path


PASSING = [
    pytest.param(_raw_overflowing, id="raw"),
    pytest.param(_text_encoding, id="ascii"),
    pytest.param(_detached_list, id="detached-list"),
    pytest.param(_detached_pattern, id="detached-pattern"),
    pytest.param(_detached_missing, id="detached-missing"),
    pytest.param(_no_header, id="unparsable-header"),
]


@pytest.mark.parametrize("write", PASSING)
def test_what_is_not_one_compressed_stream_passes(tmp_path: Path, write: Callable[[Path], Path]) -> None:
    assert check_nrrd_inflation(write(tmp_path)) is None


def test_a_valid_gzip_nrrd_with_line_skip_passes(tmp_path: Path) -> None:
    path = tmp_path / "skip.nrrd"
    header = _nrrd_header((2, 2, 2), "gzip", "line skip: 1\n") + "\n"
    path.write_bytes(header.encode() + b"a comment line pynrrd skips\n" + _compress("gzip", bytes(range(8))))
    assert nrrd.read(str(path))[0].sum() == sum(range(8))  # a valid file
    check_nrrd_inflation(path)


@pytest.mark.parametrize("encoding", ["gzip", "bzip2"])
def test_a_corrupt_compressed_stream_is_a_value_error_naming_the_file(tmp_path: Path, encoding: str) -> None:
    path = tmp_path / "corrupt.nrrd"
    path.write_bytes(
        (_nrrd_header((2, 2, 2), encoding) + "\n").encode() + b"this is no compressed stream" * 4
    )
    with pytest.raises(ValueError, match=r"corrupt\.nrrd"):
        read_image(path)
