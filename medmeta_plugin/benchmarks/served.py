"""Few-shot episodes answered by the app's own pipeline, in process: what a user of the server gets.

The few-shot benchmark's ``atlas`` method is the app's default answer, so it is computed by the app's code
and nothing else: each drawn support case and each query is written as a NIfTI file with its voxel-to-world
matrix (once per case), an :class:`~medmeta_plugin.app.engine.Engine` with the app's defaults adapts the
structure on the support files exactly as the server's worker does (:func:`~medmeta_plugin.app.adapting.
adapt_task`), and :meth:`~medmeta_plugin.app.engine.Engine.segment` answers the query file as the infer
task does: working grid, placement and registration, the sure placements' carried masks (or the adapted
head alone, said so), back to the query's own grid. A test checks the answer equals a real server's.
"""

from __future__ import annotations

import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medmeta_plugin.app.adapting import Example
from medmeta_plugin.app.config import parse_conf
from medmeta_plugin.app.engine import Engine
from medmeta_plugin.app.segmenting import Provenance
from medmeta_plugin.io import ImageMeta, write_image

__all__ = ["ServedAnswer", "ServedPipeline"]

Item = dict[str, Any]


@dataclass(frozen=True)
class ServedAnswer:
    """The app's answer for one structure on one query.

    Attributes:
        mask: the structure's voxels on the query's grid, shape (X, Y, Z), bool.
        provenance: how it was found and how sure (the infer response's ``provenance`` entry).
        seconds: adaptation plus inference wall time.
    """

    mask: np.ndarray
    provenance: Provenance
    seconds: float


class ServedPipeline:
    """The app's engine on files written from benchmark episodes.

    Args:
        work: folder for the files and the engine's adapter store (a temporary one when None).
        conf: app settings, as ``--conf`` strings (the app's defaults when None).
        share: another pipeline of the run whose scan files and registrations this one uses (each pair of
            scans is then registered once for both, as one server registers it once for all its
            structures); None for files and registrations of its own.

    Raises:
        ValueError: if ``share`` registers differently (:meth:`Engine.share_registrations
            <medmeta_plugin.app.engine.Engine.share_registrations>`).
    """

    def __init__(
        self,
        work: str | Path | None = None,
        conf: dict[str, str] | None = None,
        share: ServedPipeline | None = None,
    ) -> None:
        self._tmp = None if work is not None else tempfile.TemporaryDirectory(prefix="medmeta-served-")
        self.work = Path(work if work is not None else self._tmp.name)
        (self.work / "scans").mkdir(parents=True, exist_ok=True)
        self.engine = Engine(parse_conf(conf or {}), self.work / "model")
        # Keyed by the id of an item's image tensor; the item is kept so the id is not reused meanwhile.
        self._files: dict[int, tuple[Item, str]] = {}
        self._labels: dict[tuple[int, str], str] = {}
        if share is not None:
            self.engine.share_registrations(share.engine)
            self._files, self._labels = share._files, share._labels  # the same files: the same cache keys
        self._share = share  # its folder holds files of ours

    def scan(self, item: Item) -> str:
        """The NIfTI file of an episode item's scan (written on first use), at its ``affine``; an item
        without one (a phantom) is written on a RAS grid of the app's working spacing, so its voxels reach
        the backbone as they are."""
        key = id(item["image"])
        if key not in self._files:
            image = np.asarray(item["image"], dtype=np.float32)[0]
            meta = ImageMeta.from_affine(self._affine(item), image.shape)
            path = write_image(self.work / "scans" / f"scan{len(self._files):04d}.nii.gz", image, meta)
            self._files[key] = (item, str(path))
        return self._files[key][1]

    def _affine(self, item: Item) -> np.ndarray:
        if "affine" in item:
            return np.asarray(item["affine"], dtype=np.float64)
        return np.diag([*self.engine.config.spacing, 1.0])

    def label(self, item: Item, structure: str) -> str:
        """The label file of ``structure`` on an item's scan (value 1), written on first use."""
        key = (id(item["image"]), structure)
        if key not in self._labels:
            scan = self.scan(item)
            mask = (np.asarray(item["label"])[0] > 0.5).astype(np.uint8)
            meta = ImageMeta.from_affine(self._affine(item), mask.shape)
            name = Path(scan).name.replace(".nii.gz", f"-{_safe(structure)}.nii.gz")
            self._labels[key] = str(write_image(self.work / "scans" / name, mask, meta))
        return self._labels[key]

    def answer(self, structure: str, support: list[Item], queries: list[Item]) -> list[ServedAnswer]:
        """Adapt ``structure`` on the support items as the server's worker does, then segment each query.

        Args:
            structure: the structure's name (made safe for the adapter store).
            support: labelled items (``"image"`` (1, X, Y, Z), ``"label"`` (1, X, Y, Z), ``"affine"`` if
                they have one).
            queries: the items to segment.

        Returns:
            One :class:`ServedAnswer` per query, on its grid; each one's ``seconds`` counts the adaptation
            once (a user's label, then their scan) plus its own inference.
        """
        name = _safe(structure)
        start = time.perf_counter()
        examples = [Example(self.scan(it), self.label(it, structure), 1) for it in support]
        self.engine.adapt_task(name, "segmentation", examples)
        adapted = time.perf_counter() - start
        answers = []
        for query in queries:
            begin = time.perf_counter()
            result = self.engine.segment(self.scan(query), tasks=[name])
            mask = result.labels[0] == result.names[name]
            answers.append(ServedAnswer(mask, result.provenance[name], adapted + time.perf_counter() - begin))
        return answers


def _safe(structure: str) -> str:
    """A structure name as the adapter store accepts it (``[A-Za-z0-9_.+-]``)."""
    return re.sub(r"[^A-Za-z0-9_.+-]", "_", structure)
