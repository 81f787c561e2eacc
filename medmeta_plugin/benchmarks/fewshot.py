"""The few-shot benchmark: every method adapts on the same episodes of a suite; figures side by side.

Methods:
    ``scratch``          the same network from random initialisation, every parameter trained, random head,
                         the same number of steps: what a plain trainer does with a few labels;
    ``atlas``            the app's default answer, computed by the app's own pipeline
                         (:mod:`~medmeta_plugin.benchmarks.served`: files, working grid, placement,
                         registration, the sure placements' carried masks, back to the query's grid; real
                         suites only);
    ``incontext``        the same pipeline with the in-context refiner (``--conf incontext true``): the
                         carried masks' boundary moved onto the query by a network that reads both;
    ``multitask+<mode>`` adaptation on the backbone trained jointly on the meta-training tasks;
    ``meta+<mode>``      adaptation on the meta-learned backbone (the shipped one by default).

What the app serves is measured by the app's pipeline: ``atlas`` and every ``<family>+head`` method on a
segmentation suite are answered by :class:`~medmeta_plugin.benchmarks.served.ServedPipeline` (the app's
engine on files written from the episode: working grid, feature cache, the server's adaptation, segmenting
and its return to the query's grid), with that backbone and head and the atlas prior off, so the adapted
head answers alone; phantoms are written on a grid of the app's working spacing, so their voxels reach the
backbone as they are. With ``atlas="on"`` or ``"both"`` a head method on a real suite is also answered
with the carried masks refined by the head (``--conf refine true``), recorded as ``<method>+atlas``.

The other modes (``film``, ``lora``, ``full``), ``scratch`` and the volume-level tasks are components the
app does not serve by default: they go through :func:`medmeta_plugin.adapt.adapt` on whole support volumes
padded to the backbone's size divisor, and are scored by one whole-volume forward of each query (the
backbone normalises by instance statistics, so a window's features would differ from the whole-volume
features the head was fitted on). Segmentation is scored by Dice on whole query volumes, classification by
accuracy, regression by mean absolute error.
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
from monai.utils import look_up_option
from tqdm import tqdm

from medmeta_plugin.adapt import HEAD_MODE_STEPS, AdaptBudget, adapt, head_mode_budget
from medmeta_plugin.benchmarks.served import ServedPipeline
from medmeta_plugin.benchmarks.suites import EvalTask, build_suite
from medmeta_plugin.networks import ADAPTER_MODES, Backbone3D, MetaModel, load_backbone
from medmeta_plugin.networks.heads import DEFAULT_SEGMENTATION_HEAD, SEGMENTATION_HEADS
from medmeta_plugin.networks.objectives import task_score
from medmeta_plugin.networks.precision import PRECISIONS
from medmeta_plugin.paths import DEFAULT_BACKBONE, MULTITASK_BACKBONE
from medmeta_plugin.registration import (
    REGISTRATION_TRANSFORMS,
    deterministic_registration,
)
from medmeta_plugin.transforms import pad_to_multiple

__all__ = [
    "ATLAS_CHOICES",
    "DEFAULT_PLANS",
    "FULL_PLAN",
    "METHODS",
    "BenchmarkConfig",
    "parse_methods",
    "plot",
    "run_benchmark",
    "skipped_by_default",
    "summarise",
    "write_results",
]

METHODS = (
    "scratch",
    "atlas",
    "incontext",
    *(f"multitask+{m}" for m in ADAPTER_MODES),
    *(f"meta+{m}" for m in ADAPTER_MODES),
)
#: ``off``: plain head logits; ``on``: fused with the atlas prior where a suite has geometry; ``both``.
ATLAS_CHOICES = ("off", "on", "both")


@dataclass(frozen=True)
class DefaultPlan:
    """What ``medmeta benchmark fewshot --suite S`` runs without ``--full``: sized to finish within about
    20 minutes on 2 CPU cores, with the methods whose answer is the app's (phantoms have no geometry: there
    the app's answer is the adapted head, ``meta+head``; real scans: ``atlas``, the app's own pipeline).

    Attributes:
        methods, shots, seeds: the grid; ``atlas`` the fusion setting of adapted methods.
    """

    methods: tuple[str, ...]
    shots: tuple[int, ...] = (1, 3, 5)
    seeds: int = 1
    atlas: str = "off"


_PHANTOM_PLAN = DefaultPlan(("scratch", "multitask+head", "meta+head"))
_REAL_PLAN = DefaultPlan(("atlas", "incontext"))
#: The default grid of each suite; ``--full`` runs every method, 3 seeds, and the fused variants.
DEFAULT_PLANS: dict[str, DefaultPlan] = {
    "synthetic-heldout": _PHANTOM_PLAN,
    "synthetic-classification": _PHANTOM_PLAN,
    "synthetic-regression": _PHANTOM_PLAN,
    "abdomen-ct-to-mr": _REAL_PLAN,
    "abdomen-ct-to-mr-dev": _REAL_PLAN,
    "brain-heldout": _REAL_PLAN,
    "brain-dev": _REAL_PLAN,
    "brain-tumour": DefaultPlan(("atlas", "incontext"), shots=(1, 3)),
}
#: ``--full``: the whole grid.
FULL_PLAN = DefaultPlan(METHODS, seeds=3, atlas="both")


def skipped_by_default(suite: str) -> str:
    """What the default plan of ``suite`` leaves to ``--full``, in words."""
    plan, full = DEFAULT_PLANS[suite], FULL_PLAN
    phantoms = suite.startswith("synthetic")  # no geometry: no atlas answer and nothing to fuse
    left = [m for m in full.methods if m not in plan.methods and not (phantoms and m in _PRIOR_METHODS)]
    parts = []
    if left:
        parts.append(f"methods {' '.join(left)}")
    if plan.seeds < full.seeds:
        parts.append(f"seeds {plan.seeds + 1}-{full.seeds}")
    if plan.atlas != full.atlas and not phantoms:
        parts.append("the adapted methods fused with the atlas prior (+atlas)")
    return "; ".join(parts) or "nothing"


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
        heads: segmentation head kinds to compare (:data:`~medmeta_plugin.networks.SEGMENTATION_HEADS`);
            every method but ``scratch`` runs once per kind, recorded as ``<method>@<head>`` when there is
            more than one kind. Ignored by classification and regression tasks.
        atlas: one of :data:`ATLAS_CHOICES`: score adapted methods with the atlas prior fused in (real
            suites only; phantoms have no geometry to register).
        registration: the transform the atlas prior's registration fits, one of
            :data:`~medmeta_plugin.registration.REGISTRATION_TRANSFORMS` (as the app's default).
        precision: of every backbone pass (adaptation, features, scoring), one of
            :data:`~medmeta_plugin.networks.precision.PRECISIONS`.
    """

    suite: str
    shots: tuple[int, ...] = (1, 3, 5)
    seeds: int = 3
    methods: tuple[str, ...] = METHODS
    meta_backbone: str = str(DEFAULT_BACKBONE)
    multitask_backbone: str = str(MULTITASK_BACKBONE)
    head_steps: int = HEAD_MODE_STEPS
    steps: int = 10
    tasks: tuple[str, ...] | None = None
    heads: tuple[str, ...] = (DEFAULT_SEGMENTATION_HEAD,)
    atlas: str = "both"
    registration: str = "affine"
    precision: str = "fp32"

    def __post_init__(self) -> None:
        look_up_option(self.atlas, ATLAS_CHOICES)
        look_up_option(self.registration, REGISTRATION_TRANSFORMS)
        look_up_option(self.precision, PRECISIONS)
        for head in self.heads:
            look_up_option(head, SEGMENTATION_HEADS)


