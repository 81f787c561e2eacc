"""Synthetic phantoms: enough families, a clean train/held-out split, seeded cases, correct targets."""

from __future__ import annotations

import numpy as np
import pytest

from medmeta_plugin.episodes import (
    FAMILIES,
    HELDOUT_FAMILIES,
    META_TRAIN_FAMILIES,
    SYNTHETIC_TARGETS,
    FamilySpec,
    make_case,
    synthetic_registry,
)
from medmeta_plugin.episodes.families import FAMILIES_BY_NAME
from medmeta_plugin.episodes.primitives import SHAPES, TEXTURES

NAMES = [f.name for f in FAMILIES]


def test_at_least_40_families_split_into_disjoint_train_and_heldout() -> None:
    assert len(FAMILIES) >= 40 and len(set(NAMES)) == len(NAMES)
    assert set(META_TRAIN_FAMILIES).isdisjoint(HELDOUT_FAMILIES)
    assert set(META_TRAIN_FAMILIES) | set(HELDOUT_FAMILIES) == set(NAMES)
    assert len(HELDOUT_FAMILIES) >= 8


def test_heldout_families_differ_from_every_training_family() -> None:
    """Same world (same primitives and ranges), but no held-out family copies a training recipe."""
    train = {FAMILIES_BY_NAME[n].signature for n in META_TRAIN_FAMILIES}
    assert all(FAMILIES_BY_NAME[n].signature not in train for n in HELDOUT_FAMILIES)
    train_shapes = {FAMILIES_BY_NAME[n].shape for n in META_TRAIN_FAMILIES}
    assert {FAMILIES_BY_NAME[n].shape for n in HELDOUT_FAMILIES} - train_shapes  # some unseen shapes too


def test_families_use_every_primitive_and_texture() -> None:
    assert {f.shape for f in FAMILIES} == set(SHAPES)
    assert {f.texture for f in FAMILIES} == set(TEXTURES)


@pytest.mark.parametrize("name", NAMES)
def test_every_family_is_visible_next_to_another(name: str) -> None:
    other = NAMES[(NAMES.index(name) + 7) % len(NAMES)]
    case = make_case([other, name], seed=NAMES.index(name))
    counts = np.bincount(case.label.ravel(), minlength=3)
    assert counts[1] >= 8 and counts[2] >= 8
    assert case.label_names == {1: other, 2: name}


@pytest.mark.parametrize("seed", range(6))
def test_cases_of_four_structures_hold_every_label(seed: int) -> None:
    rng = np.random.default_rng(seed)
    families = [str(f) for f in rng.choice(NAMES, size=4, replace=False)]
    case = make_case(families, seed=seed, shape=(40, 36, 32))
    assert case.image.shape == (1, 40, 36, 32) and case.image.dtype == np.float32
    assert case.label.shape == (1, 40, 36, 32) and case.label.dtype == np.int16
    assert set(np.unique(case.label)) == {0, 1, 2, 3, 4}
    assert np.isfinite(case.image).all()


def test_same_seed_same_case_and_different_seed_different_case() -> None:
    families = ["sphere_bright", "tube_dark_noisy", "torus_bright"]
    a, b, c = make_case(families, seed=3), make_case(families, seed=3), make_case(families, seed=4)
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.label, b.label)
    assert a.spacing == b.spacing and a.targets == b.targets
    assert not np.array_equal(a.label, c.label) and not np.array_equal(a.image, c.image)


def test_targets_are_count_class_and_labelled_volume_in_ml() -> None:
    for seed, families in enumerate([["shell_bright"], ["cone_dark", "plate_bright", "helix_bright"]]):
        case = make_case(families, seed=seed)
        voxels = int((case.label > 0).sum())
        assert case.targets["synth_total_volume_ml"] == pytest.approx(voxels * np.prod(case.spacing) / 1000.0)
        assert case.targets["synth_structure_count"] == len(families) - 1
        for name, value in case.targets.items():
            SYNTHETIC_TARGETS[name].check_target(value, "test")


