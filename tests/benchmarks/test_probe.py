"""The feature probe: one backbone's weights probed at several feature level counts, on a tiny suite task."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from medmeta_plugin.benchmarks.probe import _fit_ceiling, _fit_pool, run_probe, summarise_probe
from medmeta_plugin.networks import Backbone3D, BackboneConfig, save_backbone


def test_ceiling_separates_separable_voxels_and_not_noise() -> None:
    torch.manual_seed(0)
    y = (torch.rand(6000) < 0.05).float()
    separable = torch.randn(6000, 4) + 4.0 * y[:, None]
    noise = torch.randn(6000, 4)
    for head in ("linear", "mlp"):
        assert _fit_ceiling(separable, y, steps=100, seed=0, head=head) > 0.95
        # Noise: an MLP can memorise a little, but far from separating.
        assert _fit_ceiling(noise, y, steps=100, seed=0, head=head) < 0.5
    with pytest.raises(ValueError, match="foreground and background"):
        _fit_ceiling(noise, torch.zeros(6000), steps=1, seed=0)


def test_pool_head_is_scored_on_other_volumes_with_its_own_threshold() -> None:
    """Features that separate within the pool but flip on the query volumes: the ceiling sees the query
    and stays high, the pool figure (fitted on other volumes) collapses."""
    torch.manual_seed(0)
    y = (torch.rand(6000) < 0.05).float()
    pool = torch.randn(6000, 4) + 4.0 * y[:, None]
    flipped = torch.randn(6000, 4) - 4.0 * y[:, None]
    assert _fit_pool(pool, y, [(pool, y)], steps=100, seed=0, head="linear") > 0.95
    assert _fit_pool(pool, y, [(flipped, y)], steps=100, seed=0, head="linear") < 0.1
    assert _fit_ceiling(flipped, y, steps=100, seed=0, head="linear") > 0.95


def test_probe_runs_every_level_count_on_the_same_weights(tmp_path: Path) -> None:
    torch.manual_seed(0)
    path = save_backbone(
        Backbone3D(BackboneConfig(features=(4, 8, 16), norm="group", groups=4)), tmp_path / "b"
    )
    results = run_probe("synthetic-heldout", str(path), levels=(1, 2), steps=5, tasks=["synth_cone_dark"])
    assert [(r["task"], r["levels"], r["channels"]) for r in results["records"]] == [
        ("synth_cone_dark", 1, 4),
        ("synth_cone_dark", 2, 12),
    ]
    assert all(0.0 <= r[k] <= 1.0 for r in results["records"] for k in ("pool", "ceiling"))
    assert results["pool_cases"] == {"synth_cone_dark": 8}
    table = summarise_probe(results)
    assert "2 level(s), 12 ch: pool / ceiling" in table and "synth_cone_dark" in table
    with pytest.raises(ValueError, match="feature_levels"):
        run_probe("synthetic-heldout", str(path), levels=(3,), steps=1)
    with pytest.raises(ValueError, match="unknown probe head"):
        run_probe("synthetic-heldout", str(path), levels=(1,), steps=1, head="deep")
    with pytest.raises(ValueError, match="unknown tasks"):
        run_probe("synthetic-heldout", str(path), levels=(1,), steps=1, tasks=["synth_nope"])
