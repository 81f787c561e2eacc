"""Structure families: the parameter ranges, the position priors, :class:`FamilySpec`'s checks, and the
held-out families' novelty as the module docstring states it (unseen shapes, an unseen texture, and known
shapes with a texture they never have in training).

The split's disjointness, the ``(shape, texture, polarity)`` signatures and the use of every primitive are
tested in ``test_synthetic.py``; so are unknown shapes, textures, polarities and a reversed aspect range.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from medmeta_plugin.episodes.families import (
    CONTRASTS,
    FAMILIES,
    FAMILIES_BY_NAME,
    HELDOUT_FAMILIES,
    META_TRAIN_FAMILIES,
    POSITIONS,
    SHARPNESS,
    SIZES,
    FamilySpec,
)

TRAIN = [FAMILIES_BY_NAME[n] for n in META_TRAIN_FAMILIES]
HELDOUT = [FAMILIES_BY_NAME[n] for n in HELDOUT_FAMILIES]
DRAWS = 400  # per position prior: enough to reach the edges of every range


@pytest.mark.parametrize(
    ("table", "name"), [(SIZES, "SIZES"), (SHARPNESS, "SHARPNESS"), (CONTRASTS, "CONTRASTS")]
)
def test_every_range_is_positive_and_increasing(table: dict[str, tuple[float, float]], name: str) -> None:
    assert table, name
    for key, (low, high) in table.items():
        assert 0.0 < low < high, f"{name}[{key!r}] = {(low, high)}"


@pytest.mark.parametrize(
    ("table", "order"),
    [
        (SIZES, ("small", "medium", "large")),
        (SHARPNESS, ("sharp", "medium", "soft")),
        (CONTRASTS, ("subtle", "strong")),
    ],
)
def test_ranges_are_ordered_and_do_not_overlap(table: dict[str, tuple[float, float]], order: tuple) -> None:
    """A "small" structure is always smaller than a "medium" one, a "sharp" edge always narrower, ..."""
    assert set(table) == set(order)
    for lower, upper in zip(order, order[1:]):
        assert table[lower][1] < table[upper][0], (lower, upper)


def test_structure_sizes_in_voxels_are_the_documented_ones() -> None:
    """1 unit is 24 in-plane voxels: "small" is 4-5 voxels across, "large" 9-12 (module comment)."""
    voxels = {key: (24 * low, 24 * high) for key, (low, high) in SIZES.items()}
    assert voxels["small"][0] >= 3.5 and voxels["small"][1] <= 5.0
    assert voxels["large"][0] >= 8.5 and voxels["large"][1] <= 12.0


# Each prior's documented region of the body (the unit ball): a predicate on the drawn centre.
POSITION_REGIONS = {
    "central": lambda c: np.linalg.norm(c) <= 0.3,
    "anywhere": lambda c: np.linalg.norm(c) <= 0.6,
    "peripheral": lambda c: 0.55 <= np.linalg.norm(c) <= 0.75,
    "lateral": lambda c: 0.3 <= abs(c[0]) <= 0.6 and (np.abs(c[1:]) <= 0.3).all(),
    "superior": lambda c: 0.3 <= c[2] <= 0.6 and (np.abs(c[:2]) <= 0.25).all(),
}


def test_every_position_prior_has_a_region() -> None:
    assert set(POSITION_REGIONS) == set(POSITIONS)


@pytest.mark.parametrize("name", sorted(POSITIONS))
def test_position_priors_draw_centres_in_their_region_of_the_body(name: str) -> None:
    rng = np.random.default_rng(0)
    centres = [POSITIONS[name](rng) for _ in range(DRAWS)]
    assert all(c.shape == (3,) and np.isfinite(c).all() for c in centres)
    outside = [c for c in centres if not POSITION_REGIONS[name](c)]
    assert not outside, f"{name}: {len(outside)} centres outside, e.g. {outside[0]}"
    assert all(np.linalg.norm(c) < 1.0 for c in centres), "every centre lies in the body"


@pytest.mark.parametrize("name", sorted(POSITIONS))
def test_position_priors_are_seeded(name: str) -> None:
    draw = POSITIONS[name]
    a = [draw(np.random.default_rng(7)) for _ in range(3)]
    b = [draw(np.random.default_rng(7)) for _ in range(3)]
    np.testing.assert_array_equal(a, b)
    rng = np.random.default_rng(7)
    assert not np.array_equal(draw(rng), draw(rng)), "two draws of one generator differ"


def test_lateral_prior_draws_both_sides_and_directions_spread() -> None:
    rng = np.random.default_rng(1)
    sides = {np.sign(POSITIONS["lateral"](rng)[0]) for _ in range(50)}
    assert sides == {-1.0, 1.0}
    # "anywhere" is isotropic: the mean direction of many draws is near zero.
    directions = [c / np.linalg.norm(c) for c in (POSITIONS["anywhere"](rng) for _ in range(DRAWS))]
    assert np.linalg.norm(np.mean(directions, axis=0)) < 0.15


VALID_SPECS = [
    pytest.param(
        dict(name="f", shape="box", texture="smooth", polarity="bright"),
        dict(contrast="strong", size="medium", position="anywhere", sharpness="medium", aspect=(1.0, 1.0)),
        id="defaults",
    ),
    pytest.param(
        dict(name="a.b+c-1", shape="helix", texture="layered", polarity="either", contrast="subtle"),
        dict(contrast="subtle"),
        id="name-separators",
    ),
    pytest.param(
        dict(name="f", shape="torus", texture="core", polarity="dark", size="small", position="superior"),
        dict(size="small", position="superior"),
        id="keys",
    ),
    pytest.param(
        dict(
            name="f", shape="plate", texture="noisy", polarity="bright", sharpness="soft", aspect=(2.0, 2.0)
        ),
        dict(sharpness="soft", aspect=(2.0, 2.0)),
        id="point-aspect",
    ),
]


@pytest.mark.parametrize(("kwargs", "expected"), VALID_SPECS)
def test_valid_family_specs(kwargs: dict, expected: dict) -> None:
    spec = FamilySpec(**kwargs)
    for field, value in expected.items():
        assert getattr(spec, field) == value, field
    assert spec.signature == (kwargs["shape"], kwargs["texture"], kwargs["polarity"])


def test_family_specs_are_frozen() -> None:
    spec = FAMILIES[0]
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.shape = "box"  # type: ignore[misc]


INVALID_SPECS = [
    pytest.param(
        dict(contrast="faint"),
        r"family 'f': unknown contrast 'faint'; valid: \['strong', 'subtle'\]",
        id="contrast",
    ),
    pytest.param(dict(size="huge"), r"unknown size 'huge'; valid: \['large', 'medium', 'small'\]", id="size"),
    pytest.param(
        dict(position="inferior"), r"unknown position 'inferior'; valid: \['anywhere', ", id="position"
    ),
    pytest.param(
        dict(sharpness="blurry"),
        r"unknown sharpness 'blurry'; valid: \['medium', 'sharp', 'soft'\]",
        id="sharp",
    ),
    pytest.param(
        dict(aspect=(0.5, 2.0)),
        r"family 'f': aspect must be a range within \[1, inf\), got \(0.5, 2.0\)",
        id="aspect-low",
    ),
    pytest.param(
        dict(aspect=(0.5, 0.8)), r"aspect must be a range .* got \(0.5, 0.8\)", id="aspect-below-one"
    ),
    pytest.param(dict(name="a/b"), r"invalid family name 'a/b'", id="slash"),
    pytest.param(dict(name=""), r"invalid family name ''", id="empty"),
    pytest.param(dict(name="a..b"), r"invalid family name 'a..b'", id="dots"),
    pytest.param(dict(name="-f"), r"invalid family name '-f'", id="option-like"),
]


@pytest.mark.parametrize(("override", "match"), INVALID_SPECS)
def test_invalid_family_specs_name_the_field_and_value(override: dict, match: str) -> None:
    kwargs = {"name": "f", "shape": "box", "texture": "smooth", "polarity": "bright", **override}
    with pytest.raises(ValueError, match=match):
        FamilySpec(**kwargs)


def test_a_family_name_that_is_not_a_string_is_a_type_error() -> None:
    with pytest.raises(TypeError, match=r"family name must be a string, got int: 3"):
        FamilySpec(3, "box", "smooth", "bright")  # type: ignore[arg-type]


def test_families_lists_meta_training_families_first_and_indexes_every_one() -> None:
    assert tuple(f.name for f in FAMILIES) == META_TRAIN_FAMILIES + HELDOUT_FAMILIES
    assert all(FAMILIES_BY_NAME[f.name] is f for f in FAMILIES)
    assert len(FAMILIES_BY_NAME) == len(FAMILIES)
    assert len(HELDOUT_FAMILIES) == 10, "the module docstring counts 10 held-out families"


def test_held_out_families_use_the_documented_unseen_shapes_and_texture() -> None:
    train_shapes = {f.shape for f in TRAIN}
    train_textures = {f.texture for f in TRAIN}
    assert {f.shape for f in HELDOUT} - train_shapes == {"crescent", "cone", "helix"}
    assert {f.texture for f in HELDOUT} - train_textures == {"layered"}
    assert {f.name for f in HELDOUT if f.shape not in train_shapes} == {
        "crescent_bright",
        "cone_dark",
        "helix_bright",
    }
    assert [f.name for f in HELDOUT if f.texture not in train_textures] == ["cyst_layered"]


def test_recombined_held_out_families_give_a_training_shape_a_texture_it_never_has() -> None:
    """The six other held-out families: a training shape, with a texture no training family of that shape
    has (stronger than a new signature, which a new polarity alone would give)."""
    train_shapes = {f.shape for f in TRAIN}
    train_textures = {f.texture for f in TRAIN}
    recombined = [f for f in HELDOUT if f.shape in train_shapes and f.texture in train_textures]
    assert len(recombined) == 6
    pairs = {(f.shape, f.texture) for f in TRAIN}
    assert [f.name for f in recombined if (f.shape, f.texture) in pairs] == []


def test_held_out_families_are_of_the_same_world() -> None:
    """Same contrast, size and sharpness ranges as training: every value a held-out family uses, some
    training family uses too (so adaptation faces new structures, not new imaging)."""
    for field in ("contrast", "size", "sharpness", "position", "polarity"):
        train_values = {getattr(f, field) for f in TRAIN}
        assert {getattr(f, field) for f in HELDOUT} <= train_values, field
    widest = (min(f.aspect[0] for f in TRAIN), max(f.aspect[1] for f in TRAIN))
    assert all(widest[0] <= f.aspect[0] <= f.aspect[1] <= widest[1] for f in HELDOUT)
