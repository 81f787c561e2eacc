"""The field-of-view suite: real scans cropped, re-acquired and re-posed, paired with another scan of the
same region.

Each pair is a query (fixed) scan and a labelled support (moving) scan, as the app meets them: the support
registered onto the query carries its masks over. A pair's scans are made from the real cases of
``../shared/data/real`` by

- **another subject** (pairs of one source scan): a seeded affine (scale up to 10 % per axis, rotation up to
  8 degrees) with a smooth elastic deformation of zero mean, and a new contrast (gamma, gain, bias field,
  noise), so the two look like two patients of one modality;
- **a field of view**: a slab of 20-80 mm along the body axis at a level in the middle or at the edge of
  the other scan's extent, two slabs that overlap in part, or the whole scan;
- **an acquisition**: axial, coronal or sagittal voxel order with random axis flips (LPS, RAS and the
  rest), a header tilted by up to 20 degrees, in-plane spacing 0.5-2 mm and slices 1-6 mm;
- **a scanner pose**: the world moved by up to 150 mm along each axis and turned by up to 20 degrees for a
  head, 5 for a body (patients lie flat on a table; heads tilt in a coil).

Then, like every scan the app serves, both go to the 3 mm RAS working grid (:func:`~medmeta_plugin.io.
resample`, :func:`~medmeta_plugin.transforms.normalize_intensity`).

**Truth.** Within one source scan the transform is known exactly from the steps above (the elastic part,
of zero mean, aside). Between two real subjects it is measured from their labels, never from the images:
the two brains (``brain_mni152``, ``brain_colin27``, two atlases of one template space) by the
least-squares affine map between the centroids of the structures both label (names mapped in
:data:`BRAIN_CORRESPONDENCES`); the abdominal CT and MR (two patients; the MR is a 60 mm slab that cuts most
organs, so their centroids are biased) by the translation under which their shared structures overlap most.

**Pair classes.** ``ct-ct``, ``ct-mr`` (either way round), ``mr-mr``, ``brain`` (one brain atlas against
the other, either way round), and ``head-abdomen`` (a brain against an abdomen: no right answer, so a
placement must come back unsure). Seeds split the pairs into a development half (``dev``: the confidence
is calibrated there) and a ``test`` half (reported).

**Scored structures.** Only the held-out and development structures of :mod:`~medmeta_plugin.benchmarks.
splits`, so the suite evaluates nothing meta-training is free to use.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy import ndimage

from medmeta_plugin.episodes.splits import ABDOMEN_DEV, ABDOMEN_HELDOUT, BRAIN_DEV, BRAIN_HELDOUT
from medmeta_plugin.io import ImageMeta, read_image, read_label, resample
from medmeta_plugin.paths import real_data_root
from medmeta_plugin.registration.placement import rotation_matrix
from medmeta_plugin.transforms import normalize_intensity

__all__ = [
    "BRAIN_CORRESPONDENCES",
    "FOV_CLASSES",
    "FovPair",
    "Scan",
    "WORKING_SPACING",
    "fov_pairs",
    "world_error",
]

#: The working grid of the app's default (``--conf spacing 3``): pairs are registered on it, as served.
WORKING_SPACING = 3.0
#: Pair classes, in report order.
FOV_CLASSES = ("ct-ct", "ct-mr", "mr-mr", "brain", "head-abdomen")

# DK (brain_mni152) structure -> AAL (brain_colin27) region(s) of the same anatomy, for the brains' truth
# (centroids) and for scoring carried masks. AAL lacks the held-out hippocampus, putamen, thalamus and insula
# (removed from brain_colin27, see its README), and has no brain stem, ventricles or white matter.
BRAIN_CORRESPONDENCES: dict[str, tuple[str, ...]] = {
    **{f"{side}-Caudate": (f"Caudate_{s}",) for side, s in (("Left", "L"), ("Right", "R"))},
    **{f"{side}-Pallidum": (f"Pallidum_{s}",) for side, s in (("Left", "L"), ("Right", "R"))},
    **{f"{side}-Amygdala": (f"Amygdala_{s}",) for side, s in (("Left", "L"), ("Right", "R"))},
    **{
        f"{side}-Cerebellum-Cortex": tuple(
            f"Cerebelum_{part}_{s}" for part in ("Crus1", "Crus2", "3", "4_5", "6", "7b", "8", "9", "10")
        )
        for side, s in (("Left", "L"), ("Right", "R"))
    },
    **{
        f"ctx-{h}-{dk}": (f"{aal}_{s}",)
        for h, s in (("lh", "L"), ("rh", "R"))
        for dk, aal in (
            ("precentral", "Precentral"),
            ("postcentral", "Postcentral"),
            ("cuneus", "Cuneus"),
            ("lingual", "Lingual"),
            ("precuneus", "Precuneus"),
            ("fusiform", "Fusiform"),
            ("superiortemporal", "Temporal_Sup"),
            ("pericalcarine", "Calcarine"),
            ("paracentral", "Paracentral_Lobule"),
            ("supramarginal", "SupraMarginal"),
            ("transversetemporal", "Heschl"),
            ("parahippocampal", "ParaHippocampal"),
        )
    },
}

# What a pair scores: the held-out and development structures (episodes/splits.py) the two scans share.
_ABDOMEN_SCORED = ABDOMEN_HELDOUT + ABDOMEN_DEV
_BRAIN_SCORED = tuple(n for n in BRAIN_HELDOUT + BRAIN_DEV if n in BRAIN_CORRESPONDENCES)
# Voxels a structure needs on the working grid of both scans to be scored (27 mL / 0.7 mL at 3 mm).
_MIN_VOXELS = 25


@dataclass(frozen=True)
class Scan:
    """One scan of a pair on the working grid.

    Attributes:
        image: normalised intensities, shape (X, Y, Z), float32.
        affine: its 4x4 voxel-to-world matrix (RAS mm).
        label: integer label map, shape (X, Y, Z).
        names: ``{structure: label value}``; for an atlas region made of several values (the cerebellum),
            the values are merged under the DK name.
        description: how it was made (source, field of view, acquisition).
    """

    image: np.ndarray
    affine: np.ndarray
    label: np.ndarray
    names: dict[str, int]
    description: str

    def mask(self, name: str) -> np.ndarray:
        """The structure's mask, shape (X, Y, Z), bool."""
        return self.label == self.names[name]


