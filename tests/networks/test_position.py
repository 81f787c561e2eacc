"""Body-normalised positions and the segmentation head that reads them."""

from __future__ import annotations

import pytest
import torch

import medmeta_plugin.networks.heads as heads
from medmeta_plugin.adapt import AdaptBudget, adapt
from medmeta_plugin.networks import BackboneOutput, MetaModel, load_adapter, save_adapter
from medmeta_plugin.networks.heads import SegmentationHead
from medmeta_plugin.networks.objectives import task_score
from medmeta_plugin.networks.position import POSITION_CHANNELS, body_position


def _body(shape: tuple[int, int, int], box: tuple[slice, slice, slice]) -> torch.Tensor:
    image = torch.zeros(1, 1, *shape)
    image[(0, 0, *box)] = 1.0
    return image


def test_the_body_box_maps_to_minus_one_plus_one() -> None:
    image = _body((20, 16, 8), (slice(4, 15), slice(2, 12), slice(0, 8)))
    pos = body_position(image)
    assert pos.shape == (1, POSITION_CHANNELS, 20, 16, 8)
    assert pos[0, 0, 4, 0, 0] == pytest.approx(-1) and pos[0, 0, 14, 0, 0] == pytest.approx(1)
    assert pos[0, 1, 0, 2, 0] == pytest.approx(-1) and pos[0, 1, 0, 11, 0] == pytest.approx(1)
    # Axis 0's coordinate does not depend on the other axes.
    assert torch.equal(pos[0, 0, :, 0, 0], pos[0, 0, :, 9, 5])


def test_positions_follow_the_body_not_the_grid() -> None:
    """The same body shifted within a larger field of view gets the same coordinates on the body."""
    small = _body((24, 24, 4), (slice(4, 20), slice(4, 20), slice(0, 4)))
    shifted = _body((40, 30, 4), (slice(10, 26), slice(12, 28), slice(0, 4)))
    a, b = body_position(small), body_position(shifted)
    torch.testing.assert_close(a[0, :, 4:20, 4:20], b[0, :, 10:26, 12:28])


def test_a_constant_image_uses_the_whole_grid_and_bad_shapes_raise() -> None:
    pos = body_position(torch.full((2, 1, 9, 5, 3), 7.0))
    assert pos[1, 0, 0, 0, 0] == -1 and pos[1, 0, 8, 0, 0] == 1 and pos[1, 1, 0, 4, 0] == 1
    with pytest.raises(ValueError, match=r"\(B, C, X, Y, Z\)"):
        body_position(torch.zeros(1, 9, 5, 3))


def test_a_fresh_position_head_equals_the_linear_head() -> None:
    torch.manual_seed(0)
    linear, position = SegmentationHead(4, "linear"), SegmentationHead(4, "position")
    position.conv.load_state_dict(linear.conv.state_dict())
    out = BackboneOutput(
        torch.randn(2, 4, 6, 6, 6), torch.randn(2, 8), torch.randn(2, POSITION_CHANNELS, 6, 6, 6)
    )
    torch.testing.assert_close(position(out), linear(out))
    with pytest.raises(ValueError, match="position"):
        position(out._replace(position=None))
    with pytest.raises(ValueError, match="linear"):
        SegmentationHead(4, "mlp")


