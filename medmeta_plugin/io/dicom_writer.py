"""Write a 3D volume as a DICOM CT or MR image series (one file per slice), uncompressed or compressed.

Used by the tests (round trips through real transfer syntaxes) and for sample data. Lossless only: the
stored pixels are the volume's integer values.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)
from pydicom.valuerep import format_number_as_ds

from medmeta_plugin.io.formats import flip_lps_ras
from medmeta_plugin.io.meta import ImageMeta

__all__ = ["DICOM_TRANSFER_SYNTAXES", "write_dicom_series"]

#: ``transfer_syntax`` names of :func:`write_dicom_series` -> DICOM transfer syntax UID (all lossless).
DICOM_TRANSFER_SYNTAXES = {
    "explicit": ExplicitVRLittleEndian,
    "jpeg2000": JPEG2000Lossless,
    "jpegls": JPEGLSLossless,
    "rle": RLELossless,
}
_SOP_CLASSES = {"CT": "1.2.840.10008.5.1.4.1.1.2", "MR": "1.2.840.10008.5.1.4.1.1.4"}


def write_dicom_series(
    folder: str | Path,
    array: np.ndarray,
    meta: ImageMeta,
    *,
    modality: str = "CT",
    transfer_syntax: str = "explicit",
    series_uid: str | None = None,
    study_uid: str | None = None,
    series_description: str = "",
    patient_id: str = "ANONYMOUS",
    file_prefix: str = "slice",
) -> list[Path]:
    """Write one slice file per Z index, with geometry from ``meta`` (converted to DICOM's LPS).

    Args:
        folder: output folder, created if missing; existing files are never overwritten.
        array: integer-valued volume, shape (X, Y, Z) or (1, X, Y, Z), values within int16 or uint16.
            X runs along a DICOM row (columns), Y down the rows.
        meta: geometry of ``array``; its first two direction columns must be orthonormal (the slice plane).
        modality: "CT" or "MR" (sets Modality and the SOP class).
        transfer_syntax: one of :data:`DICOM_TRANSFER_SYNTAXES`; "jpeg2000" and "jpegls" need the optional
            ``imagecodecs`` package.
        series_uid: ``SeriesInstanceUID``; a fresh UID when None.
        study_uid: ``StudyInstanceUID``; a fresh UID when None.
        series_description: ``SeriesDescription``.
        patient_id: ``PatientID`` and ``PatientName``.
        file_prefix: files are named ``{file_prefix}_{k:04d}.dcm`` for slice k.

    Returns:
        The written file paths, in slice order.

    Raises:
        ValueError: if an argument is invalid, the values are not integers in range, the slice plane is not
            orthonormal, or a file to write already exists.
        ImportError: if ``transfer_syntax`` needs ``imagecodecs`` and it is not installed.
    """
    array = np.asarray(array)
    if array.ndim == 4 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 3 or tuple(array.shape) != tuple(meta.shape):
        raise ValueError(
            f"array must have shape meta.shape = {tuple(meta.shape)} (X, Y, Z), got {array.shape}."
        )
    if modality not in _SOP_CLASSES:
        raise ValueError(f"modality must be one of {list(_SOP_CLASSES)}, got {modality!r}.")
    if transfer_syntax not in DICOM_TRANSFER_SYNTAXES:
        raise ValueError(
            f"transfer_syntax must be one of {list(DICOM_TRANSFER_SYNTAXES)}, got {transfer_syntax!r}."
        )
    stored, intercept, signed = _stored_values(array, transfer_syntax)
    encode = _encoder(transfer_syntax)
    lps = flip_lps_ras(meta.affine)
    row, col = lps[:3, 0] / meta.spacing[0], lps[:3, 1] / meta.spacing[1]
    if not np.allclose([row @ row, col @ col, row @ col], [1.0, 1.0, 0.0], atol=1e-6):
        raise ValueError(
            f"{meta.source or 'meta'}: the first two direction columns must be orthonormal for DICOM."
        )
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{file_prefix}_{k:04d}.dcm" for k in range(array.shape[2])]
    existing = [p.name for p in paths if p.exists()]
    if existing:
        raise ValueError(
            f"{folder}: would overwrite existing files {existing[:3]}; choose another folder or prefix."
        )
    shared = {
        "StudyInstanceUID": study_uid or generate_uid(),
        "SeriesInstanceUID": series_uid or generate_uid(),
        "FrameOfReferenceUID": generate_uid(),
    }
    for k, path in enumerate(paths):
        dataset = _slice_dataset(path, modality, transfer_syntax, shared)
        dataset.PatientID = dataset.PatientName = patient_id
        dataset.SeriesDescription = series_description
        dataset.InstanceNumber = k + 1
        dataset.ImagePositionPatient = _ds(lps[:3, 3] + k * lps[:3, 2])
        dataset.ImageOrientationPatient = _ds([*row, *col])
        dataset.PixelSpacing = _ds([meta.spacing[1], meta.spacing[0]])  # between rows, between columns
        dataset.SliceThickness = _ds([meta.spacing[2]])[0]
        dataset.Rows, dataset.Columns = array.shape[1], array.shape[0]
        dataset.SamplesPerPixel = 1
        dataset.PhotometricInterpretation = "MONOCHROME2"
        dataset.BitsAllocated = dataset.BitsStored = 16
        dataset.HighBit = 15
        dataset.PixelRepresentation = int(signed)
        dataset.RescaleSlope, dataset.RescaleIntercept = "1", _ds([intercept])[0]
        encode(dataset, np.ascontiguousarray(stored[:, :, k].T))
        dataset.save_as(path, write_like_original=False)
    return paths


def _stored_values(array: np.ndarray, transfer_syntax: str) -> tuple[np.ndarray, float, bool]:
    """Integer pixels to store, the intercept that restores ``array`` from them, and their signedness."""
    if not np.all(np.isfinite(array)) or not np.array_equal(array, np.round(array)):
        raise ValueError("array must hold finite integer values (DICOM pixels are stored without loss).")
    low, high = (int(array.min()), int(array.max())) if array.size else (0, 0)
    if low >= 0 and high <= 65535:
        return array.astype(np.uint16), 0.0, False
    if low < -32768 or high > 32767:
        raise ValueError(f"array values [{low}, {high}] fit neither int16 nor uint16.")
    if transfer_syntax == "jpegls":
        # The JPEG-LS encoder takes unsigned samples only: store value - min and restore it by the intercept.
        return (array - low).astype(np.uint16), float(low), False
    return array.astype(np.int16), 0.0, True


def _encoder(transfer_syntax: str):
    """A function ``(dataset, frame (Rows, Columns)) -> None`` that sets PixelData in that syntax."""
    if transfer_syntax in ("jpeg2000", "jpegls"):
        try:
            import imagecodecs  # optional: only the test extra installs it
        except ImportError as err:
            raise ImportError(
                f"transfer_syntax={transfer_syntax!r} needs the optional package imagecodecs "
                "(pip install imagecodecs, or the project's [test] extra)."
            ) from err

    def encode(dataset: pydicom.Dataset, frame: np.ndarray) -> None:
        if transfer_syntax == "explicit":
            dataset.PixelData = frame.tobytes()
        elif transfer_syntax == "rle":
            dataset.compress(RLELossless, frame)
        else:
            if transfer_syntax == "jpeg2000":
                # A raw J2K codestream, as DICOM asks (no JP2 file wrapper); level=0 is the lossless mode.
                data = imagecodecs.jpeg2k_encode(frame, level=0, codecformat="J2K")
            else:
                data = imagecodecs.jpegls_encode(frame)  # near-lossless distance 0: lossless
            dataset.PixelData = encapsulate([data])
            dataset["PixelData"].VR = "OB"
            dataset["PixelData"].is_undefined_length = True
            dataset.LossyImageCompression = "00"

    return encode


def _slice_dataset(path: Path, modality: str, transfer_syntax: str, shared: dict[str, str]) -> FileDataset:
    """A dataset with the file meta and identifying UIDs of one slice."""
    sop_uid = generate_uid()
    file_meta = FileMetaDataset()
    file_meta.MediaStorageSOPClassUID = _SOP_CLASSES[modality]
    file_meta.MediaStorageSOPInstanceUID = sop_uid
    file_meta.TransferSyntaxUID = DICOM_TRANSFER_SYNTAXES[transfer_syntax]
    file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    dataset = FileDataset(str(path), {}, file_meta=file_meta, preamble=b"\0" * 128)
    dataset.is_little_endian, dataset.is_implicit_VR = True, False
    dataset.SOPClassUID, dataset.SOPInstanceUID = _SOP_CLASSES[modality], sop_uid
    dataset.Modality = modality
    dataset.SeriesNumber = 1
    for name, uid in shared.items():
        setattr(dataset, name, uid)
    return dataset


def _ds(values) -> list[str]:
    """Numbers as DICOM decimal strings (16 characters at most)."""
    return [format_number_as_ds(float(v)) for v in np.ravel(values)]
