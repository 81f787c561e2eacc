"""The app's typed configuration, parsed once from MONAI Label's string ``--conf key value`` pairs.

Every key is optional: with no ``--conf`` at all the app serves the shipped meta-trained backbone with the
defaults below. Unknown keys are refused with the list of known ones (a typo must not silently fall back to a
default).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path

from monai.utils import look_up_option

from medmeta_plugin.adapt.adaptation import HEAD_MODE_STEPS
from medmeta_plugin.names import validate_name
from medmeta_plugin.networks import ADAPTER_MODES
from medmeta_plugin.networks.heads import DEFAULT_SEGMENTATION_HEAD, SEGMENTATION_HEADS
from medmeta_plugin.networks.precision import PRECISIONS
from medmeta_plugin.paths import DEFAULT_BACKBONE, REFINER
from medmeta_plugin.registration import REGISTRATION_TRANSFORMS

__all__ = ["AppConfig", "parse_conf"]

# Keys MONAI Label itself puts into the conf dict (server_mode by the server, the rest by its sample apps'
# conventions); accepted and ignored here.
_SERVER_KEYS = {"server_mode", "models", "preload", "skip_trainers", "skip_strategies", "skip_scoring"}


@dataclass(frozen=True)
class AppConfig:
    """What the medmeta app serves and how it adapts.

    Attributes:
        backbone: the meta-learned backbone (``.safetensors``); default the shipped one in ``sample_apps``.
        mode: adapter mode fitted on submitted labels; ``head`` by default (features cached, seconds on a
            CPU), the mode the few-shot benchmark chose (docs/BENCHMARKS.md).
        head: segmentation head of adapted structures: ``position`` (features and where the voxel lies in
            the body, which tells mirror-image structures apart) or ``linear`` (features only); ``position``
            by measurement (docs/benchmarks/position-head.md).
        spacing: working voxel size in mm: images are resampled to it for adaptation and inference and the
            result is resampled back to the image's own grid. 3 mm is the spacing of the abdominal scans the
            backbone saw in meta-training.
        adapt_steps: step budget of one adaptation (leave-one-out picks fewer when k >= 2); the benchmark's
            ``head_steps``.
        max_shots: adaptation uses at most this many labelled scans per structure (the most recent ones), so
            its time stays bounded as labels accumulate.
        concurrent_inferences: inferences computed at once; more wait their turn, so that a crowd of viewers
            does not starve the adaptation of a newly submitted label of CPU (``docs/RELIABILITY.md``).
        max_revisions: earlier labels kept per image and tag when a save replaces one
            (:mod:`medmeta_plugin.app.revisions`); 0, the default, keeps every one.
        max_voxels: images whose working grid holds more voxels are refused with a 4xx (a memory limit);
            512^3 is 0.5 GiB of float32 per feature channel.
        roi: sliding-window size in voxels for working grids larger than ``whole_volume_voxels``.
        whole_volume_voxels: working grids up to this many voxels go through the backbone in one pass (160^3:
            about 4 s and 1 GiB on a CPU); larger ones by sliding window.
        labels: fallback label names by value, for label maps submitted without ``label_info`` (OHIF's
            ``label.bin``): ``{"liver": 1, "spleen": 2}``.
        device: ``cuda``, ``cpu`` or ``auto`` (a GPU when there is one).
        threshold: foreground probability above which a voxel is assigned to a structure.
        score_after_adapt: refresh the active-learning scores in the background after each adaptation.
        atlas: answer each structure by its atlas prior - its labelled scans registered onto the scan being
            segmented, their masks carried over (:mod:`medmeta_plugin.adapt.atlas`); one registration per
            pair of scans. Off: the adapted head alone.
        refine: let the adapted head move the registered masks' boundary where it nearly agrees with them
            (:func:`~medmeta_plugin.adapt.atlas.fuse`); off by default: on every real structure measured it
            made them worse (``docs/benchmarks/atlas.md``). Without it, a structure with a prior is its
            carried masks, and the head answers where there is no prior (a scan that does not register).
        incontext: move the registered masks' boundary onto the scan's edges with the in-context refiner
            (:mod:`medmeta_plugin.networks.refiner`: a network that reads the scan beside the carried prior,
            trained on structures no benchmark scores), on the box around each carried prior; the answer
            is then ``found_by: refined``. Where the labelled scans match the scan as a rescan does
            (:data:`~medmeta_plugin.networks.refiner.KEEP_SIMILARITY`), the carried masks are kept
            (``registered``). Not with ``refine``.
        refiner: the refiner's weights (``.safetensors`` + ``.json``); default the shipped one.
        registration: the transform that registration fits, ``affine`` (rigid first, then affine: patients
            differ in size), ``bspline`` (then a coarse deformation: organs sit differently in two
            patients) or ``rigid`` (scans of one patient, e.g. follow-up).
        precision: of backbone passes (:data:`~medmeta_plugin.networks.precision.PRECISIONS`): ``fp32``, or
            ``bf16`` / ``auto`` (bfloat16 autocast; ``auto`` only where the CPU or GPU has it natively): a
            faster backbone at a small change of its features (``docs/benchmarks/precision.md``); heads
            stay float32.
    """

    backbone: Path = DEFAULT_BACKBONE
    mode: str = "head"
    head: str = DEFAULT_SEGMENTATION_HEAD
    spacing: tuple[float, float, float] = (3.0, 3.0, 3.0)
    adapt_steps: int = HEAD_MODE_STEPS
    max_shots: int = 8
    max_revisions: int = 0
    concurrent_inferences: int = 2
    max_voxels: int = 512**3
    roi: tuple[int, int, int] = (96, 96, 96)
    whole_volume_voxels: int = 160**3
    labels: tuple[tuple[str, int], ...] = ()
    device: str = "auto"
    threshold: float = 0.5
    score_after_adapt: bool = True
    atlas: bool = True
    refine: bool = False
    incontext: bool = False
    refiner: Path = REFINER
    registration: str = "affine"
    precision: str = "fp32"

    def __post_init__(self) -> None:
        if self.refine and self.incontext:
            raise ValueError(
                "--conf refine and --conf incontext both move the registered masks' boundary: turn one off."
            )

    @property
    def label_map(self) -> dict[str, int]:
        """Fallback label names as ``{name: value}``."""
        return dict(self.labels)


# Keys whose value is one of a fixed set of names, kept as given.
_CHOICES = {"registration": REGISTRATION_TRANSFORMS, "precision": PRECISIONS}


def _floats3(key: str, value: str) -> tuple[float, float, float]:
    parts = [p for p in value.replace(",", " ").split() if p]
    try:
        numbers = [float(p) for p in parts]
    except ValueError:
        numbers = []
    if len(numbers) == 1:
        numbers *= 3
    if len(numbers) != 3 or not all(n > 0 for n in numbers):
        raise ValueError(f"--conf {key} must be one or three positive numbers (mm), got {value!r}.")
    return (numbers[0], numbers[1], numbers[2])


def _ints3(key: str, value: str) -> tuple[int, int, int]:
    numbers = _floats3(key, value)
    if any(n != int(n) for n in numbers):
        raise ValueError(f"--conf {key} must be one or three positive integers, got {value!r}.")
    return (int(numbers[0]), int(numbers[1]), int(numbers[2]))


def _positive_int(key: str, value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise ValueError(f"--conf {key} must be a positive integer, got {value!r}.")
    return number


def _bool(key: str, value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"--conf {key} must be true or false, got {value!r}.")


def _labels(value: str) -> tuple[tuple[str, int], ...]:
    """``{"liver": 1}`` JSON or a comma list ``liver,spleen`` (values 1, 2, ... in order)."""
    text = value.strip()
    if text.startswith("{"):
        try:
            mapping = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"--conf labels is not valid JSON ({err}): {value!r}.") from err
    else:
        mapping = {name.strip(): i + 1 for i, name in enumerate(text.split(",")) if name.strip()}
    out = []
    for name, idx in mapping.items():
        validate_name(name, "label name")
        if not isinstance(idx, int) or isinstance(idx, bool) or not 1 <= idx <= 255:
            raise ValueError(f"--conf labels: value of {name!r} must be an integer in 1..255, got {idx!r}.")
        out.append((name, idx))
    if len({idx for _, idx in out}) != len(out):
        raise ValueError(f"--conf labels: two names share one value in {value!r}.")
    return tuple(out)


def parse_conf(conf: dict[str, str] | None) -> AppConfig:
    """Parse MONAI Label's ``--conf`` strings into an :class:`AppConfig`.

    Args:
        conf: ``{key: value}`` strings as MONAI Label passes them; ``None`` or ``{}`` gives the defaults.

    Returns:
        The typed configuration.

    Raises:
        ValueError: for an unknown key (listing the known ones), a value of the wrong form, or a backbone
            file that does not exist.
    """
    conf = dict(conf or {})
    known = {f.name for f in fields(AppConfig)}
    unknown = sorted(k for k in conf if k not in known and k not in _SERVER_KEYS)
    if unknown:
        raise ValueError(f"unknown --conf keys {unknown}; medmeta knows {sorted(known)}.")
    values: dict[str, object] = {}
    for key, raw in conf.items():
        if key in _SERVER_KEYS:
            continue
        raw = str(raw)
        if key in ("backbone", "refiner"):
            path = Path(raw).expanduser()
            if not path.is_file():
                raise ValueError(f"--conf {key}: no such file {str(path)!r}.")
            values[key] = path
        elif key == "mode":
            values[key] = look_up_option(raw, ADAPTER_MODES)
        elif key == "head":
            values[key] = look_up_option(raw, SEGMENTATION_HEADS)
        elif key == "spacing":
            values[key] = _floats3(key, raw)
        elif key == "roi":
            values[key] = _ints3(key, raw)
        elif key == "max_revisions":
            values[key] = _positive_int(key, raw) if raw.strip() != "0" else 0
        elif key in (
            "adapt_steps",
            "max_shots",
            "max_voxels",
            "whole_volume_voxels",
            "concurrent_inferences",
        ):
            values[key] = _positive_int(key, raw)
        elif key == "labels":
            values[key] = _labels(raw)
        elif key == "device":
            if raw not in ("auto", "cpu", "cuda") and not raw.startswith("cuda:"):
                raise ValueError(f"--conf device must be auto, cpu, cuda or cuda:N, got {raw!r}.")
            values[key] = raw
        elif key == "threshold":
            try:
                threshold = float(raw)
            except ValueError:
                threshold = -1.0
            if not 0.0 < threshold < 1.0:
                raise ValueError(f"--conf threshold must be a probability in (0, 1), got {raw!r}.")
            values[key] = threshold
        elif key in _CHOICES:
            if raw not in _CHOICES[key]:
                raise ValueError(f"--conf {key} must be one of {list(_CHOICES[key])}, got {raw!r}.")
            values[key] = raw
        elif key in ("score_after_adapt", "atlas", "refine", "incontext"):
            values[key] = _bool(key, raw)
    return AppConfig(**values)  # type: ignore[arg-type]
