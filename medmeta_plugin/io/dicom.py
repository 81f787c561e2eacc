"""Read a DICOM image series from a folder: one 3D volume, slices ordered by geometry.

Slices are ordered by the projection of ``ImagePositionPatient`` on the slice normal, never by file name or
``InstanceNumber``; a missing slice, two slices at one position, files of several series and slices whose
orientation or matrix differ are errors that name the files. Compressed transfer syntaxes (JPEG 2000,
JPEG-LS, JPEG, RLE) are decoded by pydicom's pixel data handlers (GDCM).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

from medmeta_plugin.io.formats import flip_lps_ras
from medmeta_plugin.io.meta import ImageMeta

__all__ = ["read_dicom_series"]

# Objects with pixel data that are not slices of a volume, e.g. a DICOM SEG stored next to its CT.
_NOT_VOLUMES = ("1.2.840.10008.5.1.4.1.1.66.4",)
_REQUIRED = ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "Rows", "Columns")
_COUNTS = {"ImagePositionPatient": 3, "ImageOrientationPatient": 6, "PixelSpacing": 2}
# Direction cosines and pixel spacing are decimal strings (DS, 16 characters at most) that scanners round
# to about 6 decimals, so "the same" means equal to 1e-4.
_SAME_COSINE = 1e-4
_SAME_SPACING_MM = 1e-4
# Slice positions are DS too, often rounded to 0.01 mm: a step may be off by twice that rounding. A
# deviation above 1% of the step (or 0.02 mm) is a real gap or an irregular series, not rounding.
_STEP_RTOL = 0.01
_STEP_ATOL_MM = 0.02


def read_dicom_series(folder: str | Path, series_uid: str | None = None) -> tuple[np.ndarray, ImageMeta]:
    """Read one DICOM series from a folder (searched recursively) into a volume.

    Args:
        folder: folder holding the series' files; files that are not DICOM (a readme, a ``DICOMDIR``) and
            series without pixel data (structured reports, presentation states) are skipped.
        series_uid: ``SeriesInstanceUID`` to read when the folder holds several image series.

    Returns:
        ``(array, meta)``: float32 array of shape (1, X, Y, Z), X along a row (DICOM columns), Y down the
        columns (DICOM rows), Z along the slice normal, with ``RescaleSlope``/``RescaleIntercept`` applied;
        and its :class:`ImageMeta` (RAS, mm). ``meta.extra`` holds ``SeriesInstanceUID``,
        ``StudyInstanceUID``, ``FrameOfReferenceUID``, ``Modality``, ``SeriesDescription``, and
        ``SOPInstanceUIDs`` and ``files`` in slice order.

    Raises:
        ValueError: if the folder is missing or holds no DICOM image; if it holds several image series and
            ``series_uid`` is None or not among them; if a slice lacks pixel data or geometry, differs from
            the others in orientation, matrix or pixel spacing, cannot be decoded; or if slice positions
            leave a gap, repeat, or do not lie on a line. Each message names the folder, series or file.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder}: not a folder; a DICOM series is read from the folder holding its files.")
    files = sorted(path for path in folder.rglob("*") if path.is_file())
    if not files:
        raise ValueError(f"{folder}: the folder holds no files; expected a DICOM series.")
    series, skipped = _group_by_series(files)
    images = {uid: items for uid, items in series.items() if _is_volume_series(items)}
    if not images:
        raise ValueError(
            f"{folder}: no DICOM image found among {len(files)} files (skipped as not DICOM: "
            f"{_shorten(skipped)}; series without image pixel data: {_shorten(list(series))})."
        )
    if series_uid is None and len(images) > 1:
        raise ValueError(
            f"{folder}: holds {len(images)} DICOM series; pass series_uid to choose one of: "
            + "; ".join(_describe_series(uid, items) for uid, items in images.items())
        )
    if series_uid is not None and series_uid not in images:
        raise ValueError(
            f"{folder}: no image series with SeriesInstanceUID {series_uid!r}; found: "
            + "; ".join(_describe_series(uid, items) for uid, items in images.items())
        )
    uid = series_uid if series_uid is not None else next(iter(images))
    # An image file of the same SOP class but filed under no image series is a broken slice of this one
    # (e.g. cut short inside its SeriesInstanceUID), not a report to skip.
    sop_class = _sop_class(images[uid][0][1])
    for other in series.values():
        if not _is_volume_series(other):
            for path, dataset in other:
                if _sop_class(dataset) == sop_class:
                    raise ValueError(
                        f"{path}: image file ({sop_class.name}) without pixel data, outside series {uid}; "
                        "it is truncated or malformed."
                    )
    return _stack(images[uid], source=f"{folder} (series {uid})")


