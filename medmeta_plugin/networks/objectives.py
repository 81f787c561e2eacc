"""Losses and scores per task kind, shared by meta-training, adaptation and the benchmarks.

Sharing them keeps the three from drifting: the quantity adaptation minimises is the one meta-training
taught the backbone to make easy, and the score benchmarks report is the one early stopping maximises.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss
from monai.utils import look_up_option

from medmeta_plugin.networks.heads import TASK_KINDS

__all__ = ["task_loss", "task_score", "weighted_segmentation_loss"]

# batch=True pools Dice over the batch, so a support case where the structure is absent (an empty mask)
# still gives a finite, meaningful loss instead of a 0/0 Dice.
_DICE_CE = DiceCELoss(sigmoid=True, batch=True)


def weighted_segmentation_loss(
    logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor
) -> torch.Tensor:
    """Dice + binary cross-entropy of weighted voxels, each standing for ``weight`` voxels of its volume.

    With the weights of a stratified voxel sample (sampled count over population count, per stratum) the
    Dice sums and the mean cross-entropy estimate those of the whole volumes; with unit weights this is
    ``task_loss("segmentation", ...)`` exactly (Dice pooled over the batch, the same 1e-5 smoothing as
    MONAI's ``DiceLoss``).

    Args:
        logits: (B, 1, X, Y, Z) (or any shape).
        target: binary mask, the shape of ``logits``.
        weight: non-negative voxel weights, broadcastable to ``logits``.

    Returns:
        Scalar loss.
    """
    target = target.to(logits.dtype)
    weight = weight.to(logits.dtype).expand_as(logits)
    prob = torch.sigmoid(logits)
    inter = (weight * prob * target).sum()
    denom = (weight * prob).sum() + (weight * target).sum()
    dice = 1 - (2 * inter + 1e-5) / (denom + 1e-5)
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    return dice + (weight * bce).sum() / weight.sum()


def task_loss(
    kind: str, output: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """Training loss of one task kind.

    Args:
        kind: ``segmentation`` (Dice + binary cross-entropy), ``classification`` (cross-entropy) or
            ``regression`` (mean squared error).
        output: model output: logits (B, 1, X, Y, Z), class logits (B, N) or values (B, V).
        target: binary mask (B, 1, X, Y, Z), class indices (B,) or values (B, V) / (B,).
        weight: segmentation only: voxel weights broadcastable to ``output`` (see
            :func:`weighted_segmentation_loss`); None weighs every voxel equally.

    Returns:
        Scalar loss.

    Raises:
        ValueError: if ``weight`` is given for a kind other than segmentation.
    """
    kind = look_up_option(kind, TASK_KINDS)
    if weight is not None and kind != "segmentation":
        raise ValueError(f"weight is for segmentation voxels only, got it for kind={kind!r}.")
    if kind == "segmentation":
        if weight is not None:
            return weighted_segmentation_loss(output, target, weight)
        return _DICE_CE(output, target.to(output.dtype))
    if kind == "classification":
        return F.cross_entropy(output, target.long().view(-1))
    return F.mse_loss(output, target.to(output.dtype).view(output.shape))


@torch.no_grad()
def task_score(kind: str, output: torch.Tensor, target: torch.Tensor) -> float:
    """Higher-is-better score of one task kind, averaged over the batch.

    Args:
        kind: task kind (see :func:`task_loss`).
        output: model output as for :func:`task_loss`.
        target: target as for :func:`task_loss`.

    Returns:
        Mean Dice of the thresholded mask (an empty prediction of an empty target scores 1), accuracy, or
        the negative mean absolute error.
    """
    kind = look_up_option(kind, TASK_KINDS)
    if kind == "segmentation":
        pred = output > 0
        truth = target > 0.5
        dims = tuple(range(1, pred.ndim))
        inter = (pred & truth).sum(dims).float()
        total = (pred.sum(dims) + truth.sum(dims)).float()
        dice = torch.where(total > 0, 2 * inter / total.clamp(min=1), torch.ones_like(total))
        return float(dice.mean())
    if kind == "classification":
        return float((output.argmax(dim=1) == target.long().view(-1)).float().mean())
    return float(-(output - target.to(output.dtype).view(output.shape)).abs().mean())
