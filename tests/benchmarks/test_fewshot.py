"""The few-shot benchmark on tiny backbones: same episodes for all methods, the results schema, the plot."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from medmeta_plugin.benchmarks.fewshot import BenchmarkConfig, parse_methods, plot, run_benchmark, summarise
from medmeta_plugin.benchmarks.splits import ABDOMEN_HELDOUT, BRAIN_HELDOUT, SYNTHETIC_HELDOUT_TASKS
from medmeta_plugin.benchmarks.suites import build_suite, real_data_root
from medmeta_plugin.networks import Backbone3D, BackboneConfig, save_backbone

TWO_TASKS = {
    "synthetic-heldout": SYNTHETIC_HELDOUT_TASKS[:2],
    "synthetic-classification": ("contains_crescent_bright", "contains_cone_dark"),
    "synthetic-regression": ("volume_ml_crescent_bright", "volume_ml_cone_dark"),
}
RECORD_KEYS = {"method", "task", "kind", "shots", "seed", "metric", "value", "adapt_seconds", "peak_mem_mb"}


@pytest.fixture
def backbones(tmp_path: Path) -> tuple[str, str]:
    config = BackboneConfig(features=(8, 16), norm="group", groups=4)
    torch.manual_seed(0)
    meta = save_backbone(Backbone3D(config), tmp_path / "meta")
    multitask = save_backbone(Backbone3D(config), tmp_path / "multitask")
    return str(meta), str(multitask)


@pytest.mark.parametrize(
    ("suite", "kind", "metric"),
    [
        ("synthetic-heldout", "segmentation", "dice"),
        ("synthetic-classification", "classification", "accuracy"),
        ("synthetic-regression", "regression", "mae_ml"),
    ],
)
def test_benchmark_records_every_method_on_the_same_episodes(
    backbones: tuple[str, str], tmp_path: Path, suite: str, kind: str, metric: str
) -> None:
    methods = ("scratch", "meta+head", "multitask+film")
    config = BenchmarkConfig(
        suite=suite,
        shots=(1,),
        seeds=1,
        methods=methods,
        meta_backbone=backbones[0],
        multitask_backbone=backbones[1],
        head_steps=2,
        steps=1,
        tasks=tuple(TWO_TASKS[suite]),
    )
    results = run_benchmark(config, device="cpu")
    assert results["suite"] == suite and results["device"].startswith("cpu")
    records = results["records"]
    assert records and all(set(r) == RECORD_KEYS for r in records)
    assert all(r["kind"] == kind and r["metric"] == metric for r in records)
    tasks = {r["task"] for r in records}
    for method in methods:
        assert {r["task"] for r in records if r["method"] == method} == tasks
    assert tasks == set(TWO_TASKS[suite])
    if suite == "synthetic-heldout":
        assert all(0.0 <= r["value"] <= 1.0 for r in records)
    table = summarise(results)
    assert all(m in table for m in methods)
    png = plot(results, tmp_path / "curve.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_synthetic_suite_covers_every_held_out_family() -> None:
    assert {t.name for t in build_suite("synthetic-heldout")} == set(SYNTHETIC_HELDOUT_TASKS)


def test_support_draws_are_seeded_and_distinct() -> None:
    task = build_suite("synthetic-heldout")[0]
    a, b = task.draw_support(3, seed=1), task.draw_support(3, seed=1)
    assert all(x is y for x, y in zip(a, b))
    assert len({id(x) for x in a}) == 3
    assert not {id(x) for x in a} & {id(q) for q in task.query}, "support and query never overlap"


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: build_suite("synthetic-heldot"), "synthetic-heldout"),
        (lambda: parse_methods(["meta+lorra"]), "meta\\+lora"),
        (
            lambda: run_benchmark(BenchmarkConfig(suite="synthetic-heldout", methods=("nope",))),
            "unknown methods",
        ),
        (
            lambda: run_benchmark(
                BenchmarkConfig(
                    suite="synthetic-heldout", methods=("scratch",), tasks=("synth_sphere_bright",)
                )
            ),
            "no tasks",
        ),
    ],
)
def test_invalid_benchmark_input(call, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.slow
@pytest.mark.skipif(not real_data_root().is_dir(), reason="needs ../shared/data/real")
@pytest.mark.parametrize(
    ("suite", "names"), [("abdomen-ct-to-mr", ABDOMEN_HELDOUT), ("brain-heldout", BRAIN_HELDOUT)]
)
def test_real_suites_evaluate_their_held_out_structures(suite: str, names: tuple[str, ...]) -> None:
    tasks = build_suite(suite)
    assert {t.name for t in tasks} == set(names)
    for t in tasks:
        assert all(float(q["label"].sum()) > 0 for q in t.query), f"{t.name}: empty query label"
