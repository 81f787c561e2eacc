"""Benchmark suites: :meth:`EvalTask.draw_support` on hand-made pools, the three phantom suites' tasks
(sizes, kinds, balanced classes, binary masks, normalised images, seeds), and the real suites on tiny fake
scans under ``$MEDMETA_REAL_DATA`` (which structures make tasks, pool and query sizes, affines, and the
errors for missing data).

``tests/benchmarks/test_fewshot.py`` covers the abdominal and tumour suites' shared whole volumes and
their real-scan-first draws, that the phantom suite has a task per held-out family, seeded segmentation
draws, and an unknown suite name; it is not repeated here.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from medmeta_plugin.benchmarks.suites import SUITES, EvalTask, build_suite
from medmeta_plugin.episodes import HELDOUT_FAMILIES
from medmeta_plugin.io import ImageMeta, write_image

PHANTOM = (1, 48, 48, 48)  # the phantom suites' whole volumes
REAL_SUITES = sorted(name for name in SUITES if not name.startswith("synthetic"))


def _pool(n: int, classes: int | None = None) -> list[dict]:
    """``n`` items with distinct ids (per class when ``classes`` is given, class ``c`` first)."""
    if classes is None:
        return [{"id": i} for i in range(n)]
    return [{"id": (c, i), "class": c} for c in range(classes) for i in range(n)]


# ----- draw_support ----------------------------------------------------------------------------------------

VALID_DRAWS = [
    pytest.param("segmentation", _pool(8), False, 1, 1, id="one-shot"),
    pytest.param("segmentation", _pool(8), False, 8, 8, id="whole-pool"),
    pytest.param("regression", _pool(5), False, 3, 3, id="regression"),
    pytest.param("segmentation", _pool(5), True, 1, 1, id="original-only"),
    pytest.param("segmentation", _pool(5), True, 5, 5, id="original-and-every-copy"),
    pytest.param("classification", _pool(4, classes=2), False, 3, 6, id="two-classes"),
    pytest.param("classification", _pool(2, classes=3), False, 2, 6, id="three-classes"),
]


@pytest.mark.parametrize(("kind", "pool", "original_first", "shots", "size"), VALID_DRAWS)
def test_draws_hold_distinct_pool_items(
    kind: str, pool: list[dict], original_first: bool, shots: int, size: int
) -> None:
    num_outputs = len({it["class"] for it in pool}) if kind == "classification" else 1
    task = EvalTask("t", kind, num_outputs, pool, [], original_first=original_first)
    for seed in range(5):
        drawn = task.draw_support(shots, seed)
        assert len(drawn) == size and len({id(it) for it in drawn}) == size
        assert all(any(it is p for p in pool) for it in drawn)
        if original_first:
            assert drawn[0] is pool[0]
            assert all(it is not pool[0] for it in drawn[1:])


def test_classification_draws_take_shots_of_every_class_in_class_order() -> None:
    task = EvalTask("t", "classification", 3, _pool(5, classes=3), [])
    drawn = task.draw_support(2, seed=4)
    assert [it["class"] for it in drawn] == [0, 0, 1, 1, 2, 2]


@pytest.mark.parametrize(
    ("kind", "pool", "original_first"),
    [
        ("segmentation", _pool(12), False),
        ("segmentation", _pool(12), True),
        ("classification", _pool(6, classes=2), False),
    ],
)
def test_draws_are_seeded_and_vary_with_the_seed(kind: str, pool: list[dict], original_first: bool) -> None:
    task = EvalTask("t", kind, 2 if kind == "classification" else 1, pool, [], original_first=original_first)
    ids = [[it["id"] for it in task.draw_support(3, seed)] for seed in range(6)]
    assert ids == [[it["id"] for it in task.draw_support(3, seed)] for seed in range(6)]
    assert len({tuple(draw) for draw in ids}) > 1, "different seeds, different support sets"


INVALID_DRAWS = [
    pytest.param("segmentation", _pool(4), False, 5, id="more-than-the-pool"),
    pytest.param("segmentation", _pool(4), True, 5, id="more-than-the-copies"),
    pytest.param("classification", _pool(2, classes=2), False, 3, id="more-than-a-class"),
    pytest.param(
        "segmentation",
        _pool(4),
        False,
        0,
        id="no-shots",
    ),
    pytest.param(
        "classification",
        _pool(2, classes=2),
        False,
        0,
        id="no-shots-per-class",
    ),
]


@pytest.mark.parametrize(("kind", "pool", "original_first", "shots"), INVALID_DRAWS)
def test_impossible_draws_are_value_errors(
    kind: str, pool: list[dict], original_first: bool, shots: int
) -> None:
    task = EvalTask("t", kind, 2 if kind == "classification" else 1, pool, [], original_first=original_first)
    with pytest.raises(ValueError, match=rf"shots must be 1 to \d+ .*got {shots}"):
        task.draw_support(shots, seed=0)


# ----- phantom suites --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def heldout() -> list[EvalTask]:
    return build_suite("synthetic-heldout", seed=0)


@pytest.fixture(scope="module")
def classification() -> list[EvalTask]:
    return build_suite("synthetic-classification", seed=0)


@pytest.fixture(scope="module")
def regression() -> list[EvalTask]:
    return build_suite("synthetic-regression", seed=0)


def _normalised(image: torch.Tensor) -> bool:
    return (
        image.dtype == torch.float32
        and abs(float(image.mean())) < 1e-3
        and abs(float(image.std()) - 1) < 1e-2
    )


def _binary(mask: torch.Tensor) -> bool:
    return mask.dtype == torch.float32 and bool(((mask == 0) | (mask == 1)).all())


def test_phantom_segmentation_tasks(heldout: list[EvalTask]) -> None:
    for task in heldout:
        assert (task.kind, task.num_outputs, task.original_first) == ("segmentation", 1, False), task.name
        assert (len(task.support_pool), len(task.query)) == (8, 4), task.name
        for item in task.support_pool + task.query:
            assert tuple(item["image"].shape) == PHANTOM and tuple(item["label"].shape) == PHANTOM
            assert _binary(item["label"]) and bool(item["label"].any()), f"{task.name}: a non-empty mask"
            assert "affine" not in item, "phantoms carry no geometry for the atlas prior"
        assert not {id(it) for it in task.support_pool} & {id(it) for it in task.query}


def test_phantom_images_are_normalised_and_shared_between_the_structures_of_a_case(
    heldout: list[EvalTask],
) -> None:
    images = [it["image"] for task in heldout for it in task.support_pool + task.query]
    assert all(_normalised(im) for im in images)
    per_image: dict[int, int] = {}
    for image in images:
        per_image[id(image)] = per_image.get(id(image), 0) + 1
    assert max(per_image.values()) >= 2, "a phantom of 2-3 families serves each family's task"


def test_classification_tasks_are_balanced_and_classes_are_targets(classification: list[EvalTask]) -> None:
    assert [t.name for t in classification] == [f"contains_{f}" for f in HELDOUT_FAMILIES[:3]]
    for task in classification:
        assert (task.kind, task.num_outputs) == ("classification", 2)
        for part, size in ((task.support_pool, 6), (task.query, 6)):
            assert [it["target"] for it in part].count(1) == size and [it["target"] for it in part].count(
                0
            ) == size
        assert all(it["class"] == it["target"] for it in task.support_pool + task.query)
        assert all(tuple(it["image"].shape) == PHANTOM and _normalised(it["image"]) for it in task.query)
        drawn = task.draw_support(3, seed=1)
        assert [it["class"] for it in drawn] == [0, 0, 0, 1, 1, 1]


def test_regression_targets_are_positive_volumes_that_vary(regression: list[EvalTask]) -> None:
    assert [t.name for t in regression] == [f"volume_ml_{f}" for f in HELDOUT_FAMILIES[:3]]
    for task in regression:
        assert (task.kind, task.num_outputs) == ("regression", 1)
        assert (len(task.support_pool), len(task.query)) == (8, 8)
        targets = [it["target"] for it in task.support_pool + task.query]
        assert all(isinstance(t, float) and 0.0 < t < 1e4 for t in targets), targets
        assert len(set(targets)) == len(targets), "every phantom's structure has its own volume"


def test_phantom_suites_are_seeded(heldout: list[EvalTask]) -> None:
    again, other = build_suite("synthetic-heldout", seed=0), build_suite("synthetic-heldout", seed=1)
    assert [t.name for t in again] == [t.name for t in heldout]
    for a, b in zip(again, heldout):
        assert all(torch.equal(x["image"], y["image"]) for x, y in zip(a.support_pool, b.support_pool))
        assert all(torch.equal(x["label"], y["label"]) for x, y in zip(a.query, b.query))
    assert not torch.equal(other[0].support_pool[0]["image"], heldout[0].support_pool[0]["image"])


# ----- real suites on fake scans ---------------------------------------------------------------------------

CT, MR, BRAIN = (24, 20, 16), (20, 18, 8), (20, 22, 18)
CT_AFFINE = np.diag([3.0, 3.0, 3.0, 1.0])
MR_AFFINE = np.array([[3.0, 0, 0, 5.0], [0, 3.0, 0, -4.0], [0, 0, 3.0, 12.0], [0, 0, 0, 1]])
BRAIN_AFFINE = np.diag([2.0, 2.0, 2.0, 1.0])


def _write_scan(
    folder: Path, shape: tuple[int, int, int], affine: np.ndarray, names: tuple[str, ...]
) -> None:
    """A noisy scan with one 4x4x(2-4) box per structure (label values 1, 2, ... in ``names`` order)."""
    folder.mkdir(parents=True)
    label = np.zeros((1, *shape), np.uint8)
    depth = min(4, shape[2] // 2)
    for value in range(1, len(names) + 1):
        x = 2 + 5 * (value - 1)
        label[0, x : x + 4, 6:10, 2 : 2 + depth] = value
    rng = np.random.default_rng(len(names) + shape[0])
    image = (rng.normal(size=label.shape) + 2.0 * label).astype(np.float32)
    meta = ImageMeta.from_affine(affine, shape)
    write_image(folder / "image.nii.gz", image, meta)
    write_image(folder / "label.nii.gz", label, meta)
    (folder / "labels.json").write_text(json.dumps({str(v): n for v, n in enumerate(names, start=1)}))


@pytest.fixture
def real_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Both abdominal scans and the brain template. The CT labels a held-out structure, a development one
    and a development one the MR lacks; the brain a held-out pair and a development structure."""
    root = tmp_path / "real"
    _write_scan(root / "ct_abdomen_a", CT, CT_AFFINE, ("kidney_left", "adrenal_gland_left", "duodenum"))
    _write_scan(root / "mr_abdomen_d", MR, MR_AFFINE, ("adrenal_gland_left", "kidney_left"))
    _write_scan(
        root / "brain_mni152", BRAIN, BRAIN_AFFINE, ("Right-Hippocampus", "Left-Caudate", "Left-Hippocampus")
    )
    monkeypatch.setenv("MEDMETA_REAL_DATA", str(root))
    return root


