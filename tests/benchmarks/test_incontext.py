"""The in-context probe's parts on a phantom scan: which structures it may train on (never one a benchmark
scores, either side, either atlas's name), a short training run, refinement on the box of the carried mask,
a scan scored against itself (the product's registration places it where it is), the summary, its Markdown
and settings; and the shipped refiner's record of what it trained on."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from medmeta_plugin.benchmarks.incontext import (
    InContextConfig,
    ScanCase,
    _root,
    format_incontext,
    refine,
    score_pair,
    summarise,
    train_refiner,
    training_structures,
)
from medmeta_plugin.episodes.carried import CarryConfig
from medmeta_plugin.episodes.splits import ABDOMEN_DEV, ABDOMEN_HELDOUT, BRAIN_DEV
from medmeta_plugin.networks import Refiner
from medmeta_plugin.networks.refiner import KEEP_SIMILARITY


def _phantom(structures: dict[str, tuple[int, ...]] | None = None) -> ScanCase:
    """A body (an elliptic cylinder of tissue in air) holding three organs of distinct intensity, 3 mm
    voxels; label values 1-3 under the names of ``structures``."""
    shape = (40, 36, 32)
    i, j, k = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    rng = np.random.default_rng(0)
    image = rng.normal(0.0, 0.05, shape).astype(np.float32)
    body = ((i - 20) / 16) ** 2 + ((j - 18) / 13) ** 2 <= 1
    image[body] += 1.0
    labels = np.zeros(shape, np.int32)
    for value, (ci, cj, ck, r) in enumerate([(14, 14, 10, 4), (26, 20, 18, 5), (20, 12, 24, 3)], start=1):
        organ = (i - ci) ** 2 + (j - cj) ** 2 + (k - ck) ** 2 <= r**2
        labels[organ] = value
        image[organ] += 0.6 * value
    affine = np.diag([3.0, 3.0, 3.0, 1.0])
    names = structures or {"liver": (1,), "spleen": (2,), "stomach": (3,)}
    return ScanCase("phantom", image, affine, labels, names)


@pytest.mark.parametrize(
    "a, b",
    [
        ("Left-Caudate", "Right-Caudate"),
        ("Caudate_L", "Left-Caudate"),
        ("ctx-lh-precentral", "Precentral_R"),
        ("kidney_left", "kidney_right"),
        ("Cerebelum_Crus1_L", "Cerebelum_Crus1_R"),
    ],
)
def test_the_root_of_a_name_drops_its_side(a: str, b: str) -> None:
    assert _root(a) == _root(b)


def test_the_root_keeps_names_apart_that_differ_beyond_their_side() -> None:
    assert _root("Left-Caudate") != _root("Left-Putamen")
    assert _root("liver") == "liver"


def test_training_structures_leave_out_every_structure_a_benchmark_scores() -> None:
    dev, held = ABDOMEN_DEV[0], ABDOMEN_HELDOUT[0]  # adrenal_gland_left, kidney_left
    partner = dev.replace("left", "right")
    case = _phantom({"liver": (1,), dev: (2,), partner: (3,)})
    assert training_structures(case) == ["liver"], "a development structure and its other side stay out"
    case = _phantom({"liver": (1,), held: (2,), "Caudate_R": (3,)})  # Caudate: BRAIN_DEV's, AAL-named
    assert "Left-Caudate" in BRAIN_DEV
    assert training_structures(case) == ["liver"]


def test_training_structures_skip_aliases_and_tiny_structures() -> None:
    case = _phantom({"liver": (1,), "spleen": (2,), "stomach": (3,), "Left-Amygdala": (1, 2)})
    assert training_structures(case) == ["liver", "spleen", "stomach"]
    case.labels[case.labels == 3] = 0
    case.labels[0, 0, :5] = 3  # 5 voxels: under MIN_VOXELS
    assert training_structures(case) == ["liver", "spleen"]


def test_training_needs_a_structure_to_train_on() -> None:
    case = _phantom({dev: (v,) for v, dev in enumerate(ABDOMEN_DEV[:3], start=1)})
    with pytest.raises(ValueError, match="no training structures"):
        train_refiner([case], InContextConfig(steps=1, patch=16, features=(4, 8)), progress=False)


def test_a_short_training_run_logs_and_refines_a_whole_scan() -> None:
    case = _phantom()
    config = InContextConfig(steps=4, batch=2, patch=16, features=(4, 8), carry=CarryConfig(empty=0.0))
    model, log = train_refiner([case], config, progress=False)
    assert not model.training
    assert [entry["step"] for entry in log] == [4]
    assert set(log[0]) == {"step", "loss", "carried_dice", "refined_dice"} and np.isfinite(log[0]["loss"])
    liver = case.mask("liver")
    out = refine(model, case.image, liver.astype(np.float32), 3.0)
    assert out.shape == case.image.shape and out.dtype == bool
    empty = refine(model, case.image, np.zeros(case.image.shape, np.float32), 3.0)
    assert not empty.any(), "nothing carried, nothing refined"


def test_training_is_repeatable_by_seed() -> None:
    case = _phantom()
    config = InContextConfig(steps=2, batch=1, patch=16, features=(4, 8))
    a, _ = train_refiner([case], config, progress=False)
    b, _ = train_refiner([case], config, progress=False)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q)


def test_a_scan_scored_against_itself_carries_its_masks_exactly() -> None:
    case = _phantom()
    model = Refiner((4, 8)).eval()
    rows = score_pair(model, case, case, ["liver", "spleen", "stomach", "not_labelled"])
    assert [r["structure"] for r in rows] == ["liver", "spleen", "stomach"]
    for row in rows:
        assert row["pair"] == "phantom->phantom" and row["sure"] is True
        assert row["carried"] >= 0.9, row
        assert 0.0 <= row["refined"] <= 1.0 and 0.0 <= row["scan_alone"] <= 1.0
        # The scan carried onto itself matches it: the app keeps the carried mask.
        assert row["similarity"] >= KEEP_SIMILARITY and row["served"] == row["carried"], row


def test_summary_counts_where_the_refiner_helps_and_hurts() -> None:
    answers = ("carried", "refined", "served", "scan_alone")
    rows = [
        {"pair": "a->b", "structure": "x", **dict(zip(answers, (0.5, 0.7, 0.7, 0.1)))},
        {"pair": "a->b", "structure": "y", **dict(zip(answers, (0.6, 0.4, 0.6, 0.0)))},
        {"pair": "b->a", "structure": "x", **dict(zip(answers, (0.3, 0.305, 0.3, 0.2)))},
    ]
    rows[1]["similarity"] = 0.97
    summary = summarise(rows)
    assert summary["a->b"] == {
        "structures": 2,
        "carried": 0.55,
        "refined": 0.55,
        "served": 0.65,
        "scan_alone": 0.05,
        "helps": 1,
        "hurts": 1,
    }
    assert summary["b->a"]["helps"] == 0 and summary["b->a"]["hurts"] == 0, "within 0.01: neither"
    assert summary["all"]["structures"] == 3 and summary["all"]["carried"] == pytest.approx(0.4667, abs=1e-4)
    text = format_incontext({"rows": rows, "summary": summary})
    assert "| a->b | x | 0.500 | 0.700 | - | 0.700 | 0.100 |" in text
    assert "| a->b | y | 0.600 | 0.400 | 0.970 | 0.600 | 0.000 |" in text
    assert "| all | 3 | 0.467 | 0.468 | 0.533 | 0.100 | 1 | 1 |" in text
    assert summarise([]) == {}


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"steps": 0}, "steps and batch must be >= 1"),
        ({"batch": 0}, "steps and batch must be >= 1"),
        ({"patch": 20}, "patch must be a positive multiple of 8"),
        ({"patch": 24, "features": (4, 8, 16, 32, 64)}, "multiple of 16"),
        ({"spacing_mm": 0.5}, r"spacing_mm must be in \[1, 6\]"),
    ],
)
def test_incontext_config_rejects_bad_settings(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        InContextConfig(**kwargs)


def test_the_shipped_refiner_never_trained_on_a_structure_a_benchmark_scores() -> None:
    from medmeta_plugin.benchmarks.incontext import CASES, _scored_roots
    from medmeta_plugin.episodes.splits import HELDOUT_STRUCTURES, is_held_out
    from medmeta_plugin.paths import REFINER

    record = REFINER.with_suffix(".json")
    if not record.is_file():
        pytest.skip("no shipped refiner")
    meta = json.loads(record.read_text())
    names = meta["training_structures"]
    assert set(names) == set(CASES) and {k: len(v) for k, v in names.items()} == meta["training"]
    every = [n for case in names.values() for n in case]
    assert every and not set(every) & HELDOUT_STRUCTURES
    assert not any(is_held_out(n) or _root(n) in _scored_roots() for n in every)
    assert meta["command"].startswith("medmeta benchmark incontext") and "--save" in meta["command"]
