"""Few-shot adaptation of one task's adapter and head from a handful of labelled cases."""

from medmeta_plugin.adapt.adaptation import (
    HEAD_MODE_STEPS,
    VOXEL_SAMPLES,
    AdaptBudget,
    AdaptReport,
    adapt,
    head_mode_budget,
    stack_support,
)
from medmeta_plugin.adapt.head_init import (
    classification_head_init,
    init_head,
    regression_head_init,
    segmentation_head_init,
)

__all__ = [
    "HEAD_MODE_STEPS",
    "VOXEL_SAMPLES",
    "AdaptBudget",
    "AdaptReport",
    "adapt",
    "classification_head_init",
    "head_mode_budget",
    "init_head",
    "regression_head_init",
    "segmentation_head_init",
    "stack_support",
]
