"""What the benchmarks hold out. Meta-training never sees these, whatever its config says.

The lists are fixed and documented so that figures stay comparable between runs and versions. Both sides of
a left/right pair are held out together: training on one kidney and testing on the other would measure
mirror-image recall, not transfer to an unseen structure.
"""

from __future__ import annotations

from medmeta_plugin.episodes.families import HELDOUT_FAMILIES

__all__ = [
    "ABDOMEN_DEV",
    "ABDOMEN_HELDOUT",
    "BRAIN_DEV",
    "BRAIN_HELDOUT",
    "HELDOUT_STRUCTURES",
    "SYNTHETIC_HELDOUT_TASKS",
    "TUMOUR_HELDOUT",
    "is_held_out",
]

# Structures labelled in both the real abdominal CT and MR cases (see sample_apps/data/README.md):
# two solid organs, a hollow one, a retroperitoneal gland-like organ and a muscle pair.
ABDOMEN_HELDOUT = (
    "kidney_left",
    "kidney_right",
    "gallbladder",
    "pancreas",
    "iliopsoas_left",
    "iliopsoas_right",
)

# Deep grey matter, limbic, brainstem and one cortical parcel pair of the brain template: small and large,
# compact and thin structures.
BRAIN_HELDOUT = (
    "Left-Hippocampus",
    "Right-Hippocampus",
    "Left-Putamen",
    "Right-Putamen",
    "Left-Thalamus-Proper",
    "Right-Thalamus-Proper",
    "Brain-Stem",
    "ctx-lh-insula",
    "ctx-rh-insula",
)

# The brain tumour labelled on the MRIs of two patients: the one real structure seen on two patients in the
# same modality, so the suite that transfers it from one patient to the other measures what a user gets.
TUMOUR_HELDOUT = ("tumour",)

# Development structures: design choices that real scans must settle (the atlas fusion's constants) are
# measured on these, never on the held-out ones above, whose figures would otherwise be tuned. Meta-training
# does see them, so they flatter the adapted head, not the registration. Abdomen: labelled on both the CT and
# the MR; brain: of several sizes and shapes, cortex and ventricle included.
ABDOMEN_DEV = (
    "adrenal_gland_left",
    "duodenum",
    "inferior_vena_cava",
    "autochthon_right",
    "spinal_cord",
    "portal_vein_and_splenic_vein",
)
BRAIN_DEV = (
    "Left-Caudate",
    "Right-Pallidum",
    "Left-Amygdala",
    "Right-Lateral-Ventricle",
    "ctx-lh-precentral",
    "Left-Cerebellum-Cortex",
)

SYNTHETIC_HELDOUT_TASKS = tuple(f"synth_{family}" for family in HELDOUT_FAMILIES)

HELDOUT_STRUCTURES = frozenset(ABDOMEN_HELDOUT + BRAIN_HELDOUT + TUMOUR_HELDOUT + SYNTHETIC_HELDOUT_TASKS)


def is_held_out(task_name: str) -> bool:
    """True if a benchmark evaluates ``task_name``, so meta-training must not use it."""
    return task_name in HELDOUT_STRUCTURES
