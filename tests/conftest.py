"""Fixtures shared across test areas: small backbones and easy synthetic few-shot problems."""

from __future__ import annotations

import contextlib
import resource
from collections.abc import Iterator

import pytest
import torch

from medmeta_plugin.networks import BackboneConfig, MetaModel

TINY = BackboneConfig(features=(8, 16, 16), norm="group", groups=4)


@contextlib.contextmanager
def file_size_limit(nbytes: int) -> Iterator[None]:
    """A full disk for this process, as the kernel makes one: within the block no file can grow past
    ``nbytes`` (``RLIMIT_FSIZE``; Python ignores SIGXFSZ, so a write past it fails with ``EFBIG``)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


def blob_cases(n: int, seed: int, size: int = 16) -> list[dict[str, torch.Tensor]]:
    """``n`` noisy volumes with one bright cube each, at a random position: an easy segmentation task.

    Returns:
        Items with ``"image"`` (1, S, S, S) and ``"label"`` (1, S, S, S) in {0, 1}.
    """
    gen = torch.Generator().manual_seed(seed)
    cases = []
    for _ in range(n):
        label = torch.zeros(1, size, size, size)
        lo = torch.randint(1, size // 2, (3,), generator=gen)
        label[:, lo[0] : lo[0] + size // 3, lo[1] : lo[1] + size // 3, lo[2] : lo[2] + size // 3] = 1
        image = 0.3 * torch.randn(1, size, size, size, generator=gen) + 2.0 * label
        cases.append({"image": image, "label": label})
    return cases


@pytest.fixture
def tiny_model() -> MetaModel:
    torch.manual_seed(0)
    return MetaModel(config=TINY)
