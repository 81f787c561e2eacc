"""Active-learning strategies: which scan should the user label next?

- ``medmeta_uncertainty``: the unlabelled scan on which the adapted structures are least certain (mask
  entropy relative to the predicted size, :meth:`~medmeta_plugin.app.engine.Engine.uncertainty`); scores are
  refreshed in the background after every adaptation, so a request usually only reads them.
- ``medmeta_diversity``: core-set selection: the unlabelled scan farthest (in the backbone's volume
  embedding) from every labelled scan, so labels cover the variety of the data.
- ``random`` is MONAI Label's own.

Both medmeta strategies also exist as plain functions (:func:`select_uncertain`, :func:`select_diverse`) that
the active-learning benchmark runs without a server.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from fastapi import HTTPException
from monailabel.interfaces.datastore import Datastore, DefaultLabelTag
from monailabel.interfaces.tasks.scoring import ScoringMethod
from monailabel.interfaces.tasks.strategy import Strategy

from medmeta_plugin.app.runtime import MedMetaRuntime

__all__ = [
    "DiversityStrategy",
    "UncertaintyScoring",
    "UncertaintyStrategy",
    "select_diverse",
    "select_uncertain",
]

logger = logging.getLogger(__name__)


def select_uncertain(
    candidates: Sequence[str], score: Callable[[str], float | None]
) -> tuple[str, float] | None:
    """The candidate with the highest score (None scores are skipped); None if no candidate has a score."""
    scored = [(c, s) for c in candidates if (s := score(c)) is not None]
    if not scored:
        return None
    return max(scored, key=lambda item: (item[1], item[0]))


def select_diverse(
    candidates: Sequence[str], labelled: Sequence[str], embed: Callable[[str], np.ndarray]
) -> tuple[str, float] | None:
    """Greedy core-set step: the candidate whose nearest labelled scan is farthest (L2 in embedding space).

    With nothing labelled yet it returns the candidate *closest* to the mean embedding: the first label
    should be a representative scan (an outlier makes a poor first prototype), later ones cover the rest.

    Returns:
        ``(id, distance)``, or None without candidates.
    """
    if not candidates:
        return None
    cand = np.stack([embed(c) for c in candidates])
    if not labelled:
        distance = np.linalg.norm(cand - cand.mean(0, keepdims=True), axis=1)
        i = int(distance.argmin())
        return candidates[i], float(distance[i])
    ref = np.stack([embed(c) for c in labelled])
    nearest = np.linalg.norm(cand[:, None, :] - ref[None, :, :], axis=2).min(1)
    i = int(nearest.argmax())
    return candidates[i], float(nearest[i])


def _unlabelled(datastore: Datastore) -> list[str]:
    images = datastore.get_unlabeled_images(DefaultLabelTag.FINAL.value)
    if not images:
        raise HTTPException(404, "every scan in the datastore has a final label: nothing left to select.")
    return sorted(images)


def _or_skipped(fn: Callable[[str], Any]) -> Callable[[str], Any]:
    """``fn`` with a scan that cannot be read (its ``ValueError``) logged and answered None: one bad file
    in the datastore must not stop the choice among the others."""

    def guarded(image_id: str) -> Any:
        try:
            return fn(image_id)
        except ValueError as err:
            logger.warning("active learning skips %s: %s", image_id, err)
            return None

    return guarded


class UncertaintyStrategy(Strategy):
    """``POST /activelearning/medmeta_uncertainty``."""

    def __init__(self, runtime: MedMetaRuntime) -> None:
        super().__init__("Unlabelled scan where the adapted structures are least certain (mask entropy)")
        self.runtime = runtime

    def __call__(self, request: Mapping[str, Any], datastore: Datastore) -> dict[str, Any]:
        candidates = _unlabelled(datastore)
        if not self.runtime.engine.tasks("segmentation"):
            # No adapter gives no uncertainty: the diverse choice is the informed one until there is.
            chosen = DiversityStrategy(self.runtime)(request, datastore)
            chosen["reason"] = "no structure adapted yet: chose by diversity"
            return chosen
        best = select_uncertain(candidates, _or_skipped(self.runtime.uncertainty))
        if best is None:
            raise HTTPException(422, "no unlabelled scan could be scored (see the server log).")
        return {"id": best[0], "score": best[1], "strategy": "medmeta_uncertainty"}


class DiversityStrategy(Strategy):
    """``POST /activelearning/medmeta_diversity``."""

    def __init__(self, runtime: MedMetaRuntime) -> None:
        super().__init__("Unlabelled scan least like the labelled ones (core-set on backbone embeddings)")
        self.runtime = runtime

    def __call__(self, request: Mapping[str, Any], datastore: Datastore) -> dict[str, Any]:
        candidates = _unlabelled(datastore)
        labelled = sorted(datastore.get_labeled_images(DefaultLabelTag.FINAL.value))
        embed = _or_skipped(self.runtime.embedding)
        embeddings = {i: e for i in [*candidates, *labelled] if (e := embed(i)) is not None}
        readable = [c for c in candidates if c in embeddings]
        best = select_diverse(readable, [i for i in labelled if i in embeddings], embeddings.__getitem__)
        if best is None:
            raise HTTPException(422, "no unlabelled scan could be read (see the server log).")
        return {"id": best[0], "score": best[1], "strategy": "medmeta_diversity"}


class UncertaintyScoring(ScoringMethod):
    """``POST /scoring/medmeta_uncertainty``: score every unlabelled scan now (stored in its image info)."""

    def __init__(self, runtime: MedMetaRuntime) -> None:
        super().__init__("Mask-entropy uncertainty of every unlabelled scan under the current adapters")
        self.runtime = runtime

    def __call__(self, request: Mapping[str, Any], datastore: Datastore) -> dict[str, Any]:
        self.runtime.refresh()
        scores = {}
        for image_id in datastore.get_unlabeled_images(DefaultLabelTag.FINAL.value):
            try:
                scores[image_id] = self.runtime.uncertainty(image_id)
            except ValueError as err:
                logger.warning("cannot score %s: %s", image_id, err)
        return {"scores": scores}
