"""Answering a scan (``app/segmenting.py``): the mask-entropy score, each structure's provenance and its note,
the label values, one label map on the scan's own grid (the most probable structure above the threshold per
voxel, uint16 beyond 255 structures), a structure on its own labelled scan, volume-level predictions, and
the names a request may ask for.

The segmenter runs on the real serving stack (tiny backbone, phantom scans written as NIfTI/NRRD files by
``tests/app/conftest.py``, a real adapter store). Where a test needs known probabilities it serves real
head-mode adapters whose heads are set by hand (zero weights, a chosen bias: the same logit on every voxel),
as adaptation would hand them over. Registration-based answers are tested in ``test_engine.py``; the
provenance notes of registered scans are tested here on the placement records they are made from.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from medmeta_plugin.adapt.atlas import CarriedCase, CarriedPrior
from medmeta_plugin.app.config import AppConfig, parse_conf
from medmeta_plugin.app.features import FeatureCache
from medmeta_plugin.app.priors import AtlasPriors
from medmeta_plugin.app.segmenting import FOUND_BY, Provenance, Segmenter, _placed, mask_uncertainty
from medmeta_plugin.app.serving import Serving
from medmeta_plugin.io import read_image
from medmeta_plugin.networks import TaskAdapter, TaskInfo
from tests.app.conftest import GEOMETRIES, app_conf

CPU = torch.device("cpu")
ALONE = "the adapted network's answer alone"


def _segmenter(config: AppConfig, model_dir: Path) -> Segmenter:
    features = FeatureCache(config, CPU)
    serving = Serving(config, model_dir, features)
    return Segmenter(
        serving, features, AtlasPriors(features.scan, features.size_divisor, config.registration)
    )


def _config(tiny_backbone: Path, **conf: str) -> AppConfig:
    return parse_conf(app_conf(tiny_backbone, **{"device": "cpu", "atlas": "false", **conf}))


@pytest.fixture
def segmenter(tiny_backbone: Path, tmp_path: Path) -> Segmenter:
    """A segmenter with atlas priors off: every structure is answered by its head."""
    return _segmenter(_config(tiny_backbone), tmp_path / "model")


def _constant(
    segmenter: Segmenter,
    name: str,
    logit: float | list[float],
    kind: str = "segmentation",
    mode: str = "head",
) -> TaskAdapter:
    """A real adapter whose head gives ``logit`` (a list: one per output) everywhere, as adaptation hands it
    over (linear segmentation head)."""
    logits = [logit] if not isinstance(logit, list) else logit
    backbone = segmenter._serving.model.backbone
    adapter = TaskAdapter(TaskInfo(name, kind, mode, len(logits)), backbone)
    layer = adapter.head.conv if kind == "segmentation" else adapter.head.linear
    with torch.no_grad():
        layer.weight.zero_()
        layer.bias.copy_(torch.tensor(logits))
    return adapter


def _serve(segmenter: Segmenter, adapter: TaskAdapter, atlas: list | None = None) -> None:
    serving = segmenter._serving
    extra = {} if atlas is None else {"atlas": atlas}
    serving.serve(adapter.info.name, adapter, serving.model, shots=1, extra=extra)


def _scan(studies: dict, name: str) -> Path:
    return studies["studies"] / f"{name}.nii.gz"


# ----- mask_uncertainty ------------------------------------------------------------------------------------

LN2 = math.log(2.0)


@pytest.mark.parametrize(
    ("maps", "expected"),
    [
        pytest.param([], None, id="no-structure"),
        pytest.param([torch.full((2, 2, 2), 0.5)], 8 * LN2, id="all-unsure-nothing-predicted"),
        pytest.param([torch.zeros(2, 2, 2)], 0.0, id="sure-background"),
        pytest.param([torch.ones(2, 2, 2)], 0.0, id="sure-foreground"),
        # 4 unsure voxels at 0.5, 4 sure at 1: 4 ln 2 over (4 predicted + 1)
        pytest.param([torch.tensor([0.5] * 4 + [1.0] * 4).view(2, 2, 2)], 4 * LN2 / 5, id="per-predicted"),
        pytest.param([torch.full((2, 2, 2), 0.5), torch.ones(2, 2, 2)], 4 * LN2, id="mean-over-structures"),
    ],
)
def test_mask_uncertainty_is_boundary_entropy_per_predicted_voxel(maps: list, expected: float | None) -> None:
    score = mask_uncertainty(maps)
    if expected is None:
        assert score is None
    else:
        assert score == pytest.approx(expected, abs=1e-3)


def test_mask_uncertainty_ranks_by_unsure_boundary_not_by_size() -> None:
    # Two structures with the same 8 unsure boundary voxels: the larger one is the surer.
    small = torch.zeros(8, 8, 8)
    large = torch.zeros(8, 8, 8)
    small[0, 0, :8], large[0, 0, :8] = 0.6, 0.6
    small[2:4, 2:4, 2:4], large[2:7, 2:7, 2:7] = 1.0, 1.0
    assert mask_uncertainty([small]) > mask_uncertainty([large]) > 0


# ----- Provenance and its notes ----------------------------------------------------------------------------


@pytest.mark.parametrize(("confidence", "rounded"), [(0.123456, 0.123), (0.9996, 1.0), (None, None)])
def test_provenance_to_dict_rounds_the_confidence(confidence: float | None, rounded: float | None) -> None:
    found = Provenance("registered", 3, 2, confidence, True, "a note")
    assert found.to_dict() == {
        "found_by": "registered",
        "supports": 3,
        "sure_supports": 2,
        "confidence": rounded,
        "sure": True,
        "note": "a note",
    }


def _case(key: str, confidence: float | None, sure: bool, error: str | None = None) -> CarriedCase:
    return CarriedCase(key, sure, sure, confidence, None if error else "affine", 0.1, error)


PRIOR = np.ones((2, 2, 2), np.float32)
SURE, UNSURE, FAILED = _case("a", 0.9, True), _case("b", 0.3, False), _case("c", None, False, "no overlap")


@pytest.mark.parametrize(
    ("prior", "cases", "refine", "found_by", "sure_supports", "confidence", "note"),
    [
        pytest.param(
            PRIOR,
            [SURE],
            False,
            "registered",
            1,
            0.9,
            "registered: carried masks of 1 of 1 labelled scans placed sure (best confidence 0.90)",
            id="one-sure",
        ),
        pytest.param(
            PRIOR,
            [SURE, UNSURE, FAILED],
            True,
            "registered",
            1,
            0.9,
            "registered: carried masks of 1 of 3 labelled scans placed sure (best confidence 0.90), their "
            "boundary moved by the adapted head where it agrees; left out: 1 placed unsure (confidence 0.30 "
            "< 0.6); 1 could not be placed (no overlap)",
            id="sure-unsure-failed-refined",
        ),
        pytest.param(
            None,
            [FAILED],
            False,
            "network",
            0,
            None,
            f"no labelled scan could be placed on this scan (no overlap): {ALONE}",
            id="none-placed",
        ),
        pytest.param(
            None,
            [UNSURE],
            False,
            "network",
            0,
            0.3,
            f"placement unsure (confidence 0.30 < 0.6): {ALONE}",
            id="one-unsure",
        ),
        pytest.param(
            None,
            [UNSURE, _case("d", 0.45, False), FAILED],
            False,
            "network",
            0,
            0.45,
            "placement unsure on all 3 labelled scans (best confidence 0.45 < 0.6; 1 could not be placed): "
            + ALONE,
            id="all-unsure-one-failed",
        ),
    ],
)
def test_the_provenance_of_registered_scans_says_which_were_carried(
    prior, cases: list, refine: bool, found_by: str, sure_supports: int, confidence, note: str
) -> None:
    found = _placed(CarriedPrior(prior, tuple(cases)), len(cases), 0.6, refine)
    assert found.found_by == found_by and found.found_by in FOUND_BY
    assert (found.supports, found.sure_supports, found.confidence) == (len(cases), sure_supports, confidence)
    assert found.sure is (found_by == "registered")
    assert found.note == note


# ----- label values ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("labels", "names", "expected"),
    [
        pytest.param(None, ["spleen", "liver"], {"liver": 1, "spleen": 2}, id="alphabetical"),
        pytest.param(None, [], {}, id="none"),
        pytest.param(
            '{"liver": 3, "spleen": 1}',
            ["kidney", "spleen", "aorta", "liver"],
            {"spleen": 1, "liver": 3, "aorta": 4, "kidney": 5},
            id="configured-first-then-after-them",
        ),
        pytest.param('{"liver": 7}', ["ball"], {"ball": 8}, id="configured-values-stay-reserved"),
    ],
)
def test_label_values_follow_the_configured_names_then_the_alphabet(
    tiny_backbone: Path, tmp_path: Path, labels: str | None, names: list[str], expected: dict
) -> None:
    conf = {} if labels is None else {"labels": labels}
    segmenter = _segmenter(_config(tiny_backbone, **conf), tmp_path / "model")
    values = segmenter.label_values(names)
    assert values == expected and list(values.values()) == sorted(values.values())


# ----- segment ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ball", "box", "threshold", "expected"),
    [
        pytest.param(2.0, 1.0, "0.5", 1, id="ball-most-probable"),
        pytest.param(1.0, 2.0, "0.5", 2, id="box-most-probable"),
        pytest.param(-1.0, -2.0, "0.5", 0, id="both-below"),
        pytest.param(2.0, 1.0, "0.9", 0, id="both-below-a-higher-threshold"),  # sigmoid(2) = 0.88
        pytest.param(1.0, 2.5, "0.9", 2, id="only-box-above"),  # sigmoid(2.5) = 0.92
    ],
)
def test_each_voxel_gets_the_most_probable_structure_above_the_threshold(
    tiny_backbone: Path, tmp_path: Path, studies: dict, ball: float, box: float, threshold: str, expected: int
) -> None:
    segmenter = _segmenter(_config(tiny_backbone, threshold=threshold), tmp_path / "model")
    _serve(segmenter, _constant(segmenter, "ball", ball))
    _serve(segmenter, _constant(segmenter, "box", box))
    result = segmenter.segment(_scan(studies, "c"))  # the flipped scan: the answer is on its own grid
    assert result.names == {"ball": 1, "box": 2}
    assert result.labels.shape == (1, *GEOMETRIES["lps"].shape) and result.labels.dtype == np.uint8
    assert np.unique(result.labels).tolist() == [expected]
    np.testing.assert_allclose(result.meta.affine, read_image(_scan(studies, "c"))[1].affine)
    assert set(result.seconds) == {"scan", "priors", "backbone", "refiner", "heads", "model", "resample"}
    assert all(s >= 0 for s in result.seconds.values())
    for name in ("ball", "box"):
        found = result.provenance[name]
        assert (found.found_by, found.sure, found.note) == ("network", False, f"atlas off: {ALONE}")


def test_a_structures_value_does_not_depend_on_the_tasks_asked_for(
    segmenter: Segmenter, studies: dict
) -> None:
    for name, logit in (("ball", 2.0), ("box", 2.0), ("aorta", -3.0)):
        _serve(segmenter, _constant(segmenter, name, logit))
    result = segmenter.segment(_scan(studies, "a"), ["box"])
    assert result.names == {"box": 3} and set(result.provenance) == {"box"}
    assert np.unique(result.labels).tolist() == [3]
    everything = segmenter.segment(_scan(studies, "a"))
    assert everything.names == {"aorta": 1, "ball": 2, "box": 3}


def test_more_than_255_structures_are_written_as_uint16(segmenter: Segmenter, studies: dict) -> None:
    model = segmenter._serving.model
    for i in range(256):  # attached as adaptation's swap does (saving each would only cost time)
        model.attach(_constant(segmenter, f"s{i:03d}", -1.0 if i < 255 else 1.0))
    result = segmenter.segment(_scan(studies, "a"))
    assert len(result.names) == 256 and result.names["s255"] == 256
    assert result.labels.dtype == np.uint16 and np.unique(result.labels).tolist() == [256]


def test_a_structure_on_its_own_labelled_scan_is_its_label(
    tiny_backbone: Path, tmp_path: Path, studies: dict
) -> None:
    segmenter = _segmenter(_config(tiny_backbone, atlas="true"), tmp_path / "model")
    image = str(_scan(studies, "a"))
    # The head says "nowhere"; the scan's own label says where the ball is.
    _serve(
        segmenter,
        _constant(segmenter, "ball", -5.0),
        [{"image": image, "label": str(studies["a"]), "value": 1}],
    )
    result = segmenter.segment(image)
    truth = read_image(studies["a"])[0] == 1
    np.testing.assert_array_equal(result.labels == 1, truth)
    found = result.provenance["ball"]
    assert found.to_dict() == {
        "found_by": "label",
        "supports": 1,
        "sure_supports": None,
        "confidence": None,
        "sure": True,
        "note": "the scan's own label",
    }
    assert result.seconds["backbone"] == 0.0, "a structure answered by its label needs no backbone pass"
    assert segmenter.placements() == {"threshold": segmenter._atlas.placement.threshold, "recent": []}


@pytest.mark.parametrize(
    ("atlas", "note"),
    [
        pytest.param([], f"no labelled scan stored with the adapter: {ALONE}", id="no-labelled-scan"),
        pytest.param(
            [{"image": "gone.nii.gz", "label": "gone.nrrd", "value": 1}],
            "no atlas prior (none of the labelled scans of this structure can be read",
            id="labelled-scan-gone",
        ),
    ],
)
def test_without_a_prior_the_head_answers_and_says_so(
    tiny_backbone: Path, tmp_path: Path, studies: dict, atlas: list, note: str
) -> None:
    segmenter = _segmenter(_config(tiny_backbone, atlas="true"), tmp_path / "model")
    stored = [{**e, "image": str(tmp_path / e["image"]), "label": str(tmp_path / e["label"])} for e in atlas]
    _serve(segmenter, _constant(segmenter, "ball", 3.0), stored)
    result = segmenter.segment(_scan(studies, "b"))
    found = result.provenance["ball"]
    assert (found.found_by, found.supports, found.sure_supports, found.confidence, found.sure) == (
        "network",
        len(atlas),
        None,
        None,
        False,
    )
    assert note in found.note and found.note.endswith(ALONE)
    assert np.unique(result.labels).tolist() == [1], "the head's answer: sigmoid(3) everywhere"


def test_an_adapter_of_another_mode_runs_its_own_backbone_pass(segmenter: Segmenter, studies: dict) -> None:
    # A fresh film adapter is the identity: its own pass gives the shared features, so the same head answers
    # the same as in head mode.
    head = _constant(segmenter, "ball", 0.0)
    film = _constant(segmenter, "film_ball", 0.0, mode="film")
    with torch.no_grad():
        head.head.conv.weight.normal_(generator=torch.Generator().manual_seed(0))
        film.head.load_state_dict(head.head.state_dict())
    _serve(segmenter, head)
    _serve(segmenter, film)
    _, probs = segmenter.probabilities(_scan(studies, "a"))
    assert probs["ball"].shape == (24, 24, 24) and probs["ball"].std() > 0
    torch.testing.assert_close(probs["film_ball"], probs["ball"], rtol=1e-4, atol=1e-5)


# ----- predictions, uncertainty and embedding --------------------------------------------------------------


def test_volume_level_predictions(segmenter: Segmenter, studies: dict) -> None:
    _serve(segmenter, _constant(segmenter, "grade", [0.0, 2.0, -1.0], "classification"))
    _serve(segmenter, _constant(segmenter, "size_ml", 3.5, "regression"))
    _serve(segmenter, _constant(segmenter, "extent", [1.0, -1.0], "regression"))
    _serve(segmenter, _constant(segmenter, "ball", 1.0))  # a segmentation: not a prediction
    out = segmenter.predict(_scan(studies, "a"))
    assert sorted(out) == ["extent", "grade", "size_ml"]
    expected = torch.softmax(torch.tensor([0.0, 2.0, -1.0]), 0).tolist()
    assert out["grade"]["kind"] == "classification" and out["grade"]["class"] == 1
    assert out["grade"]["probabilities"] == pytest.approx(expected, abs=1e-6)
    assert out["size_ml"] == {"kind": "regression", "value": pytest.approx(3.5)}
    assert out["extent"] == {"kind": "regression", "values": pytest.approx([1.0, -1.0])}
    assert list(segmenter.predict(_scan(studies, "a"), ["size_ml"])) == ["size_ml"]


def test_uncertainty_and_embedding_of_a_scan(segmenter: Segmenter, studies: dict) -> None:
    scan = _scan(studies, "a")
    assert segmenter.uncertainty(scan) is None, "no segmentation adapter yet"
    _serve(segmenter, _constant(segmenter, "ball", 0.0))  # p = 0.5 on each of the 24^3 working voxels
    assert segmenter.uncertainty(scan) == pytest.approx(24**3 * LN2, rel=1e-4)
    embedding = segmenter.embedding(scan)
    backbone = segmenter._serving.model.backbone
    assert embedding.shape == (backbone.embedding_dim,) and embedding.dtype == np.float32
    np.testing.assert_array_equal(embedding, segmenter._serving.working(scan)[1].embedding[0].numpy())


@pytest.mark.parametrize(
    ("call", "tasks", "needle"),
    [
        pytest.param("segment", ["nope", "ball"], r"no adapted task \['nope'\]; adapted tasks: \['ball'\]"),
        pytest.param("probabilities", ["grade"], r"no adapted task \['grade'\]; adapted tasks: \['ball'\]"),
        pytest.param("predict", ["ball"], r"no adapted task \['ball'\]; adapted tasks: \['grade'\]"),
        pytest.param("predict", ["a", "b"], r"no adapted task \['a', 'b'\]"),
    ],
)
def test_asking_for_a_task_without_an_adapter_is_a_value_error_listing_the_adapted(
    segmenter: Segmenter, studies: dict, call: str, tasks: list[str], needle: str
) -> None:
    _serve(segmenter, _constant(segmenter, "ball", 1.0))
    _serve(segmenter, _constant(segmenter, "grade", [0.0, 1.0], "classification"))
    with pytest.raises(ValueError, match=needle):
        getattr(segmenter, call)(_scan(studies, "a"), tasks)


def test_nothing_adapted_yet_is_named_in_the_error(segmenter: Segmenter, studies: dict) -> None:
    with pytest.raises(ValueError, match="adapted tasks: none yet"):
        segmenter.segment(_scan(studies, "a"), ["ball"])
    assert segmenter.segment(_scan(studies, "a")).names == {}