@dataclass(frozen=True)
class FovPair:
    """A query (fixed) and a labelled support (moving) scan with the truth of where one lies in the other.

    Attributes:
        name: unique, readable (class, extent, split and index).
        pair_class: one of :data:`FOV_CLASSES`; extent: ``slab-in-full``, ``slab-at-edge``, ``partial``,
            ``full-full`` or ``full-in-slab``.
        split: ``dev`` or ``test``.
        fixed, moving: the two :class:`Scan` objects.
        truth: 4x4 world matrix, fixed point -> moving point (RAS mm); None for ``head-abdomen``.
        structures: names scored by carried-mask Dice (present in both scans).
        body_axis: the fixed scan's superior direction in its world (unit vector, shape (3,)).
    """

    name: str
    pair_class: str
    extent: str
    split: str
    fixed: Scan
    moving: Scan
    truth: np.ndarray | None
    structures: tuple[str, ...]
    body_axis: np.ndarray = field(repr=False, default_factory=lambda: np.array([0.0, 0.0, 1.0]))


def world_error(pair: FovPair, matrix: np.ndarray) -> tuple[float, float]:
    """How far ``matrix`` (fixed -> moving) puts the fixed scan's body centre from the truth: along the body
    axis and in 3D (mm; both measured in the fixed scan's frame).

    Raises:
        ValueError: for a pair without truth.
    """
    if pair.truth is None:
        raise ValueError(f"{pair.name} has no truth (a {pair.pair_class} pair).")
    body = pair.fixed.image > np.percentile(pair.fixed.image, 60)
    centre = pair.fixed.affine @ np.r_[np.argwhere(body).mean(0), 1.0]
    # Back into the fixed world through the truth's inverse, so the error is in the query's frame.
    back = np.linalg.inv(pair.truth) @ (np.asarray(matrix) @ centre)
    gap = (back - centre)[:3]
    return float(abs(gap @ pair.body_axis)), float(np.linalg.norm(gap))


