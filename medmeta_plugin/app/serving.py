"""What the app serves: one meta-learned backbone and the adapter of every adapted task, swapped atomically.

:class:`Serving` loads the backbone (the one meta-trained on the datastore, else the config's), restores the
newest complete adapter of every task from the :class:`~medmeta_plugin.adapt.store.AdapterStore` of that
backbone, and picks up what another process (a train task) wrote since. Segmenting
(:mod:`~medmeta_plugin.app.segmenting`) and adapting (:mod:`~medmeta_plugin.app.adapting`) read the model
from here and adapting hands its fitted adapters back here.

Adapters are saved as a new store version first and swapped in second (one dictionary assignment, under
the lock), so an inference running meanwhile sees the old adapter or the new one, and a failed adaptation
changes nothing.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

import torch

from medmeta_plugin.adapt.store import AdapterStore
from medmeta_plugin.app.config import AppConfig
from medmeta_plugin.app.features import FeatureCache
from medmeta_plugin.app.grid import WorkingVolume
from medmeta_plugin.atomic import check_writable
from medmeta_plugin.networks import BackboneOutput, MetaModel, TaskAdapter, backbone_hash, load_backbone

__all__ = ["Serving", "resolve_device"]

logger = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    """The device of ``config.device``: ``auto`` is a GPU when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class Serving:
    """The backbone and the adapters being served, with the store versions they came from.

    Args:
        config: the app configuration (``backbone``, ``device``).
        model_dir: the app's model folder; adapters live in ``<model_dir>/adapters/<backbone hash>/`` (so a
            new backbone starts with a clean set), and a backbone meta-trained on the datastore, when there
            is one, in ``<model_dir>/backbone.safetensors`` (it then takes the place of ``config.backbone``).
        features: the cache of working-grid scans and backbone outputs, emptied whenever the backbone is
            (re)loaded.
    """

    def __init__(self, config: AppConfig, model_dir: str | Path, features: FeatureCache) -> None:
        self.config = config
        # Adapters, sessions and a datastore-trained backbone are written here: refuse a read-only or full
        # disk now, not at the first label.
        self.model_dir = check_writable(model_dir, "the app's model folder")
        self.device = features.device
        self._features = features
        self._lock = threading.RLock()
        self._atlas_examples: dict[tuple[str, int], list[dict[str, Any]]] = {}
        self._loaded: dict[str, int] = {}
        self._backbone_stamp: tuple[str, int] | None = None
        self.model: MetaModel
        self.store: AdapterStore
        self.load_backbone()

    @property
    def backbone_path(self) -> Path:
        """The backbone in use: the one trained on the datastore (in the model folder), else the config's."""
        local = self.model_dir / "backbone.safetensors"
        return local if local.is_file() else Path(self.config.backbone)

    def load_backbone(self) -> dict[str, int]:
        """(Re)load the backbone and restore the newest complete adapter of every task fitted on it.

        Returns:
            ``{task: version}`` of the adapters restored.
        """
        path = self.backbone_path
        backbone = load_backbone(path).to(self.device).eval()
        model = MetaModel(backbone)
        store = AdapterStore(self.model_dir / "adapters" / backbone_hash(backbone)[:16])
        restored = store.restore(model)
        with self._lock:
            self.model, self.store, self._loaded = model, store, dict(restored)
            self._atlas_examples = {}  # keyed by version, and a new backbone's store numbers from 1 again
            self._features.reset(backbone.size_divisor)
            self._backbone_stamp = (str(path), path.stat().st_mtime_ns)
        logger.info("medmeta backbone %s, adapters restored: %s", path, restored or "none")
        return restored

    @property
    def divisor(self) -> int:
        """The backbone's size divisor: working grids are padded to multiples of it."""
        return self.model.backbone.size_divisor

    def refresh(self) -> str | None:
        """Pick up what another process wrote: a train task's adapter versions or backbone.

        Returns:
            ``"backbone"`` if the backbone was reloaded (every adapter must then be adapted again),
            ``"adapters"`` if newer adapter versions were loaded, else None. A backbone file that does not
            load (e.g. caught between its two files being replaced) is retried at the next call.
        """
        path = self.backbone_path
        if (str(path), path.stat().st_mtime_ns) != self._backbone_stamp:
            try:
                self.load_backbone()
            except ValueError as err:
                logger.warning("new backbone %s not loaded yet: %s", path, err)
                return None
            return "backbone"
        changed = None
        for task in self.store.tasks():
            versions = self.store.versions(task)
            if versions and versions[-1] > self._loaded.get(task, 0):
                with self._lock:
                    loaded = self.store.load_latest(self.model, task)
                    if loaded is not None and loaded[1] != self._loaded.get(task):
                        self._loaded[task] = loaded[1]
                        changed = "adapters"
        return changed

    def tasks(self, kind: str | None = None) -> dict[str, TaskAdapter]:
        """A snapshot of the adapted tasks (of one kind), by name; later swaps do not affect it."""
        snapshot = dict(self.model.tasks.items())
        return {k: v for k, v in sorted(snapshot.items()) if kind is None or v.info.kind == kind}

    def served_meta(self, task: str) -> dict[str, Any] | None:
        """The stored metadata of the adapter version being served for ``task`` (None if none is)."""
        version = self._loaded.get(task)
        if version is None:
            return None
        return self.store.meta(task, version)

    def versions(self) -> dict[str, int]:
        """Store version of each adapter being served."""
        return dict(self._loaded)

    def atlas_examples(self, task: str) -> list[dict[str, Any]]:
        """The labelled examples stored with the served adapter of a segmentation task (for its prior)."""
        version = self._loaded.get(task)
        if version is None:
            return []
        key = (task, version)
        if key not in self._atlas_examples:
            meta = self.served_meta(task) or {}
            self._atlas_examples[key] = list(meta.get("atlas", []))
        return self._atlas_examples[key]

    def working(self, image: str | Path) -> tuple[WorkingVolume, BackboneOutput]:
        """The scan on the working grid and its backbone output (identity adapter), cached per file version.

        Raises:
            ValueError: if the scan cannot be read or is too large.
        """
        return self._features.get(image, self.model.backbone)

    def serve(
        self,
        name: str,
        adapter: TaskAdapter,
        fitted_on: MetaModel,
        shots: int,
        extra: dict[str, Any],
    ) -> int:
        """Save a fitted adapter as a new store version of ``name``, then swap it in (under the lock).

        Args:
            name: the task (structure) name.
            adapter: the adapter fitted by :func:`~medmeta_plugin.adapt.adapt`.
            fitted_on: the model it was fitted on (:attr:`model` when its adaptation started).
            shots: the number of labelled examples it was fitted on.
            extra: further metadata stored with the version (report, examples, atlas examples).

        Returns:
            The new store version.

        Raises:
            ValueError: if the backbone was reloaded since ``fitted_on`` was served; nothing is saved and the
                adapter being served is left as it was.
        """
        staging = MetaModel(fitted_on.backbone)
        staging.attach(adapter)
        with self._lock:
            if fitted_on is not self.model:
                raise ValueError(f"the backbone changed while {name!r} was adapting; adapt it again.")
            version = self.store.save(staging, name, shots=shots, extra=extra)
            self.model.attach(adapter)
            self._loaded[name] = version
        return version
