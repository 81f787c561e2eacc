"""Few-shot episodes: k support and q query cases of one task, as augmented patches.

Segmentation items are patches of ``patch_size`` cropped on each case's own voxel grid (nothing is
resampled: the backbone is convolutional and the phantoms and real scans already span 0.7-3 mm spacings),
centred on a voxel of the structure with probability ``pos_fraction`` and on a voxel outside it otherwise.
Classification and regression items are the whole volume, resized to ``patch_size``. Images are normalised by
the shared :func:`medmeta_plugin.transforms.normalize_intensity` before any augmentation.

Reproducibility: the sampler draws each episode's seed from its own generator, and every random choice of the
episode (task, cases, crops, flips, augmentation) follows from that seed, so two samplers with the same seed
and registry produce identical episodes whatever their cache holds.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, Resized

from medmeta_plugin.caching import BoundedCache
from medmeta_plugin.episodes.augment import AugmentConfig, intensity_augmentation, spatial_augmentation
from medmeta_plugin.episodes.cases import Case, check_option, load_case
from medmeta_plugin.episodes.tasks import TaskRegistry, TaskSpec
from medmeta_plugin.transforms import PreprocessConfig, normalize_intensity

__all__ = ["Episode", "EpisodeConfig", "EpisodeSampler", "stack_items"]

# A negative crop centre is drawn uniformly and redrawn while it falls in the structure; even a structure
# filling 90% of the volume leaves a miss probability of 0.9**64 ~ 1e-3 before the fallback below.
_NEGATIVE_TRIES = 64


@dataclass(frozen=True)
class EpisodeConfig:
    """Shape and sampling of episodes.

    Attributes:
        k_support: labelled cases the learner adapts on (the few shots: 1-5 in deployment).
        q_query: cases the adapted learner is evaluated on.
        pos_fraction: probability that a segmentation patch is centred on the structure (nnU-Net
            oversamples foreground in 1/3 of patches; few-shot support needs the structure more often).
        augment: apply :class:`AugmentConfig` augmentations (off for evaluation episodes).
        task_sampling: ``"uniform"`` over tasks, or ``"by_kind"``: a kind uniformly, then a task of it, so
            the few volume-level tasks are not drowned by hundreds of structures.
        cache_size: loaded volumes kept in memory (episodes reuse cases).
        preprocess: the shared preprocessing, including ``patch_size``.
        augmentation: augmentation probabilities and ranges.
    """

    k_support: int = 3
    q_query: int = 2
    pos_fraction: float = 0.67
    augment: bool = True
    task_sampling: Literal["uniform", "by_kind"] = "uniform"
    cache_size: int = 32
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    augmentation: AugmentConfig = field(default_factory=AugmentConfig)

    def __post_init__(self) -> None:
        for name in ("k_support", "q_query", "cache_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")
        if not 0.0 <= self.pos_fraction <= 1.0:
            raise ValueError(f"pos_fraction must be in [0, 1], got {self.pos_fraction!r}.")
        check_option(self.task_sampling, ("uniform", "by_kind"), "task_sampling")


@dataclass(frozen=True)
class Episode:
    """One few-shot problem.

    Attributes:
        task: the task.
        support: k items; each a dict with ``"image"`` (C, *patch) float32, ``"case_id"`` (the case uid),
            ``"crop"`` (``"positive"``, ``"negative"`` or ``"whole"``) and either ``"label"`` (1, *patch)
            float32 in {0, 1} (segmentation) or ``"target"``, shape () (int64 class index or float32 value).
        query: q items of the same form, from cases disjoint from the support's.
    """

    task: TaskSpec
    support: list[dict[str, Any]]
    query: list[dict[str, Any]]


def stack_items(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Batch episode items: ``"image"`` (N, C, *patch), ``"label"`` (N, 1, *patch) or ``"target"`` (N,).

    Args:
        items: items of one episode part (all of one task, so of one kind and image shape).

    Returns:
        The stacked tensors and the lists of ``"case_id"`` and ``"crop"``.
    """
    out: dict[str, Any] = {
        k: torch.stack([it[k] for it in items]) for k in ("image", "label", "target") if k in items[0]
    }
    out.update({k: [it[k] for it in items] for k in ("case_id", "crop")})
    return out


