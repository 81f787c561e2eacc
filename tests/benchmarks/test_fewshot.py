"""The few-shot benchmark on tiny backbones: same episodes for all methods, the results schema, the plot."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from medmeta_plugin.adapt import adapt
from medmeta_plugin.benchmarks import fewshot
from medmeta_plugin.benchmarks.fewshot import BenchmarkConfig, parse_methods, plot, run_benchmark, summarise
from medmeta_plugin.benchmarks.suites import SUITES, build_suite
from medmeta_plugin.episodes.splits import (
    ABDOMEN_DEV,
    ABDOMEN_HELDOUT,
    BRAIN_DEV,
    BRAIN_HELDOUT,
    HELDOUT_STRUCTURES,
    SYNTHETIC_HELDOUT_TASKS,
)
from medmeta_plugin.io import ImageMeta, read_image, write_image
from medmeta_plugin.networks import Backbone3D, BackboneConfig, load_backbone, save_backbone
from medmeta_plugin.paths import real_data_root

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


# Odd shapes, so padding to the size divisor matters; the CT is longer than the 64-voxel crops of old and
# has more voxels than HEAD_VOXELS (32768), so head mode draws its voxel sample from the whole volume.
CT_SHAPE, MR_SHAPE = (69, 35, 29), (33, 27, 11)


def _write_case(
    folder: Path,
    shape: tuple[int, int, int],
    seed: int,
    names: tuple[str, ...] = ("kidney_left", "gallbladder"),
) -> None:
    """A tiny scan with two structures (by default held-out abdominal ones: kidney_left 1, gallbladder 2) in
    a body: one elliptic cylinder along the third axis (28 x 22 voxels across) around them in every case, in
    air, so that two cases see the same body as two scans of one region do."""
    folder.mkdir(parents=True)
    label = np.zeros((1, *shape), np.uint8)
    x, y, z = (n // 2 for n in shape)
    label[0, x - 6 : x - 1, y - 4 : y + 4, max(z - 4, 0) : z + 4] = 1
    label[0, x + 2 : x + 6, y - 3 : y + 2, max(z - 3, 0) : z + 3] = 2
    i, j, _ = np.indices(shape)
    body = ((i - x) / 14) ** 2 + ((j - y) / 11) ** 2 <= 1
    rng = np.random.default_rng(seed)
    image = rng.normal(size=label.shape) - 4.0 * ~body + 2.0 * (label == 1) - 1.5 * (label == 2)
    meta = ImageMeta.from_affine(np.diag([3.0, 3.0, 3.0, 1.0]), shape)
    write_image(folder / "image.nii.gz", image.astype(np.float32), meta)
    write_image(folder / "label.nii.gz", label, meta)
    (folder / "labels.json").write_text(json.dumps({str(v): n for v, n in enumerate(names, start=1)}))


@pytest.fixture
def real_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "real"
    _write_case(root / "ct_abdomen_a", CT_SHAPE, seed=0)
    _write_case(root / "mr_abdomen_d", MR_SHAPE, seed=1)
    monkeypatch.setenv("MEDMETA_REAL_DATA", str(root))
    return root


def test_abdomen_suite_holds_whole_volumes_shared_by_its_tasks(real_root: Path) -> None:
    tasks = build_suite("abdomen-ct-to-mr")
    assert [t.name for t in tasks] == ["kidney_left", "gallbladder"]
    for t in tasks:
        assert all(tuple(it["image"].shape[1:]) == CT_SHAPE for it in t.support_pool)
        assert [tuple(q["label"].shape[1:]) for q in t.query] == [MR_SHAPE]
        assert float(t.query[0]["label"].sum()) > 0
        assert all(t.draw_support(k, seed=2)[0] is t.support_pool[0] for k in (1, 3)), "the real CT first"
    first, second = tasks
    assert all(a["image"] is b["image"] for a, b in zip(first.support_pool, second.support_pool))
    assert first.query[0]["image"] is second.query[0]["image"]
    assert not torch.equal(first.support_pool[0]["label"], second.support_pool[0]["label"])


def test_tumour_suite_transfers_between_the_two_patients(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """brain-tumour: the tumour from patient 1's scan to patient 2's and back; 1 shot is the patient's own
    scan, more shots add its deformed copies; the structure is held out of meta-training."""
    shapes = {1: (40, 36, 12), 2: (36, 40, 10)}
    for i, shape in shapes.items():
        _write_case(tmp_path / "real" / f"mr_brain_tumour_{i}", shape, seed=i, names=("tumour", "oedema"))
    monkeypatch.setenv("MEDMETA_REAL_DATA", str(tmp_path / "real"))
    tasks = build_suite("brain-tumour")
    assert [t.name for t in tasks] == ["tumour_1_to_2", "tumour_2_to_1"]
    assert "tumour" in HELDOUT_STRUCTURES
    for task, (src, dst) in zip(tasks, ((1, 2), (2, 1))):
        assert tuple(task.support_pool[0]["image"].shape[1:]) == shapes[src]
        assert [tuple(q["image"].shape[1:]) for q in task.query] == [shapes[dst]]
        assert all(task.draw_support(k, seed=3)[0] is task.support_pool[0] for k in (1, 3, 5))
        assert len({id(it["image"]) for it in task.draw_support(5, seed=3)}) == 5
        # The tumour (value 1: a 5x8x8 box), not the other structure (4x5x6), on both sides.
        assert float(task.support_pool[0]["label"].sum()) == float(task.query[0]["label"].sum()) == 5 * 8 * 8


def test_abdomen_benchmark_adapts_and_scores_on_whole_volumes(
    real_root: Path, backbones: tuple[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Component methods adapt on whole padded volumes; head mode is served by the app's pipeline."""
    seen: list[tuple[str, tuple[int, ...]]] = []

    def recording_adapt(model, support, kind, mode, budget, **kwargs):
        seen.extend((mode, tuple(s["image"].shape)) for s in support)
        return adapt(model, support, kind, mode, budget, **kwargs)

    monkeypatch.setattr(fewshot, "adapt", recording_adapt)
    config = BenchmarkConfig(
        suite="abdomen-ct-to-mr",
        shots=(1, 3),
        seeds=1,
        methods=("scratch", "meta+film", "meta+head"),
        meta_backbone=backbones[0],
        multitask_backbone=backbones[1],
        head_steps=2,
        steps=1,
        atlas="off",
    )
    records = run_benchmark(config, device="cpu")["records"]
    divisor = load_backbone(backbones[0]).size_divisor
    padded = tuple(-(-n // divisor) * divisor for n in CT_SHAPE)
    assert {shape for _, shape in seen} == {(1, *padded)}, "support cases are whole padded volumes"
    assert {mode for mode, _ in seen} == {"full", "film"}, "head mode is served, not adapted here"
    assert len(records) == 2 * 2 * 3 and all(0.0 <= r["value"] <= 1.0 for r in records)
    assert {r["method"] for r in records} == {"scratch", "meta+film", "meta+head"}
    assert all(r["adapt_seconds"] > 0 for r in records)


def test_atlas_method_and_fusion_on_a_real_suite(real_root: Path, backbones: tuple[str, str]) -> None:
    # The tiny "MR" moves 12 mm up in the world (the two scans' structures sit at their centres anyway).
    affine = np.diag([3.0, 3.0, 3.0, 1.0])
    affine[2, 3] = 12.0
    shifted = ImageMeta.from_affine(affine, MR_SHAPE)
    for name in ("image", "label"):
        path = real_root / "mr_abdomen_d" / f"{name}.nii.gz"
        array, _ = read_image(path)
        write_image(path, array.astype(np.uint8) if name == "label" else array, shifted)
    config = BenchmarkConfig(
        suite="abdomen-ct-to-mr",
        shots=(1,),
        seeds=1,
        methods=("scratch", "atlas", "meta+head"),
        meta_backbone=backbones[0],
        multitask_backbone=backbones[1],
        head_steps=2,
        steps=1,
        atlas="both",
    )
    records = run_benchmark(config, device="cpu")["records"]
    methods = {r["method"] for r in records}
    assert methods == {"scratch", "atlas", "meta+head", "meta+head+atlas"}, "scratch is never fused"
    atlas = {r["task"]: r for r in records if r["method"] == "atlas"}
    assert set(atlas) == {"kidney_left", "gallbladder"}
    assert all(r["adapt_seconds"] > 0 and r["metric"] == "dice" for r in atlas.values())
    assert atlas["kidney_left"]["value"] > 0.5, "registration finds the structure 12 mm away"
    # Phantom suites have no geometry: no atlas record.
    synthetic = BenchmarkConfig(
        suite="synthetic-heldout",
        shots=(1,),
        seeds=1,
        methods=("atlas",),
        tasks=TWO_TASKS["synthetic-heldout"],
        atlas="both",
    )
    assert run_benchmark(synthetic, device="cpu")["records"] == []


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


def test_bf16_benchmark_scores_as_float32_does(backbones: tuple[str, str]) -> None:
    """Every backbone pass of a run (features, adaptation, scoring) at ``precision="bf16"``: the same
    episodes score about the same, and the config says how they were run."""
    values = {}
    for precision in ("fp32", "bf16"):
        config = BenchmarkConfig(
            suite="synthetic-heldout",
            shots=(1,),
            seeds=1,
            methods=("meta+head", "meta+film"),
            meta_backbone=backbones[0],
            head_steps=4,
            steps=2,
            tasks=("synth_crescent_bright",),
            precision=precision,
        )
        results = run_benchmark(config, device="cpu")
        assert results["config"]["precision"] == precision
        values[precision] = {r["method"]: r["value"] for r in results["records"]}
    assert values["bf16"].keys() == values["fp32"].keys() == {"meta+head", "meta+film"}
    for method, value in values["fp32"].items():
        assert values["bf16"][method] == pytest.approx(value, abs=0.05), method


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
        (lambda: BenchmarkConfig(suite="synthetic-heldout", atlas="yes"), "both"),
        (lambda: BenchmarkConfig(suite="synthetic-heldout", precision="fp16"), "bf16"),
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
    ("suite", "names"),
    [
        ("abdomen-ct-to-mr", ABDOMEN_HELDOUT),
        ("brain-heldout", BRAIN_HELDOUT),
        ("abdomen-ct-to-mr-dev", ABDOMEN_DEV),
        ("brain-dev", BRAIN_DEV),
        ("brain-tumour", ("tumour_1_to_2", "tumour_2_to_1")),
    ],
)
def test_real_suites_evaluate_their_held_out_structures(suite: str, names: tuple[str, ...]) -> None:
    tasks = build_suite(suite)
    assert {t.name for t in tasks} == set(names)
    for t in tasks:
        assert all(float(q["label"].sum()) > 0 for q in t.query), f"{t.name}: empty query label"


def test_development_structures_are_not_held_out() -> None:
    assert not set(ABDOMEN_DEV + BRAIN_DEV) & HELDOUT_STRUCTURES


def test_every_suite_has_a_default_plan_of_the_apps_methods() -> None:
    """Without --full a suite runs its plan: real suites the app's own pipeline (``atlas``, and with the
    in-context refiner ``incontext``) only, unfused."""
    assert set(fewshot.DEFAULT_PLANS) == set(SUITES)
    for suite, plan in fewshot.DEFAULT_PLANS.items():
        assert set(plan.methods) <= set(fewshot.METHODS) and plan.seeds >= 1 and plan.shots
        if suite.startswith(("abdomen", "brain")):
            assert plan.methods == ("atlas", "incontext") and plan.atlas == "off", suite
        assert "seeds 2-3" in fewshot.skipped_by_default(suite)
    assert fewshot.FULL_PLAN.methods == fewshot.METHODS and fewshot.FULL_PLAN.atlas == "both"


def test_benchmark_command_prints_its_plan_and_wall_time(
    backbones: tuple[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch
) -> None:
    from medmeta_plugin.cli.main import main

    plan = fewshot.DefaultPlan(("meta+head",), shots=(1,))
    monkeypatch.setitem(fewshot.DEFAULT_PLANS, "synthetic-heldout", plan)
    argv = [
        "benchmark",
        "fewshot",
        "--suite",
        "synthetic-heldout",
        "--tasks",
        TWO_TASKS["synthetic-heldout"][0],
    ]
    argv += ["--meta-backbone", backbones[0], "--head-steps", "2", "--out", str(tmp_path / "r.json")]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "default plan of synthetic-heldout" in out and "--full adds: methods scratch" in out
    assert "wall time:" in out
    results = json.loads((tmp_path / "r.json").read_text())
    assert results["wall_seconds"] > 0 and {r["method"] for r in results["records"]} == {"meta+head"}


def test_a_phantom_suites_skipped_work_names_no_atlas() -> None:
    assert "atlas" not in fewshot.skipped_by_default("synthetic-heldout")
    assert "+atlas" in fewshot.skipped_by_default("brain-heldout")
