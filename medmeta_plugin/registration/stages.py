"""The local stages after placement: rigid, affine and B-spline refinements by Mattes mutual information
(ITK v4).

Each starts where the previous one ended, on images smoothed and shrunk once (4x, then 2x), since ITK's own
pyramid rebuilds them per start (0.04 s a start where letting ITK rebuild them took 2.4 s). Full resolution
is not worth its seconds: a carried mask is blurred by more than a voxel anyway.

- The affine stage corrects the difference in size and build between two patients; it is kept only if it
  improves the metric and scales no axis beyond ``max_scale`` either way (a larger one is a degenerate fit,
  e.g. along a thin slab).
- The B-spline stage is a coarse cubic deformation (:data:`BSPLINE_MESH` cells per axis over the query
  scan, fitted at the 2x level on at most :data:`BSPLINE_SAMPLES` voxels) for organs that sit differently in
  two patients beyond what an affine map can say. What each stage gains and costs is measured in
  ``docs/benchmarks/`` (``atlas.md``, ``bspline.md``, ``placement.md``).
"""

from __future__ import annotations

import itk
import numpy as np

__all__ = [
    "BSPLINE_ITERATIONS",
    "BSPLINE_MESH",
    "BSPLINE_SAMPLES",
    "affine_stage",
    "bspline_stage",
    "bspline_transform",
    "optimise",
]

# The B-spline stage: control-point mesh cells per axis over the query scan, optimiser iterations, and the
# most voxels its metric samples (a regular grid, seeded, so a run repeats exactly on one ITK thread).
BSPLINE_MESH = 3
BSPLINE_ITERATIONS = 30
BSPLINE_SAMPLES = 10_000
_SAMPLING_SEED = 7


def optimise(
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
        fixed, moving: images already smoothed and shrunk to the level wanted (one level, no pyramid).
        transform: the ITK transform to optimise (fixed physical point -> moving physical point).
        iterations: optimiser iterations.
        step_mm: the first step, in mm of largest voxel shift (with ``physical_scales``; else in parameter
            units); each step that overshoots shrinks it by ``relaxation``, down to ``min_step_mm``.
        physical_scales: scale parameters by the voxel shift they cause (ITK's estimator: cheap for a
            rigid or affine transform, as costly as the fit for a B-spline's hundreds of parameters).
        max_samples: evaluate the metric on at most this many fixed voxels (a seeded regular grid).

    Raises:
        RuntimeError: ITK's, when too few voxels overlap.
    """
    image_type = itk.Image[itk.F, 3]
    metric = itk.MattesMutualInformationImageToImageMetricv4[image_type, image_type].New(
        NumberOfHistogramBins=32
    )
    if min(*itk.size(fixed), *itk.size(moving)) < 4:  # recursive-Gaussian gradients need 4 voxels per axis
        metric.SetUseFixedImageGradientFilter(False)
        metric.SetUseMovingImageGradientFilter(False)
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
    method.SetNumberOfLevels(1)
    method.SetShrinkFactorsPerLevel([1])
    method.SetSmoothingSigmasPerLevel([0])
    voxels = int(np.prod(itk.size(fixed)))
    if max_samples is not None and voxels > max_samples:
        method.SetMetricSamplingStrategy(itk.ImageRegistrationMethodv4Enums.MetricSamplingStrategy_REGULAR)
        method.SetMetricSamplingPercentage(max_samples / voxels)
        method.MetricSamplingReinitializeSeed(_SAMPLING_SEED)
    method.Update()
    return float(optimizer.GetValue())


def affine_stage(
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
        optimise(*coarse, affine, iterations, step_mm=1.0)
        return affine, optimise(*fine, affine, iterations, step_mm=0.5)
    except RuntimeError:  # too little overlap once scaled
        return None


def _parameters(values: np.ndarray) -> itk.OptimizerParameters:
    return itk.OptimizerParameters[itk.D](np.asarray(values, dtype=np.float64).tolist())


def bspline_transform(fixed_parameters: np.ndarray, parameters: np.ndarray) -> itk.BSplineTransform:
    """ITK's cubic B-spline transform from its fixed parameters and parameters (LPS mm)."""
    transform = itk.BSplineTransform[itk.D, 3, 3].New()
    transform.SetFixedParameters(_parameters(fixed_parameters))
    transform.SetParameters(_parameters(parameters))
    return transform


def bspline_stage(
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
        value = optimise(
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
