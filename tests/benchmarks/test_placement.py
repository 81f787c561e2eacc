"""The placement benchmark's bookkeeping on hand-made records (the summary, its Markdown, the confidence's
calibration), its configuration, and the ``centres`` baseline's start on a phantom and a shifted copy."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from medmeta_plugin.benchmarks.placement import (
    PLACED_MM,
    PLACEMENT_METHODS,
    WRONG_MM,
    PlacementBenchmark,
    calibrate,
    centres_start,
    format_summary,
    summarise,
)
from tests.registration.conftest import make_phantom, moved


def _record(
    pair: str, cls: str, method: str, error: float | None, dice: float | None, seconds: float = 1.0, **extra
) -> dict[str, Any]:
    """A record as ``run_placement_benchmark`` writes it (no error keys for a pair without truth or an
    unanswered one)."""
    record = {
        "pair": pair,
        "class": cls,
        "extent": "full-full",
        "split": "dev",
        "method": method,
        "seconds": seconds,
        "structures": {},
        "dice": dice,
        **extra,
    }
    if error is not None:
        record.update(error_axis_mm=error, error_mm=error)
    return record


def _ours(
    pair: str,
    cls: str,
    error: float | None,
    sure: bool,
    dice: float | None = None,
    placement_seconds: float = 0.5,
    margin: float = 2.0,
    gradients: float = 0.5,
    outline: float = 0.5,
) -> dict[str, Any]:
    """A ``medmeta`` record: the placement's figures and its error (None for ``head-abdomen``)."""
    placement = {
        "confidence": 0.9 if sure else 0.1,
        "sure": sure,
        "score": 5.0,
        "margin": margin,
        "overlap": 0.8,
        "gradients": gradients,
        "outline": outline,
    }
    return _record(
        pair,
        cls,
        "medmeta",
        error,
        dice,
        2.0,
        placement=placement,
        placement_seconds=placement_seconds,
        placement_error_axis_mm=error,
    )


# Four CT pairs (errors at and around the 15 and 30 mm marks), a brain pair and two heads against abdomens.
RECORDS = [
    _ours("c1", "ct-ct", 5.0, True, 0.6),
    _ours("c2", "ct-ct", PLACED_MM, True, 0.5),  # placed: within 15 mm counts 15
    _ours("c3", "ct-ct", WRONG_MM, False, 0.3),  # right: wrong is over 30 mm
    _ours("c4", "ct-ct", 40.0, False, 0.0),
    _ours("b1", "brain", 10.0, True, 0.7),
    _ours("h1", "head-abdomen", None, False),
    _ours("h2", "head-abdomen", None, True, placement_seconds=2.5),
    *(_record(p, "ct-ct", "truth-start", 1.0, 0.8, 3.0) for p in ("c1", "c2", "c3", "c4")),
    _record("b1", "brain", "truth-start", 1.0, 0.7, 3.0),
    _record("c1", "ct-ct", "centres", 30.0, 0.2, 4.0),
    _record("c2", "ct-ct", "centres", 60.0, 0.1, 4.0),
]


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        (("classes", "ct-ct", "medmeta", "pairs"), 4),
        (("classes", "ct-ct", "medmeta", "placed_within_15mm"), 0.5),
        (("classes", "ct-ct", "medmeta", "median_error_axis_mm"), 22.5),
        (("classes", "ct-ct", "medmeta", "dice"), 0.35),
        (("classes", "ct-ct", "medmeta", "dice_of_ceiling"), 0.35 / 0.8),
        (("classes", "ct-ct", "medmeta", "seconds"), 2.0),
        (("classes", "ct-ct", "truth-start", "placed_within_15mm"), 1.0),
        (("classes", "ct-ct", "truth-start", "dice_of_ceiling"), 1.0),
        (("classes", "ct-ct", "centres", "pairs"), 2),
        (("classes", "ct-ct", "centres", "placed_within_15mm"), 0.0),
        (("classes", "ct-ct", "centres", "median_error_axis_mm"), 45.0),
        (("classes", "ct-ct", "centres", "dice_of_ceiling"), 0.15 / 0.8),
        (("classes", "brain", "medmeta", "placed_within_15mm"), 1.0),
        (("classes", "brain", "medmeta", "dice_of_ceiling"), 1.0),
        # all: every class but head-abdomen, pairs of each class weighed alike
        (("classes", "all", "medmeta", "pairs"), 5),
        (("classes", "all", "medmeta", "placed_within_15mm"), 0.6),
        (("classes", "all", "medmeta", "median_error_axis_mm"), 15.0),
        (("classes", "all", "medmeta", "dice_of_ceiling"), 0.42 / 0.78),
        (("classes", "all", "centres", "pairs"), 2),
        # confidence: wrong = c4 (40 mm) and both heads; flagged: c4, h1; passed: c1, c2, b1 (not c3)
        (("confidence", "wrong"), 3),
        (("confidence", "right"), 4),
        (("confidence", "wrong_flagged"), 2 / 3),
        (("confidence", "right_passed"), 3 / 4),
        (("confidence", "placement_seconds"), 5.5 / 7),
        (("confidence", "placement_seconds_max"), 2.5),
    ],
)
def test_summarise(path: tuple[str, ...], expected: float) -> None:
    value: Any = summarise(RECORDS)
    for key in path:
        value = value[key]
    assert value == pytest.approx(expected)


