"""The atlas prior: carried masks of the support scans placed sure, their log-odds, and fusion with a head."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medmeta_plugin.adapt.atlas import (
    HEAD_LIMIT,
    PRIOR_MM_PER_LOGIT,
    AtlasCase,
    CarriedPrior,
    RegistrationCache,
    atlas_prior,
    fuse,
    prior_logits,
)
from medmeta_plugin.registration import Placement, Registration, register, signed_distance_mm
from tests.registration.conftest import dice, make_phantom, moved


def _placement(sure: bool, confidence: float) -> Placement:
    return Placement(
        np.eye(4),
        score=2.0,
        margin=1.0,
        overlap=0.8,
        gradients=0.6,
        outline=0.9,
        confidence=confidence,
        sure=sure,
        seconds=0.1,
    )


def _scripted(outcomes: list[tuple[bool, float] | None]):
    """A ``register`` whose outcome for support case ``i`` (the scan filled with ``i``) is ``outcomes[i]``:
    (sure, confidence) of an identity registration, or None for a registration that fails. Its calls are
    counted in ``.calls``."""

    def fake(fixed, fixed_affine, moving, moving_affine):
        i = int(moving[0, 0, 0])
        fake.calls.append(i)
        if outcomes[i] is None:
            raise ValueError("placement found no relative position where the two scans' bodies overlap")
        sure, confidence = outcomes[i]
        return Registration(np.eye(4), -0.5, 1.5, "affine", None, _placement(sure, confidence))

    fake.calls = []
    return fake


def _slab_cases(n: int) -> list[AtlasCase]:
    """``n`` support cases on a 16^3 grid, case ``i`` marking the slab z = 2i .. 2i + 3."""
    cases = []
    for i in range(n):
        mask = np.zeros((16, 16, 16), np.float32)
        mask[4:12, 4:12, 2 * i : 2 * i + 4] = 1.0
        cases.append(AtlasCase(f"support-{i}", np.full((16, 16, 16), float(i), np.float32), np.eye(4), mask))
    return cases


@pytest.mark.parametrize(
    ("outcomes", "used"),
    [
        ([(True, 0.9)], [0]),
        ([(True, 0.9), (False, 0.2)], [0]),  # the unsure one is left out
        ([(False, 0.3), (True, 0.7), (True, 0.95)], [1, 2]),
        ([(True, 0.8), None], [0]),  # a support scan that cannot be placed does not stop the others
        ([(False, 0.2)], []),  # no case sure: no prior
        ([(False, 0.2), None], []),
    ],
)
def test_only_cases_placed_sure_are_carried(outcomes: list, used: list[int]) -> None:
    cases = _slab_cases(len(outcomes))
    result = atlas_prior(
        "query", np.zeros((16, 16, 16)), np.eye(4), cases, RegistrationCache(_scripted(outcomes))
    )
    assert isinstance(result, CarriedPrior) and len(result.cases) == len(cases)
    assert [c.key for c in result.cases] == [c.key for c in cases]
    assert [i for i, c in enumerate(result.cases) if c.used] == used and result.used == len(used)
    for record, outcome in zip(result.cases, outcomes):
        if outcome is None:
            assert not record.sure and record.confidence is None and "overlap" in record.error
        else:
            assert (record.sure, record.confidence, record.transform) == (*outcome, "affine")
            assert record.seconds == 1.5 and record.error is None
    confidences = [o[1] for o in outcomes if o is not None]
    assert result.sure == len(used) and result.confidence == max(confidences)
    if not used:
        assert result.prior is None
    else:  # exactly the sure cases' masks, nothing of the unsure ones
        union = np.max([cases[i].mask for i in used], axis=0) > 0
        kept = result.prior >= 0.5
        assert kept.any() and not (kept & ~union).any()
        if len(used) == 1:
            np.testing.assert_allclose(result.prior, cases[used[0]].mask, atol=1e-6)


def test_with_carry_images_each_used_case_s_scan_is_carried_like_its_mask() -> None:
    cases = _slab_cases(3)
    cache = RegistrationCache(_scripted([(True, 0.9), (False, 0.2), (True, 0.8)]))
    query = np.zeros((16, 16, 16))
    carried = atlas_prior("query", query, np.eye(4), cases, cache, carry_images=True)
    assert len(carried.images) == 2  # the two sure cases, in order; identity registrations
    for image, i in zip(carried.images, (0, 2)):
        np.testing.assert_allclose(image, cases[i].image, atol=1e-5)
    assert atlas_prior("query", query, np.eye(4), cases, cache).images == ()
    # Another structure labelled on the same scans: their scans are carried once per pair, not again.
    again = atlas_prior("query", query, np.eye(4), cases, cache, carry_images=True)
    assert all(a is b for a, b in zip(again.images, carried.images))
    other = atlas_prior("other query", query, np.eye(4), cases, cache, carry_images=True)
    assert not any(a is b for a, b in zip(other.images, carried.images))


def test_without_require_sure_every_registered_case_is_carried() -> None:
    cases = _slab_cases(2)
    cache = RegistrationCache(_scripted([(False, 0.2), (True, 0.9)]))
    every = atlas_prior("query", np.zeros((16, 16, 16)), np.eye(4), cases, cache, require_sure=False)
    assert [c.used for c in every.cases] == [True, True] and every.sure == 1
    assert every.prior[8, 8, 0] > 0  # the unsure case's slab is in


def test_a_failed_registration_is_remembered_not_retried() -> None:
    fake = _scripted([None, (True, 0.9)])
    cache = RegistrationCache(fake)
    cases = _slab_cases(2)
    for _ in range(3):
        result = atlas_prior("query", np.zeros((16, 16, 16)), np.eye(4), cases, cache)
        assert result.used == 1 and result.cases[0].error is not None
    assert fake.calls == [0, 1]  # one attempt per pair of scans, failed or not
    assert cache.failure("query", "support-0") is not None and cache.peek("query", "support-0") is None
    assert cache.failure("query", "support-1") is None and cache.peek("query", "support-1") is not None


@pytest.fixture(scope="module")
def phantom() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return make_phantom()


def test_atlas_prior_caches_each_pair_once(phantom: tuple[np.ndarray, ...]) -> None:
    image, mask, affine = phantom
    moving_affine = moved(image.shape, affine, (4.0, 0.0, -6.0))
    calls = []

    def counting(*args, **kwargs):
        calls.append(1)
        return register(*args, **kwargs)

    cache = RegistrationCache(counting)
    case = AtlasCase("support", image[::-1].copy(), moving_affine, mask[::-1].copy())
    first = atlas_prior("query", image, affine, [case], cache)
    second = atlas_prior("query", image, affine, [case, case], cache)
    assert len(calls) == 1
    assert first.cases[0].sure and first.cases[0].used and first.cases[0].transform in ("rigid", "affine")
    assert first.prior.shape == image.shape and first.prior.min() >= 0 and first.prior.max() <= 1
    np.testing.assert_allclose(first.prior, second.prior, atol=1e-6)
    assert dice(first.prior > 0.5, mask > 0.5) > 0.8


def _ball(radius: float) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """A ball prior on a 1 mm grid: probabilities, distance log-odds and the grid's affine."""
    grid = np.stack(np.meshgrid(*[np.arange(40)] * 3, indexing="ij"), -1)
    prior = (np.linalg.norm(grid - 20, axis=-1) < radius).astype(np.float32)
    affine = np.eye(4)
    return torch.from_numpy(prior), torch.from_numpy(prior_logits(prior, affine)), affine


