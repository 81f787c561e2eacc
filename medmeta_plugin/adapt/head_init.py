"""Closed-form initialisation of a task head from the support set's backbone features.

A randomly initialised head makes the first adaptation steps spend themselves on finding the structure at
all. Initialising it from the support features instead gives a working model at step 0, which is what
makes one labelled scan enough:

- segmentation: a linear discriminant between the mean foreground and mean background feature
  (the prototype classifier of Snell et al. 2017, written as a 1x1x1 convolution);
- classification: class prototypes of the embeddings, as the linear form of the squared-distance classifier;
- regression: ridge regression of the targets on the embeddings.

The functions are differentiable in the features, so meta-training can back-propagate through them.
"""

from __future__ import annotations

import torch

from medmeta_plugin.networks.backbone import BackboneOutput

__all__ = [
    "PROTOTYPE_MARGIN",
    "classification_head_init",
    "init_head",
    "regression_head_init",
    "segmentation_head_init",
]

# Logit at the foreground prototype is +MARGIN/2 and at the background prototype -MARGIN/2: sigmoid(+-4)
# = 0.98 / 0.02, confident but with gradients still alive for the fine-tuning steps that follow.
PROTOTYPE_MARGIN = 8.0


def segmentation_head_init(features: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias of a 1x1x1 convolution that separates the foreground and background prototypes.

    Args:
        features: backbone voxel features, shape (B, C, X, Y, Z).
        mask: binary foreground masks, shape (B, 1, X, Y, Z).

    Returns:
        ``weight`` (1, C, 1, 1, 1) and ``bias`` (1,). With no foreground voxel at all the head predicts
        background everywhere.
    """
    m = mask.to(features.dtype)
    fg_count = m.sum()
    bg_count = (1 - m).sum()
    channels = features.shape[1]
    if fg_count < 1 or bg_count < 1:
        weight = features.new_zeros(1, channels, 1, 1, 1)
        sign = -1.0 if fg_count < 1 else 1.0
        return weight, features.new_full((1,), sign * PROTOTYPE_MARGIN / 2)
    mu_fg = (features * m).sum(dim=(0, 2, 3, 4)) / fg_count
    mu_bg = (features * (1 - m)).sum(dim=(0, 2, 3, 4)) / bg_count
    diff = mu_fg - mu_bg
    w = PROTOTYPE_MARGIN * diff / (diff.square().sum() + 1e-6)
    b = -(w * (mu_fg + mu_bg) / 2).sum()
    return w.view(1, channels, 1, 1, 1), b.view(1)


def classification_head_init(
    embedding: torch.Tensor, labels: torch.Tensor, num_classes: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Linear head equivalent to nearest-prototype classification of the embeddings.

    ``-||e - mu_c||^2 / tau`` expands to ``(2 mu_c . e - ||mu_c||^2) / tau`` plus a term equal for all
    classes; ``tau`` is the support embeddings' mean squared norm. Classes absent from the support set
    get a zero weight and a bias below every seen class, so they are predicted only once fine-tuning has
    evidence for them.

    Args:
        embedding: embeddings, shape (B, E).
        labels: class indices, shape (B,).
        num_classes: N.

    Returns:
        ``weight`` (N, E) and ``bias`` (N,).
    """
    labels = labels.long().view(-1)
    onehot = torch.nn.functional.one_hot(labels, num_classes).to(embedding.dtype)  # (B, N)
    counts = onehot.sum(0)
    protos = (onehot.T @ embedding) / counts.clamp(min=1).unsqueeze(1)  # (N, E)
    seen = counts > 0
    # The embeddings' mean squared norm keeps logits O(1) whatever their scale, also for a query far from
    # every prototype (a spread-based scale vanishes with one case per class, and logits then explode).
    tau = embedding.square().sum(1).mean().clamp(min=1e-3)
    weight = torch.where(seen.unsqueeze(1), 2 * protos / tau, torch.zeros_like(protos))
    bias = -protos.square().sum(1) / tau
    floor = bias[seen].min() - 1.0
    bias = torch.where(seen, bias, floor.expand_as(bias))
    return weight, bias


def regression_head_init(
    embedding: torch.Tensor, values: torch.Tensor, ridge: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Ridge regression of the targets on the (centred) embeddings.

    Args:
        embedding: embeddings, shape (B, E).
        values: targets, shape (B, V) or (B,).
        ridge: L2 penalty; with one support case the weight is zero and the bias is the target.

    Returns:
        ``weight`` (V, E) and ``bias`` (V,).
    """
    y = values.to(embedding.dtype).view(embedding.shape[0], -1)
    e_mean = embedding.mean(0, keepdim=True)
    y_mean = y.mean(0, keepdim=True)
    e = embedding - e_mean
    # Dual form (B x B system): the support set is a handful of cases, the embedding has hundreds of dims.
    gram = e @ e.T + ridge * torch.eye(e.shape[0], dtype=e.dtype, device=e.device)
    alpha = torch.linalg.solve(gram, y - y_mean)  # (B, V)
    weight = (e.T @ alpha).T  # (V, E)
    bias = (y_mean - e_mean @ weight.T).view(-1)
    return weight, bias


def init_head(
    kind: str, base: BackboneOutput, targets: torch.Tensor, num_outputs: int
) -> dict[str, torch.Tensor]:
    """Closed-form head parameters ``{"weight", "bias"}`` for a task kind (differentiable in ``base``).

    Args:
        kind: ``segmentation``, ``classification`` or ``regression``.
        base: backbone output of the support batch (features (k, C, X, Y, Z), embedding (k, E)).
        targets: masks (k, 1, X, Y, Z), class indices (k,) or values (k, V).
        num_outputs: classes (classification); unused otherwise.

    Raises:
        ValueError: for another ``kind``.
    """
    if kind == "segmentation":
        w, b = segmentation_head_init(base.features, targets)
    elif kind == "classification":
        w, b = classification_head_init(base.embedding, targets, num_outputs)
    elif kind == "regression":
        w, b = regression_head_init(base.embedding, targets)
    else:
        raise ValueError(f"kind must be segmentation, classification or regression, got {kind!r}.")
    return {"weight": w, "bias": b}
