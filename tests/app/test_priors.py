"""Atlas priors on the app's working grids: own label, sure placements only, the recent outcomes, warm-up."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from medmeta_plugin.adapt.atlas import CarriedCase, CarriedPrior
from medmeta_plugin.app.grid import load_working
from medmeta_plugin.app.priors import RECENT_PLACEMENTS, AtlasPriors, warm_up
from medmeta_plugin.registration import REGISTRATION_TRANSFORMS, Placement, Registration

DIVISOR = 4


def _priors() -> AtlasPriors:
    return AtlasPriors(lambda path: load_working(path, (2.0, 2.0, 2.0), DIVISOR, 512**3), lambda: DIVISOR)


def _identity(sure: bool, confidence: float):
    """A ``register`` that puts every scan where it is, with a placement of the given confidence."""
    placement = Placement(np.eye(4), 2.0, 1.0, 0.8, 0.6, 0.9, confidence, sure, 0.1)
    return lambda *args: Registration(np.eye(4), -0.5, 0.7, "affine", None, placement)


@pytest.mark.parametrize(
    ("query", "supports", "sure", "expected"),
    [
        ("a", ["a"], True, "own"),  # labelled on this very scan: its label, nothing registered
        ("a", ["a", "b"], False, "own"),
        ("b", ["a"], True, "carried"),
        ("b", ["a"], False, "none"),  # the only placement is unsure: no prior
        ("c", ["a", "b"], False, "none"),
    ],
)
def test_a_prior_is_the_own_label_or_the_scans_placed_sure(
    studies: dict, query: str, supports: list[str], sure: bool, expected: str
) -> None:
    priors = _priors()
    priors.registrations.register = _identity(sure, 0.9 if sure else 0.2)
    image = str(studies["studies"] / f"{query}.nii.gz")
    examples = [
        {"image": str(studies["studies"] / f"{s}.nii.gz"), "label": str(studies[s]), "value": 1}
        for s in supports
    ]
    served = priors.prior(image, priors.working(image), examples)
    assert served.supports == len(supports) and served.own == (expected == "own")
    if expected == "own":
        assert served.carried is None and served.prior is not None
        assert priors.recent() == []  # nothing was registered
        return
    assert [c.sure for c in served.carried.cases] == [sure] * len(supports)
    assert (served.prior is None) == (expected == "none") and (served.distance is None) == (
        expected == "none"
    )
    recent = priors.recent()
    assert [(r["query"], r["support"]) for r in recent] == [
        (f"{query}.nii.gz", f"{s}.nii.gz") for s in supports
    ]
    assert all(r["sure"] == sure and r["confidence"] == (0.9 if sure else 0.2) for r in recent)
    assert all(r["transform"] == "affine" and r["seconds"] == 0.7 and r["error"] is None for r in recent)
    # with the figures the confidence came from
    assert all((r["score"], r["margin"], r["overlap"]) == (2.0, 1.0, 0.8) for r in recent)


def test_recent_placements_are_bounded_and_one_per_pair() -> None:
    priors = _priors()

    def record(thread: int) -> None:
        for i in range(40):
            case = CarriedCase(f"support-{i % 5}", True, True, 0.9, "affine", 1.0)
            images = {case.key: f"/scans/s{i % 5}.nii.gz"}
            for _ in range(2):  # the same pair twice
                priors._remember(
                    f"q-{thread}-{i}", f"/scans/q{thread}-{i}.nii.gz", CarriedPrior(None, (case,)), images
                )

    threads = [threading.Thread(target=record, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    recent = priors.recent()
    assert len(recent) == RECENT_PLACEMENTS
    assert len({(r["query"], r["support"]) for r in recent}) == RECENT_PLACEMENTS  # each pair once
    assert set(recent[0]) == {"query", "support", "confidence", "sure", "transform", "seconds", "error"}


@pytest.mark.parametrize("transform", REGISTRATION_TRANSFORMS)
def test_app_warm_up_runs_the_whole_path_of_each_transform(transform: str) -> None:
    """The app's background warm-up places, registers and carries a mask with the configured transform."""
    prior = warm_up(transform)
    blob = np.zeros((24, 24, 24), bool)
    blob[6:18, 6:18, 6:18] = True  # where the warm-up's volume is bright; its mask also holds noise voxels
    assert prior.shape == blob.shape
    assert prior[blob].mean() > 0.85 and prior[~blob].mean() < 0.25