# ----- sources ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Source:
    image: np.ndarray
    label: np.ndarray
    affine: np.ndarray
    names: dict[str, int]
    kind: str  # "ct", "mr", "brain"

    @property
    def extent_s(self) -> tuple[float, float]:
        """World superior-inferior extent (RAS z, mm) of the scan."""
        corners = _corners(self.image.shape, self.affine)
        return float(corners[:, 2].min()), float(corners[:, 2].max())


@functools.lru_cache(maxsize=8)
def _source(folder: str) -> _Source:
    root = real_data_root() / folder
    if not root.is_dir():
        raise ValueError(f"real data not found at {root}; set MEDMETA_REAL_DATA to the data/real folder.")
    image_path = next(p for p in sorted(root.iterdir()) if p.name.startswith("image."))
    label_path = next(p for p in sorted(root.iterdir()) if p.name.startswith("label."))
    image, meta = read_image(image_path)
    label, _ = read_label(label_path, meta)
    values = {n: int(v) for v, n in json.loads((root / "labels.json").read_text()).items()}
    label = label[0].astype(np.int16)
    if folder == "brain_colin27":  # AAL regions under their DK names (cerebellum: several regions, one name)
        merged = np.zeros_like(label)
        names = {}
        for value, (dk, aal) in enumerate(BRAIN_CORRESPONDENCES.items(), start=1):
            parts = [values[a] for a in aal if a in values]
            if parts:
                merged[np.isin(label, parts)] = value
                names[dk] = value
        label, values = merged, names
    kind = "brain" if folder.startswith("brain") else folder.split("_")[0]
    return _Source(image[0], label, meta.affine, values, kind)


def _corners(shape: tuple[int, ...], affine: np.ndarray) -> np.ndarray:
    edges = [(-0.5, n - 0.5) for n in shape]
    index = np.array([[i, j, k, 1.0] for i in edges[0] for j in edges[1] for k in edges[2]])
    return (index @ np.asarray(affine).T)[:, :3]


def _centroid(source: _Source, name: str) -> np.ndarray:
    index = np.argwhere(source.label == source.names[name]).mean(0)
    return (source.affine @ np.r_[index, 1.0])[:3]


@functools.lru_cache(maxsize=4)
def _between(fixed: str, moving: str) -> bytes:
    """The base truth between two real subjects, fixed world -> moving world (RAS mm), as bytes (cached)."""
    a, b = _source(fixed), _source(moving)
    if a.kind == "brain":  # both atlases label the whole brain: centroids of the shared structures
        shared = sorted(set(a.names) & set(b.names))
        p = np.array([_centroid(a, n) for n in shared])
        q = np.array([_centroid(b, n) for n in shared])
        solution, *_ = np.linalg.lstsq(np.c_[p, np.ones(len(p))], q, rcond=None)
        matrix = np.eye(4)
        matrix[:3, :] = solution.T
    else:
        matrix = _overlap_translation(a, b)
    return matrix.tobytes()


