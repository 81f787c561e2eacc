"""The composed model F(x) = A(B(x; phi)): one shared backbone and any number of task adapters.

Parameters are split in two groups, named by their prefix in ``state_dict`` terms:

- meta-parameters ``backbone.*`` (phi), shared by every task and learned by meta-training;
- fast parameters ``tasks.<name>.*`` (one task's adapter and head), fitted by adaptation.

:meth:`MetaModel.functional_forward` runs the model with a given set of fast parameters through
``torch.func.functional_call``, which leaves the stored parameters untouched: adaptation loops can take
gradient steps on copies while inference keeps serving the stored adapter.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call

from medmeta_plugin.names import validate_name
from medmeta_plugin.networks.adapters import Adapter, FullAdapter, build_adapter
from medmeta_plugin.networks.backbone import Backbone3D, BackboneConfig
from medmeta_plugin.networks.heads import build_head
from medmeta_plugin.networks.precision import autocast

__all__ = ["MetaModel", "TaskAdapter", "TaskInfo"]


@dataclass(frozen=True)
class TaskInfo:
    """What a task adapter is: enough to rebuild it.

    Attributes:
        name: task name (a structure name for segmentation).
        kind: ``segmentation``, ``classification`` or ``regression``.
        mode: adapter mode (``head``, ``film``, ``lora``, ``full``).
        num_outputs: classes (classification) or values (regression); 1 for segmentation.
        hparams: adapter hyper-parameters (e.g. LoRA rank).
        head: segmentation head kind (:data:`~medmeta_plugin.networks.heads.SEGMENTATION_HEADS`);
            ``linear`` for the other kinds.
    """

    name: str
    kind: str
    mode: str
    num_outputs: int = 1
    hparams: tuple[tuple[str, int | float], ...] = ()
    head: str = "linear"


class TaskAdapter(nn.Module):
    """One task's fast parameters: an adapter and a head."""

    def __init__(self, info: TaskInfo, backbone: Backbone3D) -> None:
        super().__init__()
        self.info = info
        self.adapter: Adapter = build_adapter(info.mode, backbone, **dict(info.hparams))
        head = info.head if info.kind == "segmentation" else "linear"
        self.head = build_head(
            info.kind, backbone.feature_channels, backbone.embedding_dim, info.num_outputs, head
        )
        # The stored hparams are the adapter's effective ones (defaults filled in).
        self.info = TaskInfo(
            info.name, info.kind, info.mode, info.num_outputs, tuple(self.adapter.hparams().items()), head
        )


