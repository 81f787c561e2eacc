"""The app's datastore: MONAI Label's local datastore, plus DICOM series folders and label validation.

- A studies folder may hold NIfTI and NRRD files and DICOM series, one folder per series (the folder name is
  the image id).
- ``save_label`` checks a label *before* it is stored: the image exists, ``params`` parse, the label lies on
  the image's grid, every value is a named structure. A refused label leaves every stored file as it was.
  OHIF's ``label.bin`` (raw voxels in the image's order) is turned into a NIfTI label on the image's grid.
- The parsed submission is stored with the label's info under ``"medmeta"``, so adaptation reads the
  structure names from the datastore and not from the file again.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import HTTPException
from monailabel.datastore.local import LocalDatastore
from monailabel.interfaces.datastore import Datastore, DefaultLabelTag

from medmeta_plugin.app.adapting import Example
from medmeta_plugin.app.datastore_writes import answer_no_space, write_datastore_file, write_label
from medmeta_plugin.app.grid import check_size
from medmeta_plugin.app.labels import Submission, VolumeTarget, parse_label_params, validate_label_file
from medmeta_plugin.app.revisions import RevisionStore, SavedTags
from medmeta_plugin.io import declared_size, read_image
from medmeta_plugin.names import validate_name

__all__ = [
    "MedMetaDatastore",
    "TaskExamples",
    "collect_examples",
    "current_label",
    "restore_label",
    "store_label",
    "stored_submission",
]

logger = logging.getLogger(__name__)

# A label declaring more than this many times its image's voxels is refused from its header (a gzip bomb);
# a smaller mismatch is read and refused with the geometry that differs.
_LABEL_FACTOR = 4


def _is_dicom_folder(path: Path) -> bool:
    """A folder holding at least one DICOM file (``.dcm`` or the ``DICM`` magic at byte 128)."""
    if not path.is_dir() or path.name.startswith(".") or path.name == "labels":
        return False
    for child in path.iterdir():
        if child.suffix.lower() == ".dcm":
            return True
        if child.is_file():
            try:
                with open(child, "rb") as f:
                    f.seek(128)
                    if f.read(4) == b"DICM":
                        return True
            except OSError:
                continue
    return False


class MedMetaDatastore(LocalDatastore):
    """MONAI Label's :class:`LocalDatastore` with DICOM series folders and validated labels.

    Args:
        datastore_path: the studies folder.
        fallback_labels: ``{name: value}`` for labels submitted without ``label_info``.
        max_revisions: earlier labels kept per image and tag (0: all; :mod:`medmeta_plugin.app.revisions`).
        limits: ``(working spacing, max_voxels)``: uploads whose header declares more are refused with a 413
            before their data is read (:func:`medmeta_plugin.app.grid.check_size`); None: no check.
        **kwargs: passed to :class:`LocalDatastore` (``extensions``, ``auto_reload``, ``read_only``).
    """

    def __init__(
        self,
        datastore_path: str,
        fallback_labels: Mapping[str, int] | None = None,
        max_revisions: int = 0,
        limits: tuple[tuple[float, float, float], int] | None = None,
        **kwargs: Any,
    ):
        self._fallback = dict(fallback_labels or {})
        self._limits = limits
        self.saved_tags = SavedTags()
        # A hidden folder of the studies: no image scan lists it, and it travels with the labels.
        self.revisions = RevisionStore(Path(datastore_path) / ".revisions", max_revisions)
        super().__init__(datastore_path, **kwargs)

    def _list_files(self, path: str, patterns: Any) -> dict[str, str]:
        files = super()._list_files(path, patterns)
        if os.path.realpath(path) == os.path.realpath(self._datastore.image_path()):
            for entry in os.listdir(path):
                if entry not in files and _is_dicom_folder(Path(path) / entry):
                    files[entry] = entry
        return files

    def _to_id(self, file: str) -> tuple[str, str]:
        # A series folder's name is the id whole: UIDs are full of dots that are not file extensions.
        if (Path(self._datastore.image_path()) / file).is_dir():
            return file, ""
        return super()._to_id(file)

    def add_image(self, image_id: str, image_filename: str, image_info: dict[str, Any]) -> str:
        """Validate, then store, an uploaded image: a safe id not in use, a file that reads as an image.

        Raises:
            HTTPException: 400 for an invalid id or an unreadable image, 409 for an id already in use (the
                stored image is never replaced).
        """
        if not image_id:
            image_id = self._to_id(os.path.basename(image_filename))[0]
        try:
            validate_name(image_id, "image id")
            if self._limits is not None:  # from the header alone, before the data is read or inflated
                try:
                    check_size(image_filename, *self._limits)
                except ValueError as err:
                    raise HTTPException(413, f"image upload refused: {err}") from err
            read_image(image_filename)
        except (TypeError, ValueError) as err:
            raise HTTPException(400, f"image upload refused: {err}") from err
        if image_id in self._datastore.objects:
            raise HTTPException(409, f"image {image_id!r} already exists; upload it under another id.")
        _, ext = self._to_id(os.path.basename(image_filename))
        dest = Path(self._datastore.image_path()) / self._filename(image_id, ext)
        with answer_no_space(f"image {image_id!r}"):
            try:
                return super().add_image(image_id, image_filename, image_info)
            except BaseException:  # MONAI Label copies in place, then writes the index: neither is whole
                self._datastore.objects.pop(image_id, None)
                dest.unlink(missing_ok=True)
                raise

    def _update_datastore_file(self, lock: bool = True) -> None:
        write_datastore_file(self, lock)

    def save_label(
        self, image_id: str, label_filename: str, label_tag: str, label_info: dict[str, Any]
    ) -> str:
        """Validate, then store, a label; a refused one raises ``HTTPException`` (404, 400), stores none.

        A label of the same image and tag that it replaces is kept as a revision (:mod:`.revisions`).
        """
        return self._save_label(image_id, label_filename, label_tag, label_info, "replaced")

    def _save_label(
        self, image_id: str, label_filename: str, label_tag: str, label_info: dict[str, Any], reason: str
    ) -> str:
        if self._datastore.objects.get(image_id) is None:
            raise HTTPException(status_code=404, detail=f"image {image_id!r} is not in the datastore.")
        with validated_label(
            image_id, self.get_image_uri(image_id), label_filename, label_info, self._fallback
        ) as (
            path,
            info,
        ):
            return store_label(self, image_id, path, label_tag, info, reason)

    def restore_label(self, image_id: str, label_tag: str, revision: int) -> str:
        """Save revision ``revision`` of an image's ``label_tag`` label as its current label; the label it
        replaces is kept as a revision (``restored``), so a restore can be undone.

        Raises:
            HTTPException: 404 for an unknown image or revision.
        """
        return restore_label(self, image_id, label_tag, revision)


def store_label(datastore: Any, image_id: str, path: str, tag: str, info: dict[str, Any], reason: str) -> str:
    """Write a validated label as MONAI Label's :class:`LocalDatastore` does, but atomically
    (:func:`~medmeta_plugin.app.datastore_writes.write_label`; a full disk is a 507), the label it
    replaces kept as a revision (``datastore.revisions``), and note its tag for ``on_save_label``
    (``datastore.saved_tags``); shared by the local and the DICOMweb datastore.

    Returns:
        The datastore's label id.
    """
    with answer_no_space(f"the {tag!r} label of image {image_id!r}"):
        label_id = datastore.revisions.save(
            image_id,
            tag,
            lambda: current_label(datastore, image_id, tag),
            lambda: write_label(datastore, image_id, path, tag, info),
            reason,
        )
    datastore.saved_tags.record(image_id, tag)
    return label_id


def current_label(datastore: Datastore, image_id: str, tag: str) -> tuple[str, dict[str, Any]] | None:
    """The file and info of an image's label of ``tag`` as the datastore holds it now, or None."""
    if tag not in (datastore.get_labels_by_image_id(image_id) or {}):
        return None
    uri = datastore.get_label_uri(image_id, tag)
    if not uri or not os.path.isfile(uri):
        return None
    return uri, dict(datastore.get_label_info(image_id, tag) or {})