def _overlap_translation(a: _Source, b: _Source) -> np.ndarray:
    """The translation (fixed world -> moving world) under which the structures labelled in both scans
    overlap most (summed Dice), searched over every shift at 3 mm by FFT; labels only, no image."""
    from medmeta_plugin.registration.grids import search_grid

    shared = [n for n in _ABDOMEN_SCORED + ("adrenal_gland_right", "autochthon_left") if n in a.names]
    shared = [n for n in shared if n in b.names]
    grids = []
    for source in (a, b):
        grid = search_grid(source.image, source.affine, WORKING_SPACING, 3)
        to_source = np.linalg.inv(source.affine) @ grid.affine
        index = np.indices(tuple(grid.image.shape)).reshape(3, -1)
        voxel = np.rint(to_source[:3, :3] @ index + to_source[:3, 3:4]).astype(int)
        inside = ((voxel >= 0) & (voxel < np.array(source.label.shape)[:, None])).all(0)
        label = np.zeros(index.shape[1], np.int16)
        label[inside] = source.label[tuple(voxel[:, inside])]
        grids.append((label.reshape(tuple(grid.image.shape)), grid.affine))
    (la, ga), (lb, gb) = grids
    size = [int(x + y - 1) for x, y in zip(la.shape, lb.shape)]
    total = 0.0
    for name in shared:
        ma, mb = (la == a.names[name]).astype(np.float64), (lb == b.names[name]).astype(np.float64)
        corr = np.fft.irfftn(np.conj(np.fft.rfftn(ma, size)) * np.fft.rfftn(mb, size), size)
        total = total + 2 * corr / (ma.sum() + mb.sum())
    index = np.unravel_index(int(np.argmax(total)), total.shape)
    shift = np.array([i if i < m else i - s for i, m, s in zip(index, lb.shape, size)], dtype=np.float64)
    matrix = np.eye(4)
    matrix[:3, 3] = gb[:3, 3] - ga[:3, 3] + shift * WORKING_SPACING
    return matrix


# ----- making a scan --------------------------------------------------------------------------------
def _rigid(rng: np.random.Generator, max_deg: float, max_mm: float) -> np.ndarray:
    """A random rigid world transform: a rotation up to ``max_deg`` about a random axis, a shift per axis."""
    axis = rng.normal(size=3)
    matrix = np.eye(4)
    matrix[:3, :3] = rotation_matrix(axis / np.linalg.norm(axis) * rng.uniform(0, max_deg))
    matrix[:3, 3] = rng.uniform(-max_mm, max_mm, 3)
    return matrix


@dataclass(frozen=True)
class _Subject:
    """Another subject made from a source: content(p) = source(G p + elastic(p)); G: new -> source world."""

    matrix: np.ndarray
    elastic: Callable[[np.ndarray], np.ndarray] | None
    contrast_seed: int | None


def _same_subject() -> _Subject:
    return _Subject(np.eye(4), None, None)


def _other_subject(source: _Source, rng: np.random.Generator) -> _Subject:
    corners = _corners(source.image.shape, source.affine)
    centre = corners.mean(0)
    scale = np.diag([*rng.uniform(0.9, 1.1, 3), 1.0])
    turn = np.eye(4)
    axis = rng.normal(size=3)
    turn[:3, :3] = rotation_matrix(axis / np.linalg.norm(axis) * rng.uniform(0, 8))
    to_centre, back = np.eye(4), np.eye(4)
    to_centre[:3, 3], back[:3, 3] = -centre, centre
    matrix = back @ turn @ scale @ to_centre
    low, high = corners.min(0), corners.max(0)
    coarse = rng.normal(size=(3, 4, 4, 4))
    coarse -= coarse.mean(axis=(1, 2, 3), keepdims=True)
    coarse *= 6.0 / np.abs(coarse).max()  # up to 6 mm, zero mean: the truth stays the affine part

    def elastic(points: np.ndarray) -> np.ndarray:  # (N, 3) world -> (N, 3) displacement, mm
        where = (points - low) / np.maximum(high - low, 1e-6) * 3
        return np.stack([ndimage.map_coordinates(c, where.T, order=3, mode="nearest") for c in coarse], 1)

    return _Subject(matrix, elastic, int(rng.integers(2**31)))