@pytest.mark.parametrize(
    ("suite", "names"),
    [
        ("abdomen-ct-to-mr", ["kidney_left"]),
        ("abdomen-ct-to-mr-dev", ["adrenal_gland_left"]),  # duodenum: not labelled on the MR
        ("brain-heldout", ["Left-Hippocampus", "Right-Hippocampus"]),  # in the list's order
        ("brain-dev", ["Left-Caudate"]),
    ],
)
def test_real_suites_make_tasks_of_their_structures_that_the_scans_label(
    real_root: Path, suite: str, names: list[str]
) -> None:
    assert [t.name for t in build_suite(suite)] == names


def test_abdominal_tasks_support_on_the_ct_and_query_on_the_mr(real_root: Path) -> None:
    (task,) = build_suite("abdomen-ct-to-mr-dev", seed=3)
    assert (task.kind, task.num_outputs, task.original_first) == ("segmentation", 1, True)
    assert len(task.support_pool) == 5, "the CT and 4 deformed copies of it"
    assert all(tuple(it["image"].shape) == (1, *CT) for it in task.support_pool)
    np.testing.assert_allclose(task.support_pool[0]["affine"], CT_AFFINE)
    # adrenal_gland_left is value 2 on the CT, value 1 on the MR: each side's own value is masked.
    ct_mask, (query,) = task.support_pool[0]["label"], task.query
    assert float(ct_mask.sum()) == float(query["label"].sum()) == 4 * 4 * 4
    assert bool(ct_mask[0, 7:11, 6:10, 2:6].all()) and bool(query["label"][0, 2:6, 6:10, 2:6].all())
    np.testing.assert_allclose(query["affine"], MR_AFFINE)
    assert tuple(query["image"].shape) == (1, *MR) and _normalised(query["image"])
    copies = [it["image"] for it in task.support_pool[1:]]
    assert all(not torch.equal(c, task.support_pool[0]["image"]) for c in copies), "copies are deformed"


