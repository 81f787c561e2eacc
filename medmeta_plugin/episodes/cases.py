"""What a labelled dataset is made of: cases (one scan each) and declarations of volume-level targets."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from medmeta_plugin.io import read_image, read_label
from medmeta_plugin.names import validate_name
from medmeta_plugin.networks.heads import TASK_KINDS

__all__ = ["VOLUME_KINDS", "Case", "CaseLoader", "TargetSpec", "TaskKind", "check_option", "load_case"]

TaskKind = Literal["segmentation", "classification", "regression"]

#: Kinds of volume-level tasks, declared in ``tasks.json``; segmentation tasks come from ``labels.json``.
VOLUME_KINDS: tuple[str, ...] = tuple(k for k in TASK_KINDS if k != "segmentation")

#: Returns a case's ``(image (C, X, Y, Z) float32, label (1, X, Y, Z) int or None)`` without any file.
CaseLoader = Callable[[], tuple[np.ndarray, "np.ndarray | None"]]


def check_option(value: object, options: Iterable[str], what: str) -> str:
    """Return ``value`` if it is one of ``options``.

    Raises:
        ValueError: naming ``what`` and the value, with the closest options and the sorted list of valid ones.
    """
    options = sorted(options)
    if value in options:
        return value
    close = difflib.get_close_matches(str(value), options, n=2)
    hint = f" Did you mean {' or '.join(map(repr, close))}?" if close else ""
    raise ValueError(f"unknown {what} {value!r}.{hint} Valid: {', '.join(options)}.")


@dataclass(frozen=True)
class TargetSpec:
    """Declaration of a volume-level task (one target value per scan).

    Attributes:
        name: task name; also the key of the target in each case's ``targets``.
        kind: ``"classification"`` or ``"regression"``.
        class_names: the classes of a classification task, in index order (at least two); empty otherwise.
    """

    name: str
    kind: TaskKind
    class_names: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        validate_name(self.name, "task name")
        if self.kind not in VOLUME_KINDS:
            raise ValueError(
                f"task {self.name!r}: kind must be one of {list(VOLUME_KINDS)}, got {self.kind!r}."
            )
        if self.kind == "classification":
            if len(self.class_names) < 2 or len(set(self.class_names)) != len(self.class_names):
                raise ValueError(
                    f"task {self.name!r}: a classification task needs at least two distinct class names, "
                    f"got {list(self.class_names)}."
                )
        elif self.class_names:
            raise ValueError(
                f"task {self.name!r}: a regression task takes no class names, got {self.class_names}."
            )

    def check_target(self, value: object, where: str) -> int | float:
        """Validate one case's target and return it as a class index or a float.

        Args:
            value: the raw target: a class index or class name (classification) or a number (regression).
            where: the file or entry the value came from, named in errors.

        Returns:
            The class index (``int``) or the regression value (``float``).

        Raises:
            ValueError: if the value has the wrong type, names an unknown class, is out of range or infinite.
        """
        if self.kind == "classification":
            if isinstance(value, str):
                if value not in self.class_names:
                    raise ValueError(
                        f"{where}: target {self.name!r} is {value!r}, not one of its classes "
                        f"{list(self.class_names)}."
                    )
                return self.class_names.index(value)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(
                    f"{where}: target {self.name!r} must be a class index or class name, got {value!r}."
                )
            if not 0 <= value < len(self.class_names):
                raise ValueError(
                    f"{where}: target {self.name!r} class index {value} is out of range "
                    f"[0, {len(self.class_names) - 1}] for classes {list(self.class_names)}."
                )
            return value
        if isinstance(value, bool) or not isinstance(value, int | float) or not np.isfinite(value):
            raise ValueError(f"{where}: target {self.name!r} must be a finite number, got {value!r}.")
        return float(value)


@dataclass(frozen=True)
class Case:
    """One scan: where its image (and label map) come from, which structures it holds, its volume targets.

    A case is either on disk (``image_path``, optional ``label_path``) or in memory (``loader``), never both.

    Attributes:
        case_id: identifier, unique within its dataset.
        dataset: name of the dataset the case belongs to; ``uid`` joins the two.
        image_path: image file or DICOM series folder, read by :func:`medmeta_plugin.io.read_image`.
        label_path: integer label map, read by :func:`medmeta_plugin.io.read_label`; ``None`` if the case only
            has volume-level targets.
        structures: label value -> structure name, for the structures the label map holds (0 is background).
        targets: volume-level task name -> class index (classification) or value (regression).
        loader: for in-memory cases (synthetic phantoms), a picklable callable returning
            ``(image (C, X, Y, Z) float32, label (1, X, Y, Z) int or None)``. Not part of equality.
    """

    case_id: str
    dataset: str
    image_path: Path | None = None
    label_path: Path | None = None
    structures: Mapping[int, str] = field(default_factory=dict, hash=False)
    targets: Mapping[str, int | float] = field(default_factory=dict, hash=False)
    loader: CaseLoader | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        validate_name(self.case_id, "case id")
        validate_name(self.dataset, "dataset name")
        if (self.image_path is None) == (self.loader is None):
            raise ValueError(
                f"case {self.uid!r}: give exactly one of image_path and loader, got "
                f"image_path={self.image_path!r}, loader={self.loader!r}."
            )
        if self.structures and self.label_path is None and self.loader is None:
            raise ValueError(f"case {self.uid!r}: has structures {dict(self.structures)} but no label_path.")
        for value, name in self.structures.items():
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"case {self.uid!r}: label values must be positive integers, got {value!r}.")
            validate_name(name, "structure name")
        names = list(self.structures.values())
        if len(set(names)) != len(names):
            raise ValueError(
                f"case {self.uid!r}: a structure name is used by two label values: {dict(self.structures)}."
            )

    @property
    def uid(self) -> str:
        """``"<dataset>:<case_id>"``, unique across merged datasets."""
        return f"{self.dataset}:{self.case_id}"


def load_case(case: Case) -> tuple[np.ndarray, np.ndarray | None]:
    """Load a case's arrays, from its files or its in-memory loader.

    Files are read by :func:`medmeta_plugin.io.read_image` / :func:`~medmeta_plugin.io.read_label` on their
    own voxel grid (nothing is resampled); the label's geometry is checked against the image's.

    Args:
        case: the case.

    Returns:
        ``(image, label)``: image of shape (C, X, Y, Z), float32; label of shape (1, X, Y, Z), integer, or
        ``None`` for a case without a label map.

    Raises:
        ValueError: if a file cannot be read, the label's geometry differs from the image's, or a loader
            returns arrays of the wrong shape.
    """
    if case.loader is not None:
        image, label = case.loader()
    else:
        image, meta = read_image(case.image_path)
        label = read_label(case.label_path, meta)[0] if case.label_path is not None else None
    image = np.asarray(image, dtype=np.float32)
    if image.ndim != 4:
        raise ValueError(f"case {case.uid!r}: image must have shape (C, X, Y, Z), got {image.shape}.")
    if label is not None and (label.ndim != 4 or label.shape[0] != 1 or label.shape[1:] != image.shape[1:]):
        raise ValueError(
            f"case {case.uid!r}: label must have shape (1, {', '.join(map(str, image.shape[1:]))}) like the "
            f"image, got {label.shape}."
        )
    return image, label
