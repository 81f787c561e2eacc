"""Answering a scan: each adapted structure's mask and how it was found, the volume-level predictions.

:class:`Segmenter` answers a scan from the served backbone and adapters
(:mod:`~medmeta_plugin.app.serving`), the feature cache (:mod:`~medmeta_plugin.app.features`) and the atlas
priors (:mod:`~medmeta_plugin.app.priors`):

- the backbone runs once per scan, and only if a head does, and each ``head``-mode structure costs one
  1x1x1 convolution (100 structures cost 100 heads, not 100 networks);
- each structure's answer says how it was found (:class:`Provenance`): ``label`` (the scan's own label),
  ``registered`` (its labelled scans placed sure on this scan, their masks carried), ``refined`` (those
  carried masks with their boundary moved by the in-context refiner, ``--conf incontext true``) or
  ``network`` (the adapted head alone: atlas off, no prior, or every placement unsure - a guess, and flagged
  as one).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medmeta_plugin.adapt.atlas import PRIOR_CAP, CarriedPrior, fuse, head_region
from medmeta_plugin.app.features import FeatureCache, backbone_output
from medmeta_plugin.app.grid import WorkingVolume, to_original_grid
from medmeta_plugin.app.priors import AtlasPriors, StructurePrior
from medmeta_plugin.app.serving import Serving
from medmeta_plugin.networks import BackboneOutput, Refiner, TaskAdapter, load_refiner, refine_prior
from medmeta_plugin.networks.refiner import KEEP_SIMILARITY, carried_similarity, keeps_carried

__all__ = ["FOUND_BY", "Provenance", "Segmentation", "Segmenter", "mask_uncertainty"]

logger = logging.getLogger(__name__)

#: How a structure's answer was found: the scan's own label, registered labelled scans (as carried, or
#: refined by the in-context network), or the adapted network alone.
FOUND_BY = ("label", "registered", "refined", "network")


@dataclass(frozen=True)
class Provenance:
    """How one structure's answer on one scan was found, and how sure it is.

    Attributes:
        found_by: one of :data:`FOUND_BY`: ``label`` (the scan's own label), ``registered`` (the carried
            masks of the labelled scans placed sure on this scan), ``refined`` (those masks, their boundary
            moved by the in-context refiner) or ``network`` (the adapted head alone).
        supports: the structure's labelled scans (those that could be read, when a prior was attempted).
        sure_supports: how many of the other labelled scans were placed sure on this scan; None when none was
            placed (its own label, atlas off, no readable labelled scan).
        confidence: the highest placement confidence among them, in [0, 1]; None when none was placed.
        sure: True when the answer stands on the scan's own label or on at least one sure placement; False
            for the network's answer alone (nothing checks it), above all when it stands in for a placement
            flagged unsure: a guess, not a finding.
        note: the same in words, for a reader of the response or the log.
    """

    found_by: str
    supports: int
    sure_supports: int | None
    confidence: float | None
    sure: bool
    note: str

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready values (confidence rounded), as the infer response carries them."""
        return {
            "found_by": self.found_by,
            "supports": self.supports,
            "sure_supports": self.sure_supports,
            "confidence": None if self.confidence is None else round(self.confidence, 3),
            "sure": self.sure,
            "note": self.note,
        }


@dataclass
class Segmentation:
    """Result of :meth:`Segmenter.segment`.

    Attributes:
        labels: label map on the scan's own grid, shape (1, X, Y, Z), uint8 (uint16 beyond 255 structures).
        names: ``{structure: value}`` of the structures segmented.
        meta: the scan's geometry (to write ``labels`` with).
        seconds: wall time per stage: ``scan``, ``priors``, ``backbone``, ``refiner``, ``heads`` (the parts
            of ``model``, everything up to the probabilities) and ``resample`` (back to the scan's grid).
        provenance: ``{structure: Provenance}``: how each answer was found and how sure it is.
    """

    labels: np.ndarray
    names: dict[str, int]
    meta: Any
    seconds: dict[str, float] = field(default_factory=dict)
    provenance: dict[str, Provenance] = field(default_factory=dict)