def _pad(array: torch.Tensor, divisor: int, mode: str = "constant") -> torch.Tensor:
    """``array`` (C, X, Y, Z) padded as the app pads (:func:`~medmeta_plugin.transforms.pad_to_multiple`)."""
    # A plain tensor, not MONAI's MetaTensor: its metadata tracking costs on every operation, and head-mode
    # adaptation runs many small ones.
    return pad_to_multiple(torch.as_tensor(array).as_subclass(torch.Tensor), divisor, mode)


def _prepare_support(items: list[dict[str, Any]], divisor: int) -> list[dict[str, Any]]:
    """Whole support cases, padded to multiples of ``divisor``."""
    out = []
    for it in items:
        entry = {"image": _pad(it["image"], divisor, "replicate")}
        if "label" in it:
            entry["label"] = _pad(it["label"], divisor)
        else:
            entry["target"] = torch.as_tensor(it["target"])
        out.append(entry)
    return out


#: Methods that are the app's answer from the atlas prior (real suites only).
_PRIOR_METHODS = ("atlas", "incontext")


def _has_geometry(task: EvalTask) -> bool:
    """Whether the atlas prior applies: a segmentation task of real scans (items with an ``affine``)."""
    return task.kind == "segmentation" and all("affine" in it for it in [*task.support_pool, *task.query])


