"""The in-context refiner: its forward, the box it runs on, its saved form."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from medmeta_plugin.networks import Refiner, load_backbone, load_refiner, refine_prior, save_refiner
from medmeta_plugin.networks.refiner import (
    KEEP_SIMILARITY,
    MIN_BOX,
    REFINER_MARGIN_MM,
    _box,
    carried_similarity,
    keeps_carried,
    refiner_box,
)


@pytest.fixture
def refiner() -> Refiner:
    torch.manual_seed(0)
    return Refiner((4, 8)).eval()


def test_forward_gives_one_logit_map_per_image(refiner: Refiner) -> None:
    image, carried = torch.randn(2, 1, 16, 8, 12), torch.rand(2, 1, 16, 8, 12)
    assert refiner(image, carried).shape == (2, 1, 16, 8, 12)
    assert refiner.divisor == 2


def test_the_box_covers_the_prior_and_its_margin_within_the_scan() -> None:
    prior = torch.zeros(120, 100, 30)
    prior[50:60, 40:45, 10:20] = 1.0
    box = _box(prior, (8, 8, 8), 8)
    for axis, (lo, hi) in enumerate([(50, 60), (40, 45), (10, 20)]):
        s, size = box[axis], prior.shape[axis]
        assert 0 <= s.start <= max(lo - 8, 0) and min(hi + 8, size) <= s.stop <= size
    assert box[0].stop - box[0].start == MIN_BOX and box[1].stop - box[1].start == MIN_BOX
    assert box[2] == slice(0, 30), "a thin scan: the whole of its axis"


def test_the_box_of_a_large_prior_is_a_multiple_of_the_divisor() -> None:
    prior = torch.zeros(200, 60, 60)
    prior[20:150, 5:50, 5:50] = 0.6
    box = _box(prior, (8, 8, 8), 8)
    assert (box[0].stop - box[0].start) % 8 == 0 and box[0].start <= 12 and box[0].stop >= 158
    assert box[1] == slice(0, 60) and box[2] == slice(0, 60)


def test_refine_prior_answers_on_the_box(refiner: Refiner) -> None:
    image = torch.randn(60, 50, 20)
    prior = torch.zeros(60, 50, 20)
    prior[20:30, 20:30, 5:10] = 1.0
    logits, box = refine_prior(refiner, image, prior, (3.0, 3.0, 3.0))
    assert logits.shape == image[box].shape and logits.dtype == torch.float32
    assert REFINER_MARGIN_MM / 3.0 == 8  # the margin in voxels the box test above uses
    blind, same = refine_prior(refiner, image, prior, (3.0, 3.0, 3.0), blind=True)
    assert same == box and not torch.equal(blind, logits), "the carried channel reaches the output"


def test_carried_similarity_is_the_mean_correlation_on_the_refiner_box() -> None:
    torch.manual_seed(0)
    image, prior = torch.randn(100, 20, 20), torch.zeros(100, 20, 20)
    prior[10:14, 5:15, 5:15] = 1.0
    spacing = (3.0, 3.0, 3.0)
    box = refiner_box(prior, spacing, 8)
    assert box[0].stop <= 60  # far from x = 90
    assert carried_similarity(image, (), prior, spacing, 8) is None
    assert carried_similarity(image, (image,), torch.zeros_like(prior), spacing, 8) is None, "nothing carried"
    assert carried_similarity(image, (3.0 * image + 1.0,), prior, spacing, 8) == pytest.approx(1.0, abs=1e-5)
    assert carried_similarity(image, (-image,), prior, spacing, 8) == pytest.approx(-1.0, abs=1e-5)
    outside = image.clone()
    outside[90] = 100.0  # outside the box: not compared
    assert carried_similarity(image, (outside, -image), prior, spacing, 8) == pytest.approx(0.0, abs=1e-5)


def test_the_carried_mask_is_kept_from_the_rescan_threshold_up() -> None:
    assert keeps_carried(KEEP_SIMILARITY) and keeps_carried(0.99)
    assert not keeps_carried(KEEP_SIMILARITY - 1e-6) and not keeps_carried(-0.2) and not keeps_carried(None)


def test_the_refiner_box_is_the_one_refine_prior_answers_on(refiner: Refiner) -> None:
    image, prior = torch.randn(60, 50, 20), torch.zeros(60, 50, 20)
    prior[20:30, 20:30, 5:10] = 1.0
    _, box = refine_prior(refiner, image, prior, (3.0, 3.0, 3.0))
    assert refiner_box(prior, (3.0, 3.0, 3.0), refiner.divisor) == box


def test_refine_prior_is_independent_of_the_scan_s_intensity_scale(refiner: Refiner) -> None:
    image, prior = torch.randn(24, 24, 24), torch.zeros(24, 24, 24)
    prior[8:16, 8:16, 8:16] = 1.0
    a, _ = refine_prior(refiner, image, prior, (3.0, 3.0, 3.0))
    b, _ = refine_prior(refiner, 100.0 * image + 7.0, prior, (3.0, 3.0, 3.0))
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "image, prior, match",
    [
        (torch.zeros(8, 8, 8), torch.zeros(8, 8, 8), "empty"),
        (torch.zeros(8, 8, 8), torch.ones(8, 8, 4), "one shape"),
        (torch.zeros(1, 8, 8, 8), torch.ones(1, 8, 8, 8), r"\(X, Y, Z\)"),
    ],
)
def test_refine_prior_rejects_bad_input(refiner: Refiner, image, prior, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        refine_prior(refiner, image, prior, (3.0, 3.0, 3.0))


def test_a_saved_refiner_loads_with_its_weights_and_record(refiner: Refiner, tmp_path: Path) -> None:
    with torch.no_grad():
        for p in refiner.parameters():
            p.add_(0.1)
    path = save_refiner(refiner, tmp_path / "refiner", {"command": "medmeta benchmark incontext --save x"})
    assert path.suffix == ".safetensors"
    meta = json.loads(path.with_suffix(".json").read_text())
    assert meta["format"] == "medmeta-refiner" and meta["features"] == [4, 8] and "command" in meta
    loaded = load_refiner(path.with_suffix(".json"))
    assert not loaded.training
    for (name, a), (_, b) in zip(refiner.state_dict().items(), loaded.state_dict().items()):
        torch.testing.assert_close(a, b, msg=name)


def test_a_refiner_file_is_not_a_backbone_and_a_tampered_one_is_refused(
    refiner: Refiner, tmp_path: Path
) -> None:
    path = save_refiner(refiner, tmp_path / "refiner")
    with pytest.raises(ValueError, match="expected format 'medmeta-backbone'"):
        load_backbone(path)
    path.write_bytes(path.read_bytes()[:-4] + b"0000")
    with pytest.raises(ValueError, match="checksum"):
        load_refiner(path)