def mask_uncertainty(probs: Iterable[torch.Tensor]) -> float | None:
    """Mask entropy of a scan: mean over structures of the summed binary entropy (nats) of the foreground
    probabilities, divided by the predicted volume plus one voxel.

    Dividing by the predicted size ranks a scan by how unsure the boundary is relative to the structure, so
    large organs do not outrank small ones by size alone.

    Args:
        probs: one foreground probability map per structure, each of shape (X, Y, Z).

    Returns:
        The score, or None when there is no map.
    """
    scores = []
    for p in probs:
        q = p.clamp(1e-6, 1 - 1e-6)
        entropy = -(q * q.log() + (1 - q) * (1 - q).log())
        scores.append(float(entropy.sum() / ((p > 0.5).sum() + 1)))
    return float(np.mean(scores)) if scores else None


_NETWORK_ALONE = "the adapted network's answer alone"


def _placed(
    carried: CarriedPrior,
    supports: int,
    threshold: float,
    refine: bool,
    similarity: float | None = None,
) -> Provenance:
    """The provenance of an answer from registered labelled scans, or of the network standing in for them
    when none was placed sure (``carried.prior`` is None). With the in-context refiner, ``similarity`` is
    :func:`~medmeta_plugin.networks.refiner.carried_similarity`: the carried masks are refined below
    :data:`~medmeta_plugin.networks.refiner.KEEP_SIMILARITY`, kept as carried at or above it."""
    incontext = similarity is not None and not keeps_carried(similarity)
    total, sure, best = len(carried.cases), carried.sure, carried.confidence
    unsure = [c for c in carried.cases if not c.sure and c.error is None]
    failed = [c for c in carried.cases if c.error is not None]
    if carried.prior is not None:
        note = f"registered: carried masks of {sure} of {total} labelled scans placed sure"
        note += "" if best is None else f" (best confidence {best:.2f})"
        note += ", their boundary moved by the adapted head where it agrees" if refine else ""
        if similarity is not None:
            note += (
                f", their boundary moved onto this scan by the in-context refiner (the labelled scans match"
                f" this one at {similarity:.2f} < {KEEP_SIMILARITY:g})"
                if incontext
                else f", kept as carried: the labelled scans match this one as a rescan of one patient does"
                f" ({similarity:.2f} >= {KEEP_SIMILARITY:g}), nothing for the in-context refiner to correct"
            )
        left_out = []
        if unsure:
            values = ", ".join(f"{c.confidence:.2f}" for c in unsure if c.confidence is not None)
            left_out.append(f"{len(unsure)} placed unsure (confidence {values} < {threshold:g})")
        if failed:
            left_out.append(f"{len(failed)} could not be placed ({failed[0].error})")
        note += f"; left out: {'; '.join(left_out)}" if left_out else ""
        return Provenance("refined" if incontext else "registered", supports, sure, best, True, note)
    if best is None:
        note = f"no labelled scan could be placed on this scan ({failed[0].error}): {_NETWORK_ALONE}"
    elif total == 1:
        note = f"placement unsure (confidence {best:.2f} < {threshold:g}): {_NETWORK_ALONE}"
    else:
        extra = f"; {len(failed)} could not be placed" if failed else ""
        note = (
            f"placement unsure on all {total} labelled scans (best confidence {best:.2f} < {threshold:g}"
            f"{extra}): {_NETWORK_ALONE}"
        )
    return Provenance("network", supports, sure, best, False, note)


