"""Few-shot adaptation of one task's adapter and head from a handful of labelled cases.

One procedure (:func:`adapt_batch`, with :func:`adapt` its entry point for labelled cases) serves the app's
worker, every benchmark, and meta-training's inner loop.
"""

from medmeta_plugin.adapt.adaptation import (
    HEAD_MODE_STEPS,
    VOXEL_SAMPLES,
    AdaptBudget,
    AdaptReport,
    adapt,
    adapt_batch,
    first_order_head,
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
    "adapt_batch",
    "classification_head_init",
    "first_order_head",
    "head_mode_budget",
    "init_head",
    "regression_head_init",
    "segmentation_head_init",
    "stack_support",
]
