"""Episodes: seeded, support and query disjoint, patches of the right shape, crops on and off structures."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from medmeta_plugin.episodes import (
    META_TRAIN_FAMILIES,
    AugmentConfig,
    Case,
    EpisodeConfig,
    EpisodeSampler,
    TaskRegistry,
    stack_items,
    synthetic_registry,
)
from medmeta_plugin.transforms import PreprocessConfig
from tests.episodes.conftest import cube_registry, cube_volumes

PATCH = (16, 16, 16)


def _config(**kwargs) -> EpisodeConfig:
    kwargs.setdefault("preprocess", PreprocessConfig(patch_size=kwargs.pop("patch_size", PATCH)))
    return EpisodeConfig(**kwargs)


@functools.lru_cache(maxsize=1)
def _synthetic() -> TaskRegistry:
    """Six families in 16 phantoms of 24^3 (each family in 5-7 cases) plus the two volume-level tasks."""
    return synthetic_registry(META_TRAIN_FAMILIES[::6], n_cases=16, seed=5, shape=(24, 24, 24))


def _tensors(episode) -> list[torch.Tensor]:
    return [it[k] for it in episode.support + episode.query for k in ("image", "label", "target") if k in it]


def test_same_seed_gives_identical_episodes_and_another_seed_does_not() -> None:
    config = _config(task_sampling="by_kind")
    first = list(EpisodeSampler(_synthetic(), config, seed=11).iter_episodes(6))
    second = list(EpisodeSampler(_synthetic(), config, seed=11).iter_episodes(6))
    for a, b in zip(first, second):
        assert a.task.name == b.task.name
        assert [it["case_id"] for it in a.support + a.query] == [it["case_id"] for it in b.support + b.query]
        for x, y in zip(_tensors(a), _tensors(b)):
            torch.testing.assert_close(x, y, rtol=0, atol=0)
    other = list(EpisodeSampler(_synthetic(), config, seed=12).iter_episodes(6))
    assert any(
        a.task.name != b.task.name or not all(torch.equal(x, y) for x, y in zip(_tensors(a), _tensors(b)))
        for a, b in zip(first, other)
    )


def test_episodes_do_not_depend_on_what_the_cache_holds() -> None:
    config = _config(cache_size=1)
    small_cache = list(EpisodeSampler(_synthetic(), config, seed=3).iter_episodes(4))
    large_cache = list(EpisodeSampler(_synthetic(), _config(cache_size=64), seed=3).iter_episodes(4))
    for a, b in zip(small_cache, large_cache):
        assert all(torch.equal(x, y) for x, y in zip(_tensors(a), _tensors(b)))


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32), k=st.integers(1, 3), q=st.integers(1, 2), by_kind=st.booleans())
def test_support_and_query_never_share_a_case(seed: int, k: int, q: int, by_kind: bool) -> None:
    config = _config(k_support=k, q_query=q, augment=False, task_sampling="by_kind" if by_kind else "uniform")
    sampler = EpisodeSampler(_synthetic(), config, seed=seed)
    for episode in sampler.iter_episodes(3):
        support = {it["case_id"] for it in episode.support}
        query = {it["case_id"] for it in episode.query}
        assert len(support) == k and len(query) == q and not support & query
        assert support | query <= {c.uid for c in episode.task.cases}


@pytest.mark.parametrize(
    ("task", "patch"),
    [
        ("synth_sphere_bright", (16, 16, 16)),
        ("synth_tube_bright_thin", (12, 20, 8)),
        ("synth_cluster_dark_speckled", (32, 32, 32)),  # larger than the 24^3 volume: padded
        ("synth_structure_count", (16, 16, 16)),
        ("synth_total_volume_ml", (12, 20, 8)),
    ],
)
def test_items_have_the_patch_shape_and_kind_specific_fields(task: str, patch: tuple[int, int, int]) -> None:
    episode = EpisodeSampler(_synthetic(), _config(patch_size=patch), seed=0).sample(task)
    assert episode.task.name == task
    for item in episode.support + episode.query:
        assert item["image"].shape == (1, *patch) and item["image"].dtype == torch.float32
        assert torch.isfinite(item["image"]).all()
        if episode.task.kind == "segmentation":
            assert item["label"].shape == (1, *patch) and item["label"].dtype == torch.float32
            assert set(item["label"].unique().tolist()) <= {0.0, 1.0}
        else:
            dtype = torch.int64 if episode.task.kind == "classification" else torch.float32
            assert item["target"].shape == () and item["target"].dtype == dtype and item["crop"] == "whole"
            case = next(c for c in episode.task.cases if c.uid == item["case_id"])
            assert item["target"].item() == pytest.approx(episode.task.target(case))
    batch = stack_items(episode.support)
    assert batch["image"].shape == (3, 1, *patch) and len(batch["case_id"]) == 3


@pytest.mark.parametrize(
    ("pos_fraction", "crop", "centre_value"), [(1.0, "positive", 1.0), (0.0, "negative", 0.0)]
)
def test_crops_are_centred_on_or_off_the_structure(
    pos_fraction: float, crop: str, centre_value: float
) -> None:
    sampler = EpisodeSampler(cube_registry(), _config(pos_fraction=pos_fraction, augment=False), seed=1)
    for episode in (sampler.sample("cube") for _ in range(5)):
        for item in episode.support + episode.query:
            assert item["crop"] == crop
            # The centred cube lies well inside the volume, so the crop is not shifted at the borders.
            assert item["label"][0, 8, 8, 8].item() == centre_value


def test_label_is_the_binary_mask_of_the_task_structure() -> None:
    """The corner box (value 2) is its own task; the cube (value 1) must not leak into its mask."""
    sampler = EpisodeSampler(
        cube_registry(), _config(pos_fraction=1.0, augment=False, patch_size=(24,) * 3), seed=0
    )
    episode = sampler.sample("corner")
    for item in episode.support:
        _, label = cube_volumes(int(item["case_id"].removeprefix("cubes:cube")))
        torch.testing.assert_close(item["label"], torch.from_numpy((label == 2).astype(np.float32)))


def test_flips_are_shared_by_support_and_query() -> None:
    """With only flips on (p=1), every item is the un-augmented item flipped along all three axes."""
    flips_only = AugmentConfig(p_flip=1.0, p_affine=0, p_noise=0, p_scale_intensity=0, p_contrast=0, p_bias=0)
    plain = EpisodeSampler(cube_registry(), _config(augment=False), seed=4).sample("cube")
    flipped = EpisodeSampler(cube_registry(), _config(augmentation=flips_only), seed=4).sample("cube")
    for a, b in zip(plain.support + plain.query, flipped.support + flipped.query):
        for key in ("image", "label"):
            torch.testing.assert_close(b[key], a[key].flip(1, 2, 3))


def test_mixed_kinds_and_task_weights() -> None:
    sampler = EpisodeSampler(cube_registry(), _config(task_sampling="by_kind", augment=False), seed=0)
    kinds = {e.task.kind for e in sampler.iter_episodes(12)}
    assert kinds == {"segmentation", "classification", "regression"}
    weighted = EpisodeSampler(
        cube_registry(), _config(augment=False), seed=0, task_weights={"size": 1, "cube": 0}
    )
    assert {e.task.name for e in weighted.iter_episodes(5)} == {"size"}


def test_episodes_from_nifti_files(folder_dataset: Path, datalist_dataset: Path) -> None:
    """Real files go through medmeta_plugin.io; each dataset's own label value is binarised."""
    registry = TaskRegistry.from_folder(folder_dataset).merge(TaskRegistry.from_datalist(datalist_dataset))
    sampler = EpisodeSampler(
        registry, _config(k_support=2, q_query=2, pos_fraction=1.0), seed=0, task_weights={"kidney_left": 1}
    )
    episode = sampler.sample()
    assert episode.task.name == "kidney_left"
    assert {it["case_id"].split(":")[0] for it in episode.support + episode.query} == {"ct_set", "mr_set"}
    assert all(it["label"].sum() > 0 for it in episode.support + episode.query)


