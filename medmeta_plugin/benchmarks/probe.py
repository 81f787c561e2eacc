"""How much a backbone's voxel features can say about held-out structures: a separability ceiling.

For each segmentation task of a suite, a per-voxel MLP head is fitted on the features of the task's *query*
cases and scored, by Dice, on those same cases. No few-shot head can do better on them than a head fitted to
the answer, so the figure is a ceiling set by the features alone: where it is low, more shots, steps or a
better head cannot help, only better features can (``docs/benchmarks/feature-levels.md``).

The backbone's weights do not depend on how many decoder levels its features hold
(:attr:`~medmeta_plugin.networks.BackboneConfig.feature_levels`), so one trained backbone is probed at every
level count: 1 is what a one-level backbone's heads see.
"""

from __future__ import annotations

import dataclasses
import platform
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from medmeta_plugin.benchmarks.suites import build_suite
from medmeta_plugin.networks import Backbone3D, load_backbone

__all__ = ["run_probe", "summarise_probe"]


def _with_levels(backbone: Backbone3D, levels: int) -> Backbone3D:
    """The same weights, with ``levels`` decoder levels in the voxel features."""
    probe = Backbone3D(dataclasses.replace(backbone.config, feature_levels=levels))
    probe.load_state_dict(backbone.state_dict())
    return probe.eval()


def _features(backbone: Backbone3D, image: torch.Tensor) -> torch.Tensor:
    """Voxel features (X*Y*Z, C) of one image (1, X, Y, Z), padded to the size divisor and cropped back."""
    size = image.shape[1:]
    pad = [p for s in reversed(size) for p in (0, -s % backbone.size_divisor)]
    with torch.no_grad():
        features = backbone(F.pad(image, pad)[None]).features[0]
    return features[:, : size[0], : size[1], : size[2]].flatten(1).T


def _fit_ceiling(x: torch.Tensor, y: torch.Tensor, steps: int, seed: int) -> float:
    """Fit an MLP head on ``x`` (N, C) -> ``y`` (N,) and return its best Dice on the same voxels."""
    torch.manual_seed(seed)
    mean, std = x.mean(0), x.std(0) + 1e-5
    x = (x - mean) / std
    head = nn.Sequential(nn.Linear(x.shape[1], 64), nn.ReLU(), nn.Linear(64, 1))
    optimiser = torch.optim.Adam(head.parameters(), lr=1e-2)
    foreground, background = torch.nonzero(y > 0)[:, 0], torch.nonzero(y == 0)[:, 0]
    if not len(foreground) or not len(background):
        raise ValueError("the probe needs query labels with both foreground and background voxels.")
    for _ in range(steps):
        # Balanced batches: the foreground is 1-5 % of a volume.
        idx = torch.cat(
            [
                foreground[torch.randint(len(foreground), (4096,))],
                background[torch.randint(len(background), (4096,))],
            ]
        )
        loss = F.binary_cross_entropy_with_logits(head(x[idx])[:, 0], y[idx])
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    with torch.no_grad():
        logits = head(x)[:, 0]
    # The best threshold on these same voxels (balanced batches skew the prior; a ceiling may pick it).
    truth = y > 0
    best = 0.0
    for threshold in torch.linspace(-6.0, 6.0, 49):
        pred = logits > threshold
        total = float(pred.sum() + truth.sum())
        best = max(best, 2 * float((pred & truth).sum()) / total if total else 1.0)
    return best


def run_probe(
    suite: str,
    backbone_path: str,
    levels: Sequence[int] = (1, 2, 3),
    steps: int = 300,
    seed: int = 0,
    tasks: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Fit and score the ceiling head of every segmentation task of ``suite`` at each level count.

    Returns:
        ``{"suite", "backbone", "device", "records": [{"task", "levels", "channels", "dice"}], "seconds"}``.

    Raises:
        ValueError: for an unknown suite or task, a suite without segmentation tasks, or a level count the
            backbone does not have.
    """
    base = load_backbone(backbone_path)
    probes = {level: _with_levels(base, level) for level in levels}  # BackboneConfig checks each count
    chosen = [t for t in build_suite(suite, seed) if t.kind == "segmentation"]
    if tasks is not None:
        unknown = set(tasks) - {t.name for t in chosen}
        if unknown:
            raise ValueError(
                f"unknown tasks {sorted(unknown)}; {suite} has {sorted(t.name for t in chosen)}."
            )
        chosen = [t for t in chosen if t.name in set(tasks)]
    if not chosen:
        raise ValueError(f"suite {suite!r} has no segmentation task to probe.")
    start = time.perf_counter()
    records = []
    for task in tqdm(chosen, desc=f"probe {suite}"):
        y = torch.cat([q["label"].flatten() for q in task.query])
        for level, backbone in probes.items():
            x = torch.cat([_features(backbone, q["image"]) for q in task.query])
            dice = _fit_ceiling(x, y, steps, seed)
            records.append(
                {"task": task.name, "levels": level, "channels": backbone.feature_channels, "dice": dice}
            )
    return {
        "suite": suite,
        "backbone": str(backbone_path),
        "device": f"cpu: {platform.machine()}, {torch.get_num_threads()} torch threads",
        "records": records,
        "seconds": round(time.perf_counter() - start, 1),
    }


def summarise_probe(results: dict[str, Any]) -> str:
    """A Markdown table: Dice ceiling per task (rows) and level count (columns), with the mean."""
    levels = sorted({r["levels"] for r in results["records"]})
    channels = {r["levels"]: r["channels"] for r in results["records"]}
    tasks = list(dict.fromkeys(r["task"] for r in results["records"]))
    value = {(r["task"], r["levels"]): r["dice"] for r in results["records"]}
    lines = [
        "| task | " + " | ".join(f"{n} level(s), {channels[n]} ch" for n in levels) + " |",
        "|---|" + "---|" * len(levels),
    ]
    lines += [f"| {t} | " + " | ".join(f"{value[t, n]:.3f}" for n in levels) + " |" for t in tasks]
    means = [np.mean([value[t, n] for t in tasks]) for n in levels]
    lines.append("| **mean** | " + " | ".join(f"**{m:.3f}**" for m in means) + " |")
    return "\n".join(lines)
