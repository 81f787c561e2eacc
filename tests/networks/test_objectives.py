"""Losses and scores: the weighted segmentation loss and its contract with the unweighted one."""

from __future__ import annotations

import pytest
import torch

from medmeta_plugin.networks.objectives import task_loss, weighted_segmentation_loss


def _volume(seed: int, fg: float) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    mask = (torch.rand(2, 1, 24, 24, 24, generator=gen) < fg).float()
    logits = torch.randn(2, 1, 24, 24, 24, generator=gen) + 2.0 * mask - 1.0
    return logits, mask


@pytest.mark.parametrize("fg", [0.0, 0.01, 0.3])
def test_unit_weights_give_the_unweighted_loss(fg: float) -> None:
    logits, mask = _volume(0, fg)
    expected = task_loss("segmentation", logits, mask)
    torch.testing.assert_close(task_loss("segmentation", logits, mask, torch.ones(1)), expected)
    # The weights' scale is irrelevant: Dice is a ratio and cross-entropy a weighted mean.
    torch.testing.assert_close(weighted_segmentation_loss(logits, mask, torch.full((1,), 7.0)), expected)


def test_stratified_weights_estimate_the_whole_volume_loss() -> None:
    logits, mask = _volume(1, 0.01)
    whole = float(task_loss("segmentation", logits, mask))
    flat_logits, flat_mask = logits.reshape(-1), mask.reshape(-1)
    fg, bg = torch.nonzero(flat_mask).view(-1), torch.nonzero(1 - flat_mask).view(-1)
    gen = torch.Generator().manual_seed(2)
    pick_bg = bg[torch.randperm(len(bg), generator=gen)[:4000]]
    index = torch.cat([fg, pick_bg])
    weight = torch.cat([torch.ones(len(fg)), torch.full((len(pick_bg),), len(bg) / len(pick_bg))])
    sample_logits, sample_mask = (
        flat_logits[index].view(1, 1, -1, 1, 1),
        flat_mask[index].view(1, 1, -1, 1, 1),
    )
    weighted = float(weighted_segmentation_loss(sample_logits, sample_mask, weight.view(1, 1, -1, 1, 1)))
    unweighted = float(task_loss("segmentation", sample_logits, sample_mask))
    assert abs(weighted - whole) < 0.02 * whole
    assert abs(unweighted - whole) > 5 * abs(weighted - whole), "without weights the sample is biased"


@pytest.mark.parametrize(
    ("kind", "output", "target"), [("classification", torch.zeros(2, 3), torch.zeros(2))]
)
def test_weight_is_for_segmentation_only(kind: str, output: torch.Tensor, target: torch.Tensor) -> None:
    with pytest.raises(ValueError, match="segmentation voxels only"):
        task_loss(kind, output, target, torch.ones(2))
