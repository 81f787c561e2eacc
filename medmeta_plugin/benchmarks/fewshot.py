"""The few-shot benchmark: every method adapts on the same episodes of a suite; figures side by side.

Methods:
    ``scratch``          the same network from random initialisation, every parameter trained, random head,
                         the same number of steps: what a plain trainer does with a few labels;
    ``multitask+<mode>`` adaptation on the backbone trained jointly on the meta-training tasks;
    ``meta+<mode>``      adaptation on the meta-learned backbone (the shipped one by default).

All adaptation goes through :func:`medmeta_plugin.adapt.adapt`, with the head initialised in closed form
from the support set (except ``scratch``). Segmentation is scored by Dice on whole query volumes
(sliding-window inference for volumes larger than the support crops), classification by accuracy,
regression by mean absolute error.
"""

from __future__ import annotations

import json
import platform
import resource
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.inferers import sliding_window_inference
from monai.transforms import DivisiblePad
from tqdm import tqdm

from medmeta_plugin.adapt import AdaptBudget, adapt
from medmeta_plugin.benchmarks.suites import EvalTask, build_suite
from medmeta_plugin.meta.objectives import task_score
from medmeta_plugin.networks import ADAPTER_MODES, Backbone3D, MetaModel, load_backbone

__all__ = [
    "METHODS",
    "BenchmarkConfig",
    "parse_methods",
    "plot",
    "run_benchmark",
    "summarise",
    "write_results",
]

METHODS = ("scratch", *(f"multitask+{m}" for m in ADAPTER_MODES), *(f"meta+{m}" for m in ADAPTER_MODES))


@dataclass(frozen=True)
class BenchmarkConfig:
    """A benchmark run.

    Attributes:
        suite: suite name (:data:`~medmeta_plugin.benchmarks.suites.SUITES`).
        shots: support sizes (per class for classification).
        seeds: number of seeds; seed s draws the support set and seeds the adapter.
        methods: methods to compare.
        meta_backbone: the meta-learned backbone (``.safetensors``).
        multitask_backbone: the multitask-trained backbone.
        head_steps: step budget of ``head`` mode (cheap: features are cached), with leave-one-out.
        steps: step budget of every other mode and of ``scratch`` (each step runs the backbone), fixed;
            leave-one-out would multiply their cost by k + 1.
        tasks: evaluate only these tasks of the suite (default: all of them).
    """

    suite: str
    shots: tuple[int, ...] = (1, 3, 5)
    seeds: int = 3
    methods: tuple[str, ...] = METHODS
    meta_backbone: str = "sample_apps/backbone/backbone.safetensors"
    multitask_backbone: str = "sample_apps/backbone/multitask.safetensors"
    head_steps: int = 30
    steps: int = 10
    tasks: tuple[str, ...] | None = None


