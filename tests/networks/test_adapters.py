"""Task adapters on their own: ``build_adapter`` gives the class of each mode and refuses unknown modes and
hyper-parameters; each fresh adapter is the identity on backbones of other depths, norms and feature levels
than ``test_model.py``'s; FiLM's modulation and LoRA's delta follow their formulas and shapes; the
``full`` copy shares no tensor with the shared backbone."""

from __future__ import annotations

import math

import pytest
import torch

from medmeta_plugin.networks.adapters import (
    ADAPTER_CLASSES,
    ADAPTER_MODES,
    FilmAdapter,
    FullAdapter,
    HeadOnlyAdapter,
    LoraAdapter,
    build_adapter,
)
from medmeta_plugin.networks.backbone import Backbone3D, BackboneConfig

CONFIGS = {
    "instance-depth3": BackboneConfig(features=(4, 8, 8)),
    "group-depth4-2levels": BackboneConfig(features=(4, 4, 8, 8), norm="group", groups=2, feature_levels=2),
    "two-channels-depth2": BackboneConfig(in_channels=2, features=(4, 8)),
}


@pytest.fixture(params=list(CONFIGS), ids=list(CONFIGS))
def backbone(request: pytest.FixtureRequest) -> Backbone3D:
    torch.manual_seed(0)
    return Backbone3D(CONFIGS[request.param]).eval()


def _x(backbone: Backbone3D) -> torch.Tensor:
    size = 2 * backbone.size_divisor
    return torch.randn(
        2, backbone.config.in_channels, size, size, size, generator=torch.Generator().manual_seed(1)
    )


def test_the_classes_cover_the_modes_and_know_their_own() -> None:
    assert tuple(ADAPTER_CLASSES) == ADAPTER_MODES
    assert all(cls.mode == mode for mode, cls in ADAPTER_CLASSES.items())
    assert [m for m, cls in ADAPTER_CLASSES.items() if cls.adapts_encoder] == ["full"]


@pytest.mark.parametrize("mode", ADAPTER_MODES)
def test_build_adapter_gives_the_class_of_the_mode(backbone: Backbone3D, mode: str) -> None:
    adapter = build_adapter(mode, backbone)
    assert type(adapter) is ADAPTER_CLASSES[mode] and adapter.mode == mode


@pytest.mark.parametrize("mode", ["head", "film", "lora"])
def test_a_fresh_adapter_leaves_the_backbone_output_unchanged(backbone: Backbone3D, mode: str) -> None:
    x = _x(backbone)
    with torch.no_grad():
        plain, adapted = backbone(x), backbone(x, adapter=build_adapter(mode, backbone))
    torch.testing.assert_close(adapted.features, plain.features, rtol=0, atol=0)
    torch.testing.assert_close(adapted.embedding, plain.embedding, rtol=0, atol=0)


def test_a_fresh_full_adapter_computes_what_the_backbone_does(backbone: Backbone3D) -> None:
    x = _x(backbone)
    adapter = build_adapter("full", backbone)
    with torch.no_grad():
        plain, adapted = backbone(x), adapter.backbone(x, adapter=adapter)
    torch.testing.assert_close(adapted.features, plain.features, rtol=0, atol=0)
    torch.testing.assert_close(adapted.embedding, plain.embedding, rtol=0, atol=0)


def test_the_head_adapter_has_no_parameters_and_passes_features_through(backbone: Backbone3D) -> None:
    adapter = HeadOnlyAdapter()
    h = torch.randn(1, 4, 2, 2, 2)
    assert list(adapter.parameters()) == [] and adapter.hparams() == {}
    assert adapter.modulate(0, h) is h
    assert all(adapter.conv_delta(name) is None for name in backbone.conv_shapes())


def test_film_scales_and_shifts_each_channel_of_each_decoder_level(backbone: Backbone3D) -> None:
    adapter = FilmAdapter(backbone)
    channels = backbone.decoder_channels()
    assert [tuple(g.shape) for g in adapter.gamma] == [(c,) for c in channels]
    assert [tuple(b.shape) for b in adapter.beta] == [(c,) for c in channels]
    assert sum(p.numel() for p in adapter.parameters()) == 2 * sum(channels)
    assert all(adapter.conv_delta(name) is None for name in backbone.conv_shapes())
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for g, b in zip(adapter.gamma, adapter.beta):
            g.copy_(torch.randn(g.shape, generator=gen))
            b.copy_(torch.randn(b.shape, generator=gen))
    for level, c in enumerate(channels):
        h = torch.randn(2, c, 3, 4, 5, generator=gen)
        out = adapter.modulate(level, h)
        for k in range(c):
            expected = h[:, k] * (1 + adapter.gamma[level][k]) + adapter.beta[level][k]
            torch.testing.assert_close(out[:, k], expected)


