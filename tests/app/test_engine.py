"""The engine: adaptation from label files, inference on any grid, atomic versions, restore, refresh."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from medmeta_plugin.adapt.atlas import fuse, head_region
from medmeta_plugin.app.adapting import Example
from medmeta_plugin.app.config import parse_conf
from medmeta_plugin.app.engine import Engine
from medmeta_plugin.app.priors import _array
from medmeta_plugin.io import ImageMeta, read_image, write_image
from medmeta_plugin.networks import Refiner, TaskAdapter, save_refiner
from medmeta_plugin.networks.heads import POSITION_HIDDEN
from medmeta_plugin.networks.position import POSITION_CHANNELS
from medmeta_plugin.registration import Placement, PlacementConfig, Registration
from tests.app.conftest import GEOMETRIES, app_conf, phantom


@pytest.fixture
def engine(tmp_path: Path, tiny_backbone: Path) -> Engine:
    return Engine(parse_conf(app_conf(tiny_backbone)), tmp_path / "model")


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / max(1, a.sum() + b.sum()))


def test_one_shot_adaptation_segments_another_scan_on_its_own_grid(tmp_path: Path, studies: dict) -> None:
    # The shipped meta-trained backbone (the default): one labelled scan is enough for the ball.
    engine = Engine(parse_conf({"spacing": "2", "adapt_steps": "10"}), tmp_path / "model")
    image_a = str(studies["studies"] / "a.nii.gz")
    report, version = engine.adapt_task("ball", "segmentation", [Example(image_a, str(studies["a"]), 1)])
    assert version == 1 and report.shots == 1
    result = engine.segment(studies["studies"] / "c.nii.gz")  # the flipped scan, another spacing
    truth, meta = read_image(studies["c"])
    assert result.meta.shape == meta.shape and result.labels.shape == truth.shape
    np.testing.assert_allclose(result.meta.affine, meta.affine)
    assert result.names == {"ball": 1}
    assert _dice(result.labels[0] == 1, truth[0] == 1) > 0.8


def test_every_adaptation_is_a_new_version_and_restored_after_restart(
    engine: Engine, studies: dict, tiny_backbone: Path
) -> None:
    image_a = str(studies["studies"] / "a.nii.gz")
    image_b = str(studies["studies"] / "b.nii.gz")
    engine.adapt_task("box", "segmentation", [Example(image_a, str(studies["a"]), 2)])
    _, version = engine.adapt_task(
        "box",
        "segmentation",
        [Example(image_a, str(studies["a"]), 2), Example(image_b, str(studies["b"]), 2)],
    )
    assert version == 2 and engine.store.versions("box") == [1, 2]
    before = engine.segment(image_b).labels
    restarted = Engine(engine.config, engine.model_dir)
    assert restarted.versions() == {"box": 2}
    np.testing.assert_array_equal(restarted.segment(image_b).labels, before)


def test_failed_adaptation_keeps_the_served_adapter(engine: Engine, studies: dict) -> None:
    image_a = str(studies["studies"] / "a.nii.gz")
    engine.adapt_task("ball", "segmentation", [Example(image_a, str(studies["a"]), 1)])
    served = engine.tasks()["ball"]
    # The flipped scan's label does not lie on scan a's grid.
    with pytest.raises(ValueError, match="geometry"):
        engine.adapt_task("ball", "segmentation", [Example(image_a, str(studies["c"]), 1)])
    assert engine.tasks()["ball"] is served
    assert engine.versions() == {"ball": 1} and engine.store.versions("ball") == [1]


def test_refresh_picks_up_versions_written_by_another_process(engine: Engine, studies: dict) -> None:
    image_a = str(studies["studies"] / "a.nii.gz")
    other = Engine(engine.config, engine.model_dir)  # e.g. MONAI Label's train process
    other.adapt_task("ball", "segmentation", [Example(image_a, str(studies["a"]), 1)])
    assert "ball" not in engine.tasks()
    assert engine.refresh() == "adapters"
    assert engine.versions() == {"ball": 1}
    assert engine.refresh() is None


def test_memory_grows_by_the_adapters_only(engine: Engine, studies: dict) -> None:
    image_a = str(studies["studies"] / "a.nii.gz")
    backbone = sum(p.numel() for p in engine.model.backbone.parameters())
    engine.adapt_task("s000", "segmentation", [Example(image_a, str(studies["a"]), 1)])
    info = engine.model.task("s000").info
    for i in range(1, 100):  # further adapters as adaptation builds them (fitting each would only cost time)
        engine.model.attach(TaskAdapter(dataclasses.replace(info, name=f"s{i:03d}"), engine.model.backbone))
    assert len(engine.tasks()) == 100
    # A head-mode adapter is its head: a 1x1x1 convolution, plus the position head's per-voxel MLP.
    c, p, h = engine.model.backbone.feature_channels, POSITION_CHANNELS, POSITION_HIDDEN
    per_adapter = (c + 1) + ((c + p) * h + h + h + 1 if info.head == "position" else 0)
    assert sum(p.numel() for p in engine.model.task("s000").parameters()) == per_adapter < 1000
    assert sum(p.numel() for p in engine.model.parameters()) == backbone + 100 * per_adapter
    # One backbone pass serves all 100 structures.
    assert len(engine.segment(image_a).names) == 100


def test_client_errors_are_value_errors(engine: Engine, studies: dict, tmp_path: Path) -> None:
    image_a = str(studies["studies"] / "a.nii.gz")
    with pytest.raises(ValueError, match="no adapted task"):
        engine.segment(image_a, ["nope"])
    with pytest.raises(ValueError, match="cannot be read"):
        engine.segment(tmp_path / "missing.nii.gz")
    small = Engine(dataclasses.replace(engine.config, max_voxels=1000), tmp_path / "small")
    with pytest.raises(ValueError, match="max_voxels"):
        small.segment(image_a)
    with pytest.raises(ValueError, match="no labelled example"):
        engine.adapt_task("x", "segmentation", [])
    with pytest.raises(ValueError, match="invalid task name"):
        engine.adapt_task("../x", "segmentation", [Example(image_a, str(studies["a"]), 1)])


def test_concurrent_requests_for_one_scan_compute_it_once(engine: Engine, studies: dict, monkeypatch) -> None:
    import threading

    import medmeta_plugin.app.features as features_module

    calls = []
    original = features_module.load_working

    def counting(*args, **kwargs):
        calls.append(args[0])
        return original(*args, **kwargs)

    monkeypatch.setattr(features_module, "load_working", counting)
    image_a = str(studies["studies"] / "a.nii.gz")
    results = []
    threads = [threading.Thread(target=lambda: results.append(engine.working(image_a))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(results) == 4 and len(calls) == 1
    assert all(r[1] is results[0][1] for r in results)


def test_sliding_window_path_for_large_grids(tmp_path: Path, studies: dict, tiny_backbone: Path) -> None:
    # Working grids above whole_volume_voxels go through the backbone by sliding window.
    conf = parse_conf(app_conf(tiny_backbone, whole_volume_voxels="1000", roi="16"))
    engine = Engine(conf, tmp_path / "model")
    volume, base = engine.working(studies["studies"] / "a.nii.gz")
    assert base.features.shape[2:] == volume.image.shape[2:]
    assert base.embedding.shape == (1, engine.model.backbone.embedding_dim)


@pytest.mark.parametrize("whole_volume_voxels", ["1000", "4096000"])  # sliding window, one pass
def test_bf16_precision_gives_float32_features_near_fp32(
    tmp_path: Path, studies: dict, tiny_backbone: Path, whole_volume_voxels: str
) -> None:
    outputs = {}
    for precision in ("fp32", "bf16"):
        conf = app_conf(tiny_backbone, whole_volume_voxels=whole_volume_voxels, roi="16", precision=precision)
        engine = Engine(parse_conf(conf), tmp_path / f"model-{precision}")
        outputs[precision] = engine.working(studies["studies"] / "a.nii.gz")[1]
    fp32, bf16 = outputs["fp32"], outputs["bf16"]
    assert bf16.features.dtype is torch.float32 and bf16.embedding.dtype is torch.float32
    error = (bf16.features - fp32.features).abs()
    assert 0 < float(error.mean()) <= 0.02 * float(fp32.features.std()), "bf16 was used, and stayed close"


def _body_scan(meta: ImageMeta, ball_centre: np.ndarray, inverted: bool) -> tuple[np.ndarray, np.ndarray]:
    """A body (a 30 mm sphere of noisy tissue in air) holding a bright 9 mm ball, on ``meta``'s grid; with
    ``inverted`` the contrast inside the body is turned over (the ball dark), as another modality would,
    while air stays darkest, as in every modality. Returns image (1, X, Y, Z) and label (1, X, Y, Z)."""
    rng = np.random.default_rng(7)
    index = np.stack(np.meshgrid(*[np.arange(n) for n in meta.shape], indexing="ij"), axis=-1)
    world = index @ (np.asarray(meta.direction) * np.asarray(meta.spacing)).T + np.asarray(meta.origin)
    body = np.linalg.norm(world - np.array([40.0, 40.0, 40.0]), axis=-1) < 30.0
    ball = np.linalg.norm(world - ball_centre, axis=-1) < 9.0
    tissue = 1.0 + rng.normal(0.0, 0.15, meta.shape) + (-0.8 if inverted else 2.0) * ball
    image = np.where(body, tissue, 0.0 + rng.normal(0.0, 0.05, meta.shape))
    return image[None].astype(np.float32), ball[None].astype(np.uint8)


def test_atlas_prior_carries_a_structure_to_another_modality(tmp_path: Path) -> None:
    # The query stands for another modality: inside the body its contrast is turned over, so the ball the
    # head learned as bright on the labelled scan is dark there; and it is stored in LPS voxel order with the
    # patient moved. The labelled scan, placed and registered onto it by mutual information and gradients,
    # still says where the ball is; the adapted head alone does not.
    ras = ImageMeta((2.0, 2.0, 2.0), (0.0, 0.0, 0.0), ((1, 0, 0), (0, 1, 0), (0, 0, 1)), (40, 40, 40))
    lps = ImageMeta((2.0, 2.0, 2.0), (86.0, 74.0, 8.0), ((-1, 0, 0), (0, -1, 0), (0, 0, 1)), (44, 44, 40))
    shift = np.array([6.0, -6.0, 8.0])  # where the patient lies in the query's world
    studies = tmp_path / "studies"
    studies.mkdir()
    labelled, label = _body_scan(ras, np.array([48.0, 34.0, 40.0]), inverted=False)
    write_image(studies / "a.nii.gz", labelled, ras)
    write_image(tmp_path / "a_label.nrrd", label, ras)
    moved = dataclasses.replace(lps, origin=tuple(np.asarray(lps.origin) + shift))
    query, truth = _body_scan(lps, np.array([48.0, 34.0, 40.0]), inverted=True)
    write_image(studies / "b.nii.gz", query, moved)
    dice = {}
    for atlas in ("false", "true"):
        conf = {"spacing": "2", "adapt_steps": "10", "atlas": atlas}
        engine = Engine(parse_conf(conf), tmp_path / f"model-{atlas}")
        engine.adapt_task(
            "ball", "segmentation", [Example(str(studies / "a.nii.gz"), str(tmp_path / "a_label.nrrd"), 1)]
        )
        result = engine.segment(studies / "b.nii.gz")
        dice[atlas] = _dice(result.labels[0] == 1, truth[0] == 1)
    assert result.provenance["ball"].found_by == "registered", result.provenance["ball"]
    assert dice["false"] < 0.3 and dice["true"] > 0.7, dice


def test_atlas_examples_are_stored_with_the_adapter_and_survive_a_restart(
    engine: Engine, studies: dict
) -> None:
    image_a, image_b = str(studies["studies"] / "a.nii.gz"), str(studies["studies"] / "b.nii.gz")
    engine.adapt_task("ball", "segmentation", [Example(image_a, str(studies["a"]), 1)])
    assert engine.served_meta("ball")["atlas"] == [{"image": image_a, "label": str(studies["a"]), "value": 1}]
    # On its own labelled scan a structure's prior is its label.
    own = engine.segment(image_a).labels[0] == 1
    assert _dice(own, read_image(studies["a"])[0][0] == 1) > 0.95
    before = engine.segment(image_b).labels
    restarted = Engine(engine.config, engine.model_dir)
    np.testing.assert_array_equal(restarted.segment(image_b).labels, before)


def test_a_deleted_label_file_leaves_the_head_serving(engine: Engine, studies: dict, tmp_path: Path) -> None:
    image_a = str(studies["studies"] / "a.nii.gz")
    label = tmp_path / "gone.nrrd"
    label.write_bytes(studies["a"].read_bytes())
    engine.adapt_task("ball", "segmentation", [Example(image_a, str(label), 1)])
    label.unlink()
    result = engine.segment(studies["studies"] / "b.nii.gz")
    assert result.names == {"ball": 1} and result.labels.shape[1:] == (24, 24, 24)


def test_head_run_near_the_prior_only_gives_the_whole_volume_answer(
    tmp_path: Path, studies: dict, tiny_backbone: Path
) -> None:
    # With a prior and refine on, a head-mode head runs only where it can change the answer; fusing its
    # whole-volume logits must give the same answer everywhere and the same probabilities where the head
    # has a say.
    engine = Engine(parse_conf(app_conf(tiny_backbone, refine="true")), tmp_path / "model")
    image_a, image_c = str(studies["studies"] / "a.nii.gz"), str(studies["studies"] / "c.nii.gz")
    engine.adapt_task("ball", "segmentation", [Example(image_a, str(studies["a"]), 1)])
    volume, probs = engine.probabilities(image_c)
    served = engine._atlas.prior(image_c, volume, engine.atlas_examples("ball"))
    prior, distance, own = served.prior, served.distance, served.own
    _, base = engine.working(image_c)
    whole = volume.crop(engine._task_output(engine.tasks()["ball"], volume, base))[0, 0]
    expected = torch.sigmoid(fuse(whole.float(), prior, distance))
    assert not own and head_region(distance).float().mean() < 0.9, "the region is not the whole scan"
    region = head_region(distance)
    torch.testing.assert_close(probs["ball"][region], expected[region], rtol=0, atol=1e-5)
    assert torch.equal(probs["ball"] > 0.5, expected > 0.5)


def test_without_refine_a_structure_with_a_prior_is_its_carried_masks(engine: Engine, studies: dict) -> None:
    image_a, image_c = str(studies["studies"] / "a.nii.gz"), str(studies["studies"] / "c.nii.gz")
    assert not engine.config.refine  # the default
    engine.adapt_task("ball", "segmentation", [Example(image_a, str(studies["a"]), 1)])
    volume, probs = engine.probabilities(image_c)
    served = engine._atlas.prior(image_c, volume, engine.atlas_examples("ball"))
    prior, own = served.prior, served.own
    assert not own and (prior >= 0.5).any()
    assert torch.equal(probs["ball"] > 0.5, prior >= 0.5)


def test_structures_answered_by_their_prior_need_no_backbone_pass(
    engine: Engine, studies: dict, tiny_backbone: Path
) -> None:
    image_a, image_c = str(studies["studies"] / "a.nii.gz"), str(studies["studies"] / "c.nii.gz")
    engine.adapt_task("ball", "segmentation", [Example(image_a, str(studies["a"]), 1)])
    passes: list[int] = []
    engine.model.backbone.register_forward_hook(lambda *args: passes.append(1))
    engine.segment(image_c)
    assert not passes  # the carried masks answer: a new scan is only read and registered
    # The same adapter with refine on (restored from the model folder): the head runs, so the backbone does.
    refining = Engine(parse_conf(app_conf(tiny_backbone, refine="true")), engine.model_dir)
    refining.model.backbone.register_forward_hook(lambda *args: passes.append(1))
    refining.segment(image_c)
    assert passes


def _unsure(*args) -> Registration:
    """A registration whose placement was flagged unsure (confidence 0.21), the scan left where it is."""
    return Registration(
        np.eye(4), -0.5, 0.2, "affine", None, Placement(np.eye(4), 0.4, 0.1, 0.5, 0.3, 0.5, 0.21, False, 0.1)
    )


ALONE = "the adapted network's answer alone"
REGISTERED = "registered: carried masks of 1 of 1 labelled scans placed sure"
UNSURE = f"placement unsure (confidence 0.21 < 0.6): {ALONE}"


# ball adapted on scan a; conf, scan segmented, placement flagged unsure -> found_by, supports, sure_supports,
# sure, a part of the note
@pytest.mark.parametrize(
    ("conf", "query", "unsure", "found_by", "supports", "sure_supports", "sure", "note"),
    [
        pytest.param({}, "a", False, "label", 1, None, True, "the scan's own label", id="own-label"),
        pytest.param({}, "c", False, "registered", 1, 1, True, REGISTERED, id="registered"),
        pytest.param(
            {"refine": "true"}, "c", False, "registered", 1, 1, True, "by the adapted head", id="refined"
        ),
        pytest.param({}, "c", True, "network", 1, 0, False, UNSURE, id="placement-unsure"),
        pytest.param(
            {"atlas": "false"}, "c", False, "network", 1, None, False, f"atlas off: {ALONE}", id="atlas-off"
        ),
    ],
)
def test_each_answer_says_how_it_was_found(
    tmp_path: Path,
    studies: dict,
    tiny_backbone: Path,
    caplog: pytest.LogCaptureFixture,
    conf: dict,
    query: str,
    unsure: bool,
    found_by: str,
    supports: int,
    sure_supports: int | None,
    sure: bool,
    note: str,
) -> None:
    engine = Engine(parse_conf(app_conf(tiny_backbone, **conf)), tmp_path / "model")
    image_a = str(studies["studies"] / "a.nii.gz")
    engine.adapt_task("ball", "segmentation", [Example(image_a, str(studies["a"]), 1)])
    if unsure:
        engine._atlas.registrations.register = _unsure
    image = studies["studies"] / f"{query}.nii.gz"
    with caplog.at_level(logging.INFO, logger="medmeta_plugin.app.segmenting"):
        result = engine.segment(image)
    found = result.provenance["ball"]
    assert note in found.note
    if found_by == "registered":
        assert PlacementConfig().threshold <= found.confidence <= 1.0
    elif unsure:
        assert found.confidence == pytest.approx(0.21)
    else:
        assert found.confidence is None
    assert found.to_dict() == {
        "found_by": found_by,
        "supports": supports,
        "sure_supports": sure_supports,
        "confidence": None if found.confidence is None else round(found.confidence, 3),
        "sure": sure,
        "note": found.note,
    }
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("medmeta ball on")]
    assert len(lines) == 1 and f"found by {found_by}, sure {sure}" in lines[0] and found.note in lines[0]
    if found_by == "network" and unsure:
        # The unsure placement's carried mask is not served: the answer is the head's, as with atlas off.
        head_alone = Engine(dataclasses.replace(engine.config, atlas=False), engine.model_dir)
        np.testing.assert_array_equal(result.labels, head_alone.segment(image).labels)


def _refiner_file(folder: Path, bias: float) -> Path:
    """A tiny refiner whose head answers ``bias`` everywhere (its weights zeroed): a known answer."""
    refiner = Refiner((4, 8))
    with torch.no_grad():
        refiner.head.weight.zero_()
        refiner.head.bias.fill_(bias)
    return save_refiner(refiner, folder / f"refiner{bias:+g}")


@pytest.mark.parametrize("bias", [-50.0, 50.0])
def test_the_in_context_refiner_answers_on_the_box_of_the_carried_mask_and_says_so(
    tmp_path: Path, studies: dict, tiny_backbone: Path, bias: float
) -> None:
    conf = app_conf(tiny_backbone, incontext="true", refiner=str(_refiner_file(tmp_path, bias)))
    engine = Engine(parse_conf(conf), tmp_path / "model")
    image_a, image_c = str(studies["studies"] / "a.nii.gz"), studies["studies"] / "c.nii.gz"
    engine.adapt_task("ball", "segmentation", [Example(image_a, str(studies["a"]), 1)])
    result = engine.segment(image_c)
    found = result.provenance["ball"]
    assert (found.found_by, found.sure) == ("refined", True) and "in-context refiner" in found.note
    assert result.seconds["refiner"] > 0.0
    volume, probs = engine.probabilities(image_c)
    carried = engine._atlas.prior(str(image_c), volume, engine.atlas_examples("ball")).prior
    assert carried is not None and bool((carried >= 0.5).any())
    if bias < 0:  # the refiner says "not the ball" on its whole box, which holds the carried mask
        assert not bool((probs["ball"] > 0.5).any()) and not (result.labels == 1).any()
    else:  # it says "ball" on the whole box: the carried mask and the margin around it
        answer = probs["ball"] > 0.5
        assert bool(answer[carried >= 0.5].all()) and int(answer.sum()) > int((carried >= 0.5).sum())
    # Its own label is still the answer on the scan it was labelled on.
    own = engine.segment(image_a).provenance["ball"]
    assert own.found_by == "label"


def test_a_rescan_of_the_labelled_scan_keeps_the_carried_mask_and_says_why(
    tmp_path: Path, tiny_backbone: Path
) -> None:
    """The carried scan matches the query as a rescan does: nothing for the refiner to correct."""
    conf = app_conf(tiny_backbone, incontext="true", refiner=str(_refiner_file(tmp_path, -50.0)))
    engine = Engine(parse_conf(conf), tmp_path / "model")
    meta = GEOMETRIES["ras"]
    _, label = phantom(meta, 1)
    rng = np.random.default_rng(0)
    files = {}
    for name in ("scan", "rescan"):  # one anatomy scanned twice: the same structures, fresh faint noise
        image = 2.0 * (label == 1) - 1.5 * (label == 2) + rng.normal(0.0, 0.02, label.shape)
        files[name] = write_image(tmp_path / f"{name}.nii.gz", image.astype(np.float32), meta)
    labels = write_image(tmp_path / "scan-label.nrrd", label, meta)
    engine.adapt_task("ball", "segmentation", [Example(str(files["scan"]), str(labels), 1)])
    result = engine.segment(files["rescan"])
    found = result.provenance["ball"]
    assert found.found_by == "registered" and "kept as carried" in found.note and found.sure, found.note
    assert result.seconds["refiner"] == 0.0
    # The refiner would have said "not the ball" everywhere; the kept carried mask is the ball.
    assert _dice(result.labels[0] == 1, label[0] == 1) > 0.8  # the refiner alone: 0


def test_refine_and_incontext_are_not_both_on_and_the_refiner_must_exist(
    tmp_path: Path, tiny_backbone: Path
) -> None:
    with pytest.raises(ValueError, match="turn one off"):
        parse_conf(app_conf(tiny_backbone, incontext="true", refine="true"))
    with pytest.raises(ValueError, match="--conf refiner: no such file"):
        parse_conf(app_conf(tiny_backbone, incontext="true", refiner=str(tmp_path / "none.safetensors")))
    backbone = str(tiny_backbone)  # a backbone file is not a refiner: the engine refuses it at start
    with pytest.raises(ValueError, match="expected format 'medmeta-refiner'"):
        Engine(parse_conf(app_conf(tiny_backbone, incontext="true", refiner=backbone)), tmp_path / "m")


def test_some_placements_unsure_leave_the_sure_ones_serving(engine: Engine, studies: dict) -> None:
    image_a, image_b, image_c = (str(studies["studies"] / f"{n}.nii.gz") for n in "abc")
    examples = [Example(image_a, str(studies["a"]), 1), Example(image_b, str(studies["b"]), 1)]
    engine.adapt_task("ball", "segmentation", examples)
    real, scan_b = engine._atlas.registrations.register, _array(engine._atlas.working(image_b))
    engine._atlas.registrations.register = lambda q, qa, m, ma: (
        _unsure() if np.array_equal(m, scan_b) else real(q, qa, m, ma)
    )
    volume, probs = engine.probabilities(image_c)
    found = engine.segment(image_c).provenance["ball"]
    assert (found.found_by, found.supports, found.sure_supports, found.sure) == ("registered", 2, 1, True)
    assert "1 of 2" in found.note and "left out: 1 placed unsure (confidence 0.21 < 0.6)" in found.note
    # The answer is scan a's carried mask alone.
    served_a = engine._atlas.prior(image_c, volume, engine.atlas_examples("ball")[:1])
    assert torch.equal(probs["ball"] > 0.5, served_a.prior >= 0.5)
    pairs = {(r["support"], r["sure"]) for r in engine.placements()["recent"] if r["query"] == "c.nii.gz"}
    assert (
        pairs == {("a.nii.gz", True), ("b.nii.gz", False)}
        and engine.placements()["threshold"] == PlacementConfig().threshold
    )


def test_each_labelled_scan_gets_one_backbone_pass_across_adaptations(
    engine: Engine, studies: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Five labelled scans fit in the feature cache: adapting again does not repeat their passes."""
    import shutil

    import medmeta_plugin.app.features as features

    calls = []
    real = features.backbone_output
    monkeypatch.setattr(features, "backbone_output", lambda *a, **k: calls.append(1) or real(*a, **k))
    examples = []
    for i in range(5):  # five files of one scan: five cache entries
        image = tmp_path / f"copy{i}.nii.gz"
        shutil.copyfile(studies["studies"] / "a.nii.gz", image)
        examples.append(Example(str(image), str(studies["a"]), 1))
    engine.adapt_task("ball", "segmentation", examples)
    engine.adapt_task("ball", "segmentation", examples)
    assert len(calls) == 5