def test_spacing_is_anisotropic_in_some_cases() -> None:
    ratios = [s[2] / s[0] for s in (make_case(["sphere_bright"], seed=i).spacing for i in range(12))]
    assert min(ratios) == pytest.approx(1.0) and max(ratios) > 1.3


def test_registry_has_a_task_per_family_and_the_volume_tasks() -> None:
    families = META_TRAIN_FAMILIES[:6]
    registry = synthetic_registry(families, n_cases=12, seed=0, shape=(24, 24, 24))
    assert set(registry.names("segmentation")) == {f"synth_{f}" for f in families}
    assert set(registry.names()) - set(registry.names("segmentation")) == set(SYNTHETIC_TARGETS)
    counts = [len(registry.get(f"synth_{f}").cases) for f in families]
    assert sum(counts) >= 24 and max(counts) - min(counts) <= 2  # dealt from decks: balanced
    task = registry.get(f"synth_{families[0]}")
    case = task.cases[0]
    image, label = case.loader()
    assert image.shape == (1, 24, 24, 24) and (label == task.label_values[case.uid]).sum() >= 8
    again = synthetic_registry(families, n_cases=12, seed=0, shape=(24, 24, 24))
    assert [c.targets for c in again.get("synth_total_volume_ml").cases] == [
        c.targets for c in registry.get("synth_total_volume_ml").cases
    ]


INVALID_CASES = [
    pytest.param(
        lambda: make_case(["sphere_brigt"], 0),
        r"unknown family 'sphere_brigt'. Did you mean 'sphere_bright'",
        id="unknown-family",
    ),
    pytest.param(lambda: make_case(["torus_bright", "torus_bright"], 0), r"distinct", id="repeated"),
    pytest.param(lambda: make_case(NAMES[:5], 0), r"1 to 4 family names", id="five"),
    pytest.param(lambda: make_case([], 0), r"1 to 4 family names", id="none"),
    pytest.param(lambda: make_case("torus_bright", 0), r"list of 1 to 4", id="string"),
    pytest.param(
        lambda: make_case(["torus_bright"], 0, shape=(8, 48, 48)), r"shape must be .* >= 24", id="small"
    ),
    pytest.param(lambda: make_case(["torus_bright"], 0, shape=(48, 48)), r"three integers", id="2d"),
    pytest.param(lambda: make_case(["torus_bright"], "0"), r"seed must be an integer, got '0'", id="seed"),
    pytest.param(
        lambda: synthetic_registry(NAMES, 0, 0), r"n_cases must be a positive integer, got 0", id="n0"
    ),
    pytest.param(
        lambda: synthetic_registry([], 5, 0), r"families must be distinct family names", id="no-family"
    ),
    pytest.param(
        lambda: synthetic_registry(NAMES, 5, 0, structures_per_case=(3, 5)),
        r"structures_per_case",
        id="per-case",
    ),
    pytest.param(
        lambda: synthetic_registry(NAMES[:2], 5, 0, structures_per_case=(2, 3)),
        r"at most the number",
        id="few",
    ),
    pytest.param(
        lambda: FamilySpec("f", "pyramid", "smooth", "bright"), r"unknown shape 'pyramid'", id="shape"
    ),
    pytest.param(lambda: FamilySpec("f", "box", "plaid", "bright"), r"unknown texture 'plaid'", id="texture"),
    pytest.param(lambda: FamilySpec("f", "box", "smooth", "grey"), r"unknown polarity 'grey'", id="polarity"),
    pytest.param(lambda: FamilySpec("f", "box", "smooth", "dark", aspect=(2, 1)), r"aspect", id="aspect"),
]


@pytest.mark.parametrize(("make", "match"), INVALID_CASES)
def test_invalid_inputs_name_the_problem(make, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make()
