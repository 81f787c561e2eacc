"""Atlas priors in the app: each adapted structure's labelled scans, registered onto the scan being segmented.

:mod:`medmeta_plugin.adapt.atlas` explains the prior; this module serves it on the app's working grids:

- A structure's adapter stores its examples (image, label file, value) in its metadata; the prior is built
  from those files when first needed, so it survives restarts and needs no copy of any scan in the store.
- One registration per (scan, labelled scan) pair, whatever number of structures was labelled on it; one
  working-grid copy per labelled scan and one label map per label file, in small LRU caches, so 100
  structures labelled on one scan hold one scan and one label map, not 100.
- A structure labelled on the very scan being segmented gets its own label as prior (no registration).
"""

from __future__ import annotations

import functools
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from medmeta_plugin.adapt.atlas import AtlasCase, RegistrationCache, atlas_prior, prior_logits
from medmeta_plugin.app.features import file_key
from medmeta_plugin.app.grid import WorkingVolume, label_to_working
from medmeta_plugin.registration import register

__all__ = ["AtlasPriors", "warm_up"]

# Labelled scans and label maps kept on the working grid: a session labels a handful of scans at a time.
CACHED_SCANS = 8


class _Lru:
    def __init__(self, size: int) -> None:
        self.size, self.entries, self.lock = size, OrderedDict(), threading.Lock()

    def get(self, key: Any, compute: Callable[[], Any]) -> Any:
        with self.lock:
            if key in self.entries:
                self.entries.move_to_end(key)
                return self.entries[key]
        value = compute()
        with self.lock:
            self.entries[key] = value
            while len(self.entries) > self.size:
                self.entries.popitem(last=False)
        return value


def _array(volume: WorkingVolume) -> np.ndarray:
    """The working-grid image without padding, shape (X, Y, Z) (a view, not a copy, on a CPU)."""
    return volume.crop(volume.image)[0, 0].float().cpu().numpy()


class AtlasPriors:
    """Atlas priors of adapted structures on working grids.

    Args:
        working: reads an image path onto the working grid (:func:`~medmeta_plugin.app.grid.load_working`);
            the result is kept in a small LRU cache here, so a labelled scan is read and resampled once.
        divisor: the backbone's size divisor (working label maps are padded like the images).
        transform: what registration fits, one of
            :data:`~medmeta_plugin.registration.REGISTRATION_TRANSFORMS`.
    """

    def __init__(
        self, working: Callable[[str], WorkingVolume], divisor: Callable[[], int], transform: str = "affine"
    ) -> None:
        self.working, self.divisor = working, divisor
        self.registrations = RegistrationCache(functools.partial(register, transform=transform))
        self._scans = _Lru(CACHED_SCANS)
        self._labels = _Lru(CACHED_SCANS)

    def _scan(self, path: str) -> WorkingVolume:
        return self._scans.get(file_key(path), lambda: self.working(path))

    def _label(self, path: str, image: str) -> np.ndarray:
        def load() -> np.ndarray:
            volume = self._scan(image)
            x, y, z = volume.shape
            return label_to_working(path, volume, self.divisor())[:x, :y, :z]

        return self._labels.get((file_key(path), file_key(image)), load)

    def prior(
        self, query: str, volume: WorkingVolume, examples: Sequence[dict[str, Any]]
    ) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """The structure's prior on a scan's working grid, its distance log-odds, and whether it is the
        scan's own label (then it is the answer, not a prior).

        Args:
            query: the scan's image path; volume: the scan on the working grid.
            examples: the structure's stored examples, ``{"image", "label", "value"}`` each.

        Returns:
            Prior probabilities and :func:`~medmeta_plugin.adapt.atlas.prior_logits`, shape (X, Y, Z) each
            (the unpadded working grid), float32; and True when the prior is the scan's own label.

        Raises:
            ValueError: if no example's files can be read any more.
        """
        query_key = file_key(query)
        cases = []
        own = []
        for ex in examples:
            try:
                key = file_key(ex["image"])
                support = self._scan(ex["image"])
                mask = (self._label(ex["label"], ex["image"]) == int(ex["value"])).astype(np.float32)
            except (OSError, ValueError, KeyError):
                continue  # a deleted or replaced file: the other examples still say where the structure is
            if key == query_key:
                own.append(torch.from_numpy(mask))
            else:
                cases.append(AtlasCase(key, _array(support), support.working.affine, mask))
        if not cases and not own:
            raise ValueError(f"none of the labelled scans of this structure can be read: {list(examples)}.")
        affine = volume.working.affine
        if own:  # the scan's own label says more than any registered one
            prior = torch.stack(own).mean(0).numpy()
        else:
            prior = atlas_prior(query_key, _array(volume), affine, cases, self.registrations)
        return torch.from_numpy(prior), torch.from_numpy(prior_logits(prior, affine)), bool(own)


def warm_up(transform: str = "affine") -> np.ndarray:
    """Load ITK's registration and resampling modules (about 12 s the first time in a process), so the
    first inference after a server start does not pay for it.

    Args:
        transform: the app's registration transform: each loads modules of its own (``bspline``'s
            B-spline transform and metric sampling take seconds more).

    Returns:
        The prior the warm-up carried (shape (24, 24, 24)): the path it loaded, end to end.
    """
    rng = np.random.default_rng(0)
    volume = rng.normal(size=(24, 24, 24)).astype(np.float32)
    volume[6:18, 6:18, 6:18] += 3.0
    fit = functools.partial(register, transform=transform, iterations=2)
    prior = atlas_prior(
        "warm-up",
        volume,
        np.eye(4),
        [AtlasCase("warm-up-support", volume, np.eye(4), volume > 1)],
        RegistrationCache(fit),
    )
    prior_logits(prior, np.eye(4))
    return prior
