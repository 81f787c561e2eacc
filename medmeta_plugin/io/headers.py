"""What an image file declares about its size, read from its header alone: nothing of its data is read or
decompressed, so a file that would inflate to gigabytes (a gzip bomb, a header declaring 10^10 voxels) can
be refused before it costs memory."""

from __future__ import annotations

import bz2
import re
import zlib
from pathlib import Path
from typing import BinaryIO, NamedTuple

import nibabel as nib
import nrrd
import numpy as np

from medmeta_plugin.io.formats import file_format

__all__ = [
    "DeclaredSize",
    "check_nrrd_inflation",
    "declared_size",
    "detached_data_files",
    "nrrd_spatial_axes",
]

# A MetaImage header is a few hundred bytes of text before its data (or its data file's name).
_MHA_HEADER_BYTES = 65536
# Bytes read and inflated per step when a compressed NRRD's stream is measured.
_CHUNK = 1 << 20
# The widest NRRD sample type (double, int64): the most bytes a declared voxel can take.
_MAX_SAMPLE_BYTES = 8
# NRRD axis kinds that are space (the rest, "vector", "list", "RGB-color" ..., are channels).
_NRRD_SPATIAL_KINDS = ("domain", "space")


class DeclaredSize(NamedTuple):
    """An image's size as its header declares it.

    Attributes:
        shape: spatial size (X, Y, Z) (a 2D file: Z = 1).
        spacing: voxel size in mm along those axes.
        channels: values per voxel (1 for a scalar image).
    """

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    channels: int

    @property
    def voxels(self) -> int:
        """Values the data holds: spatial voxels times channels."""
        return int(np.prod(self.shape, dtype=np.float64) * self.channels)


def _three(values: list[float], fill: float) -> tuple[float, float, float]:
    padded = [*values[:3], *([fill] * (3 - len(values[:3])))]
    return (float(padded[0]), float(padded[1]), float(padded[2]))


def nrrd_spatial_axes(header: dict, ndim: int) -> list[int]:
    """The spatial axes of a NRRD (pynrrd's axis order): those with finite ``space directions``; without
    directions those whose ``kinds`` are spatial; with neither, every axis of an image of at most three (of
    more, none: which axis is which cannot be told).

    Args:
        header: the header as ``nrrd.read_header`` returns it; ndim: its number of axes (``sizes``).
    """
    directions = header.get("space directions")
    kinds = header.get("kinds")
    if directions is not None:
        rows = [np.asarray(r, dtype=np.float64) for r in directions]
        return [axis for axis in range(ndim) if np.all(np.isfinite(rows[axis]))]
    if kinds is not None:
        return [axis for axis, kind in enumerate(kinds) if str(kind).lower() in _NRRD_SPATIAL_KINDS]
    return list(range(ndim)) if ndim <= 3 else []


def declared_size(path: str | Path) -> DeclaredSize | None:
    """The size ``path``'s header declares, or None for a DICOM folder (its files are each small; the
    series reader checks them), a file of an unknown format or a header too malformed to say (the full
    reader then reports why)."""
    path = Path(path)
    if path.is_dir() or not path.exists():
        return None
    try:
        fmt = file_format(path)
    except ValueError:
        return None
    try:
        if fmt == "nifti":
            header = nib.load(path).header  # the header only: nibabel reads data lazily
            dims = [int(d) for d in header.get_data_shape()]
            zooms = [float(z) for z in header.get_zooms()[:3]]
            shape = tuple(int(d) for d in _three([float(d) for d in dims], 1.0))
            return DeclaredSize(shape, _three(zooms, 1.0), int(np.prod(dims[3:], dtype=np.int64)) or 1)  # type: ignore[arg-type]
        if fmt == "nrrd":
            header = nrrd.read_header(str(path))
            sizes = [int(s) for s in header["sizes"]]
            spatial = nrrd_spatial_axes(header, len(sizes))
            directions = header.get("space directions")
            if directions is not None:
                spacing = [float(np.linalg.norm(np.asarray(directions[i], np.float64))) for i in spatial]
            else:
                spacings = [float(s) for s in header.get("spacings", [1.0] * len(sizes))]
                spacing = [spacings[i] for i in spatial]
            other = [s for i, s in enumerate(sizes) if i not in spatial]
            shape = tuple(int(s) for s in _three([float(sizes[i]) for i in spatial], 1.0))
            return DeclaredSize(shape, _three(spacing, 1.0), int(np.prod(other, dtype=np.int64)) or 1)  # type: ignore[arg-type]
        with open(path, "rb") as f:  # MetaImage: "Key = value" lines
            text = f.read(_MHA_HEADER_BYTES).decode("latin-1")
        fields = dict(re.findall(r"^\s*(\w+)\s*=\s*(.*?)\s*$", text.split("ElementDataFile")[0], re.M))
        dims = [int(v) for v in fields["DimSize"].split()]
        spacing = [float(v) for v in fields.get("ElementSpacing", fields.get("ElementSize", "1 1 1")).split()]
        channels = int(fields.get("ElementNumberOfChannels", "1"))
        shape = tuple(int(d) for d in _three([float(d) for d in dims], 1.0))
        return DeclaredSize(shape, _three(spacing, 1.0), channels)  # type: ignore[arg-type]
    except Exception:  # a header that does not parse: the full reader gives the diagnosis
        return None


