"""Seeded synthetic 3D phantoms: a textured body holding structures of the families in :mod:`.families`.

A phantom is built in physical space: coordinates are in units of half the shortest field of view, so a
structure keeps its physical shape when the case's spacing is anisotropic (it just covers fewer voxels along
the coarse axis). Per case: a spacing (in-plane, and through-plane up to 3x coarser), a body ellipsoid with a
smooth texture, 1-4 structures painted in order (each redrawn until it overlaps earlier ones by at most
``max_overlap`` and leaves each of them at least half its voxels; failing that, the least overlapping draw),
then blur, a smooth multiplicative bias
field, Gaussian or Rician noise and a global gain. Everything is drawn from one ``np.random.Generator`` seeded
by ``seed``; one 48^3 case takes about 30 ms on one core.

Volume-level targets of every case (declared in :data:`SYNTHETIC_TARGETS`):

- ``synth_structure_count`` (classification): how many structures the case holds (classes one..four);
- ``synth_total_volume_ml`` (regression): the labelled volume, voxel count x voxel volume, in millilitres.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage
from scipy.special import expit

from medmeta_plugin.episodes.cases import Case, TargetSpec, check_option
from medmeta_plugin.episodes.families import (
    CONTRASTS,
    FAMILIES_BY_NAME,
    POSITIONS,
    SHARPNESS,
    SIZES,
    FamilySpec,
)
from medmeta_plugin.episodes.primitives import SHAPES, TEXTURES, random_rotation, smooth_noise
from medmeta_plugin.episodes.tasks import TaskRegistry

__all__ = [
    "SYNTHETIC_TARGETS",
    "PhantomConfig",
    "SyntheticCase",
    "case_plans",
    "check_plan",
    "check_shape",
    "make_case",
    "synthetic_registry",
]

_COUNT_CLASSES = ("one", "two", "three", "four")
_MIN_SIZE = 24
#: The volume-level tasks every synthetic case has a target for.
SYNTHETIC_TARGETS: dict[str, TargetSpec] = {
    "synth_structure_count": TargetSpec("synth_structure_count", "classification", _COUNT_CLASSES),
    "synth_total_volume_ml": TargetSpec("synth_total_volume_ml", "regression"),
}


@dataclass(frozen=True)
class PhantomConfig:
    """Ranges the per-case appearance is drawn from (uniformly unless stated).

    Attributes:
        spacing_xy: in-plane voxel size, mm (0.7-1.5 mm spans MR and CT in-plane resolutions).
        z_ratio: through-plane / in-plane spacing; 1-3 spans isotropic MR to 3 mm-slice CT.
        p_isotropic: probability that the spacing is isotropic (ratio 1) regardless of ``z_ratio``.
        body_fill: body semi-axis as a fraction of the half field of view, per axis.
        body_texture: amplitude of the body's smooth intensity variation.
        noise_std: noise standard deviation relative to the body intensity.
        p_rician: probability of Rician (MR magnitude) rather than Gaussian noise.
        bias_coefficient: bound of each linear/quadratic coefficient of the log bias field; 0.2 gives a
            field within about x0.5-x2, as in uncorrected MR.
        p_blur: probability of a Gaussian blur (partial volume of a thicker reconstruction kernel).
        blur_sigma: its sigma, voxels.
        gain: global intensity scale, so absolute intensities carry no information.
        min_voxels: fewest voxels a structure may show.
        max_overlap: largest fraction of a new structure that may cover earlier ones.
        max_attempts: redraws of a structure before giving up.
    """

    spacing_xy: tuple[float, float] = (0.7, 1.5)
    z_ratio: tuple[float, float] = (1.0, 3.0)
    p_isotropic: float = 0.3
    body_fill: tuple[float, float] = (0.8, 0.95)
    body_texture: tuple[float, float] = (0.04, 0.1)
    noise_std: tuple[float, float] = (0.01, 0.05)
    p_rician: float = 0.5
    bias_coefficient: float = 0.2
    p_blur: float = 0.5
    blur_sigma: tuple[float, float] = (0.3, 0.8)
    gain: tuple[float, float] = (0.5, 2.0)
    min_voxels: int = 8
    max_overlap: float = 0.2
    max_attempts: int = 50


@dataclass(frozen=True)
class SyntheticCase:
    """One phantom.

    Attributes:
        image: shape (1, X, Y, Z), float32, arbitrary positive units.
        label: shape (1, X, Y, Z), int16; 0 is background, value ``i`` is ``label_names[i]``.
        label_names: label value -> family name, values 1..n in the order the families were given.
        spacing: voxel size in mm, shape (3,).
        targets: volume-level targets (:data:`SYNTHETIC_TARGETS`).
    """

    image: np.ndarray
    label: np.ndarray
    label_names: dict[int, str]
    spacing: tuple[float, float, float]
    targets: dict[str, int | float] = field(default_factory=dict)


class _Grid:
    """Voxel centres of a case in phantom units, one 1D array per axis (broadcast on use)."""

    def __init__(self, shape: tuple[int, int, int], spacing: np.ndarray) -> None:
        self.shape = shape
        self.unit = float(min(n * s for n, s in zip(shape, spacing))) / 2.0  # mm per phantom unit
        self.axes = [(np.arange(n) - (n - 1) / 2.0) * s / self.unit for n, s in zip(shape, spacing)]
        self.half_extent = np.array([a[-1] + (a[1] - a[0]) / 2 for a in self.axes])
        self.voxel = float(spacing.min()) / self.unit  # in-plane voxel size in phantom units

    def box(self, centre: np.ndarray, radius: float) -> tuple[slice, ...] | None:
        """Index slices of the voxels within ``radius`` of ``centre`` per axis (None if none are)."""
        slices = []
        for axis, c in zip(self.axes, centre):
            lo, hi = np.searchsorted(axis, c - radius), np.searchsorted(axis, c + radius, side="right")
            if hi <= lo:
                return None
            slices.append(slice(int(lo), int(hi)))
        return tuple(slices)

    def local(self, box: tuple[slice, ...], centre: np.ndarray, rotation: np.ndarray) -> np.ndarray:
        """Rotated coordinates ``R^T (u - centre)`` of the voxels in ``box``, shape (3, bx, by, bz)."""
        d = [self.axes[i][box[i]] - centre[i] for i in range(3)]
        d = [d[0][:, None, None], d[1][None, :, None], d[2][None, None, :]]
        return np.stack(
            [rotation[0, k] * d[0] + rotation[1, k] * d[1] + rotation[2, k] * d[2] for k in range(3)]
        )


def _draw_structure(
    rng: np.random.Generator, family: FamilySpec, grid: _Grid, body: tuple[np.ndarray, ...], relaxed: bool
):
    """Draw one structure: its box, soft occupancy, inside mask and contrast factor (None if off-grid).

    ``relaxed`` replaces the family's position prior by the ``"anywhere"`` prior.
    """
    body_centre, body_axes = body
    shape = SHAPES[family.shape](rng)
    size = rng.uniform(*SIZES[family.size])
    ratio = rng.uniform(*family.aspect)
    stretch = np.array([ratio ** (2 / 3), ratio ** (-1 / 3), ratio ** (-1 / 3)])  # volume-preserving
    rotation = random_rotation(rng)
    position = POSITIONS["anywhere"] if relaxed else POSITIONS[family.position]
    centre = body_centre + position(rng) * body_axes
    width = rng.uniform(*SHARPNESS[family.sharpness]) * grid.voxel
    # The occupancy ramp is below 5% beyond 3 widths outside the surface.
    box = grid.box(centre, shape.radius * size * stretch.max() + 3 * width)
    if box is None:
        return None
    local = grid.local(box, centre, rotation) / (size * stretch).reshape(3, 1, 1, 1)
    distance = shape.sdf(local)
    inside = distance < 0
    if not inside.any():
        return None
    occupancy = expit(-distance * size * stretch.min() / width)
    depth = np.clip(-distance / max(float(-distance.min()), 1e-6), 0.0, 1.0)
    sign = {"bright": 1.0, "dark": -1.0}.get(family.polarity, rng.choice([-1.0, 1.0]))
    factor = 1.0 + sign * rng.uniform(*CONTRASTS[family.contrast]) * TEXTURES[family.texture](
        rng, local, depth
    )
    return box, occupancy, inside, factor


def _place(
    rng: np.random.Generator,
    family: FamilySpec,
    grid: _Grid,
    body: tuple[np.ndarray, np.ndarray],
    label: np.ndarray,
    counts: dict[int, int],
    config: PhantomConfig,
):
    """Draw a structure until it overlaps the ones in ``label`` little enough (see the module docstring).

    After half the attempts the family's position prior is dropped for anywhere in the body (two large
    "central" structures may not fit together); if no draw meets ``max_overlap``, the least overlapping one
    that still leaves every structure ``min_voxels`` is taken.
    """
    best, best_overlap = None, np.inf
    for attempt in range(config.max_attempts):
        drawn = _draw_structure(rng, family, grid, body, relaxed=attempt >= config.max_attempts // 2)
        if drawn is None:
            continue
        box, _, inside, _ = drawn
        new = int(inside.sum())
        covered = np.bincount(label[box][inside], minlength=max(counts, default=0) + 1)
        overlap = covered[1:].sum() / new
        keeps = all(counts[v] - covered[v] >= max(config.min_voxels, counts[v] / 2) for v in counts)
        if new - covered[1:].sum() >= config.min_voxels and keeps and overlap < best_overlap:
            best, best_overlap = drawn, overlap
            if overlap <= config.max_overlap:
                break
    if best is None:
        raise RuntimeError(f"family {family.name!r}: no valid placement in {config.max_attempts} draws.")
    return best


def _check_families(families: Sequence[str]) -> tuple[str, ...]:
    if isinstance(families, str) or not 1 <= len(families) <= len(_COUNT_CLASSES):
        raise ValueError(
            f"families must be a list of 1 to {len(_COUNT_CLASSES)} family names, got {families!r}."
        )
    if len(set(families)) != len(families):
        raise ValueError(f"families must be distinct, got {list(families)}.")
    for name in families:
        check_option(name, FAMILIES_BY_NAME, "family")
    return tuple(families)


def check_shape(shape: Sequence[int]) -> tuple[int, int, int]:
    """A phantom's spatial shape as three ints; ValueError unless three integers of at least 24 voxels."""
    # 24 voxels: at 16, four structures of min_voxels each failed to fit in ~1% of 300 seeds; at 24, none did.
    if len(shape) != 3 or any(
        isinstance(n, bool) or not isinstance(n, int | np.integer) or n < _MIN_SIZE for n in shape
    ):
        raise ValueError(f"shape must be three integers >= {_MIN_SIZE}, got {shape!r}.")
    return tuple(int(n) for n in shape)


