"""The benchmarks' held-out split: what :func:`is_held_out` answers, how the lists are built, the
left/right-pair rule, and that every listed structure is one the real scans label.

Elsewhere: meta-training never receives a held-out task (``tests/meta/test_data.py``,
``tests/meta/test_trainer.py``, also for the shipped backbone), the development structures are not held
out (``tests/benchmarks/test_fewshot.py``) and the family split is disjoint (``test_synthetic.py``).
"""

from __future__ import annotations

import json
import re

import pytest

from medmeta_plugin.episodes.families import HELDOUT_FAMILIES, META_TRAIN_FAMILIES
from medmeta_plugin.episodes.splits import (
    ABDOMEN_DEV,
    ABDOMEN_HELDOUT,
    BRAIN_DEV,
    BRAIN_HELDOUT,
    HELDOUT_STRUCTURES,
    SYNTHETIC_HELDOUT_TASKS,
    TUMOUR_HELDOUT,
    is_held_out,
)
from medmeta_plugin.names import validate_name
from medmeta_plugin.paths import SAMPLE_DATA, real_data_root

LISTS = {
    "ABDOMEN_HELDOUT": ABDOMEN_HELDOUT,
    "BRAIN_HELDOUT": BRAIN_HELDOUT,
    "TUMOUR_HELDOUT": TUMOUR_HELDOUT,
    "SYNTHETIC_HELDOUT_TASKS": SYNTHETIC_HELDOUT_TASKS,
    "ABDOMEN_DEV": ABDOMEN_DEV,
    "BRAIN_DEV": BRAIN_DEV,
}


@pytest.mark.parametrize(
    "name",
    [
        "kidney_left",
        "iliopsoas_right",
        "Left-Hippocampus",
        "Brain-Stem",
        "ctx-rh-insula",
        "tumour",
        "synth_crescent_bright",
        "synth_capsule_dark_striped",
    ],
)
def test_held_out_names(name: str) -> None:
    assert is_held_out(name)


@pytest.mark.parametrize(
    "name",
    [
        "liver",
        "adrenal_gland_left",  # a development structure: meta-training sees it
        "Left-Caudate",
        "synth_sphere_bright",  # a meta-training family
        "crescent_bright",  # a held-out family's name is not its task's name
        "synth_total_volume_ml",
        "Kidney_left",  # names match exactly: case,
        "kidney_left ",  # whitespace
        "kidney",  # and no prefix matching
        "",
    ],
)
def test_names_that_are_not_held_out(name: str) -> None:
    assert not is_held_out(name)


def test_held_out_structures_are_exactly_the_four_lists() -> None:
    union = set(ABDOMEN_HELDOUT) | set(BRAIN_HELDOUT) | set(TUMOUR_HELDOUT) | set(SYNTHETIC_HELDOUT_TASKS)
    assert union == HELDOUT_STRUCTURES
    assert isinstance(HELDOUT_STRUCTURES, frozenset), "no caller can add to or remove from the split"


def test_synthetic_held_out_tasks_are_the_held_out_families_tasks() -> None:
    assert tuple(f"synth_{f}" for f in HELDOUT_FAMILIES) == SYNTHETIC_HELDOUT_TASKS
    assert not any(is_held_out(f"synth_{f}") for f in META_TRAIN_FAMILIES)


@pytest.mark.parametrize("name", sorted(LISTS))
def test_lists_hold_distinct_valid_task_names(name: str) -> None:
    """Task names become file names and URL segments (adapters, results): every listed one must be valid."""
    names = LISTS[name]
    assert names and len(set(names)) == len(names), name
    assert all(validate_name(n, "task name") == n for n in names)


def _mirror(name: str) -> str | None:
    """The other side of a left/right name (``kidney_left``, ``Left-Putamen``, ``ctx-lh-insula``), or None."""
    swaps = [("_left", "_right"), ("Left-", "Right-"), ("-lh-", "-rh-")]
    for a, b in swaps + [(b, a) for a, b in swaps]:
        if a in name:
            return name.replace(a, b)
    return None


@pytest.mark.parametrize("name", sorted(ABDOMEN_HELDOUT + BRAIN_HELDOUT))
def test_both_sides_of_a_pair_are_held_out_together(name: str) -> None:
    mirror = _mirror(name)
    assert mirror is None or is_held_out(mirror), f"{name} is held out but {mirror} is not"


def test_pairs_are_recognised() -> None:
    """The rule above is not vacuous: most held-out real structures are sides of a pair."""
    paired = [n for n in ABDOMEN_HELDOUT + BRAIN_HELDOUT if _mirror(n) is not None]
    assert len(paired) == 12
    assert _mirror("Brain-Stem") is None and _mirror("ctx-lh-insula") == "ctx-rh-insula"


def test_development_and_held_out_lists_never_share_a_side_of_a_pair() -> None:
    """A development structure is seen by meta-training; its mirror image must not be evaluated as unseen."""
    for name in ABDOMEN_DEV + BRAIN_DEV:
        mirror = _mirror(name)
        assert mirror is None or not is_held_out(mirror), (
            f"{name} is a development structure, {mirror} held out"
        )


def _labelled(folder: str, root=SAMPLE_DATA) -> set[str]:
    return set(json.loads((root / folder / "labels.json").read_text()).values())


@pytest.mark.parametrize(("names", "what"), [(ABDOMEN_HELDOUT, "held-out"), (ABDOMEN_DEV, "development")])
def test_abdominal_structures_are_labelled_on_both_the_ct_and_the_mr(
    names: tuple[str, ...], what: str
) -> None:
    for folder in ("ct_abdomen_a", "mr_abdomen_d"):
        missing = set(names) - _labelled(folder)
        assert not missing, f"{what} structures {sorted(missing)} are not labelled in {folder}"


def test_the_tumour_is_labelled_on_both_patients() -> None:
    for folder in ("mr_brain_tumour_1", "mr_brain_tumour_2"):
        assert set(TUMOUR_HELDOUT) <= _labelled(folder)


@pytest.mark.skipif(not (real_data_root() / "brain_mni152").is_dir(), reason="needs ../shared/data/real")
@pytest.mark.parametrize(("names", "what"), [(BRAIN_HELDOUT, "held-out"), (BRAIN_DEV, "development")])
def test_brain_structures_are_labelled_on_the_template(names: tuple[str, ...], what: str) -> None:
    missing = set(names) - _labelled("brain_mni152", real_data_root())
    assert not missing, f"{what} structures {sorted(missing)} are not labelled on the brain template"


def test_brain_names_follow_the_freesurfer_lookup_table() -> None:
    """FreeSurfer spelling (``Left-``/``Right-`` prefixes, ``ctx-lh-`` cortical parcels), as the template's
    labels.json has them; a typo would silently hold out nothing."""
    pattern = re.compile(r"^((Left|Right)-[A-Z][A-Za-z-]+|Brain-Stem|ctx-(lh|rh)-[a-z]+)$")
    assert all(pattern.match(n) for n in BRAIN_HELDOUT + BRAIN_DEV)
