"""Tasks made from labelled datasets, and the registry that holds them.

A segmentation task is one structure, named by the structure's name, so the same structure in two datasets
is one task with the cases of both (``kidney_left`` from a CT and an MR dataset). A classification or
regression task is a volume-level target declared in ``tasks.json`` (file formats:
:mod:`medmeta_plugin.episodes.sources`).
"""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from medmeta_plugin.episodes.cases import Case, TargetSpec, TaskKind, check_option, load_case
from medmeta_plugin.episodes.sources import read_datalist, read_folder
from medmeta_plugin.io import read_label
from medmeta_plugin.names import validate_name
from medmeta_plugin.networks.heads import TASK_KINDS

__all__ = ["TaskRegistry", "TaskSpec"]

# How many names an "unknown task" error lists before it stops; real registries hold hundreds of structures.
_MAX_LISTED = 25


@dataclass(frozen=True, repr=False)
class TaskSpec:
    """One task: its kind and the cases that have it.

    Attributes:
        name: task name (a structure name or a declared volume-level task).
        kind: ``"segmentation"``, ``"classification"`` or ``"regression"``.
        cases: the cases labelled for this task, each once.
        label_values: segmentation only: case uid -> the structure's label value in that case's label map
            (the same structure may have a different value in each dataset).
        class_names: classification only: the classes in index order.
    """

    name: str
    kind: TaskKind
    cases: tuple[Case, ...]
    label_values: Mapping[str, int] = field(default_factory=dict)
    class_names: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        validate_name(self.name, "task name")
        check_option(self.kind, TASK_KINDS, f"kind of task {self.name!r}:")
        uids = [c.uid for c in self.cases]
        if len(set(uids)) != len(uids):
            raise ValueError(
                f"task {self.name!r}: a case appears twice: {sorted(u for u in uids if uids.count(u) > 1)}."
            )
        if self.kind == "segmentation" and set(self.label_values) != set(uids):
            raise ValueError(
                f"task {self.name!r}: label_values must give a value for each case and no other."
            )

    def __repr__(self) -> str:
        return f"TaskSpec({self.name!r}, {self.kind}, {len(self.cases)} cases)"

    @property
    def num_classes(self) -> int:
        """Number of classes (classification), 1 otherwise (one output: a mask logit or a value)."""
        return len(self.class_names) if self.kind == "classification" else 1

    def target(self, case: Case) -> int | float:
        """The volume-level target of ``case`` (classification or regression tasks only)."""
        if self.kind == "segmentation":
            raise ValueError(f"task {self.name!r} is a segmentation task; it has label maps, not targets.")
        return case.targets[self.name]


def _structures_present(case: Case) -> dict[int, str]:
    """The case's structures whose label value occurs in its label map (reads the label, not the image)."""
    if case.loader is not None:
        _, label = load_case(case)
    else:
        label = read_label(case.label_path)[0] if case.label_path is not None else None
    present = set(np.unique(label).tolist()) if label is not None else set()
    return {v: n for v, n in case.structures.items() if v in present}


def _unknown(name: str, names: list[str], what: str) -> ValueError:
    close = difflib.get_close_matches(name, names, n=3)
    hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
    listed = ", ".join(names[:_MAX_LISTED]) + (
        f", ... ({len(names)} in all)" if len(names) > _MAX_LISTED else ""
    )
    return ValueError(f"{what} {name!r} matches no task.{hint} Tasks: {listed or '(none)'}.")