def make_case(
    families: Sequence[str],
    seed: int,
    shape: Sequence[int] = (48, 48, 48),
    config: PhantomConfig | None = None,
) -> SyntheticCase:
    """Generate one phantom holding one structure of each given family.

    Args:
        families: 1-4 distinct family names (:data:`~medmeta_plugin.episodes.families.FAMILIES`); the i-th
            gets label value i + 1.
        seed: determines everything about the case.
        shape: spatial shape ``(X, Y, Z)``, each at least 24.
        config: appearance ranges; defaults to :class:`PhantomConfig()`.

    Returns:
        The phantom; every label value 1..len(families) has at least ``config.min_voxels`` voxels.

    Raises:
        ValueError: on an unknown or repeated family, a bad shape, or a seed that is not an integer.
        RuntimeError: if a structure finds no valid placement in ``config.max_attempts`` draws.
    """
    families, shape = _check_families(families), check_shape(shape)
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer):
        raise ValueError(f"seed must be an integer, got {seed!r}.")
    config = config or PhantomConfig()
    rng = np.random.default_rng(int(seed))

    spacing_xy = rng.uniform(*config.spacing_xy)
    ratio = 1.0 if rng.random() < config.p_isotropic else rng.uniform(*config.z_ratio)
    spacing = np.array([spacing_xy, spacing_xy, spacing_xy * ratio])
    grid = _Grid(shape, spacing)

    body_axes = grid.half_extent * rng.uniform(*config.body_fill, size=3)
    body_centre = rng.uniform(-0.05, 0.05, size=3) * grid.half_extent
    u = np.meshgrid(
        *[(a - c) / r for a, c, r in zip(grid.axes, body_centre, body_axes)], indexing="ij", sparse=True
    )
    body_distance = (np.sqrt(u[0] ** 2 + u[1] ** 2 + u[2] ** 2) - 1.0) * body_axes.min()
    body = expit(-body_distance / grid.voxel)
    air = rng.uniform(0.0, 0.08)
    texture = 1.0 + rng.uniform(*config.body_texture) * smooth_noise(rng, shape, cell=8.0)
    image = air + (1.0 - air) * body * texture
    label = np.zeros(shape, dtype=np.int16)
    counts: dict[int, int] = {}

    for value, name in enumerate(families, start=1):
        box, occupancy, inside, factor = _place(
            rng, FAMILIES_BY_NAME[name], grid, (body_centre, body_axes), label, counts, config
        )
        covered = np.bincount(label[box][inside], minlength=value)
        image[box] = image[box] * (1.0 - occupancy) + occupancy * np.maximum(factor, 0.0)
        label[box][inside] = value
        counts = {v: c - int(covered[v]) for v, c in counts.items()}
        counts[value] = int(inside.sum())

    image = _degrade(rng, image, config)
    volume_ml = float((label > 0).sum() * spacing.prod() / 1000.0)  # mm^3 -> mL
    return SyntheticCase(
        image=image[None].astype(np.float32),
        label=label[None],
        label_names=dict(enumerate(families, start=1)),
        spacing=tuple(float(s) for s in spacing),
        targets={"synth_structure_count": len(families) - 1, "synth_total_volume_ml": volume_ml},
    )


