"""The adaptation-speed benchmark reports every mode, measured in one run."""

from __future__ import annotations

from pathlib import Path

import pytest
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


def test_adapt_speed_compares_precisions_side_by_side(tmp_path: Path) -> None:
    torch.manual_seed(0)
    path = save_backbone(Backbone3D(BackboneConfig(features=(8, 16), norm="group", groups=4)), tmp_path / "b")
    result = adapt_speed(
        str(path), 1, 24, ("head", "lora"), 1, AdaptBudget(steps=1), "cpu", precisions=("fp32", "bf16")
    )
    rows = {(r["mode"], r["precision"]): r for r in result["rows"]}
    assert set(rows) == {("head", "fp32"), ("head", "bf16"), ("lora", "fp32"), ("lora", "bf16")}
    assert [r["bf16"] for r in result["rows"]] == [False, True, False, True]
    assert rows["lora", "fp32"]["ratio_to_fp32"] == 1.0 and rows["head", "bf16"]["ratio_to_head"] == 1.0
    ratio = rows["lora", "bf16"]["seconds"] / rows["lora", "fp32"]["seconds"]
    assert rows["lora", "bf16"]["ratio_to_fp32"] == pytest.approx(ratio)


def test_adapt_speed_refuses_an_unknown_precision(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="fp32"):
        adapt_speed(str(tmp_path / "none.safetensors"), precisions=("fp16",))
