"""simulate_carry: a mask moved, deformed, grown or dropped as a registration might carry it; shapes, range
and the size of the departure follow its config; bad arguments are refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medmeta_plugin.episodes.carried import CarryConfig, simulate_carry

STILL = CarryConfig(shift_mm=0.0, warp_mm=0.0, grow_mm=0.0, empty=0.0)
FULL = {"empty": 0.0, "varied": False}  # every draw at its full size


def _box() -> torch.Tensor:
    mask = torch.zeros(40, 36, 32)
    mask[12:28, 10:26, 8:24] = 1.0
    return mask


def _dice(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a >= 0.5, b >= 0.5
    return float(2 * (a & b).sum() / (a.sum() + b.sum()))


def test_without_any_departure_the_mask_comes_back_as_it_was() -> None:
    mask = _box()
    out = simulate_carry(mask, 3.0, np.random.default_rng(0), STILL)
    assert out.shape == mask.shape and out.dtype == torch.float32
    torch.testing.assert_close(out, mask, atol=1e-5, rtol=0)


def test_a_pure_shift_moves_the_mask_by_at_most_its_size() -> None:
    mask = _box()
    centre = mask.nonzero().float().mean(0)
    for seed in range(5):
        config = CarryConfig(shift_mm=9.0, warp_mm=0.0, grow_mm=0.0, **FULL)
        out = simulate_carry(mask, 3.0, np.random.default_rng(seed), config)
        moved = (out >= 0.5).nonzero().float().mean(0) - centre
        assert float(moved.abs().max()) <= 9.0 / 3.0 + 0.5, moved  # 3 voxels of 3 mm, plus rounding
        assert float(out.sum()) == pytest.approx(float(mask.sum()), rel=0.05), (
            "a shift inside the grid keeps the volume"
        )


@pytest.mark.parametrize("grow_mm, bigger", [(6.0, True), (-6.0, False)])
def test_growing_and_shrinking_change_the_volume_the_right_way(grow_mm: float, bigger: bool) -> None:
    mask = _box()
    changed = 0
    for seed in range(8):
        config = CarryConfig(shift_mm=0.0, warp_mm=0.0, grow_mm=abs(grow_mm), **FULL)
        rng = np.random.default_rng(seed)
        out = simulate_carry(mask, 3.0, rng, config)
        changed += int((out.sum() > mask.sum()) if bigger else (out.sum() < mask.sum()))
    assert changed >= 2, "some of 8 draws grow (or shrink) the mask"


def test_larger_departures_carry_worse_masks() -> None:
    mask = _box()
    small = CarryConfig(shift_mm=2.0, warp_mm=2.0, grow_mm=0.0, **FULL)
    large = CarryConfig(shift_mm=15.0, warp_mm=12.0, grow_mm=0.0, **FULL)
    d_small = np.mean(
        [_dice(simulate_carry(mask, 3.0, np.random.default_rng(s), small), mask) for s in range(6)]
    )
    d_large = np.mean(
        [_dice(simulate_carry(mask, 3.0, np.random.default_rng(s), large), mask) for s in range(6)]
    )
    assert d_small > 0.8 > d_large, (d_small, d_large)


def test_varied_draws_range_from_nearly_right_to_the_largest_departure() -> None:
    mask, config = _box(), CarryConfig(shift_mm=15.0, warp_mm=12.0, grow_mm=0.0, empty=0.0)
    dice = [_dice(simulate_carry(mask, 3.0, np.random.default_rng(s), config), mask) for s in range(24)]
    assert max(dice) > 0.85 and min(dice) < 0.6, dice


def test_empty_draws_carry_nothing_and_values_stay_in_range() -> None:
    mask, rng = _box(), np.random.default_rng(1)
    outs = [simulate_carry(mask, 3.0, rng, CarryConfig(empty=0.5)) for _ in range(20)]
    empty = sum(int(o.sum() == 0) for o in outs)
    assert 3 <= empty <= 17
    assert all(float(o.min()) >= 0.0 and float(o.max()) <= 1.0 for o in outs)
    assert all(float(o.sum()) == 0 for o in (simulate_carry(mask, 3.0, rng, CarryConfig(empty=1.0)),))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"shift_mm": -1.0}, "shift_mm must be >= 0"),
        ({"warp_mm": -1.0}, "warp_mm must be >= 0"),
        ({"grow_mm": -0.5}, "grow_mm must be >= 0"),
        ({"control_mm": 0.0}, "control_mm must be > 0"),
        ({"empty": 1.5}, r"empty must be in \[0, 1\]"),
    ],
)
def test_carry_config_rejects_bad_settings(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        CarryConfig(**kwargs)


def test_simulate_carry_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="mask must be 3D"):
        simulate_carry(torch.zeros(1, 8, 8, 8), 3.0, np.random.default_rng(0))
    with pytest.raises(ValueError, match="spacing_mm must be > 0"):
        simulate_carry(torch.zeros(8, 8, 8), 0.0, np.random.default_rng(0))
