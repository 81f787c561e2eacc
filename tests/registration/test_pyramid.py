"""Pyramid: a scan's ITK levels made once and shared by placement's refinement and the local stages."""

from __future__ import annotations

import itk
import numpy as np

from medmeta_plugin.registration import soft_tissue_window
from medmeta_plugin.registration.itk_bridge import shrunk, to_itk
from medmeta_plugin.registration.pyramid import Pyramid


def test_a_level_is_made_once_and_is_the_windowed_scan_shrunk() -> None:
    rng = np.random.default_rng(0)
    array = rng.normal(0.0, 100.0, (20, 18, 16)).astype(np.float32)
    affine = np.diag([3.0, 2.0, 4.0, 1.0])
    pyramid = Pyramid(array, affine)
    assert pyramid.voxel_mm == 3.0
    level = pyramid.level(2)
    assert pyramid.level(2) is level, "a level is made once"
    expected = shrunk(to_itk(soft_tissue_window(array), affine), 2)
    np.testing.assert_array_equal(itk.array_from_image(level), itk.array_from_image(expected))
