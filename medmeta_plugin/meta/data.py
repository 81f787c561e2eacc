"""The meta-training task pool: synthetic meta-training families plus real structures, never held-out ones."""

from __future__ import annotations

import difflib
import fnmatch
import logging
from pathlib import Path

from medmeta_plugin.episodes import (
    META_TRAIN_FAMILIES,
    Case,
    EpisodeConfig,
    EpisodeSampler,
    TaskRegistry,
    synthetic_registry,
)
from medmeta_plugin.episodes.copies import deformed_copies
from medmeta_plugin.episodes.splits import is_held_out
from medmeta_plugin.meta.config import MetaTrainConfig
from medmeta_plugin.transforms import PreprocessConfig

__all__ = ["build_sampler", "meta_training_registry"]

logger = logging.getLogger(__name__)

# A datalist can hold hundreds of cases; an error message lists this many ids and then the count.
_MAX_LISTED = 40


def _without_held_out(registry: TaskRegistry, extra: tuple[str, ...] = ()) -> TaskRegistry:
    held = [name for name in registry.names() if is_held_out(name)]
    if held:
        registry = registry.filter(exclude=held)
    names = registry.names()
    present = [p for p in extra if any(fnmatch.fnmatch(n, p) for n in names)]
    return registry.filter(exclude=present) if present else registry


def _chosen_cases(cases: dict[str, Case], wanted: tuple[str, ...]) -> set[str]:
    """The uids of ``cases`` that ``wanted`` names, by case id or uid (``data.real_cases``).

    Raises:
        ValueError: if a name matches no case; the message suggests close ids and lists the cases.
    """
    ids = sorted({c.case_id for c in cases.values()})
    chosen = set()
    for name in wanted:
        hits = {u for u, c in cases.items() if name in (u, c.case_id)}
        if not hits:
            close = difflib.get_close_matches(name, ids, n=3)
            hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
            listed = ", ".join(ids[:_MAX_LISTED]) + (
                f", ... ({len(ids)} in all)" if len(ids) > _MAX_LISTED else ""
            )
            raise ValueError(
                f"data.real_cases: case {name!r} is in none of the data.real datasets.{hint} "
                f"Cases: {listed or '(none)'}."
            )
        chosen |= hits
    return chosen


def meta_training_registry(config: MetaTrainConfig) -> tuple[TaskRegistry, TaskRegistry]:
    """Build the synthetic and the real meta-training registries.

    Held-out tasks (:mod:`medmeta_plugin.episodes.splits`) are removed unconditionally, before any other
    filter, so no configuration can leak an evaluated structure into meta-training. Then only the cases that
    ``data.real_cases`` lists are kept (all when it is empty).

    Returns:
        ``(synthetic, real)``; either may be empty. Real cases are replaced by ``real_copies`` deformed
        copies each, and only tasks with enough cases for an episode are kept.

    Raises:
        ValueError: if a real dataset path does not exist or cannot be read, or ``data.real_cases`` names a
            case that none of the datasets holds.
    """
    data = config.data
    needed = config.episodes.k_support + config.episodes.q_query
    synthetic = TaskRegistry()
    if data.synthetic_cases:
        synthetic = synthetic_registry(
            META_TRAIN_FAMILIES, data.synthetic_cases, seed=config.seed, shape=data.synthetic_shape
        )
        synthetic = _without_held_out(synthetic, data.exclude).filter(min_cases=needed)
    read = TaskRegistry()
    for entry in data.real:
        path = Path(entry)
        if not path.is_absolute():
            path = Path(config.base_dir) / path
        if not path.exists():
            raise ValueError(f"data.real: {path} does not exist.")
        part = TaskRegistry.from_datalist(path) if path.suffix == ".json" else TaskRegistry.from_folder(path)
        read = read.merge(part)
    cases = {c.uid: c for task in _without_held_out(read) for c in task.cases}
    if data.real_cases:
        # Named among all cases read: one whose structures are all held out (a tumour scan) is no typo.
        chosen = _chosen_cases({c.uid: c for task in read for c in task.cases}, data.real_cases)
        cases = {u: c for u, c in cases.items() if u in chosen}
    real = TaskRegistry()
    if cases:
        copies = deformed_copies([cases[u] for u in sorted(cases)], data.real_copies, seed=config.seed)
        # The copies carry every structure of their scan again: filter the rebuilt registry.
        real = _without_held_out(TaskRegistry.from_cases(copies), data.exclude).filter(min_cases=needed)
    logger.info("meta-training tasks: %d synthetic, %d real", len(synthetic), len(real))
    return synthetic, real


def build_sampler(config: MetaTrainConfig, rank: int = 0) -> tuple[EpisodeSampler, list[str]]:
    """The episode sampler over all meta-training tasks, and the task names (for multitask heads).

    Each process of a distributed run gets its own episode stream (seed + rank).
    """
    synthetic, real = meta_training_registry(config)
    registry = synthetic.merge(real) if len(real) else synthetic
    if len(registry) == 0:
        raise ValueError("no meta-training tasks: set data.synthetic_cases > 0 or list real datasets.")
    weights = None
    if len(real) and len(synthetic):
        frac = config.data.real_fraction
        weights = {t.name: (1 - frac) / len(synthetic) for t in synthetic}
        weights.update({t.name: frac / len(real) for t in real})
    shape = config.episodes
    episode_config = EpisodeConfig(
        k_support=shape.k_support,
        q_query=shape.q_query,
        pos_fraction=shape.pos_fraction,
        preprocess=PreprocessConfig(patch_size=tuple(shape.patch_size)),
        cache_size=64,
    )
    sampler = EpisodeSampler(registry, episode_config, seed=config.seed + 1000 * rank, task_weights=weights)
    return sampler, registry.names()
