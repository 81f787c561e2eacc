"""The atlas prior: where the labelled support scans say a structure is, carried onto a new scan.

An adapted head knows what a structure looks like on the scans it was fitted on; on another patient's scan,
and worse on another modality, that appearance shifts (a CT-fitted head sees nothing on an MR). Where the
structure lies in the body shifts much less. The atlas prior registers each support scan onto the query
(:func:`~medmeta_plugin.registration.register`: a global placement, then rigid and affine), carries its mask
over and averages: the probability that a voxel lies in the structure.

Only registrations whose placement is sure are carried (``Registration.sure``). A placement flagged unsure is
a guess - a second, different position was nearly as good - and carrying its masks put them far from the
structure on real pairs of scans of different extents (the field-of-view suite,
:mod:`medmeta_plugin.benchmarks.fov`; figures in ``docs/benchmarks/placement.md``); a mask in the wrong place
served as a finding is worse than no prior, since the caller can fall back to the adapted head and say so.
:func:`atlas_prior` therefore returns a :class:`CarriedPrior`: the prior of the sure cases (None when there is
none) and one :class:`CarriedCase` per support scan saying whether it was used, how sure its placement was,
what it fitted and what it cost.

:func:`fuse` combines it with the head in log-odds:

- The prior speaks in distance, not in blurred probability: its log-odds are the signed distance to the
  carried boundary over ``PRIOR_MM_PER_LOGIT`` (2 mm), capped at +-``PRIOR_CAP``. The head's logits are
  limited to +-``HEAD_LIMIT`` (3): a head fitted on one scan is overconfident on the next, with large logits
  of the wrong sign inside the other patient's structure. So within 6 mm of the carried boundary - what a
  global (rigid or affine) registration leaves between patients, whose organs also move against each other -
  the head's appearance decides; deeper inside or further out, the position does. (A Gaussian-blurred prior
  instead never outvoted the head inside structures thinner than three blur widths: the blur lowers the
  probability at their centre.)
- The head's say depends on its agreement with the prior near the carried structure (the Dice of the two masks
  where the prior's log-odds exceed ``-HEAD_LIMIT``: the only voxels whose answer the head can change, so the
  head need not be run anywhere else, :func:`head_region`): none up to ``MIN_AGREEMENT`` (0.6), all of it only
  at full agreement, linear in between. A head that does not find the structure where the registered scans put
  it (another modality or contrast: a CT-fitted head marks nothing on the MR; on an inverted-contrast phantom
  it marked a look-alike) leaves the carried mask as the answer - even a small say flips the outermost voxel
  layer, half of a small structure; a head that nearly agrees may move the boundary a little.
- Why so little say: once registration was affine, a head that half agreed with the prior made the answer
  worse, never better, on the structures the held-out suites do not evaluate (the ``brain-dev`` and
  ``abdomen-ct-to-mr-dev`` suites; the figures are in ``docs/benchmarks/atlas.md``). The head stays the
  answer where there is no prior (a scan that does not register or is placed unsure everywhere, phantoms).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from medmeta_plugin.caching import BoundedCache
from medmeta_plugin.registration import Placement, Registration, register, signed_distance_mm, warp_to

__all__ = [
    "AtlasCase",
    "CarriedCase",
    "CarriedPrior",
    "REGISTRATIONS_KEPT",
    "RegistrationCache",
    "atlas_prior",
    "fuse",
    "head_region",
    "prior_logits",
]

# The numbers of the module docstring: the head's say (sigmoid(3) = 0.95), the prior's slope (so the head
# decides within 6 mm of the carried boundary, a global registration's error between two patients) and cap,
# and the agreement ramp (measured on development structures, see the module docstring).
HEAD_LIMIT = 3.0
PRIOR_MM_PER_LOGIT = 2.0
PRIOR_CAP = 8.0
MIN_AGREEMENT = 0.6
FULL_AGREEMENT = 1.0


@dataclass(frozen=True)
class AtlasCase:
    """One labelled support scan.

    Attributes:
        key: identifies the scan for :class:`RegistrationCache` (an image id, a file path).
        image: the scan, shape (X, Y, Z); affine: its 4x4 voxel-to-world matrix (RAS, mm).
        mask: the structure's mask on it, shape (X, Y, Z), values in [0, 1].
    """

    key: Hashable
    image: np.ndarray
    affine: np.ndarray
    mask: np.ndarray

    def __post_init__(self) -> None:
        if np.shape(self.image) != np.shape(self.mask) or np.ndim(self.image) != 3:
            raise ValueError(
                f"atlas case {self.key!r}: image and mask must be 3D arrays of one shape, got "
                f"{np.shape(self.image)} and {np.shape(self.mask)}."
            )


@dataclass(frozen=True)
class CarriedCase:
    """What one support scan contributed to an :func:`atlas_prior`.

    Attributes:
        key: the case's :attr:`AtlasCase.key`.
        used: its mask was carried into the prior.
        sure: its registration's placement was sure (:attr:`~medmeta_plugin.registration.Registration.sure`);
            False when the registration failed.
        confidence: the placement's confidence in [0, 1]; None when the registration started from a given
            matrix (no placement) or failed.
        transform: the transform the registration kept (``rigid``, ``affine``, ``bspline``); None when it
            failed.
        seconds: the registration's wall time when it was computed (a cached one costs nothing again).
        error: why the registration failed (the scans could not be placed), else None.
        placement: the registration's placement, with the score and margin its confidence comes from; None
            without one.
    """

    key: Hashable
    used: bool
    sure: bool
    confidence: float | None
    transform: str | None
    seconds: float
    error: str | None = None
    placement: Placement | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """The record as JSON-ready values (rounded), the key as a string; with a placement, also its
        ``score``, ``margin`` and ``overlap`` (:meth:`~medmeta_plugin.registration.Placement.to_dict`)."""
        return {
            "key": str(self.key),
            "used": self.used,
            "sure": self.sure,
            "confidence": None if self.confidence is None else round(self.confidence, 3),
            **({} if self.placement is None else self.placement.to_dict()),
            "transform": self.transform,
            "seconds": round(self.seconds, 3),
            "error": self.error,
        }


@dataclass(frozen=True)
class CarriedPrior:
    """The result of :func:`atlas_prior`.

    Attributes:
        prior: the probability that each query voxel lies in the structure, shape (X, Y, Z), float32 in
            [0, 1], by the carried masks of the used cases; None when no case was used (every placement
            unsure or failed).
        cases: one record per support case, in the order given.
        images: with ``carry_images``, each used case's scan carried onto the query grid like its mask,
            shape (X, Y, Z) each, float32 (0 outside the support scan); else empty.
    """

    prior: np.ndarray | None
    cases: tuple[CarriedCase, ...]
    images: tuple[np.ndarray, ...] = field(default=(), repr=False)

    @property
    def used(self) -> int:
        """How many support cases were carried into the prior."""
        return sum(c.used for c in self.cases)

    @property
    def sure(self) -> int:
        """How many support cases were placed sure."""
        return sum(c.sure for c in self.cases)

    @property
    def confidence(self) -> float | None:
        """The highest placement confidence among the cases (None when no case has a placement)."""
        values = [c.confidence for c in self.cases if c.confidence is not None]
        return max(values) if values else None


#: Registrations a cache keeps: an entry is a 4x4 matrix and a few floats (a B-spline's parameters at most
#: some kB), so a server that has segmented 1,000 scans against 10 labelled ones keeps all 10,000 pairs in
#: a few MB.
REGISTRATIONS_KEPT = 10_000
#: Support scans kept carried onto a query grid (one volume each, a few MB): the pairs of one request and
#: the one before it.
CARRIED_IMAGES_KEPT = 8


class RegistrationCache:
    """Registrations by (query key, support key): one per pair of scans, shared by all their structures.

    A registration that failed (the two scans cannot be placed) is remembered too, so it is not attempted
    again on every request. At most :data:`REGISTRATIONS_KEPT` pairs are kept, the least recently used
    leaving first.

    Args:
        register: computes a registration, called as ``register(query, query_affine, support,
            support_affine)`` (:func:`~medmeta_plugin.registration.register` by default).
    """

    def __init__(self, register: Callable[..., Registration] = register) -> None:
        self.register = register
        self._cache: BoundedCache[Registration] = BoundedCache(REGISTRATIONS_KEPT, remember_failures=True)
        self._images: BoundedCache[np.ndarray] = BoundedCache(CARRIED_IMAGES_KEPT)

    def carried_image(
        self,
        query_key: Hashable,
        shape: tuple[int, ...],
        query_affine: np.ndarray,
        case: AtlasCase,
        registration: Registration,
    ) -> np.ndarray:
        """``case``'s scan carried onto the query grid (shape ``shape``, float32, 0 outside the support scan)
        through the pair's ``registration``: once per pair of scans, whatever number of structures asks."""

        def carry() -> np.ndarray:
            m, b = registration.matrix, registration.bspline
            return warp_to(case.image.astype(np.float32), case.affine, shape, query_affine, m, b)

        return self._images.get((query_key, case.key), carry)

    def get(
        self, query_key: Hashable, query: np.ndarray, query_affine: np.ndarray, case: AtlasCase
    ) -> Registration:
        """The registration of ``case``'s scan onto the query, computed on first use.

        Raises:
            ValueError: if the registration failed (now or when first attempted).
        """
        return self._cache.get(
            (query_key, case.key), lambda: self.register(query, query_affine, case.image, case.affine)
        )

    def peek(self, query_key: Hashable, support_key: Hashable) -> Registration | None:
        """The registration of a pair if it was computed (and is still kept), else None."""
        return self._cache.peek((query_key, support_key))

    def failure(self, query_key: Hashable, support_key: Hashable) -> ValueError | None:
        """Why the registration of a pair failed, if it did."""
        return self._cache.failure((query_key, support_key))


