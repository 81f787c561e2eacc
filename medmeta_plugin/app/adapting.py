"""Adapting a task in the app: its labelled examples, read onto one working shape, fitted and then served.

:func:`adapt_task` checks the examples, prepares them as support cases (:func:`support_cases`: on the
working grid, the backbone features of a scan the user has just looked at reused from the feature cache),
fits the task's adapter with :func:`medmeta_plugin.adapt.adapt` and hands it to
:meth:`~medmeta_plugin.app.serving.Serving.serve`, which saves it as a new store version and swaps it in.

:class:`Example` lives here, not in the datastore that builds them: the datastore imports it, and this
module imports nothing of the datastore.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from medmeta_plugin.adapt import AdaptReport, adapt, head_mode_budget
from medmeta_plugin.app.grid import label_to_working
from medmeta_plugin.app.serving import Serving
from medmeta_plugin.names import validate_name
from medmeta_plugin.networks import BackboneOutput

__all__ = ["Example", "adapt_task", "examples_fingerprint", "support_cases"]


@dataclass(frozen=True)
class Example:
    """One labelled scan of a task, as adaptation consumes it.

    Attributes:
        image: image file or DICOM series folder.
        label: label map file (segmentation), else None.
        value: the structure's value in ``label`` (segmentation); a label naming the structure with no voxel
            of it is an explicit "absent here" example, a negative.
        target: class index (classification) or value (regression), else None.
    """

    image: str
    label: str | None = None
    value: int | None = None
    target: float | None = None


def examples_fingerprint(examples: Sequence[Example]) -> list[str]:
    """What an adapter was fitted on, as stored with it: image, label file version, value or target.

    After a restart, a structure whose stored fingerprint differs from its current labels (a label arrived,
    or was replaced, while the server was down or while it died mid-adaptation) is adapted again.
    """
    out = []
    for ex in examples:
        stamp = ""
        if ex.label is not None and os.path.exists(ex.label):
            stat = os.stat(ex.label)
            stamp = f"{stat.st_mtime_ns}:{stat.st_size}"
        out.append(f"{os.path.basename(ex.image)}|{stamp}|{ex.value}|{ex.target}")
    return out


def support_cases(
    serving: Serving, kind: str, examples: Sequence[Example]
) -> tuple[list[dict[str, Any]], BackboneOutput | None]:
    """Support cases on one padded working shape, and their cached features when shapes already agree.

    Args:
        serving: the backbone being served (its cached working grids and features are read).
        kind: ``segmentation``, ``classification`` or ``regression``.
        examples: the labelled scans.

    Returns:
        The cases, ``{"image": (C, X, Y, Z), "label": (1, X, Y, Z)}`` (segmentation) or ``{"image",
        "target"}`` each, padded to a common shape, and the scans' backbone output stacked along the batch
        when their working shapes already agree (None when they had to be padded).

    Raises:
        ValueError: for an unreadable scan or an example without its label file and value (segmentation)
            or its target (classification, regression).
    """
    volumes, items = [], []
    for ex in examples:
        volume, base = serving.working(ex.image)
        volumes.append((volume, base))
        if kind == "segmentation":
            if ex.label is None or ex.value is None:
                raise ValueError(f"segmentation example of {ex.image} has no label file or value.")
            mask = label_to_working(ex.label, volume, serving.divisor) == ex.value
            label = torch.as_tensor(mask[None].astype(np.float32))
            items.append({"image": volume.image[0], "label": label})
        else:
            if ex.target is None:
                raise ValueError(f"{kind} example of {ex.image} has no target.")
            items.append({"image": volume.image[0], "target": ex.target})
    shapes = {tuple(it["image"].shape[1:]) for it in items}
    if len(shapes) == 1:
        return items, BackboneOutput.cat([b for _, b in volumes])
    target = tuple(max(s[i] for s in shapes) for i in range(3))
    for it in items:
        pad = [p for s, t in zip(reversed(it["image"].shape[1:]), reversed(target)) for p in (0, t - s)]
        it["image"] = torch.nn.functional.pad(it["image"][None], pad, mode="replicate")[0]
        if "label" in it:
            it["label"] = torch.nn.functional.pad(it["label"], pad)
    return items, None


def adapt_task(
    serving: Serving, name: str, kind: str, examples: Sequence[Example], num_outputs: int | None = None
) -> tuple[AdaptReport, int]:
    """Adapt a task's adapter from its labelled examples, save it as a new version, then serve it.

    Args:
        serving: the backbone and adapters being served; ``serving.config`` holds the adaptation settings.
        name: task (structure) name.
        kind: ``segmentation``, ``classification`` or ``regression``.
        examples: the task's labelled scans; the most recent ``config.max_shots`` are used.
        num_outputs: number of classes (classification).

    Returns:
        The adaptation report and the new store version.

    Raises:
        ValueError: for an invalid name or examples; the adapter being served is left as it was.
    """
    config = serving.config
    validate_name(name, "task name")
    if not examples:
        raise ValueError(f"task {name!r} has no labelled example to adapt from.")
    examples = list(examples)[-config.max_shots :]
    support, base = support_cases(serving, kind, examples)
    budget = head_mode_budget(config.adapt_steps, precision=config.precision)
    model = serving.model
    adapter, report = adapt(
        model,
        support,
        kind,
        config.mode,
        budget,
        name=name,
        num_outputs=num_outputs,
        features=base,
        head=config.head,
    )
    extra: dict[str, Any] = {"report": report.to_dict(), "examples": examples_fingerprint(examples)}
    if kind == "segmentation":  # where the structure lies on its scans: the atlas prior at inference
        extra["atlas"] = [{"image": ex.image, "label": ex.label, "value": ex.value} for ex in examples]
    version = serving.serve(name, adapter, model, shots=len(examples), extra=extra)
    return report, version