def _contrast(image: np.ndarray, seed: int) -> np.ndarray:
    """A new contrast: gamma 0.7-1.4 on the 1-99th percentile range, a smooth 15 % gain field, 2 % noise."""
    rng = np.random.default_rng(seed)
    low, high = np.percentile(image, [1, 99])
    x = np.clip((image - low) / max(high - low, 1e-6), 0, 1) ** rng.uniform(0.7, 1.4)
    coarse = torch.from_numpy(rng.normal(size=(1, 1, 3, 3, 3)).astype(np.float32))
    gain = torch.nn.functional.interpolate(coarse, size=image.shape, mode="trilinear", align_corners=True)
    gain = gain[0, 0].numpy()
    x = x * (1 + 0.15 * gain / max(np.abs(gain).max(), 1e-6)) + rng.normal(0, 0.02, image.shape)
    return (x * (high - low) + low).astype(np.float32)


_ORIENTATIONS = {"axial": (0, 1, 2), "coronal": (0, 2, 1), "sagittal": (1, 2, 0)}


def _acquire(
    source: _Source,
    subject: _Subject,
    pose: np.ndarray,
    levels: tuple[float, float] | None,
    rng: np.random.Generator,
    inplane_mm: tuple[float, float],
) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
    """Image, label and voxel-to-world matrix of one acquisition of a subject, and how it was made.

    ``levels`` is the slab's range along the source's superior axis (source world mm; None: the whole scan);
    the scanner world is the subject's world moved by ``pose``.
    """
    orientation = str(rng.choice(list(_ORIENTATIONS)))
    axes = np.eye(3)[:, list(_ORIENTATIONS[orientation])] * rng.choice([-1.0, 1.0], size=3)
    tilt_deg = float(rng.uniform(0, 20))
    axis = rng.normal(size=3)
    axes = rotation_matrix(axis / np.linalg.norm(axis) * tilt_deg) @ axes
    spacing = np.array([*([rng.uniform(*inplane_mm)] * 2), rng.uniform(1.0, 6.0)])
    # The region: the source's field of view within the levels, in scanner world, then in the grid's frame.
    corners = _corners(source.image.shape, source.affine)
    low, high = corners.min(0), corners.max(0)
    if levels is not None:
        low[2], high[2] = max(low[2], levels[0]), min(high[2], levels[1])
    box = np.array(
        [[x, y, z, 1.0] for x in (low[0], high[0]) for y in (low[1], high[1]) for z in (low[2], high[2])]
    )
    to_scanner = pose @ np.linalg.inv(subject.matrix)
    local = (box @ to_scanner.T)[:, :3] @ axes
    start, stop = local.min(0), local.max(0)
    if levels is not None:
        # A tilted slab is as thick as the slab along its own axis nearest the body's: the box around the
        # S-limited region in the tilted frame held up to 5x the anatomy (a test measured it).
        superior = (to_scanner[:3, :3] @ np.array([0.0, 0.0, 1.0])) @ axes  # the body axis in the grid frame
        k = int(np.argmax(np.abs(superior)))
        middle = to_scanner @ np.r_[(low[0] + high[0]) / 2, (low[1] + high[1]) / 2, np.mean(levels), 1.0]
        centre = float(middle[:3] @ axes[:, k])
        start[k], stop[k] = centre - (levels[1] - levels[0]) / 2, centre + (levels[1] - levels[0]) / 2
    shape = np.maximum(np.round((stop - start) / spacing).astype(int), 2)
    affine = np.eye(4)
    affine[:3, :3] = axes * spacing[None, :]
    affine[:3, 3] = axes @ (start + spacing / 2)
    # Sample: grid voxel -> scanner world -> subject world -> (elastic) -> source world -> source voxel,
    # computed every 4th voxel and interpolated linearly in between (exact for the affine part; the elastic
    # part is smooth over centimetres).
    coarse_shape = tuple(int(np.ceil((n - 1) / 4)) + 1 for n in shape)
    index = np.indices(coarse_shape).reshape(3, -1).T * 4.0
    world = index @ affine[:3, :3].T + affine[:3, 3]
    subject_world = world @ np.linalg.inv(pose)[:3, :3].T + np.linalg.inv(pose)[:3, 3]
    if subject.elastic is not None:
        subject_world = subject_world + subject.elastic(subject_world)
    source_world = subject_world @ subject.matrix[:3, :3].T + subject.matrix[:3, 3]
    coarse_voxel = (source_world - source.affine[:3, 3]) @ np.linalg.inv(source.affine[:3, :3]).T
    field = torch.from_numpy(coarse_voxel.T.reshape(3, *coarse_shape).astype(np.float32))
    size = tuple(int(4 * (c - 1)) + 1 for c in coarse_shape)
    dense = torch.nn.functional.interpolate(field[None], size=size, mode="trilinear", align_corners=True)[0]
    voxel = dense[:, : shape[0], : shape[1], : shape[2]].reshape(3, -1).numpy().T
    background = float(np.percentile(source.image, 0.5))
    image = ndimage.map_coordinates(source.image, voxel.T, order=1, mode="constant", cval=background)
    label = ndimage.map_coordinates(source.label, voxel.T, order=0, mode="constant", cval=0)
    image = image.reshape(tuple(shape)).astype(np.float32)
    if subject.contrast_seed is not None:
        image = _contrast(image, subject.contrast_seed)
    thickness = "whole" if levels is None else f"{levels[1] - levels[0]:.0f} mm slab"
    what = f"{thickness}, {orientation}, tilt {tilt_deg:.0f} deg, {np.round(spacing, 1).tolist()} mm"
    return image, label.reshape(tuple(shape)).astype(np.int16), affine, what


