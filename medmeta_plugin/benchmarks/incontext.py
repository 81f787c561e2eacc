"""Does a network that reads the carried mask beside the scan refine it? A probe of the in-context design.

Today the app serves the masks registration carries from the labelled scans; the adapted network, which
sees the query alone, is a fallback (docs/BENCHMARKS.md). Issue 18's design gives the backbone the carried
mask as a second input channel, so that it learns a local skill: how a carried boundary relates to the image
under it. Before meta-training and shipping such a backbone, this probe asks whether the skill transfers on
the real pairs of the project at all:

1. **Train** a refiner, :class:`~medmeta_plugin.networks.Backbone3D` with two input channels (the scan and
   the carried mask) and a 1x1x1 head, on crops of the real scans (abdominal CT and MR, the two brains) on
   the app's working grid. Only structures that no benchmark scores are used: the held-out and the
   development structures (:mod:`~medmeta_plugin.episodes.splits`), and for left/right pairs both sides,
   are left out, so the figures below are for structures the refiner never saw. The carried mask of a
   training crop is drawn (:func:`~medmeta_plugin.episodes.carried.simulate_carry`); intensities are
   remapped at random (CT-like <-> MR-like contrasts, bias field, noise).
2. **Score** on real cross-scan pairs and the development structures: the abdominal CT onto the MR and the
   MR onto the CT (two patients), and each brain atlas onto the other (two subjects, DK names mapped to
   AAL regions as the field-of-view suite does). The carried mask is the product's own: placement and
   registration (:func:`~medmeta_plugin.registration.register`, the app's defaults) of the labelled scan
   onto the query, its mask warped over. Three answers per structure: the carried mask alone (what the app
   serves), the refiner with it, and the refiner with an empty carried channel in the same box (the scan
   alone). The refiner runs as the app runs it (:func:`~medmeta_plugin.networks.refine_prior`): on the box
   around the carried prior. Beside them, the carried scan's correlation with the query on that box
   (:func:`~medmeta_plugin.networks.refiner.carried_similarity`) and what the app serves with it: the
   refined mask below :data:`~medmeta_plugin.networks.refiner.KEEP_SIMILARITY`, the carried one above.

``medmeta benchmark incontext``; figures and the decision they support: docs/benchmarks/incontext.md.
"""

from __future__ import annotations

import json
import platform
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from medmeta_plugin.app.grid import label_to_working, load_working
from medmeta_plugin.benchmarks.fov import BRAIN_CORRESPONDENCES
from medmeta_plugin.benchmarks.scoring import mask_dice
from medmeta_plugin.benchmarks.suites import real_case
from medmeta_plugin.episodes.carried import CarryConfig, simulate_carry
from medmeta_plugin.episodes.splits import ABDOMEN_DEV, BRAIN_DEV, is_held_out
from medmeta_plugin.networks import Refiner, refine_prior
from medmeta_plugin.networks.objectives import task_loss
from medmeta_plugin.networks.refiner import CARRIED_FLOOR, carried_similarity, keeps_carried
from medmeta_plugin.registration import register
from medmeta_plugin.registration.warp import warp_to

__all__ = [
    "InContextConfig",
    "ScanCase",
    "format_incontext",
    "load_scan",
    "run_incontext",
    "training_structures",
]

#: The real cases the probe trains and scores on.
CASES = ("ct_abdomen_a", "mr_abdomen_d", "brain_mni152", "brain_colin27")
#: Scored pairs (support -> query): two patients' abdominal CT and MR, two subjects' brains.
PAIRS = (
    ("ct_abdomen_a", "mr_abdomen_d"),
    ("mr_abdomen_d", "ct_abdomen_a"),
    ("brain_mni152", "brain_colin27"),
    ("brain_colin27", "brain_mni152"),
)
# A structure smaller than this on the 3 mm grid is too small to train or score on.
MIN_VOXELS = 20


@dataclass(frozen=True)
class InContextConfig:
    """A probe run.

    Attributes:
        steps: training steps of the refiner; batch: crops per step; patch: crop edge (voxels).
        lr: Adam's learning rate; features: the refiner's channels per level (finest first).
        spacing_mm: the working grid (the app's default, 3 mm).
        seed: crops, carried masks and initial weights.
        carry: how far a training crop's carried mask departs from the truth.
    """

    steps: int = 1500
    batch: int = 2
    patch: int = 48
    lr: float = 1e-3
    features: tuple[int, ...] = (16, 32, 64, 128)
    spacing_mm: float = 3.0
    seed: int = 0
    carry: CarryConfig = field(default_factory=CarryConfig)

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch < 1:
            raise ValueError(f"steps and batch must be >= 1, got {self.steps} and {self.batch}.")
        divisor = 2 ** (len(self.features) - 1)
        if self.patch < divisor or self.patch % divisor:
            raise ValueError(f"patch must be a positive multiple of {divisor}, got {self.patch}.")
        if not 1.0 <= self.spacing_mm <= 6.0:
            raise ValueError(f"spacing_mm must be in [1, 6], got {self.spacing_mm}.")


