"""Atlas priors in the app: each adapted structure's labelled scans, registered onto the scan being segmented.

:mod:`medmeta_plugin.adapt.atlas` explains the prior; this module serves it on the app's working grids:

- A structure's adapter stores its examples (image, label file, value) in its metadata; the prior is built
  from those files when first needed, so it survives restarts and needs no copy of any scan in the store.
- One registration per (scan, labelled scan) pair, whatever number of structures was labelled on it; one
  working-grid copy per labelled scan (the app's feature cache holds it) and one label map per label file
  (a small LRU cache here), so 100 structures labelled on one scan hold one scan and one label map, not 100.
- A structure labelled on the very scan being segmented gets its own label as prior (no registration).
- Only labelled scans whose placement is sure are carried (:func:`~medmeta_plugin.adapt.atlas.atlas_prior`
  says why); with none, the structure has no prior on that scan and :class:`StructurePrior` says what each
  placement found. The last :data:`RECENT_PLACEMENTS` outcomes (query scan, labelled scan, confidence, sure,
  seconds) are kept for the app's status.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from medmeta_plugin.adapt.atlas import AtlasCase, CarriedPrior, RegistrationCache, atlas_prior, prior_logits
from medmeta_plugin.app.features import file_key
from medmeta_plugin.app.grid import WorkingVolume, label_to_working
from medmeta_plugin.caching import BoundedCache
from medmeta_plugin.registration import PlacementConfig, register

__all__ = ["RECENT_PLACEMENTS", "AtlasPriors", "StructurePrior", "warm_up"]

# Label maps kept on the working grid: a session labels a handful of scans at a time.
CACHED_LABELS = 8
#: Placement outcomes (one per pair of scans, most recent last) kept for ``/info/``: a few sessions' worth
#: of pairs, small enough for a client that polls ``/info/`` every few seconds.
RECENT_PLACEMENTS = 50


def _array(volume: WorkingVolume) -> np.ndarray:
    """The working-grid image without padding, shape (X, Y, Z) (a view, not a copy, on a CPU)."""
    return volume.crop(volume.image)[0, 0].float().cpu().numpy()


@dataclass(frozen=True)
class StructurePrior:
    """A structure's prior on one scan, as :meth:`AtlasPriors.prior` serves it.

    Attributes:
        prior: prior probabilities on the unpadded working grid, shape (X, Y, Z), float32; None when no
            labelled scan was placed sure (then the structure has no prior on this scan).
        distance: :func:`~medmeta_plugin.adapt.atlas.prior_logits` of ``prior``, the same shape; None with it.
        own: the prior is the scan's own label (then it is the answer, not a prior).
        supports: the structure's labelled scans that could still be read (the scan itself included).
        carried: what registration found for each other labelled scan; None when ``own`` (nothing was
            registered).
    """

    prior: torch.Tensor | None
    distance: torch.Tensor | None
    own: bool
    supports: int
    carried: CarriedPrior | None


class AtlasPriors:
    """Atlas priors of adapted structures on working grids.

    Args:
        working: an image path on the working grid, read once per file version by its owner (the app passes
            :meth:`FeatureCache.scan <medmeta_plugin.app.features.FeatureCache.scan>`, whose volumes the
            query's features share; nothing here caches the scans again).
        divisor: the backbone's size divisor (working label maps are padded like the images).
        transform: what registration fits, one of
            :data:`~medmeta_plugin.registration.REGISTRATION_TRANSFORMS`.
        placement: the global placement's settings, its ``threshold`` included (the defaults when None).
    """

    def __init__(
        self,
        working: Callable[[str], WorkingVolume],
        divisor: Callable[[], int],
        transform: str = "affine",
        placement: PlacementConfig | None = None,
    ) -> None:
        self.working, self.divisor = working, divisor
        self.placement = placement or PlacementConfig()
        self.registrations = RegistrationCache(
            functools.partial(register, transform=transform, placement=self.placement)
        )
        self._labels: BoundedCache[np.ndarray] = BoundedCache(CACHED_LABELS)
        self._recent: BoundedCache[dict[str, Any]] = BoundedCache(RECENT_PLACEMENTS)

    def _label(self, path: str, image: str) -> np.ndarray:
        def load() -> np.ndarray:
            volume = self.working(image)
            x, y, z = volume.shape
            return label_to_working(path, volume, self.divisor())[:x, :y, :z]

        return self._labels.get((file_key(path), file_key(image)), load)

    def prior(
        self,
        query: str,
        volume: WorkingVolume,
        examples: Sequence[dict[str, Any]],
        carry_images: bool = False,
    ) -> StructurePrior:
        """The structure's prior on a scan's working grid, from the labelled scans placed sure on it.

        Args:
            query: the scan's image path; volume: the scan on the working grid.
            examples: the structure's stored examples, ``{"image", "label", "value"}`` each.
            carry_images: carry the labelled scans' images too (:attr:`~medmeta_plugin.adapt.atlas.
                CarriedPrior.images`).

        Returns:
            :class:`StructurePrior`: the prior and its distance log-odds (None when no labelled scan was
            placed sure), whether it is the scan's own label, and what each registration found.

        Raises:
            ValueError: if no example's files can be read any more.
        """
        query_key = file_key(query)
        cases, images = [], {}
        own = []
        for ex in examples:
            try:
                key = file_key(ex["image"])
                support = self.working(ex["image"])
                mask = (self._label(ex["label"], ex["image"]) == int(ex["value"])).astype(np.float32)
            except (OSError, ValueError, KeyError):
                continue  # a deleted or replaced file: the other examples still say where the structure is
            if key == query_key:
                own.append(torch.from_numpy(mask))
            else:
                cases.append(AtlasCase(key, _array(support), support.working.affine, mask))
                images[key] = ex["image"]
        if not cases and not own:
            raise ValueError(f"none of the labelled scans of this structure can be read: {list(examples)}.")
        affine = volume.working.affine
        supports = len(cases) + len(own)
        if own:  # the scan's own label says more than any registered one
            prior = torch.stack(own).mean(0).numpy()
            distance = prior_logits(prior, affine)
            return StructurePrior(torch.from_numpy(prior), torch.from_numpy(distance), True, supports, None)
        carried = atlas_prior(
            query_key, _array(volume), affine, cases, self.registrations, carry_images=carry_images
        )
        self._remember(query_key, query, carried, images)
        if carried.prior is None:
            return StructurePrior(None, None, False, supports, carried)
        distance = prior_logits(carried.prior, affine)
        return StructurePrior(
            torch.from_numpy(carried.prior), torch.from_numpy(distance), False, supports, carried
        )

    def _remember(self, query_key: Any, query: str, carried: CarriedPrior, images: dict[Any, str]) -> None:
        """Keep the placement outcome of each pair of scans, the most recent :data:`RECENT_PLACEMENTS`."""
        for case in carried.cases:
            self._recent.put(
                (query_key, case.key),
                {
                    "query": os.path.basename(os.path.normpath(query)),
                    "support": os.path.basename(os.path.normpath(images[case.key])),
                    **{k: v for k, v in case.to_dict().items() if k not in ("key", "used")},
                },
            )

    def recent(self) -> list[dict[str, Any]]:
        """The last placement outcomes, one per (query scan, labelled scan) pair, oldest first: ``query``,
        ``support`` (file names), ``confidence``, ``sure``, with a placement its ``score``, ``margin`` and
        ``overlap``, then ``transform``, ``seconds``, ``error``."""
        return [dict(v) for v in self._recent.values()]


def warm_up(transform: str = "affine") -> np.ndarray:
    """Load ITK's registration and resampling modules (about 12 s the first time in a process), so the
    first inference after a server start does not pay for it.

    Args:
        transform: the app's registration transform: each loads modules of its own (``bspline``'s
            B-spline transform and metric sampling take seconds more).

    Returns:
        The prior the warm-up carried (shape (24, 24, 24)): the path it loaded, end to end.

    Raises:
        ValueError: if the warm-up's own registration fails.
    """
    rng = np.random.default_rng(0)
    volume = rng.normal(size=(24, 24, 24)).astype(np.float32)
    volume[6:18, 6:18, 6:18] += 3.0
    fit = functools.partial(register, transform=transform, iterations=2)
    carried = atlas_prior(
        "warm-up",
        volume,
        np.eye(4),
        [AtlasCase("warm-up-support", volume, np.eye(4), volume > 1)],
        RegistrationCache(fit),
        require_sure=False,  # the modules load whatever the placement's confidence
    )
    if carried.prior is None:
        raise ValueError(f"the warm-up registration failed: {carried.cases[0].error}")
    prior_logits(carried.prior, np.eye(4))
    return carried.prior