def _working(
    image: np.ndarray, label: np.ndarray, affine: np.ndarray, names: dict[str, int], what: str
) -> Scan:
    """The acquisition on the app's working grid (3 mm, RAS axes), intensities normalised as served."""
    meta = ImageMeta.from_affine(affine, image.shape)
    spacing = (WORKING_SPACING,) * 3
    work, working = resample(image[None], meta, spacing=spacing, orientation="RAS")
    lab, _ = resample(label[None], meta, spacing=spacing, orientation="RAS", mode="nearest")
    present = {n: v for n, v in names.items() if (lab[0] == v).sum() > 0}
    return Scan(normalize_intensity(work)[0], working.affine, lab[0], present, what)


# ----- pairs --------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Plan:
    pair_class: str
    extent: str
    fixed: str
    moving: str


_PLANS = (
    *(
        _Plan("ct-ct", e, "ct_abdomen_a", "ct_abdomen_a")
        for e in ("slab-in-full", "slab-at-edge", "partial", "full-full", "full-in-slab")
    ),
    _Plan("ct-mr", "slab-in-full", "mr_abdomen_d", "ct_abdomen_a"),
    _Plan("ct-mr", "slab-at-edge", "mr_abdomen_d", "ct_abdomen_a"),
    _Plan("ct-mr", "full-in-slab", "ct_abdomen_a", "mr_abdomen_d"),
    _Plan("ct-mr", "partial", "ct_abdomen_a", "mr_abdomen_d"),
    *(_Plan("mr-mr", e, "mr_abdomen_d", "mr_abdomen_d") for e in ("slab-in-full", "full-full")),
    _Plan("brain", "slab-in-full", "brain_mni152", "brain_colin27"),
    _Plan("brain", "slab-in-full", "brain_colin27", "brain_mni152"),
    _Plan("brain", "slab-at-edge", "brain_colin27", "brain_mni152"),
    _Plan("brain", "partial", "brain_mni152", "brain_colin27"),
    _Plan("brain", "full-full", "brain_mni152", "brain_colin27"),
    _Plan("brain", "full-full", "brain_colin27", "brain_mni152"),
    _Plan("head-abdomen", "full-full", "brain_mni152", "ct_abdomen_a"),
    _Plan("head-abdomen", "slab-in-full", "brain_colin27", "ct_abdomen_a"),
    _Plan("head-abdomen", "full-full", "mr_abdomen_d", "brain_mni152"),
    _Plan("head-abdomen", "slab-in-full", "ct_abdomen_a", "brain_colin27"),
)


