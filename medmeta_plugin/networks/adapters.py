"""Task adapters A: the small, task-specific part of F(x) = A(B(x; phi)).

An adapter acts on the backbone through two hooks the backbone calls during its forward pass:
``conv_delta(name)`` (a kernel delta for one convolution) and ``modulate(level, h)`` (a transform of one
decoder level's features). Every adapter starts as the identity, so a fresh adapter leaves the backbone's
features unchanged; adaptation then moves only the adapter's (and its head's) parameters.

Modes:
    ``head``  no adapter parameters: only the task head is fitted.
    ``film``  per-channel scale and shift of every decoder level (FiLM, Perez et al. 2018).
    ``lora``  low-rank kernel deltas ``B @ A`` on the decoder convolutions (LoRA, Hu et al. 2021).
    ``full``  a task-specific copy of the whole backbone.
"""

from __future__ import annotations

import copy
import math

import torch
from monai.utils import look_up_option
from torch import nn

from medmeta_plugin.networks.backbone import Backbone3D

__all__ = [
    "ADAPTER_CLASSES",
    "ADAPTER_MODES",
    "Adapter",
    "FilmAdapter",
    "FullAdapter",
    "HeadOnlyAdapter",
    "LoraAdapter",
    "build_adapter",
]

ADAPTER_MODES = ("head", "film", "lora", "full")


class Adapter(nn.Module):
    """Base class: the identity on every hook."""

    mode: str = ""
    #: Whether the adapter changes the encoder's output; if not, an encoding can be computed once and reused
    #: (:meth:`Backbone3D.encode`).
    adapts_encoder: bool = False

    def conv_delta(self, name: str) -> torch.Tensor | None:
        """Kernel delta for the convolution ``name`` (see :meth:`Backbone3D.conv_shapes`), or ``None``."""
        return None

    def modulate(self, level: int, h: torch.Tensor) -> torch.Tensor:
        """Transform decoder level ``level`` (0 = coarsest); ``h`` has shape (B, C_level, X, Y, Z)."""
        return h

    def hparams(self) -> dict[str, int | float]:
        """Hyper-parameters needed to rebuild this adapter (stored with saved adapters)."""
        return {}


class HeadOnlyAdapter(Adapter):
    """``head`` mode: no parameters; the backbone's features pass through unchanged."""

    mode = "head"


class FilmAdapter(Adapter):
    """``film`` mode: ``h * (1 + gamma) + beta`` per channel at each decoder level.

    ``gamma`` and ``beta`` start at zero, so the fresh adapter is the identity.
    """

    mode = "film"

    def __init__(self, backbone: Backbone3D) -> None:
        super().__init__()
        channels = backbone.decoder_channels()
        self.gamma = nn.ParameterList(nn.Parameter(torch.zeros(c)) for c in channels)
        self.beta = nn.ParameterList(nn.Parameter(torch.zeros(c)) for c in channels)

    def modulate(self, level: int, h: torch.Tensor) -> torch.Tensor:
        shape = (1, -1, 1, 1, 1)
        return h * (1.0 + self.gamma[level].view(shape)) + self.beta[level].view(shape)


class LoraAdapter(Adapter):
    """``lora`` mode: kernel delta ``(alpha / rank) * B @ A`` on each decoder convolution.

    ``A`` (rank, C_in * 27) starts random and ``B`` (C_out, rank) at zero, so the delta, and with it the
    change of the backbone's features, starts at exactly zero. Only decoder convolutions are adapted: they
    carry the voxel-level detail a new structure needs and keep the parameter count under 2% of the
    backbone (a rank-2 delta on every convolution would cost about 3%).

    Args:
        backbone: the backbone whose convolutions are adapted.
        rank: rank of each kernel delta.
        alpha: scale of the delta, as in LoRA; ``alpha / rank`` keeps the step size independent of the rank.
    """

    mode = "lora"

    def __init__(self, backbone: Backbone3D, rank: int = 2, alpha: float = 2.0) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}.")
        self.rank = int(rank)
        self.alpha = float(alpha)
        self.shapes = {name: s for name, s in backbone.conv_shapes().items() if name.startswith("dec")}
        self.lora_a = nn.ParameterDict()
        self.lora_b = nn.ParameterDict()
        for name, (c_out, c_in, *kernel) in self.shapes.items():
            fan_in = c_in * math.prod(kernel)
            # Kaiming-uniform A as in LoRA; B = 0 makes the initial delta exactly zero.
            bound = 1.0 / math.sqrt(fan_in)
            self.lora_a[name] = nn.Parameter(torch.empty(self.rank, fan_in).uniform_(-bound, bound))
            self.lora_b[name] = nn.Parameter(torch.zeros(c_out, self.rank))

    def conv_delta(self, name: str) -> torch.Tensor | None:
        if name not in self.shapes:
            return None
        delta = self.lora_b[name] @ self.lora_a[name]
        return (self.alpha / self.rank) * delta.view(self.shapes[name])

    def hparams(self) -> dict[str, int | float]:
        return {"rank": self.rank, "alpha": self.alpha}


class FullAdapter(Adapter):
    """``full`` mode: a private copy of the whole backbone, fine-tuned for one task.

    The shared backbone is never modified; the copy starts equal to it, so the fresh adapter is the identity.
    """

    mode = "full"
    adapts_encoder = True

    def __init__(self, backbone: Backbone3D) -> None:
        super().__init__()
        self.backbone = copy.deepcopy(backbone)


# The hyper-parameters LoraAdapter takes.
_LORA_HPARAMS = frozenset({"rank", "alpha"})


def build_adapter(mode: str, backbone: Backbone3D, **hparams: int | float) -> Adapter:
    """Build a fresh (identity) adapter of the given mode for ``backbone``.

    Args:
        mode: one of :data:`ADAPTER_MODES`.
        backbone: the shared backbone the adapter will act on.
        **hparams: mode-specific hyper-parameters (``rank``, ``alpha`` for ``lora``).

    Raises:
        ValueError: for an unknown mode (with the valid ones) or hyper-parameters the mode does not take.
    """
    mode = look_up_option(mode, ADAPTER_MODES)
    if mode == "lora":
        unknown = sorted(set(hparams) - _LORA_HPARAMS)
        if unknown:
            raise ValueError(f"adapter mode 'lora' takes {sorted(_LORA_HPARAMS)}, got {unknown}.")
        return LoraAdapter(backbone, **hparams)
    if hparams:
        raise ValueError(f"adapter mode {mode!r} takes no hyper-parameters, got {sorted(hparams)}.")
    if mode == "head":
        return HeadOnlyAdapter()
    return ADAPTER_CLASSES[mode](backbone)


#: The adapter class of each mode.
ADAPTER_CLASSES: dict[str, type[Adapter]] = {
    "head": HeadOnlyAdapter,
    "film": FilmAdapter,
    "lora": LoraAdapter,
    "full": FullAdapter,
}