def test_prior_log_odds_follow_the_distance_to_the_carried_boundary() -> None:
    prior, logits, affine = _ball(10.0)
    distance = signed_distance_mm(prior.numpy() > 0.5, affine)
    assert distance[20, 20, 20] < -8 and distance[20, 20, 36] > 5
    assert logits[20, 20, 20] > HEAD_LIMIT  # deep inside, the position outvotes the head
    assert logits[20, 20, 39] < -HEAD_LIMIT  # far outside too
    assert abs(logits[20, 20, 30]) <= 1.0 / PRIOR_MM_PER_LOGIT + 1e-6  # at the boundary, the head decides


def test_fuse_lets_a_nearly_agreeing_head_move_the_boundary_and_the_position_rule_far_from_it() -> None:
    prior, distance, _ = _ball(10.0)
    grid = np.stack(np.meshgrid(*[np.arange(40)] * 3, indexing="ij"), -1)
    inside = torch.from_numpy(np.linalg.norm(grid - 20, axis=-1) < 11.0)
    head = torch.where(inside, 40.0, -40.0)  # agrees at Dice 0.86 but puts the boundary 1 mm further out
    head[2, 20, 20] = 40.0  # and marks a voxel far outside
    fused = fuse(head, prior, distance)
    assert prior[20, 20, 30] < 0.5 and fused[20, 20, 30] > 0  # the head's boundary is kept
    assert fused[20, 20, 20] > 0 and fused[2, 20, 20] < 0  # far outside: the position rules the head out