@dataclass
class ScanCase:
    """A real scan on the working grid with its structures.

    Attributes:
        name: the case folder; image: normalised intensities, shape (X, Y, Z) (unpadded), float32.
        affine: its 4x4 voxel-to-world matrix (RAS mm); labels: label map, shape (X, Y, Z), int.
        structures: name -> label value (Colin27's AAL regions also under the DK names they correspond to,
            :data:`~medmeta_plugin.benchmarks.fov.BRAIN_CORRESPONDENCES`, as extra names).
    """

    name: str
    image: np.ndarray
    affine: np.ndarray
    labels: np.ndarray
    structures: dict[str, tuple[int, ...]]

    def mask(self, name: str) -> np.ndarray:
        """The structure's mask, shape (X, Y, Z), bool."""
        return np.isin(self.labels, self.structures[name])


def load_scan(folder: str, spacing_mm: float = 3.0) -> ScanCase:
    """Read a real case (:func:`~medmeta_plugin.benchmarks.suites.real_case`) onto the app's working grid.

    Raises:
        ValueError: if the case folder is missing, labels nothing or is unreadable.
    """
    case = real_case(folder)
    volume = load_working(case.image_path, (spacing_mm,) * 3, 1, 10**9)
    labels = (
        volume.crop(torch.as_tensor(label_to_working(case.label_path, volume, 1))).numpy().astype(np.int32)
    )
    values = {n: (int(v),) for v, n in case.structures.items()}
    if folder == "brain_colin27":
        for dk, aal in BRAIN_CORRESPONDENCES.items():
            parts = tuple(v for a in aal if a in values for v in values[a])
            if parts:
                values[dk] = parts
    image = volume.crop(volume.image)[0, 0].numpy().astype(np.float32)
    return ScanCase(folder, image, volume.working.affine, labels.reshape(image.shape), values)


def _root(name: str) -> str:
    """A structure's name without its side and the DK atlas's cortex prefix (``Left-Caudate``,
    ``Caudate_L`` -> ``caudate``; ``ctx-lh-precentral``, ``Precentral_R`` -> ``precentral``)."""
    name = re.sub(r"(^|[-_])(left|right|lh|rh|l|r|ctx)(?=$|[-_])", r"\1", name, flags=re.IGNORECASE)
    return re.sub(r"[-_]+", "-", name).strip("-").lower()


def _scored_roots() -> set[str]:
    """Roots of every structure a benchmark scores, under both atlases' names."""
    names = list(ABDOMEN_DEV) + list(BRAIN_DEV)
    names += [a for dk in BRAIN_DEV for a in BRAIN_CORRESPONDENCES.get(dk, ())]
    return {_root(n) for n in names}


def training_structures(case: ScanCase) -> list[str]:
    """The structures of ``case`` the refiner may train on: none that a benchmark scores (held out or
    development, either side of a pair, under either atlas's name), none smaller than :data:`MIN_VOXELS`,
    and only a scan's own label names (not the DK aliases of Colin27's regions)."""
    scored = _scored_roots()
    own = [n for n, v in case.structures.items() if len(v) == 1 and n not in BRAIN_CORRESPONDENCES]
    out = []
    for name in sorted(own):
        if is_held_out(name) or _root(name) in scored:
            continue
        if int(case.mask(name).sum()) >= MIN_VOXELS:
            out.append(name)
    return out