def _group_by_series(files: list[Path]) -> tuple[dict[str, list[tuple[Path, pydicom.Dataset]]], list[str]]:
    """DICOM files by SeriesInstanceUID, and the names of the files skipped as not DICOM or DICOMDIR."""
    series: dict[str, list[tuple[Path, pydicom.Dataset]]] = defaultdict(list)
    skipped = []
    for path in files:
        dataset = _read_header(path)
        if dataset is None or "DirectoryRecordSequence" in dataset:  # not DICOM, or a DICOMDIR index
            skipped.append(path.name)
            continue
        if "SeriesInstanceUID" not in dataset:  # type 1 in every IOD: the file is cut short or broken
            raise ValueError(f"{path}: DICOM file without SeriesInstanceUID; it is truncated or malformed.")
        series[str(dataset.SeriesInstanceUID)].append((path, dataset))
    return series, skipped


def _is_volume_series(items: list[tuple[Path, pydicom.Dataset]]) -> bool:
    """Whether a series holds image slices (pixel data that is not a segmentation object)."""
    return any("PixelData" in ds and _sop_class(ds) not in _NOT_VOLUMES for _, ds in items)


def _sop_class(dataset: pydicom.Dataset) -> pydicom.uid.UID:
    meta = getattr(dataset, "file_meta", pydicom.Dataset())
    return pydicom.uid.UID(str(dataset.get("SOPClassUID", meta.get("MediaStorageSOPClassUID", ""))))


def _read_header(path: Path) -> pydicom.Dataset | None:
    """The file's dataset with its pixel data deferred, or None if it is not a DICOM file."""
    try:
        # Deferring large values (the pixel data) keeps this pass over the headers cheap.
        return pydicom.dcmread(path, defer_size="1 KB")
    except InvalidDicomError:
        return None  # no "DICM" preamble: a readme, a thumbnail, ...
    except Exception as err:  # a DICOM file that pydicom cannot parse: truncated, corrupt element
        raise ValueError(f"{path}: cannot read this DICOM file: {type(err).__name__}: {err}") from err


def _stack(items: list[tuple[Path, pydicom.Dataset]], source: str) -> tuple[np.ndarray, ImageMeta]:
    """Check, order and decode the files of one series."""
    first_path, first = items[0]
    for path, dataset in items:
        _check_slice(path, dataset, first_path, first, source)
    row, col = np.reshape(_floats(first.ImageOrientationPatient), (2, 3))
    normal = np.cross(row, col)
    positions = np.array([_floats(ds.ImagePositionPatient) for _, ds in items])
    order = np.argsort(positions @ normal, kind="stable")
    items = [items[i] for i in order]
    positions = positions[order]
    step = _slice_step(items, positions, normal, source)

    row_spacing, col_spacing = _floats(first.PixelSpacing)
    volume = np.empty((int(first.Columns), int(first.Rows), len(items)), dtype=np.float32)
    for k, (path, dataset) in enumerate(items):
        volume[:, :, k] = _decode(path, dataset, source).T
    affine = np.eye(4)
    # A DICOM row runs along the first cosine, with PixelSpacing[1] between columns; DICOM is LPS.
    affine[:3, 0] = row * col_spacing
    affine[:3, 1] = col * row_spacing
    affine[:3, 2] = step
    affine[:3, 3] = positions[0]
    extra = {
        "format": "dicom",
        "SeriesInstanceUID": str(first.get("SeriesInstanceUID", "")),
        "StudyInstanceUID": str(first.get("StudyInstanceUID", "")),
        "FrameOfReferenceUID": str(first.get("FrameOfReferenceUID", "")),
        "Modality": str(first.get("Modality", "")),
        "SeriesDescription": str(first.get("SeriesDescription", "")),
        "SOPInstanceUIDs": [str(ds.get("SOPInstanceUID", "")) for _, ds in items],
        "files": [str(path) for path, _ in items],
    }
    meta = ImageMeta.from_affine(flip_lps_ras(affine), volume.shape, source=source, extra=extra)
    return volume[None], meta


def _check_slice(
    path: Path, dataset: pydicom.Dataset, first_path: Path, first: pydicom.Dataset, source: str
) -> None:
    """Raise unless the slice has pixel data and geometry matching the series' first file."""
    if "PixelData" not in dataset:
        raise ValueError(f"{path}: this file of {source} has no pixel data (PixelData element missing).")
    missing = [name for name in _REQUIRED if name not in dataset]
    if missing:
        raise ValueError(f"{path}: this file of {source} lacks {', '.join(missing)}; cannot place the slice.")
    for name, count in _COUNTS.items():
        values = _floats(dataset.get(name))
        if len(values) != count or not np.all(np.isfinite(values)):
            raise ValueError(f"{path}: {name} must hold {count} numbers, got {dataset.get(name)!r}.")
    if int(dataset.get("NumberOfFrames", 1) or 1) > 1:
        raise ValueError(f"{path}: multi-frame DICOM ({dataset.NumberOfFrames} frames) is not supported.")
    if int(dataset.get("SamplesPerPixel", 1)) != 1:
        raise ValueError(f"{path}: {dataset.SamplesPerPixel} samples per pixel (colour) is not supported.")
    if (dataset.Rows, dataset.Columns) != (first.Rows, first.Columns):
        raise ValueError(
            f"{path}: matrix {dataset.Rows}x{dataset.Columns} differs from {first.Rows}x{first.Columns} "
            f"of {first_path.name} in {source}."
        )
    for name, tol in (("ImageOrientationPatient", _SAME_COSINE), ("PixelSpacing", _SAME_SPACING_MM)):
        value, expected = _floats(dataset.get(name)), _floats(first.get(name))
        if len(value) != len(expected) or not np.allclose(value, expected, rtol=0.0, atol=tol):
            raise ValueError(
                f"{path}: {name} {value} differs from {expected} of {first_path.name} in {source}; "
                "a series must have one orientation and pixel spacing."
            )


