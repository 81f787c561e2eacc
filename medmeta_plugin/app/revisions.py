"""Label revisions: nothing an annotator submits is ever lost.

Every label the datastore accepts is kept. A save that replaces a label of the same image and tag first
copies the current file and its info into the revision history, ``<root>/<tag>/<image>/`` (``r0001.nii.gz``
with ``r0001.json``, then ``r0002`` ...), and only then lets the datastore write the new label; if that write
fails, the copy is taken back and the current label is untouched. The datastore keeps serving the current
label, which is what adaptation reads. A restore saves an old revision as a new label, so the label it
replaces becomes a revision in turn and the restore can itself be undone.

Retention is unlimited by default; ``max_revisions`` (``--conf max_revisions N``) keeps the newest N per image
and tag. Saves of one image and tag are serialised by a file lock, so two concurrent saves can never both
see the same "current" label and drop one of them.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from filelock import FileLock

from medmeta_plugin.atomic import atomic_copy, atomic_write_bytes

__all__ = ["Revision", "RevisionStore", "SavedTags"]

_SAFE = "._-+"

# Info keys the datastore writes itself on every save; a restore lets it write them afresh.
_DATASTORE_KEYS = ("ts", "name")


@dataclass(frozen=True)
class Revision:
    """One earlier label of an image and tag.

    Attributes:
        number: its place in the history (1 = the first label replaced).
        replaced_at: unix time at which a later save replaced it.
        file: the kept label file.
        info: the label's info as the datastore stored it (``label_info``, the parsed ``medmeta`` names, ...).
        reason: ``replaced`` (a new label was saved) or ``restored`` (a restore replaced it).
    """

    number: int
    replaced_at: float
    file: Path
    info: dict[str, Any]
    reason: str

    def to_json(self) -> dict[str, Any]:
        """What the REST endpoint and the CLI list."""
        return {
            "revision": self.number,
            "replaced_at": self.replaced_at,
            "file": self.file.name,
            "reason": self.reason,
            "ts": self.info.get("ts"),
            "structures": sorted((self.info.get("medmeta") or {}).get("structures", {})),
        }


class RevisionStore:
    """The revision history of one datastore's labels.

    Args:
        root: folder of the history (created on first use); keep it out of the datastore's watched folders.
        max_revisions: revisions kept per image and tag, newest first; 0 keeps all.

    Raises:
        ValueError: for a negative ``max_revisions``.
    """

    def __init__(self, root: str | Path, max_revisions: int = 0) -> None:
        if max_revisions < 0:
            raise ValueError(f"max_revisions must be >= 0 (0: keep all), got {max_revisions}.")
        self.root, self.max_revisions = Path(root), max_revisions

    def _folder(self, image_id: str, tag: str) -> Path:
        # Quoted and prefixed: any image id a datastore holds (a hand-placed file's name, a UID) is one safe
        # folder name, never a path ('/' is quoted, and no name is '.' or '..').
        return self.root / f"t-{quote(tag, safe=_SAFE)}" / f"i-{quote(image_id, safe=_SAFE)}"

    @contextmanager
    def locked(self, image_id: str, tag: str) -> Iterator[None]:
        """Hold the lock of one image and tag (across threads and processes)."""
        folder = self._folder(image_id, tag)
        folder.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(folder.parent / f".{folder.name}.lock")):
            yield

    def list(self, image_id: str, tag: str) -> list[Revision]:
        """The revisions of an image and tag, oldest first (an unknown image or tag has none)."""
        folder = self._folder(image_id, tag)
        if not folder.is_dir():
            return []
        out = []
        for meta in sorted(folder.glob("r*.json")):
            record = json.loads(meta.read_text())
            out.append(
                Revision(
                    int(record["revision"]),
                    float(record["replaced_at"]),
                    folder / record["file"],
                    dict(record["info"]),
                    str(record["reason"]),
                )
            )
        return out

    def get(self, image_id: str, tag: str, number: int) -> Revision:
        """One revision.

        Raises:
            ValueError: if there is no such revision (the message lists the ones there are).
        """
        revisions = self.list(image_id, tag)
        for revision in revisions:
            if revision.number == number:
                return revision
        have = [r.number for r in revisions]
        raise ValueError(
            f"image {image_id!r} has no revision {number} of its {tag!r} label; revisions: {have}."
        )

    def keep(
        self, image_id: str, tag: str, label_file: str | Path, info: Mapping[str, Any], reason: str
    ) -> Revision:
        """Copy the current label of an image and tag into the history (call it under :meth:`locked`).

        Returns:
            The new revision; the oldest ones beyond ``max_revisions`` are removed.
        """
        folder = self._folder(image_id, tag)
        folder.mkdir(parents=True, exist_ok=True)
        existing = [int(p.stem[1:]) for p in folder.glob("r*.json")]
        number = max(existing, default=0) + 1
        source = Path(label_file)
        suffix = "".join(source.suffixes) or ".nii.gz"
        kept = atomic_copy(source, folder / f"r{number:04d}{suffix}")  # the file first: a record has its file
        revision = Revision(number, time.time(), kept, dict(info), reason)
        record = {
            "revision": number,
            "replaced_at": revision.replaced_at,
            "file": kept.name,
            "info": revision.info,
            "reason": reason,
        }
        try:
            atomic_write_bytes(folder / f"r{number:04d}.json", json.dumps(record, default=str).encode())
        except BaseException:  # no record (the disk is full): no orphan file either
            kept.unlink(missing_ok=True)
            raise
        if self.max_revisions:
            for old in self.list(image_id, tag)[: -self.max_revisions]:
                self._remove(old, folder)
        return revision

    def take_back(self, image_id: str, tag: str, revision: Revision) -> None:
        """Remove a revision just kept for a save that then failed (the label it holds is still current)."""
        self._remove(revision, self._folder(image_id, tag))

    @staticmethod
    def _remove(revision: Revision, folder: Path) -> None:
        (folder / f"r{revision.number:04d}.json").unlink(missing_ok=True)
        revision.file.unlink(missing_ok=True)

    def save(
        self,
        image_id: str,
        tag: str,
        current: Callable[[], tuple[str, Mapping[str, Any]] | None],
        write: Callable[[], str],
        reason: str = "replaced",
    ) -> str:
        """Save a label so that the one it replaces is kept: under the lock, keep ``current()`` (the label
        file and info of the image and tag now, or None), then ``write()``; if ``write`` raises, the kept copy
        is taken back and the error goes on.

        Returns:
            What ``write`` returns (the datastore's label id).
        """
        with self.locked(image_id, tag):
            now = current()
            revision = self.keep(image_id, tag, now[0], now[1], reason) if now is not None else None
            try:
                return write()
            except BaseException:
                if revision is not None:
                    self.take_back(image_id, tag, revision)
                raise

    @staticmethod
    def restored_info(revision: Revision) -> dict[str, Any]:
        """A revision's info as a new save takes it (the datastore's own keys written afresh)."""
        return {k: v for k, v in revision.info.items() if k not in _DATASTORE_KEYS}


class SavedTags:
    """The tag of each image's latest save, for MONAI Label's ``on_save_label`` hook, which is not given it.

    MONAI Label calls the datastore's ``save_label`` and then the app's ``on_save_label`` in the same request
    thread, so the tag is kept per thread: two saves of one image on two threads at once each find their own
    tag (a shared ``{image: tag}`` let one save's ``original`` tag hide another's ``final``, and its
    adaptation was skipped). A hook on another thread falls back to the image's latest save anywhere.
    """

    def __init__(self) -> None:
        self._local = threading.local()
        self._lock = threading.Lock()
        self._latest: dict[str, str] = {}

    def record(self, image_id: str, tag: str) -> None:
        """Note a save of ``image_id`` under ``tag`` by this thread."""
        mine = getattr(self._local, "tags", None)
        if mine is None:
            mine = self._local.tags = {}
        mine[image_id] = tag
        with self._lock:
            self._latest[image_id] = tag

    def take(self, image_id: str, default: str = "final") -> str:
        """The tag of this thread's latest save of ``image_id`` (forgotten once taken), else the latest
        save's anywhere, else ``default``."""
        mine = getattr(self._local, "tags", None) or {}
        if image_id in mine:
            return mine.pop(image_id)
        with self._lock:
            return self._latest.get(image_id, default)