def restore_label(datastore: Any, image_id: str, tag: str, number: int) -> str:
    """Save revision ``number`` of an image's ``tag`` label as its current one (see
    :meth:`MedMetaDatastore.restore_label`); shared by the local and the DICOMweb datastore.

    Raises:
        HTTPException: 404 for an unknown image or revision.
    """
    try:
        revision = datastore.revisions.get(image_id, tag, number)
    except ValueError as err:
        raise HTTPException(404, str(err)) from err
    with tempfile.TemporaryDirectory(prefix="medmeta-restore-") as tmp:
        copy = Path(tmp) / f"label{''.join(revision.file.suffixes)}"
        shutil.copyfile(revision.file, copy)
        info = RevisionStore.restored_info(revision)
        return datastore._save_label(image_id, str(copy), tag, info, "restored")


def _bin_to_nifti(image_uri: str, label_filename: str) -> str:
    """OHIF's raw label bytes -> a NIfTI label on the image's grid (MONAI Label's converter's layout)."""
    import numpy as np

    from medmeta_plugin.io import write_image

    _, meta = read_image(image_uri)
    raw = np.fromfile(label_filename, dtype=np.uint8)
    if raw.size != int(np.prod(meta.shape)):
        raise ValueError(
            f"label.bin holds {raw.size} bytes, the image has {int(np.prod(meta.shape))} voxels "
            f"{tuple(meta.shape)}; one uint8 per voxel is expected."
        )
    # OHIF writes the volume slice by slice, x fastest: Fortran order of the (X, Y, Z) array.
    label = raw.reshape(meta.shape, order="F")[None]
    folder = tempfile.mkdtemp(prefix="medmeta-bin-")
    return str(write_image(Path(folder) / "label.nii.gz", label, meta))


