"""Adaptation speed: seconds (and peak memory) of ``adapt`` per mode and precision, side by side.

Shared machines are noisy, so the modes (and precisions) run interleaved in one process and the report gives
each one's time as a ratio to ``head`` mode, and to ``fp32`` at the same mode, as well as in seconds.
"""

from __future__ import annotations

import dataclasses
import platform
import resource
import time
from typing import Any

import numpy as np
import torch
from monai.utils import look_up_option

from medmeta_plugin.adapt import AdaptBudget, adapt, head_mode_budget
from medmeta_plugin.episodes import HELDOUT_FAMILIES, make_case
from medmeta_plugin.networks import ADAPTER_MODES, MetaModel, load_backbone
from medmeta_plugin.networks.heads import DEFAULT_SEGMENTATION_HEAD
from medmeta_plugin.networks.precision import PRECISIONS, uses_bf16
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
    precisions: tuple[str, ...] = ("fp32",),
) -> dict[str, Any]:
    """Time ``adapt`` for each mode and precision on ``shots`` phantoms of ``size``^3 voxels.

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
        precisions: backbone precisions to compare
            (:data:`~medmeta_plugin.networks.precision.PRECISIONS`), interleaved with the modes.

    Returns:
        ``{"device", "shots", "size", "rows"}``; each row holds ``mode``, ``precision``, ``bf16`` (whether
        it ran under bfloat16 autocast), ``seconds``, ``ratio_to_head`` (at the same precision),
        ``ratio_to_fp32`` (at the same mode, None without an ``fp32`` row), ``steps`` and ``peak_mem_mb``.

    Raises:
        ValueError: for an unknown precision.
    """
    for precision in precisions:
        look_up_option(precision, PRECISIONS)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = MetaModel(load_backbone(backbone_path).to(dev).eval())
    support = _support(shots, size, seed=0)
    runs = [(m, p) for m in modes for p in precisions]
    times: dict[tuple[str, str], list[float]] = {run: [] for run in runs}
    info: dict[tuple[str, str], dict[str, float]] = {}
    for _ in range(repeats):
        for mode, precision in runs:
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
                torch.cuda.reset_peak_memory_stats(dev)
            start = time.perf_counter()
            mode_budget = budget or (
                head_mode_budget() if mode == "head" else AdaptBudget(steps=10, early_stopping=False)
            )
            mode_budget = dataclasses.replace(mode_budget, precision=precision)
            _, report = adapt(
                model, support, "segmentation", mode, mode_budget, head=DEFAULT_SEGMENTATION_HEAD
            )
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            times[mode, precision].append(time.perf_counter() - start)
            peak = (
                torch.cuda.max_memory_allocated(dev) / 2**20
                if dev.type == "cuda"
                else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            )
            info[mode, precision] = {"steps": report.steps, "peak_mem_mb": peak}
    median = {run: float(np.median(t)) for run, t in times.items()}
    rows = []
    for mode, precision in runs:
        head, fp32 = median.get(("head", precision)), median.get((mode, "fp32"))
        seconds = median[mode, precision]
        rows.append(
            {
                "mode": mode,
                "precision": precision,
                "bf16": uses_bf16(precision, dev),
                "seconds": seconds,
                "ratio_to_head": seconds / head if head else None,
                "ratio_to_fp32": seconds / fp32 if fp32 else None,
                **info[mode, precision],
            }
        )
    name = (
        torch.cuda.get_device_name(dev)
        if dev.type == "cuda"
        else f"cpu: {platform.machine()}, {torch.get_num_threads()} threads"
    )
    return {"device": name, "shots": shots, "size": size, "rows": rows}
