"""Registration, the product's first stage: where a labelled scan lies on a new one.

- :mod:`~medmeta_plugin.registration.grids`: scans on the placement search's coarse RAS grids.
- :mod:`~medmeta_plugin.registration.similarity`: overlap-normalised similarity for every shift (FFT).
- :mod:`~medmeta_plugin.registration.placement`: the global placement and its confidence.
- :mod:`~medmeta_plugin.registration.stages`: the local rigid, affine and B-spline stages (ITK).
- :mod:`~medmeta_plugin.registration.register`: :func:`register`, placement then the local stages.
- :mod:`~medmeta_plugin.registration.warp`: carrying masks through a registration.
- :mod:`~medmeta_plugin.registration.itk_bridge`: ITK's LPS world and images; nothing outside this package
  sees either.
"""

from medmeta_plugin.registration.grids import soft_tissue_window
from medmeta_plugin.registration.itk_bridge import deterministic_registration
from medmeta_plugin.registration.placement import Placement, PlacementConfig, place
from medmeta_plugin.registration.register import REGISTRATION_TRANSFORMS, Registration, register
from medmeta_plugin.registration.warp import signed_distance_mm, warp_to

__all__ = [
    "REGISTRATION_TRANSFORMS",
    "Placement",
    "PlacementConfig",
    "Registration",
    "deterministic_registration",
    "place",
    "register",
    "signed_distance_mm",
    "soft_tissue_window",
    "warp_to",
]
