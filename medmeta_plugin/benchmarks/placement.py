"""``medmeta benchmark placement``: the field-of-view suite (:mod:`~medmeta_plugin.benchmarks.fov`), every
method on the same pairs.

Methods (each registers the support scan onto the query on the app's 3 mm working grid):

- ``medmeta``: the product, :func:`~medmeta_plugin.registration.register` (global placement, then the rigid
  and affine stages), as the app runs it;
- ``truth-start``: the same local stages started from the true placement: the ceiling of any placement;
- ``centres``: the same local stages started as the product started before the placement stage existed
  (scan centres aligned, then starts every 30 mm along the body axis, the best by the metric);
- ``ants-<transform>-<init>``: antspyx (``pip install antspyx``; optional) with its standard starts,
  ``moments`` (its default: centres of mass) and ``centre`` (geometric centres), for ``affine`` and
  ``synquick`` (rigid + affine + SyN); ``ants-affine-placement``: ANTs' affine stage started from the
  product's placement (the library's local stage in place of the product's);
- ``elastix-<transform>``: itk-elastix (optional) from the product's placement, ``affine`` and ``bspline``:
  the local stages of a well-kept library, beside the product's own.

Each record: the pair, the method, the placement error along the body axis and in 3D (mm, at the query's
body centre), the carried masks' mean Dice over the pair's scored structures, seconds, and for ``medmeta``
the placement's confidence. ``head-abdomen`` pairs have no truth: only the confidence is recorded.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from medmeta_plugin.benchmarks.fov import FOV_CLASSES, FovPair, fov_pairs, world_error
from medmeta_plugin.benchmarks.scoring import mask_dice
from medmeta_plugin.registration import (
    Registration,
    deterministic_registration,
    register,
    warp_to,
)
from medmeta_plugin.registration.grids import soft_tissue_window
from medmeta_plugin.registration.itk_bridge import euler_from_matrix, matrix_from_transform, shrunk, to_itk
from medmeta_plugin.registration.stages import optimise

__all__ = [
    "PLACEMENT_METHODS",
    "PlacementBenchmark",
    "centres_start",
    "run_placement_benchmark",
    "summarise",
]

logger = logging.getLogger(__name__)

#: Methods of the suite; ``ants-*`` and ``elastix-*`` need their optional packages.
PLACEMENT_METHODS = (
    "medmeta",
    "truth-start",
    "centres",
    "ants-affine-moments",
    "ants-affine-centre",
    "ants-synquick-moments",
    "ants-synquick-centre",
    "ants-affine-placement",
    "elastix-affine",
    "elastix-bspline",
)
#: A placement farther than this from the truth along the body axis is wrong (the issue's definition).
WRONG_MM = 30.0
#: The target: pairs placed within this distance of the truth along the body axis.
PLACED_MM = 15.0


@dataclass(frozen=True)
class PlacementBenchmark:
    """A run of the suite.

    Attributes:
        split: ``dev`` or ``test`` (:func:`~medmeta_plugin.benchmarks.fov.fov_pairs`).
        repeats: pairs per plan.
        methods: of :data:`PLACEMENT_METHODS`.
        classes: pair classes (:data:`~medmeta_plugin.benchmarks.fov.FOV_CLASSES`).
        transform: the local stages' transform (the app's default).
    """

    split: str = "test"
    repeats: int = 2
    methods: tuple[str, ...] = ("medmeta", "truth-start", "centres")
    classes: tuple[str, ...] = FOV_CLASSES
    transform: str = "affine"

    def __post_init__(self) -> None:
        unknown = sorted(set(self.methods) - set(PLACEMENT_METHODS))
        if unknown:
            raise ValueError(f"unknown placement methods {unknown}; valid: {list(PLACEMENT_METHODS)}.")


def centres_start(
    fixed: np.ndarray, fixed_affine: np.ndarray, moving: np.ndarray, moving_affine: np.ndarray
) -> np.ndarray:
    """The start the product used before its placement stage (kept as a baseline): scan centres aligned,
    then offsets every 30 mm along the world superior axis over the difference of the two extents, each
    refined rigidly at the coarse level; the best by Mattes MI. Returns the 4x4 fixed -> moving matrix."""
    step = 30.0
    fixed_itk = to_itk(soft_tissue_window(fixed), fixed_affine)
    moving_itk = to_itk(soft_tissue_window(moving), moving_affine)
    coarse = (shrunk(fixed_itk, 4), shrunk(moving_itk, 4))
    centre_f = (fixed_affine @ np.r_[(np.array(fixed.shape) - 1) / 2, 1.0])[:3]
    centre_m = (moving_affine @ np.r_[(np.array(moving.shape) - 1) / 2, 1.0])[:3]

    def extent(shape: tuple[int, ...], affine: np.ndarray) -> float:
        z = [
            (affine @ np.r_[i, j, k, 1.0])[2]
            for i in (0, shape[0] - 1)
            for j in (0, shape[1] - 1)
            for k in (0, shape[2] - 1)
        ]
        return max(z) - min(z)

    reach = abs(extent(moving.shape, moving_affine) - extent(fixed.shape, fixed_affine)) / 2 + step
    best: tuple[float, np.ndarray] | None = None
    for dz in np.arange(-np.floor(reach / step), np.floor(reach / step) + 1) * step:
        start = np.eye(4)
        start[:3, 3] = centre_m - centre_f + np.array([0.0, 0.0, dz])
        rigid = euler_from_matrix(start, centre_f)
        try:
            value = optimise(*coarse, rigid, 100)
        except RuntimeError:
            continue
        if best is None or value < best[0]:
            best = (value, matrix_from_transform(rigid))
    if best is None:
        raise ValueError("no start of the centres baseline overlaps the other scan.")
    return best[1]


def _carried_dice(pair: FovPair, warp: Callable[[np.ndarray], np.ndarray]) -> dict[str, float]:
    """Dice of each scored structure: the support's mask carried onto the query (0.5 level) vs the query's."""
    out = {}
    for name in pair.structures:
        carried = warp(pair.moving.mask(name).astype(np.float32)) >= 0.5
        out[name] = mask_dice(carried, pair.fixed.mask(name))
    return out


def _ours(pair: FovPair, transform: str, initial: np.ndarray | None) -> Registration:
    fixed, moving = pair.fixed, pair.moving
    return register(
        fixed.image, fixed.affine, moving.image, moving.affine, transform=transform, initial=initial
    )


def _record(
    pair: FovPair,
    method: str,
    matrix: np.ndarray | None,
    dice: dict[str, float],
    seconds: float,
    **extra: Any,
) -> dict[str, Any]:
    record: dict[str, Any] = {
        "pair": pair.name,
        "class": pair.pair_class,
        "extent": pair.extent,
        "split": pair.split,
        "method": method,
        "seconds": round(seconds, 3),
        "structures": {k: round(v, 4) for k, v in dice.items()},
        "dice": round(float(np.mean(list(dice.values()))), 4) if dice else None,
        **extra,
    }
    if pair.truth is not None and matrix is not None:
        along, total = world_error(pair, matrix)
        record.update(error_axis_mm=round(along, 2), error_mm=round(total, 2))
    return record


def _run_ours(pair: FovPair, method: str, transform: str) -> dict[str, Any]:
    fixed, moving = pair.fixed, pair.moving
    start = time.perf_counter()
    if method == "truth-start":
        if pair.truth is None:
            raise ValueError("no truth")
        registration = _ours(pair, transform, pair.truth)
    elif method == "centres":
        try:
            registration = _ours(
                pair, transform, centres_start(fixed.image, fixed.affine, moving.image, moving.affine)
            )
        except ValueError:  # no start overlapped: the previous product answered nothing
            return _record(
                pair, method, None, dict.fromkeys(pair.structures, 0.0), time.perf_counter() - start
            )
    else:
        registration = _ours(pair, transform, None)
    seconds = time.perf_counter() - start

    def warp(mask: np.ndarray) -> np.ndarray:
        return warp_to(
            mask, moving.affine, fixed.image.shape, fixed.affine, registration.matrix, registration.bspline
        )

    extra: dict[str, Any] = {}
    placement = registration.placement
    if placement is not None:
        extra = {"placement": placement.to_dict(), "placement_seconds": round(placement.seconds, 3)}
        extra["placement_error_axis_mm"] = (
            round(world_error(pair, placement.matrix)[0], 2) if pair.truth is not None else None
        )
    matrix = placement.matrix if placement is not None else registration.matrix
    dice = _carried_dice(pair, warp) if pair.truth is not None else {}
    record = _record(pair, method, matrix, dice, seconds, **extra)
    if pair.truth is not None:  # the final registration's error beside the placement's
        record["final_error_axis_mm"] = round(world_error(pair, registration.matrix)[0], 2)
    return record


def _load_itk() -> None:
    """One registration of a small phantom, so that ITK's module loading (seconds, once per process, done
    by the app at start) is not timed as the first pair's placement."""
    ball = np.random.default_rng(0).normal(size=(24, 24, 24)).astype(np.float32)
    ball[6:18, 6:18, 6:18] += 3.0
    register(ball, np.diag([3.0, 3.0, 3.0, 1.0]), ball, np.diag([3.0, 3.0, 3.0, 1.0]), iterations=2)


