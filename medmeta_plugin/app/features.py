"""Backbone features of whole scans: one pass per scan (whole or by sliding window), cached per file version.

Inference runs the backbone once per scan and applies every ``head``-mode structure to the same features;
adaptation of a structure on a scan the user has just looked at reuses them. A scan whose structures are all
answered by their atlas prior (the app's default on scans that register) is only read onto the working grid
(:meth:`FeatureCache.volume`): no backbone pass. Requests for a scan whose
features are being computed wait for that computation instead of repeating it (the background scorer and a
user's request often ask for the same new scan at once).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from monai.inferers import sliding_window_inference

from medmeta_plugin.app.config import AppConfig
from medmeta_plugin.app.grid import WorkingVolume, load_working
from medmeta_plugin.caching import BoundedCache
from medmeta_plugin.networks import Backbone3D, BackboneOutput, FullAdapter, TaskAdapter
from medmeta_plugin.networks.position import body_position
from medmeta_plugin.networks.precision import autocast

__all__ = ["CACHE_BYTES", "CACHE_ENTRIES", "FeatureCache", "backbone_output", "file_key"]

# Scans whose features stay cached: every labelled scan of a structure being adapted (``max_shots``, 8 by
# default) and the scan being inferred, within a memory budget. With 4 entries a structure labelled on 5
# scans recomputed every backbone pass at every adaptation (docs/benchmarks/feature-cache.md). One entry
# at 128^3 holds 8 MB per feature channel: 130 MB with 16 channels, 400 MB with 48 (two levels), so the
# budget keeps 8-10 abdominal CTs at 3 mm.
CACHE_ENTRIES = 10
CACHE_BYTES = 3 * 2**30


def _entry_bytes(entry: tuple[WorkingVolume, BackboneOutput]) -> int:
    volume, base = entry
    tensors = [volume.image, base.features, base.embedding, base.position]
    return sum(t.element_size() * t.nelement() for t in tensors if t is not None)


def file_key(path: str | Path) -> tuple[str, int, int]:
    """A file's identity and version, as the caches key it: real path, modification time, size.

    Raises:
        ValueError: if the file cannot be read.
    """
    real = os.path.realpath(path)
    try:
        stat = os.stat(real)
    except OSError as err:
        raise ValueError(f"file {path}: cannot be read ({err.strerror}).") from err
    return (real, stat.st_mtime_ns, stat.st_size)


def backbone_output(
    backbone: Backbone3D, image: torch.Tensor, task: TaskAdapter | None, config: AppConfig
) -> BackboneOutput:
    """Backbone output for one padded scan, whole or by sliding window.

    Args:
        backbone: the shared backbone (a ``full`` adapter brings its own copy).
        image: the scan on the working grid, shape (1, C, X, Y, Z), sizes multiples of the size divisor.
        task: a task adapter to run the backbone with (``film``, ``lora``, ``full``), or None.
        config: ``whole_volume_voxels`` and ``roi`` decide between one pass and a sliding window;
            ``precision`` is that of the passes (the output is float32 either way).

    Returns:
        features (1, F, X, Y, Z), embedding (1, E) and position (1, P, X, Y, Z) of the whole scan.
    """
    adapter = task.adapter if task is not None else None
    net = adapter.backbone if isinstance(adapter, FullAdapter) else backbone
    with autocast(config.precision, image.device):
        if image[0, 0].numel() <= config.whole_volume_voxels:
            return net(image, adapter=adapter).float()
        features = sliding_window_inference(
            image,
            config.roi,
            1,
            lambda x: net(x, adapter=adapter).features.float(),
            overlap=0.25,
            mode="gaussian",
        )
        # The embedding is a global pool: take it from the scan shrunk to the whole-volume budget, with at
        # least two voxels per axis at the coarsest level (instance norm needs more than one).
        divisor = net.size_divisor
        factor = (config.whole_volume_voxels / image[0, 0].numel()) ** (1 / 3)
        size = [max(2 * divisor, int(s * factor) // divisor * divisor) for s in image.shape[2:]]
        small = torch.nn.functional.interpolate(image, size=size, mode="trilinear", align_corners=False)
        embedding = net(small, adapter=adapter).embedding.float()
    return BackboneOutput(features, embedding, body_position(image))


class FeatureCache:
    """Working-grid scans and their identity-adapter backbone output, keyed by file version and backbone.

    Args:
        config: the app configuration (spacing, memory limit, sliding-window settings).
        device: where the backbone runs.
    """

    def __init__(self, config: AppConfig, device: torch.device) -> None:
        self.config, self.device = config, device
        self._entries: BoundedCache[tuple[WorkingVolume, BackboneOutput]] = BoundedCache(
            CACHE_ENTRIES, max_bytes=CACHE_BYTES, weigh=_entry_bytes
        )
        self._volumes: BoundedCache[WorkingVolume] = BoundedCache(CACHE_ENTRIES)
        self._divisor: int | None = None

    def reset(self, divisor: int) -> None:
        """Forget every cached scan (a backbone was (re)loaded); :meth:`scan` pads to ``divisor`` from now on.

        Args:
            divisor: the size divisor of the backbone now in use.
        """
        self._entries.clear()
        self._volumes.clear()
        self._divisor = divisor

    def size_divisor(self) -> int:
        """The size divisor of the backbone in use, as last given to :meth:`reset`.

        Raises:
            RuntimeError: before the first :meth:`reset` (no backbone is in use yet).
        """
        if self._divisor is None:
            raise RuntimeError("no backbone in use yet: call FeatureCache.reset(divisor) first.")
        return self._divisor

    def scan(self, image: str | Path) -> WorkingVolume:
        """:meth:`volume` padded for the backbone in use (:meth:`size_divisor`): the same cached copy that
        inference reads, so a scan is read once whether it is queried or a structure's labelled scan.

        Raises:
            ValueError: if the scan cannot be read or is too large.
        """
        return self.volume(image, self.size_divisor())

    def volume(self, image: str | Path, divisor: int) -> WorkingVolume:
        """The scan on the working grid (padded to multiples of ``divisor``), read once per file version:
        enough for a structure whose answer is its atlas prior, which needs no backbone pass.

        Raises:
            ValueError: if the scan cannot be read or is too large.
        """
        key = (*file_key(image), divisor)
        return self._volumes.get(
            key, lambda: load_working(key[0], self.config.spacing, divisor, self.config.max_voxels)
        )

    def get(self, image: str | Path, backbone: Backbone3D) -> tuple[WorkingVolume, BackboneOutput]:
        """The scan on the working grid and its backbone output, computed once per file version.

        Raises:
            ValueError: if the scan cannot be read or is too large.
        """
        key = (*file_key(image), id(backbone))

        def compute() -> tuple[WorkingVolume, BackboneOutput]:
            volume = self.volume(key[0], backbone.size_divisor)
            with torch.no_grad():
                base = backbone_output(backbone, volume.image.to(self.device), None, self.config)
            return volume, base.channel_last()  # what heads and adaptation read fastest

        return self._entries.get(key, compute)
