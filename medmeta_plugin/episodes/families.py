"""The synthetic structure families, and their split into meta-training and held-out families.

A family is a recipe: a shape primitive (:data:`~medmeta_plugin.episodes.primitives.SHAPES`) with a size,
elongation, position prior, contrast polarity and magnitude, internal texture and boundary sharpness. Two
draws of one family differ in every random parameter but look like the same kind of structure.

The split. Meta-training never sees the 10 held-out families, which are of the same world (same body, noise,
bias field, size and contrast ranges) but each differs from every training family in its
``(shape, texture, polarity)`` signature:

- three use shapes no training family has (``crescent``, ``cone``, ``helix``);
- one uses a texture no training family has (``layered``: concentric bands);
- six recombine a training shape with a texture and polarity it never has in training (e.g. the vessel tree
  is bright and smooth in training, dark and noisy when held out).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from medmeta_plugin.episodes.primitives import SHAPES, TEXTURES
from medmeta_plugin.names import validate_name

__all__ = [
    "CONTRASTS",
    "FAMILIES",
    "FAMILIES_BY_NAME",
    "HELDOUT_FAMILIES",
    "META_TRAIN_FAMILIES",
    "POSITIONS",
    "SHARPNESS",
    "SIZES",
    "FamilySpec",
]

# Bounding radius, in units of half the shortest field of view (48 voxels: 1 unit = 24 voxels in-plane).
# "small" (4-5 voxels) is the smallest that stays visible at 3x through-plane spacing; "large" (9-12 voxels)
# still leaves room for three more structures.
SIZES: dict[str, tuple[float, float]] = {"small": (0.16, 0.2), "medium": (0.24, 0.34), "large": (0.36, 0.48)}
# Width of the boundary ramp in in-plane voxels: a step edge, a partial-volume edge, an infiltrating margin.
SHARPNESS: dict[str, tuple[float, float]] = {"sharp": (0.2, 0.4), "medium": (0.5, 0.9), "soft": (1.0, 1.6)}
# Contrast magnitude relative to the body intensity; "subtle" is still 3-10x the noise std (0.01-0.05).
CONTRASTS: dict[str, tuple[float, float]] = {"strong": (0.4, 0.85), "subtle": (0.15, 0.3)}
Polarity = Literal["bright", "dark", "either"]


def _in_ball(rng: np.random.Generator, low: float, high: float) -> np.ndarray:
    direction = rng.standard_normal(3)
    return direction / np.linalg.norm(direction) * rng.uniform(low, high)


#: Position prior name -> draw(rng) -> centre in body coordinates (the body ellipsoid is the unit ball).
POSITIONS = {
    "central": lambda rng: _in_ball(rng, 0.0, 0.3),
    "anywhere": lambda rng: _in_ball(rng, 0.0, 0.6),
    "peripheral": lambda rng: _in_ball(rng, 0.55, 0.75),
    "lateral": lambda rng: np.array(
        [rng.choice([-1.0, 1.0]) * rng.uniform(0.3, 0.6), *rng.uniform(-0.3, 0.3, 2)]
    ),
    "superior": lambda rng: np.array([*rng.uniform(-0.25, 0.25, 2), rng.uniform(0.3, 0.6)]),
}


@dataclass(frozen=True)
class FamilySpec:
    """A structure family: the recipe every structure of the family is drawn from.

    Attributes:
        name: family name; synthetic tasks are called ``synth_<name>``.
        shape: key of :data:`~medmeta_plugin.episodes.primitives.SHAPES`.
        texture: key of :data:`~medmeta_plugin.episodes.primitives.TEXTURES`.
        polarity: brighter or darker than the body, or either (drawn per structure).
        contrast: key of :data:`CONTRASTS`.
        size: key of :data:`SIZES`.
        position: key of :data:`POSITIONS`.
        sharpness: key of :data:`SHARPNESS`.
        aspect: range of the ratio of the longest to the shortest axis after a volume-preserving stretch.
    """

    name: str
    shape: str
    texture: str
    polarity: Polarity
    contrast: str = "strong"
    size: str = "medium"
    position: str = "anywhere"
    sharpness: str = "medium"
    aspect: tuple[float, float] = (1.0, 1.0)

    def __post_init__(self) -> None:
        validate_name(self.name, "family name")
        for value, table, what in (
            (self.shape, SHAPES, "shape"),
            (self.texture, TEXTURES, "texture"),
            (self.polarity, ("bright", "dark", "either"), "polarity"),
            (self.contrast, CONTRASTS, "contrast"),
            (self.size, SIZES, "size"),
            (self.position, POSITIONS, "position"),
            (self.sharpness, SHARPNESS, "sharpness"),
        ):
            if value not in table:
                raise ValueError(f"family {self.name!r}: unknown {what} {value!r}; valid: {sorted(table)}.")
        if not 1.0 <= self.aspect[0] <= self.aspect[1]:
            raise ValueError(
                f"family {self.name!r}: aspect must be a range within [1, inf), got {self.aspect}."
            )

    @property
    def signature(self) -> tuple[str, str, str]:
        """``(shape, texture, polarity)``: held-out families share none with training families."""
        return (self.shape, self.texture, self.polarity)


F = FamilySpec
_TRAIN = (
    F("sphere_bright", "ellipsoid", "smooth", "bright", sharpness="sharp", aspect=(1.0, 1.3)),
    F("ellipsoid_dark_noisy", "ellipsoid", "noisy", "dark", aspect=(1.5, 2.5)),
    F(
        "nodule_small_bright",
        "ellipsoid",
        "smooth",
        "bright",
        size="small",
        position="peripheral",
        sharpness="soft",
    ),
    F("organ_large_subtle", "ellipsoid", "noisy", "bright", "subtle", "large", "lateral", "soft", (1.2, 2.0)),
    F("lesion_rim_enhancing", "ellipsoid", "core", "bright", aspect=(1.0, 1.4)),
    F("calcified_speckled", "ellipsoid", "speckled", "bright", size="small", sharpness="sharp"),
    F("ellipsoid_striped_subtle", "ellipsoid", "striped", "dark", "subtle", "large", "central"),
    F("box_bright_striped", "box", "striped", "bright", sharpness="sharp"),
    F("bar_dark_gradient", "box", "gradient", "dark", position="lateral", aspect=(1.5, 3.0)),
    F("rounded_box_dark", "rounded_box", "smooth", "dark", position="central"),
    F("cylinder_bright", "cylinder", "smooth", "bright"),
    F("vessel_with_lumen", "cylinder", "core", "dark", aspect=(1.5, 2.5)),
    F("tube_bright_thin", "tube", "smooth", "bright", size="large", sharpness="sharp"),
    F("tube_dark_noisy", "tube", "noisy", "dark", size="large", position="central"),
    F("torus_bright", "torus", "smooth", "bright"),
    F("shell_bright", "shell", "smooth", "bright", size="large", position="central"),
    F("lobulated_bright_noisy", "lobulated", "noisy", "bright"),
    F("lobulated_dark", "lobulated", "smooth", "dark", size="large", position="central", sharpness="soft"),
    F("star_spiky_bright", "star_spiky", "smooth", "bright", size="large", sharpness="sharp"),
    F("star_lumpy_dark", "star_lumpy", "noisy", "dark", position="peripheral"),
    F("plate_bright", "plate", "smooth", "bright", size="large"),
    F("plate_dark_striped", "plate", "striped", "dark", size="large", position="central"),
    F(
        "vessel_tree_bright",
        "vessel_tree",
        "smooth",
        "bright",
        size="large",
        position="central",
        sharpness="sharp",
    ),
    F("cluster_bright", "sphere_cluster", "smooth", "bright", size="large"),
    F("cluster_dark_speckled", "sphere_cluster", "speckled", "dark", size="large", position="peripheral"),
    F("capsule_bright_gradient", "capsule", "gradient", "bright"),
    F("dumbbell_subtle", "dumbbell", "smooth", "either", "subtle", "large"),
    F("octahedron_bright", "octahedron", "smooth", "bright", sharpness="sharp"),
    F("dome_dark_gradient", "dome", "gradient", "dark", position="superior"),
    F("annulus_bright", "annulus", "smooth", "bright", size="large", position="central"),
    F("infiltrative_subtle_noisy", "infiltrative", "noisy", "either", "subtle", "large", sharpness="soft"),
    F("infiltrative_dark_speckled", "infiltrative", "speckled", "dark"),
)
_HELDOUT = (
    F("crescent_bright", "crescent", "smooth", "bright"),
    F("cone_dark", "cone", "smooth", "dark", position="lateral"),
    F("helix_bright", "helix", "smooth", "bright", size="large", position="central", sharpness="sharp"),
    F("cyst_layered", "ellipsoid", "layered", "bright", aspect=(1.0, 1.5)),
    F("torus_dark_speckled", "torus", "speckled", "dark"),
    F("vessel_tree_dark_noisy", "vessel_tree", "noisy", "dark", size="large", position="central"),
    F("star_spiky_dark_striped", "star_spiky", "striped", "dark", size="large"),
    F("lobulated_rim_enhancing", "lobulated", "core", "bright"),
    F("shell_subtle_gradient", "shell", "gradient", "either", "subtle", "large", "central"),
    F("capsule_dark_striped", "capsule", "striped", "dark", position="peripheral"),
)
del F

#: Every family, meta-training ones first.
FAMILIES: tuple[FamilySpec, ...] = _TRAIN + _HELDOUT
FAMILIES_BY_NAME: dict[str, FamilySpec] = {f.name: f for f in FAMILIES}
#: Names of the families meta-training may use.
META_TRAIN_FAMILIES: tuple[str, ...] = tuple(f.name for f in _TRAIN)
#: Names of the families kept for evaluating few-shot adaptation to unseen structures.
HELDOUT_FAMILIES: tuple[str, ...] = tuple(f.name for f in _HELDOUT)
