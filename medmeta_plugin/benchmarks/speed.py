"""Adaptation speed: seconds (and peak memory) of ``adapt`` per mode, side by side, on one machine.

Shared machines are noisy, so the modes run interleaved in one process and the report gives each mode's
time as a ratio to ``head`` mode as well as in seconds.
"""

from __future__ import annotations

import platform
import resource
import time
from typing import Any

import numpy as np
import torch

from medmeta_plugin.adapt import AdaptBudget, adapt, head_mode_budget
from medmeta_plugin.episodes import HELDOUT_FAMILIES, make_case
from medmeta_plugin.networks import ADAPTER_MODES, MetaModel, load_backbone
from medmeta_plugin.networks.heads import DEFAULT_SEGMENTATION_HEAD
from medmeta_plugin.transforms import normalize_intensity

__all__ = ["adapt_speed"]


def _support(shots: int, size: int, seed: int) -> list[dict[str, torch.Tensor]]:
    family = HELDOUT_FAMILIES[0]
    items = []
    for i in range(shots):
        case = make_case([family], seed * 100 + i, (size, size, size))
        items.append(
            {
                "image": torch.as_tensor(normalize_intensity(case.image)),
                "label": torch.as_tensor((case.label == 1).astype(np.float32)),
            }
        )
    return items


def adapt_speed(
    backbone_path: str,
    shots: int = 5,
    size: int = 64,
    modes: tuple[str, ...] = ADAPTER_MODES,
    repeats: int = 2,
    budget: AdaptBudget | None = None,
    device: str | None = None,
) -> dict[str, Any]:
    """Time ``adapt`` for each mode on ``shots`` phantoms of ``size``^3 voxels.

    Args:
        backbone_path: backbone ``.safetensors``.
        shots: support cases.
        size: edge of the cubic support volumes.
        modes: adapter modes to time.
        repeats: rounds; modes are interleaved within each round and the median is reported.
        budget: adaptation budget for every mode; by default the few-shot benchmark's policy:
            :func:`~medmeta_plugin.adapt.head_mode_budget` (200 steps, leave-one-out) for ``head`` and 10
            fixed steps for the others. Every mode fits the product's segmentation head
            (:data:`~medmeta_plugin.networks.heads.DEFAULT_SEGMENTATION_HEAD`).
        device: ``cpu`` or ``cuda``; default: CUDA when available.

    Returns:
        ``{"device", "shots", "size", "rows"}``; each row holds ``mode``, ``seconds``, ``ratio_to_head``,
        ``steps`` and ``peak_mem_mb``.
    """
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = MetaModel(load_backbone(backbone_path).to(dev).eval())
    support = _support(shots, size, seed=0)
    times: dict[str, list[float]] = {m: [] for m in modes}
    info: dict[str, dict[str, float]] = {}
    for _ in range(repeats):
        for mode in modes:
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
                torch.cuda.reset_peak_memory_stats(dev)
            start = time.perf_counter()
            mode_budget = budget or (
                head_mode_budget() if mode == "head" else AdaptBudget(steps=10, early_stopping=False)
            )
            _, report = adapt(
                model, support, "segmentation", mode, mode_budget, head=DEFAULT_SEGMENTATION_HEAD
            )
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            times[mode].append(time.perf_counter() - start)
            peak = (
                torch.cuda.max_memory_allocated(dev) / 2**20
                if dev.type == "cuda"
                else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            )
            info[mode] = {"steps": report.steps, "peak_mem_mb": peak}
    head = float(np.median(times["head"])) if "head" in times else None
    rows = []
    for mode in modes:
        seconds = float(np.median(times[mode]))
        rows.append(
            {
                "mode": mode,
                "seconds": seconds,
                "ratio_to_head": seconds / head if head else None,
                **info[mode],
            }
        )
    name = (
        torch.cuda.get_device_name(dev)
        if dev.type == "cuda"
        else f"cpu: {platform.machine()}, {torch.get_num_threads()} threads"
    )
    return {"device": name, "shots": shots, "size": size, "rows": rows}
