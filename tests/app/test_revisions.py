"""Label revisions: every label the datastore accepts is kept; restores are revisions too; the tag race."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from medmeta_plugin.app.datastore import MedMetaDatastore, current_label
from medmeta_plugin.app.revisions import RevisionStore, SavedTags
from medmeta_plugin.io import read_image, read_label, write_image
from tests.app.conftest import GEOMETRIES, phantom, save_label

INFO = {"label_info": [{"name": "ball", "idx": 1}, {"name": "box", "idx": 2}]}


def _studies(root: Path) -> MedMetaDatastore:
    folder = root / "studies"
    folder.mkdir(parents=True)
    image, _ = phantom(GEOMETRIES["ras"], 1)
    write_image(folder / "a.nii.gz", image, GEOMETRIES["ras"])
    return MedMetaDatastore(str(folder), extensions=["*.nii.gz"])


def _label(root: Path, seed: int) -> tuple[Path, np.ndarray]:
    """A label file of image ``a``: the phantom's label with a seeded part of the box removed."""
    _, label = phantom(GEOMETRIES["ras"], 1)
    label = label.copy()
    label[0, : seed % 7] = 0
    path = root / f"label-{seed}-{np.random.default_rng().integers(1 << 30)}.nii.gz"
    write_image(path, label, GEOMETRIES["ras"])
    return path, label


def _current(store: MedMetaDatastore, tag: str = "final") -> np.ndarray:
    found = current_label(store, "a", tag)
    assert found is not None
    return read_label(found[0])[0][0]


_OPS = st.lists(
    st.one_of(
        st.tuples(st.just("save"), st.integers(0, 50)), st.tuples(st.just("restore"), st.integers(0, 9))
    ),
    min_size=1,
    max_size=8,
)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=_OPS)
def test_any_saves_and_restores_keep_every_revision_and_the_last_one_current(tmp_path: Path, ops) -> None:
    root = tmp_path / str(np.random.default_rng().integers(1 << 40))
    store = _studies(root)
    history: list[np.ndarray] = []  # every label that was current, in order
    for op, value in ops:
        if op == "save":
            path, label = _label(root, value)
            store.save_label("a", str(path), "final", json.loads(json.dumps(INFO)))
            history.append(label)
        else:
            revisions = store.revisions.list("a", "final")
            if not revisions:
                continue
            chosen = revisions[value % len(revisions)]
            store.restore_label("a", "final", chosen.number)
            history.append(read_label(chosen.file)[0])
        np.testing.assert_array_equal(_current(store), history[-1][0])
        revisions = store.revisions.list("a", "final")
        assert len(revisions) == len(history) - 1, "every replaced label is a revision"
        for revision, earlier in zip(revisions, history[:-1]):
            np.testing.assert_array_equal(read_label(revision.file)[0][0], earlier[0])
            assert "ball" in revision.to_json()["structures"]


def test_a_restore_is_undone_by_restoring_the_label_it_replaced(tmp_path: Path) -> None:
    store = _studies(tmp_path)
    first, first_label = _label(tmp_path, 1)
    second, second_label = _label(tmp_path, 4)
    store.save_label("a", str(first), "final", dict(INFO))
    store.save_label("a", str(second), "final", dict(INFO))
    store.restore_label("a", "final", 1)
    np.testing.assert_array_equal(_current(store), first_label[0])
    reasons = [r.reason for r in store.revisions.list("a", "final")]
    assert reasons == ["replaced", "restored"]
    store.restore_label("a", "final", 2)  # the label the restore replaced
    np.testing.assert_array_equal(_current(store), second_label[0])
    with pytest.raises(Exception, match="no revision 9"):
        store.restore_label("a", "final", 9)


def test_max_revisions_keeps_the_newest(tmp_path: Path) -> None:
    folder = tmp_path / "studies"
    folder.mkdir()
    image, _ = phantom(GEOMETRIES["ras"], 1)
    write_image(folder / "a.nii.gz", image, GEOMETRIES["ras"])
    store = MedMetaDatastore(str(folder), max_revisions=2, extensions=["*.nii.gz"])
    for seed in range(4):
        store.save_label("a", str(_label(tmp_path, seed)[0]), "final", dict(INFO))
    assert [r.number for r in store.revisions.list("a", "final")] == [2, 3]
    with pytest.raises(ValueError, match=">= 0"):
        RevisionStore(tmp_path / "r", max_revisions=-1)


def test_revisions_live_outside_what_the_datastore_lists(tmp_path: Path) -> None:
    store = _studies(tmp_path)
    for seed in range(2):
        store.save_label("a", str(_label(tmp_path, seed)[0]), "final", dict(INFO))
    store.refresh()
    assert store.list_images() == ["a"]
    assert set(store.get_labels_by_image_id("a")) == {"final"}
    assert read_image(store.get_image_uri("a"))[0].shape[-3:] == GEOMETRIES["ras"].shape


def test_concurrent_saves_each_find_their_own_tag_and_lose_no_label(tmp_path: Path) -> None:
    """Saves of one image from several threads at once: each hook gets its own save's tag (a shared
    {image: tag} gave some 'final' saves the 'original' tag of another thread, and skipped their adaptation),
    and every replaced label is a revision."""
    store = _studies(tmp_path)
    paths = [_label(tmp_path, i)[0] for i in range(12)]
    taken: list[tuple[str, str]] = []
    barrier = threading.Barrier(len(paths))

    def save(i: int) -> None:
        tag = "final" if i % 2 == 0 else "original"
        barrier.wait()
        store.save_label("a", str(paths[i]), tag, dict(INFO))
        taken.append((tag, store.saved_tags.take("a")))

    threads = [threading.Thread(target=save, args=(i,)) for i in range(len(paths))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(taken) == len(paths) and all(mine == got for mine, got in taken)
    for tag in ("final", "original"):
        assert len(store.revisions.list("a", tag)) == len(paths) // 2 - 1


def test_saved_tags_fall_back_to_the_latest_save_on_another_thread() -> None:
    tags = SavedTags()
    worker = threading.Thread(target=tags.record, args=("img", "original"))
    worker.start()
    worker.join()
    assert tags.take("img") == "original" and tags.take("other") == "final"


def test_revision_routes(app_client, studies: dict[str, Path]) -> None:
    """List, restore (which schedules adaptation like a new label) and the 4xx answers, over HTTP."""
    info = [{"name": "ball", "idx": 1}, {"name": "box", "idx": 2}]
    assert save_label(app_client, "a", studies["a"], info).status_code == 200
    assert save_label(app_client, "a", studies["b"], info).status_code == 200
    listed = app_client.get("/datastore/label/revisions", params={"image": "a"})
    assert listed.status_code == 200, listed.text
    body = listed.json()
    assert [r["revision"] for r in body["revisions"]] == [1] and body["current"] is not None
    restored = app_client.post("/datastore/label/restore", params={"image": "a", "revision": 1})
    assert restored.status_code == 200, restored.text
    assert restored.json()["restored"] == 1 and "adapting" in restored.json()["medmeta"]
    again = app_client.get("/datastore/label/revisions", params={"image": "a"}).json()
    assert [(r["revision"], r["reason"]) for r in again["revisions"]] == [(1, "replaced"), (2, "restored")]
    for params, code in (
        ({"image": "a", "revision": 7}, 404),
        ({"image": "nope", "revision": 1}, 404),
        ({"image": "a", "revision": 1, "tag": "../x"}, 400),
    ):
        answer = app_client.post("/datastore/label/restore", params=params)
        assert answer.status_code == code and answer.json().get("detail"), (params, answer.text)