def atlas_prior(
    query_key: Hashable,
    query: np.ndarray,
    query_affine: np.ndarray,
    cases: Sequence[AtlasCase],
    cache: RegistrationCache | None = None,
    *,
    require_sure: bool = True,
    carry_images: bool = False,
) -> CarriedPrior:
    """The probability that each query voxel lies in the structure, by the registered support masks.

    Args:
        query_key: identifies the query scan in ``cache``.
        query: query scan, shape (X, Y, Z); query_affine: its 4x4 voxel-to-world matrix (RAS, mm).
        cases: the labelled support scans (at least one).
        cache: registrations already computed (a fresh one when None).
        require_sure: carry only the cases whose placement is sure (the module docstring says why); False
            carries every case that registered (to measure what the check costs or saves).
        carry_images: carry each used case's scan too (:attr:`CarriedPrior.images`), to compare it with the
            query where the structure is.

    Returns:
        :class:`CarriedPrior`: the prior, shape (X, Y, Z), float32 in [0, 1], or None when no case was
        carried; and a record per case. A case whose registration fails (its scan cannot be placed on the
        query) is recorded, not carried, and does not stop the others.

    Raises:
        ValueError: with no case.
    """
    if not cases:
        raise ValueError("atlas_prior needs at least one labelled support case.")
    cache = cache or RegistrationCache()
    shape = tuple(int(s) for s in np.shape(query))
    carried, images, records = [], [], []
    for case in cases:
        try:
            registration = cache.get(query_key, query, query_affine, case)
        except ValueError as err:
            records.append(CarriedCase(case.key, False, False, None, None, 0.0, str(err)))
            continue
        placement = registration.placement
        use = registration.sure or not require_sure
        records.append(
            CarriedCase(
                case.key,
                use,
                registration.sure,
                None if placement is None else float(placement.confidence),
                registration.transform,
                float(registration.seconds),
                placement=placement,
            )
        )
        if use:
            m, b = registration.matrix, registration.bspline
            carried.append(warp_to(case.mask.astype(np.float32), case.affine, shape, query_affine, m, b))
            if carry_images:
                images.append(cache.carried_image(query_key, shape, query_affine, case, registration))
    if not carried:
        return CarriedPrior(None, tuple(records))
    prior = np.mean(carried, axis=0)
    # A majority vote of masks that do not coincide shrinks thin structures (the insula, a ribbon of cortex,
    # vanished at 5 shots, docs/benchmarks/atlas.md). Rescale so that the 0.5 level holds the carried masks'
    # mean volume instead.
    volume = int(round(np.mean([(c >= 0.5).sum() for c in carried])))
    if len(carried) > 1 and 0 < volume < prior.size:
        level = float(np.partition(prior.ravel(), prior.size - volume)[prior.size - volume])
        if 0 < level < 0.5:
            prior = prior * (0.5 / level)
    return CarriedPrior(np.clip(prior, 0.0, 1.0).astype(np.float32), tuple(records), tuple(images))


