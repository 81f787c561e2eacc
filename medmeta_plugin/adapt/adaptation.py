"""Few-shot adaptation: fit one task's adapter and head on k labelled support cases.

``adapt(model, support, kind, mode, budget)`` builds a fresh adapter, initialises its head in closed form
from the support features (:mod:`medmeta_plugin.adapt.head_init`), then takes gradient steps on the
adapter and head only. The backbone is never modified: gradients are taken with ``torch.autograd.grad``
with respect to the fast parameters alone, so not even the backbone's ``.grad`` fields are touched.

- ``head`` mode computes the support features once and caches them: each step costs only the head.
- With k >= 2 cases the number of steps is chosen by leave-one-out over the support set (fit on k-1,
  score the held-out case, every ``eval_every`` steps, step 0 included; at most ``loo_folds`` held-out
  cases); with k = 1 the budget is fixed.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch
from monai.utils import look_up_option

from medmeta_plugin.adapt.head_init import init_head
from medmeta_plugin.networks.adapters import ADAPTER_CLASSES, ADAPTER_MODES, FullAdapter
from medmeta_plugin.networks.backbone import BackboneOutput
from medmeta_plugin.networks.heads import SEGMENTATION_HEADS, TASK_KINDS
from medmeta_plugin.networks.model import MetaModel, TaskAdapter, TaskInfo
from medmeta_plugin.networks.objectives import task_loss, task_score
from medmeta_plugin.networks.position import body_position
from medmeta_plugin.networks.precision import PRECISIONS, autocast

__all__ = [
    "HEAD_MODE_LOO_FOLDS",
    "HEAD_MODE_STEPS",
    "HEAD_VOXELS",
    "VOXEL_SAMPLES",
    "AdaptBudget",
    "AdaptReport",
    "adapt",
    "adapt_batch",
    "first_order_head",
    "head_mode_budget",
    "stack_support",
]

# A segmentation head is a 1x1x1 convolution, a per-voxel linear model with C + 1 parameters: 32k voxels
# per case is thousands of samples per parameter, while a 64^3 crop has 262k voxels and a whole abdominal
# CT 1.4M. Head-mode steps fit on the sample; scores always use whole volumes.
HEAD_VOXELS = 32768

# How head-mode segmentation draws its HEAD_VOXELS voxels per case:
# - "uniform": uniformly; keeps the foreground fraction, but a kidney is 0.4% of a whole CT, ~120 voxels;
# - "stratified": every foreground voxel (at most half the sample) plus uniform background, each voxel
#   weighted by its stratum's population over sample count, so the loss estimates the whole-volume loss;
# - "balanced": the same voxels unweighted: foreground and background count about equally.
# "balanced" is the default by measurement: the best of the three on synthetic-heldout at 1, 3 and 5 shots
# (docs/benchmarks/voxel-sample.md).
VOXEL_SAMPLES = ("uniform", "stratified", "balanced")


# Head-mode steps of the product (app, benchmarks): the position head's MLP needs ~200 steps to learn where a
# structure is (docs/benchmarks/position-head.md); each costs a head pass over the voxel sample only.
HEAD_MODE_STEPS = 200


@dataclass(frozen=True)
class AdaptBudget:
    """How much work adaptation may do.

    Attributes:
        steps: gradient steps with k = 1, and the most that leave-one-out may choose with k >= 2.
        lr: Adam learning rate of the fast parameters.
        eval_every: leave-one-out evaluates the held-out case every this many steps, and after the last.
        head_init: initialise the head in closed form from the support features (else at random).
        early_stopping: choose the step count by leave-one-out when k >= 2.
        voxel_sample: how head-mode segmentation samples voxels, one of :data:`VOXEL_SAMPLES`.
        prior_shift: after fitting on a ``balanced`` sample, shift the head's bias back to the support
            volumes' foreground fraction (see ``_Fitter.prior_shift``).
        step_voxels: head-mode segmentation steps each use this many voxels per case, drawn afresh from
            the voxel sample (stochastic steps: the position head's MLP costs ~4x less per step than on the
            whole sample, and 200 steps still see all of it); 0 uses the whole sample every step.
        precision: numeric precision of backbone passes, one of
            :data:`~medmeta_plugin.networks.precision.PRECISIONS` (heads always fit in float32).
        loo_folds: leave-one-out holds out at most this many cases, evenly spaced over the support set
            (None: every case), so that its cost stops growing with k: each fold is a whole fit.
    """

    steps: int = 30
    lr: float = 1e-2
    eval_every: int = 5
    head_init: bool = True
    early_stopping: bool = True
    voxel_sample: str = "balanced"
    prior_shift: bool = True
    step_voxels: int = 8192
    precision: str = "fp32"
    loo_folds: int | None = None

    def __post_init__(self) -> None:
        if self.steps < 0:
            raise ValueError(f"steps must be >= 0, got {self.steps}.")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}.")
        if self.eval_every < 1:
            raise ValueError(f"eval_every must be >= 1, got {self.eval_every}.")
        look_up_option(self.voxel_sample, VOXEL_SAMPLES)
        if self.step_voxels < 0:
            raise ValueError(f"step_voxels must be >= 0, got {self.step_voxels}.")
        look_up_option(self.precision, PRECISIONS)
        if self.loo_folds is not None and self.loo_folds < 1:
            raise ValueError(f"loo_folds must be >= 1 or None, got {self.loo_folds}.")


# Leave-one-out folds of the product's head mode: each fold is a whole fit, so holding out every case made 5
# shots cost 6 fits and the app's 8 cost 9. On the held-out phantom families 3 held-out cases chose step
# counts about as well as 5, in much less time (docs/benchmarks/loo-folds.md).
HEAD_MODE_LOO_FOLDS = 3


def head_mode_budget(steps: int = HEAD_MODE_STEPS, **kwargs: Any) -> AdaptBudget:
    """The budget the app and the benchmarks give head mode: ``steps`` with ~10 leave-one-out checkpoints,
    over at most :data:`HEAD_MODE_LOO_FOLDS` held-out cases.

    Args:
        steps: step budget (leave-one-out may choose fewer).
        **kwargs: further :class:`AdaptBudget` fields (they override these).
    """
    options: dict[str, Any] = {"eval_every": max(5, steps // 10), "loo_folds": HEAD_MODE_LOO_FOLDS}
    return AdaptBudget(steps=steps, **{**options, **kwargs})


@dataclass
class AdaptReport:
    """What adaptation did.

    Attributes:
        task: task name; kind and mode as given.
        shots: number of support cases k.
        steps: gradient steps of the final fit.
        seconds: wall time of the whole call, leave-one-out included.
        final_support_loss: loss on all support cases after the final fit.
        loo_score: mean held-out score at the chosen step count (k >= 2 with early stopping), else None.
        loo_curve: ``[steps, mean held-out score]`` pairs that leave-one-out evaluated.
        device: where it ran.
    """

    task: str
    kind: str
    mode: str
    shots: int
    steps: int
    seconds: float
    final_support_loss: float
    loo_score: float | None = None
    loo_curve: list[list[float]] = field(default_factory=list)
    device: str = "cpu"

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form."""
        return asdict(self)


