"""The app's DICOMweb datastore: MONAI Label's, with labels validated first and DICOM SEG written in Python.

MONAI Label 0.8.5 writes DICOM SEG through dcmqi's ``itkimage2segimage`` binary, which it downloads from
GitHub at start (no network at run time here, and Debian has no dcmqi package). This datastore writes the
SEG with pydicom-seg instead (MONAI Label's own converter, its pure-Python branch), stores it back in the
PACS, and keeps the validated label and its parsed names locally, where adaptation reads them.

MONAI Label downloads a series into its cache and converts it to NIfTI on first use, with nothing to stop two
threads (an inference and the background scoring after an adaptation) from doing it at once: the second one
found the folder or the NIfTI file already there and read it half written ("the file is empty"). Here each
series is fetched under a file lock of its own (threads and processes alike), so it is read only when whole.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import HTTPException
from filelock import FileLock
from monailabel.datastore.dicom import DICOMWebDatastore
from monailabel.datastore.local import LocalDatastore
from monailabel.datastore.utils.convert import nifti_to_dicom_seg
from monailabel.datastore.utils.dicom import dicom_web_upload_dcm
from monailabel.interfaces.datastore import DefaultLabelTag

from medmeta_plugin.app.datastore import restore_label, store_label, validated_label
from medmeta_plugin.app.datastore_writes import write_datastore_file
from medmeta_plugin.app.revisions import RevisionStore, SavedTags
from medmeta_plugin.io import read_label

__all__ = ["MedMetaDICOMWebDatastore", "write_seg"]

logger = logging.getLogger(__name__)


class MedMetaDICOMWebDatastore(DICOMWebDatastore):
    """MONAI Label's DICOMweb datastore with validated labels and DICOM SEG through pydicom-seg.

    Args:
        fallback_labels: ``{name: value}`` for labels submitted without ``label_info``.
        **kwargs: passed to :class:`DICOMWebDatastore` (``client``, ``search_filter``, ``cache_path``, ...).
    """

    def __init__(
        self, fallback_labels: Mapping[str, int] | None = None, max_revisions: int = 0, **kwargs: Any
    ) -> None:
        self._fallback = dict(fallback_labels or {})
        self.saved_tags = SavedTags()
        super().__init__(**kwargs)
        self._locks = Path(self._datastore_path + ".locks")
        self._locks.mkdir(parents=True, exist_ok=True)
        # The local copies of labels (the older DICOM SEG instances stay in the PACS as they are).
        self.revisions = RevisionStore(self._datastore_path + ".revisions", max_revisions)

    def _update_datastore_file(self, lock: bool = True) -> None:
        write_datastore_file(self, lock)

    @contextmanager
    def _series_lock(self, series_id: str) -> Iterator[None]:
        """Hold one series' cache lock (kept beside the cache, out of the datastore's watched tree)."""
        with FileLock(str(self._locks / f"{series_id}.lock")):
            yield

    def get_image_uri(self, image_id: str) -> str:
        """The series as NIfTI, downloaded and converted once, by one thread or process at a time."""
        with self._series_lock(image_id):
            return super().get_image_uri(image_id)

    def save_label(
        self,
        image_id: str,
        label_filename: str,
        label_tag: str,
        label_info: dict[str, Any],
        label_id: str = "",
    ) -> str:
        """Validate the label; for a final one, store it in the PACS as DICOM SEG; keep it locally (the local
        label it replaces as a revision, :mod:`medmeta_plugin.app.revisions`)."""
        return self._save_label(image_id, label_filename, label_tag, label_info, "replaced")

    def restore_label(self, image_id: str, label_tag: str, revision: int) -> str:
        """Save an earlier revision as the current label (a new DICOM SEG for a final one); undoable."""
        return restore_label(self, image_id, label_tag, revision)

    def _save_label(
        self, image_id: str, label_filename: str, label_tag: str, label_info: dict[str, Any], reason: str
    ) -> str:
        if image_id not in self.list_images():
            raise HTTPException(404, f"image {image_id!r} is not in the DICOMweb datastore.")
        image_uri = self.get_image_uri(image_id)
        with validated_label(image_id, image_uri, label_filename, label_info, self._fallback) as (path, info):
            if label_tag == DefaultLabelTag.FINAL.value:
                structures = info["medmeta"]["structures"]
                seg = write_seg(self.series_dir(image_id), path, structures, "medmeta label")
                if seg:
                    info["SeriesInstanceUID"] = dicom_web_upload_dcm(seg, self._client)
                    info["ReferencedSeriesInstanceUID"] = image_id
                    os.unlink(seg)
            return store_label(self, image_id, path, label_tag, info, reason)

    def series_dir(self, image_id: str) -> str:
        """The cached folder of a series' DICOM files (downloaded on first use)."""
        self.get_image_uri(image_id)
        return os.path.realpath(os.path.join(self._datastore.image_path(), image_id))

    def get_labeled_images(self, label_tag: str | None = None, labels: list[str] | None = None) -> list[str]:
        """Images with a label stored through this app, and those MONAI Label finds as SEG in the PACS."""
        local = LocalDatastore.get_labeled_images(self, label_tag, labels)
        return sorted(set(local) | set(super().get_labeled_images(label_tag, labels)))

    def get_label_uri(self, label_id: str, label_tag: str, image_id: str = "") -> str:
        """The label stored through this app (local file), else MONAI Label's (downloaded from the PACS)."""
        local = LocalDatastore.get_label_uri(self, label_id, label_tag)
        if local and os.path.isfile(local):
            return local
        with self._series_lock(label_id):
            return super().get_label_uri(label_id, label_tag, image_id)


def write_seg(series_dir: str, label: str | Path, names: Mapping[str, int], description: str) -> str:
    """Write a label map as a DICOM SEG of a series, with MONAI Label's converter (its pydicom-seg branch).

    MONAI Label's ``nifti_to_dicom_seg`` pairs the i-th value present in the map with the i-th entry it is
    given and ignores the entries' ``idx``; so only the structures present are passed, in value order (a
    structure named but absent, which the app keeps as an "absent here" example, would otherwise shift
    every name after it onto the wrong segment).

    Args:
        series_dir: the folder of the series' DICOM files.
        label: the label map file, on the series' grid.
        names: ``{structure: value in the label map}``.
        description: the SEG's SeriesDescription (MONAI Label's converter takes it as the model name).

    Returns:
        The SEG file's path, or ``""`` if no named structure is present.
    """
    present = {int(v) for v in np.unique(read_label(label)[0])}
    segments = [{"name": n, "idx": v} for n, v in sorted(names.items(), key=lambda kv: kv[1]) if v in present]
    if not segments:
        return ""
    segments[0]["model_name"] = description
    return nifti_to_dicom_seg(series_dir, str(label), segments, use_itk=False)