def test_fuse_gives_a_half_agreeing_head_no_say() -> None:
    # Measured on real structures no benchmark evaluates: such heads made the carried masks worse.
    prior, distance, _ = _ball(10.0)
    head = torch.full(prior.shape, -40.0)
    head[8:33, 8:33, 8:33] = 40.0  # a 25 mm cube around a 10 mm ball: Dice 0.42 with the prior
    fused = fuse(head, prior, distance)
    assert torch.equal(fused > 0, prior > 0.5)


def test_fuse_falls_back_to_the_prior_when_the_head_does_not_recognise_the_structure() -> None:
    prior, distance, _ = _ball(6.0)  # 1.4% of the grid: a head marking everything overlaps it by Dice 0.03
    for head in (torch.full(prior.shape, -40.0), torch.full(prior.shape, 40.0)):  # nothing, or everything
        fused = fuse(head, prior, distance)
        assert torch.equal(fused > 0, prior > 0.5)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: AtlasCase("a", np.zeros((4, 4, 4)), np.eye(4), np.zeros((4, 4, 5))), "one shape"),
        (lambda: AtlasCase("a", np.zeros((4, 4)), np.eye(4), np.zeros((4, 4))), "3D arrays"),
        (lambda: atlas_prior("q", np.zeros((4, 4, 4)), np.eye(4), []), "at least one"),
        (lambda: fuse(torch.zeros(2), torch.zeros(2), torch.zeros(3)), "one shape"),
    ],
)
def test_atlas_inputs_are_checked(call, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        call()


def test_several_carried_masks_keep_a_thin_structure_s_volume() -> None:
    # Three one-voxel ribbons, each shifted by a voxel: a majority vote would leave almost nothing.
    image = np.zeros((16, 16, 16), np.float32)
    masks = []
    for shift in range(3):
        mask = np.zeros_like(image)
        mask[4:12, 4:12, 6 + shift] = 1.0
        masks.append(mask)
    identity = RegistrationCache(lambda *args: Registration(np.eye(4), 0.0, 0.0))
    cases = [AtlasCase(f"support-{i}", image, np.eye(4), m) for i, m in enumerate(masks)]
    prior = atlas_prior("query", image, np.eye(4), cases, identity).prior
    union = np.max(masks, axis=0) > 0
    assert (np.mean(masks, axis=0) >= 0.5).sum() == 0, "a majority vote loses the ribbon"
    kept = prior >= 0.5
    assert kept.sum() >= 64 and not (kept & ~union).any()  # at least one ribbon's volume, all of it carried
