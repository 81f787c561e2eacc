"""Versioned, crash-safe storage of adapted task adapters: ``<root>/<task>/v<NNNN>.{safetensors,json}``.

Every adaptation writes a new version; nothing is overwritten. Each file is written atomically and the JSON
carries the weights' checksum, so a version is complete exactly when its pair loads: if the process dies
while writing, the half-written version is ignored and the previous one is served after a restart.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from pathlib import Path
from typing import Any

from medmeta_plugin.atomic import out_of_space
from medmeta_plugin.names import validate_name
from medmeta_plugin.networks import MetaModel, TaskAdapter, load_adapter, save_adapter

__all__ = ["AdapterStore"]

logger = logging.getLogger(__name__)
_VERSION = re.compile(r"^v(\d{4,})\.json$")


class AdapterStore:
    """Adapters of one backbone, versioned per task.

    Args:
        root: folder of the store (created if missing), e.g. the MONAI Label app's model folder.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    def tasks(self) -> list[str]:
        """Names of the tasks with at least one version file."""
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and self.versions(p.name))

    def versions(self, task: str) -> list[int]:
        """Version numbers that have a metadata file, ascending (complete or not)."""
        folder = self.root / validate_name(task, "task name")
        if not folder.is_dir():
            return []
        return sorted(int(m.group(1)) for p in folder.iterdir() if (m := _VERSION.match(p.name)))

    def meta(self, task: str, version: int) -> dict[str, Any] | None:
        """The metadata stored with one version of ``task``: what :meth:`save` wrote, its ``extra`` included.

        Returns:
            The version's JSON object, or None when there is no such version or its file does not parse
            (the version is then incomplete or damaged: :meth:`load_latest` skips it too).

        Raises:
            ValueError: for an invalid task name.
        """
        path = self.root / validate_name(task, "task name") / f"v{version:04d}.json"
        try:
            meta = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        return meta if isinstance(meta, dict) else None

    def save(
        self, model: MetaModel, task: str, shots: int | None = None, extra: dict[str, Any] | None = None
    ) -> int:
        """Write ``model``'s adapter of ``task`` as a new version and return its number.

        Raises:
            OSError: if the version does not fit on the disk (nothing of it is left; the message says so).
        """
        with self._lock:
            on_disk = [
                int(p.stem[1:]) for p in (self.root / task).glob("v*.safetensors") if p.stem[1:].isdigit()
            ]
            version = max([0, *self.versions(task), *on_disk]) + 1
            try:
                save_adapter(model, task, self.root / task, shots=shots, extra=extra, stem=f"v{version:04d}")
            except OSError as err:
                if not out_of_space(err):
                    raise
                raise OSError(
                    err.errno,
                    f"no space to write version {version} of adapter {task!r} in {self.root / task} "
                    f"({err.strerror}); nothing of it was kept and the previous version still serves. "
                    "Free space and save a label again",
                ) from err
        return version

    def load_latest(self, model: MetaModel, task: str) -> tuple[TaskAdapter, int] | None:
        """Load the newest complete version of ``task`` into ``model``, skipping incomplete or corrupt ones.

        Returns:
            The adapter and its version, or ``None`` if no version loads.
        """
        for version in reversed(self.versions(task)):
            path = self.root / task / f"v{version:04d}.json"
            try:
                return load_adapter(model, path), version
            except ValueError as err:
                logger.warning("skipping adapter %s: %s", path, err)
        return None

    def restore(self, model: MetaModel) -> dict[str, int]:
        """Load the newest complete version of every task (after a restart); returns task -> version."""
        restored = {}
        for task in self.tasks():
            loaded = self.load_latest(model, task)
            if loaded is not None:
                restored[task] = loaded[1]
        return restored
