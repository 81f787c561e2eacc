"""Benchmark suites: held-out few-shot problems built from phantoms and real scans.

Every suite returns :class:`EvalTask` objects: a pool of labelled support cases (episodes draw their k
shots from it by seed) and fixed query cases scored after adaptation. All images pass through the shared
:func:`~medmeta_plugin.transforms.normalize_intensity`; labels are binarised to the task's structure.

- ``synthetic-heldout``: one segmentation task per held-out phantom family (whole 48^3 volumes, the
  phantom size meta-training samples its patches from).
- ``synthetic-classification``: "does this volume contain family F?" for three held-out families
  (balanced, shots are per class).
- ``synthetic-regression``: "volume of family F's structure, in mL" for three held-out families.
- ``abdomen-ct-to-mr``: support from the real abdominal CT (1 shot: the scan itself; 3 and 5 shots add
  deformed copies of it, there being one CT), query on the real abdominal MR of another patient.
- ``brain-heldout``: support and query from differently deformed, intensity-augmented copies of the brain
  template, for the held-out brain structures.
- ``abdomen-ct-to-mr-dev``, ``brain-dev``: the same two problems for the development structures
  ``ABDOMEN_DEV`` and ``BRAIN_DEV`` of :mod:`medmeta_plugin.episodes.splits`, which meta-training sees:
  for settling design choices on real scans without tuning the held-out figures.
- ``brain-tumour``: the tumour labelled on the brain MRI of one patient (1 shot: that scan; more shots add
  deformed copies of it), segmented on the MRI of the other patient, in both directions: the only real
  structure of the data labelled on two patients in one modality.

Real suites adapt on whole support volumes and score whole query volumes, as the product does: a user
labels a structure on a scan and submits the whole scan. (An earlier version cropped the support to a box
around the structure; the head then never saw most of the body as background and marked it foreground
on the whole query, Dice ~0 for every method.) The volumes are small enough for that on a CPU: the CT
is 122x101x112 and the MR 117x91x20 voxels at 3 mm, the brain template 91x109x91 at 2 mm, so no crop and
no resampling is needed. All tasks of a real suite share the same image tensors, so a benchmark can
compute each scan's backbone features once for all of its structures. Whole volumes did not lift the
figures off ~0, though: the shipped backbone's features do not separate these structures linearly even on
the support scan itself (``docs/benchmarks/abdomen-linear-probe.md``). The brain suite's support cases
are all deformed copies and are drawn by seed; the abdomen's 1 shot is always the real CT.

Real suites' items carry their scan's voxel-to-world matrix, so the ``atlas`` method and ``--atlas`` can
register support scans onto the query (:mod:`medmeta_plugin.adapt.atlas`); phantoms have none (their
structures are placed at random, so position carries nothing from one phantom to the next).

Real suites read ``../shared/data/real`` (or ``$MEDMETA_REAL_DATA``); the structures they evaluate are the
ones in :mod:`medmeta_plugin.episodes.splits`, which meta-training never sees.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from medmeta_plugin.episodes import HELDOUT_FAMILIES, Case, load_case, make_case
from medmeta_plugin.episodes.copies import deformed_copies
from medmeta_plugin.episodes.splits import (
    ABDOMEN_DEV,
    ABDOMEN_HELDOUT,
    BRAIN_DEV,
    BRAIN_HELDOUT,
    TUMOUR_HELDOUT,
)
from medmeta_plugin.episodes.synthetic import case_plans
from medmeta_plugin.episodes.tasks import TaskRegistry
from medmeta_plugin.io import read_image
from medmeta_plugin.paths import real_data_root
from medmeta_plugin.transforms import normalize_intensity

__all__ = ["SUITES", "EvalTask", "build_suite", "real_case"]

Item = dict[str, Any]


@dataclass
class EvalTask:
    """One held-out few-shot problem.

    Attributes:
        name: task name; kind: task kind; num_outputs: classes (classification) or 1.
        support_pool: candidate support cases; items hold ``"image"`` (1, X, Y, Z) and ``"label"``
            (1, X, Y, Z) or ``"target"``, plus ``"class"`` for per-class shot sampling in classification
            and, for real scans, ``"affine"`` (4x4 voxel-to-world, RAS mm) for the atlas prior.
        query: the cases scored after adaptation (whole volumes).
        original_first: the pool's first case is the real labelled scan and every draw starts with it
            (the other cases are deformed copies of it).
    """

    name: str
    kind: str
    num_outputs: int
    support_pool: list[Item]
    query: list[Item]
    original_first: bool = False

    def draw_support(self, shots: int, seed: int) -> list[Item]:
        """``shots`` support cases (per class for classification), chosen by ``seed``.

        With ``original_first`` index 0 is the original scan and always comes first, so 1 shot is the
        real labelled scan and more shots add its deformed copies.

        Raises:
            ValueError: if ``shots`` is under 1 or more than the pool (or a class of it) holds.
        """
        rng = np.random.default_rng(seed)
        if self.kind == "classification":
            chosen = []
            for c in range(self.num_outputs):
                members = [it for it in self.support_pool if it["class"] == c]
                _check_shots(shots, len(members), f"{self.name}'s class {c}")
                chosen += [members[i] for i in rng.choice(len(members), size=shots, replace=False)]
            return chosen
        _check_shots(shots, len(self.support_pool), self.name)
        if self.original_first:
            rest = rng.choice(np.arange(1, len(self.support_pool)), size=shots - 1, replace=False)
            return [self.support_pool[0]] + [self.support_pool[i] for i in rest]
        return [self.support_pool[i] for i in rng.choice(len(self.support_pool), size=shots, replace=False)]


def _check_shots(shots: int, available: int, where: str) -> None:
    if not 1 <= shots <= available:
        raise ValueError(
            f"shots must be 1 to {available} ({where} holds {available} support cases), got {shots}."
        )


def _image(array: np.ndarray) -> torch.Tensor:
    return torch.as_tensor(normalize_intensity(array.astype(np.float32)))


def _mask(label: np.ndarray, value: int) -> torch.Tensor:
    return torch.as_tensor((label == value).astype(np.float32))


def _synthetic_cases(
    n_cases: int, seed: int, shape: tuple[int, int, int] = (48, 48, 48)
) -> list[tuple[np.ndarray, np.ndarray, dict[str, int], tuple[float, float, float]]]:
    """Held-out-family phantoms as ``(image, label, {family: label value}, spacing)``."""
    plans = case_plans(HELDOUT_FAMILIES, n_cases, seed, (2, 3))
    out = []
    for families, case_seed in plans:
        case = make_case(families, case_seed, shape)
        out.append(
            (case.image, case.label, {name: value for value, name in case.label_names.items()}, case.spacing)
        )
    return out


def _synthetic_heldout(seed: int) -> list[EvalTask]:
    cases = _synthetic_cases(60, seed)
    images = [_image(img) for img, *_ in cases]  # shared by the tasks of every family in the case
    tasks = []
    for family in HELDOUT_FAMILIES:
        items = [
            {"image": im, "label": _mask(lab, names[family])}
            for im, (_, lab, names, _) in zip(images, cases)
            if family in names
        ]
        tasks.append(EvalTask(f"synth_{family}", "segmentation", 1, items[:8], items[8:12]))
    return tasks


def _synthetic_volume(seed: int, kind: str) -> list[EvalTask]:
    cases = _synthetic_cases(80, seed + 1)
    tasks = []
    for family in HELDOUT_FAMILIES[:3]:
        if kind == "classification":
            items = [{"image": _image(img), "target": int(family in names)} for img, _, names, _ in cases]
            for it in items:
                it["class"] = it["target"]
            pos = [it for it in items if it["target"] == 1]
            neg = [it for it in items if it["target"] == 0]
            query = pos[6:12] + neg[6:12]
            tasks.append(EvalTask(f"contains_{family}", kind, 2, pos[:6] + neg[:6], query))
        else:
            items = []
            for img, lab, names, spacing in cases:
                if family in names:
                    ml = float((lab == names[family]).sum() * np.prod(spacing) / 1000.0)
                    items.append({"image": _image(img), "target": ml})
            tasks.append(EvalTask(f"volume_ml_{family}", kind, 1, items[:8], items[8:16]))
    return tasks


def real_case(folder: str) -> Case:
    """The real case ``folder`` of :func:`~medmeta_plugin.paths.real_data_root` (its image, label map and
    structures, as the task registry reads them).

    Raises:
        ValueError: if the folder is missing or labels no structure.
    """
    root = real_data_root()
    if not (root / folder).is_dir():
        raise ValueError(
            f"real data not found at {root / folder}; set MEDMETA_REAL_DATA to the data/real folder."
        )
    registry = TaskRegistry.from_folder(root, dataset="real")
    found = next((c for t in registry for c in t.cases if c.case_id == folder), None)
    if found is None:
        raise ValueError(f"{root / folder}: labels no structure (a label file and labels.json are needed).")
    return found


def _affine(case: Case) -> np.ndarray:
    """The scan's 4x4 voxel-to-world matrix (RAS, mm); its deformed copies lie on the same grid."""
    assert case.image_path is not None  # real cases are on disk
    return read_image(case.image_path)[1].affine


