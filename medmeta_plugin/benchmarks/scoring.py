"""Scores of binary masks shared by the benchmarks that compare carried or served masks with the truth."""

from __future__ import annotations

import numpy as np

__all__ = ["mask_dice"]


def mask_dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two boolean masks of one shape (1.0 when both are empty: nothing to find, nothing found)."""
    total = a.sum() + b.sum()
    return float(2 * (a & b).sum() / total) if total else 1.0