def test_large_volumes_pass_the_mlp_in_slabs_with_the_same_result(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    head = SegmentationHead(3, "position")
    torch.nn.init.normal_(head.mlp[2].weight)
    out = BackboneOutput(torch.randn(1, 3, 10, 4, 4), torch.zeros(1, 4), torch.randn(1, 2, 10, 4, 4))
    whole = head(out).detach()
    monkeypatch.setattr(heads, "_SLAB_VOXELS", 40)  # 2.5 x-slices per slab
    with torch.no_grad():
        torch.testing.assert_close(head(out), whole)


@pytest.mark.parametrize("kind", ["linear", "position"])
def test_channel_last_features_give_the_same_logits_and_gradients(kind: str) -> None:
    """Adaptation keeps features channel-last so heads run as matmuls; the answer must not depend on it."""
    torch.manual_seed(0)
    head = SegmentationHead(5, kind)
    if head.mlp is not None:
        torch.nn.init.normal_(head.mlp[2].weight)
    features, position = torch.randn(2, 5, 6, 4, 3), torch.randn(2, POSITION_CHANNELS, 6, 4, 3)
    results = []
    for layout in (torch.contiguous_format, torch.channels_last_3d):
        head.zero_grad()
        out = BackboneOutput(
            features.contiguous(memory_format=layout),
            torch.zeros(2, 4),
            position.contiguous(memory_format=layout),
        )
        logits = head(out)
        logits.square().sum().backward()
        results.append((logits.detach(), [p.grad.clone() for p in head.parameters()]))
    (plain, plain_grads), (last, last_grads) = results
    with torch.no_grad():  # the head's definition: a 1x1x1 convolution (+ an MLP of features and position)
        reference = head.conv(features)
        if head.mlp is not None:
            reference += head.mlp(torch.cat([features, position], 1).movedim(1, -1)).movedim(-1, 1)
    torch.testing.assert_close(plain, reference)
    torch.testing.assert_close(last, plain)
    for a, b in zip(last_grads, plain_grads):
        torch.testing.assert_close(a, b)


def test_take_of_consecutive_cases_is_a_view_and_of_others_a_copy() -> None:
    out = BackboneOutput(torch.randn(4, 2, 3, 3, 3), torch.randn(4, 5), torch.randn(4, 3, 3, 3, 3))
    view, copy = out.take([1, 2]), out.take([0, 2])
    assert view.features.data_ptr() == out.features[1].data_ptr()
    torch.testing.assert_close(view.features, out.features[1:3])
    torch.testing.assert_close(view.position, out.position[1:3])
    torch.testing.assert_close(copy.features, out.features[[0, 2]])
    torch.testing.assert_close(copy.embedding, out.embedding[[0, 2]])


def test_channel_last_output_keeps_shapes_and_values_and_copies_only_once() -> None:
    out = BackboneOutput(torch.randn(2, 3, 4, 5, 6), torch.randn(2, 5), torch.randn(2, 3, 4, 5, 6))
    last = out.channel_last()
    layout = torch.channels_last_3d
    assert last.features.is_contiguous(memory_format=layout)
    assert last.position.is_contiguous(memory_format=layout)
    torch.testing.assert_close(last.features, out.features)
    torch.testing.assert_close(last.position, out.position)
    again = last.channel_last()
    assert again.features.data_ptr() == last.features.data_ptr()
    assert BackboneOutput(out.features, out.embedding).channel_last().position is None


def _mirror_cases(n: int, seed: int, size: int = 16) -> list[dict[str, torch.Tensor]]:
    """Two identical bright blobs, left and right of the body centre; only the left one is labelled."""
    gen = torch.Generator().manual_seed(seed)
    cases = []
    for _ in range(n):
        image = 0.1 * torch.randn(1, size, size, size, generator=gen) + 1.0
        image[:, :, :, :2] = 0.0  # a little background, so the body box is not the whole grid
        y, z = (int(v) for v in torch.randint(3, size - 7, (2,), generator=gen))
        label = torch.zeros(1, size, size, size)
        image[:, 2:6, y : y + 4, z : z + 4] += 2.0
        image[:, size - 6 : size - 2, y : y + 4, z : z + 4] += 2.0
        label[:, 2:6, y : y + 4, z : z + 4] = 1.0
        cases.append({"image": image, "label": label})
    return cases


def _intensity_features(model: MetaModel, cases: list[dict[str, torch.Tensor]]) -> BackboneOutput:
    """The image itself as every feature channel: appearance as perfect as it gets, positions from it."""
    images = torch.stack([c["image"] for c in cases])
    channels = model.backbone.feature_channels
    embedding = torch.zeros(len(cases), model.backbone.embedding_dim)
    return BackboneOutput(images.expand(-1, channels, -1, -1, -1).clone(), embedding, body_position(images))


def test_the_position_head_tells_mirror_image_structures_apart(tiny_model: MetaModel) -> None:
    """The reason the head exists: appearance alone cannot say which of two identical blobs is labelled.

    With the intensity as the feature, the linear head marks both blobs (Dice 2/3 at best); the position
    head learns that the labelled one is on the left, on query scans with the blobs elsewhere in-plane.
    """
    support, query = _mirror_cases(1, seed=0), _mirror_cases(3, seed=1)
    masks = torch.stack([q["label"] for q in query])
    budget = AdaptBudget(steps=30, lr=0.05)
    scores = {}
    for head in ("linear", "position"):
        features = _intensity_features(tiny_model, support)
        task, _ = adapt(tiny_model, support, "segmentation", "head", budget, head=head, features=features)
        with torch.no_grad():
            logits = task.head(_intensity_features(tiny_model, query))
        scores[head] = task_score("segmentation", logits, masks)
    assert scores["linear"] < 0.7 and scores["position"] > 0.95, scores


def test_the_head_kind_survives_save_and_load(tiny_model: MetaModel, tmp_path) -> None:
    task, _ = adapt(
        tiny_model, _mirror_cases(1, 0), "segmentation", "head", AdaptBudget(steps=3), head="position"
    )
    tiny_model.attach(task)
    path = save_adapter(tiny_model, "adapted", tmp_path)
    loaded = load_adapter(MetaModel(tiny_model.backbone), path)
    assert loaded.info.head == "position"
    image = _mirror_cases(1, 5)[0]["image"][None]
    model = MetaModel(tiny_model.backbone)
    model.attach(loaded)
    with torch.no_grad():
        torch.testing.assert_close(model(image, "adapted"), tiny_model(image, "adapted"))
