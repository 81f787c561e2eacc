"""Well-kept registration libraries on the field-of-view suite, beside the product's own stages.

- antspyx (ANTs): ``Affine`` and ``antsRegistrationSyNQuick[s]`` (rigid + affine + SyN) from ANTs'
  standard starts, centres of mass (``moments``, antspyx's default) and geometric centres (``centre``), and
  ``Affine`` from the product's placement (``placement``);
- itk-elastix: ``affine`` and ``bspline`` (affine, then a B-spline) from the product's placement, i.e. the
  library's local stages in place of the product's.

Both are optional (the benchmark extra of ``setup.cfg``); a method whose package is missing is skipped with a
warning. Arrays cross into the libraries in ITK's LPS world (via :mod:`~medmeta_plugin.registration.
itk_bridge`), and come back as carried masks on the query's working grid.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from medmeta_plugin.benchmarks.fov import FovPair
from medmeta_plugin.benchmarks.scoring import mask_dice
from medmeta_plugin.registration import Registration, place, warp_to
from medmeta_plugin.registration.grids import soft_tissue_window
from medmeta_plugin.registration.itk_bridge import LPS, from_itk, to_itk

__all__ = ["available", "run"]

logger = logging.getLogger(__name__)
_warned: set[str] = set()


def available(method: str) -> bool:
    """Whether the package a method needs is installed."""
    module = "ants" if method.startswith("ants-") else "itk"
    try:
        if module == "ants":
            import ants  # noqa: F401
        else:
            import itk

            itk.ElastixRegistrationMethod  # noqa: B018 - loads the elastix module or raises
    except (ImportError, AttributeError):
        return False
    return True


def _ants_image(array: np.ndarray, affine: np.ndarray) -> Any:
    import ants

    lps = LPS @ np.asarray(affine, dtype=np.float64)
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    return ants.from_numpy(
        np.ascontiguousarray(array, dtype=np.float32),
        origin=lps[:3, 3].tolist(),
        spacing=spacing.tolist(),
        direction=lps[:3, :3] / spacing,
    )


def _ants_matrix(path: str) -> np.ndarray:
    """An ANTs affine transform file as a 4x4 RAS fixed -> moving matrix."""
    import ants

    transform = ants.read_transform(path)
    parameters = np.asarray(transform.parameters, dtype=np.float64)
    centre = np.asarray(transform.fixed_parameters, dtype=np.float64)
    a, t = parameters[:9].reshape(3, 3), parameters[9:12]
    lps = np.eye(4)
    lps[:3, :3] = a
    lps[:3, 3] = t + centre - a @ centre
    return LPS @ lps @ LPS


def _run_ants(pair: FovPair, kind: str, start: str) -> dict[str, Any]:
    import ants

    fixed = _ants_image(soft_tissue_window(pair.fixed.image), pair.fixed.affine)
    moving = _ants_image(soft_tissue_window(pair.moving.image), pair.moving.affine)
    begin = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        initial = None
        if start == "placement":  # the product's placement, as ANTs' initial (fixed -> moving) transform
            placed = place(pair.fixed.image, pair.fixed.affine, pair.moving.image, pair.moving.affine)
            lps = LPS @ placed.matrix @ LPS
            begin_transform = ants.create_ants_transform(
                transform_type="AffineTransform",
                dimension=3,
                matrix=lps[:3, :3],
                translation=lps[:3, 3].tolist(),
            )
            initial = os.path.join(tmp, "start.mat")
            ants.write_transform(begin_transform, initial)
        if start == "centre":
            centres = []
            for scan in (pair.fixed, pair.moving):
                middle = scan.affine @ np.r_[(np.array(scan.image.shape) - 1) / 2, 1.0]
                centres.append((LPS @ middle)[:3])
            shift = ants.create_ants_transform(
                transform_type="AffineTransform", dimension=3, translation=(centres[1] - centres[0]).tolist()
            )
            initial = os.path.join(tmp, "start.mat")
            ants.write_transform(shift, initial)
        result = ants.registration(
            fixed,
            moving,
            type_of_transform={"affine": "Affine", "synquick": "antsRegistrationSyNQuick[s]"}[kind],
            initial_transform=initial,
            outprefix=os.path.join(tmp, "reg_"),
        )
        seconds = time.perf_counter() - begin
        affine_file = next(p for p in result["fwdtransforms"] if p.endswith(".mat"))
        matrix = _ants_matrix(affine_file)
        dice = {}
        for name in pair.structures:
            mask = _ants_image(pair.moving.mask(name).astype(np.float32), pair.moving.affine)
            carried = ants.apply_transforms(
                fixed, mask, transformlist=result["fwdtransforms"], interpolator="linear"
            )
            dice[name] = mask_dice(carried.numpy() >= 0.5, pair.fixed.mask(name))
    return {"matrix": matrix, "dice": dice, "seconds": seconds}


def _run_elastix(pair: FovPair, kind: str) -> dict[str, Any]:
    import itk

    fixed, moving = pair.fixed, pair.moving
    begin = time.perf_counter()
    start = place(fixed.image, fixed.affine, moving.image, moving.affine)
    # elastix from the placement: the support resampled through it onto the query grid first.
    onto = warp_to(
        soft_tissue_window(moving.image), moving.affine, fixed.image.shape, fixed.affine, start.matrix
    )
    fixed_itk = to_itk(soft_tissue_window(fixed.image), fixed.affine)
    moving_itk = to_itk(onto, fixed.affine)
    parameters = itk.ParameterObject.New()
    parameters.AddParameterMap(parameters.GetDefaultParameterMap("affine", 3))
    if kind == "bspline":
        parameters.AddParameterMap(parameters.GetDefaultParameterMap("bspline", 3))
    _, transform = itk.elastix_registration_method(
        fixed_itk, moving_itk, parameter_object=parameters, log_to_console=False
    )
    seconds = time.perf_counter() - begin
    dice = {}
    for name in pair.structures:
        mask = warp_to(
            pair.moving.mask(name).astype(np.float32),
            moving.affine,
            fixed.image.shape,
            fixed.affine,
            start.matrix,
        )
        carried = itk.transformix_filter(to_itk(mask, fixed.affine), transform)
        dice[name] = mask_dice(from_itk(carried, fixed.image.shape) >= 0.5, fixed.mask(name))
    return {"matrix": start.matrix, "dice": dice, "seconds": seconds}


def run(pair: FovPair, method: str, _ours: Callable[..., Registration]) -> dict[str, Any] | None:
    """One external method on one pair: ``{"matrix", "dice", "seconds"}``; None without its package."""
    if not available(method):
        if method not in _warned:
            logger.warning(
                "%s skipped: its package is not installed (pip install antspyx itk-elastix)", method
            )
            _warned.add(method)
        return None
    parts = method.split("-")
    if parts[0] == "ants":
        return _run_ants(pair, parts[1], parts[2])
    return _run_elastix(pair, parts[1])