class MetaModel(nn.Module):
    """A shared backbone with a dictionary of task adapters.

    Args:
        backbone: the shared backbone, or ``None`` to build one from ``config``.
        config: backbone configuration used when ``backbone`` is ``None``.

    Example:
        >>> model = MetaModel(config=BackboneConfig(features=(8, 16)))
        >>> _ = model.add_task("liver", "segmentation", mode="film")
        >>> model(torch.zeros(1, 1, 16, 16, 16), task="liver").shape
        torch.Size([1, 1, 16, 16, 16])
    """

    def __init__(self, backbone: Backbone3D | None = None, config: BackboneConfig | None = None) -> None:
        super().__init__()
        self.backbone = backbone if backbone is not None else Backbone3D(config)
        self.tasks = nn.ModuleDict()

    # ----- task management -------------------------------------------------------------------------------

    def add_task(
        self,
        name: str,
        kind: str,
        mode: str = "film",
        num_outputs: int | None = None,
        head: str = "linear",
        **hparams: int | float,
    ) -> TaskAdapter:
        """Add a fresh (identity) adapter and head for a task, replacing any adapter of the same name.

        Args:
            name: task name; must be a safe file name (see :func:`medmeta_plugin.names.validate_name`).
            kind: ``segmentation``, ``classification`` or ``regression``.
            mode: adapter mode, one of ``head``, ``film``, ``lora``, ``full``.
            num_outputs: classes for classification, values for regression.
            head: segmentation head kind, ``linear`` or ``position``.
            **hparams: adapter hyper-parameters (``rank``, ``alpha`` for ``lora``).

        Returns:
            The new :class:`TaskAdapter`, on the backbone's device.
        """
        validate_name(name, "task name")
        outputs = num_outputs if num_outputs is not None else (1 if kind != "classification" else None)
        if outputs is None:
            raise ValueError(f"task {name!r}: classification needs num_outputs (the number of classes).")
        info = TaskInfo(name, kind, mode, int(outputs), tuple(sorted(hparams.items())), head)
        task = TaskAdapter(info, self.backbone).to(self._device())
        self.tasks[name] = task
        return task

    def attach(self, task: TaskAdapter) -> TaskAdapter:
        """Install an adapter built elsewhere (e.g. by adaptation), replacing one of the same name.

        The swap is a single dictionary assignment, so a concurrent forward pass sees the old adapter or the
        new one, never a mixture.
        """
        if not isinstance(task, TaskAdapter):
            raise TypeError(f"task must be a TaskAdapter, got {type(task).__name__}.")
        self.tasks[validate_name(task.info.name, "task name")] = task.to(self._device())
        return task

    def task(self, name: str) -> TaskAdapter:
        """Return the adapter of task ``name``.

        Raises:
            ValueError: if there is no such task; the message lists the known ones.
        """
        if name not in self.tasks:
            raise ValueError(f"unknown task {name!r}; known tasks: {sorted(self.tasks) or 'none'}.")
        return self.tasks[name]

    def _device(self) -> torch.device:
        return next(self.backbone.parameters()).device

    # ----- parameter groups ------------------------------------------------------------------------------

    def meta_parameters(self) -> dict[str, nn.Parameter]:
        """The shared backbone's parameters phi, keyed by their full name (``backbone.*``)."""
        return {f"backbone.{k}": p for k, p in self.backbone.named_parameters()}

    def fast_parameters(self, name: str) -> dict[str, nn.Parameter]:
        """One task's adapter and head parameters, keyed by their full name (``tasks.<name>.*``)."""
        return {f"tasks.{name}.{k}": p for k, p in self.task(name).named_parameters()}

    # ----- forward ---------------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, task: str, precision: str = "fp32") -> torch.Tensor:
        """Run F(x) = A(B(x)) for one task.

        Args:
            x: images, shape (B, C, X, Y, Z).
            task: task name.
            precision: of the backbone pass, one of :data:`~medmeta_plugin.networks.precision.PRECISIONS`;
                the head runs in float32.

        Returns:
            Segmentation logits (B, 1, X, Y, Z), classification logits (B, num_classes) or regression values
            (B, num_outputs), depending on the task's kind.
        """
        t = self.task(task)
        backbone = t.adapter.backbone if isinstance(t.adapter, FullAdapter) else self.backbone
        with autocast(precision, x.device):
            out = backbone(x, adapter=t.adapter)
        return t.head(out.float())

    def functional_forward(
        self, x: torch.Tensor, task: str, params: Mapping[str, torch.Tensor]
    ) -> torch.Tensor:
        """Run :meth:`forward` with some parameters replaced, without touching the stored ones.

        Args:
            x: images, shape (B, C, X, Y, Z).
            task: task name.
            params: replacement tensors keyed by full parameter name (e.g. from :meth:`fast_parameters`,
                possibly including ``backbone.*``); names not given use the stored parameters.

        Returns:
            Same as :meth:`forward`.

        Raises:
            ValueError: if ``params`` names a parameter the model does not have.
        """
        known = dict(self.named_parameters())
        unknown = [k for k in params if k not in known]
        if unknown:
            raise ValueError(
                f"params name unknown parameters: {unknown[:5]}{' ...' if len(unknown) > 5 else ''}."
            )
        return functional_call(self, dict(params), (x,), {"task": task}, strict=False)
