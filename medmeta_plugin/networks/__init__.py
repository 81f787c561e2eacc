"""Networks: the shared backbone B, task adapters A, heads and the composed model F = A(B(x))."""

from medmeta_plugin.networks.adapters import (
    ADAPTER_MODES,
    Adapter,
    FilmAdapter,
    FullAdapter,
    HeadOnlyAdapter,
    LoraAdapter,
    build_adapter,
)
from medmeta_plugin.networks.backbone import Backbone3D, BackboneConfig, BackboneOutput
from medmeta_plugin.networks.heads import (
    TASK_KINDS,
    ClassificationHead,
    RegressionHead,
    SegmentationHead,
    build_head,
)
from medmeta_plugin.networks.model import MetaModel, TaskAdapter, TaskInfo
from medmeta_plugin.networks.refiner import Refiner, refine_prior
from medmeta_plugin.networks.serialization import (
    backbone_hash,
    load_adapter,
    load_backbone,
    load_refiner,
    save_adapter,
    save_backbone,
    save_refiner,
)

__all__ = [
    "ADAPTER_MODES",
    "TASK_KINDS",
    "Adapter",
    "Backbone3D",
    "BackboneConfig",
    "BackboneOutput",
    "ClassificationHead",
    "FilmAdapter",
    "FullAdapter",
    "HeadOnlyAdapter",
    "LoraAdapter",
    "MetaModel",
    "Refiner",
    "RegressionHead",
    "SegmentationHead",
    "TaskAdapter",
    "TaskInfo",
    "backbone_hash",
    "build_adapter",
    "build_head",
    "load_adapter",
    "load_backbone",
    "load_refiner",
    "refine_prior",
    "save_adapter",
    "save_backbone",
    "save_refiner",
]