def _value(case: Case, name: str) -> int | None:
    return next((v for v, n in case.structures.items() if n == name), None)


def _abdomen(seed: int, structures: tuple[str, ...] = ABDOMEN_HELDOUT) -> list[EvalTask]:
    ct, mr = real_case("ct_abdomen_a"), real_case("mr_abdomen_d")
    loaded = [load_case(c) for c in [ct, *deformed_copies([ct], 4, seed=seed)]]
    mr_image, mr_label = load_case(mr)
    # One image tensor per scan, shared by every structure's task (see the module docstring).
    ct_images, query_image = [_image(i) for i, _ in loaded], _image(mr_image)
    ct_affine, mr_affine = _affine(ct), _affine(mr)
    tasks = []
    for name in structures:
        v_ct, v_mr = _value(ct, name), _value(mr, name)
        if v_ct is None or v_mr is None:
            continue
        pool = [
            {"image": im, "label": _mask(lab, v_ct), "affine": ct_affine}
            for im, (_, lab) in zip(ct_images, loaded)
        ]
        query = [{"image": query_image, "label": _mask(mr_label, v_mr), "affine": mr_affine}]
        tasks.append(EvalTask(name, "segmentation", 1, pool, query, original_first=True))
    return tasks


def _brain(seed: int, structures: tuple[str, ...] = BRAIN_HELDOUT) -> list[EvalTask]:
    brain = real_case("brain_mni152")
    support = [load_case(c) for c in deformed_copies([brain], 5, seed=seed)]
    query = [load_case(c) for c in deformed_copies([brain], 2, seed=seed + 10_000)]
    support_images, query_images = [_image(i) for i, _ in support], [_image(i) for i, _ in query]
    affine = _affine(brain)
    tasks = []
    for name in structures:
        v = _value(brain, name)
        if v is None:
            continue
        pool = [
            {"image": im, "label": _mask(lab, v), "affine": affine}
            for im, (_, lab) in zip(support_images, support)
        ]
        queries = [
            {"image": im, "label": _mask(lab, v), "affine": affine}
            for im, (_, lab) in zip(query_images, query)
        ]
        tasks.append(EvalTask(name, "segmentation", 1, pool, queries))
    return tasks