def _degrade(rng: np.random.Generator, image: np.ndarray, config: PhantomConfig) -> np.ndarray:
    """Blur, multiplicative bias field, noise and gain, in the order a scanner adds them."""
    if rng.random() < config.p_blur:
        image = ndimage.gaussian_filter(image, sigma=rng.uniform(*config.blur_sigma))
    g = np.meshgrid(*[np.linspace(-1.0, 1.0, n) for n in image.shape], indexing="ij", sparse=True)
    terms = [g[0], g[1], g[2], g[0] * g[1], g[0] * g[2], g[1] * g[2], g[0] ** 2, g[1] ** 2, g[2] ** 2]
    coefficients = rng.uniform(-config.bias_coefficient, config.bias_coefficient, size=len(terms))
    image = image * np.exp(sum(c * t for c, t in zip(coefficients, terms)))
    sigma = rng.uniform(*config.noise_std)
    noise = rng.normal(scale=sigma, size=image.shape)
    if rng.random() < config.p_rician:
        image = np.sqrt((image + noise) ** 2 + rng.normal(scale=sigma, size=image.shape) ** 2)
    else:
        image = image + noise
    return image * rng.uniform(*config.gain)


def _load(families: tuple[str, ...], seed: int, shape: tuple[int, int, int], config: PhantomConfig):
    case = make_case(families, seed, shape, config)
    return case.image, case.label


