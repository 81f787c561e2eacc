"""How much a backbone's voxel features can say about held-out structures, with many labels or all of them.

For each segmentation task of a suite and each number of decoder levels in the features, a head (linear or a
per-voxel MLP) is fitted twice, on balanced voxel batches:

- ``ceiling``: on the task's *query* volumes themselves, scored on them with the best threshold. No few-shot
  head can beat it on those volumes; it is loose, though: a head may memorise what tells a structure apart
  within these very volumes and nowhere else.
- ``pool``: on every case of the task's support pool (8 for the phantoms), with the threshold that is best on
  them, scored on the query volumes: what the features give with more labels than a user will provide.

Few-shot Dice far below ``pool`` means the adaptation wastes the labels; ``pool`` far below ``ceiling``
means the features do not carry from one volume to the next, which only better features can fix
(``docs/benchmarks/feature-levels.md``).

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
from medmeta_plugin.transforms import pad_to_multiple

__all__ = ["PROBE_HEADS", "run_probe", "summarise_probe"]


def _with_levels(backbone: Backbone3D, levels: int) -> Backbone3D:
    """The same weights, with ``levels`` decoder levels in the voxel features."""
    probe = Backbone3D(dataclasses.replace(backbone.config, feature_levels=levels))
    probe.load_state_dict(backbone.state_dict())
    return probe.eval()


def _features(backbone: Backbone3D, image: torch.Tensor) -> torch.Tensor:
    """Voxel features (X*Y*Z, C) of one image (1, X, Y, Z), padded to the size divisor and cropped back."""
    size = image.shape[1:]
    with torch.no_grad():
        features = backbone(pad_to_multiple(image, backbone.size_divisor)[None]).features[0]
    return features[:, : size[0], : size[1], : size[2]].flatten(1).T


PROBE_HEADS = ("linear", "mlp")
_THRESHOLDS = torch.linspace(-8.0, 8.0, 65)


def _fit(x: torch.Tensor, y: torch.Tensor, head: str, steps: int, seed: int) -> nn.Module:
    """A head (with input standardisation) fitted on ``x`` (N, C) -> ``y`` (N,) by balanced batches."""
    foreground, background = torch.nonzero(y > 0)[:, 0], torch.nonzero(y == 0)[:, 0]
    if not len(foreground) or not len(background):
        raise ValueError("the probe needs labels with both foreground and background voxels.")
    torch.manual_seed(seed)
    mean, std = x.mean(0), x.std(0) + 1e-5
    layers = (
        [nn.Linear(x.shape[1], 1)]
        if head == "linear"
        else [nn.Linear(x.shape[1], 64), nn.ReLU(), nn.Linear(64, 1)]
    )
    net = nn.Sequential(_Standardise(mean, std), *layers)
    optimiser = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(steps):
        # Balanced batches: the foreground is 1-5 % of a volume.
        idx = torch.cat(
            [
                foreground[torch.randint(len(foreground), (4096,))],
                background[torch.randint(len(background), (4096,))],
            ]
        )
        loss = F.binary_cross_entropy_with_logits(net(x[idx])[:, 0], y[idx])
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return net.eval()


class _Standardise(nn.Module):
    """``(x - mean) / std`` per channel, with the statistics of the voxels the head is fitted on."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def _dice(pred: torch.Tensor, truth: torch.Tensor) -> float:
    total = float(pred.sum() + truth.sum())
    return 2 * float((pred & truth).sum()) / total if total else 1.0


def _best_threshold(logits: torch.Tensor, truth: torch.Tensor) -> tuple[float, float]:
    """(threshold, Dice) of the best of :data:`_THRESHOLDS` on these voxels."""
    scores = [(_dice(logits > t, truth), float(t)) for t in _THRESHOLDS]
    dice, threshold = max(scores)
    return threshold, dice


def _fit_ceiling(x: torch.Tensor, y: torch.Tensor, steps: int, seed: int, head: str = "mlp") -> float:
    """Fit a head on ``x`` (N, C) -> ``y`` (N,) and return its best Dice on the same voxels."""
    net = _fit(x, y, head, steps, seed)
    with torch.no_grad():
        return _best_threshold(net(x)[:, 0], y > 0)[1]


