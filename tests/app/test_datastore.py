"""The app's datastore (``app/datastore.py``): DICOM series folders as images (ids that are whole UIDs, a
label on one surviving a restart), validated image uploads, labels checked before they are stored (the parsed
submission stored with them, OHIF's ``label.bin`` converted voxel for voxel, a label declaring far more
voxels than its image refused from its header), and what adaptation reads back: ``current_label``,
``stored_submission`` and ``collect_examples``.

Each test builds a real :class:`MedMetaDatastore` on a studies folder of phantom scans written as NIfTI files
(``tests/app/conftest.py``). The same refusals over HTTP are tested in ``test_app.py``, full disks in
``test_datastore_writes.py``, revisions and restores in ``test_revisions.py``.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from fastapi import HTTPException

from medmeta_plugin.app.adapting import Example
from medmeta_plugin.app.datastore import MedMetaDatastore, collect_examples, current_label, stored_submission
from medmeta_plugin.app.labels import Submission, VolumeTarget
from medmeta_plugin.io import ImageMeta, read_image, read_label, write_dicom_series, write_image
from tests.app.conftest import GEOMETRIES, phantom

INFO = {"label_info": [{"name": "ball", "idx": 1}, {"name": "box", "idx": 2}]}
UID = "1.2.826.0.1.3680043.8.498.777"  # a series folder named by its UID: its dots are not extensions


def _store(studies: dict, **kwargs) -> MedMetaDatastore:
    return MedMetaDatastore(str(studies["studies"]), extensions=["*.nii.gz"], **kwargs)


@pytest.fixture
def store(studies: dict) -> MedMetaDatastore:
    return _store(studies)


def _series(folder: Path, seed: int = 5) -> list[Path]:
    image, _ = phantom(GEOMETRIES["ras"], seed)
    return write_dicom_series(folder, np.round(image * 100).astype(np.int16), GEOMETRIES["ras"])


def _listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name != ".lock")


# ----- DICOM series folders --------------------------------------------------------------------------------


def _layout(studies: Path, layout: str) -> str:
    """Make one folder in the studies folder; returns its name."""
    name = {"hidden": ".series", "labels": "labels"}.get(layout, "series1")
    folder = studies / name
    if layout in ("dcm", "hidden", "labels"):
        _series(folder)
    elif layout == "magic":  # DICOM files as PACS exports often name them: no suffix, the DICM preamble
        for path in _series(folder):
            path.rename(path.with_suffix(""))
    elif layout == "text":
        folder.mkdir()
        (folder / "notes.txt").write_text("not a scan\n" * 40)
    elif layout == "short":
        folder.mkdir()
        (folder / "x").write_bytes(b"DICM")  # shorter than the 128-byte preamble
    else:
        folder.mkdir()
    return name


@pytest.mark.parametrize(
    ("layout", "listed"),
    [
        ("dcm", True),
        ("magic", True),
        ("hidden", False),
        ("labels", False),
        ("text", False),
        ("short", False),
        ("empty", False),
    ],
)
def test_a_folder_of_dicom_files_is_an_image(studies: dict, layout: str, listed: bool) -> None:
    name = _layout(studies["studies"], layout)
    store = _store(studies)
    assert (name in store.list_images()) is listed
    assert {"a", "b", "c"} <= set(store.list_images())
    if listed:
        assert Path(store.get_image_uri(name)) == studies["studies"] / name
        assert read_image(store.get_image_uri(name))[1].shape == GEOMETRIES["ras"].shape


def test_a_label_on_a_dicom_series_is_stored_under_its_whole_uid_and_survives_a_restart(
    studies: dict, tmp_path: Path
) -> None:
    _series(studies["studies"] / UID)
    store = _store(studies)
    assert UID in store.list_images(), "the UID whole, not cut at its first dot"
    _, label = phantom(GEOMETRIES["ras"], 5)
    path = write_image(tmp_path / "series-label.nii.gz", label, GEOMETRIES["ras"])
    assert store.save_label(UID, str(path), "final", dict(INFO)) == UID
    assert store.get_label_uri(UID, "final").endswith(f"{UID}.nii.gz")
    restarted = _store(studies)
    assert restarted.get_labeled_images("final") == [UID]
    (example,) = collect_examples(restarted)["ball"].examples
    assert Path(example.image) == studies["studies"] / UID
    assert (example.label, example.value) == (restarted.get_label_uri(UID, "final"), 1)
    with pytest.raises(HTTPException) as caught:
        restarted.add_image(UID, str(studies["studies"] / "a.nii.gz"), {})
    assert caught.value.status_code == 409


# ----- add_image -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("image_id", "filename", "limits", "expected"),
    [
        pytest.param("", "scan_7.nii.gz", None, "scan_7", id="id-from-the-file-name"),
        pytest.param("new_scan", "upload.nii.gz", None, "new_scan", id="given-id"),
        pytest.param(
            "new.scan-2", "upload.nii.gz", ((2.0, 2.0, 2.0), 24**3), "new.scan-2", id="within-limits"
        ),
    ],
)
def test_an_uploaded_image_is_stored_under_its_id(
    studies: dict, tmp_path: Path, image_id: str, filename: str, limits, expected: str
) -> None:
    store = _store(studies, limits=limits)
    upload = tmp_path / filename
    shutil.copyfile(studies["studies"] / "b.nii.gz", upload)
    assert store.add_image(image_id, str(upload), {}) == expected
    assert expected in store.list_images()
    stored = Path(store.get_image_uri(expected))
    assert stored == studies["studies"] / f"{expected}.nii.gz"
    np.testing.assert_array_equal(read_image(stored)[0], read_image(upload)[0])


@pytest.mark.parametrize(
    ("image_id", "content", "limits", "status", "needle"),
    [
        pytest.param("../escape", None, None, 400, "invalid image id '../escape'", id="path-in-the-id"),
        pytest.param(".hidden", None, None, 400, "invalid image id", id="hidden-id"),
        pytest.param("new_scan", b"\x1f\x8b not a NIfTI", None, 400, "image upload refused", id="unreadable"),
        pytest.param("a", None, None, 409, "image 'a' already exists", id="id-in-use"),
        pytest.param(
            "new_scan",
            None,
            ((1.0, 1.0, 1.0), 20**3),
            413,
            "image upload refused: .*max_voxels",
            id="too-large",
        ),
    ],
)
def test_a_refused_upload_is_an_http_error_and_stores_nothing(
    studies: dict,
    tmp_path: Path,
    image_id: str,
    content: bytes | None,
    limits,
    status: int,
    needle: str,
) -> None:
    store = _store(studies, limits=limits)
    upload = tmp_path / "upload.nii.gz"
    if content is None:
        shutil.copyfile(studies["studies"] / "b.nii.gz", upload)
    else:
        upload.write_bytes(content)
    before = (_listing(studies["studies"]), sorted(store.list_images()))
    with pytest.raises(HTTPException, match=needle) as caught:
        store.add_image(image_id, str(upload), {})
    assert caught.value.status_code == status
    assert (_listing(studies["studies"]), sorted(store.list_images())) == before
    assert not (tmp_path / "escape.nii.gz").exists()


# ----- save_label ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("params", "fallback", "structures", "targets"),
    [
        pytest.param(INFO, None, {"ball": 1, "box": 2}, {}, id="slicer-label-info"),
        pytest.param({"label_info": {"ball": 1, "box": 2}}, None, {"ball": 1, "box": 2}, {}, id="mapping"),
        pytest.param(
            {
                **INFO,
                "targets": {"grade": {"kind": "classification", "value": 1, "num_classes": 3}, "size": 30.5},
            },
            None,
            {"ball": 1, "box": 2},
            {
                "grade": {"kind": "classification", "value": 1, "num_classes": 3},
                "size": {"kind": "regression", "value": 30.5},
            },
            id="with-targets",
        ),
        # Configured names: only the values present in the label count (no liver in it).
        pytest.param({}, {"ball": 1, "box": 2, "liver": 3}, {"ball": 1, "box": 2}, {}, id="fallback-names"),
    ],
)
def test_a_saved_label_carries_its_parsed_submission(
    studies: dict, params: dict, fallback: dict | None, structures: dict, targets: dict
) -> None:
    store = _store(studies, fallback_labels=fallback)
    assert store.save_label("a", str(studies["a"]), "final", dict(params)) == "a"
    info = store.get_label_info("a", "final")
    assert info["medmeta"] == {"structures": structures, "targets": targets}
    assert {k: v for k, v in info.items() if k in params} == params, "the client's params are kept"
    uri, current = current_label(store, "a", "final")
    np.testing.assert_array_equal(read_label(uri)[0], read_label(studies["a"])[0])
    assert current == info


def test_an_ohif_label_bin_is_stored_as_nifti_voxel_for_voxel(
    store: MedMetaDatastore, studies: dict, tmp_path: Path
) -> None:
    _, label = phantom(GEOMETRIES["ras"], 2)
    raw = tmp_path / "label.bin"
    raw.write_bytes(label[0].astype(np.uint8).tobytes(order="F"))  # OHIF: x fastest
    temporary = set(Path(tempfile.gettempdir()).glob("medmeta-bin-*"))
    store.save_label("b", str(raw), "final", dict(INFO))
    stored = Path(store.get_label_uri("b", "final"))
    assert stored.name == "b.nii.gz"
    array, _ = read_label(stored, read_image(studies["studies"] / "b.nii.gz")[1])
    np.testing.assert_array_equal(array, label)
    assert set(Path(tempfile.gettempdir()).glob("medmeta-bin-*")) == temporary, "the conversion is removed"


def _label_of_shape(tmp_path: Path, shape: tuple[int, int, int]) -> Path:
    meta = ImageMeta((2.0, 2.0, 2.0), (0.0, 0.0, 0.0), ((1, 0, 0), (0, 1, 0), (0, 0, 1)), shape)
    return write_image(
        tmp_path / f"label-{'x'.join(map(str, shape))}.nii.gz", np.zeros((1, *shape), np.uint8), meta
    )


@pytest.mark.parametrize(
    ("image", "label", "params", "status", "needle"),
    [
        pytest.param("nope", "a", INFO, 404, "image 'nope' is not in the datastore", id="unknown-image"),
        pytest.param(
            "a", "a", {"label_info": [{"name": "ball", "idx": 300}]}, 400, "must be in 1..255", id="bad-value"
        ),
        pytest.param(
            "a", "a", {"label_info": "ball"}, 400, "label_info must be a list", id="label-info-text"
        ),
        pytest.param("a", "a", {}, 400, "the label names no structure", id="no-names-no-fallback"),
        # 24 x 24 x 120 = 5 x the image's voxels: refused from its header, unread
        pytest.param(
            "a", (24, 24, 120), INFO, 400, r"far more than its image's \(24, 24, 24\)", id="5x-voxels"
        ),
        # exactly 4 x the image's voxels: read, and refused by its geometry
        pytest.param(
            "a", (24, 24, 96), INFO, 400, r"geometry of image .*shape \(24, 24, 96\)", id="4x-voxels"
        ),
        pytest.param("a", "c", INFO, 400, "label for image 'a' refused", id="another-grid"),
    ],
)
def test_a_refused_label_is_an_http_error_and_stores_nothing(
    store: MedMetaDatastore,
    studies: dict,
    tmp_path: Path,
    image: str,
    label,
    params: dict,
    status: int,
    needle: str,
) -> None:
    path = studies[label] if isinstance(label, str) else _label_of_shape(tmp_path, label)
    with pytest.raises(HTTPException, match=needle) as caught:
        store.save_label(image, str(path), "final", dict(params))
    assert caught.value.status_code == status
    assert store.get_labeled_images("final") == [] and current_label(store, "a", "final") is None
    assert not (studies["studies"] / "labels" / "final").exists() or not any(
        (studies["studies"] / "labels" / "final").iterdir()
    )


# ----- current_label ---------------------------------------------------------------------------------------


def test_current_label_is_the_stored_file_and_info_or_none(store: MedMetaDatastore, studies: dict) -> None:
    assert current_label(store, "a", "final") is None
    store.save_label("a", str(studies["a"]), "final", dict(INFO))
    uri, info = current_label(store, "a", "final")
    assert Path(uri) == studies["studies"] / "labels" / "final" / "a.nrrd" and info["medmeta"]["structures"]
    info["changed"] = True
    assert "changed" not in store.get_label_info("a", "final"), "a copy of the info"
    assert current_label(store, "a", "original") is None and current_label(store, "b", "final") is None
    Path(uri).unlink()  # deleted from the disk, still in the index
    assert current_label(store, "a", "final") is None


# ----- stored_submission -----------------------------------------------------------------------------------


def _by_hand(studies: dict, image: str = "a", info: dict | None = None, **kwargs) -> MedMetaDatastore:
    """A label file put in the studies folder by hand (not through the app), then the datastore opened."""
    folder = studies["studies"] / "labels" / "final"
    folder.mkdir(parents=True, exist_ok=True)
    label, meta = read_image(studies[image])
    write_image(folder / f"{image}.nii.gz", label.astype(np.uint8), meta)
    store = _store(studies, **kwargs)
    if info is not None:
        store.update_label_info(image, "final", info)
    return store


@pytest.mark.parametrize(
    ("how", "fallback", "expected"),
    [
        pytest.param("none", {}, None, id="no-label"),
        pytest.param(
            "saved",
            {},
            Submission(
                {"ball": 1, "box": 2},
                (VolumeTarget("grade", "classification", 1, 3), VolumeTarget("size", "regression", 30.5)),
            ),
            id="saved-with-targets",
        ),
        pytest.param(
            "by-hand", {"ball": 1}, Submission({"ball": 1}, (), from_fallback=True), id="by-hand-fallback"
        ),
        pytest.param(
            "by-hand-named", {"liver": 3}, Submission({"ball": 1, "box": 2}), id="by-hand-with-label-info"
        ),
        pytest.param("by-hand-bad-names", {}, None, id="by-hand-names-that-do-not-parse"),
    ],
)
def test_stored_submission_reads_what_the_label_was_saved_with(
    studies: dict, how: str, fallback: dict, expected: Submission | None, caplog: pytest.LogCaptureFixture
) -> None:
    if how in ("none", "saved"):
        store = _store(studies)
        if how == "saved":
            targets = {"grade": {"kind": "classification", "value": 1, "num_classes": 3}, "size": 30.5}
            store.save_label("a", str(studies["a"]), "final", {**INFO, "targets": targets})
    else:
        info = {
            "by-hand": None,
            "by-hand-named": {"label_info": [{"name": "ball", "idx": 1}, {"name": "box", "idx": 2}]},
            "by-hand-bad-names": {"label_info": [{"name": "../ball", "idx": 1}]},
        }[how]
        store = _by_hand(studies, info=info)
    with caplog.at_level(logging.WARNING, logger="medmeta_plugin.app.datastore"):
        assert stored_submission(store, "a", fallback) == expected
    assert ("invalid structure name" in caplog.text) is (how == "by-hand-bad-names")
    assert stored_submission(store, "a", fallback, tag="original") is None


# ----- collect_examples ------------------------------------------------------------------------------------


def test_collect_examples_gathers_every_tasks_examples_oldest_label_first(
    store: MedMetaDatastore, studies: dict, tmp_path: Path
) -> None:
    label_b, meta_b = read_image(studies["b"])
    no_box = write_image(
        tmp_path / "b-no-box.nrrd", np.where(label_b == 2, 0, label_b).astype(np.uint8), meta_b
    )
    store.save_label("a", str(studies["a"]), "final", dict(INFO))
    store.save_label("b", str(no_box), "final", dict(INFO))  # box named, none of it: "absent here"
    targets = {"grade": {"kind": "classification", "value": 2, "num_classes": 3}, "size": 30.5}
    store.save_label("c", str(studies["c"]), "final", {**INFO, "targets": targets})
    for image, ts in (("a", 300), ("b", 100), ("c", 200)):  # b was labelled first, then c, then a
        store.update_label_info(image, "final", {"ts": ts})
    store.save_label("a", str(studies["a"]), "original", dict(INFO))  # another tag: not collected
    uri = {i: store.get_image_uri(i) for i in "abc"}
    label = {i: store.get_label_uri(i, "final") for i in "abc"}
    examples = collect_examples(store)
    assert sorted(examples) == ["ball", "box", "grade", "size"]
    assert examples["ball"].examples == [Example(uri[i], label[i], 1) for i in "bca"]
    assert examples["box"].examples == [Example(uri[i], label[i], 2) for i in "bca"]
    assert (examples["ball"].kind, examples["ball"].num_outputs) == ("segmentation", None)
    assert (examples["grade"].kind, examples["grade"].num_outputs) == ("classification", 3)
    assert examples["grade"].examples == [Example(uri["c"], target=2)]
    assert (examples["size"].kind, examples["size"].num_outputs) == ("regression", None)
    assert examples["size"].examples == [Example(uri["c"], target=30.5)]


def test_collect_examples_skips_labels_whose_names_do_not_parse(studies: dict) -> None:
    store = _by_hand(studies, info={"label_info": [{"name": "../ball", "idx": 1}]})
    store.save_label("b", str(studies["b"]), "final", dict(INFO))
    examples = collect_examples(store)
    assert [ex.image for ex in examples["ball"].examples] == [store.get_image_uri("b")]


def test_nothing_labelled_collects_nothing(store: MedMetaDatastore) -> None:
    assert collect_examples(store, {"ball": 1}) == {}


def test_a_label_placed_by_hand_makes_no_negative_of_configured_names_it_lacks(studies: dict) -> None:
    fallback = {"ball": 1, "box": 2, "liver": 3}  # the label holds ball and box, no liver
    store = _by_hand(studies, fallback_labels=fallback)
    examples = collect_examples(store, fallback)
    assert sorted(examples) == ["ball", "box"]


def test_collect_examples_of_another_tag(store: MedMetaDatastore, studies: dict) -> None:
    store.save_label("a", str(studies["a"]), "original", dict(INFO))
    examples = collect_examples(store, tag="original")
    assert [ex.label for ex in examples["ball"].examples] == [store.get_label_uri("a", "original")]
