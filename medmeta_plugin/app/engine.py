"""The app's model runtime: one shared backbone, many adapters, inference and adaptation on the working grid.

:class:`Engine` is what the MONAI Label glue (infer tasks, train tasks, strategies, the adaptation worker)
calls. It composes the pipeline's stages and delegates to them:

- :mod:`~medmeta_plugin.app.serving`: the backbone and the adapters being served, restored from the adapter
  store at start, refreshed from what another process wrote, swapped in atomically after an adaptation;
- :mod:`~medmeta_plugin.app.segmenting`: a scan's masks (each with how it was found) and predictions;
- :mod:`~medmeta_plugin.app.adapting`: labelled examples to a fitted adapter, handed to serving;

and the two caches they share: the backbone features of a few scans (:mod:`~medmeta_plugin.app.features`),
so inference runs the backbone once per scan and adaptation reuses the features of a scan the user has just
looked at, and the atlas priors (:mod:`~medmeta_plugin.app.priors`), which read their scans from the same
feature cache.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medmeta_plugin.adapt import AdaptReport
from medmeta_plugin.adapt.store import AdapterStore
from medmeta_plugin.app.adapting import Example, adapt_task
from medmeta_plugin.app.config import AppConfig
from medmeta_plugin.app.features import FeatureCache
from medmeta_plugin.app.grid import WorkingVolume
from medmeta_plugin.app.priors import AtlasPriors
from medmeta_plugin.app.segmenting import Segmentation, Segmenter
from medmeta_plugin.app.serving import Serving, resolve_device
from medmeta_plugin.networks import BackboneOutput, MetaModel, TaskAdapter

__all__ = ["Engine"]


class Engine:
    """Backbone, adapters and feature cache of the running app.

    Args:
        config: the app configuration.
        model_dir: the app's model folder; adapters live in ``<model_dir>/adapters/<backbone hash>/`` (so a
            new backbone starts with a clean set), and a backbone meta-trained on the datastore, when there
            is one, in ``<model_dir>/backbone.safetensors`` (it then takes the place of ``config.backbone``).
    """

    def __init__(self, config: AppConfig, model_dir: str | Path) -> None:
        self.config = config
        self._features = FeatureCache(config, resolve_device(config.device))
        # One read of a scan, query or labelled: the priors read their scans from the feature cache.
        self._atlas = AtlasPriors(self._features.scan, self._features.size_divisor, config.registration)
        self._serving = Serving(config, model_dir, self._features)
        self._segmenter = Segmenter(self._serving, self._features, self._atlas)

    def share_registrations(self, other: Engine) -> None:
        """Register pairs of scans through ``other``'s registration cache from now on: engines of one process
        that differ only downstream of registration (a benchmark comparing the atlas answer with the
        in-context refiner's) then register each pair of files once, not once each.

        Raises:
            ValueError: if the two engines register differently (transform or placement settings).
        """
        if (self.config.registration, self._atlas.placement) != (
            other.config.registration,
            other._atlas.placement,
        ):
            raise ValueError(
                f"engines that register differently cannot share registrations: {self.config.registration!r}"
                f" vs {other.config.registration!r}."
            )
        self._atlas.registrations = other._atlas.registrations

    # ----- serving ------------------------------------------------------------------------------------------
    @property
    def model(self) -> MetaModel:
        """The backbone and adapters being served (replaced when the backbone is reloaded)."""
        return self._serving.model

    @property
    def store(self) -> AdapterStore:
        """The adapter store of the backbone being served."""
        return self._serving.store

    @property
    def model_dir(self) -> Path:
        """The app's model folder."""
        return self._serving.model_dir

    @property
    def device(self) -> torch.device:
        """Where the backbone runs."""
        return self._serving.device

    @property
    def backbone_path(self) -> Path:
        """The backbone in use: the one trained on the datastore (in the model folder), else the config's."""
        return self._serving.backbone_path

    @property
    def divisor(self) -> int:
        """The backbone's size divisor: working grids are padded to multiples of it."""
        return self._serving.divisor

    def load_backbone(self) -> dict[str, int]:
        """See :meth:`Serving.load_backbone <medmeta_plugin.app.serving.Serving.load_backbone>`."""
        return self._serving.load_backbone()

    def refresh(self) -> str | None:
        """See :meth:`Serving.refresh <medmeta_plugin.app.serving.Serving.refresh>`."""
        return self._serving.refresh()

    def tasks(self, kind: str | None = None) -> dict[str, TaskAdapter]:
        """See :meth:`Serving.tasks <medmeta_plugin.app.serving.Serving.tasks>`."""
        return self._serving.tasks(kind)

    def served_meta(self, task: str) -> dict[str, Any] | None:
        """See :meth:`Serving.served_meta <medmeta_plugin.app.serving.Serving.served_meta>`."""
        return self._serving.served_meta(task)

    def versions(self) -> dict[str, int]:
        """See :meth:`Serving.versions <medmeta_plugin.app.serving.Serving.versions>`."""
        return self._serving.versions()

    def atlas_examples(self, task: str) -> list[dict[str, Any]]:
        """See :meth:`Serving.atlas_examples <medmeta_plugin.app.serving.Serving.atlas_examples>`."""
        return self._serving.atlas_examples(task)

    def working(self, image: str | Path) -> tuple[WorkingVolume, BackboneOutput]:
        """See :meth:`Serving.working <medmeta_plugin.app.serving.Serving.working>`."""
        return self._serving.working(image)

    # ----- segmenting ---------------------------------------------------------------------------------------
    def label_values(self, names: Sequence[str]) -> dict[str, int]:
        """See :meth:`Segmenter.label_values <medmeta_plugin.app.segmenting.Segmenter.label_values>`."""
        return self._segmenter.label_values(names)

    def placements(self) -> dict[str, Any]:
        """See :meth:`Segmenter.placements <medmeta_plugin.app.segmenting.Segmenter.placements>`."""
        return self._segmenter.placements()

    def probabilities(
        self, image: str | Path, tasks: Sequence[str] | None = None
    ) -> tuple[WorkingVolume, dict[str, torch.Tensor]]:
        """See :meth:`Segmenter.probabilities <medmeta_plugin.app.segmenting.Segmenter.probabilities>`."""
        return self._segmenter.probabilities(image, tasks)

    def segment(self, image: str | Path, tasks: Sequence[str] | None = None) -> Segmentation:
        """See :meth:`Segmenter.segment <medmeta_plugin.app.segmenting.Segmenter.segment>`."""
        return self._segmenter.segment(image, tasks)

    def predict(self, image: str | Path, tasks: Sequence[str] | None = None) -> dict[str, dict[str, Any]]:
        """See :meth:`Segmenter.predict <medmeta_plugin.app.segmenting.Segmenter.predict>`."""
        return self._segmenter.predict(image, tasks)

    def uncertainty(self, image: str | Path) -> float | None:
        """See :meth:`Segmenter.uncertainty <medmeta_plugin.app.segmenting.Segmenter.uncertainty>`."""
        return self._segmenter.uncertainty(image)

    def embedding(self, image: str | Path) -> np.ndarray:
        """See :meth:`Segmenter.embedding <medmeta_plugin.app.segmenting.Segmenter.embedding>`."""
        return self._segmenter.embedding(image)

    def _task_output(self, task: TaskAdapter, volume: WorkingVolume, base: BackboneOutput) -> torch.Tensor:
        """See :meth:`Segmenter._task_output <medmeta_plugin.app.segmenting.Segmenter._task_output>`."""
        return self._segmenter._task_output(task, volume, base)

    # ----- adapting -----------------------------------------------------------------------------------------
    def adapt_task(
        self, name: str, kind: str, examples: Sequence[Example], num_outputs: int | None = None
    ) -> tuple[AdaptReport, int]:
        """See :func:`medmeta_plugin.app.adapting.adapt_task`."""
        return adapt_task(self._serving, name, kind, examples, num_outputs)
