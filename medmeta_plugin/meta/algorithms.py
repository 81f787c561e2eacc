"""Meta-learning algorithms, selected by name, all on the same model and the same episodes.

Each algorithm turns one episode (a task's support and query batches) into gradients for the model's
meta-parameters; the trainer averages them over a meta-batch (and over processes) and takes one optimiser
step. The inner loop of every algorithm is the product's own adaptation,
:func:`medmeta_plugin.adapt.adapt_batch` with :func:`~medmeta_plugin.adapt.head_mode_budget` (the optimiser,
step budget, voxel sample, leave-one-out stopping and prior shift the app's worker and the benchmarks run),
so meta-training optimises the query loss after exactly the adaptation users get. Adaptation never writes
to the backbone: only the outer step changes it.

- ``multitask``: joint supervised training, one persistent head per task: the strong baseline (no inner loop).
- ``anil``: the adaptation in ``head``, ``film`` or ``lora`` mode; the query loss reaches the backbone
  through the query features and, exactly, through the head's closed-form start from the support features
  (:func:`~medmeta_plugin.adapt.first_order_head`; each step's change is a constant: first order).
  Raghu et al. 2020.
- ``fomaml``: the adaptation in ``full`` mode (a copy of the whole network); the meta-gradient is the query
  loss's gradient at the adapted weights (Finn et al. 2017, first order).
- ``reptile``: the adaptation in ``full`` mode on support and query together; the meta-gradient is the
  difference between the start and the adapted weights over the step size (Nichol et al. 2018).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from monai.utils import look_up_option
from torch.func import functional_call

from medmeta_plugin.adapt import HEAD_MODE_STEPS, AdaptBudget, adapt_batch, first_order_head, head_mode_budget
from medmeta_plugin.networks.adapters import FullAdapter
from medmeta_plugin.networks.backbone import BackboneOutput
from medmeta_plugin.networks.heads import DEFAULT_SEGMENTATION_HEAD, SEGMENTATION_HEADS
from medmeta_plugin.networks.model import MetaModel, TaskAdapter, TaskInfo
from medmeta_plugin.networks.objectives import task_loss, task_score
from medmeta_plugin.networks.position import body_position

__all__ = ["ALGORITHMS", "InnerConfig", "TaskBatch", "episode_gradients"]

ALGORITHMS = ("multitask", "anil", "fomaml", "reptile")


@dataclass(frozen=True)
class InnerConfig:
    """The adaptation an episode's inner loop runs: the product's, with these settings.

    Attributes:
        steps: step budget of the adaptation (leave-one-out picks fewer with k >= 2); by default the app's
            ``adapt_steps`` and the benchmark's ``head_steps``: one number,
            :data:`~medmeta_plugin.adapt.HEAD_MODE_STEPS`.
        lr: Adam learning rate of the fast parameters (the adaptation's default).
        mode: adapter mode adapted by ``anil`` (``head``, ``film`` or ``lora``); ``fomaml`` and ``reptile``
            adapt the whole network (``full``).
        head: segmentation head kind of the adapted tasks (the app's default).
    """

    steps: int = HEAD_MODE_STEPS
    lr: float = AdaptBudget.lr
    mode: str = "head"
    head: str = DEFAULT_SEGMENTATION_HEAD

    def __post_init__(self) -> None:
        if self.steps < 0 or self.lr <= 0:
            raise ValueError(f"inner steps must be >= 0 and lr > 0, got steps={self.steps}, lr={self.lr}.")
        look_up_option(self.mode, ("head", "film", "lora"))
        look_up_option(self.head, SEGMENTATION_HEADS)

    def budget(self) -> AdaptBudget:
        """The adaptation budget: :func:`~medmeta_plugin.adapt.head_mode_budget` of ``steps``."""
        return head_mode_budget(self.steps, lr=self.lr)


@dataclass(frozen=True)
class TaskBatch:
    """One episode as tensors.

    Attributes:
        name: task name; kind: task kind; num_outputs: classes or values.
        xs, ys: support images (k, C, X, Y, Z) and targets (masks (k, 1, X, Y, Z), class indices (k,)
            or values (k, V)).
        xq, yq: query images and targets, same layout.
    """

    name: str
    kind: str
    num_outputs: int
    xs: torch.Tensor
    ys: torch.Tensor
    xq: torch.Tensor
    yq: torch.Tensor


def _split(out: BackboneOutput, k: int) -> tuple[BackboneOutput, BackboneOutput]:
    return out.take(slice(None, k)), out.take(slice(k, None))


def _seed() -> int:
    """The adaptation's seed, drawn from the trainer's (seeded) torch generator: runs repeat."""
    return int(torch.randint(0, 2**31 - 1, ()))


def _adapt(
    model: MetaModel,
    b: TaskBatch,
    inner: InnerConfig,
    mode: str,
    x: torch.Tensor,
    y: torch.Tensor,
    base: BackboneOutput | None = None,
) -> TaskAdapter:
    info = TaskInfo("episode", b.kind, mode, b.num_outputs, head=inner.head)
    task, _ = adapt_batch(model, x, y, info, inner.budget(), features=base, seed=_seed())
    return task


def _anil(model: MetaModel, b: TaskBatch, inner: InnerConfig) -> tuple[torch.Tensor, torch.Tensor]:
    k = b.xs.shape[0]
    base_s, base_q = _split(model.backbone(torch.cat([b.xs, b.xq])), k)
    task = _adapt(model, b, inner, inner.mode, b.xs, b.ys, base_s if inner.mode == "head" else None)
    head = first_order_head(task, base_s, b.ys, inner.budget())
    if inner.mode != "head":  # the adapted adapter acts inside the backbone's query pass
        base_q = model.backbone(b.xq, adapter=task.adapter)
    out_q = functional_call(task.head, head, (_placed(base_q, b.xq),), strict=False)
    return task_loss(b.kind, out_q, b.yq), out_q


def _full(
    model: MetaModel, b: TaskBatch, inner: InnerConfig, x: torch.Tensor, y: torch.Tensor
) -> TaskAdapter:
    """The adaptation of a private copy of the whole network (``full`` mode) on ``x``, ``y``."""
    return _adapt(model, b, inner, "full", x, y)


def _placed(out: BackboneOutput, x: torch.Tensor) -> BackboneOutput:
    """The backbone's output with the voxels' body positions, as adaptation gives its heads."""
    return out if out.position is not None else out._replace(position=body_position(x))


def _query_out(task: TaskAdapter, xq: torch.Tensor) -> torch.Tensor:
    assert isinstance(task.adapter, FullAdapter)
    return task.head(_placed(task.adapter.backbone(xq, adapter=task.adapter), xq))


def episode_gradients(
    algorithm: str, model: MetaModel, batch: TaskBatch, inner: InnerConfig
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Meta-gradients of one episode.

    Args:
        algorithm: one of :data:`ALGORITHMS`.
        model: the model; for ``multitask`` it must hold a ``head``-mode task named ``batch.name``.
        batch: the episode.
        inner: inner-loop settings (unused by ``multitask``).

    Returns:
        Gradients keyed by full parameter name (a subset of ``model.named_parameters()``), and metrics
        ``query_loss`` and ``query_score`` (after adaptation; on the joint batch for ``multitask``).
    """
    algorithm = look_up_option(algorithm, ALGORITHMS)
    meta = model.meta_parameters()
    if algorithm == "multitask":
        params = {**meta, **model.fast_parameters(batch.name)}
        x, y = torch.cat([batch.xs, batch.xq]), torch.cat([batch.ys, batch.yq])
        out = model(x, batch.name)
        loss = task_loss(batch.kind, out, y)
        grads = dict(zip(params, torch.autograd.grad(loss, list(params.values()), allow_unused=True)))
        score_out, score_y = out, y
    elif algorithm == "anil":
        loss, score_out = _anil(model, batch, inner)
        score_y = batch.yq
        grads = dict(zip(meta, torch.autograd.grad(loss, list(meta.values()), allow_unused=True)))
    elif algorithm == "fomaml":
        task = _full(model, batch, inner, batch.xs, batch.ys)
        adapted = {f"backbone.{n}": p for n, p in task.adapter.backbone.named_parameters()}
        score_out = _query_out(task, batch.xq)
        loss = task_loss(batch.kind, score_out, batch.yq)
        names = list(meta)
        grads = dict(zip(names, torch.autograd.grad(loss, [adapted[n] for n in names], allow_unused=True)))
        score_y = batch.yq
    else:  # reptile
        x, y = torch.cat([batch.xs, batch.xq]), torch.cat([batch.ys, batch.yq])
        task = _full(model, batch, inner, x, y)
        adapted = {f"backbone.{n}": p for n, p in task.adapter.backbone.named_parameters()}
        grads = {n: (p.detach() - adapted[n].detach()) / inner.lr for n, p in meta.items()}
        with torch.no_grad():
            score_out = _query_out(task, batch.xq)
            loss = task_loss(batch.kind, score_out, batch.yq)
        score_y = batch.yq
    grads = {n: g.detach() for n, g in grads.items() if g is not None}
    metrics = {
        "query_loss": float(loss.detach()),
        "query_score": task_score(batch.kind, score_out.detach(), score_y),
    }
    return grads, metrics