@pytest.mark.parametrize(("rank", "alpha"), [(1, 1.0), (2, 2.0), (4, 0.5)])
def test_lora_deltas_cover_the_decoder_convolutions_and_start_at_zero(
    backbone: Backbone3D, rank: int, alpha: float
) -> None:
    adapter = LoraAdapter(backbone, rank=rank, alpha=alpha)
    decoder = {k: v for k, v in backbone.conv_shapes().items() if k.startswith("dec")}
    assert adapter.shapes == decoder and adapter.hparams() == {"rank": rank, "alpha": alpha}
    for name, shape in backbone.conv_shapes().items():
        delta = adapter.conv_delta(name)
        if name not in decoder:
            assert delta is None, name
            continue
        c_out, c_in = shape[:2]
        assert delta.shape == shape and torch.count_nonzero(delta) == 0
        a, b = adapter.lora_a[name], adapter.lora_b[name]
        assert a.shape == (rank, c_in * 27) and b.shape == (c_out, rank)
        bound = 1 / math.sqrt(c_in * 27)  # Kaiming-uniform A
        assert a.abs().max() <= bound and a.abs().max() > bound / 2 and torch.count_nonzero(b) == 0
    assert adapter.conv_delta("no_such_conv") is None


def test_a_lora_delta_is_alpha_over_rank_times_b_a(backbone: Backbone3D) -> None:
    adapter = LoraAdapter(backbone, rank=3, alpha=1.5)
    name = "dec0_conv1"
    with torch.no_grad():
        adapter.lora_b[name].copy_(
            torch.randn(adapter.lora_b[name].shape, generator=torch.Generator().manual_seed(3))
        )
    expected = (1.5 / 3) * (adapter.lora_b[name] @ adapter.lora_a[name]).view(adapter.shapes[name])
    torch.testing.assert_close(adapter.conv_delta(name), expected)
    assert torch.linalg.matrix_rank(adapter.conv_delta(name).flatten(1)) <= 3
    delta = adapter.conv_delta(name)
    delta.sum().backward()
    assert adapter.lora_a[name].grad is not None and adapter.lora_b[name].grad is not None


def test_the_full_copy_shares_no_tensor_with_the_backbone(backbone: Backbone3D) -> None:
    adapter = FullAdapter(backbone)
    assert adapter.backbone is not backbone and adapter.backbone.config == backbone.config
    shared = {p.data_ptr() for p in backbone.parameters()}
    assert not shared & {p.data_ptr() for p in adapter.backbone.parameters()}
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    with torch.no_grad():
        for p in adapter.backbone.parameters():
            p.add_(1.0)
    for k, v in backbone.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0, msg=f"{k} changed with the copy")


@pytest.mark.parametrize(
    ("mode", "hparams", "match"),
    [
        ("lorra", {}, r"did you mean 'lora'"),
        ("FiLM", {}, r"Available options are"),
        ("head", {"rank": 2}, r"adapter mode 'head' takes no hyper-parameters, got \['rank'\]"),
        (
            "full",
            {"alpha": 1.0, "rank": 2},
            r"mode 'full' takes no hyper-parameters, got \['alpha', 'rank'\]",
        ),
        ("lora", {"rank": 0}, r"LoRA rank must be >= 1, got 0"),
    ],
)
def test_build_adapter_refuses_unknown_modes_and_hyper_parameters(
    mode: str, hparams: dict, match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        build_adapter(mode, Backbone3D(CONFIGS["two-channels-depth2"]), **hparams)


def test_lora_refuses_a_hyper_parameter_it_does_not_take() -> None:
    with pytest.raises(ValueError, match="beta"):
        build_adapter("lora", Backbone3D(CONFIGS["two-channels-depth2"]), beta=1.0)