def _fit_pool(
    x: torch.Tensor,
    y: torch.Tensor,
    queries: list[tuple[torch.Tensor, torch.Tensor]],
    steps: int,
    seed: int,
    head: str,
) -> float:
    """Fit on the pool's voxels, pick the threshold on them, return the mean Dice over ``queries``."""
    net = _fit(x, y, head, steps, seed)
    with torch.no_grad():
        threshold, _ = _best_threshold(net(x)[:, 0], y > 0)
        return float(np.mean([_dice(net(qx)[:, 0] > threshold, qy > 0) for qx, qy in queries]))


def run_probe(
    suite: str,
    backbone_path: str,
    levels: Sequence[int] = (1, 2, 3),
    steps: int = 300,
    seed: int = 0,
    tasks: Sequence[str] | None = None,
    head: str = "linear",
) -> dict[str, Any]:
    """Fit and score the ceiling and pool heads of every segmentation task of ``suite`` at each level count.

    Returns:
        ``{"suite", "backbone", "head", "device", "records": [{"task", "levels", "channels", "ceiling",
        "pool"}], "seconds"}``.

    Raises:
        ValueError: for an unknown suite or task, a suite without segmentation tasks, or a level count the
            backbone does not have.
    """
    if head not in PROBE_HEADS:
        raise ValueError(f"unknown probe head {head!r}; valid: {PROBE_HEADS}.")
    base = load_backbone(backbone_path)
    # Level n's features are the first channels of level n + 1's: one pass at the most levels serves all.
    # BackboneConfig rejects a level count the backbone does not have.
    configs = {level: dataclasses.replace(base.config, feature_levels=level) for level in levels}
    channels = {level: sum(c.features[:level]) for level, c in configs.items()}
    backbone = _with_levels(base, max(levels))
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
        qy = [q["label"].flatten() for q in task.query]
        py = torch.cat([s["label"].flatten() for s in task.support_pool])
        query = [_features(backbone, q["image"]) for q in task.query]
        pool = torch.cat([_features(backbone, s["image"]) for s in task.support_pool])
        for level, c in channels.items():
            qx, px = [x[:, :c] for x in query], pool[:, :c]
            records.append(
                {
                    "task": task.name,
                    "levels": level,
                    "channels": c,
                    "ceiling": _fit_ceiling(torch.cat(qx), torch.cat(qy), steps, seed, head),
                    "pool": _fit_pool(px, py, list(zip(qx, qy)), steps, seed, head),
                }
            )
    return {
        "suite": suite,
        "backbone": str(backbone_path),
        "head": head,
        "pool_cases": {t.name: len(t.support_pool) for t in chosen},
        "device": f"cpu: {platform.machine()}, {torch.get_num_threads()} torch threads",
        "records": records,
        "seconds": round(time.perf_counter() - start, 1),
    }


def summarise_probe(results: dict[str, Any]) -> str:
    """A Markdown table: pool / ceiling Dice per task (rows) and level count (columns), with the means."""
    levels = sorted({r["levels"] for r in results["records"]})
    channels = {r["levels"]: r["channels"] for r in results["records"]}
    tasks = list(dict.fromkeys(r["task"] for r in results["records"]))
    value = {(r["task"], r["levels"]): (r["pool"], r["ceiling"]) for r in results["records"]}
    lines = [
        "| task | " + " | ".join(f"{n} level(s), {channels[n]} ch: pool / ceiling" for n in levels) + " |",
        "|---|" + "---|" * len(levels),
    ]
    for t in tasks:
        lines.append(
            f"| {t} | " + " | ".join(f"{value[t, n][0]:.3f} / {value[t, n][1]:.3f}" for n in levels) + " |"
        )
    means = [np.mean([value[t, n] for t in tasks], axis=0) for n in levels]
    lines.append("| **mean** | " + " | ".join(f"**{m[0]:.3f} / {m[1]:.3f}**" for m in means) + " |")
    return "\n".join(lines)
