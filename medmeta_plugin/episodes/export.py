"""Write a synthetic phantom dataset to disk in the case-folder layout that :class:`TaskRegistry` reads.

Useful to try the whole pipeline (registry, meta-training, the MONAI Label app) on data anyone can
regenerate, and to test the folder reader on real files.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from medmeta_plugin.episodes.synthetic import (
    SYNTHETIC_TARGETS,
    PhantomConfig,
    case_plans,
    check_plan,
    check_shape,
    make_case,
)
from medmeta_plugin.io import ImageMeta, write_image

__all__ = ["write_synthetic_dataset"]


def write_synthetic_dataset(
    root: str | Path,
    families: Sequence[str],
    n_cases: int,
    seed: int,
    shape: Sequence[int] = (48, 48, 48),
    structures_per_case: tuple[int, int] = (2, 4),
    config: PhantomConfig | None = None,
) -> Path:
    """Write ``n_cases`` phantoms as ``root/caseNNNNN/{image,label}.nii.gz, labels.json, targets.json``.

    The cases are the ones :func:`~medmeta_plugin.episodes.synthetic.synthetic_registry` draws for the same
    arguments; ``root/tasks.json`` declares the volume-level tasks.

    Args:
        root: destination folder; must be empty or absent (nothing existing is overwritten).
        families: phantom families to draw from.
        n_cases: number of cases.
        seed: determines every case.
        shape: spatial shape of each case.
        structures_per_case: inclusive range of structures per case.
        config: appearance ranges.

    Returns:
        ``root``.

    Raises:
        ValueError: if ``root`` exists and is not an empty folder, or on invalid arguments.
    """
    root = Path(root)
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise ValueError(f"{root}: exists and is not an empty folder; refusing to write into it.")
    families = check_plan(families, n_cases, structures_per_case)
    shape = check_shape(shape)  # before anything is written: a refused call leaves no folder behind
    config = config or PhantomConfig()
    root.mkdir(parents=True, exist_ok=True)
    declarations = {
        name: {"kind": spec.kind, **({"classes": list(spec.class_names)} if spec.class_names else {})}
        for name, spec in SYNTHETIC_TARGETS.items()
    }
    (root / "tasks.json").write_text(json.dumps(declarations, indent=1))
    for index, (chosen, case_seed) in enumerate(case_plans(families, n_cases, seed, structures_per_case)):
        case = make_case(chosen, case_seed, tuple(shape), config)
        folder = root / f"case{index:05d}"
        folder.mkdir()
        affine = np.diag([*case.spacing, 1.0])
        meta = ImageMeta.from_affine(affine, case.image.shape[1:], source=str(folder))
        write_image(folder / "image.nii.gz", case.image, meta)
        write_image(folder / "label.nii.gz", case.label, meta)
        labels = {str(v): f"synth_{n}" for v, n in case.label_names.items()}
        (folder / "labels.json").write_text(json.dumps(labels, indent=1))
        (folder / "targets.json").write_text(json.dumps(case.targets, indent=1))
    return root