def check_plan(
    families: Sequence[str], n_cases: int, structures_per_case: tuple[int, int]
) -> tuple[str, ...]:
    """Validate the arguments of :func:`case_plans` and return ``families`` as a tuple.

    Raises:
        ValueError: on an unknown or repeated family, ``n_cases`` < 1, or a bad ``structures_per_case``.
    """
    families = tuple(families)
    for name in families:
        check_option(name, FAMILIES_BY_NAME, "family")
    if len(set(families)) != len(families) or not families:
        raise ValueError(f"families must be distinct family names, got {list(families)}.")
    if isinstance(n_cases, bool) or not isinstance(n_cases, int) or n_cases < 1:
        raise ValueError(f"n_cases must be a positive integer, got {n_cases!r}.")
    low, high = structures_per_case
    if not 1 <= low <= high <= min(len(_COUNT_CLASSES), len(families)):
        raise ValueError(
            f"structures_per_case must be a range within [1, {min(len(_COUNT_CLASSES), len(families))}] "
            f"(at most 4, at most the number of families), got {structures_per_case!r}."
        )
    return families


def case_plans(
    families: Sequence[str], n_cases: int, seed: int, structures_per_case: tuple[int, int]
) -> list[tuple[tuple[str, ...], int]]:
    """The families and seed of each case of a synthetic dataset, as :func:`synthetic_registry` draws them.

    Families are dealt from reshuffled decks, so each appears about equally often.

    Returns:
        One ``(families, case_seed)`` pair per case.
    """
    rng = np.random.default_rng(seed)
    low, high = structures_per_case
    deck: list[str] = []
    plans = []
    for _ in range(n_cases):
        chosen: list[str] = []
        for _ in range(int(rng.integers(low, high + 1))):
            if not set(deck) - set(chosen):
                deck = [str(f) for f in rng.permutation(families)] + deck
            pick = next(i for i in range(len(deck) - 1, -1, -1) if deck[i] not in chosen)
            chosen.append(deck.pop(pick))
        plans.append((tuple(chosen), int(rng.integers(0, 2**31 - 1))))
    return plans