def run_placement_benchmark(
    config: PlacementBenchmark,
    pairs: Iterable[FovPair] | None = None,
    progress: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """Every method on every pair of the split; one record per (pair, method).

    Registrations run on one ITK thread (:func:`~medmeta_plugin.registration.deterministic_registration`), so
    a run repeats exactly.

    Args:
        config: the run.
        pairs: the pairs (default: :func:`~medmeta_plugin.benchmarks.fov.fov_pairs` of ``config``).
        progress: called with one line per finished pair.
    """
    from medmeta_plugin.benchmarks import external

    pairs = pairs if pairs is not None else fov_pairs(config.split, config.repeats, config.classes)
    records = []
    _load_itk()
    with deterministic_registration():
        for pair in pairs:
            for method in config.methods:
                if method == "truth-start" and pair.truth is None:
                    continue
                if method.startswith(("ants-", "elastix-")):
                    if pair.truth is None:
                        continue
                    record = external.run(pair, method, _ours)
                    if record is None:
                        continue
                    records.append(_record(pair, method, record["matrix"], record["dice"], record["seconds"]))
                    continue
                try:
                    records.append(_run_ours(pair, method, config.transform))
                except ValueError as err:  # the registration failed: the app leaves that scan out
                    logger.warning("%s on %s failed: %s", method, pair.name, err)
                    records.append(
                        _record(pair, method, None, dict.fromkeys(pair.structures, 0.0), 0.0, failed=str(err))
                    )
            if progress is not None:
                line = ", ".join(
                    f"{r['method']} {r.get('error_axis_mm', '-')} mm Dice {r['dice']}"
                    for r in records
                    if r["pair"] == pair.name
                )
                progress(f"{pair.name}: {line}")
    return records


def summarise(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per method and pair class: share placed within :data:`PLACED_MM`, median error, mean Dice and its
    ratio to ``truth-start``'s on the same pairs, mean seconds; and how the confidence separates right from
    wrong placements of ``medmeta`` (wrong: error over :data:`WRONG_MM`, or a ``head-abdomen`` pair)."""
    out: dict[str, Any] = {"classes": {}, "confidence": {}}
    ceiling = {r["pair"]: r["dice"] for r in records if r["method"] == "truth-start"}
    for cls in [*FOV_CLASSES, "all"]:
        rows = [r for r in records if (cls == "all" or r["class"] == cls) and r["class"] != "head-abdomen"]
        if not rows:
            continue
        by_method: dict[str, Any] = {}
        for method in dict.fromkeys(r["method"] for r in rows):
            mine = [r for r in rows if r["method"] == method]
            errors = [r["error_axis_mm"] for r in mine if r.get("error_axis_mm") is not None]
            # a pair with no answer (no start found) counts as not placed
            dice = [r["dice"] for r in mine if r["dice"] is not None]
            paired = [
                (r["dice"], ceiling[r["pair"]])
                for r in mine
                if r["dice"] is not None and ceiling.get(r["pair"])
            ]
            by_method[method] = {
                "pairs": len(mine),
                "placed_within_15mm": float(sum(e <= PLACED_MM for e in errors) / len(mine))
                if errors
                else None,
                "median_error_axis_mm": float(np.median(errors)) if errors else None,
                "dice": float(np.mean(dice)) if dice else None,
                "dice_of_ceiling": float(np.mean([d for d, _ in paired]) / np.mean([c for _, c in paired]))
                if paired
                else None,
                "seconds": float(np.mean([r["seconds"] for r in mine])),
            }
        out["classes"][cls] = by_method
    ours = [r for r in records if r["method"] == "medmeta" and "placement" in r]
    if ours:
        wrong = [r["class"] == "head-abdomen" or r.get("placement_error_axis_mm", 0) > WRONG_MM for r in ours]
        sure = [r["placement"]["sure"] for r in ours]
        flagged = [not s for s, w in zip(sure, wrong) if w]
        passed = [s for s, w in zip(sure, wrong) if not w]
        out["confidence"] = {
            "wrong": int(sum(wrong)),
            "right": int(len(wrong) - sum(wrong)),
            "wrong_flagged": float(np.mean(flagged)) if flagged else None,
            "right_passed": float(np.mean(passed)) if passed else None,
            "placement_seconds": float(np.mean([r["placement_seconds"] for r in ours])),
            "placement_seconds_max": float(np.max([r["placement_seconds"] for r in ours])),
        }
    return out


def write_results(path: str, records: Sequence[dict[str, Any]], meta: dict[str, Any]) -> None:
    """``{"meta": ..., "summary": ..., "records": [...]}`` as JSON."""
    with open(path, "w") as f:
        json.dump({"meta": meta, "summary": summarise(records), "records": list(records)}, f, indent=1)


def format_summary(summary: dict[str, Any]) -> str:
    """The summary as Markdown: one row per (class, method), then the confidence's separation."""
    lines = [
        "| class | method | pairs | placed <= 15 mm | median error mm | Dice | of ceiling | s |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def cell(value: float | None, fmt: str) -> str:
        return "-" if value is None else format(value, fmt)

    for cls, methods in summary["classes"].items():
        for method, row in methods.items():
            lines.append(
                f"| {cls} | {method} | {row['pairs']} | {cell(row['placed_within_15mm'], '.0%')} | "
                f"{cell(row['median_error_axis_mm'], '.1f')} | {cell(row['dice'], '.3f')} | "
                f"{cell(row['dice_of_ceiling'], '.0%')} | {row['seconds']:.1f} |"
            )
    conf = summary.get("confidence") or {}
    if conf:
        lines += [
            "",
            f"Confidence: {cell(conf['wrong_flagged'], '.0%')} of {conf['wrong']} wrong placements flagged "
            f"(error > {WRONG_MM:.0f} mm along the body axis, or a head against an abdomen), "
            f"{cell(conf['right_passed'], '.0%')} of {conf['right']} right ones passed; placement "
            f"{conf['placement_seconds']:.2f} s a pair on average, "
            f"{conf['placement_seconds_max']:.2f} s at most.",
        ]
    return "\n".join(lines)


def plot(records: Sequence[dict[str, Any]], path: str) -> str:
    """Two panels: the share of pairs placed within each error (per class, ``medmeta``), and each pair's
    carried-mask Dice against the truth-started ceiling's."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    colours = dict(zip(FOV_CLASSES, ("tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:grey")))
    ceiling = {r["pair"]: r["dice"] for r in records if r["method"] == "truth-start"}
    for cls in FOV_CLASSES[:-1]:
        ours = [r for r in records if r["method"] == "medmeta" and r["class"] == cls]
        errors = np.sort(
            [r["placement_error_axis_mm"] for r in ours if r.get("placement_error_axis_mm") is not None]
        )
        if errors.size:
            left.step(
                errors,
                np.arange(1, errors.size + 1) / errors.size,
                where="post",
                label=cls,
                color=colours[cls],
            )
        pts = [
            (ceiling[r["pair"]], r["dice"]) for r in ours if r["dice"] is not None and r["pair"] in ceiling
        ]
        if pts:
            right.scatter(*zip(*pts), s=14, label=cls, color=colours[cls])
    left.axvline(PLACED_MM, color="k", lw=0.8, ls="--")
    left.set_xscale("symlog", linthresh=10)
    left.set_xlabel("placement error along the body axis (mm)")
    left.set_ylabel("share of pairs")
    left.legend(loc="lower right")
    right.plot([0, 1], [0, 1], color="k", lw=0.8)
    right.plot([0, 1], [0, 0.9], color="k", lw=0.8, ls=":")
    right.set_xlabel("Dice, started from the truth (ceiling)")
    right.set_ylabel("Dice, medmeta (placement, rigid, affine)")
    right.set_xlim(0, 1)
    right.set_ylim(0, 1)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


#: The placement's figures the confidence is fitted on (:data:`~medmeta_plugin.registration.placement.
#: CONFIDENCE_WEIGHTS`).
CONFIDENCE_FIGURES = ("margin", "gradients", "outline")


def calibrate(records: Sequence[dict[str, Any]], steps: int = 20_000, l2: float = 0.02) -> dict[str, Any]:
    """Fit the placement confidence's logistic curve on ``medmeta`` records (a dev run): weights per figure
    of :data:`CONFIDENCE_FIGURES` and a bias, by gradient descent on the log-loss of right (1) vs wrong (0),
    on standardised figures with a small L2 penalty; and the share of wrong placements flagged and of right
    ones passed at several thresholds, by that curve scaled below the tie margin as
    :func:`~medmeta_plugin.registration.placement.confidence` serves it.

    Raises:
        ValueError: without both right and wrong placements among the records.
    """
    from medmeta_plugin.registration.placement import MARGIN_CAP, tie_scale

    ours = [r for r in records if r["method"] == "medmeta" and "placement" in r]
    wrong = np.array([r["class"] == "head-abdomen" or r["placement_error_axis_mm"] > WRONG_MM for r in ours])
    if not ours or wrong.all() or not wrong.any():
        raise ValueError("calibration needs medmeta records with both right and wrong placements.")
    x = np.array(
        [
            [
                min(r["placement"]["margin"], MARGIN_CAP),
                r["placement"]["gradients"],
                r["placement"]["outline"],
            ]
            for r in ours
        ]
    )
    y = (~wrong).astype(np.float64)
    mean, std = x.mean(0), x.std(0) + 1e-9
    z = (x - mean) / std
    w, b = np.zeros(x.shape[1]), 0.0
    for _ in range(steps):
        p = 1.0 / (1.0 + np.exp(-(z @ w + b)))
        w -= 0.05 * (z.T @ (p - y) / len(y) + l2 * w)
        b -= 0.05 * float((p - y).mean())
    weights = w / std
    bias = b - float((w * mean / std).sum())
    # Thresholds are read on the confidence as served: the fitted curve with the tie scaling on top.
    tie = tie_scale(np.array([r["placement"]["margin"] for r in ours]))
    p = tie / (1.0 + np.exp(-(x @ weights + bias)))
    return {
        "weights": {k: round(float(v), 3) for k, v in zip(CONFIDENCE_FIGURES, weights)},
        "bias": round(bias, 3),
        "wrong": int(wrong.sum()),
        "right": int((~wrong).sum()),
        "thresholds": {
            f"{t:.1f}": {
                "wrong_flagged": float((p[wrong] < t).mean()),
                "right_passed": float((p[~wrong] >= t).mean()),
            }
            for t in (0.3, 0.5, 0.6, 0.7, 0.8)
        },
    }