def prior_logits(prior: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """The prior's log-odds for :func:`fuse`: signed distance to where ``prior`` crosses 0.5, in units of
    ``PRIOR_MM_PER_LOGIT``, positive inside, capped at +-``PRIOR_CAP``.

    Args:
        prior: prior probabilities, shape (X, Y, Z); affine: the grid's 4x4 voxel-to-world matrix (mm).

    Returns:
        Log-odds, shape (X, Y, Z), float32 (``-PRIOR_CAP`` everywhere when the prior is below 0.5 everywhere).
    """
    half_voxel = float(np.linalg.norm(np.asarray(affine)[:3, :3], axis=0).min()) / 2
    # Only distances up to the cap matter: beyond it the log-odds are +-PRIOR_CAP whatever they are.
    limit = PRIOR_CAP * PRIOR_MM_PER_LOGIT + 2 * half_voxel + 1.0
    distance = signed_distance_mm(np.asarray(prior) >= 0.5, affine, limit_mm=limit)
    # The distance map puts the mask's outermost voxels at 0 and their outside neighbours at one voxel:
    # half a voxel in between is where the boundary lies.
    distance -= half_voxel
    return np.clip(-distance / PRIOR_MM_PER_LOGIT, -PRIOR_CAP, PRIOR_CAP).astype(np.float32)


def head_region(distance_logits: torch.Tensor) -> torch.Tensor:
    """Where the head can change the fused answer: the carried structure and ``HEAD_LIMIT`` log-odds around
    it (elsewhere the prior's log-odds are below ``-HEAD_LIMIT`` and the answer is background).

    Args:
        distance_logits: :func:`prior_logits`, any shape.

    Returns:
        Boolean mask of the same shape.
    """
    return distance_logits > -HEAD_LIMIT


def fuse(logits: torch.Tensor, prior: torch.Tensor, distance_logits: torch.Tensor) -> torch.Tensor:
    """Combine a structure's head logits with its atlas prior on one scan (see the module docstring).

    The result depends on ``logits`` only inside :func:`head_region`, so a caller may pass the voxels of
    that region alone (any shape, as long as the three tensors agree).

    Args:
        logits: head logits, shape (X, Y, Z) or (N,).
        prior: prior probabilities (:attr:`CarriedPrior.prior`), the same shape.
        distance_logits: :func:`prior_logits` of ``prior``, the same shape.

    Returns:
        Fused logits, the same shape.

    Raises:
        ValueError: if the shapes differ.
    """
    if not logits.shape == prior.shape == distance_logits.shape:
        raise ValueError(
            f"logits, prior and distance_logits must have one shape, got {tuple(logits.shape)}, "
            f"{tuple(prior.shape)} and {tuple(distance_logits.shape)}."
        )
    prior, distance_logits = prior.to(logits), distance_logits.to(logits)
    region = head_region(distance_logits)
    head, carried = (logits > 0) & region, prior >= 0.5
    overlap = 2 * (head & carried).sum() / (head.sum() + carried.sum()).clamp(min=1)
    weight = (overlap - MIN_AGREEMENT) / (FULL_AGREEMENT - MIN_AGREEMENT)
    limit = HEAD_LIMIT * float(weight.clamp(0.0, 1.0))
    # Ties at zero go to the prior: with no say left, the head must not move the carried boundary.
    return logits.clamp(-limit, limit) + distance_logits