def synthetic_registry(
    families: Sequence[str],
    n_cases: int,
    seed: int,
    shape: Sequence[int] = (48, 48, 48),
    structures_per_case: tuple[int, int] = (2, 4),
    config: PhantomConfig | None = None,
    dataset: str | None = None,
) -> TaskRegistry:
    """Draw phantom cases and turn them into tasks: ``synth_<family>`` plus :data:`SYNTHETIC_TARGETS`.

    Families are dealt from reshuffled decks, so each appears in about
    ``n_cases * mean(structures_per_case) / len(families)`` cases. Each case is generated once here to
    compute its targets; its arrays are regenerated from its seed when loaded (the sampler caches them).

    Args:
        families: family names to draw from, e.g. :data:`~.families.META_TRAIN_FAMILIES`.
        n_cases: number of cases.
        seed: determines every case.
        shape: spatial shape of each case.
        structures_per_case: inclusive range of the number of structures per case, within 1-4.
        config: appearance ranges.
        dataset: dataset name of the cases; defaults to ``synthetic_seed<seed>``.

    Returns:
        The registry.

    Raises:
        ValueError: on an unknown or repeated family, ``n_cases`` < 1, or a bad ``structures_per_case``.
    """
    families = check_plan(families, n_cases, structures_per_case)
    shape = check_shape(shape)
    config = config or PhantomConfig()
    cases = []
    for index, (chosen, case_seed) in enumerate(case_plans(families, n_cases, seed, structures_per_case)):
        phantom = make_case(chosen, case_seed, shape, config)
        cases.append(
            Case(
                case_id=f"case{index:05d}",
                dataset=dataset or f"synthetic_seed{seed}",
                structures={v: f"synth_{n}" for v, n in phantom.label_names.items()},
                targets=phantom.targets,
                loader=functools.partial(_load, chosen, case_seed, shape, config),
            )
        )
    return TaskRegistry.from_cases(cases, SYNTHETIC_TARGETS)