def _slice_step(
    items: list[tuple[Path, pydicom.Dataset]], positions: np.ndarray, normal: np.ndarray, source: str
) -> np.ndarray:
    """World (LPS) vector from one slice to the next; raises on gaps, duplicates and off-line slices."""
    if len(items) == 1:
        first = items[0][1]
        thickness = first.get("SpacingBetweenSlices") or first.get("SliceThickness") or 1.0
        return normal * float(thickness)
    along = positions @ normal
    steps = np.diff(along)
    same = np.flatnonzero(steps < _STEP_ATOL_MM)
    if same.size:
        k = same[0]
        raise ValueError(
            f"{source}: files {items[k][0].name} and {items[k + 1][0].name} are at the same slice position "
            f"{along[k]:.3f} mm; duplicate slices, or several acquisitions (echoes, phases) in one series."
        )
    typical = float(np.median(steps))
    tol = max(_STEP_RTOL * typical, _STEP_ATOL_MM)
    irregular = np.flatnonzero(np.abs(steps - typical) > tol)
    if irregular.size:
        k = irregular[0]
        raise ValueError(
            f"{source}: gap in slice positions between {items[k][0].name} ({along[k]:.3f} mm) and "
            f"{items[k + 1][0].name} ({along[k + 1]:.3f} mm): step {steps[k]:.3f} mm where the series "
            f"steps {typical:.3f} mm; a slice is missing or the spacing is irregular."
        )
    # The mean step keeps a gantry tilt (slices shifted in-plane along the series) in the affine.
    step = (positions[-1] - positions[0]) / (len(items) - 1)
    expected = positions[0] + np.arange(len(items))[:, None] * step
    off = np.linalg.norm(positions - expected, axis=1)
    if off.max() > tol:
        k = int(np.argmax(off))
        raise ValueError(
            f"{source}: slice {items[k][0].name} lies {off[k]:.3f} mm off the line through the other slice "
            "positions; the series is not one regular volume."
        )
    return step


def _decode(path: Path, dataset: pydicom.Dataset, source: str) -> np.ndarray:
    """Pixel values of one slice, shape (Rows, Columns), float32, with the rescale applied."""
    syntax = getattr(dataset, "file_meta", pydicom.Dataset()).get("TransferSyntaxUID", "(unknown)")
    try:
        pixels = dataset.pixel_array
    except Exception as err:  # each pydicom handler (GDCM, numpy, RLE) raises its own types
        name = getattr(syntax, "name", str(syntax))
        raise ValueError(
            f"{path}: cannot decode the pixel data of this file of {source} (transfer syntax {name}, "
            f"{syntax}): {type(err).__name__}: {err}"
        ) from err
    if pixels.shape != (dataset.Rows, dataset.Columns):
        raise ValueError(
            f"{path}: decoded pixel data has shape {pixels.shape}, expected Rows x Columns = "
            f"({dataset.Rows}, {dataset.Columns})."
        )
    slope = float(dataset.get("RescaleSlope", 1.0) or 1.0)
    intercept = float(dataset.get("RescaleIntercept", 0.0) or 0.0)
    return (pixels.astype(np.float64) * slope + intercept).astype(np.float32)


def _floats(value: object) -> list[float]:
    """A DICOM multi-valued DS element as floats (empty when absent)."""
    if value is None:
        return []
    values = value if isinstance(value, list | tuple | pydicom.multival.MultiValue) else [value]
    try:
        return [float(v) for v in values]
    except (TypeError, ValueError):
        return []  # not numbers: callers report the element as malformed


def _describe_series(uid: str, items: list[tuple[Path, pydicom.Dataset]]) -> str:
    first = items[0][1]
    description = str(first.get("SeriesDescription", "")).strip()
    described = f", {description!r}" if description else ""
    return f"{uid} ({len(items)} files, {first.get('Modality', '?')}{described})"


def _shorten(names: list[str], limit: int = 5) -> str:
    if not names:
        return "none"
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more
