"""The shared 3D backbone B(x; phi): a U-shaped encoder-decoder built from MONAI convolution blocks.

It returns a voxel feature map (for segmentation heads) and a pooled embedding (for classification and
regression heads). Every convolution can take a weight delta and every decoder level a feature modulation
from an :class:`~medmeta_plugin.networks.adapters.Adapter`, which is how task adapters act on the backbone
without copying or mutating it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution, UpSample
from monai.utils import look_up_option
from torch import nn

from medmeta_plugin.networks.position import body_position

if TYPE_CHECKING:
    from medmeta_plugin.networks.adapters import Adapter

__all__ = ["NORMS", "AdaptableConv", "Backbone3D", "BackboneConfig", "BackboneOutput"]

# Batch norm is deliberately absent: adaptation runs with one support case per step, where batch
# statistics are meaningless, and meta-learning inner loops must not mix statistics across tasks.
NORMS = ("instance", "group")


@dataclass(frozen=True)
class BackboneConfig:
    """Hyper-parameters of :class:`Backbone3D`.

    Attributes:
        in_channels: image channels (1 for CT or single-sequence MR).
        features: channels per resolution level, finest first; the depth is ``len(features)`` and each
            level halves the resolution, so input sizes must be divisible by ``2 ** (len(features) - 1)``.
        norm: ``"instance"`` or ``"group"`` normalisation (with learnable affine parameters).
        groups: number of groups for group normalisation.
        dropout: dropout probability inside the convolution blocks.
        feature_levels: decoder levels in the voxel features, finest first: 1 gives the finest level's
            ``features[0]`` channels; 2 adds the next coarser decoder level (``features[1]`` channels,
            upsampled), whose wider receptive field sees a structure's shape and surroundings. On the
            shipped backbone two levels lift held-out brain structures from 0.25 to 0.42 Dice at one shot
            (``docs/benchmarks/feature-levels.md``).
    """

    in_channels: int = 1
    features: tuple[int, ...] = (16, 32, 64, 128)
    norm: str = "instance"
    groups: int = 8
    dropout: float = 0.0
    feature_levels: int = 1

    def __post_init__(self) -> None:
        if self.in_channels < 1:
            raise ValueError(f"in_channels must be >= 1, got {self.in_channels}.")
        if len(self.features) < 2 or any(int(f) < 1 for f in self.features):
            raise ValueError(f"features needs at least two positive channel counts, got {self.features}.")
        look_up_option(self.norm, NORMS)
        if self.norm == "group" and any(f % self.groups for f in self.features):
            raise ValueError(f"group norm needs every feature count divisible by groups={self.groups}.")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}.")
        if not 1 <= self.feature_levels < len(self.features):
            raise ValueError(
                f"feature_levels must be in [1, {len(self.features) - 1}] (the decoder levels of "
                f"features={tuple(self.features)}), got {self.feature_levels}."
            )
        object.__setattr__(self, "features", tuple(int(f) for f in self.features))

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-serialisable dict (lists instead of tuples)."""
        out = asdict(self)
        out["features"] = list(self.features)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BackboneConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise ``ValueError``."""
        known = set(cls.__dataclass_fields__)
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown backbone config keys {sorted(unknown)}; valid keys: {sorted(known)}.")
        values = dict(data)
        if "features" in values:
            values["features"] = tuple(values["features"])
        return cls(**values)


class BackboneOutput(NamedTuple):
    """What the backbone returns.

    Attributes:
        features: voxel feature map, shape (B, C, X, Y, Z) with C = :attr:`Backbone3D.feature_channels`
            (``sum(features[:feature_levels])``).
        embedding: pooled volume embedding, shape (B, features[-1] + features[0]).
        position: where each voxel lies in the body, shape (B, P, X, Y, Z)
            (:func:`~medmeta_plugin.networks.position.body_position`, computed on the whole image), or None
            where it is not known; only segmentation heads with a position input read it.
    """

    features: torch.Tensor
    embedding: torch.Tensor
    position: torch.Tensor | None = None

    def take(self, index: list[int] | slice) -> BackboneOutput:
        """The output of some cases of the batch (every tensor indexed along its batch axis).

        Consecutive indices are taken as a slice: a view, not a copy of the cases' features.
        """
        if isinstance(index, list) and index and index == list(range(index[0], index[-1] + 1)):
            index = slice(index[0], index[-1] + 1)
        position = None if self.position is None else self.position[index]
        return BackboneOutput(self.features[index], self.embedding[index], position)

    def channel_last(self) -> BackboneOutput:
        """The same output with features and positions channel-last in memory (shapes unchanged; a copy
        unless they already are). Heads apply their per-voxel layers to such features as matmuls, several
        times faster on a CPU than 1x1x1 convolutions; caches of features keep them so."""
        layout = {"memory_format": torch.channels_last_3d}
        position = None if self.position is None else self.position.contiguous(**layout)
        return BackboneOutput(self.features.contiguous(**layout), self.embedding, position)

    def float(self) -> BackboneOutput:
        """The same output in float32 (no copy where it already is), e.g. after a bfloat16 autocast pass:
        heads and losses run in float32."""
        position = None if self.position is None else self.position.float()
        return BackboneOutput(self.features.float(), self.embedding.float(), position)

    def detach(self) -> BackboneOutput:
        """The same tensors cut from their graph (no copy)."""
        position = None if self.position is None else self.position.detach()
        return BackboneOutput(self.features.detach(), self.embedding.detach(), position)

    @staticmethod
    def cat(outputs: list[BackboneOutput]) -> BackboneOutput:
        """Concatenate outputs of equal spatial size along the batch axis (positions if all have them)."""
        positions = [o.position for o in outputs if o.position is not None]
        position = torch.cat(positions) if len(positions) == len(outputs) else None
        return BackboneOutput(
            torch.cat([o.features for o in outputs]), torch.cat([o.embedding for o in outputs]), position
        )


class AdaptableConv(nn.Module):
    """A MONAI ``Convolution`` block whose kernel can be shifted by a per-call weight delta.

    ``forward(x, delta)`` computes ``adn(conv(x; W + delta))``: a LoRA adapter supplies ``delta`` without
    the stored weight ``W`` ever being modified.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, config: BackboneConfig) -> None:
        super().__init__()
        norm: tuple[str, dict[str, Any]]
        if config.norm == "instance":
            norm = ("instance", {"affine": True})
        else:
            norm = ("group", {"num_groups": config.groups})
        self.block = Convolution(
            spatial_dims=3,
            in_channels=in_channels,
            out_channels=out_channels,
            strides=stride,
            kernel_size=3,
            act=("leakyrelu", {"negative_slope": 0.01, "inplace": False}),
            norm=norm,
            dropout=config.dropout or None,
        )

    @property
    def weight_shape(self) -> torch.Size:
        """Shape of the convolution kernel, (out, in, 3, 3, 3)."""
        return self.block.conv.weight.shape

    def forward(self, x: torch.Tensor, delta: torch.Tensor | None = None) -> torch.Tensor:
        """Apply the block.

        Args:
            x: input, shape (B, C_in, X, Y, Z).
            delta: optional kernel delta, shape :attr:`weight_shape`.

        Returns:
            Output, shape (B, C_out, X', Y', Z').
        """
        conv = self.block.conv
        if delta is None:
            y = conv(x)
        else:
            y = F.conv3d(x, conv.weight + delta, conv.bias, conv.stride, conv.padding, conv.dilation)
        return self.block.adn(y)


