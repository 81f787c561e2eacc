"""Precision of backbone passes: when bfloat16 autocast is used, and that heads still see float32."""

from __future__ import annotations

import pytest
import torch

from medmeta_plugin.networks import MetaModel, precision
from medmeta_plugin.networks.precision import PRECISIONS, autocast, native_bf16, uses_bf16
from tests.conftest import TINY


@pytest.fixture
def flags(monkeypatch: pytest.MonkeyPatch):
    """Stand in for the CPU's feature flags (``/proc/cpuinfo``), to test both kinds of CPU on one."""

    def use(values: set[str]) -> None:
        monkeypatch.setattr(precision, "_cpu_flags", lambda: frozenset(values))

    return use


@pytest.mark.parametrize(
    ("value", "cpu_flags", "expected"),
    [
        ("fp32", {"avx512_bf16"}, False),
        ("bf16", set(), True),  # asked for: used even where emulated
        ("auto", {"avx512f", "avx512_bf16"}, True),
        ("auto", {"amx_bf16"}, True),
        ("auto", {"avx512f", "avx2"}, False),  # emulated bf16 is slower than float32
        ("auto", set(), False),
    ],
)
def test_uses_bf16_on_cpu(flags, value: str, cpu_flags: set[str], expected: bool) -> None:
    flags(cpu_flags)
    assert uses_bf16(value, "cpu") is expected
    assert native_bf16("cpu") is bool(cpu_flags & {"avx512_bf16", "amx_bf16"})


@pytest.mark.parametrize("value", ["fp16", "float32", ""])
def test_unknown_precision(value: str) -> None:
    with pytest.raises(ValueError, match="fp32"):
        uses_bf16(value, "cpu")


@pytest.mark.parametrize(("value", "dtype"), [("fp32", torch.float32), ("bf16", torch.bfloat16)])
def test_autocast_runs_convolutions_at_the_precision(value: str, dtype: torch.dtype) -> None:
    conv = torch.nn.Conv3d(1, 2, 3)
    with autocast(value, "cpu"):
        assert conv(torch.randn(1, 1, 5, 5, 5)).dtype is dtype


@pytest.mark.parametrize("value", PRECISIONS)
def test_heads_output_float32_close_to_the_float32_model(value: str) -> None:
    torch.manual_seed(0)
    model = MetaModel(config=TINY)
    model.add_task("t", "segmentation", mode="film")
    x = torch.randn(1, 1, 16, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference, out = model(x, "t"), model(x, "t", value)
    assert out.dtype is torch.float32
    # bfloat16 keeps 8 bits of mantissa: logits agree to about 1% of their spread, not exactly
    error, spread = (out - reference).abs(), float(reference.std())
    assert float(error.mean()) <= 0.01 * spread and float(error.max()) <= 0.1 * spread
    assert (float(error.max()) > 0) is uses_bf16(value, "cpu"), "the backbone pass ran at another precision"