def _plain(x: Any) -> torch.Tensor:
    return x.as_tensor() if isinstance(x, MetaTensor) else torch.as_tensor(x)


def _crop(array: np.ndarray, centre: np.ndarray, size: tuple[int, ...], pad: np.ndarray) -> np.ndarray:
    """Patch of ``size`` around ``centre`` of (C, X, Y, Z) ``array``, moved inside the volume like MONAI's
    RandCropByPosNegLabel does, and padded with per-channel ``pad`` values where the volume is smaller."""
    spatial = np.array(array.shape[1:])
    start = np.clip(centre - np.array(size) // 2, 0, np.maximum(spatial - size, 0))
    patch = array[(slice(None), *(slice(s, s + n) for s, n in zip(start, size)))]
    missing = [(0, n - m) for n, m in zip(size, patch.shape[1:])]
    if any(after for _, after in missing):
        patch = np.stack([np.pad(c, missing, constant_values=v) for c, v in zip(patch, pad)])
    return np.ascontiguousarray(patch)


class EpisodeSampler:
    """Draws reproducible episodes of mixed task kinds from a registry.

    Args:
        registry: the tasks; every task that can be drawn needs at least ``k_support + q_query`` cases (use
            ``registry.filter(min_cases=...)``).
        config: episode shape and sampling; defaults to :class:`EpisodeConfig()`.
        seed: seed of the episode stream.
        task_weights: relative probability of drawing each named task (others: 0) when ``sample`` is called
            without a task; overrides ``config.task_sampling``.

    Raises:
        ValueError: if the registry is empty, a drawable task has too few cases, or a weight is invalid.
    """

    def __init__(
        self,
        registry: TaskRegistry,
        config: EpisodeConfig | None = None,
        seed: int = 0,
        task_weights: Mapping[str, float] | None = None,
    ) -> None:
        self.registry, self.config = registry, config or EpisodeConfig()
        self._rng = np.random.default_rng(seed)
        self._tasks, self._weights = self._task_distribution(task_weights)
        needed = self.config.k_support + self.config.q_query
        small = [f"{t.name!r} ({len(t.cases)})" for t in self._tasks if len(t.cases) < needed]
        if small:
            raise ValueError(
                f"k_support + q_query = {needed} distinct cases are needed, but these tasks have fewer (case "
                f"count): {', '.join(small[:10])}{' ...' if len(small) > 10 else ''}. Use "
                f"registry.filter(min_cases={needed}) or give them zero task_weights."
            )
        # One LRU per kind of entry, so foreground indices never evict the volumes they index.
        self._caches: dict[str, BoundedCache[Any]] = {
            kind: BoundedCache(self.config.cache_size) for kind in ("volume", "resized", "foreground")
        }
        self._spatial = spatial_augmentation(self.config.augmentation)
        self._intensity = intensity_augmentation(self.config.augmentation)
        self._resize = Resized("image", spatial_size=self.config.preprocess.patch_size, mode="area")

    def _task_distribution(self, weights: Mapping[str, float] | None) -> tuple[list[TaskSpec], np.ndarray]:
        if len(self.registry) == 0:
            raise ValueError("the registry holds no tasks.")
        if weights is None:
            tasks = list(self.registry)
            if self.config.task_sampling == "uniform":
                return tasks, np.full(len(tasks), 1.0 / len(tasks))
            per_kind = {k: sum(t.kind == k for t in tasks) for k in {t.kind for t in tasks}}
            p = np.array([1.0 / (len(per_kind) * per_kind[t.kind]) for t in tasks])
            return tasks, p / p.sum()
        for name, w in weights.items():
            self.registry.get(name)
            if isinstance(w, bool) or not isinstance(w, int | float) or not np.isfinite(w) or w < 0:
                raise ValueError(f"task_weights[{name!r}] must be a finite number >= 0, got {w!r}.")
        tasks = [self.registry.get(n) for n, w in weights.items() if w > 0]
        if not tasks:
            raise ValueError(f"task_weights gives no task a positive weight: {dict(weights)}.")
        p = np.array([float(weights[t.name]) for t in tasks])
        return tasks, p / p.sum()

    def _cached(self, kind: str, key: str, make: Callable[[], Any]) -> Any:
        return self._caches[kind].get(key, make)

    def _volume(self, case: Case) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
        """Normalised image (C, X, Y, Z), label (1, X, Y, Z) or None, and per-channel padding values (C,)."""

        def load() -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
            image, label = load_case(case)
            image = normalize_intensity(image, self.config.preprocess)
            return image, label, image.reshape(image.shape[0], -1).min(axis=1)

        return self._cached("volume", case.uid, load)

    def _segmentation_item(self, task: TaskSpec, case: Case, rng: np.random.Generator) -> dict[str, Any]:
        image, label, pad = self._volume(case)
        if label is None:
            raise ValueError(f"task {task.name!r}: case {case.uid!r} has no label map.")
        value = task.label_values[case.uid]
        size = self.config.preprocess.patch_size
        positive = rng.random() < self.config.pos_fraction
        inside = self._cached(
            "foreground", f"{case.uid}={value}", lambda: np.flatnonzero(label.ravel() == value)
        )
        if positive and inside.size:
            flat = int(inside[rng.integers(inside.size)])
        else:
            positive = False
            flat = int(rng.integers(label.size))
            for _ in range(_NEGATIVE_TRIES):
                if label.flat[flat] != value:
                    break
                flat = int(rng.integers(label.size))
        centre = np.array(np.unravel_index(flat, label.shape[1:]))
        patch = _crop(image, centre, size, pad)
        mask = (_crop(label, centre, size, np.zeros(1)) == value).astype(np.float32)
        return {"image": patch, "label": mask, "crop": "positive" if positive else "negative"}

    def _volume_item(self, task: TaskSpec, case: Case) -> dict[str, Any]:
        def resize() -> np.ndarray:
            return _plain(self._resize({"image": torch.from_numpy(self._volume(case)[0])})["image"]).numpy()

        target = task.target(case)
        dtype = torch.int64 if task.kind == "classification" else torch.float32
        image = self._cached("resized", case.uid, resize)
        return {"image": image, "target": torch.tensor(target, dtype=dtype), "crop": "whole"}

    def _item(
        self, task: TaskSpec, case: Case, rng: np.random.Generator, flip_axes: tuple[int, ...]
    ) -> dict[str, Any]:
        segmentation = task.kind == "segmentation"
        item = self._segmentation_item(task, case, rng) if segmentation else self._volume_item(task, case)
        keys = ("image", "label") if segmentation else ("image",)
        data = {k: torch.from_numpy(np.flip(item[k], [a + 1 for a in flip_axes]).copy()) for k in keys}
        seed = int(rng.integers(0, 2**32 - 1))
        if self.config.augment:
            transform: Compose = self._spatial if segmentation else self._intensity
            data = transform.set_random_state(seed=seed)(data)
        item.update({k: _plain(data[k]).to(torch.float32).contiguous() for k in keys})
        item["case_id"] = case.uid
        return item

    def sample(self, task_name: str | None = None) -> Episode:
        """Draw one episode.

        Args:
            task_name: the task; ``None`` draws one (by ``task_weights`` or ``config.task_sampling``).

        Returns:
            The episode; its support and query cases are distinct.

        Raises:
            ValueError: if the task is unknown or has fewer than ``k_support + q_query`` cases.
        """
        rng = np.random.default_rng(self._rng.integers(0, 2**63 - 1))
        if task_name is None:
            task = self._tasks[int(rng.choice(len(self._tasks), p=self._weights))]
        else:
            task = self.registry.get(task_name)
        k, q = self.config.k_support, self.config.q_query
        if len(task.cases) < k + q:
            raise ValueError(
                f"task {task.name!r} has {len(task.cases)} cases, fewer than k_support + q_query = {k + q}."
            )
        chosen = [task.cases[i] for i in rng.choice(len(task.cases), size=k + q, replace=False)]
        flips = tuple(a for a in range(3) if rng.random() < self.config.augmentation.p_flip)
        flips = flips if self.config.augment and task.kind == "segmentation" else ()
        items = [self._item(task, case, rng, flips) for case in chosen]
        return Episode(task=task, support=items[:k], query=items[k:])

    def iter_episodes(self, n: int) -> Iterator[Episode]:
        """Yield ``n`` episodes of randomly drawn tasks.

        Raises:
            ValueError: if ``n`` is negative.
        """
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"n must be a non-negative integer, got {n!r}.")
        return (self.sample() for _ in range(n))  # checked now, not at the first next()