class TaskRegistry:
    """An immutable set of named tasks.

    Args:
        tasks: the tasks; their names must be distinct.

    Raises:
        ValueError: if two tasks share a name.
    """

    def __init__(self, tasks: Iterable[TaskSpec] = ()) -> None:
        self._tasks: dict[str, TaskSpec] = {}
        for task in tasks:
            if task.name in self._tasks:
                raise ValueError(f"two tasks are named {task.name!r}.")
            self._tasks[task.name] = task
        self._tasks = dict(sorted(self._tasks.items()))

    @classmethod
    def from_cases(
        cls, cases: Iterable[Case], declarations: Mapping[str, TargetSpec] | None = None, verify: bool = False
    ) -> TaskRegistry:
        """Build one segmentation task per structure name and one task per declared volume-level target.

        Args:
            cases: the cases; their uids must be distinct.
            declarations: the volume-level tasks; each case's ``targets`` keys must be among them. A declared
                task that no case has a target for is left out.
            verify: read every label map and drop, per case, the structures whose value does not occur in it
                (otherwise ``labels.json`` is trusted, which reads no volume).

        Raises:
            ValueError: on duplicate case uids, a target of an undeclared task, or a structure name that is
                also a volume-level task name.
        """
        declarations = dict(declarations or {})
        segmentation: dict[str, dict[str, tuple[Case, int]]] = {}
        volume: dict[str, list[Case]] = {name: [] for name in declarations}
        seen: set[str] = set()
        for case in cases:
            if case.uid in seen:
                raise ValueError(f"case {case.uid!r} appears twice; give cases distinct ids or datasets.")
            seen.add(case.uid)
            structures = _structures_present(case) if verify else case.structures
            for value, name in structures.items():
                if name in declarations:
                    raise ValueError(
                        f"case {case.uid!r}: structure {name!r} has the name of a volume-level task; "
                        "rename one."
                    )
                segmentation.setdefault(name, {})[case.uid] = (case, value)
            for name in case.targets:
                if name not in declarations:
                    raise ValueError(
                        f"case {case.uid!r}: target {name!r} belongs to no declared task; declared: "
                        f"{sorted(declarations)}."
                    )
                volume[name].append(case)
        tasks = [
            TaskSpec(
                name,
                "segmentation",
                tuple(c for c, _ in by_uid.values()),
                {u: v for u, (_, v) in by_uid.items()},
            )
            for name, by_uid in segmentation.items()
        ]
        tasks += [
            TaskSpec(
                name, declarations[name].kind, tuple(members), class_names=declarations[name].class_names
            )
            for name, members in volume.items()
            if members
        ]
        return cls(tasks)

    @classmethod
    def from_folder(
        cls, root: str | Path, *, dataset: str | None = None, verify: bool = False
    ) -> TaskRegistry:
        """Read a case folder tree (layout: :mod:`medmeta_plugin.episodes.sources`).

        Args:
            root: the dataset folder.
            dataset: dataset name, part of every case uid; defaults to the folder's name.
            verify: see :meth:`from_cases`.

        Raises:
            ValueError: on a missing file, invalid JSON, or an invalid name, kind or target; the message names
                the file.
        """
        cases, declarations = read_folder(root, dataset)
        return cls.from_cases(cases, declarations, verify=verify)

    @classmethod
    def from_datalist(
        cls, path: str | Path, *, dataset: str | None = None, key: str = "training", verify: bool = False
    ) -> TaskRegistry:
        """Read a MONAI-style datalist JSON (format: :mod:`medmeta_plugin.episodes.sources`).

        Args:
            path: the datalist file.
            dataset: dataset name; defaults to the datalist's ``"name"``, else its folder's name.
            key: which list of entries to read.
            verify: see :meth:`from_cases`.

        Raises:
            ValueError: on a missing file, invalid JSON, or an invalid name, kind or target; the message names
                the file and entry.
        """
        cases, declarations = read_datalist(path, dataset, key)
        return cls.from_cases(cases, declarations, verify=verify)

    def merge(self, other: TaskRegistry) -> TaskRegistry:
        """Join two registries; tasks of the same name become one task with the cases of both.

        Args:
            other: the registry to merge in.

        Returns:
            A new registry.

        Raises:
            ValueError: if a task differs in kind or classes between the two, or two cases share a uid.
        """
        merged = dict(self._tasks)
        for name, theirs in other._tasks.items():
            ours = merged.get(name)
            if ours is None:
                merged[name] = theirs
                continue
            if (ours.kind, ours.class_names) != (theirs.kind, theirs.class_names):
                raise ValueError(
                    f"task {name!r} is {ours.kind} {list(ours.class_names)} in one registry and "
                    f"{theirs.kind} {list(theirs.class_names)} in the other."
                )
            cases = {c.uid: c for c in ours.cases}
            for case in theirs.cases:
                if case.uid in cases and cases[case.uid] != case:
                    raise ValueError(
                        f"task {name!r}: two different cases share uid {case.uid!r}; read one dataset under "
                        "another name (the dataset= argument)."
                    )
                cases[case.uid] = case
            merged[name] = replace(
                ours, cases=tuple(cases.values()), label_values={**ours.label_values, **theirs.label_values}
            )
        return TaskRegistry(merged.values())

    def names(self, kind: str | None = None) -> list[str]:
        """Task names, sorted; only those of ``kind`` if given."""
        if kind is not None:
            kind = check_option(kind, TASK_KINDS, "kind")
        return [n for n, t in self._tasks.items() if kind is None or t.kind == kind]

    def get(self, name: str) -> TaskSpec:
        """The task called ``name``.

        Raises:
            ValueError: if there is none; the message suggests close names and lists the tasks.
        """
        if name not in self._tasks:
            raise _unknown(name, list(self._tasks), "task name")
        return self._tasks[name]

    def filter(
        self,
        include: Iterable[str] | None = None,
        exclude: Iterable[str] = (),
        kinds: Iterable[str] | None = None,
        min_cases: int = 0,
    ) -> TaskRegistry:
        """Select tasks by name (exact names or glob patterns such as ``"ctx-lh-*"``), kind and size.

        Args:
            include: keep only tasks matching one of these; ``None`` keeps all.
            exclude: then drop tasks matching one of these.
            kinds: keep only tasks of these kinds; ``None`` keeps all.
            min_cases: keep only tasks with at least this many cases (an episode needs k + q).

        Returns:
            A new registry.

        Raises:
            ValueError: if a name or pattern matches no task (a typo would otherwise select nothing
                silently), a kind is unknown, or ``min_cases`` is negative.
        """
        if isinstance(include, str) or isinstance(exclude, str):
            raise TypeError(f"include and exclude take lists of names, got a string: {include or exclude!r}.")
        if isinstance(min_cases, bool) or not isinstance(min_cases, int) or min_cases < 0:
            raise ValueError(f"min_cases must be a non-negative integer, got {min_cases!r}.")
        names = list(self._tasks)

        def matching(pattern: str, what: str) -> set[str]:
            hits = set(fnmatch.filter(names, pattern))
            if not hits:
                raise _unknown(pattern, names, what)
            return hits

        keep = set(names) if include is None else set().union(*(matching(p, "include") for p in include))
        keep -= set().union(*(matching(p, "exclude") for p in exclude))
        if kinds is not None:
            wanted = {check_option(k, TASK_KINDS, "kind in kinds") for k in kinds}
            keep = {n for n in keep if self._tasks[n].kind in wanted}
        return TaskRegistry(t for n, t in self._tasks.items() if n in keep and len(t.cases) >= min_cases)

    def __len__(self) -> int:
        return len(self._tasks)

    def __iter__(self) -> Iterator[TaskSpec]:
        return iter(self._tasks.values())

    def __contains__(self, name: object) -> bool:
        return name in self._tasks

    def __repr__(self) -> str:
        counts = {k: sum(t.kind == k for t in self) for k in TASK_KINDS}
        return f"TaskRegistry({len(self)} tasks: " + ", ".join(f"{n} {k}" for k, n in counts.items()) + ")"
