"""Functional inner loops: fit a fresh task's fast parameters on a support batch, differentiably.

These are the building blocks of the meta-learning algorithms. They never write to a module's parameters:
every step produces new tensors (``p - lr * grad``), so the outer loop can differentiate the query loss
through the adaptation (exactly through the closed-form head initialisation, and through the steps too
unless ``first_order``).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from medmeta_plugin.meta.objectives import task_loss
from medmeta_plugin.networks.backbone import Backbone3D, BackboneOutput
from medmeta_plugin.networks.model import TaskAdapter, TaskInfo

__all__ = ["EpisodeNet", "apply_head", "sgd_steps"]

Params = dict[str, torch.Tensor]


def apply_head(kind: str, head: Mapping[str, torch.Tensor], base: BackboneOutput) -> torch.Tensor:
    """The head as a function: 1x1x1 convolution of the features, or a linear map of the embedding."""
    if kind == "segmentation":
        return F.conv3d(base.features, head["weight"], head["bias"])
    return F.linear(base.embedding, head["weight"], head["bias"])


def sgd_steps(
    loss_fn, params: Params, steps: int, lr: float | Mapping[str, float], first_order: bool
) -> Params:
    """Plain gradient descent on a dict of tensors, functionally.

    Args:
        loss_fn: maps the current params dict to a scalar loss.
        params: starting tensors (they must require grad or depend on tensors that do).
        steps: number of steps.
        lr: step size, or a step size per parameter name.
        first_order: drop second-order terms (do not build a graph through the gradients).

    Returns:
        The updated tensors, still connected to ``params``' graph.
    """
    # Every given tensor is adapted; a constant one (e.g. the head of a support set without foreground,
    # which has no graph to the features) becomes a fresh leaf so it can still take steps.
    params = {k: v if v.requires_grad else v.detach().requires_grad_(True) for k, v in params.items()}
    names = list(params)
    for _ in range(steps):
        loss = loss_fn(params)
        # retain_graph: the support features' graph is shared with the query loss the outer loop
        # differentiates; freeing its buffers here would break that backward pass.
        tensors = [params[k] for k in names]
        grads = torch.autograd.grad(
            loss, tensors, create_graph=not first_order, retain_graph=True, allow_unused=True
        )
        params = dict(params)
        for k, g in zip(names, grads):
            if g is not None:
                params[k] = params[k] - (lr[k] if isinstance(lr, Mapping) else lr) * g
    return params


class EpisodeNet(nn.Module):
    """A throwaway task adapter wired to the shared backbone, for functional inner loops.

    Parameter names are ``backbone.*`` (the shared backbone itself, not a copy) and ``task.adapter.*`` /
    ``task.head.*``; :func:`torch.func.functional_call` swaps in whichever of them an inner loop adapts.
    """

    def __init__(self, backbone: Backbone3D, info: TaskInfo) -> None:
        super().__init__()
        self.backbone = backbone
        self.task = TaskAdapter(info, backbone).to(next(backbone.parameters()).device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Task output for images (B, C, X, Y, Z)."""
        return self.task.head(self.backbone(x, adapter=self.task.adapter))

    def adapter_params(self) -> Params:
        """Fresh (identity) adapter parameters, detached leaves that require grad."""
        return {
            f"task.adapter.{k}": v.detach().clone().requires_grad_(True)
            for k, v in self.task.adapter.named_parameters()
        }

    def run(self, x: torch.Tensor, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Forward with some parameters replaced (see :meth:`forward`)."""
        return functional_call(self, dict(params), (x,), strict=False)

    def loss(
        self, kind: str, x: torch.Tensor, y: torch.Tensor, params: Mapping[str, torch.Tensor]
    ) -> torch.Tensor:
        """Task loss of :meth:`run`."""
        return task_loss(kind, self.run(x, params), y)