def _served(method: str, task: EvalTask) -> bool:
    """Whether ``method`` on ``task`` is answered by the app's pipeline: the app's default answer and
    head-mode segmentation (the mode the app serves); other modes, ``scratch`` and volume-level tasks are
    scored as components, with :func:`medmeta_plugin.adapt.adapt` and a whole-volume forward."""
    return task.kind == "segmentation" and (method in _PRIOR_METHODS or method.endswith("+head"))


def _mask_logits(mask: np.ndarray) -> torch.Tensor:
    """A served mask (X, Y, Z) as logits for :func:`task_score`, shape (1, 1, X, Y, Z)."""
    return torch.from_numpy(mask.astype(np.float32) - 0.5)[None, None]


@torch.no_grad()
def _score(model: MetaModel, task: EvalTask, name: str, divisor: int, precision: str = "fp32") -> float:
    """Mean score over the query cases (Dice, accuracy, or mean absolute error for regression) of a
    component method: the adapted model's forward on each whole (padded) query volume.

    ``precision`` is that of the backbone passes.
    """
    device = next(model.parameters()).device
    if task.kind != "segmentation":
        images = torch.stack([_pad(q["image"], divisor, "replicate") for q in task.query]).to(device)
        out = model(images, name, precision)
        target = torch.tensor([q["target"] for q in task.query], device=device)
        if task.kind == "classification":
            return task_score("classification", out, target)
        return float((out.view(-1) - target.float()).abs().mean())
    scores = []
    for q in task.query:
        label = _pad(q["label"], divisor)[None].to(device)
        logits = model(_pad(q["image"], divisor, "replicate")[None].to(device), name, precision)
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

    Registrations (the atlas prior of real suites) run on one ITK thread
    (:func:`~medmeta_plugin.registration.deterministic_registration`), so a run repeats exactly.

    Returns:
        ``{"suite", "device", "config", "records": [{"method", "task", "kind", "shots", "seed", "metric",
        "value", "adapt_seconds", "peak_mem_mb"}]}``.

    Raises:
        ValueError: for an unknown suite or method, or a missing backbone file (and, when the config is
            built, for an unknown ``voxel_sample``).
    """
    unknown = [m for m in config.methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; valid methods: {list(METHODS)}.")
    with deterministic_registration():
        return _run(config, torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu")))


def _run(config: BenchmarkConfig, device: torch.device) -> dict[str, Any]:
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
    heads = {m: ("linear",) if m in ("scratch", *_PRIOR_METHODS) else config.heads for m in config.methods}
    jobs = [
        (t, k, s, m, h)
        for t in tasks
        for k in config.shots
        for s in range(config.seeds)
        for m in config.methods
        if m not in _PRIOR_METHODS or _has_geometry(t)
        for h in (heads[m] if t.kind == "segmentation" else ("linear",))
    ]
    fused = {"off": (False,), "on": (True,), "both": (False, True)}[config.atlas]
    pipelines = _Pipelines(config)
    unsure = 0  # served answers given by the network alone where a prior was asked for: none placed sure
    metric_of = {"segmentation": "dice", "classification": "accuracy", "regression": "mae_ml"}

    for task, shots, seed, method, head in tqdm(jobs, desc=f"benchmark {config.suite}"):
        drawn = task.draw_support(shots, seed)
        label = f"{method}@{head}" if len(heads[method]) > 1 else method
        record = {"task": task.name, "kind": task.kind, "shots": shots, "seed": seed, "metric": "dice"}
        if _served(method, task):  # the app's own pipeline answers
            prior_method = method in _PRIOR_METHODS
            family = "meta" if prior_method else method.partition("+")[0]
            variants = ((True, False),) if prior_method else ((False, False),)
            if not prior_method and _has_geometry(task):
                variants = tuple((f, f) for f in fused)  # fused: carried masks refined by the head
            served_head = DEFAULT_SEGMENTATION_HEAD if prior_method else head  # the app's default head
            for prior, refine in variants:
                pipeline = pipelines.get(family, served_head, prior, refine, method == "incontext")
                answers = pipeline.answer(task.name, drawn, task.query)
                if prior:
                    unsure += sum(a.provenance.found_by == "network" for a in answers)
                scores = [
                    task_score("segmentation", _mask_logits(a.mask), q["label"][None])
                    for a, q in zip(answers, task.query)
                ]
                suffix = "+atlas" if refine else ""
                records.append(
                    {
                        "method": label + suffix,
                        **record,
                        "value": float(np.mean(scores)),
                        "adapt_seconds": float(np.mean([a.seconds for a in answers])),
                        "peak_mem_mb": _peak_mem_mb(device),
                    }
                )
            continue
        support = _prepare_support(drawn, divisor)
        family, _, mode = method.partition("+")
        if method == "scratch":
            torch.manual_seed(seed)
            model = MetaModel(Backbone3D(scratch_config).to(device))
            budget = AdaptBudget(
                steps=config.steps, head_init=False, early_stopping=False, precision=config.precision
            )
            mode = "full"
        else:
            model = MetaModel(backbones[family])
            if mode == "head":  # volume-level tasks: the app's head-mode budget
                budget = head_mode_budget(config.head_steps, precision=config.precision)
            else:
                budget = AdaptBudget(steps=config.steps, early_stopping=False, precision=config.precision)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        num_outputs = task.num_outputs if task.kind == "classification" else None
        adapter, report = adapt(
            model,
            support,
            task.kind,
            mode,
            budget,
            name="bench",
            num_outputs=num_outputs,
            seed=seed,
            head=head,
        )
        model.attach(adapter)
        records.append(
            {
                "method": label,
                **record,
                "metric": metric_of[task.kind],
                "value": _score(model, task, "bench", divisor, config.precision),
                "adapt_seconds": report.seconds,
                "peak_mem_mb": _peak_mem_mb(device),
            }
        )
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"cpu: {platform.machine()}, {torch.get_num_threads()} threads"
    config_dict = {**config.__dict__}
    return {
        "suite": config.suite,
        "device": name,
        "config": config_dict,
        "records": records,
        "unsure_placements": unsure,
    }


class _Pipelines:
    """The app's pipeline, one :class:`~medmeta_plugin.benchmarks.served.ServedPipeline` per setting a run
    needs (backbone family, head, atlas prior, refine, in-context refiner), each with the run's registration
    and precision; all of them use the first one's scan files and registrations (one per pair of scans)."""

    def __init__(self, config: BenchmarkConfig) -> None:
        self.config = config
        self.backbones = {"meta": config.meta_backbone, "multitask": config.multitask_backbone}
        self.made: dict[tuple[str, str, bool, bool, bool], ServedPipeline] = {}

    def get(
        self, family: str, head: str, prior: bool, refine: bool, incontext: bool = False
    ) -> ServedPipeline:
        key = (family, head, prior, refine, incontext)
        if key not in self.made:
            c = self.config
            conf = {
                "backbone": self.backbones[family],
                "head": head,
                "atlas": str(prior).lower(),
                "refine": str(refine).lower(),
                "incontext": str(incontext).lower(),
                "registration": c.registration,
                "precision": c.precision,
                "adapt_steps": str(c.head_steps),
            }
            first = next(iter(self.made.values()), None)
            self.made[key] = ServedPipeline(conf=conf, share=first)
        return self.made[key]


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
