"""Where the package's own files are: the MONAI Label app, the shipped backbones, the sample scans, the
folders the demos write to, and the real data the benchmarks read.

From a checkout (``make install``: ``pip install -e .``) these are the checkout's folders. ``pip install .``
copies the app and ``sample_apps/`` under ``<prefix>/share/medmeta`` (``data_files`` in setup.cfg), where the
same names find them, and the demos write under ``$XDG_DATA_HOME/medmeta`` (default ``~/.local/share``)
instead of into the install. Everything the package reads or writes by default goes through here; no other
module works out a path from its own ``__file__``.
"""

from __future__ import annotations

import os
import site
import sysconfig
from pathlib import Path

__all__ = [
    "APP",
    "BACKBONES",
    "DEFAULT_BACKBONE",
    "META_RECIPE",
    "MULTITASK_BACKBONE",
    "REFINER",
    "ROOT",
    "SAMPLE_DATA",
    "checkout",
    "real_data_root",
    "work_folder",
]

_PACKAGE = Path(__file__).resolve().parent
_APP = ("apps", "medmeta")


def checkout() -> Path | None:
    """The checkout the package runs from (the folder with ``setup.cfg`` and ``apps/medmeta`` beside the
    package), or None when it runs from an installed copy."""
    root = _PACKAGE.parent
    return root if (root / "setup.cfg").is_file() and (root.joinpath(*_APP) / "main.py").is_file() else None


def _installed_root() -> Path:
    """``<prefix>/share/medmeta`` of the installation that holds the app (the environment's prefix, or the
    user base for ``pip install --user``); the environment's when neither does, so errors name it."""
    candidates = [Path(sysconfig.get_path("data"), "share", "medmeta")]
    if site.ENABLE_USER_SITE and site.USER_BASE:
        candidates.append(Path(site.USER_BASE, "share", "medmeta"))
    return next((c for c in candidates if (c.joinpath(*_APP) / "main.py").is_file()), candidates[0])


ROOT = checkout() or _installed_root()
APP = ROOT.joinpath(*_APP)
BACKBONES = ROOT / "sample_apps" / "backbone"
DEFAULT_BACKBONE = BACKBONES / "backbone.safetensors"
MULTITASK_BACKBONE = BACKBONES / "multitask.safetensors"
META_RECIPE = BACKBONES / "meta_train.yaml"
#: The in-context refiner (:mod:`medmeta_plugin.networks.refiner`): ``medmeta benchmark incontext --save``.
REFINER = BACKBONES / "refiner.safetensors"
SAMPLE_DATA = ROOT / "sample_apps" / "data" / "real"


def work_folder(name: str) -> Path:
    """Where a demo keeps what it writes (studies, adapters, Orthanc's storage): ``<checkout>/.<name>`` in
    a checkout (ignored by git), ``$XDG_DATA_HOME/medmeta/<name>`` in an installed copy. Not created here."""
    root = checkout()
    if root is not None:
        return root / f".{name}"
    data_home = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data_home) / "medmeta" / name


def real_data_root() -> Path:
    """Where the real cases of the benchmarks and the meta-training recipe are: ``$MEDMETA_REAL_DATA``, or
    ``../shared/data/real`` beside the checkout (there is no default in an installed copy: the path does
    not exist, and the suites that need it say so)."""
    env = os.environ.get("MEDMETA_REAL_DATA")
    if env:
        return Path(env)
    return (checkout() or ROOT).parent / "shared" / "data" / "real"
