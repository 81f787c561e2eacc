"""Numeric precision of backbone passes: float32, or bfloat16 autocast where the hardware has it natively.

The backbone's 3D convolutions are most of the cost of every mode but ``head``. Under bfloat16 autocast they
run about twice as fast on a CPU with AVX512-BF16 or AMX (a backbone forward and backward of 5 volumes at
48^3, 2 threads, x86_64 with AVX512-BF16: 1.91 s in float32, 0.92 s in bfloat16) and on any recent GPU.
Where the CPU lacks those instructions oneDNN emulates bfloat16, slower than float32, so ``auto`` stays in
float32 there. Heads and losses always run in float32: callers cast the backbone's output back
(:meth:`~medmeta_plugin.networks.backbone.BackboneOutput.float`).
"""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path

import torch
from monai.utils import look_up_option

__all__ = ["PRECISIONS", "autocast", "native_bf16", "uses_bf16"]

#: ``fp32``: float32 throughout; ``bf16``: bfloat16 autocast of backbone passes; ``auto``: bf16 where native.
PRECISIONS = ("fp32", "bf16", "auto")

# The x86 CPU flags of native bfloat16 arithmetic (AVX512-BF16 dot products, AMX tiles).
_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


@functools.cache
def _cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from ``/proc/cpuinfo`` (empty where there is none, e.g. macOS)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.partition(":")[2].split())
    return frozenset()


def native_bf16(device: torch.device | str) -> bool:
    """True if ``device`` computes bfloat16 natively: a CUDA GPU that supports it, or a CPU with AVX512-BF16
    or AMX."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return device.type == "cpu" and bool(_cpu_flags() & _BF16_FLAGS)


def uses_bf16(precision: str, device: torch.device | str) -> bool:
    """Whether backbone passes on ``device`` run under bfloat16 autocast for ``precision``.

    Args:
        precision: one of :data:`PRECISIONS`.
        device: where the passes run.

    Raises:
        ValueError: for an unknown ``precision`` (with the valid ones).
    """
    precision = look_up_option(precision, PRECISIONS)
    return precision == "bf16" or (precision == "auto" and native_bf16(device))


def autocast(precision: str, device: torch.device | str) -> contextlib.AbstractContextManager:
    """The context for a backbone pass on ``device`` at ``precision``: bfloat16 autocast or nothing.

    Example:
        >>> with autocast("fp32", "cpu"):
        ...     y = torch.ones(2) * 2
    """
    device = torch.device(device)
    if uses_bf16(precision, device):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
