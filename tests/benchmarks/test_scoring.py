"""mask_dice: the overlap of two boolean masks."""

from __future__ import annotations

import numpy as np
import pytest

from medmeta_plugin.benchmarks.scoring import mask_dice


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        ([1, 1, 0, 0], [1, 1, 0, 0], 1.0),
        ([1, 1, 0, 0], [0, 0, 1, 1], 0.0),
        ([1, 1, 1, 0], [1, 0, 0, 0], 0.5),
        ([0, 0, 0, 0], [0, 0, 0, 0], 1.0),  # nothing to find, nothing found
        ([0, 0, 0, 0], [1, 0, 0, 0], 0.0),
    ],
)
def test_mask_dice(a, b, expected) -> None:
    assert mask_dice(np.array(a, bool), np.array(b, bool)) == pytest.approx(expected)