def test_brain_tasks_support_and_query_on_different_copies(real_root: Path) -> None:
    tasks = build_suite("brain-heldout", seed=0)
    for task in tasks:
        assert (task.original_first, len(task.support_pool), len(task.query)) == (False, 5, 2)
        items = task.support_pool + task.query
        assert all(tuple(it["image"].shape) == (1, *BRAIN) for it in items)
        assert all(np.allclose(it["affine"], BRAIN_AFFINE) for it in items)
        assert all(_binary(it["label"]) for it in items)
        assert all(float(q["label"].sum()) > 0 for q in task.query)
        for q in task.query:
            assert not any(torch.equal(q["image"], s["image"]) for s in task.support_pool)
    left, right = tasks
    assert all(a["image"] is b["image"] for a, b in zip(left.support_pool, right.support_pool))
    assert not torch.equal(left.query[0]["label"], right.query[0]["label"])


@pytest.mark.parametrize("suite", ["abdomen-ct-to-mr", "brain-dev"])
def test_real_suites_are_seeded(real_root: Path, suite: str) -> None:
    a, b, c = build_suite(suite, seed=5), build_suite(suite, seed=5), build_suite(suite, seed=6)
    for x, y in zip(a[0].support_pool, b[0].support_pool):
        assert torch.equal(x["image"], y["image"]) and torch.equal(x["label"], y["label"])
    assert not torch.equal(a[0].support_pool[1]["image"], c[0].support_pool[1]["image"])


