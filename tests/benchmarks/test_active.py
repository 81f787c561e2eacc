"""The active-learning benchmark on a tiny backbone and small phantoms."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from medmeta_plugin.benchmarks.active import STRATEGIES, plot_active, run_active_benchmark, summarise_active
from medmeta_plugin.episodes import HELDOUT_FAMILIES
from medmeta_plugin.networks import Backbone3D, save_backbone
from tests.conftest import TINY


def test_every_strategy_runs_the_same_rounds(tmp_path: Path) -> None:
    torch.manual_seed(0)
    backbone = save_backbone(Backbone3D(TINY), tmp_path / "tiny.safetensors")
    results = run_active_benchmark(
        rounds=2,
        pool=3,
        seeds=1,
        families=HELDOUT_FAMILIES[:1],
        backbone=backbone,
        steps=3,
        shape=(32, 32, 32),
    )
    records = results["records"]
    assert {r["strategy"] for r in records} == set(STRATEGIES)
    for strategy in STRATEGIES:
        assert sorted(r["labelled"] for r in records if r["strategy"] == strategy) == [1, 2]
    # Same first label for every strategy: identical Dice after one labelled scan.
    first = {r["dice"] for r in records if r["labelled"] == 1}
    assert len(first) == 1 and 0.0 <= first.pop() <= 1.0
    assert "Dice @ 2 labelled" in summarise_active(results)
    assert plot_active(results, tmp_path / "active.png").stat().st_size > 0


def test_invalid_rounds_are_refused() -> None:
    with pytest.raises(ValueError, match="pool > rounds"):
        run_active_benchmark(rounds=3, pool=3)