def test_summarise_leaves_out_classes_without_pairs() -> None:
    summary = summarise(RECORDS)
    assert list(summary["classes"]) == ["ct-ct", "brain", "all"], "report order; no head-abdomen row"
    assert summarise([]) == {"classes": {}, "confidence": {}}
    without_ours = summarise([r for r in RECORDS if r["method"] != "medmeta"])
    assert without_ours["confidence"] == {}


def test_an_unanswered_pair_is_not_placed() -> None:
    records = [
        _record("c1", "ct-ct", "centres", None, 0.0),  # as _run_ours records it: Dice 0, no error
        _record("c2", "ct-ct", "centres", 5.0, 0.6),
    ]
    row = summarise(records)["classes"]["ct-ct"]["centres"]
    assert row["pairs"] == 2
    assert row["placed_within_15mm"] == pytest.approx(0.5)


# ----- calibrate -------------------------------------------------------------------------------------
def _calibration_records(separating: str, seed: int = 0) -> list[dict[str, Any]]:
    """30 right and 20 wrong ``medmeta`` placements (5 of them heads against abdomens) that only the figure
    ``separating`` tells apart, plus records calibration must skip (other methods, no placement)."""
    rng = np.random.default_rng(seed)
    high = {"margin": (5.0, 9.0), "gradients": (0.55, 0.95), "outline": (0.6, 0.95)}
    low = {"margin": (0.0, 4.0), "gradients": (0.05, 0.45), "outline": (0.1, 0.5)}
    # where the margin does not separate it stays clear of a tie (the served confidence scales ties down)
    noise = {"margin": (1.0, 9.0), "gradients": (0.05, 0.95), "outline": (0.1, 0.95)}
    records = []
    for i in range(50):
        right = i < 30
        figures = {
            name: rng.uniform(*(high if right else low)[name] if name == separating else noise[name])
            for name in ("margin", "gradients", "outline")
        }
        cls = "head-abdomen" if i >= 45 else "ct-ct"
        error = (
            None if cls == "head-abdomen" else float(rng.uniform(0, 25) if right else rng.uniform(35, 200))
        )
        records.append(_ours(f"p{i}", cls, error, sure=right, **figures))
    records.append(_record("p0", "ct-ct", "truth-start", 1.0, 0.8))
    records.append(_record("x", "ct-ct", "medmeta", 80.0, 0.1))  # no placement (a given start)
    return records


@pytest.mark.parametrize("separating", ["margin", "gradients", "outline"])
def test_calibrate_weighs_the_figure_that_separates(separating: str) -> None:
    fitted = calibrate(_calibration_records(separating))
    assert (fitted["right"], fitted["wrong"]) == (30, 20)
    assert set(fitted["weights"]) == {"margin", "gradients", "outline"}
    assert fitted["weights"][separating] > 0
    at_half = fitted["thresholds"]["0.5"]
    assert at_half["wrong_flagged"] >= 0.95 and at_half["right_passed"] >= 0.95
    assert list(fitted["thresholds"]) == ["0.3", "0.5", "0.6", "0.7", "0.8"]