class _Stage(nn.Module):
    """Two adaptable convolutions; the first one may downsample."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, config: BackboneConfig) -> None:
        super().__init__()
        self.conv1 = AdaptableConv(in_channels, out_channels, stride, config)
        self.conv2 = AdaptableConv(out_channels, out_channels, 1, config)

    def forward(self, x: torch.Tensor, adapter: Adapter | None, prefix: str) -> torch.Tensor:
        d1 = adapter.conv_delta(f"{prefix}_conv1") if adapter is not None else None
        d2 = adapter.conv_delta(f"{prefix}_conv2") if adapter is not None else None
        return self.conv2(self.conv1(x, d1), d2)


class Backbone3D(nn.Module):
    """U-shaped 3D encoder-decoder shared by all tasks.

    Example:
        >>> net = Backbone3D(BackboneConfig(features=(8, 16, 32)))
        >>> out = net(torch.zeros(2, 1, 32, 32, 32))
        >>> tuple(out.features.shape), tuple(out.embedding.shape)
        ((2, 8, 32, 32, 32), (2, 40))
    """

    def __init__(self, config: BackboneConfig | None = None) -> None:
        super().__init__()
        self.config = config or BackboneConfig()
        feats = self.config.features
        self.encoder = nn.ModuleList(
            _Stage(self.config.in_channels if i == 0 else feats[i - 1], f, 1 if i == 0 else 2, self.config)
            for i, f in enumerate(feats)
        )
        # Decoder level j upsamples from feats[j + 1] to feats[j] and fuses the skip of encoder level j.
        self.upsample = nn.ModuleList(
            UpSample(3, feats[j + 1], feats[j], scale_factor=2, mode="deconv") for j in range(len(feats) - 1)
        )
        self.decoder = nn.ModuleList(
            _Stage(2 * feats[j], feats[j], 1, self.config) for j in range(len(feats) - 1)
        )

    @property
    def feature_channels(self) -> int:
        """Channels of :attr:`BackboneOutput.features`, summed over the ``feature_levels`` finest levels."""
        return sum(self.config.features[: self.config.feature_levels])

    @property
    def embedding_dim(self) -> int:
        """Length of :attr:`BackboneOutput.embedding`."""
        return self.config.features[-1] + self.config.features[0]

    @property
    def size_divisor(self) -> int:
        """Every spatial input size must be a multiple of this."""
        return 2 ** (len(self.config.features) - 1)

    def conv_shapes(self) -> dict[str, torch.Size]:
        """Kernel shape of every adaptable convolution, keyed by the name adapters use for it."""
        shapes = {}
        for kind, stages in (("enc", self.encoder), ("dec", self.decoder)):
            for i, stage in enumerate(stages):
                shapes[f"{kind}{i}_conv1"] = stage.conv1.weight_shape
                shapes[f"{kind}{i}_conv2"] = stage.conv2.weight_shape
        return shapes

    def decoder_channels(self) -> tuple[int, ...]:
        """Channels of each decoder level, in the order they are modulated (coarse to fine)."""
        return tuple(reversed(self.config.features[:-1]))

    def encode(self, x: torch.Tensor, adapter: Adapter | None = None) -> list[torch.Tensor]:
        """The encoder's output at each level, fine to coarse: (B, features[i], X / 2**i, Y / 2**i, Z / 2**i).

        Adapters that leave the encoder alone (``film``, ``lora``: :attr:`Adapter.adapts_encoder` is False)
        give the same encoding as the plain backbone, so it can be computed once and passed to
        :meth:`forward` as ``encoded`` for every step of an adaptation.
        """
        self._check(x)
        encoded = []
        h = x
        for i, stage in enumerate(self.encoder):
            h = stage(h, adapter, f"enc{i}")
            encoded.append(h)
        return encoded

    def forward(
        self, x: torch.Tensor, adapter: Adapter | None = None, encoded: list[torch.Tensor] | None = None
    ) -> BackboneOutput:
        """Compute voxel features and the pooled embedding.

        Args:
            x: images, shape (B, in_channels, X, Y, Z), each spatial size a multiple of :attr:`size_divisor`.
            adapter: optional task adapter that shifts convolution kernels and modulates decoder levels.
            encoded: :meth:`encode` of ``x`` (without an adapter), to skip the encoder; only valid with an
                adapter that does not adapt the encoder.

        Returns:
            :class:`BackboneOutput` with ``features`` (B, :attr:`feature_channels`, X, Y, Z), ``embedding``
            (B, features[-1] + features[0]) and ``position`` (B, P, X, Y, Z) of ``x`` (for a crop of a larger
            image, replace it by the whole image's, cropped).

        Raises:
            ValueError: if ``x`` is not 5D, has the wrong channel count or a size not divisible as required,
                or ``encoded`` is given with an adapter that adapts the encoder.
        """
        if encoded is None:
            encoded = self.encode(x, adapter)
        else:
            self._check(x)
            if adapter is not None and adapter.adapts_encoder:
                raise ValueError(
                    f"a {adapter.mode!r} adapter changes the encoder: its encoding cannot be reused."
                )
        skips, bottleneck = encoded, encoded[-1]
        h = bottleneck
        levels = []  # decoder outputs, coarse to fine
        for level, j in enumerate(reversed(range(len(self.decoder)))):
            h = self.upsample[j](h)
            h = self.decoder[j](torch.cat([h, skips[j]], dim=1), adapter, f"dec{j}")
            if adapter is not None:
                h = adapter.modulate(level, h)
            levels.append(h)
        embedding = torch.cat([bottleneck.mean(dim=(2, 3, 4)), h.mean(dim=(2, 3, 4))], dim=1)
        features = h
        if self.config.feature_levels > 1:  # one level: the finest output itself, no copy
            coarser = reversed(levels[-self.config.feature_levels : -1])
            features = torch.cat(
                [h, *(F.interpolate(c, size=h.shape[2:], mode="trilinear") for c in coarser)], 1
            )
        return BackboneOutput(features=features, embedding=embedding, position=body_position(x))

    def _check(self, x: torch.Tensor) -> None:
        if x.ndim != 5 or x.shape[1] != self.config.in_channels:
            raise ValueError(
                f"x must have shape (B, {self.config.in_channels}, X, Y, Z), got {tuple(x.shape)}."
            )
        if any(s % self.size_divisor for s in x.shape[2:]):
            raise ValueError(
                f"spatial sizes {tuple(x.shape[2:])} must be multiples of {self.size_divisor} "
                f"(2 ** (depth - 1) for features={self.config.features}); pad the input first."
            )