@pytest.mark.parametrize(
    ("suite", "present", "missing"),
    [
        ("abdomen-ct-to-mr", (), "ct_abdomen_a"),
        ("abdomen-ct-to-mr", ("ct_abdomen_a",), "mr_abdomen_d"),
        ("abdomen-ct-to-mr-dev", (), "ct_abdomen_a"),
        ("brain-heldout", ("ct_abdomen_a",), "brain_mni152"),
        ("brain-dev", (), "brain_mni152"),
        ("brain-tumour", (), "mr_brain_tumour_1"),
        ("brain-tumour", ("mr_brain_tumour_1",), "mr_brain_tumour_2"),
    ],
)
def test_missing_real_data_names_the_folder_and_the_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, suite: str, present: tuple[str, ...], missing: str
) -> None:
    root = tmp_path / "real"
    root.mkdir()
    for folder in present:
        _write_scan(root / folder, MR, MR_AFFINE, ("kidney_left", "tumour"))
    monkeypatch.setenv("MEDMETA_REAL_DATA", str(root))
    with pytest.raises(ValueError, match=rf"real data not found at .*{missing}; set MEDMETA_REAL_DATA"):
        build_suite(suite)


def test_a_real_case_without_structures_is_a_value_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "real"
    (root / "brain_mni152").mkdir(parents=True)
    write_image(
        root / "brain_mni152" / "image.nii.gz",
        np.zeros((1, *BRAIN), np.float32),
        ImageMeta.from_affine(BRAIN_AFFINE, BRAIN),
    )
    monkeypatch.setenv("MEDMETA_REAL_DATA", str(root))
    with pytest.raises(ValueError, match="brain_mni152"):
        build_suite("brain-heldout")


def test_every_real_suite_reads_real_data() -> None:
    """The list the tests above cover: every suite but the phantom ones needs ``$MEDMETA_REAL_DATA``."""
    assert (
        sorted(["abdomen-ct-to-mr", "abdomen-ct-to-mr-dev", "brain-dev", "brain-heldout", "brain-tumour"])
        == REAL_SUITES
    )
