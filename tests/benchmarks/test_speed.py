"""The adaptation-speed benchmark reports every mode, measured in one run."""

from __future__ import annotations

from pathlib import Path

import torch

from medmeta_plugin.adapt import AdaptBudget
from medmeta_plugin.benchmarks.speed import adapt_speed
from medmeta_plugin.networks import Backbone3D, BackboneConfig, save_backbone


def test_adapt_speed_reports_each_mode_with_ratios(tmp_path: Path) -> None:
    torch.manual_seed(0)
    path = save_backbone(Backbone3D(BackboneConfig(features=(8, 16), norm="group", groups=4)), tmp_path / "b")
    result = adapt_speed(
        str(path),
        shots=2,
        size=24,
        modes=("head", "film"),
        repeats=1,
        budget=AdaptBudget(steps=2),
        device="cpu",
    )
    rows = {r["mode"]: r for r in result["rows"]}
    assert set(rows) == {"head", "film"}
    assert rows["head"]["ratio_to_head"] == 1.0
    assert all(r["seconds"] > 0 and r["peak_mem_mb"] > 0 for r in rows.values())
    assert result["device"].startswith("cpu") and result["size"] == 24