def _crop(item: dict[str, Any], size: tuple[int, int, int], seed: int) -> dict[str, Any]:
    """A ``size`` box around the structure (shifted by up to a quarter box, by seed), padded if needed."""
    label = item["label"][0]
    coords = torch.nonzero(label)
    centre = coords.float().mean(0).round().long() if len(coords) else torch.tensor(label.shape) // 2
    rng = np.random.default_rng(seed)
    shift = torch.as_tensor(rng.integers(-np.array(size) // 4, np.array(size) // 4 + 1))
    start = [
        int(max(0, min(c + s - n // 2, dim - n))) for c, s, n, dim in zip(centre, shift, size, label.shape)
    ]
    box = tuple(slice(st, st + n) for st, n in zip(start, size))
    return {"image": item["image"][(slice(None), *box)], "label": item["label"][(slice(None), *box)]}


def _prepare_support(
    task: EvalTask, items: list[dict[str, Any]], divisor: int, seed: int
) -> list[dict[str, Any]]:
    out = []
    for i, it in enumerate(items):
        if task.crop is not None:
            it = _crop(it, task.crop, seed * 100 + i)
        image = DivisiblePad(k=divisor)(it["image"])
        entry = {"image": torch.as_tensor(image)}
        if "label" in it:
            entry["label"] = torch.as_tensor(DivisiblePad(k=divisor)(it["label"]))
        else:
            entry["target"] = torch.as_tensor(it["target"])
        out.append(entry)
    return out


@torch.no_grad()
def _score(
    model: MetaModel, task: EvalTask, name: str, roi: tuple[int, int, int] | None, divisor: int
) -> float:
    """Mean score over the query cases (Dice, accuracy, or mean absolute error for regression)."""
    device = next(model.parameters()).device
    if task.kind != "segmentation":
        images = torch.stack([torch.as_tensor(DivisiblePad(k=divisor)(q["image"])) for q in task.query]).to(
            device
        )
        out = model(images, name)
        target = torch.tensor([q["target"] for q in task.query], device=device)
        if task.kind == "classification":
            return task_score("classification", out, target)
        return float((out.view(-1) - target.float()).abs().mean())
    scores = []
    for q in task.query:
        image = torch.as_tensor(DivisiblePad(k=divisor)(q["image"]))[None].to(device)
        label = torch.as_tensor(DivisiblePad(k=divisor)(q["label"]))[None].to(device)
        if roi is None:
            logits = model(image, name)
        else:
            logits = sliding_window_inference(image, roi, 4, lambda x: model(x, name), overlap=0.25)
        scores.append(task_score("segmentation", logits, label))
    return float(np.mean(scores))


def _peak_mem_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    # ru_maxrss is the process's peak resident memory in KiB on Linux: on a CPU it is the honest figure.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _models(config: BenchmarkConfig, device: torch.device) -> dict[str, Backbone3D]:
    backbones = {}
    if any(m.startswith("meta+") for m in config.methods):
        backbones["meta"] = load_backbone(config.meta_backbone)
    if any(m.startswith("multitask+") for m in config.methods):
        backbones["multitask"] = load_backbone(config.multitask_backbone)
    return {k: v.to(device).eval() for k, v in backbones.items()}


def run_benchmark(config: BenchmarkConfig, device: str | torch.device | None = None) -> dict[str, Any]:
    """Run every method on the same episodes of a suite.

    Returns:
        ``{"suite", "device", "config", "records": [{"method", "task", "kind", "shots", "seed", "metric",
        "value", "adapt_seconds", "peak_mem_mb"}]}``.

    Raises:
        ValueError: for an unknown suite or method, or a missing backbone file.
    """
    unknown = [m for m in config.methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; valid methods: {list(METHODS)}.")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    tasks = build_suite(config.suite)
    if config.tasks is not None:
        known = {t.name for t in tasks}
        missing = sorted(set(config.tasks) - known)
        if missing:
            raise ValueError(f"suite {config.suite!r} has no tasks {missing}; its tasks: {sorted(known)}.")
        tasks = [t for t in tasks if t.name in config.tasks]
    backbones = _models(config, device)
    reference = next(iter(backbones.values()), None)
    scratch_config = reference.config if reference is not None else Backbone3D().config
    divisor = (reference or Backbone3D(scratch_config)).size_divisor
    records = []
    jobs = [
        (t, k, s, m) for t in tasks for k in config.shots for s in range(config.seeds) for m in config.methods
    ]
    for task, shots, seed, method in tqdm(jobs, desc=f"benchmark {config.suite}"):
        support = _prepare_support(task, task.draw_support(shots, seed), divisor, seed)
        family, _, mode = method.partition("+")
        if method == "scratch":
            torch.manual_seed(seed)
            model = MetaModel(Backbone3D(scratch_config).to(device))
            budget = AdaptBudget(steps=config.steps, head_init=False, early_stopping=False)
            mode = "full"
        else:
            model = MetaModel(backbones[family])
            head = mode == "head"
            budget = AdaptBudget(steps=config.head_steps if head else config.steps, early_stopping=head)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        num_outputs = task.num_outputs if task.kind == "classification" else None
        adapter, report = adapt(
            model, support, task.kind, mode, budget, name="bench", num_outputs=num_outputs, seed=seed
        )
        model.attach(adapter)
        roi = task.crop if task.kind == "segmentation" else None
        value = _score(model, task, "bench", roi, divisor)
        metric = {"segmentation": "dice", "classification": "accuracy", "regression": "mae_ml"}[task.kind]
        records.append(
            {
                "method": method,
                "task": task.name,
                "kind": task.kind,
                "shots": shots,
                "seed": seed,
                "metric": metric,
                "value": value,
                "adapt_seconds": report.seconds,
                "peak_mem_mb": _peak_mem_mb(device),
            }
        )
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"cpu: {platform.machine()}, {torch.get_num_threads()} threads"
    return {"suite": config.suite, "device": name, "config": {**config.__dict__}, "records": records}


def summarise(results: dict[str, Any]) -> str:
    """A Markdown table: mean metric (over tasks and seeds) per method and shot count, and mean seconds."""
    table: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    seconds: dict[str, list[float]] = defaultdict(list)
    metric = results["records"][0]["metric"] if results["records"] else "-"
    for r in results["records"]:
        table[r["method"]][r["shots"]].append(r["value"])
        seconds[r["method"]].append(r["adapt_seconds"])
    shots = sorted({r["shots"] for r in results["records"]})
    lines = [
        "| method | " + " | ".join(f"{metric} @ {k} shot" for k in shots) + " | adapt s (mean) |",
        "|---" * (len(shots) + 2) + "|",
    ]
    for method, per_shot in table.items():
        cells = [f"{np.mean(per_shot[k]):.3f}" if per_shot[k] else "-" for k in shots]
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {np.mean(seconds[method]):.2f} |")
    return "\n".join(lines)


def plot(results: dict[str, Any], path: str | Path) -> Path:
    """Metric against shots, one line per method (mean over tasks and seeds, with the seed spread)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_method: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in results["records"]:
        by_method[r["method"]][r["shots"]].append(r["value"])
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method, per_shot in by_method.items():
        shots = sorted(per_shot)
        means = [np.mean(per_shot[k]) for k in shots]
        ax.plot(
            shots, means, marker="o", linestyle="--" if method.startswith("multitask") else "-", label=method
        )
    metric = results["records"][0]["metric"] if results["records"] else ""
    ax.set_xlabel("shots (labelled support cases)")
    ax.set_ylabel(f"mean {metric}")
    ax.set_xticks(sorted({r["shots"] for r in results["records"]}))
    ax.set_title(f"{results['suite']} ({results['device']})", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_results(results: dict[str, Any], path: str | Path) -> Path:
    """Write ``results`` as JSON."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1))
    return path


def parse_methods(values: Sequence[str] | None) -> tuple[str, ...]:
    """Methods from the command line (``all`` or names), validated."""
    if not values or list(values) == ["all"]:
        return METHODS
    unknown = [v for v in values if v not in METHODS]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; valid methods: {list(METHODS)} or 'all'.")
    return tuple(values)
