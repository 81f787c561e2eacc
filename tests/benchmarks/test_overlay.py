"""The overlay picture of served masks: one panel per structure on the slice where its reference is
largest, written as a PNG; masks that do not fit the scan and an empty reference are refused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medmeta_plugin.benchmarks.overlay import _axial_slice, plot_overlay

SHAPE = (24, 20, 10)


def _box(z: slice) -> np.ndarray:
    mask = np.zeros(SHAPE, bool)
    mask[6:14, 5:12, z] = True
    return mask


def test_the_slice_drawn_is_where_the_reference_is_largest() -> None:
    truth = _box(slice(2, 4))
    truth[6:20, 5:18, 7] = True
    assert _axial_slice(truth) == 7


@pytest.mark.parametrize("structures", [1, 3, 4])
def test_one_panel_per_structure_in_a_png(tmp_path: Path, structures: int) -> None:
    image = np.random.default_rng(0).normal(size=SHAPE).astype(np.float32)
    truths = {f"s{i}": _box(slice(i, i + 3)) for i in range(structures)}
    served = {n: np.roll(m, 1, axis=0) for n, m in list(truths.items())[:-1]}  # the last one not served
    path = plot_overlay(image, truths, served, {n: 0.5 for n in truths}, tmp_path / "o.png", title="t")
    assert path == tmp_path / "o.png"
    with Image.open(path) as png:
        width, height = png.size
    columns = min(3, structures)
    rows = -(-structures // columns)
    assert (width, height) == (round(3.6 * columns * 110), round(3.6 * rows * 110))


@pytest.mark.parametrize(
    ("image", "truths", "served", "match"),
    [
        (np.zeros((24, 20)), {"a": _box(slice(0, 2))}, {}, r"image must have shape \(X, Y, Z\)"),
        (np.zeros(SHAPE), {}, {}, "at least one structure"),
        (np.zeros(SHAPE), {"a": np.zeros((24, 20, 9), bool)}, {}, r"truths\['a'\] has shape"),
        (np.zeros(SHAPE), {"a": _box(slice(0, 2))}, {"a": np.zeros((2, 2, 2), bool)}, r"served\['a'\]"),
    ],
)
def test_what_does_not_fit_is_refused(tmp_path: Path, image, truths, served, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        plot_overlay(image, truths, served, {}, tmp_path / "o.png")
    assert not (tmp_path / "o.png").exists()
