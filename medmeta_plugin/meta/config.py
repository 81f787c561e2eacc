"""The meta-training configuration: one YAML file, parsed once into frozen dataclasses.

Example (``sample_apps/backbone/meta_train.yaml`` is the shipped backbone's)::

    seed: 0
    algorithm: anil            # multitask | anil | fomaml | reptile
    steps: 600                 # outer steps
    meta_batch: 4              # episodes per outer step
    outer_lr: 0.001
    inner: {mode: head}        # the app's adaptation: steps (default 200), lr, mode, head
    backbone: {features: [16, 32, 64, 128], norm: instance}
    episodes: {k_support: 2, q_query: 2, patch_size: [32, 32, 32], pos_fraction: 0.67}
    data:
      synthetic_cases: 200     # phantoms of the meta-training families
      synthetic_shape: [48, 48, 48]
      real: [../shared/data/real]  # case folders; benchmark-held-out structures are always removed
      real_cases: [brain_mni152, ct_abdomen_a]  # only these cases of those datasets; [] (default): all
      real_copies: 4           # deformed copies per real case
      real_fraction: 0.3       # share of episodes drawn from real tasks
    checkpoint_every: 100
    log_every: 10
    amp: true                  # bf16 autocast on a GPU
    cpu_amp: false             # also on a CPU that computes bf16 natively (AVX512-BF16 / AMX)
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml
from monai.utils import look_up_option

from medmeta_plugin.meta.algorithms import ALGORITHMS, InnerConfig
from medmeta_plugin.names import validate_name
from medmeta_plugin.networks.backbone import BackboneConfig

__all__ = ["DataConfig", "EpisodeShape", "MetaTrainConfig", "load_config"]


@dataclass(frozen=True)
class EpisodeShape:
    """Episode size: support and query cases, patch size and foreground-centred crop probability."""

    k_support: int = 2
    q_query: int = 2
    patch_size: tuple[int, int, int] = (32, 32, 32)
    pos_fraction: float = 0.67


@dataclass(frozen=True)
class DataConfig:
    """Where meta-training tasks come from.

    Attributes:
        synthetic_cases: phantoms drawn from the meta-training families (0 for none).
        synthetic_shape: their spatial shape.
        real: case-folder datasets or datalist JSON files; relative paths are relative to the config file.
        real_cases: the cases of those datasets to use, by case id (a case folder's name, a datalist entry's
            ``id``) or as ``"<dataset>:<case id>"`` where two datasets share an id; empty uses every case.
            A config that must keep giving the same task pool lists its cases, so a case added to a dataset
            folder later does not join it. An id that no dataset holds is an error when the pool is built.
        real_copies: deformed copies of each real case, so structures seen in one scan can form episodes.
        real_fraction: probability that an episode's task is a real one (when both kinds exist).
        exclude: further task names or glob patterns to leave out (held-out ones are always left out).
    """

    synthetic_cases: int = 200
    synthetic_shape: tuple[int, int, int] = (48, 48, 48)
    real: tuple[str, ...] = ()
    real_cases: tuple[str, ...] = ()
    real_copies: int = 4
    real_fraction: float = 0.3
    exclude: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        cases = self.real_cases
        if isinstance(cases, str) or not isinstance(cases, tuple | list):
            raise ValueError(f"data.real_cases must be a list of case ids, got {cases!r}.")
        for case in cases:
            dataset, case_id = case.split(":", 1) if isinstance(case, str) and ":" in case else (None, case)
            if dataset is not None:
                validate_name(dataset, "dataset name in data.real_cases")
            validate_name(case_id, "case id in data.real_cases")
        repeated = sorted({c for c in cases if cases.count(c) > 1})
        if repeated:
            raise ValueError(f"data.real_cases lists {repeated} more than once.")
        if cases and not self.real:
            raise ValueError(
                f"data.real_cases lists {list(cases)}, but data.real names no dataset to take them from."
            )


@dataclass(frozen=True)
class MetaTrainConfig:
    """Everything a meta-training run needs; see the module docstring for the YAML form.

    ``amp`` runs episodes under bfloat16 autocast on a GPU that supports it; with ``cpu_amp`` as well on a
    CPU with native bfloat16 (:func:`~medmeta_plugin.networks.precision.native_bf16`).
    ``cpu_amp`` is off by default: the shipped backbone was trained in float32 on such a CPU, and its
    config must keep giving the same weights.
    """

    seed: int = 0
    algorithm: str = "anil"
    steps: int = 600
    meta_batch: int = 4
    outer_lr: float = 1e-3
    grad_clip: float = 1.0
    inner: InnerConfig = field(default_factory=InnerConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    episodes: EpisodeShape = field(default_factory=EpisodeShape)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint_every: int = 100
    log_every: int = 10
    amp: bool = True
    cpu_amp: bool = False
    init_backbone: str = ""
    base_dir: str = "."

    def __post_init__(self) -> None:
        look_up_option(self.algorithm, ALGORITHMS)
        for name in ("steps", "meta_batch", "checkpoint_every", "log_every"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}.")
        if self.outer_lr <= 0:
            raise ValueError(f"outer_lr must be > 0, got {self.outer_lr!r}.")
        if not 0.0 <= self.data.real_fraction <= 1.0:
            raise ValueError(f"data.real_fraction must be in [0, 1], got {self.data.real_fraction!r}.")

    def to_dict(self) -> dict[str, Any]:
        """JSON/YAML-serialisable form (stored with checkpoints and the trained backbone)."""

        def plain(obj: Any) -> Any:
            if hasattr(obj, "__dataclass_fields__"):
                return {f.name: plain(getattr(obj, f.name)) for f in fields(obj)}
            if isinstance(obj, tuple | list):
                return [plain(v) for v in obj]
            return obj

        return plain(self)


def _build(cls: type, raw: Any, where: str) -> Any:
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: expected a mapping, got {type(raw).__name__}.")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown}; valid keys: {sorted(known)}.")
    nested = {"inner": InnerConfig, "backbone": BackboneConfig, "episodes": EpisodeShape, "data": DataConfig}
    values = {}
    for key, value in raw.items():
        if cls is MetaTrainConfig and key in nested:
            values[key] = _build(nested[key], value, f"{where}.{key}")
        elif isinstance(value, list):
            values[key] = tuple(value)
        else:
            values[key] = value
    try:
        return cls(**values)
    except TypeError as err:
        raise ValueError(f"{where}: {err}.") from err


def load_config(path: str | Path) -> MetaTrainConfig:
    """Parse a meta-training YAML file.

    Raises:
        ValueError: if the file is missing or not YAML, or a key or value is invalid (the message names it).
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: config file not found.")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: not valid YAML ({err}).") from err
    if isinstance(raw, dict):
        raw.setdefault("base_dir", str(path.resolve().parent))
    return _build(MetaTrainConfig, raw, str(path))
