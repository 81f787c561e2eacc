"""Deformed copies: ``n_copies`` in-memory cases per original, named ``<id>-copy<i>``, keeping dataset,
structures and targets; each copy keeps its case's shape, label set and label dtype, with image and label
deformed together; a copy is fixed by (seed, case uid, i) alone, differs from the original and from the
other copies, and pickles (for data-loader workers)."""

from __future__ import annotations

import functools
import pickle
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medmeta_plugin.episodes.cases import Case, load_case
from medmeta_plugin.episodes.copies import CopyConfig, deformed_copies

SIZE = 24


def _volumes(seed: int, with_label: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
    """A smooth image equal to 1 + 2 * label plus faint noise; label: a centred cube (1) and a box (2)."""
    label = np.zeros((1, SIZE, SIZE, SIZE), np.int16)
    c = SIZE // 2
    label[0, c - 4 : c + 4, c - 4 : c + 4, c - 4 : c + 4] = 1
    label[0, 3:9, 4:10, 3:9] = 2
    noise = np.random.default_rng(seed).normal(0.0, 0.05, label.shape)
    image = (1.0 + 2.0 * label + noise).astype(np.float32)
    return image, (label if with_label else None)


def _case(case_id: str, seed: int, with_label: bool = True) -> Case:
    return Case(
        case_id,
        "phantoms",
        structures={1: "cube", 2: "box"} if with_label else {},
        targets={"age": 40.0 + seed},
        loader=functools.partial(_volumes, seed, with_label),
    )


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / (a.sum() + b.sum()))


@pytest.mark.parametrize("n_copies", [1, 3])
def test_copies_are_named_per_case_and_keep_structures_and_targets(n_copies: int) -> None:
    originals = [_case("a", 0), _case("b", 1)]
    copies = deformed_copies(originals, n_copies, seed=0)
    assert [c.case_id for c in copies] == [f"{o.case_id}-copy{i}" for o in originals for i in range(n_copies)]
    for index, copy in enumerate(copies):
        original = originals[index // n_copies]
        assert copy.dataset == original.dataset and copy.uid == f"phantoms:{copy.case_id}"
        assert dict(copy.structures) == dict(original.structures)
        assert dict(copy.targets) == dict(original.targets)
        assert copy.image_path is None and copy.label_path is None and copy.loader is not None
    assert not set(originals) & set(copies), "the originals are not among the copies"


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_copy_keeps_shape_label_set_and_dtype_and_moves_image_with_label(seed: int) -> None:
    original = _case("a", seed)
    image, label = load_case(original)
    for copy in deformed_copies([original], 2, seed=seed):
        new_image, new_label = load_case(copy)
        assert new_image.shape == image.shape and new_image.dtype == np.float32
        assert new_label.shape == label.shape and new_label.dtype == label.dtype
        assert set(np.unique(new_label)) == {0, 1, 2}
        assert not np.array_equal(new_label, label), "the deformation moved nothing"
        # The structures stay where their labels went, in their order of brightness: the image was deformed
        # with the label (gamma, gain and bias field keep the order 1 < 3 < 5 of the original's values).
        medians = [float(np.median(new_image[new_label == value])) for value in (0, 1, 2)]
        assert medians == sorted(medians) and medians[1] - medians[0] > 0.5, medians
        bright = new_image[0] > (medians[0] + medians[1]) / 2
        on_new, on_old = _dice(bright, new_label[0] > 0), _dice(bright, label[0] > 0)
        assert on_new > 0.85 and on_new > on_old + 0.02, (on_new, on_old)  # it follows the new label


def test_a_copy_is_determined_by_seed_case_and_index_alone() -> None:
    a, b = _case("a", 0), _case("b", 1)
    alone = load_case(deformed_copies([a], 2, seed=5)[1])
    with_others = load_case(deformed_copies([b, a], 2, seed=5)[3])  # a's copy 1 after b's two copies
    again = load_case(deformed_copies([a], 3, seed=5)[1])
    for x, y, z in zip(alone, with_others, again):
        np.testing.assert_array_equal(x, y)
        np.testing.assert_array_equal(x, z)
    # Loading a copy twice gives the same arrays: the randomness is in its seed, not in a shared state.
    np.testing.assert_array_equal(load_case(deformed_copies([a], 2, seed=5)[1])[0], alone[0])


def test_copies_differ_from_each_other_between_seeds_and_between_cases() -> None:
    a = _case("a", 0)
    twin = Case("twin", "phantoms", structures=a.structures, loader=a.loader)  # same arrays, other uid
    images = [
        *(load_case(c)[0] for c in deformed_copies([a], 3, seed=0)),
        load_case(deformed_copies([a], 1, seed=1)[0])[0],
        load_case(deformed_copies([twin], 1, seed=0)[0])[0],
    ]
    for i in range(len(images)):
        for j in range(i):
            assert not np.allclose(images[i], images[j], atol=1e-3), f"copies {j} and {i} are the same"


def test_a_case_without_label_gets_copies_without_label() -> None:
    image, label = load_case(deformed_copies([_case("a", 0, with_label=False)], 1, seed=0)[0])
    assert label is None and image.shape == (1, SIZE, SIZE, SIZE)


def test_a_copy_of_a_file_case_reads_the_file_and_pickles(tmp_path: Path) -> None:
    image, label = _volumes(4)
    nib.save(nib.Nifti1Image(image[0], np.eye(4)), tmp_path / "image.nii.gz")
    nib.save(nib.Nifti1Image(label[0], np.eye(4)), tmp_path / "label.nii.gz")
    case = Case(
        "disk", "phantoms", tmp_path / "image.nii.gz", tmp_path / "label.nii.gz", {1: "cube", 2: "box"}
    )
    copy = deformed_copies([case], 1, seed=3)[0]
    new_image, new_label = load_case(copy)
    assert set(np.unique(new_label)) == {0, 1, 2} and new_image.shape == image.shape
    restored = pickle.loads(pickle.dumps(copy))
    assert restored == copy
    for x, y in zip(load_case(restored), (new_image, new_label)):
        np.testing.assert_array_equal(x, y)


def test_a_zero_strength_config_keeps_the_label_map() -> None:
    """No rotation, zoom or elastic magnitude: the geometry is untouched, only intensities change."""
    still = CopyConfig(rotate_deg=0.0, scale=0.0, elastic_magnitude=(0.0, 0.0), gamma=(1.0, 1.0))
    original = _case("a", 0)
    image, label = load_case(original)
    new_image, new_label = load_case(deformed_copies([original], 1, seed=0, config=still)[0])
    np.testing.assert_array_equal(new_label, label)
    assert not np.allclose(new_image, image), "the intensity changes are always on"


@pytest.mark.parametrize("n_copies", [0, -1, True, 2.0, "3", None])
def test_n_copies_must_be_a_positive_integer(n_copies: object) -> None:
    with pytest.raises(ValueError, match=rf"n_copies must be a positive integer, got {n_copies!r}"):
        deformed_copies([_case("a", 0)], n_copies, seed=0)  # type: ignore[arg-type]