@contextlib.contextmanager
def validated_label(
    image_id: str,
    image_uri: str,
    label_filename: str,
    label_info: dict[str, Any] | None,
    fallback: Mapping[str, int],
) -> Iterator[tuple[str, dict[str, Any]]]:
    """Check a submitted label against its image before anything is stored.

    Yields:
        The label file to store (OHIF's ``label.bin`` converted to NIfTI) and the label info with the parsed
        submission under ``"medmeta"``.

    Raises:
        HTTPException: 400 naming the problem (the context body does not run).
    """
    converted = None
    try:
        try:
            if str(label_filename).endswith(".bin"):
                converted = _bin_to_nifti(image_uri, label_filename)
                label_filename = converted
            submission = parse_label_params(label_info, fallback)
            _, image_meta = read_image(image_uri)
            declared = declared_size(label_filename)  # before the label's data is read (a gzip bomb)
            if declared is not None and declared.voxels > _LABEL_FACTOR * int(np.prod(image_meta.shape)):
                raise ValueError(
                    f"the label file declares {declared.shape} voxels x {declared.channels} channel(s), far "
                    f"more than its image's {tuple(image_meta.shape)}; none of it was read."
                )
            _, submission = validate_label_file(label_filename, image_meta, submission)
        except ValueError as err:
            raise HTTPException(400, f"label for image {image_id!r} refused: {err}") from err
        yield label_filename, {**(label_info or {}), "medmeta": submission.to_json()}
    finally:
        if converted is not None:
            shutil.rmtree(Path(converted).parent, ignore_errors=True)


def stored_submission(
    datastore: Datastore, image_id: str, fallback: Mapping[str, int], tag: str = DefaultLabelTag.FINAL.value
) -> Submission | None:
    """The parsed submission stored with an image's label, for any MONAI Label datastore.

    Labels saved through this app carry it under ``"medmeta"`` in their info; a label placed in the studies
    folder by hand gets its names from ``label_info`` if present, else the names of ``fallback`` whose
    values the file holds. None if the image has no label of ``tag``, the stored names do not parse or the
    file cannot be read.
    """
    if tag not in (datastore.get_labels_by_image_id(image_id) or {}):
        return None
    info = datastore.get_label_info(image_id, tag) or {}
    stored = info.get("medmeta")
    if isinstance(stored, Mapping):
        targets = tuple(
            VolumeTarget(t, spec["kind"], spec["value"], spec.get("num_classes"))
            for t, spec in stored.get("targets", {}).items()
        )
        return Submission(dict(stored.get("structures", {})), targets)
    try:
        submission = parse_label_params({k: v for k, v in info.items() if k == "label_info"}, fallback)
        if not submission.from_fallback:
            return submission
        # Names from --conf labels: only those the file holds, as for a label saved without label_info
        # (validate_label_file). A configured structure it does not hold is unlabelled there, not absent.
        path = Path(datastore.get_label_uri(image_id, tag))
        return submission.present_in(_label_values(str(path), path.stat().st_mtime_ns))
    except (ValueError, OSError) as err:
        logger.warning("label of %s: %s", image_id, err)
        return None


@functools.lru_cache(maxsize=256)
def _label_values(path: str, mtime_ns: int) -> frozenset[int]:
    """The values in a label file (cached per file version: collecting examples reads every label)."""
    return frozenset(int(v) for v in np.unique(read_image(path)[0]))


class TaskExamples:
    """The labelled examples of one task in the datastore.

    Attributes:
        kind: task kind; num_outputs: classes (classification) or None; examples: oldest first.
    """

    def __init__(self, kind: str, num_outputs: int | None = None) -> None:
        self.kind, self.num_outputs = kind, num_outputs
        self.examples: list[Example] = []


def collect_examples(
    datastore: Datastore, fallback: Mapping[str, int] | None = None, tag: str = DefaultLabelTag.FINAL.value
) -> dict[str, TaskExamples]:
    """Every task's labelled examples among the datastore's labels of ``tag``, oldest label first.

    Args:
        datastore: any MONAI Label datastore.
        fallback: label names for labels stored without any (see :func:`stored_submission`).
        tag: label tag.

    Returns:
        ``{task: TaskExamples}``; a structure named in a label with no voxel of it is a negative example.
    """
    labelled = []
    # Every image, not get_labeled_images(tag): MONAI Label 0.8.5's LocalDatastore answers that with the
    # images that have a final label whatever the tag. stored_submission skips those without one of ``tag``.
    for image_id in datastore.list_images():
        submission = stored_submission(datastore, image_id, fallback or {}, tag)
        if submission is None:
            continue
        ts = datastore.get_label_info(image_id, tag).get("ts", time.time())
        labelled.append((ts, image_id, submission))
    out: dict[str, TaskExamples] = {}
    for _, image_id, submission in sorted(labelled, key=lambda item: (item[0], item[1])):
        image, label = datastore.get_image_uri(image_id), datastore.get_label_uri(image_id, tag)
        for name, value in submission.structures.items():
            out.setdefault(name, TaskExamples("segmentation")).examples.append(Example(image, label, value))
        for target in submission.targets:
            entry = out.setdefault(target.task, TaskExamples(target.kind, target.num_classes))
            entry.examples.append(Example(image, target=target.value))
    return out