def _unlabelled_registry() -> TaskRegistry:
    case = Case("x", "d", structures={1: "cube"}, loader=lambda: (cube_volumes(0)[0], None))
    return TaskRegistry.from_cases(
        [case, Case("y", "d", structures={1: "cube"}, loader=lambda: cube_volumes(1))]
    )


INVALID = [
    pytest.param(lambda: _config(k_support=0), r"k_support must be a positive integer, got 0", id="k0"),
    pytest.param(lambda: _config(q_query=-1), r"q_query must be a positive integer, got -1", id="q-negative"),
    pytest.param(
        lambda: _config(k_support=True), r"k_support must be a positive integer, got True", id="k-bool"
    ),
    pytest.param(lambda: _config(pos_fraction=1.5), r"pos_fraction must be in \[0, 1\], got 1.5", id="pos"),
    pytest.param(lambda: _config(task_sampling="random"), r"unknown task_sampling 'random'", id="sampling"),
    pytest.param(lambda: _config(cache_size=0), r"cache_size must be a positive integer", id="cache"),
    pytest.param(
        lambda: AugmentConfig(p_noise=2.0), r"p_noise must be a probability in \[0, 1\], got 2.0", id="p"
    ),
    pytest.param(lambda: AugmentConfig(gamma=(0.0, 1.0)), r"gamma must be a range", id="gamma"),
    pytest.param(
        lambda: EpisodeSampler(cube_registry(4), _config(k_support=3, q_query=2)),
        r"k_support \+ q_query = 5 .* 'corner' \(4\), 'count' \(4\).*filter\(min_cases=5\)",
        id="too-few-cases",
    ),
    pytest.param(lambda: EpisodeSampler(TaskRegistry()), r"the registry holds no tasks", id="empty"),
    pytest.param(
        lambda: EpisodeSampler(cube_registry(), task_weights={"cub": 1.0}),
        r"Did you mean 'cube'",
        id="weight-name",
    ),
    pytest.param(
        lambda: EpisodeSampler(cube_registry(), task_weights={"cube": -1}),
        r"task_weights\['cube'\] must be a finite number >= 0, got -1",
        id="weight-negative",
    ),
    pytest.param(
        lambda: EpisodeSampler(cube_registry(), task_weights={"cube": 0}),
        r"no task a positive weight",
        id="zero",
    ),
    pytest.param(
        lambda: EpisodeSampler(cube_registry(4), _config(k_support=2, q_query=3), task_weights={"size": 1}),
        r"'size' \(4\)",
        id="weighted-task-too-small",
    ),
    pytest.param(
        lambda: EpisodeSampler(cube_registry()).sample("cubes"), r"'cubes' matches no task", id="unknown"
    ),
    pytest.param(lambda: EpisodeSampler(cube_registry()).iter_episodes(-1), r"n must be .* got -1", id="n"),
    pytest.param(
        lambda: EpisodeSampler(_unlabelled_registry(), _config(k_support=1, q_query=1, augment=False)).sample(
            "cube"
        ),
        r"has no label map",
        id="no-label",
    ),
]


@pytest.mark.parametrize(("make", "match"), INVALID)
def test_invalid_inputs_name_the_problem(make, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make()


def test_sampling_a_named_task_with_too_few_cases_names_it() -> None:
    tiny = [
        Case(f"t{i}", "tiny", structures={1: "tiny"}, loader=functools.partial(cube_volumes, i))
        for i in range(2)
    ]
    registry = cube_registry(6).merge(TaskRegistry.from_cases(tiny))
    sampler = EpisodeSampler(registry, _config(k_support=3, q_query=2), task_weights={"cube": 1.0})
    with pytest.raises(ValueError, match=r"task 'tiny' has 2 cases, fewer than k_support \+ q_query = 5"):
        sampler.sample("tiny")
