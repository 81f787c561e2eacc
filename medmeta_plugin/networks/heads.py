"""Task heads: turn backbone features into a segmentation, classification or regression output."""

from __future__ import annotations

import torch
from monai.utils import look_up_option
from torch import nn

from medmeta_plugin.networks.backbone import BackboneOutput

__all__ = ["TASK_KINDS", "ClassificationHead", "RegressionHead", "SegmentationHead", "build_head"]

TASK_KINDS = ("segmentation", "classification", "regression")


class SegmentationHead(nn.Module):
    """Binary mask logits for one structure from the voxel features.

    Args:
        in_channels: backbone feature channels.
    """

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv3d(in_channels, 1, kernel_size=1)

    def forward(self, out: BackboneOutput) -> torch.Tensor:
        """Return logits of shape (B, 1, X, Y, Z) from features (B, C, X, Y, Z)."""
        return self.conv(out.features)


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
    kind: str, feature_channels: int, embedding_dim: int, num_outputs: int | None = None
) -> nn.Module:
    """Build the head for a task kind.

    Args:
        kind: one of :data:`TASK_KINDS`.
        feature_channels: channels of the backbone's voxel features (segmentation).
        embedding_dim: length of the backbone's embedding (classification, regression).
        num_outputs: classes for classification (required), values for regression (default 1); must be
            ``None`` or 1 for segmentation.

    Raises:
        ValueError: for an unknown kind or an invalid ``num_outputs``.
    """
    kind = look_up_option(kind, TASK_KINDS)
    if kind == "segmentation":
        if num_outputs not in (None, 1):
            raise ValueError(
                f"segmentation heads have one output (a binary mask), got num_outputs={num_outputs}."
            )
        return SegmentationHead(feature_channels)
    if kind == "classification":
        if num_outputs is None:
            raise ValueError("classification heads need num_outputs (the number of classes).")
        return ClassificationHead(embedding_dim, num_outputs)
    return RegressionHead(embedding_dim, 1 if num_outputs is None else num_outputs)
