"""The datastore's writes made crash- and full-disk-safe, for the local and the DICOMweb datastore.

MONAI Label 0.8.5's :class:`LocalDatastore` copies a label over the current one in place
(``shutil.copy``) and rewrites its index, ``datastore_v2.json``, in place (``open(..., "w")``): a disk that
fills during either write leaves a half-written label, or an empty index that has lost every label's info
(the structure names). Here every such write goes to a temporary file first and is renamed into place only
when it is whole, so a failed write leaves each stored file as it was; a write that did not fit is answered
as HTTP 507 with a message, and the next save works once there is space again.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fastapi import HTTPException
from filelock import FileLock
from monailabel.datastore.local import DataModel, LocalDatastore

from medmeta_plugin.atomic import atomic_copy, atomic_write_bytes, out_of_space

__all__ = ["answer_no_space", "write_datastore_file", "write_label"]

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def answer_no_space(what: str) -> Iterator[None]:
    """Turn a write that did not fit (disk or quota full, file-size limit) into ``HTTPException(507)``
    saying what was not stored and that what was stored before is unchanged."""
    try:
        yield
    except OSError as err:
        if not out_of_space(err):
            raise
        message = (
            f"{what} was not stored: {err.strerror or err} on the datastore's disk. "
            "Everything stored before is unchanged; free space on the server's disk and send it again."
        )
        logger.error(message)
        raise HTTPException(507, message) from err


def write_datastore_file(datastore: LocalDatastore, lock: bool = True) -> None:
    """Write the datastore's index atomically (MONAI Label's ``_update_datastore_file``, which the app's
    datastores override with this). On failure the index on disk is the previous one."""
    blob = json.dumps(datastore._datastore.model_dump(exclude={"base_path"}), indent=2, default=str).encode()
    path = datastore._datastore_config_path
    with FileLock(datastore._lock_file) if lock else contextlib.nullcontext():
        atomic_write_bytes(path, blob)
        # The replace is no "modified" event of the file itself, so no event is waited for and ignored; the
        # time stamp tells the watcher's reload that the index in memory is the one on disk.
        datastore._config_ts = os.stat(path).st_mtime


def write_label(
    datastore: LocalDatastore, image_id: str, label_filename: str, tag: str, info: dict[str, Any]
) -> str:
    """Store a (validated) label file as the image's ``tag`` label, as MONAI Label's ``save_label`` does, but
    atomically: the file is copied whole beside its destination, then the index is written, then the copy is
    renamed into place. If the copy or the index does not fit, the current label, its info and the index are
    as they were (in memory and on disk).

    Returns:
        The label id (the image id).

    Raises:
        HTTPException: 404 for an unknown image.
        OSError: when a write fails (:func:`answer_no_space` turns a full disk into a 507).
    """
    obj = datastore._datastore.objects.get(image_id)
    if obj is None:
        raise HTTPException(404, f"image {image_id!r} is not in the datastore.")
    _, ext = datastore._to_id(os.path.basename(label_filename))
    folder = Path(datastore._datastore.label_path(tag))
    name = datastore._filename(image_id, ext)
    with FileLock(datastore._lock_file):
        folder.mkdir(parents=True, exist_ok=True)
        # Hidden and without the label's extension: the datastore's watcher and file scan never list it.
        staged = atomic_copy(label_filename, folder / f".{name}.staged")
        had, previous = tag in obj.labels, obj.labels.get(tag)
        try:
            obj.labels[tag] = DataModel(info={**info, "ts": int(time.time()), "name": name}, ext=ext)
            write_datastore_file(datastore, lock=False)
        except BaseException:
            if had:
                obj.labels[tag] = previous
            else:
                obj.labels.pop(tag, None)
            staged.unlink(missing_ok=True)
            raise
        os.replace(staged, folder / name)
    return image_id
