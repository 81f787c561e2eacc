"""Meta-learning algorithms, selected by name, all on the same model and the same episodes.

Each algorithm turns one episode (a task's support and query batches) into gradients for the model's
meta-parameters; the trainer averages them over a meta-batch (and over processes) and takes one optimiser
step. All inner loops are functional (:mod:`medmeta_plugin.meta.inner`): the stored backbone is only ever
changed by that outer step.

- ``multitask``: joint supervised training, one persistent head per task: the strong baseline.
- ``anil``: closed-form head initialisation from the support features, a few steps on the fast parameters
  (head, or adapter and head), query loss back-propagated into the backbone (Raghu et al. 2020).
- ``fomaml``: steps on the whole network, first-order meta-gradient of the query loss (Finn et al. 2017).
- ``reptile``: steps on the whole network over support and query; the meta-gradient is the difference
  between the start and end weights (Nichol et al. 2018).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from monai.utils import look_up_option

from medmeta_plugin.adapt.head_init import init_head
from medmeta_plugin.meta.inner import EpisodeNet, apply_head, sgd_steps
from medmeta_plugin.meta.objectives import task_loss, task_score
from medmeta_plugin.networks.backbone import BackboneOutput
from medmeta_plugin.networks.model import MetaModel, TaskInfo

__all__ = ["ALGORITHMS", "InnerConfig", "TaskBatch", "episode_gradients"]

ALGORITHMS = ("multitask", "anil", "fomaml", "reptile")


@dataclass(frozen=True)
class InnerConfig:
    """Inner-loop hyper-parameters.

    Attributes:
        steps: gradient steps on the support set per episode.
        lr: inner step size (SGD) of the fast parameters (adapter and head).
        backbone_lr: inner step size of the backbone in ``fomaml`` and ``reptile`` (whole-network steps need
            a far smaller step than a linear head: 0.1 diverges within three steps on a fresh backbone).
        first_order: drop second-order terms of the steps (the head initialisation stays exact).
        mode: adapter mode adapted in ``anil``'s inner loop (``head``, ``film`` or ``lora``).
    """

    steps: int = 3
    lr: float = 0.1
    backbone_lr: float = 0.01
    first_order: bool = True
    mode: str = "head"

    def __post_init__(self) -> None:
        if self.steps < 0 or self.lr <= 0 or self.backbone_lr <= 0:
            raise ValueError(f"inner steps must be >= 0 and lr > 0, got steps={self.steps}, lr={self.lr}.")
        look_up_option(self.mode, ("head", "film", "lora"))


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


def _head_names(kind: str) -> tuple[str, str]:
    layer = "conv" if kind == "segmentation" else "linear"
    return f"task.head.{layer}.weight", f"task.head.{layer}.bias"


def _anil(model: MetaModel, b: TaskBatch, inner: InnerConfig) -> tuple[torch.Tensor, torch.Tensor]:
    k = b.xs.shape[0]
    base_s, base_q = _split(model.backbone(torch.cat([b.xs, b.xq])), k)
    head = init_head(b.kind, base_s, b.ys, b.num_outputs)
    if inner.mode == "head":
        head = sgd_steps(
            lambda p: task_loss(b.kind, apply_head(b.kind, p, base_s), b.ys),
            head,
            inner.steps,
            inner.lr,
            inner.first_order,
        )
        out_q = apply_head(b.kind, head, base_q)
    else:
        net = EpisodeNet(model.backbone, TaskInfo("episode", b.kind, inner.mode, b.num_outputs))
        w_name, b_name = _head_names(b.kind)
        params = {**net.adapter_params(), w_name: head["weight"], b_name: head["bias"]}
        params = sgd_steps(
            lambda p: net.loss(b.kind, b.xs, b.ys, p), params, inner.steps, inner.lr, inner.first_order
        )
        out_q = net.run(b.xq, params)
    return task_loss(b.kind, out_q, b.yq), out_q


def _whole_network_steps(
    model: MetaModel, b: TaskBatch, inner: InnerConfig, x: torch.Tensor, y: torch.Tensor
) -> tuple[EpisodeNet, dict[str, torch.Tensor]]:
    """Start from the backbone and a closed-form head; take first-order steps on everything."""
    net = EpisodeNet(model.backbone, TaskInfo("episode", b.kind, "head", b.num_outputs))
    with torch.no_grad():
        head = init_head(b.kind, model.backbone(b.xs), b.ys, b.num_outputs)
    w_name, b_name = _head_names(b.kind)
    params = {
        f"backbone.{n}": p.detach().clone().requires_grad_(True) for n, p in model.backbone.named_parameters()
    }
    params[w_name] = head["weight"].detach().requires_grad_(True)
    params[b_name] = head["bias"].detach().requires_grad_(True)
    return net, sgd_steps(
        lambda p: net.loss(b.kind, x, y, p), params, inner.steps, inner.lr, first_order=True
    )


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
        net, adapted = _whole_network_steps(model, batch, inner, batch.xs, batch.ys)
        score_out = net.run(batch.xq, adapted)
        loss = task_loss(batch.kind, score_out, batch.yq)
        names = list(meta)
        grads = dict(zip(names, torch.autograd.grad(loss, [adapted[n] for n in names], allow_unused=True)))
        score_y = batch.yq
    else:  # reptile
        x, y = torch.cat([batch.xs, batch.xq]), torch.cat([batch.ys, batch.yq])
        net, adapted = _whole_network_steps(model, batch, inner, x, y)
        grads = {n: (p.detach() - adapted[n].detach()) / inner.backbone_lr for n, p in meta.items()}
        with torch.no_grad():
            score_out = net.run(batch.xq, adapted)
            loss = task_loss(batch.kind, score_out, batch.yq)
        score_y = batch.yq
    grads = {n: g.detach() for n, g in grads.items() if g is not None}
    metrics = {
        "query_loss": float(loss.detach()),
        "query_score": task_score(batch.kind, score_out.detach(), score_y),
    }
    return grads, metrics