def _tumour(seed: int) -> list[EvalTask]:
    (name,) = TUMOUR_HELDOUT
    scans = [real_case(f"mr_brain_tumour_{i}") for i in (1, 2)]
    loaded = {c.case_id: load_case(c) for c in scans}
    images = {k: _image(image) for k, (image, _) in loaded.items()}
    affines = {c.case_id: _affine(c) for c in scans}
    tasks = []
    for support, query in ((scans[0], scans[1]), (scans[1], scans[0])):
        v_support, v_query = _value(support, name), _value(query, name)
        if v_support is None or v_query is None:
            continue
        copies = [load_case(c) for c in deformed_copies([support], 4, seed=seed)]
        a_support, a_query = affines[support.case_id], affines[query.case_id]
        pool = [
            {
                "image": images[support.case_id],
                "label": _mask(loaded[support.case_id][1], v_support),
                "affine": a_support,
            }
        ]
        pool += [
            {"image": _image(image), "label": _mask(label, v_support), "affine": a_support}
            for image, label in copies
        ]
        query_items = [
            {
                "image": images[query.case_id],
                "label": _mask(loaded[query.case_id][1], v_query),
                "affine": a_query,
            }
        ]
        direction = f"{name}_{support.case_id[-1]}_to_{query.case_id[-1]}"
        tasks.append(EvalTask(direction, "segmentation", 1, pool, query_items, original_first=True))
    return tasks


SUITES: dict[str, Callable[[int], list[EvalTask]]] = {
    "synthetic-heldout": _synthetic_heldout,
    "synthetic-classification": lambda seed: _synthetic_volume(seed, "classification"),
    "synthetic-regression": lambda seed: _synthetic_volume(seed, "regression"),
    "abdomen-ct-to-mr": _abdomen,
    "brain-heldout": _brain,
    "abdomen-ct-to-mr-dev": lambda seed: _abdomen(seed, ABDOMEN_DEV),
    "brain-dev": lambda seed: _brain(seed, BRAIN_DEV),
    "brain-tumour": _tumour,
}


def build_suite(name: str, seed: int = 0) -> list[EvalTask]:
    """Build a suite's tasks.

    Raises:
        ValueError: for an unknown suite (with the valid names) or missing real data.
    """
    if name not in SUITES:
        raise ValueError(f"unknown suite {name!r}; valid suites: {sorted(SUITES)}.")
    return SUITES[name](seed)
