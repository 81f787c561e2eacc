"""Task heads: turn backbone features into a segmentation, classification or regression output.

Segmentation heads come in two kinds (:data:`SEGMENTATION_HEADS`):

- ``linear``: a 1x1x1 convolution of the voxel features, ``C + 1`` parameters;
- ``position``: the same linear map plus a small residual per-voxel MLP of the voxel features
  and the voxel's position in the body (:mod:`medmeta_plugin.networks.position`). The MLP's last layer
  starts at zero, so a fresh head equals the linear one (and its prototype initialisation); adaptation
  then learns where, as well as what, the structure is. ``(C + P) * H + 2 * H + 1`` more parameters.
"""

from __future__ import annotations

import torch
from monai.utils import look_up_option
from torch import nn
from torch.nn import functional as F

from medmeta_plugin.networks.backbone import BackboneOutput
from medmeta_plugin.networks.position import POSITION_CHANNELS

__all__ = [
    "DEFAULT_SEGMENTATION_HEAD",
    "POSITION_HIDDEN",
    "SEGMENTATION_HEADS",
    "TASK_KINDS",
    "ClassificationHead",
    "RegressionHead",
    "SegmentationHead",
    "build_head",
]

TASK_KINDS = ("segmentation", "classification", "regression")
SEGMENTATION_HEADS = ("linear", "position")
#: The head the app and the benchmarks fit (docs/benchmarks/position-head.md); the library's own default
#: (``MetaModel.add_task``, ``adapt``) stays ``linear``, the head meta-training uses.
DEFAULT_SEGMENTATION_HEAD = "position"
#: Hidden channels of the ``position`` head's MLP: enough for a smooth location prior of any shape.
POSITION_HIDDEN = 32
# Whole scans are passed through the MLP in slabs of at most this many voxels, so that its hidden
# activations (POSITION_HIDDEN channels) stay ~128 MB whatever the scan's size.
_SLAB_VOXELS = 1 << 20