class Segmenter:
    """Answers a scan with the adapters being served.

    Args:
        serving: the backbone and adapters being served (read afresh at every call, so a swap is seen).
        features: the cache of working-grid scans and backbone outputs.
        atlas: the atlas priors of the adapted structures.

    Raises:
        ValueError: with ``config.incontext``, if the refiner cannot be loaded.
    """

    def __init__(self, serving: Serving, features: FeatureCache, atlas: AtlasPriors) -> None:
        self.config = serving.config
        self._serving, self._features, self._atlas = serving, features, atlas
        self._refiner: Refiner | None = None
        if self.config.incontext and self.config.atlas:
            self._refiner = load_refiner(self.config.refiner).to(serving.device)

    def label_values(self, names: Sequence[str]) -> dict[str, int]:
        """Output value of each structure: the configured ``labels`` value, else the next free value by name.

        Values follow the configured label names first so that a structure keeps its value across requests;
        the other structures are numbered after them in alphabetical order.
        """
        configured = self.config.label_map
        values = {n: configured[n] for n in names if n in configured}
        next_value = max(configured.values(), default=0) + 1
        for name in sorted(n for n in names if n not in configured):
            values[name] = next_value
            next_value += 1
        return dict(sorted(values.items(), key=lambda item: item[1]))

    def placements(self) -> dict[str, Any]:
        """The placement threshold and the last placement outcomes (for the app's status)."""
        return {"threshold": self._atlas.placement.threshold, "recent": self._atlas.recent()}

    def _find(
        self, name: str, image: str | Path, volume: WorkingVolume
    ) -> tuple[StructurePrior | None, Provenance]:
        """A structure's prior on the scan - None when the network is to answer - and how the answer is found.

        The prior is the scan's own label when the structure was labelled on it, else the carried masks of
        its labelled scans placed sure on it. The network answers with atlas off, without a readable labelled
        scan, and when every placement was unsure or failed.
        """
        stored = self._serving.atlas_examples(name)
        if not self.config.atlas:
            return None, Provenance("network", len(stored), None, None, False, f"atlas off: {_NETWORK_ALONE}")
        if not stored:
            note = f"no labelled scan stored with the adapter: {_NETWORK_ALONE}"
            return None, Provenance("network", 0, None, None, False, note)
        try:
            served = self._atlas.prior(str(image), volume, stored, carry_images=self._refiner is not None)
        except ValueError as err:
            logger.warning("atlas prior of %r left out on %s: %s", name, image, err)
            note = f"no atlas prior ({err}): {_NETWORK_ALONE}"
            return None, Provenance("network", len(stored), None, None, False, note)
        if served.own:
            return served, Provenance("label", served.supports, None, None, True, "the scan's own label")
        threshold = self._atlas.placement.threshold
        similarity = None
        if self._refiner is not None and served.prior is not None:
            scan = volume.crop(volume.image)[0, 0]
            carried = tuple(torch.from_numpy(i) for i in served.carried.images)
            spacing, divisor = self.config.spacing, self._refiner.divisor
            similarity = carried_similarity(scan, carried, served.prior, spacing, divisor)
        found = _placed(served.carried, served.supports, threshold, self.config.refine, similarity)
        return (served if served.prior is not None else None), found

    def _segmentation_logits(
        self,
        name: str,
        task: TaskAdapter,
        image: str | Path,
        volume: WorkingVolume,
        base: Callable[[], BackboneOutput],
        seconds: dict[str, float],
    ) -> tuple[torch.Tensor, Provenance]:
        """A structure's logits on the unpadded working grid, (X, Y, Z), and how they were found.

        With a prior (:meth:`_find`) the answer is the prior's distance log-odds; with ``config.incontext``
        the refiner's logits replace them on the box around the prior (:func:`refine_prior`; its time goes
        to ``seconds["refiner"]``). With ``config.refine`` they are fused with the head instead: then a
        head-mode head runs only where it can change the answer
        (:func:`head_region`: the carried structure and 6 mm around it), not on the whole scan. Without one
        the head answers. ``base`` gives the scan's backbone output; it is called only when a head runs.
        The time spent finding the prior is added to ``seconds["priors"]``.
        """
        t0 = time.perf_counter()
        served, found = self._find(name, image, volume)
        seconds["priors"] += time.perf_counter() - t0
        if served is None:
            return volume.crop(self._task_output(task, volume, base()))[0, 0].float().cpu(), found
        prior, distance = served.prior, served.distance
        if served.own:  # on a scan it was labelled on, a structure is its label
            return torch.where(prior >= 0.5, PRIOR_CAP, -PRIOR_CAP), found
        if found.found_by == "refined":
            t0 = time.perf_counter()
            image = volume.crop(volume.image)[0, 0]
            logits, box = refine_prior(self._refiner, image, prior, self.config.spacing)
            out = distance.clone()
            out[box] = logits
            seconds["refiner"] += time.perf_counter() - t0
            return out, found
        if not self.config.refine:
            return distance, found
        region = head_region(distance)
        if task.info.mode == "head":
            logits = self._head_on(task, volume, base(), region)
        else:
            logits = volume.crop(self._task_output(task, volume, base()))[0, 0].float().cpu()[region]
        out = distance.clone()
        out[region] = fuse(logits, prior[region], distance[region])
        return out, found

    def _head_on(
        self, task: TaskAdapter, volume: WorkingVolume, base: BackboneOutput, region: torch.Tensor
    ) -> torch.Tensor:
        """A head-mode head's logits on the voxels of ``region`` (X, Y, Z) only, shape (N,)."""
        x, y, z = volume.shape
        index = region.nonzero(as_tuple=True)

        def voxels(tensor: torch.Tensor) -> torch.Tensor:  # (1, C, X', Y', Z') -> (1, C, N, 1, 1)
            picked = tensor[0, :, :x, :y, :z].movedim(0, -1)[index]  # (N, C): rows, channel-last
            return picked.movedim(-1, 0)[None, :, :, None, None]

        position = None if base.position is None else voxels(base.position)
        out = BackboneOutput(voxels(base.features), base.embedding, position)
        return task.head(out).view(-1).float().cpu()

    def _task_output(self, task: TaskAdapter, volume: WorkingVolume, base: BackboneOutput) -> torch.Tensor:
        """A task's head output on the padded working grid: (1, 1, X', Y', Z') for a segmentation, (1, K)
        for a volume-level task. A head-mode head reads ``base``; other modes run their own backbone pass."""
        if task.info.mode == "head":
            return task.head(base)
        return task.head(
            backbone_output(
                self._serving.model.backbone, volume.image.to(self._serving.device), task, self.config
            )
        )

    @torch.no_grad()
    def probabilities(
        self, image: str | Path, tasks: Sequence[str] | None = None
    ) -> tuple[WorkingVolume, dict[str, torch.Tensor]]:
        """Foreground probability of each adapted structure on the unpadded working grid, (X, Y, Z) each."""
        volume, probs, _ = self._answers(image, tasks)
        return volume, probs

    def _answers(
        self, image: str | Path, tasks: Sequence[str] | None, seconds: dict[str, float] | None = None
    ) -> tuple[WorkingVolume, dict[str, torch.Tensor], dict[str, Provenance]]:
        """:meth:`probabilities` and each structure's :class:`Provenance`; the wall time of the stages goes
        into ``seconds`` when given: ``scan`` (reading it and its working grid), ``priors`` (placement,
        registration and carrying of every structure's masks), ``backbone``, ``refiner`` and ``heads``."""
        seconds = {} if seconds is None else seconds
        start = time.perf_counter()
        chosen = self._select(self._serving.tasks("segmentation"), tasks)
        # The backbone runs only if a head does: structures answered by their atlas prior need the scan alone.
        volume = self._features.volume(image, self._serving.divisor)
        seconds["scan"] = time.perf_counter() - start
        seconds["priors"] = seconds["backbone"] = seconds["refiner"] = 0.0
        computed: list[BackboneOutput] = []

        def base() -> BackboneOutput:
            if not computed:
                t0 = time.perf_counter()
                computed.append(self._serving.working(image)[1])
                seconds["backbone"] += time.perf_counter() - t0
            return computed[0]

        probs, found = {}, {}
        t_structures = time.perf_counter()
        for name, task in chosen.items():
            logits, found[name] = self._segmentation_logits(name, task, image, volume, base, seconds)
            probs[name] = torch.sigmoid(logits)
        spent = time.perf_counter() - t_structures
        seconds["heads"] = max(0.0, spent - seconds["priors"] - seconds["backbone"] - seconds["refiner"])
        logger.debug("probabilities for %d structures in %.2f s", len(probs), time.perf_counter() - start)
        return volume, probs, found

    @staticmethod
    def _select(available: dict[str, TaskAdapter], wanted: Sequence[str] | None) -> dict[str, TaskAdapter]:
        if wanted is None:
            return available
        unknown = sorted(set(wanted) - set(available))
        if unknown:
            raise ValueError(f"no adapted task {unknown}; adapted tasks: {sorted(available) or 'none yet'}.")
        return {n: available[n] for n in wanted}

    def segment(self, image: str | Path, tasks: Sequence[str] | None = None) -> Segmentation:
        """One label map with every adapted structure (or those in ``tasks``) on the scan's own grid.

        A voxel gets the structure of highest probability among those above ``config.threshold``. Each
        structure's :class:`Provenance` is returned with it and logged (one INFO line per structure).

        Raises:
            ValueError: for an unreadable or too large scan, or a name in ``tasks`` that has no adapter.
        """
        start = time.perf_counter()
        seconds: dict[str, float] = {}
        volume, probs, found = self._answers(image, tasks, seconds)
        mid = time.perf_counter()
        for name, how in found.items():
            confidence = "-" if how.confidence is None else f"{how.confidence:.3f}"
            sure_supports = "-" if how.sure_supports is None else how.sure_supports
            logger.info(
                "medmeta %s on %s: found by %s, sure %s, supports %d, sure supports %s, confidence %s: %s",
                name,
                os.path.basename(os.path.normpath(str(image))),
                how.found_by,
                how.sure,
                how.supports,
                sure_supports,
                confidence,
                how.note,
            )
        # Values are numbered over every adapted structure: a structure's value does not depend on ``tasks``.
        every = self.label_values(list(self._serving.tasks("segmentation")))
        values = {name: every[name] for name in probs}
        dtype = np.uint8 if max(values.values(), default=0) <= 255 else np.uint16
        best = torch.full(volume.shape, self.config.threshold)
        labels = torch.zeros(volume.shape, dtype=torch.int32)
        for name, p in probs.items():
            better = p > best
            best = torch.where(better, p, best)
            labels[better] = values[name]
        out = to_original_grid(labels.numpy().astype(dtype), volume)
        seconds = {**seconds, "model": mid - start, "resample": time.perf_counter() - mid}
        return Segmentation(labels=out, names=values, meta=volume.original, seconds=seconds, provenance=found)

    @torch.no_grad()
    def predict(self, image: str | Path, tasks: Sequence[str] | None = None) -> dict[str, dict[str, Any]]:
        """Volume-level predictions of the adapted classification and regression tasks.

        Returns:
            ``{task: {"kind": "classification", "class": c, "probabilities": [...]}}`` or
            ``{task: {"kind": "regression", "value": v}}`` (``"values"`` for several outputs).
        """
        volume, base = self._serving.working(image)
        available = {**self._serving.tasks("classification"), **self._serving.tasks("regression")}
        out: dict[str, dict[str, Any]] = {}
        for name, task in self._select(available, tasks).items():
            result = self._task_output(task, volume, base)[0].float().cpu()
            if task.info.kind == "classification":
                p = torch.softmax(result, 0)
                out[name] = {"kind": "classification", "class": int(p.argmax()), "probabilities": p.tolist()}
            elif result.numel() == 1:
                out[name] = {"kind": "regression", "value": float(result[0])}
            else:
                out[name] = {"kind": "regression", "values": result.tolist()}
        return out

    def uncertainty(self, image: str | Path) -> float | None:
        """The scan's :func:`mask_uncertainty` under the adapted structures (None without any)."""
        _, probs = self.probabilities(image)
        return mask_uncertainty(probs.values())

    def embedding(self, image: str | Path) -> np.ndarray:
        """The backbone's volume embedding of a scan, shape (E,)."""
        _, base = self._serving.working(image)
        return base.embedding[0].float().cpu().numpy()
