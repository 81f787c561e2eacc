"""Task heads on their own, beyond the position head's checks in ``test_position.py``.

- :func:`build_head` gives each kind its head, with the documented output shapes and parameter counts
  (``C + 1`` for ``linear``, ``(C + P) * H + 2 * H + 1`` more for ``position``), and refuses unknown kinds
  and heads and invalid output counts with a ``ValueError`` naming the value.
- Classification and regression heads are a linear map of the embedding and ignore the voxel features;
  the linear segmentation head ignores positions.
- A fresh position head still learns: its last layer gets a gradient; once it is non-zero the logits follow
  the position, per voxel, and positions of another dtype are read in the features' dtype.
"""

from __future__ import annotations

import pytest
import torch

from medmeta_plugin.networks.backbone import BackboneOutput
from medmeta_plugin.networks.heads import (
    DEFAULT_SEGMENTATION_HEAD,
    POSITION_HIDDEN,
    SEGMENTATION_HEADS,
    TASK_KINDS,
    ClassificationHead,
    RegressionHead,
    SegmentationHead,
    build_head,
)
from medmeta_plugin.networks.position import POSITION_CHANNELS

C, E, B, SPATIAL = 5, 7, 2, (4, 3, 2)


@pytest.fixture
def out() -> BackboneOutput:
    """A backbone output: features (B, C, 4, 3, 2), embedding (B, E) and positions (B, P, 4, 3, 2)."""
    gen = torch.Generator().manual_seed(0)
    return BackboneOutput(
        torch.randn(B, C, *SPATIAL, generator=gen),
        torch.randn(B, E, generator=gen),
        torch.randn(B, POSITION_CHANNELS, *SPATIAL, generator=gen),
    )


def _count(head: torch.nn.Module) -> int:
    return sum(p.numel() for p in head.parameters())


def _last_layer_nonzero(head: SegmentationHead) -> SegmentationHead:
    torch.manual_seed(1)
    torch.nn.init.normal_(head.mlp[2].weight)
    return head


def test_the_default_head_is_a_segmentation_head() -> None:
    assert DEFAULT_SEGMENTATION_HEAD in SEGMENTATION_HEADS
    assert TASK_KINDS == ("segmentation", "classification", "regression")


VALID = [
    # kind, num_outputs, segmentation_head, class, output shape, parameter count
    ("segmentation", None, "linear", SegmentationHead, (B, 1, *SPATIAL), C + 1),
    ("segmentation", 1, "linear", SegmentationHead, (B, 1, *SPATIAL), C + 1),
    (
        "segmentation",
        None,
        "position",
        SegmentationHead,
        (B, 1, *SPATIAL),
        C + 1 + (C + POSITION_CHANNELS) * POSITION_HIDDEN + 2 * POSITION_HIDDEN + 1,
    ),
    ("classification", 2, "linear", ClassificationHead, (B, 2), (E + 1) * 2),
    ("classification", 6, "position", ClassificationHead, (B, 6), (E + 1) * 6),  # the head kind is unused
    ("regression", None, "linear", RegressionHead, (B, 1), E + 1),
    ("regression", 3, "linear", RegressionHead, (B, 3), (E + 1) * 3),
]


@pytest.mark.parametrize(("kind", "outputs", "segmentation_head", "cls", "shape", "parameters"), VALID)
def test_build_head_gives_the_documented_head(
    out: BackboneOutput, kind, outputs, segmentation_head, cls, shape, parameters
) -> None:
    head = build_head(kind, C, E, outputs, segmentation_head)
    assert type(head) is cls
    assert head(out).shape == shape
    assert _count(head) == parameters
    if cls is SegmentationHead:
        assert head.kind == segmentation_head and (head.mlp is None) == (segmentation_head == "linear")


INVALID = [
    # kind, num_outputs, segmentation_head, message
    ("segmentation", 2, "linear", r"one output .*num_outputs=2"),
    ("segmentation", 0, "linear", r"num_outputs=0"),
    ("classification", None, "linear", r"need num_outputs"),
    ("classification", 1, "linear", r"num_classes must be >= 2 .*got 1"),
    ("regression", 0, "linear", r"num_outputs must be >= 1 .*got 0"),
    ("regression", -3, "linear", r"num_outputs must be >= 1 .*got -3"),
    ("detection", None, "linear", r"detection.*segmentation"),
    ("segmentation", None, "unet", r"unet.*linear"),
]


@pytest.mark.parametrize(("kind", "outputs", "segmentation_head", "match"), INVALID)
def test_build_head_refuses_bad_kinds_and_output_counts(kind, outputs, segmentation_head, match) -> None:
    with pytest.raises(ValueError, match=match):
        build_head(kind, C, E, outputs, segmentation_head)


@pytest.mark.parametrize(("kind", "outputs"), [("classification", 4), ("regression", 2)])
def test_volume_heads_are_a_linear_map_of_the_embedding_only(out: BackboneOutput, kind, outputs) -> None:
    head = build_head(kind, C, E, outputs)
    expected = out.embedding @ head.linear.weight.T + head.linear.bias
    torch.testing.assert_close(head(out), expected)
    other = BackboneOutput(torch.zeros(B, 1, 1, 1, 1), out.embedding)  # other features, no positions
    torch.testing.assert_close(head(other), expected)


def test_the_linear_segmentation_head_ignores_positions(out: BackboneOutput) -> None:
    head = SegmentationHead(C, "linear")
    with torch.no_grad():
        logits = head(out)
        torch.testing.assert_close(head(out._replace(position=None)), logits, rtol=0, atol=0)
        torch.testing.assert_close(head(out._replace(position=-out.position)), logits, rtol=0, atol=0)


def test_a_fresh_position_head_gets_a_gradient_in_its_last_layer(out: BackboneOutput) -> None:
    """The last layer starts at zero (the head equals the linear one), but not stuck there."""
    head = SegmentationHead(C, "position")
    head(out).square().sum().backward()
    assert head.mlp[2].weight.grad.abs().sum() > 0 and head.mlp[2].bias.grad.abs() > 0
    assert torch.all(head.mlp[0].weight.grad == 0), "nothing reaches the first layer through a zero layer"


def test_a_trained_position_head_follows_the_position_voxel_by_voxel(out: BackboneOutput) -> None:
    head = _last_layer_nonzero(SegmentationHead(C, "position"))
    with torch.no_grad():
        logits = head(out)
        moved = out.position.clone()
        moved[1, :, 2, 1, 0] += 3.0  # one voxel of one case moves in the body
        changed = head(out._replace(position=moved)) != logits
    assert changed[1, 0, 2, 1, 0]
    assert int(changed.sum()) == 1, "a voxel's logit reads that voxel's features and position only"


def test_positions_of_another_dtype_are_read_in_the_features_dtype(out: BackboneOutput) -> None:
    head = _last_layer_nonzero(SegmentationHead(C, "position"))
    with torch.no_grad():
        logits = head(out._replace(position=out.position.double()))
        assert logits.dtype == torch.float32
        torch.testing.assert_close(logits, head(out))