def detached_data_files(path: str | Path) -> set[str]:
    """The names of the data files a detached header (``.nhdr``, ``.mhd``) names beside itself; empty for
    any other file, a header that names none, or one that does not parse (the full reader says why)."""
    path = Path(path)
    suffix = path.suffix.lower()
    try:
        if suffix == ".nhdr":
            header = nrrd.read_header(str(path))
            named = header.get("data file") or header.get("datafile")
            names = [named] if named else []
        elif suffix == ".mhd":
            with open(path, "rb") as f:  # MetaImage: "Key = value" lines
                text = f.read(_MHA_HEADER_BYTES).decode("latin-1")
            names = re.findall(r"^\s*ElementDataFile\s*=\s*(.*?)\s*$", text, re.M)
        else:
            return set()
    except Exception:
        return set()
    return {Path(str(n)).name for n in names}


def check_nrrd_inflation(path: str | Path) -> None:
    """Refuse a compressed NRRD whose data stream inflates to more than its header declares.

    pynrrd inflates a gzip or bzip2 stream whole into memory before it compares it with the header, so a small
    file behind a small header can still inflate to gigabytes. Here the stream is inflated a chunk at a time,
    nothing kept, and the count stops as soon as it passes the most the header allows (its voxels at 8 bytes
    each, plus its byte skip). Raw and text encodings, detached data that is not one plain file, and a header
    that does not parse (the full reader says why) pass.

    Raises:
        ValueError: if the stream inflates to more, naming the file and both sizes.
    """
    path = Path(path)
    with open(path, "rb") as fh:
        try:
            header = nrrd.read_header(fh)
        except Exception:  # a header that does not parse: the full reader gives the diagnosis
            return
        encoding = str(header.get("encoding", "raw")).lower()
        if encoding not in ("gzip", "gz", "bzip2", "bz2"):
            return
        detached = header.get("data file") or header.get("datafile")
        sizes = [int(s) for s in header["sizes"]]
        allowed = int(np.prod(sizes, dtype=np.float64)) * _MAX_SAMPLE_BYTES + max(
            int(header.get("byte skip", 0)), 0
        )
        # Lines skipped before the (compressed) stream; byte skip applies to the inflated data.
        line_skip = max(int(header.get("line skip", 0)), 0)
        if detached is None:
            _skip_lines(fh, line_skip)
            _inflate_at_most(fh, encoding, allowed, path)
            return
    data_file = path.parent / str(detached)
    if str(detached).upper().startswith("LIST") or " " in str(detached).strip() or not data_file.is_file():
        return
    with open(data_file, "rb") as fh:
        _skip_lines(fh, line_skip)
        _inflate_at_most(fh, encoding, allowed, data_file)


def _skip_lines(fh: BinaryIO, lines: int) -> None:
    for _ in range(lines):
        fh.readline()


def _inflate_at_most(fh: BinaryIO, encoding: str, allowed: int, path: Path) -> None:
    """Inflate ``fh``'s stream a chunk at a time; ValueError (naming ``path``) past ``allowed`` bytes or on a
    stream that is not valid ``encoding`` data."""
    try:
        _count_inflated(fh, encoding, allowed, path)
    except (zlib.error, OSError, EOFError) as err:
        raise ValueError(f"{path}: its {encoding} data is corrupt ({err}); it cannot be read.") from err


def _count_inflated(fh: BinaryIO, encoding: str, allowed: int, path: Path) -> None:
    gzip_stream = encoding in ("gzip", "gz")
    inflater = zlib.decompressobj(zlib.MAX_WBITS | 16) if gzip_stream else bz2.BZ2Decompressor()
    total = 0
    while chunk := fh.read(_CHUNK):
        pending = chunk
        while True:
            total += len(inflater.decompress(pending, _CHUNK))
            if total > allowed:
                raise ValueError(
                    f"{path}: its {encoding} data inflates to more than {allowed} bytes, the most its header "
                    "declares; refused without reading it (a compressed file too large to be what it says)."
                )
            if gzip_stream:
                pending = inflater.unconsumed_tail
                if not pending or inflater.eof:
                    break
            else:
                if inflater.needs_input or inflater.eof:
                    break
                pending = b""
        if inflater.eof:
            return