def _contrast(image: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """A random intensity remapping of a crop (1, X, Y, Z): inverted or not, a random curve, a smooth bias
    field and noise, so that one scan stands for CT-like and MR-like contrasts."""
    x = image
    lo, hi = float(x.min()), float(x.max())
    x = (x - lo) / max(hi - lo, 1e-6)
    if rng.random() < 0.5:
        x = 1.0 - x
    x = x ** float(np.exp(rng.uniform(-0.7, 0.7)))
    bias = torch.from_numpy(rng.normal(0.0, 0.15, (1, 1, 3, 3, 3)).astype(np.float32))
    x = x * torch.exp(F.interpolate(bias, size=tuple(x.shape[1:]), mode="trilinear")[0])
    x = x + float(rng.uniform(0.0, 0.05)) * torch.randn(x.shape, generator=_torch_rng(rng))
    return (x - x.mean()) / (x.std() + 1e-6)


def _torch_rng(rng: np.random.Generator) -> torch.Generator:
    return torch.Generator().manual_seed(int(rng.integers(2**31)))


def _crop(case: ScanCase, name: str, patch: int, rng: np.random.Generator) -> tuple[torch.Tensor, ...]:
    """A patch^3 crop around a random voxel of the structure: (image, mask), each (1, P, P, P)."""
    mask = case.mask(name)
    voxels = np.argwhere(mask)
    centre = voxels[rng.integers(len(voxels))] + rng.integers(-patch // 6, patch // 6 + 1, 3)
    start = [int(np.clip(c - patch // 2, 0, max(s - patch, 0))) for c, s in zip(centre, mask.shape)]
    window = tuple(slice(s, s + patch) for s in start)
    image = torch.from_numpy(case.image[window].copy())
    target = torch.from_numpy(mask[window].astype(np.float32))
    pad = [p for s in reversed(image.shape) for p in (0, patch - s)]
    return F.pad(image, pad)[None], F.pad(target, pad)[None]


def train_refiner(
    cases: Sequence[ScanCase], config: InContextConfig, progress: bool = True
) -> tuple[Refiner, list[dict[str, float]]]:
    """Train the refiner on simulated carried masks of the training structures (module docstring).

    Returns:
        The refiner (eval mode) and its log: mean loss and the carried / refined Dice of the training crops
        every 100 steps.

    Raises:
        ValueError: if no case has a structure to train on.
    """
    rng = np.random.default_rng(config.seed)
    torch.manual_seed(config.seed)
    pool = [(c, n) for c in cases for n in training_structures(c)]
    if not pool:
        raise ValueError("no training structures: every structure of the cases is scored by a benchmark.")
    by_case = {c.name: [n for cc, n in pool if cc is c] for c in cases}
    model = Refiner(config.features)
    optimiser = torch.optim.Adam(model.parameters(), lr=config.lr)
    log, losses, carried_dice, refined_dice = [], [], [], []
    for step in tqdm(range(1, config.steps + 1), desc="refiner", disable=not progress):
        images, carried, targets = [], [], []
        for _ in range(config.batch):
            case = cases[int(rng.integers(len(cases)))]
            if not by_case[case.name]:
                case = next(c for c in cases if by_case[c.name])
            name = by_case[case.name][int(rng.integers(len(by_case[case.name])))]
            image, target = _crop(case, name, config.patch, rng)
            images.append(_contrast(image, rng))
            carried.append(simulate_carry(target[0], config.spacing_mm, rng, config.carry)[None])
            targets.append(target)
        image, prior, target = torch.stack(images), torch.stack(carried), torch.stack(targets)
        logits = model(image, prior)
        loss = task_loss("segmentation", logits, target)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(float(loss.detach()))
        truth = target.numpy() > 0.5
        carried_dice.append(mask_dice(prior.numpy() >= 0.5, truth))
        refined_dice.append(mask_dice(logits.detach().numpy() > 0, truth))
        if step % 100 == 0 or step == config.steps:
            log.append(
                {
                    "step": step,
                    "loss": round(float(np.mean(losses)), 4),
                    "carried_dice": round(float(np.mean(carried_dice)), 4),
                    "refined_dice": round(float(np.mean(refined_dice)), 4),
                }
            )
            losses, carried_dice, refined_dice = [], [], []
    return model.eval(), log


def refine(
    model: Refiner, image: np.ndarray, carried: np.ndarray, spacing_mm: float, blind: bool = False
) -> np.ndarray:
    """The refiner's mask of a whole scan (X, Y, Z) given its carried prior (X, Y, Z): bool (X, Y, Z).

    As the app runs it (:func:`~medmeta_plugin.networks.refine_prior`): on the box around the carried prior;
    outside it, nothing. An empty carried prior gives an empty mask; ``blind`` zeroes the carried channel
    (the scan alone, in the same box).
    """
    out = np.zeros(image.shape, bool)
    if not (carried > CARRIED_FLOOR).any():
        return out
    logits, box = refine_prior(
        model, torch.from_numpy(image), torch.from_numpy(carried), (spacing_mm,) * 3, blind=blind
    )
    out[box] = logits.numpy() > 0
    return out


def score_pair(
    model: Refiner, support: ScanCase, query: ScanCase, structures: Sequence[str]
) -> list[dict[str, Any]]:
    """Carried, refined and scan-alone Dice of each structure labelled in both scans (module docstring)."""
    registration = register(query.image, query.affine, support.image, support.affine)
    placement = registration.placement
    spacing = float(np.linalg.norm(query.affine[:3, 0]))
    carried_image = warp_to(
        support.image, support.affine, query.image.shape, query.affine, registration.matrix
    )
    rows = []
    for name in structures:
        if name not in support.structures or name not in query.structures:
            continue
        truth = query.mask(name)
        if int(truth.sum()) < MIN_VOXELS:
            continue
        mask = support.mask(name).astype(np.float32)
        carried = warp_to(mask, support.affine, query.image.shape, query.affine, registration.matrix)
        refined = refine(model, query.image, carried, spacing)
        similarity = carried_similarity(
            torch.from_numpy(query.image),
            (torch.from_numpy(carried_image),),
            torch.from_numpy(carried),
            (spacing,) * 3,
            model.divisor,
        )
        kept = keeps_carried(similarity)  # the app keeps the carried mask
        rows.append(
            {
                "pair": f"{support.name}->{query.name}",
                "structure": name,
                "sure": registration.sure,
                "confidence": None if placement is None else round(float(placement.confidence), 3),
                "carried": round(mask_dice(carried >= 0.5, truth), 4),
                "refined": round(mask_dice(refined, truth), 4),
                "similarity": None if similarity is None else round(similarity, 3),
                "served": round(mask_dice(carried >= 0.5 if kept else refined, truth), 4),
                "scan_alone": round(mask_dice(refine(model, query.image, carried, spacing, True), truth), 4),
            }
        )
    return rows


def run_incontext(
    config: InContextConfig,
    pairs: Sequence[tuple[str, str]] = PAIRS,
    progress: bool = True,
    loader: Callable[[str, float], ScanCase] = load_scan,
    refiner: Refiner | None = None,
) -> tuple[dict[str, Any], Refiner]:
    """Train the refiner (or take ``refiner``, already trained), then score it on ``pairs``
    (support -> query) and the development structures.

    Returns:
        A JSON-ready dict: ``config``, ``device``, ``training`` (structure counts per case),
        ``training_structures`` (their names), ``log`` (empty
        when ``refiner`` was given), ``rows`` (one per pair and structure), ``summary`` (:func:`summarise`),
        ``seconds``; and the refiner.
    """
    start = time.perf_counter()
    cases = {name: loader(name, config.spacing_mm) for name in CASES}
    if refiner is None:
        model, log = train_refiner(list(cases.values()), config, progress)
    else:
        model, log = refiner.eval(), []
    trained_s = time.perf_counter() - start
    scored = list(ABDOMEN_DEV) + list(BRAIN_DEV)
    trained_on = {name: training_structures(c) for name, c in cases.items()}
    rows = []
    for support, query in pairs:
        rows += score_pair(model, cases[support], cases[query], scored)
    return {
        "benchmark": "incontext",
        "config": asdict(config),
        "device": f"cpu: {platform.machine()}, {torch.get_num_threads()} torch threads",
        "training": {name: len(names) for name, names in trained_on.items()},
        "training_structures": trained_on,
        "log": log,
        "rows": rows,
        "summary": summarise(rows),
        "train_seconds": round(trained_s, 1),
        "seconds": round(time.perf_counter() - start, 1),
    }, model


_ANSWERS = ("carried", "refined", "served", "scan_alone")


def summarise(rows: Sequence[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Mean carried / refined / scan-alone Dice per pair and over all rows, with the count of structures the
    refiner helps (refined > carried + 0.01) and hurts (refined < carried - 0.01)."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(row["pair"], []).append(row)
    groups["all"] = list(rows)
    out = {}
    for key, members in groups.items():
        if not members:
            continue
        out[key] = {
            "structures": len(members),
            **{m: round(float(np.mean([r[m] for r in members])), 4) for m in _ANSWERS},
            "helps": sum(r["refined"] > r["carried"] + 0.01 for r in members),
            "hurts": sum(r["refined"] < r["carried"] - 0.01 for r in members),
        }
    return out


def format_incontext(results: dict[str, Any]) -> str:
    """Markdown: the per-structure table and the summary per pair."""
    lines = [
        "| pair | structure | carried | refined | similarity | served | scan alone |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results["rows"]:
        similarity = "-" if r.get("similarity") is None else f"{r['similarity']:.3f}"
        lines.append(
            f"| {r['pair']} | {r['structure']} | {r['carried']:.3f} | {r['refined']:.3f} | {similarity} "
            f"| {r['served']:.3f} | {r['scan_alone']:.3f} |"
        )
    lines += [
        "",
        "| pair | structures | carried | refined | served | scan alone | helps | hurts |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for key, s in results["summary"].items():
        scores = " | ".join(f"{s[m]:.3f}" for m in _ANSWERS)
        lines.append(f"| {key} | {s['structures']} | {scores} | {s['helps']} | {s['hurts']} |")
    return "\n".join(lines)


def write_incontext(path: str | Path, results: dict[str, Any], command: str, code_version: str) -> None:
    """The results as JSON with the command and code version."""
    Path(path).write_text(json.dumps({**results, "command": command, "code_version": code_version}, indent=1))