def _slab(
    extent: tuple[float, float], rng: np.random.Generator, where: str, thickness: float
) -> tuple[float, float]:
    """A slab of ``thickness`` mm within ``extent`` (world S), in the middle or at an edge of it."""
    low, high = extent
    thickness = min(thickness, high - low)
    if where == "edge":
        # at the upper or lower edge, up to a third of the slab beyond it (the rest of the body unseen)
        beyond = rng.uniform(0, thickness / 3)
        top = high + beyond if rng.random() < 0.5 else low - beyond + thickness
        return top - thickness, top
    centre = rng.uniform(low + thickness / 2, high - thickness / 2)
    return centre - thickness / 2, centre + thickness / 2


def _levels(
    plan: _Plan, rng: np.random.Generator
) -> tuple[tuple[float, float] | None, tuple[float, float] | None]:
    """The fixed and moving scans' slab levels in their own source's world (None: whole scan)."""
    fixed, moving = _source(plan.fixed), _source(plan.moving)
    base = np.frombuffer(_between_or_identity(plan), dtype=np.float64).reshape(4, 4)
    if plan.extent == "full-full":
        return None, None
    if plan.extent == "full-in-slab":  # the support is a slab, the query whole (levels of the moving source)
        return None, _slab(moving.extent_s, rng, "middle", rng.uniform(40, 80))
    # Levels of the fixed source where the moving source has anatomy (mapped through the base truth).
    inverse = np.linalg.inv(base)
    span = [float((inverse @ np.r_[0.0, 0.0, z, 1.0])[2]) for z in moving.extent_s]
    common = (max(fixed.extent_s[0], min(span)), min(fixed.extent_s[1], max(span)))
    thickness = rng.uniform(20, 80)
    if plan.extent == "slab-in-full":
        return _slab(common, rng, "middle", thickness), None
    if plan.extent == "slab-at-edge":
        # At the upper or lower end of the moving scan's anatomy, up to a third of the slab beyond it: for one
        # source the moving scan is cut short there; for two subjects the fixed scan ends where it ends.
        top, beyond = rng.random() < 0.5, rng.uniform(0, thickness / 3)
        if plan.fixed == plan.moving:
            low, high = fixed.extent_s
            thickness = min(thickness, high - low)
            if top:
                return (high - thickness, high), (low, high - beyond)
            return (low, low + thickness), (low + beyond, high)
        end = min(max(span), fixed.extent_s[1]) if top else max(min(span), fixed.extent_s[0])
        slab = (end - thickness + beyond, end + beyond) if top else (end - beyond, end - beyond + thickness)
        slab = (max(slab[0], fixed.extent_s[0]), min(slab[1], fixed.extent_s[1]))
        if slab[1] - slab[0] < 20.0:
            slab = (slab[1] - 20.0, slab[1]) if top else (slab[0], slab[0] + 20.0)
        return slab, None
    # partial: two slabs overlapping by 30-70 % of the fixed one
    first = _slab(common, rng, "middle", thickness)
    overlap = rng.uniform(0.3, 0.7) * (first[1] - first[0])
    low = first[1] - overlap if rng.random() < 0.5 else first[0] + overlap - thickness
    second = (float((base @ np.r_[0, 0, low, 1])[2]), float((base @ np.r_[0, 0, low + thickness, 1])[2]))
    return first, (min(second), max(second))


def _between_or_identity(plan: _Plan) -> bytes:
    if plan.fixed == plan.moving or plan.pair_class == "head-abdomen":
        return np.eye(4).tobytes()
    return _between(plan.fixed, plan.moving)