@pytest.mark.parametrize(
    "keep",
    [
        lambda r: r.get("placement_error_axis_mm") is not None and r["placement_error_axis_mm"] <= WRONG_MM,
        lambda r: r["class"] == "head-abdomen" or (r.get("placement_error_axis_mm") or 0) > WRONG_MM,
        lambda r: r["method"] != "medmeta",
        lambda r: False,
    ],
    ids=["only-right", "only-wrong", "no-medmeta", "none"],
)
def test_calibrate_needs_right_and_wrong_placements(keep) -> None:
    records = [r for r in _calibration_records("gradients") if keep(r)]
    with pytest.raises(ValueError, match="both right and wrong placements"):
        calibrate(records)


# ----- format_summary and the configuration ---------------------------------------------------------
def test_format_summary_renders_every_class_and_method() -> None:
    summary = summarise(RECORDS)
    text = format_summary(summary)
    rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| class")]
    expected = [(cls, method) for cls, methods in summary["classes"].items() for method in methods]
    assert [tuple(row.split(" | ")[:2]) for row in rows] == [(f"| {c}", m) for c, m in expected]
    assert "| ct-ct | medmeta | 4 | 50% | 22.5 | 0.350 | 44% | 2.0 |" in text
    assert "67% of 3 wrong placements flagged" in text and "75% of 4 right ones passed" in text
    assert "2.50 s at most" in text


def test_format_summary_marks_missing_figures() -> None:
    records = [_record("c1", "ct-ct", "centres", None, None, 4.0)]
    text = format_summary(summarise(records))
    assert "| ct-ct | centres | 1 | - | - | - | - | 4.0 |" in text
    assert "Confidence" not in text, "no medmeta records, no confidence line"


@pytest.mark.parametrize(
    "methods", [("medmeta", "truth-start", "centres"), PLACEMENT_METHODS, ("elastix-bspline",)]
)
def test_placement_benchmark_accepts_known_methods(methods: tuple[str, ...]) -> None:
    assert PlacementBenchmark(methods=methods).methods == methods


@pytest.mark.parametrize(
    ("methods", "match"),
    [
        (("medmeta", "ants-affine"), r"\['ants-affine'\]; valid: \['medmeta', 'truth-start'"),
        (("truth_start",), r"\['truth_start'\].*'elastix-bspline'\]"),
    ],
)
def test_placement_benchmark_rejects_unknown_methods(methods: tuple[str, ...], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        PlacementBenchmark(methods=methods)


# ----- the centres baseline -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("slices", "shift"),
    [
        ((0, 48), (8.0, -6.0, 10.0)),  # the whole phantom: the centres alone align it
        ((0, 32), (8.0, -6.0, 40.0)),  # the lower two thirds: centres 16 mm apart along the body axis
        ((16, 48), (-10.0, 4.0, -30.0)),
    ],
)
def test_centres_start_finds_a_shifted_copy(slices: tuple[int, int], shift: tuple[float, ...]) -> None:
    """The query is a slab of the phantom, the support the whole phantom stored flipped along x with its world
    moved by ``shift``: the start maps the query onto it within half a voxel of the coarse (8 mm) level it
    is refined at, barely turned."""
    image, _, affine = make_phantom()
    fixed = image[:, :, slices[0] : slices[1]]
    fixed_affine = affine.copy()
    fixed_affine[:3, 3] = (affine @ np.r_[0.0, 0.0, slices[0], 1.0])[:3]
    matrix = centres_start(fixed, fixed_affine, image[::-1].copy(), moved(image.shape, affine, shift))
    centre = fixed_affine @ np.r_[(np.array(fixed.shape) - 1) / 2, 1.0]
    np.testing.assert_allclose((matrix @ centre - centre)[:3], shift, atol=4.0)
    turn = np.degrees(np.arccos(np.clip((np.trace(matrix[:3, :3]) - 1) / 2, -1.0, 1.0)))
    assert turn < 3.0
