"""The datastore's writes under a real full disk (``RLIMIT_FSIZE``): a 507 with a message, and every stored
file as it was (``app/datastore_writes.py``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from fastapi import HTTPException

from medmeta_plugin.app.datastore import current_label
from medmeta_plugin.io import ImageMeta, read_label, write_image
from tests.app.conftest import GEOMETRIES
from tests.app.test_revisions import INFO, _current, _label, _studies
from tests.conftest import file_size_limit


def _noise_label(root: Path, seed: int) -> tuple[Path, np.ndarray]:
    """A label of image ``a`` that compresses badly (random values), so its file is large."""
    label = np.random.default_rng(seed).integers(0, 3, (1, *GEOMETRIES["ras"].shape)).astype(np.uint8)
    path = root / f"noise-{seed}.nii.gz"
    write_image(path, label, GEOMETRIES["ras"])
    return path, label


def _stray_files(folder: Path) -> list[str]:
    return sorted(str(p) for p in folder.rglob("*") if p.name.endswith((".tmp", ".staged", ".partial")))


def test_a_save_the_disk_cannot_hold_stores_nothing_and_loses_nothing(tmp_path: Path) -> None:
    """A real full disk (``RLIMIT_FSIZE``), at every point of a save: the revision copy, its record, the label
    file, the datastore's index. Whichever write fails, the answer is a 507 with a message, the current label,
    its info, its revisions and the index are as they were, no partial file is left, and the same save works
    once there is space. A large new label fails at its copy, a small one at the index."""
    store = _studies(tmp_path)
    first, current = _label(tmp_path, 2)
    store.save_label("a", str(first), "final", dict(INFO))
    index = Path(store._datastore_config_path)
    failures: dict[str, int] = {}
    for kind, (new, new_label) in (("large", _noise_label(tmp_path, 5)), ("small", _label(tmp_path, 4))):
        sizes = {"current": current_label(store, "a", "final")[0], "new": new, "index": index}
        sizes = {k: Path(v).stat().st_size for k, v in sizes.items()}
        limits = sorted({64, *(v + d for v in sizes.values() for d in (-1, 1, 400))})
        revisions = store.revisions.list("a", "final")
        failures[kind] = 0
        for limit in limits:
            before = (index.read_bytes(), store.get_label_info("a", "final"))
            try:
                with file_size_limit(limit):
                    store.save_label("a", str(new), "final", dict(INFO))
            except HTTPException as err:
                failures[kind] += 1
                assert err.status_code == 507 and "was not stored" in err.detail and "unchanged" in err.detail
                np.testing.assert_array_equal(_current(store), current[0])
                assert (index.read_bytes(), store.get_label_info("a", "final")) == before, (kind, limit)
                assert store.revisions.list("a", "final") == revisions, "a failed save's copy is taken back"
                assert _stray_files(tmp_path / "studies") == [], (kind, limit)
                store._config_ts = None  # the index on disk still reads, and says what memory says
                store._init_from_datastore_file(throw_exception=True)
                assert store.get_label_info("a", "final") == before[1]
                continue
            break  # the first limit that holds the save: it is stored whole
        np.testing.assert_array_equal(_current(store), new_label[0])
        assert len(store.revisions.list("a", "final")) == len(revisions) + 1
        np.testing.assert_array_equal(read_label(store.revisions.list("a", "final")[-1].file)[0], current)
        current = new_label
    assert failures["large"] >= 3 and failures["small"] >= 3, failures


def test_an_image_upload_the_disk_cannot_hold_is_a_507_and_leaves_no_file(tmp_path: Path) -> None:
    """A large image fails at its copy, a tiny one at the index; neither leaves a file or an entry."""
    store = _studies(tmp_path)
    index = Path(store._datastore_config_path)
    before = (sorted(p.name for p in (tmp_path / "studies").iterdir()), index.read_bytes())
    rng = np.random.default_rng(0)
    large = write_image(tmp_path / "large.nii.gz", rng.normal(size=(1, 24, 24, 24)), GEOMETRIES["ras"])
    tiny_meta = ImageMeta((2.0, 2.0, 2.0), (0.0, 0.0, 0.0), ((1, 0, 0), (0, 1, 0), (0, 0, 1)), (2, 2, 2))
    tiny = write_image(tmp_path / "tiny.nii.gz", rng.normal(size=(1, 2, 2, 2)), tiny_meta)
    assert tiny.stat().st_size < index.stat().st_size < large.stat().st_size
    for upload in (large, tiny):
        with file_size_limit(index.stat().st_size - 1), pytest.raises(HTTPException) as caught:
            store.add_image("new", str(upload), {})
        assert caught.value.status_code == 507 and "image 'new' was not stored" in caught.value.detail
        assert (sorted(p.name for p in (tmp_path / "studies").iterdir()), index.read_bytes()) == before
        assert "new" not in store.list_images()
    store.add_image("new", str(large), {})
    assert "new" in store.list_images()
