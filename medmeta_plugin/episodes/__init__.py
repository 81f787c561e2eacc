"""Tasks, synthetic phantoms and the few-shot episode sampler.

- :mod:`.cases` / :mod:`.sources` / :mod:`.tasks`: labelled datasets (case folders or MONAI datalists) turned
  into a :class:`TaskRegistry` of segmentation tasks (one per structure name) and volume-level
  classification/regression tasks (declared in ``tasks.json``);
- :mod:`.primitives` / :mod:`.families` / :mod:`.synthetic`: seeded 3D phantoms of 42 structure families,
  32 for meta-training and 10 held out;
- :mod:`.augment` / :mod:`.sampler`: episodes of k support and q query cases as augmented patches.
"""

from medmeta_plugin.episodes.augment import AugmentConfig
from medmeta_plugin.episodes.cases import Case, TargetSpec, TaskKind, load_case
from medmeta_plugin.episodes.export import write_synthetic_dataset
from medmeta_plugin.episodes.families import FAMILIES, HELDOUT_FAMILIES, META_TRAIN_FAMILIES, FamilySpec
from medmeta_plugin.episodes.sampler import Episode, EpisodeConfig, EpisodeSampler, stack_items
from medmeta_plugin.episodes.synthetic import (
    SYNTHETIC_TARGETS,
    PhantomConfig,
    SyntheticCase,
    make_case,
    synthetic_registry,
)
from medmeta_plugin.episodes.tasks import TaskRegistry, TaskSpec

__all__ = [
    "FAMILIES",
    "HELDOUT_FAMILIES",
    "META_TRAIN_FAMILIES",
    "SYNTHETIC_TARGETS",
    "AugmentConfig",
    "Case",
    "Episode",
    "EpisodeConfig",
    "EpisodeSampler",
    "FamilySpec",
    "PhantomConfig",
    "SyntheticCase",
    "TargetSpec",
    "TaskKind",
    "TaskRegistry",
    "TaskSpec",
    "load_case",
    "make_case",
    "stack_items",
    "synthetic_registry",
    "write_synthetic_dataset",
]