def stack_support(
    support: Sequence[Mapping[str, Any]], kind: str, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack support cases into a batch.

    Args:
        support: cases with ``"image"`` (C, X, Y, Z) and ``"label"`` (1, X, Y, Z) for segmentation or
            ``"target"`` (class index, value, or values) for classification and regression.
        kind: task kind.
        device: target device.

    Returns:
        ``images`` (k, C, X, Y, Z) float32 and ``targets``: masks (k, 1, X, Y, Z), class indices (k,)
        or values (k, V).

    Raises:
        ValueError: if ``support`` is empty, a case lacks its key, or the image shapes differ.
    """
    if len(support) == 0:
        raise ValueError("support is empty: adaptation needs at least one labelled case.")
    key = "label" if kind == "segmentation" else "target"
    images, targets = [], []
    for i, case in enumerate(support):
        if "image" not in case or key not in case:
            raise ValueError(
                f"support case {i} needs keys 'image' and {key!r} for {kind}; has {sorted(case)}."
            )
        image = torch.as_tensor(
            np.asarray(case["image"]) if not torch.is_tensor(case["image"]) else case["image"]
        )
        if image.ndim != 4:
            raise ValueError(f"support case {i}: image must be (C, X, Y, Z), got shape {tuple(image.shape)}.")
        target = torch.as_tensor(case[key])
        if kind == "segmentation" and target.shape[-3:] != image.shape[-3:]:
            raise ValueError(
                f"support case {i}: label shape {tuple(target.shape)} does not match image "
                f"{tuple(image.shape)}."
            )
        images.append(image.float())
        targets.append(target)
    shapes = {tuple(im.shape) for im in images}
    if len(shapes) > 1:
        raise ValueError(
            f"support images must share one shape (crop or pad them first), got {sorted(shapes)}."
        )
    stacked = torch.stack(images).to(device)
    if kind == "segmentation":
        return stacked, torch.stack([t.float().view(1, *t.shape[-3:]) for t in targets]).to(device)
    if kind == "classification":
        return stacked, torch.stack([t.long().view(()) for t in targets]).to(device)
    return stacked, torch.stack([t.float().view(-1) for t in targets]).to(device)


def _voxel_sample(masks: torch.Tensor, n: int, how: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``n`` voxel indices per case and their loss weights (see :data:`VOXEL_SAMPLES`).

    Args:
        masks: binary masks (k, 1, X, Y, Z) with at least ``n`` voxels each.
        n: voxels per case.
        how: one of :data:`VOXEL_SAMPLES`.

    Returns:
        ``index`` (k, n) into the flattened volumes and ``weight`` (k, 1, n, 1, 1), or None for equal weights.
    """
    flat = masks.reshape(masks.shape[0], -1) > 0.5
    if how == "uniform":  # the same voxels in every case
        return torch.randperm(flat.shape[1], device=flat.device)[:n].expand(len(flat), n), None
    index, weight = [], []
    for case in flat:
        fg, bg = torch.nonzero(case).view(-1), torch.nonzero(~case).view(-1)
        n_bg = min(len(bg), n - min(len(fg), n // 2))  # background fills what the foreground leaves
        n_fg = n - n_bg  # <= len(fg), as the volume has more than n voxels
        pick_fg = fg[torch.randperm(len(fg), device=fg.device)[:n_fg]]
        pick_bg = bg[torch.randperm(len(bg), device=bg.device)[:n_bg]]
        index.append(torch.cat([pick_fg, pick_bg]))
        weight.append(
            torch.cat(
                [
                    case.new_full((n_fg,), len(fg) / max(n_fg, 1), dtype=torch.float32),
                    case.new_full((n_bg,), len(bg) / max(n_bg, 1), dtype=torch.float32),
                ]
            )
        )
    weights = torch.stack(weight).view(len(flat), 1, n, 1, 1) if how == "stratified" else None
    return torch.stack(index), weights


class _VoxelSample(NamedTuple):
    """Head-mode voxels of some support cases, channel-last so that a step's subset is one
    ``index_select`` of whole rows: ``features`` (k, n, C), ``position`` (k, n, P) or None, ``masks``
    (k, n, 1) and loss ``weight`` (k, n, 1) or None."""

    features: torch.Tensor
    position: torch.Tensor | None
    masks: torch.Tensor
    weight: torch.Tensor | None


class _Fitter:
    """Fits fresh task adapters on subsets of one support batch, sharing the cached base features."""

    def __init__(
        self,
        model: MetaModel,
        info: TaskInfo,
        images: torch.Tensor,
        targets: torch.Tensor,
        budget: AdaptBudget,
        base: BackboneOutput | None = None,
    ):
        self.model, self.info, self.images, self.targets, self.budget = model, info, images, targets, budget
        self.autocast = functools.partial(autocast, budget.precision, images.device)
        # film and lora leave the encoder alone: it runs once here, not at every step (~20% of a step).
        self.encoded: list[torch.Tensor] | None = None
        if info.mode != "head" and not ADAPTER_CLASSES[info.mode].adapts_encoder:
            with torch.no_grad(), self.autocast():
                self.encoded = model.backbone.encode(images)
        if base is None:
            with torch.no_grad(), self.autocast():
                # identity-adapter features: head init and head-mode cache
                base = model.backbone(images, encoded=self.encoded).float()
        if info.mode == "head" and info.kind != "segmentation":
            # Volume-level heads read only the pooled embedding: keep no voxel features, which every step's
            # take() of a leave-one-out fold would otherwise copy whole.
            base = BackboneOutput(base.features.new_zeros(len(images), 0, 1, 1, 1), base.embedding)
        elif base.position is None:
            base = base._replace(position=body_position(images))
        self.base = base.channel_last()  # no copy where the caller's cache keeps them so (the app's does)
        self.sample: _VoxelSample | None = None
        n_vox = images[0, 0].numel()
        # Steps fit a voxel sample wherever a step's subset is smaller than the volume: at most HEAD_VOXELS
        # per case (all voxels of a smaller one, e.g. a meta-training patch, which then costs a quarter).
        sampled = n_vox > (budget.step_voxels or HEAD_VOXELS)
        if info.mode == "head" and info.kind == "segmentation" and sampled:
            index, weight = _voxel_sample(targets, min(HEAD_VOXELS, n_vox), budget.voxel_sample)

            def rows(volumes: torch.Tensor) -> torch.Tensor:  # (k, C, X, Y, Z) -> (k, n, C), contiguous
                k, c = volumes.shape[:2]
                flat = volumes.movedim(1, -1).reshape(k, -1, c)  # a view of channel-last memory
                return torch.gather(flat, 1, index[:, :, None].expand(k, -1, c))

            position = self.base.position
            self.sample = _VoxelSample(
                features=rows(self.base.features),
                position=None if position is None else rows(position),
                masks=rows(targets),
                weight=None if weight is None else weight.reshape(len(targets), -1, 1),
            )

    def new_task(self, idx: list[int]) -> TaskAdapter:
        task = TaskAdapter(self.info, self.model.backbone).to(self.images.device)
        if self.budget.head_init:
            with torch.no_grad():
                base = self.base.take(idx)
                head = init_head(self.info.kind, base, self.targets[idx], self.info.num_outputs)
                layer = task.head.conv if self.info.kind == "segmentation" else task.head.linear
                layer.weight.copy_(head["weight"])
                layer.bias.copy_(head["bias"])
        return task

    def voxel_sample(self, idx: list[int]) -> _VoxelSample | None:
        """The head-mode voxel sample of cases ``idx``, selected once per fit (None outside head mode)."""
        if self.sample is None:
            return None
        position, weight = self.sample.position, self.sample.weight
        return _VoxelSample(
            features=self.sample.features[idx],
            position=None if position is None else position[idx],
            masks=self.sample.masks[idx],
            weight=None if weight is None else weight[idx],
        )

    def training_loss(self, task: TaskAdapter, idx: list[int], sample: _VoxelSample | None) -> torch.Tensor:
        """Loss of a fitting step: on ``sample`` (:meth:`voxel_sample` of ``idx``) where there is one."""
        if sample is None:
            return task_loss(self.info.kind, self.forward(task, idx), self.targets[idx])
        n = sample.masks.shape[1]
        pick = None
        if 0 < self.budget.step_voxels < n:  # a fresh subset of the sample, the same for every case
            pick = torch.randint(n, (self.budget.step_voxels,), device=sample.masks.device)

        def voxels(x: torch.Tensor | None) -> torch.Tensor | None:  # (k, n, C) -> (k, C, n', 1, 1), a view
            if x is None:
                return None
            picked = x if pick is None else x.index_select(1, pick)
            return picked.movedim(-1, 1)[..., None, None]

        out = BackboneOutput(voxels(sample.features), self.base.embedding[idx], voxels(sample.position))
        return task_loss(self.info.kind, task.head(out), voxels(sample.masks), voxels(sample.weight))

    def prior_shift(self, idx: list[int]) -> float:
        """Logit shift from the ``balanced`` voxel sample's foreground fraction to that of the volumes.

        A head fitted on a sample that is half foreground learns a prior of one half; a structure that is
        0.3% of the scan then spreads over everything that looks a little like it. Adding
        ``logit(whole-volume fraction) - logit(sample fraction)`` to the logits restores the volumes' prior
        (the logit adjustment for a known change of class prior, Saerens et al. 2002).
        """
        if self.sample is None or self.budget.voxel_sample != "balanced" or not self.budget.prior_shift:
            return 0.0
        whole = float(self.targets[idx].mean())
        sampled = float(self.sample.masks[idx].mean())
        if not (0.0 < whole < 1.0 and 0.0 < sampled < 1.0):
            return 0.0
        return math.log(whole / (1 - whole)) - math.log(sampled / (1 - sampled))

    def forward(self, task: TaskAdapter, idx: list[int]) -> torch.Tensor:
        """Output of ``task`` on the whole support cases ``idx``."""
        if self.info.mode == "head":
            return task.head(self.base.take(idx))
        backbone = task.adapter.backbone if isinstance(task.adapter, FullAdapter) else self.model.backbone
        encoded = None if self.encoded is None else [e[idx] for e in self.encoded]
        with self.autocast():
            out = backbone(self.images[idx], adapter=task.adapter, encoded=encoded)
        return task.head(out.float()._replace(position=self.base.position[idx]))

    def fit(
        self, task: TaskAdapter, idx: list[int], steps: int, held_out: list[int] | None = None
    ) -> tuple[float, list[float]]:
        """Take ``steps`` Adam steps on ``task``; score ``held_out`` every ``eval_every`` steps."""
        params = [p for p in task.parameters() if p.requires_grad]
        checkpoints = set(_checkpoints(steps, self.budget.eval_every))
        optimizer = torch.optim.Adam(params, lr=self.budget.lr)
        shift = self.prior_shift(idx)
        scores: list[float] = []
        loss = torch.zeros(())
        sample = self.voxel_sample(idx)
        for step in range(steps + 1):
            if held_out is not None and step in checkpoints:
                with torch.no_grad():
                    out = self.forward(task, held_out) + shift
                scores.append(task_score(self.info.kind, out, self.targets[held_out]))
            if step == steps:
                break
            loss = self.training_loss(task, idx, sample)
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            for p, g in zip(params, grads):
                p.grad = g
            optimizer.step()
        with torch.no_grad():
            if shift:
                task.head.conv.bias += shift
            final = float(task_loss(self.info.kind, self.forward(task, idx), self.targets[idx]))
        return final, scores


def _checkpoints(steps: int, every: int) -> list[int]:
    """The step counts leave-one-out scores: every ``every`` steps from 0, and the whole budget."""
    return sorted({*range(0, steps + 1, every), steps})


def _held_out_cases(k: int, folds: int | None) -> list[int]:
    """The cases leave-one-out holds out: all k, or ``folds`` of them evenly spaced (first and last kept)."""
    if folds is None or folds >= k:
        return list(range(k))
    return sorted({int(round(i)) for i in np.linspace(0, k - 1, folds)})


def adapt(
    model: MetaModel,
    support: Sequence[Mapping[str, Any]],
    kind: str,
    mode: str = "head",
    budget: AdaptBudget | None = None,
    *,
    name: str = "adapted",
    num_outputs: int | None = None,
    seed: int = 0,
    features: BackboneOutput | None = None,
    head: str = "linear",
) -> tuple[TaskAdapter, AdaptReport]:
    """Adapt a fresh task adapter to ``support`` without modifying ``model``.

    Args:
        model: the model whose backbone is adapted to; it is not changed (attach the result with
            :meth:`MetaModel.attach`).
        support: k labelled cases, see :func:`stack_support`; spatial sizes must be multiples of
            ``model.backbone.size_divisor``.
        kind: ``segmentation``, ``classification`` or ``regression``.
        mode: adapter mode, one of ``head``, ``film``, ``lora``, ``full``.
        budget: step budget and learning rate (default :class:`AdaptBudget`).
        name: task name of the new adapter.
        num_outputs: classes (classification, required) or values (regression, default from the targets).
        seed: seeds the adapter's random initialisation; equal inputs and seed give equal adapters.
        features: the backbone's output on the stacked support images (features (k, C, X, Y, Z),
            embedding (k, E)), if already computed, e.g. once for several structures labelled on the same
            scans; computed here if None. The backbone has no batch statistics, so per-case outputs
            concatenated along the batch are the same thing. Positions are computed from the images when
            ``features.position`` is None.
        head: segmentation head kind, ``linear`` or ``position``
            (:data:`~medmeta_plugin.networks.heads.SEGMENTATION_HEADS`).

    Returns:
        The fitted :class:`TaskAdapter` and an :class:`AdaptReport`.

    Raises:
        ValueError: for an unknown kind or mode, invalid support cases, missing ``num_outputs``, or
            ``features`` that do not match the support images.
    """
    kind = look_up_option(kind, TASK_KINDS)
    mode = look_up_option(mode, ADAPTER_MODES)
    device = next(model.backbone.parameters()).device
    images, targets = stack_support(support, kind, device)
    if kind == "classification":
        if num_outputs is None:
            raise ValueError("classification adaptation needs num_outputs (the number of classes).")
        if int(targets.max()) >= num_outputs or int(targets.min()) < 0:
            raise ValueError(f"class targets {targets.tolist()} out of range for num_outputs={num_outputs}.")
    outputs = num_outputs if num_outputs is not None else (targets.shape[1] if kind == "regression" else 1)
    info = TaskInfo(name, kind, mode, int(outputs), head=look_up_option(head, SEGMENTATION_HEADS))
    return adapt_batch(model, images, targets, info, budget, features=features, seed=seed)


def adapt_batch(
    model: MetaModel,
    images: torch.Tensor,
    targets: torch.Tensor,
    info: TaskInfo,
    budget: AdaptBudget | None = None,
    *,
    features: BackboneOutput | None = None,
    seed: int = 0,
) -> tuple[TaskAdapter, AdaptReport]:
    """The adaptation itself, on stacked tensors: what :func:`adapt` runs for the app and the benchmarks,
    and what every meta-training algorithm runs as its inner loop.

    Args:
        model: the model whose backbone is adapted to; it is not changed.
        images: support images (k, C, X, Y, Z).
        targets: masks (k, 1, X, Y, Z), class indices (k,) or values (k, V) (see :func:`stack_support`).
        info: the new task (name, kind, mode, outputs, head).
        budget: see :func:`adapt`.
        features: see :func:`adapt`; detached here (adaptation never back-propagates into them: a caller
            that needs the meta-gradient takes it with :func:`first_order_head`).
        seed: see :func:`adapt`.

    Returns:
        The fitted :class:`TaskAdapter` (leaf parameters) and an :class:`AdaptReport`.

    Raises:
        ValueError: if ``features`` do not match ``images``.
    """
    start = time.perf_counter()
    budget = budget or AdaptBudget()
    device = images.device
    k = images.shape[0]
    if features is not None and (
        features.features.shape[0] != k or features.features.shape[2:] != images.shape[2:]
    ):
        raise ValueError(
            f"features of shape {tuple(features.features.shape)} do not belong to the support images "
            f"{tuple(images.shape)}: expected (k, C, X, Y, Z) with the same k and X, Y, Z."
        )
    images, targets = images.detach(), targets.detach()
    if features is not None:
        features = features.detach()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        fitter = _Fitter(model, info, images, targets, budget, features)
        steps, loo_score, curve = budget.steps, None, []
        if k >= 2 and budget.early_stopping and budget.steps > 0:
            fold_scores = []
            for i in _held_out_cases(k, budget.loo_folds):
                train = [j for j in range(k) if j != i]
                _, scores = fitter.fit(fitter.new_task(train), train, budget.steps, held_out=[i])
                fold_scores.append(scores)
            mean = np.mean(fold_scores, axis=0)
            grid = _checkpoints(budget.steps, budget.eval_every)
            best = int(np.argmax(mean))  # first maximum: the fewest steps among equals
            steps, loo_score = grid[best], float(mean[best])
            curve = [[float(s), float(v)] for s, v in zip(grid, mean)]
        task = fitter.new_task(list(range(k)))
        final_loss, _ = fitter.fit(task, list(range(k)), steps)
    report = AdaptReport(
        task=info.name,
        kind=info.kind,
        mode=info.mode,
        shots=k,
        steps=steps,
        seconds=time.perf_counter() - start,
        final_support_loss=final_loss,
        loo_score=loo_score,
        loo_curve=curve,
        device=str(device),
    )
    return task, report


def first_order_head(
    task: TaskAdapter, base: BackboneOutput, targets: torch.Tensor, budget: AdaptBudget | None = None
) -> dict[str, torch.Tensor]:
    """The fitted head's closed-form parameters as functions of ``base``, first order in the steps.

    Adaptation starts the head from :func:`~medmeta_plugin.adapt.head_init.init_head` of the support
    features and then takes steps. Written as ``init_head(base) + (fitted - init_head(base)).detach()``, the
    head has the fitted values and the exact gradient of its start with respect to the features: the
    first-order meta-gradient (each step's change a constant), which is how meta-training differentiates the
    query loss after :func:`adapt_batch` into the backbone.

    Args:
        task: the adapter :func:`adapt_batch` fitted on these support cases.
        base: the backbone's output on the support images, with its graph to the backbone (features
            (k, C, X, Y, Z), embedding (k, E)).
        targets: the support targets :func:`adapt_batch` was given.
        budget: the budget it ran with (whether the head started in closed form).

    Returns:
        Replacement tensors for ``task.head`` keyed by their names in it (``conv.weight`` ... or
        ``linear.weight`` ...); empty when the head did not start in closed form.
    """
    budget = budget or AdaptBudget()
    if not budget.head_init:
        return {}
    info = task.info
    layer_name = "conv" if info.kind == "segmentation" else "linear"
    layer = getattr(task.head, layer_name)
    start = init_head(info.kind, base, targets, info.num_outputs)
    return {
        f"{layer_name}.{key}": start[key] + (getattr(layer, key) - start[key]).detach()
        for key in ("weight", "bias")
    }
