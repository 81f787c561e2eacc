"""The running app's state, shared by its infer tasks, train tasks and strategies.

:class:`MedMetaRuntime` ties the :class:`~medmeta_plugin.app.engine.Engine` (backbone and adapters) to the
datastore: a saved label schedules adaptation of the tasks it names on the background
:class:`~medmeta_plugin.app.worker.AdaptationWorker`; each adaptation reads all of the task's labels from the
datastore; when the queue is empty the worker refreshes the active-learning scores of unlabelled scans.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from monailabel.interfaces.datastore import Datastore, DefaultLabelTag

from medmeta_plugin.app.adapting import examples_fingerprint
from medmeta_plugin.app.config import AppConfig
from medmeta_plugin.app.datastore import collect_examples, stored_submission
from medmeta_plugin.app.engine import Engine
from medmeta_plugin.app.priors import warm_up
from medmeta_plugin.app.worker import AdaptationWorker

__all__ = ["MedMetaRuntime"]

logger = logging.getLogger(__name__)


class MedMetaRuntime:
    """Engine + datastore + adaptation worker + active-learning scores.

    Args:
        config: the app configuration.
        model_dir: the app's model folder.
        datastore: the app's datastore.
    """

    def __init__(self, config: AppConfig, model_dir: str | Path, datastore: Datastore) -> None:
        self.config = config
        self.datastore = datastore
        self.engine = Engine(config, model_dir)
        self.worker = AdaptationWorker(self._adapt, self._score_next if config.score_after_adapt else None)
        self._scores: dict[str, tuple[float | None, tuple]] = {}
        self._embeddings: dict[str, tuple[np.ndarray, int]] = {}
        self._lock = threading.Lock()
        self._inference_slots = threading.BoundedSemaphore(config.concurrent_inferences)

    # ----- adaptation --------------------------------------------------------------------------------------
    def start(self) -> list[str]:
        """Start the worker and schedule every labelled task whose served adapter was not fitted on exactly
        its current labels (none yet on this backbone, or labels added or replaced since)."""
        if self.config.atlas:
            # ITK's first registration loads its modules (~12 s on 2 CPU cores). Done here, before the server
            # answers, not in a thread beside the first label: that one held the GIL while the user's label
            # waited (21-23 s from a label to its first answer after a start, against 2-3 s later on).
            logger.info("medmeta: loading the registration modules before serving (about 12 s on a CPU)")
            self._warm_up()
        self.worker.start()
        stale = []
        for task, entry in collect_examples(self.datastore, self.config.label_map).items():
            meta = self.engine.served_meta(task)
            used = entry.examples[-self.config.max_shots :]
            if meta is None or meta.get("examples") != examples_fingerprint(used):
                stale.append(task)
        return self.worker.request(stale) if stale else []

    @contextlib.contextmanager
    def inference_slot(self) -> Iterator[float]:
        """Hold one of ``concurrent_inferences`` slots while an inference computes; yields the seconds the
        request waited for it."""
        start = time.perf_counter()
        with self._inference_slots:
            yield time.perf_counter() - start

    def _warm_up(self) -> None:
        start = time.perf_counter()
        try:
            warm_up(self.config.registration)
        except Exception:  # the warm-up only saves time; a request would meet the same failure and report it
            logger.exception("medmeta: the registration warm-up failed")
            return
        logger.info("medmeta: registration modules loaded in %.1f s", time.perf_counter() - start)

    def refresh(self) -> None:
        """Pick up a train task's output; after a backbone change, re-adapt every labelled task on it."""
        if self.engine.refresh() == "backbone":
            self.worker.request(list(collect_examples(self.datastore, self.config.label_map)))

    def on_label_saved(self, image_id: str, tag: str) -> list[str]:
        """Schedule adaptation of the tasks a newly saved label names (final labels only)."""
        if tag != DefaultLabelTag.FINAL.value:
            return []
        submission = stored_submission(self.datastore, image_id, self.config.label_map, tag)
        if submission is None:
            return []
        with self._lock:
            self._scores.pop(image_id, None)
        tasks = [*submission.structures, *(t.task for t in submission.targets)]
        return self.worker.request(tasks)

    def _adapt(self, task: str) -> dict[str, Any]:
        entry = collect_examples(self.datastore, self.config.label_map).get(task)
        if entry is None or not entry.examples:
            raise ValueError(f"task {task!r} has no final label in the datastore.")
        report, version = self.engine.adapt_task(task, entry.kind, entry.examples, entry.num_outputs)
        logger.info(
            "adapted %s (%s, %d shots) in %.2f s -> version %d",
            task,
            entry.kind,
            report.shots,
            report.seconds,
            version,
        )
        return {
            "version": version,
            "kind": entry.kind,
            "shots": report.shots,
            "steps": report.steps,
            "adapt_seconds": round(report.seconds, 3),
            "loo_score": report.loo_score,
        }

    def adapt_now(self, task: str) -> dict[str, Any]:
        """Adapt one task synchronously (train tasks use this)."""
        return self._adapt(task)

    def labelled_tasks(self) -> dict[str, str]:
        """``{task: kind}`` of every task with a final label in the datastore."""
        examples = collect_examples(self.datastore, self.config.label_map)
        return {name: entry.kind for name, entry in examples.items()}

    # ----- active-learning scores --------------------------------------------------------------------------
    def _score_key(self) -> tuple:
        return (id(self.engine.model.backbone), tuple(sorted(self.engine.versions().items())))

    def uncertainty(self, image_id: str) -> float | None:
        """The scan's uncertainty under the current adapters (cached until an adapter changes)."""
        key = self._score_key()
        with self._lock:
            cached = self._scores.get(image_id)
        if cached is not None and cached[1] == key:
            return cached[0]
        score = self.engine.uncertainty(self.datastore.get_image_uri(image_id))
        with self._lock:
            self._scores[image_id] = (score, key)
        if score is not None:
            self.datastore.update_image_info(image_id, {"medmeta_uncertainty": score})
        return score

    def embedding(self, image_id: str) -> np.ndarray:
        """The scan's backbone embedding (cached per backbone)."""
        backbone = id(self.engine.model.backbone)
        with self._lock:
            cached = self._embeddings.get(image_id)
        if cached is not None and cached[1] == backbone:
            return cached[0]
        value = self.engine.embedding(self.datastore.get_image_uri(image_id))
        with self._lock:
            self._embeddings[image_id] = (value, backbone)
        return value

    def stale_unlabelled(self) -> list[str]:
        """Unlabelled scans whose uncertainty is missing or out of date."""
        key = self._score_key()
        with self._lock:
            scores = dict(self._scores)
        return [
            i
            for i in self.datastore.get_unlabeled_images(DefaultLabelTag.FINAL.value)
            if i not in scores or scores[i][1] != key
        ]

    def _score_next(self) -> bool:
        """Idle job: score one stale unlabelled scan; True while more remain."""
        if not self.engine.tasks("segmentation"):
            return False
        stale = self.stale_unlabelled()
        if not stale:
            return False
        try:
            self.uncertainty(stale[0])
        except ValueError as err:  # an unreadable scan must not stop the scoring of the others
            logger.warning("cannot score %s: %s", stale[0], err)
            with self._lock:
                self._scores[stale[0]] = (None, self._score_key())
        return len(stale) > 1

    # ----- status ------------------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        """How structures are answered (``answer``: ``registered``, ``refined`` or ``network``, the
        :data:`~medmeta_plugin.app.segmenting.FOUND_BY` a labelled structure's answer has when its placement
        is sure), adapters served, worker queue and the last outcome per task (for ``/info/`` and train
        stats), and
        the placement threshold with the last placement outcomes (``Engine.placements``: at most
        :data:`~medmeta_plugin.app.priors.RECENT_PLACEMENTS` pairs of scans)."""
        tasks = self.engine.tasks()
        return {
            "backbone": str(self.engine.backbone_path.name),
            "device": str(self.engine.device),
            "mode": self.config.mode,
            # How a structure with labelled scans is answered: their carried masks (atlas), moved by the
            # in-context refiner (incontext; kept as carried where they match the scan as a rescan does),
            # or the adapted head alone (neither).
            "answer": "refined"
            if self.config.atlas and self.config.incontext
            else ("registered" if self.config.atlas else "network"),
            "adapters": {
                name: {"kind": t.info.kind, "mode": t.info.mode, "version": self.engine.versions().get(name)}
                for name, t in tasks.items()
            },
            "adaptation": self.worker.status(),
            "placement": self.engine.placements(),
        }