class SegmentationHead(nn.Module):
    """Binary mask logits for one structure from the voxel features (and, optionally, their positions).

    Args:
        in_channels: backbone feature channels.
        kind: ``linear`` or ``position`` (see the module docstring).
    """

    def __init__(self, in_channels: int, kind: str = "linear") -> None:
        super().__init__()
        self.kind = look_up_option(kind, SEGMENTATION_HEADS)
        self.conv = nn.Conv3d(in_channels, 1, kernel_size=1)
        self.mlp: nn.Sequential | None = None
        if self.kind == "position":
            # Per-voxel linear layers on channel-last tensors: a matmul, ~10x faster on a CPU than 1x1x1
            # convolutions on the (k, C, n, 1, 1) voxel samples adaptation fits on.
            self.mlp = nn.Sequential(
                nn.Linear(in_channels + POSITION_CHANNELS, POSITION_HIDDEN),
                nn.LeakyReLU(0.01),
                nn.Linear(POSITION_HIDDEN, 1),
            )
            nn.init.zeros_(self.mlp[2].weight)
            nn.init.zeros_(self.mlp[2].bias)

    def forward(self, out: BackboneOutput) -> torch.Tensor:
        """Return logits of shape (B, 1, X, Y, Z) from features (B, C, X, Y, Z) and position (B, P, X, Y, Z).

        Raises:
            ValueError: for a ``position`` head given an output without positions.
        """
        # Channel-last memory makes the per-voxel layers matmuls (no copy where it already is, as in the
        # feature caches and head-mode voxel samples). A backbone's fresh output pays one copy for it, and
        # gains: a film step on 5 volumes of 64^3 (2 threads, x86_64) took 4.4 s without it, 3.6 s with it.
        out = out.channel_last()
        logits = self._linear(out.features)
        if self.mlp is None:
            return logits
        if out.position is None:
            raise ValueError("a 'position' segmentation head needs BackboneOutput.position; got None.")
        features, position = out.features, out.position.to(out.features.dtype)
        voxels_per_x = features[0, 0, 0].numel() * features.shape[0]
        step = max(1, _SLAB_VOXELS // voxels_per_x)
        mlp = self.mlp

        first, channels = mlp[0], features.shape[1]

        def per_voxel(f: torch.Tensor, p: torch.Tensor) -> torch.Tensor:  # (B, C|P, X', Y, Z) -> (B, 1, ...)
            # mlp(cat([f, p])) with the first layer split by input, sparing the copy of a concatenation
            hidden = F.linear(f.movedim(1, -1), first.weight[:, :channels])
            hidden = hidden + F.linear(p.movedim(1, -1), first.weight[:, channels:], first.bias)
            return mlp[2](mlp[1](hidden)).movedim(-1, 1)

        if torch.is_grad_enabled() or step >= features.shape[2]:
            return logits + per_voxel(features, position)
        slabs = [
            per_voxel(features[:, :, i : i + step], position[:, :, i : i + step])
            for i in range(0, features.shape[2], step)
        ]
        return logits + torch.cat(slabs, dim=2)

    def _linear(self, features: torch.Tensor) -> torch.Tensor:
        """The 1x1x1 convolution; as a matmul where the features are channel-last in memory (the voxel
        samples adaptation fits on), several times faster there on a CPU than ``conv3d``."""
        channel_last = features.movedim(1, -1)
        if not channel_last.is_contiguous():
            return self.conv(features)
        weight = self.conv.weight.flatten(1)  # (1, C)
        return F.linear(channel_last, weight, self.conv.bias).movedim(-1, 1)


class ClassificationHead(nn.Module):
    """Class logits from the pooled embedding.

    Args:
        embedding_dim: backbone embedding length.
        num_classes: number of classes (>= 2).
    """

    def __init__(self, embedding_dim: int, num_classes: int) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2 for classification, got {num_classes}.")
        self.linear = nn.Linear(embedding_dim, num_classes)

    def forward(self, out: BackboneOutput) -> torch.Tensor:
        """Return logits of shape (B, num_classes) from the embedding (B, E)."""
        return self.linear(out.embedding)


class RegressionHead(nn.Module):
    """One or more real values from the pooled embedding.

    Args:
        embedding_dim: backbone embedding length.
        num_outputs: number of regressed values (>= 1).
    """

    def __init__(self, embedding_dim: int, num_outputs: int = 1) -> None:
        super().__init__()
        if num_outputs < 1:
            raise ValueError(f"num_outputs must be >= 1 for regression, got {num_outputs}.")
        self.linear = nn.Linear(embedding_dim, num_outputs)

    def forward(self, out: BackboneOutput) -> torch.Tensor:
        """Return values of shape (B, num_outputs) from the embedding (B, E)."""
        return self.linear(out.embedding)


def build_head(
    kind: str,
    feature_channels: int,
    embedding_dim: int,
    num_outputs: int | None = None,
    segmentation_head: str = "linear",
) -> nn.Module:
    """Build the head for a task kind.

    Args:
        kind: one of :data:`TASK_KINDS`.
        feature_channels: channels of the backbone's voxel features (segmentation).
        embedding_dim: length of the backbone's embedding (classification, regression).
        num_outputs: classes for classification (required), values for regression (default 1); must be
            ``None`` or 1 for segmentation.
        segmentation_head: one of :data:`SEGMENTATION_HEADS` (segmentation only).

    Raises:
        ValueError: for an unknown kind or head, or an invalid ``num_outputs``.
    """
    kind = look_up_option(kind, TASK_KINDS)
    if kind == "segmentation":
        if num_outputs not in (None, 1):
            raise ValueError(
                f"segmentation heads have one output (a binary mask), got num_outputs={num_outputs}."
            )
        return SegmentationHead(feature_channels, segmentation_head)
    if kind == "classification":
        if num_outputs is None:
            raise ValueError("classification heads need num_outputs (the number of classes).")
        return ClassificationHead(embedding_dim, num_outputs)
    return RegressionHead(embedding_dim, 1 if num_outputs is None else num_outputs)
