"""Registration of a labelled support scan onto a query scan, with ITK, for the atlas prior.

A structure labelled on one patient's scan is, on another patient's scan, roughly where the two bodies
align. ITK's v4 registration finds that alignment by Mattes mutual information, which compares intensity
co-occurrence rather than intensities, so it aligns a CT with an MR as well as two CTs.

The alignment is rigid first, then affine (the classic atlas pipeline's first two stages): two patients
differ in size and build as well as in pose, which a rigid transform leaves uncorrected. The benchmark's
``atlas`` method (carried masks alone), 1 / 3 / 5 shots, rigid -> affine: ``brain-heldout`` 0.737 / 0.720 /
0.588 -> 0.867 / 0.901 / 0.912 mean Dice (support and query differ by a random affine and a smooth
deformation), ``abdomen-ct-to-mr`` (two patients, CT -> MR) 0.312 / 0.304 / 0.312 -> 0.332 / 0.330 / 0.317
(``docs/benchmarks/atlas.md``). The affine stage is kept only if it improves the metric and scales no
axis by more than ``max_scale`` either way (inter-patient size differences are tens of percent; a larger
one is a degenerate fit, e.g. along a thin slab); otherwise the rigid result stands.

``bspline`` adds a third stage: a coarse cubic B-spline deformation (:data:`BSPLINE_MESH` cells per axis
over the query scan, fitted at the 2x level on at most :data:`BSPLINE_SAMPLES` voxels) on top of the global
transform, for organs that sit differently in two patients beyond what an affine map can say. On the
development structures (``docs/benchmarks/bspline.md``), carried masks at 1 / 3 / 5 shots: CT -> MR of two
patients 0.234 / 0.221 / 0.219 -> 0.322 / 0.285 / 0.284; brain copies 0.823 / 0.860 -> 0.820 / 0.859 at
1 / 3 shots, where the affine map already explains most of the difference. It costs about a second more
per pair of scans on 2 cores (CT onto CT 1.1 -> 2.3 s), and :func:`warp_to` carries masks through it as a
displacement field sampled every 4 voxels.

ITK sums the metric over its worker threads in no fixed order, so two runs on the same scans can end at
slightly different transforms and, now and then, carried voxels differ (``abdomen-ct-to-mr-dev``, carried
masks at 3 shots: 0.224 in one run, 0.230 in the next). :func:`deterministic_registration` runs ITK on
one thread, which repeats exactly at ~30% more time (CT -> MR 1.3 s against 1.0 s on 2 cores); the
benchmarks use it, the app does not.

Two choices make it work on whole scans of different extent (a 60 mm MR slab against a 336 mm CT):

- **Soft-tissue window.** Each image is clipped to the 2nd-98th percentiles of its body voxels (above an
  Otsu threshold). Without it air and bone dominate the joint histogram and the optimum puts the slab
  where the body outlines match, not the organs (kidney Dice 0.00 against 0.68 with the window, CT -> MR).
- **Multi-start along the body axis.** The optimiser only finds the nearest optimum, so it starts from
  offsets every ``start_step_mm`` along the world superior-inferior axis covering the extent difference
  (11 starts for that pair), each on the images smoothed and shrunk 4x (built once: 0.04 s a start where
  letting ITK rebuild them per start took 2.4 s); the best by the metric is refined at 2x. Full resolution
  is not worth its 2.5 s: the prior is blurred by more than a voxel anyway.

Every function takes arrays on their own voxel grid plus the 4x4 voxel-to-world matrix (RAS, mm) of
:class:`~medmeta_plugin.io.ImageMeta`; ITK's LPS convention stays inside this module
(:mod:`monai.data.itk_torch_bridge` converts).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass

import itk
import numpy as np
import torch
from monai.data import MetaTensor
from monai.data.itk_torch_bridge import itk_image_to_metatensor, metatensor_to_itk_image

__all__ = [
    "REGISTRATION_TRANSFORMS",
    "Registration",
    "deterministic_registration",
    "register",
    "signed_distance_mm",
    "soft_tissue_window",
    "warp_to",
]

_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])  # RAS <-> LPS, its own inverse
#: What :func:`register` may fit: ``rigid`` (rotation and translation), ``affine`` (rigid, then affine) or
#: ``bspline`` (rigid, affine, then a coarse B-spline deformation on top).
REGISTRATION_TRANSFORMS = ("rigid", "affine", "bspline")
# The B-spline stage: control-point mesh cells per axis over the query scan, optimiser iterations, and the
# most voxels its metric samples (a regular grid, seeded, so a run repeats exactly on one ITK thread).
BSPLINE_MESH = 3
BSPLINE_ITERATIONS = 30
BSPLINE_SAMPLES = 10_000
_SAMPLING_SEED = 7


@dataclass(frozen=True)
class Registration:
    """The result of :func:`register`.

    Attributes:
        matrix: 4x4 world transform (RAS, mm) mapping a point of the fixed (query) scan to the point of the
            moving (support) scan that lies on it.
        metric: final Mattes mutual information (lower is better; negative).
        seconds: wall time of the registration.
        transform: the global transform ``matrix`` is, ``rigid`` or ``affine`` (``rigid`` also when an
            affine stage was asked for but rejected, see the module docstring), or ``bspline`` when a
            deformation was fitted on top of it.
        bspline: the deformation, ITK's cubic B-spline ``(fixed_parameters, parameters)`` in LPS mm: a point
            of the fixed scan is first moved by it, then mapped by ``matrix``; None without one.
    """

    matrix: np.ndarray
    metric: float
    seconds: float
    transform: str = "rigid"
    bspline: tuple[np.ndarray, np.ndarray] | None = None


@contextlib.contextmanager
def deterministic_registration() -> Iterator[None]:
    """Within the block, ITK runs on one thread, so a registration of the same scans repeats exactly.

    The setting is process-wide (ITK's global default, read when its filters are created), so this is for
    a process that registers one pair at a time, such as a benchmark run; the previous default is restored.
    """
    threader = itk.MultiThreaderBase
    before = threader.GetGlobalDefaultNumberOfThreads()
    threader.SetGlobalDefaultNumberOfThreads(1)
    try:
        yield
    finally:
        threader.SetGlobalDefaultNumberOfThreads(before)


def _check_volume(array: np.ndarray, affine: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray]:
    array = np.asarray(array)
    affine = np.asarray(affine, dtype=np.float64)
    if array.ndim != 3 or min(array.shape) < 2:
        raise ValueError(
            f"{name} must be a 3D array (X, Y, Z) with every size >= 2, got shape {array.shape}."
        )
    if affine.shape != (4, 4) or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise ValueError(f"{name}_affine must be an invertible 4x4 voxel-to-world matrix, got {affine!r}.")
    if not np.isfinite(array).all():
        raise ValueError(f"{name} holds NaN or infinite values.")
    return array.astype(np.float32, copy=False), affine


def soft_tissue_window(array: np.ndarray) -> np.ndarray:
    """Clip a scan to the 2nd-98th percentiles of its body voxels (those above the Otsu threshold).

    Args:
        array: scan, shape (X, Y, Z), any intensity scale (Hounsfield units, MR units, normalised).

    Returns:
        The clipped scan, float32, same shape.
    """
    values = np.asarray(array, dtype=np.float32)
    counts, edges = np.histogram(values, bins=256)
    centres = (edges[:-1] + edges[1:]) / 2
    below = np.cumsum(counts)
    above = below[-1] - below
    mass = np.cumsum(counts * centres)
    mean_below = mass / np.maximum(below, 1)
    mean_above = (mass[-1] - mass) / np.maximum(above, 1)
    threshold = centres[np.argmax(below * above * (mean_below - mean_above) ** 2)]
    body = values[values > threshold]
    if body.size < 2:
        return values
    low, high = np.percentile(body, [2, 98])
    return np.clip(values, low, high)


def _to_itk(array: np.ndarray, affine: np.ndarray) -> itk.Image:
    tensor = MetaTensor(torch.from_numpy(np.ascontiguousarray(array)), affine=torch.as_tensor(affine))
    tensor.meta["space"] = "RAS"
    return metatensor_to_itk_image(tensor, channel_dim=None)


def _superior_extent(array: np.ndarray, affine: np.ndarray) -> tuple[float, float]:
    corners = np.array(
        [
            [i, j, k, 1.0]
            for i in (0, array.shape[0] - 1)
            for j in (0, array.shape[1] - 1)
            for k in (0, array.shape[2] - 1)
        ]
    )
    z = (corners @ affine.T)[:, 2]
    return float(z.min()), float(z.max())


def _shrunk(image: itk.Image, factor: int) -> itk.Image:
    """Smoothed (sigma half the new voxel size) and shrunk by ``factor`` along each axis of size > factor."""
    spacing = np.asarray(itk.spacing(image), dtype=np.float64)
    factors = [factor if size > 2 * factor else 1 for size in itk.size(image)]
    smooth = itk.smoothing_recursive_gaussian_image_filter(image, sigma=float(factor * spacing.mean() / 2))
    return itk.shrink_image_filter(smooth, shrink_factors=factors)


def _run(
    fixed: itk.Image,
    moving: itk.Image,
    transform: itk.Transform,
    iterations: int,
    step_mm: float = 2.0,
    *,
    min_step_mm: float = 0.05,
    relaxation: float = 0.6,
    physical_scales: bool = True,
    max_samples: int | None = None,
) -> float:
    """Optimise ``transform`` in place by Mattes mutual information and return the final metric.

    Args:
        step_mm: the first step, in mm of largest voxel shift (with ``physical_scales``; else in parameter
            units); each step that overshoots shrinks it by ``relaxation``, down to ``min_step_mm``.
        physical_scales: scale parameters by the voxel shift they cause (ITK's estimator: cheap for a
            rigid or affine transform, as costly as the fit for a B-spline's hundreds of parameters).
        max_samples: evaluate the metric on at most this many fixed voxels (a seeded regular grid).
    """
    image_type = itk.Image[itk.F, 3]
    metric = itk.MattesMutualInformationImageToImageMetricv4[image_type, image_type].New(
        NumberOfHistogramBins=32
    )
    optimizer = itk.RegularStepGradientDescentOptimizerv4[itk.D].New(
        LearningRate=step_mm,
        MinimumStepLength=min_step_mm,
        NumberOfIterations=iterations,
        RelaxationFactor=relaxation,
    )
    if physical_scales:
        optimizer.SetScalesEstimator(
            itk.RegistrationParameterScalesFromPhysicalShift[type(metric)].New(Metric=metric)
        )
    method = itk.ImageRegistrationMethodv4[image_type, image_type].New(
        FixedImage=fixed,
        MovingImage=moving,
        Metric=metric,
        Optimizer=optimizer,
        InitialTransform=transform,
        InPlace=True,
    )
    method.SetNumberOfLevels(1)  # the caller passes images already smoothed and shrunk
    method.SetShrinkFactorsPerLevel([1])
    method.SetSmoothingSigmasPerLevel([0])
    voxels = int(np.prod(itk.size(fixed)))
    if max_samples is not None and voxels > max_samples:
        method.SetMetricSamplingStrategy(itk.ImageRegistrationMethodv4Enums.MetricSamplingStrategy_REGULAR)
        method.SetMetricSamplingPercentage(max_samples / voxels)
        method.MetricSamplingReinitializeSeed(_SAMPLING_SEED)
    method.Update()
    return float(optimizer.GetValue())


def _matrix(transform: itk.Transform) -> np.ndarray:
    lps = np.eye(4)
    lps[:3, :3] = itk.array_from_matrix(transform.GetMatrix())
    lps[:3, 3] = np.asarray(transform.GetOffset())
    return _LPS @ lps @ _LPS


def _affine_stage(
    rigid: itk.Euler3DTransform,
    coarse: tuple[itk.Image, itk.Image],
    fine: tuple[itk.Image, itk.Image],
    iterations: int,
) -> tuple[itk.AffineTransform, float] | None:
    """The rigid result refined as an affine transform, coarse level first; None if ITK fails."""
    affine = itk.AffineTransform[itk.D, 3].New()
    affine.SetCenter(rigid.GetCenter())
    affine.SetMatrix(rigid.GetMatrix())
    affine.SetTranslation(rigid.GetTranslation())
    try:  # smaller first steps than the rigid stage's 2 mm: the rigid fit is already close
        _run(*coarse, affine, iterations, step_mm=1.0)
        return affine, _run(*fine, affine, iterations, step_mm=0.5)
    except RuntimeError:  # too little overlap once scaled
        return None


def _parameters(values: np.ndarray) -> itk.OptimizerParameters:
    return itk.OptimizerParameters[itk.D](np.asarray(values, dtype=np.float64).tolist())


def _bspline(fixed_parameters: np.ndarray, parameters: np.ndarray) -> itk.BSplineTransform:
    transform = itk.BSplineTransform[itk.D, 3, 3].New()
    transform.SetFixedParameters(_parameters(fixed_parameters))
    transform.SetParameters(_parameters(parameters))
    return transform


def _displacement(transform: itk.Transform, reference: itk.Image, step: int = 4) -> itk.Transform:
    """``transform`` as a displacement field sampled every ``step`` voxels over ``reference``'s grid.

    Resampling through a B-spline evaluates it at every voxel (0.46 s a mask on a 122 x 101 x 112 CT);
    the field, linear between its samples, costs a fraction of that and differs by far less than a voxel
    (the B-spline's control points are a third of the scan apart): masks within 0.012 in probability on a CT.
    """
    size = [int(np.ceil((n - 1) / step)) + 1 for n in itk.size(reference)]
    to_field = itk.TransformToDisplacementFieldFilter[itk.Image[itk.Vector[itk.F, 3], 3], itk.D].New(
        Transform=transform,
        Size=size,
        OutputSpacing=[float(s) * step for s in itk.spacing(reference)],
        OutputOrigin=itk.origin(reference),
        OutputDirection=reference.GetDirection(),
    )
    to_field.Update()
    sampled = to_field.GetOutput()
    # The double-precision transform takes a double field: copied through NumPy (a few thousand vectors).
    field = itk.image_from_array(itk.array_from_image(sampled).astype(np.float64), is_vector=True)
    field.SetOrigin(sampled.GetOrigin())
    field.SetSpacing(sampled.GetSpacing())
    field.SetDirection(sampled.GetDirection())
    displacement = itk.DisplacementFieldTransform[itk.D, 3].New()
    displacement.SetDisplacementField(field)
    return displacement


def _bspline_stage(
    global_transform: itk.Transform, fine: tuple[itk.Image, itk.Image]
) -> tuple[tuple[np.ndarray, np.ndarray], float] | None:
    """A coarse B-spline deformation fitted on top of the global transform, at the 2x level.

    The support scan is resampled once through the global transform onto the query's grid, and the
    deformation is fitted between the two (:data:`BSPLINE_MESH` cells per axis, so it moves whole organs, not
    their texture). Returns ``((fixed_parameters, parameters), metric)``, or None if ITK fails.
    """
    image_type = itk.Image[itk.F, 3]
    fixed, moving = fine
    aligned = itk.resample_image_filter(
        moving, transform=global_transform, reference_image=fixed, use_reference_image=True
    )
    bspline = itk.BSplineTransform[itk.D, 3, 3].New()
    itk.BSplineTransformInitializer[type(bspline), image_type].New(
        Transform=bspline, Image=fixed, TransformDomainMeshSize=[BSPLINE_MESH] * 3
    ).InitializeTransform()
    try:  # parameters are control-point shifts in mm, so steps are in mm without the scales estimator
        value = _run(
            fixed,
            aligned,
            bspline,
            BSPLINE_ITERATIONS,
            2.0,
            min_step_mm=0.01,
            relaxation=0.7,
            physical_scales=False,
            max_samples=BSPLINE_SAMPLES,
        )
    except RuntimeError:  # too little overlap, or a fit that left the image
        return None
    return (np.array(bspline.GetFixedParameters()), np.array(bspline.GetParameters())), value


def register(
    fixed: np.ndarray,
    fixed_affine: np.ndarray,
    moving: np.ndarray,
    moving_affine: np.ndarray,
    *,
    transform: str = "affine",
    start_step_mm: float = 30.0,
    iterations: int = 100,
    max_scale: float = 1.5,
) -> Registration:
    """Align a moving (support) scan onto a fixed (query) scan: rigid, then (by default) affine.

    Args:
        fixed: query scan, shape (X, Y, Z); fixed_affine: its 4x4 voxel-to-world matrix (RAS, mm).
        moving: support scan, shape (X', Y', Z'); moving_affine: its matrix.
        transform: one of :data:`REGISTRATION_TRANSFORMS`.
        start_step_mm: spacing of the rigid stage's starting offsets along the world superior-inferior axis.
        iterations: optimiser iterations per stage and resolution level.
        max_scale: the affine stage is rejected (the rigid result returned) if it scales any axis by more
            than this factor or less than its inverse.

    Returns:
        :class:`Registration` (fixed-world -> moving-world matrix, metric, seconds, the transform kept).

    Raises:
        ValueError: if an array is not 3D, holds NaN/inf, or an affine is not an invertible 4x4 matrix, for an
            unknown ``transform``, or if the registration fails from every start (scans that do not overlap).
    """
    fixed, fixed_affine = _check_volume(fixed, fixed_affine, "fixed")
    moving, moving_affine = _check_volume(moving, moving_affine, "moving")
    if start_step_mm <= 0 or iterations < 1:
        raise ValueError(f"start_step_mm must be > 0 and iterations >= 1, got {start_step_mm}, {iterations}.")
    if transform not in REGISTRATION_TRANSFORMS:
        raise ValueError(f"unknown transform {transform!r}; valid: {list(REGISTRATION_TRANSFORMS)}.")
    if max_scale <= 1.0:
        raise ValueError(f"max_scale must be > 1, got {max_scale}.")
    start = time.perf_counter()
    fixed_itk = _to_itk(soft_tissue_window(fixed), fixed_affine)
    moving_itk = _to_itk(soft_tissue_window(moving), moving_affine)
    coarse = (_shrunk(fixed_itk, 4), _shrunk(moving_itk, 4))
    fine = (_shrunk(fixed_itk, 2), _shrunk(moving_itk, 2))
    centre_f = fixed_affine @ np.array([*(np.array(fixed.shape) - 1) / 2, 1.0])
    centre_m = moving_affine @ np.array([*(np.array(moving.shape) - 1) / 2, 1.0])
    low_f, high_f = _superior_extent(fixed, fixed_affine)
    low_m, high_m = _superior_extent(moving, moving_affine)
    reach = abs((high_m - low_m) - (high_f - low_f)) / 2 + start_step_mm
    offsets = np.arange(-np.floor(reach / start_step_mm), np.floor(reach / start_step_mm) + 1) * start_step_mm
    best: tuple[float, itk.Euler3DTransform] | None = None
    for dz in offsets:
        euler = itk.Euler3DTransform[itk.D].New()
        euler.SetCenter([float(c) for c in _LPS[:3, :3] @ centre_f[:3]])
        translation = centre_m[:3] - centre_f[:3] + np.array([0.0, 0.0, dz])
        euler.SetTranslation([float(t) for t in _LPS[:3, :3] @ translation])
        try:
            value = _run(*coarse, euler, iterations)
        except RuntimeError:  # ITK: this start leaves too little overlap between the scans
            continue
        if best is None or value < best[0]:
            best = (value, euler)
    if best is None:
        raise ValueError(
            f"registration failed from every start: the scans ({fixed.shape} and {moving.shape} voxels) "
            "do not overlap enough once their centres are aligned."
        )
    try:
        value = _run(*fine, best[1], iterations)
    except RuntimeError as err:
        raise ValueError(f"registration failed at the finer level: {err}") from err
    result: tuple[itk.Transform, float, str] = (best[1], value, "rigid")
    if transform in ("affine", "bspline"):
        refined = _affine_stage(best[1], coarse, fine, iterations)
        if refined is not None:
            scales = np.linalg.svd(itk.array_from_matrix(refined[0].GetMatrix()), compute_uv=False)
            plausible = scales.max() <= max_scale and scales.min() >= 1.0 / max_scale
            if plausible and refined[1] <= value:
                result = (refined[0], refined[1], "affine")
    if transform == "bspline":
        deformation = _bspline_stage(result[0], fine)
        if deformation is not None:
            return Registration(
                _matrix(result[0]), deformation[1], time.perf_counter() - start, "bspline", deformation[0]
            )
    return Registration(_matrix(result[0]), result[1], time.perf_counter() - start, result[2])


def warp_to(
    moving: np.ndarray,
    moving_affine: np.ndarray,
    fixed_shape: tuple[int, int, int],
    fixed_affine: np.ndarray,
    matrix: np.ndarray,
    bspline: tuple[np.ndarray, np.ndarray] | None = None,
) -> np.ndarray:
    """Resample a support volume (e.g. a mask) onto the query grid through a registration.

    Args:
        moving: support volume, shape (X', Y', Z'), resampled linearly (a mask becomes a probability).
        moving_affine: its 4x4 voxel-to-world matrix (RAS, mm).
        fixed_shape: the query grid's shape (X, Y, Z); fixed_affine: its matrix.
        matrix: fixed-world -> moving-world transform (:attr:`Registration.matrix`).
        bspline: the deformation applied before ``matrix`` (:attr:`Registration.bspline`), if any.

    Returns:
        The resampled volume, shape ``fixed_shape``, float32, 0 outside the support scan.
    """
    moving, moving_affine = _check_volume(moving, moving_affine, "moving")
    matrix = np.asarray(matrix, dtype=np.float64)
    if matrix.shape != (4, 4):
        raise ValueError(f"matrix must be 4x4, got shape {matrix.shape}.")
    reference = _to_itk(np.zeros(tuple(int(s) for s in fixed_shape), np.float32), fixed_affine)
    transform = itk.AffineTransform[itk.D, 3].New()
    lps = _LPS @ matrix @ _LPS
    transform.SetMatrix(itk.matrix_from_array(np.ascontiguousarray(lps[:3, :3])))
    transform.SetTranslation([float(t) for t in lps[:3, 3]])
    if bspline is not None:
        composite = itk.CompositeTransform[itk.D, 3].New()
        composite.AddTransform(transform)
        composite.AddTransform(
            _displacement(_bspline(*bspline), reference)
        )  # the last added is applied first
        transform = composite
    image = _to_itk(moving, moving_affine)
    warped = itk.resample_image_filter(
        image,
        transform=transform,
        interpolator=itk.LinearInterpolateImageFunction.New(image),
        reference_image=reference,
        use_reference_image=True,
        default_pixel_value=0.0,
    )
    out = itk_image_to_metatensor(warped, channel_dim=None)
    return np.asarray(out.array, dtype=np.float32).reshape(tuple(int(s) for s in fixed_shape))


def signed_distance_mm(mask: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Signed distance to a mask's boundary in mm (ITK's Maurer distance map): negative inside.

    Args:
        mask: binary mask, shape (X, Y, Z); affine: its 4x4 voxel-to-world matrix (RAS, mm).

    Returns:
        Distances, shape (X, Y, Z), float32; +inf everywhere for an empty mask.
    """
    mask = np.asarray(mask) > 0
    if not mask.any():
        return np.full(mask.shape, np.inf, np.float32)
    image = itk.cast_image_filter(
        _to_itk(mask.astype(np.float32), affine), ttype=(itk.Image[itk.F, 3], itk.Image[itk.UC, 3])
    )
    distance = itk.signed_maurer_distance_map_image_filter(
        image, use_image_spacing=True, squared_distance=False, inside_is_positive=False
    )
    out = itk_image_to_metatensor(distance, channel_dim=None)
    return np.asarray(out.array, dtype=np.float32).reshape(mask.shape)
