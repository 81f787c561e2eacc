"""Atlas priors on the app's working grids: the warm-up that loads the registration's modules."""

from __future__ import annotations

import numpy as np
import pytest

from medmeta_plugin.app.priors import warm_up
from medmeta_plugin.registration import REGISTRATION_TRANSFORMS


@pytest.mark.parametrize("transform", REGISTRATION_TRANSFORMS)
def test_app_warm_up_runs_the_whole_path_of_each_transform(transform: str) -> None:
    """The app's background warm-up places, registers and carries a mask with the configured transform."""
    prior = warm_up(transform)
    blob = np.zeros((24, 24, 24), bool)
    blob[6:18, 6:18, 6:18] = True  # where the warm-up's volume is bright; its mask also holds noise voxels
    assert prior.shape == blob.shape
    assert prior[blob].mean() > 0.85 and prior[~blob].mean() < 0.25
