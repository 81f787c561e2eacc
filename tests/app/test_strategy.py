"""Active-learning strategies: the pure selection rules on hand-made scores and embeddings, then the MONAI
Label strategies and scoring method on a real runtime (tiny backbone, phantom scans in a real datastore):
which scan each picks, the fall-back to diversity, the 404 when everything is labelled, unreadable scans."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import pytest
from fastapi import HTTPException

from medmeta_plugin.app.config import parse_conf
from medmeta_plugin.app.datastore import MedMetaDatastore
from medmeta_plugin.app.runtime import MedMetaRuntime
from medmeta_plugin.app.strategy import (
    DiversityStrategy,
    UncertaintyScoring,
    UncertaintyStrategy,
    select_diverse,
    select_uncertain,
)
from tests.app.conftest import app_conf

INFO = {"label_info": [{"name": "ball", "idx": 1}, {"name": "box", "idx": 2}]}

# ----- select_uncertain ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("scores", "expected"),
    [
        ({"a": 0.1, "b": 0.7, "c": 0.3}, ("b", 0.7)),
        ({"a": None, "b": 0.2, "c": None}, ("b", 0.2)),  # unscored scans are skipped
        ({"a": -1.0, "b": -0.5}, ("b", -0.5)),  # the highest, not the largest in magnitude
        ({"a": 0.5, "c": 0.5, "b": 0.5}, ("c", 0.5)),  # a tie goes to the last id, whatever the order given
        ({"only": 0.0}, ("only", 0.0)),  # a zero score is a score
        ({"a": None, "b": None}, None),
        ({}, None),
    ],
)
def test_select_uncertain_takes_the_highest_score(
    scores: dict[str, float | None], expected: tuple[str, float] | None
) -> None:
    assert select_uncertain(list(scores), scores.__getitem__) == expected


def test_select_uncertain_asks_each_candidate_once() -> None:
    asked: list[str] = []

    def score(image: str) -> float:
        asked.append(image)
        return float(len(image))

    assert select_uncertain(["a", "bbb", "cc"], score) == ("bbb", 3.0)
    assert asked == ["a", "bbb", "cc"]


# ----- select_diverse --------------------------------------------------------------------------------------

POINTS = {
    "origin": np.array([0.0, 0.0]),
    "near": np.array([1.0, 0.0]),
    "mid": np.array([3.0, 0.0]),
    "far": np.array([10.0, 0.0]),
    "up": np.array([0.0, 4.0]),
}


@pytest.mark.parametrize(
    ("candidates", "labelled", "expected"),
    [
        # Nothing labelled: the candidate closest to the mean (here (14/3, 0)) is the representative one.
        (["near", "mid", "far"], [], ("mid", abs(3.0 - 14 / 3))),
        (["far"], [], ("far", 0.0)),
        # The candidate whose nearest labelled scan is farthest.
        (["near", "mid", "far"], ["origin"], ("far", 10.0)),
        (["near", "mid", "up"], ["origin"], ("up", 4.0)),
        # With two labelled scans the nearest one counts: "far" is 7 from "mid", "up" 4 from "origin".
        (["far", "up"], ["origin", "mid"], ("far", 7.0)),
        (["far", "up"], ["origin", "far"], ("up", 4.0)),
        ([], ["origin"], None),
        ([], [], None),
    ],
)
def test_select_diverse_is_a_core_set_step(
    candidates: list[str], labelled: list[str], expected: tuple[str, float] | None
) -> None:
    chosen = select_diverse(candidates, labelled, POINTS.__getitem__)
    if expected is None:
        assert chosen is None
    else:
        assert chosen is not None and chosen[0] == expected[0]
        assert chosen[1] == pytest.approx(expected[1])


def test_select_diverse_returns_plain_python_values() -> None:
    chosen = select_diverse(["near", "far"], ["origin"], POINTS.__getitem__)
    assert chosen is not None
    assert type(chosen[0]) is str and type(chosen[1]) is float  # JSON-serialisable as the response


# ----- the MONAI Label strategies on a real runtime --------------------------------------------------------


def _runtime(tmp_path: Path, studies: dict, backbone: Path, **conf: str) -> MedMetaRuntime:
    datastore = MedMetaDatastore(str(studies["studies"]), extensions=["*.nii.gz"])
    # The atlas prior is not what is tested here: off, no registration runs (ITK's first load is slow).
    return MedMetaRuntime(
        parse_conf(app_conf(backbone, atlas="false", **conf)), tmp_path / "model", datastore
    )


@pytest.fixture
def runtime(tmp_path: Path, studies: dict, tiny_backbone: Path) -> MedMetaRuntime:
    return _runtime(tmp_path, studies, tiny_backbone)


def _distance(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b))


def test_diversity_first_picks_the_scan_nearest_the_mean_embedding(runtime: MedMetaRuntime) -> None:
    embeddings = {i: runtime.embedding(i) for i in ("a", "b", "c")}
    mean = np.mean(list(embeddings.values()), axis=0)
    nearest = min(embeddings, key=lambda i: _distance(embeddings[i], mean))
    chosen = DiversityStrategy(runtime)({}, runtime.datastore)
    assert chosen["id"] == nearest and chosen["strategy"] == "medmeta_diversity"
    assert chosen["score"] == pytest.approx(_distance(embeddings[nearest], mean), rel=1e-5)


def test_diversity_picks_the_unlabelled_scan_farthest_from_the_labelled(
    runtime: MedMetaRuntime, studies: dict
) -> None:
    runtime.datastore.save_label("a", str(studies["a"]), "final", dict(INFO))
    labelled = runtime.embedding("a")
    far = {i: _distance(runtime.embedding(i), labelled) for i in ("b", "c")}
    chosen = DiversityStrategy(runtime)({}, runtime.datastore)
    assert chosen["id"] == max(far, key=far.__getitem__)
    assert chosen["score"] == pytest.approx(max(far.values()), rel=1e-5)


def test_uncertainty_without_an_adapter_chooses_by_diversity(runtime: MedMetaRuntime, studies: dict) -> None:
    runtime.datastore.save_label("a", str(studies["a"]), "final", dict(INFO))
    diverse = DiversityStrategy(runtime)({}, runtime.datastore)
    chosen = UncertaintyStrategy(runtime)({}, runtime.datastore)
    assert chosen == {**diverse, "reason": "no structure adapted yet: chose by diversity"}


def test_uncertainty_picks_the_least_certain_unlabelled_scan(runtime: MedMetaRuntime, studies: dict) -> None:
    runtime.datastore.save_label("a", str(studies["a"]), "final", dict(INFO))
    runtime.adapt_now("ball")
    scores = {i: runtime.uncertainty(i) for i in ("b", "c")}
    assert all(isinstance(s, float) for s in scores.values())
    chosen = UncertaintyStrategy(runtime)({}, runtime.datastore)
    assert chosen == {
        "id": max(scores, key=scores.__getitem__),
        "score": max(scores.values()),
        "strategy": "medmeta_uncertainty",
    }


@pytest.mark.parametrize("strategy", [UncertaintyStrategy, DiversityStrategy])
def test_nothing_left_to_label_is_a_404(runtime: MedMetaRuntime, studies: dict, strategy: type) -> None:
    for image in ("a", "b", "c"):
        runtime.datastore.save_label(image, str(studies[image]), "final", dict(INFO))
    with pytest.raises(HTTPException) as caught:
        strategy(runtime)({}, runtime.datastore)
    assert caught.value.status_code == 404
    assert "every scan in the datastore has a final label" in caught.value.detail


def test_scoring_scores_every_unlabelled_scan_and_stores_it(runtime: MedMetaRuntime, studies: dict) -> None:
    runtime.datastore.save_label("a", str(studies["a"]), "final", dict(INFO))
    runtime.adapt_now("ball")
    scores = UncertaintyScoring(runtime)({}, runtime.datastore)["scores"]
    assert sorted(scores) == ["b", "c"]
    for image, score in scores.items():
        assert isinstance(score, float) and score == runtime.uncertainty(image)
        assert runtime.datastore.get_image_info(image)["medmeta_uncertainty"] == score


def test_scoring_skips_an_unreadable_scan_with_a_warning(
    tmp_path: Path, studies: dict, tiny_backbone: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (studies["studies"] / "junk.nii.gz").write_bytes(b"not an image")
    runtime = _runtime(tmp_path, studies, tiny_backbone)
    runtime.datastore.save_label("a", str(studies["a"]), "final", dict(INFO))
    runtime.adapt_now("ball")
    with caplog.at_level(logging.WARNING, logger="medmeta_plugin.app.strategy"):
        scores = UncertaintyScoring(runtime)({}, runtime.datastore)["scores"]
    assert sorted(scores) == ["b", "c"]
    assert any("cannot score junk" in r.getMessage() for r in caplog.records)


def test_uncertainty_is_a_422_when_no_unlabelled_scan_could_be_scored(
    tmp_path: Path, studies: dict, tiny_backbone: Path
) -> None:
    (studies["studies"] / "junk.nii.gz").write_bytes(b"not an image")
    runtime = _runtime(tmp_path, studies, tiny_backbone)
    for image in ("a", "b", "c"):
        runtime.datastore.save_label(image, str(studies[image]), "final", dict(INFO))
    runtime.start()  # adapts ball and box, then scores the unlabelled scans in the background
    try:
        deadline = time.monotonic() + 30
        while (runtime.stale_unlabelled() or not runtime.engine.tasks()) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert runtime.stale_unlabelled() == [], "the background scorer did not reach the unreadable scan"
    finally:
        runtime.worker.stop()
    with pytest.raises(HTTPException) as caught:
        UncertaintyStrategy(runtime)({}, runtime.datastore)
    assert caught.value.status_code == 422 and "could be scored" in caught.value.detail


@pytest.mark.parametrize("strategy", [UncertaintyStrategy, DiversityStrategy])
def test_an_unreadable_unlabelled_scan_is_skipped(
    tmp_path: Path, studies: dict, tiny_backbone: Path, strategy: type
) -> None:
    (studies["studies"] / "junk.nii.gz").write_bytes(b"not an image")
    runtime = _runtime(tmp_path, studies, tiny_backbone)
    runtime.datastore.save_label("a", str(studies["a"]), "final", dict(INFO))
    runtime.adapt_now("ball")
    assert strategy(runtime)({}, runtime.datastore)["id"] in {"b", "c"}