def _make(plan: _Plan, split: str, index: int, seed: int) -> FovPair:
    rng = np.random.default_rng(seed)
    fixed_source, moving_source = _source(plan.fixed), _source(plan.moving)
    base = np.frombuffer(_between_or_identity(plan), dtype=np.float64).reshape(4, 4)
    fixed_levels, moving_levels = _levels(plan, rng)
    # Two subjects: scans of one source become two patients; two real subjects stay themselves.
    same = plan.fixed == plan.moving
    fixed_subject = _other_subject(fixed_source, rng) if same else _same_subject()
    moving_subject = _same_subject()
    tilt = {"brain": 20.0}.get(fixed_source.kind, 5.0)
    fixed_pose, moving_pose = _rigid(rng, tilt, 150.0), _rigid(rng, tilt, 150.0)
    made = []
    for source, subject, pose, levels in (
        (fixed_source, fixed_subject, fixed_pose, fixed_levels),
        (moving_source, moving_subject, moving_pose, moving_levels),
    ):
        inplane = (0.5, 1.5) if levels is not None else (1.0, 2.0)
        image, label, affine, what = _acquire(source, subject, pose, levels, rng, inplane)
        made.append(_working(image, label, affine, source.names, f"{source.kind}: {what}"))
    fixed, moving = made
    # truth: fixed world -> fixed subject -> fixed source -> moving source -> moving subject -> moving world
    truth = None
    if plan.pair_class != "head-abdomen":
        truth = (
            moving_pose
            @ np.linalg.inv(moving_subject.matrix)
            @ base
            @ fixed_subject.matrix
            @ np.linalg.inv(fixed_pose)
        )
    scored = _ABDOMEN_SCORED if fixed_source.kind != "brain" else _BRAIN_SCORED
    structures = tuple(
        n
        for n in scored
        if n in fixed.names
        and n in moving.names
        and fixed.mask(n).sum() >= _MIN_VOXELS
        and moving.mask(n).sum() >= _MIN_VOXELS
    )
    # The fixed scan's superior direction in its world: the source's S axis through the fixed pose.
    axis = (fixed_pose @ np.linalg.inv(fixed_subject.matrix))[:3, :3] @ np.array([0.0, 0.0, 1.0])
    name = f"{plan.pair_class}/{plan.extent}/{plan.fixed}-to-{plan.moving}/{split}{index}"
    return FovPair(
        name,
        plan.pair_class,
        plan.extent,
        split,
        fixed,
        moving,
        truth,
        structures,
        axis / np.linalg.norm(axis),
    )


def fov_pairs(
    split: str = "test", repeats: int = 2, classes: tuple[str, ...] = FOV_CLASSES
) -> Iterator[FovPair]:
    """The suite's pairs of one split, made one at a time (each holds a few working-grid scans).

    Args:
        split: ``dev`` (calibration) or ``test`` (the reported figures); their seeds differ.
        repeats: pairs per plan (class, extent and sources); 20 plans.
        classes: the pair classes to make (:data:`FOV_CLASSES`).

    Yields:
        :class:`FovPair` objects, plan by plan.

    Raises:
        ValueError: for an unknown split or class, ``repeats < 1``, or missing real data.
    """
    if split not in ("dev", "test"):
        raise ValueError(f"split must be 'dev' or 'test', got {split!r}.")
    unknown = sorted(set(classes) - set(FOV_CLASSES))
    if unknown:
        raise ValueError(f"unknown pair classes {unknown}; valid: {list(FOV_CLASSES)}.")
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}.")
    # The test seeds are drawn anew whenever the confidence changes after a look at the test pairs: from
    # 1,000,000 (which showed the confidence's reliance on the score), 2,000,000 (which showed the Otsu body
    # failing on MR), 3,000,000 (whose margins were read to check the tie rule), now 4,000,000
    # (docs/benchmarks/placement.md): nothing was chosen on the reported pairs.
    offset = 0 if split == "dev" else 4_000_000
    for p, plan in enumerate(_PLANS):
        if plan.pair_class not in classes:
            continue
        for r in range(repeats):
            yield _make(plan, split, r, offset + 1000 * p + r)
