"""The backbone on its own: output and encoder shapes for several depths and input sizes (the docstrings'
shapes), the embedding as the pooled bottleneck and finest level, the adapter hooks called once per
convolution and decoder level, ``AdaptableConv``'s delta equal to a shifted kernel, ``BackboneOutput``'s
batch helpers, and input errors.

Identity adapters, the fast/meta split, feature levels and config round trips are in ``test_model.py``.
"""

from __future__ import annotations

import json

import pytest
import torch

from medmeta_plugin.networks.adapters import Adapter
from medmeta_plugin.networks.backbone import AdaptableConv, Backbone3D, BackboneConfig, BackboneOutput
from medmeta_plugin.networks.position import POSITION_CHANNELS

CONFIGS = [
    BackboneConfig(features=(4, 8)),
    BackboneConfig(features=(4, 8, 8), norm="group", groups=4),
    BackboneConfig(in_channels=2, features=(4, 4, 8, 8), norm="group", groups=2, feature_levels=2),
]


def _net(config: BackboneConfig) -> Backbone3D:
    torch.manual_seed(0)
    return Backbone3D(config).eval()


def _sizes(config: BackboneConfig) -> list[tuple[int, int, int]]:
    """Input sizes that are multiples of the size divisor: cubic, anisotropic, the thinnest. (A bottleneck of
    one voxel, from a (d, d, d) input, is not one: instance norm needs two voxels to normalise.)"""
    d = 2 ** (len(config.features) - 1)
    return [(2 * d, 2 * d, 2 * d), (d, 3 * d, 2 * d), (d, d, 2 * d)]


def test_the_docstring_example() -> None:
    out = Backbone3D(BackboneConfig(features=(8, 16, 32)))(torch.zeros(2, 1, 32, 32, 32))
    assert (tuple(out.features.shape), tuple(out.embedding.shape)) == ((2, 8, 32, 32, 32), (2, 40))


@pytest.mark.parametrize("config", CONFIGS, ids=["depth2", "depth3-group", "depth4-2ch-2levels"])
def test_output_and_encoder_shapes_for_several_input_sizes(config: BackboneConfig) -> None:
    net = _net(config)
    f = config.features
    assert net.size_divisor == 2 ** (len(f) - 1)
    assert net.feature_channels == sum(f[: config.feature_levels])
    assert net.embedding_dim == f[-1] + f[0]
    for batch, size in zip((1, 2, 3), _sizes(config)):
        x = torch.randn(batch, config.in_channels, *size)
        with torch.no_grad():
            out = net(x)
            encoded = net.encode(x)
        assert out.features.shape == (batch, net.feature_channels, *size)
        assert out.embedding.shape == (batch, net.embedding_dim)
        assert out.position.shape == (batch, POSITION_CHANNELS, *size)
        assert [tuple(e.shape) for e in encoded] == [
            (batch, c, *(s // 2**i for s in size)) for i, c in enumerate(f)
        ]


@pytest.mark.parametrize("config", CONFIGS[:2], ids=["depth2", "depth3-group"])
def test_the_embedding_is_the_pooled_bottleneck_then_the_pooled_finest_level(config: BackboneConfig) -> None:
    net = _net(config)
    x = torch.randn(2, 1, *_sizes(config)[1])
    with torch.no_grad():
        out, bottleneck = net(x), net.encode(x)[-1]
    torch.testing.assert_close(out.embedding[:, : config.features[-1]], bottleneck.mean(dim=(2, 3, 4)))
    torch.testing.assert_close(out.embedding[:, config.features[-1] :], out.features.mean(dim=(2, 3, 4)))


def test_cases_in_a_batch_do_not_mix() -> None:
    """Instance/group norm, no batch statistics: a case's output is the same alone or in a batch."""
    net = _net(CONFIGS[1])
    x = torch.randn(3, 1, 8, 8, 8)
    with torch.no_grad():
        batched, alone = net(x), net(x[1:2])
    torch.testing.assert_close(batched.features[1:2], alone.features, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(batched.embedding[1:2], alone.embedding, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("depth", [2, 3, 4])
def test_conv_shapes_and_decoder_channels_name_every_adaptable_convolution(depth: int) -> None:
    features = (4, 8, 12, 16)[:depth]
    net = Backbone3D(BackboneConfig(in_channels=3, features=features))
    shapes = net.conv_shapes()
    expected = {}
    for i, f in enumerate(features):
        expected[f"enc{i}_conv1"] = (f, 3 if i == 0 else features[i - 1], 3, 3, 3)
        expected[f"enc{i}_conv2"] = (f, f, 3, 3, 3)
    for j, f in enumerate(features[:-1]):
        expected[f"dec{j}_conv1"] = (f, 2 * f, 3, 3, 3)  # upsampled coarser level + the skip
        expected[f"dec{j}_conv2"] = (f, f, 3, 3, 3)
    assert {k: tuple(v) for k, v in shapes.items()} == expected
    assert net.decoder_channels() == tuple(reversed(features[:-1]))


class _Recorder(Adapter):
    """Records every hook call; ``zero_level`` zeroes that decoder level's features."""

    def __init__(self, zero_level: int | None = None) -> None:
        super().__init__()
        self.deltas: list[str] = []
        self.levels: list[tuple[int, int]] = []
        self.zero_level = zero_level

    def conv_delta(self, name: str) -> torch.Tensor | None:
        self.deltas.append(name)
        return None

    def modulate(self, level: int, h: torch.Tensor) -> torch.Tensor:
        self.levels.append((level, h.shape[1]))
        return torch.zeros_like(h) if level == self.zero_level else h


@pytest.mark.parametrize("config", CONFIGS, ids=["depth2", "depth3-group", "depth4-2ch-2levels"])
def test_an_adapter_is_asked_once_per_convolution_and_decoder_level(config: BackboneConfig) -> None:
    net, recorder = _net(config), _Recorder()
    x = torch.randn(1, config.in_channels, *_sizes(config)[2])
    with torch.no_grad():
        net(x, adapter=recorder)
    assert sorted(recorder.deltas) == sorted(net.conv_shapes()) and len(set(recorder.deltas)) == len(
        recorder.deltas
    )
    assert recorder.levels == list(enumerate(net.decoder_channels()))
    # A reused encoding skips the encoder's hooks only.
    recorder = _Recorder()
    with torch.no_grad():
        net(x, adapter=recorder, encoded=net.encode(x))
    assert sorted(recorder.deltas) == sorted(k for k in net.conv_shapes() if k.startswith("dec"))


def test_a_modulation_of_the_finest_level_reaches_features_and_embedding() -> None:
    config = CONFIGS[1]
    net = _net(config)
    x = torch.randn(2, 1, 8, 8, 8)
    finest = len(config.features) - 2
    with torch.no_grad():
        out = net(x, adapter=_Recorder(zero_level=finest))
    assert torch.count_nonzero(out.features) == 0
    assert torch.count_nonzero(out.embedding[:, config.features[-1] :]) == 0
    assert torch.count_nonzero(out.embedding[:, : config.features[-1]]) > 0  # the bottleneck is untouched


@pytest.mark.parametrize("stride", [1, 2])
def test_an_adaptable_conv_with_a_delta_equals_the_conv_with_a_shifted_kernel(stride: int) -> None:
    config = BackboneConfig(features=(4, 8), norm="group", groups=2)
    torch.manual_seed(0)
    conv, shifted = AdaptableConv(3, 4, stride, config), AdaptableConv(3, 4, stride, config)
    shifted.load_state_dict(conv.state_dict())
    assert tuple(conv.weight_shape) == (4, 3, 3, 3, 3)
    delta = 0.1 * torch.randn(conv.weight_shape)
    with torch.no_grad():
        shifted.block.conv.weight += delta
    weight = conv.block.conv.weight.detach().clone()
    x = torch.randn(2, 3, 8, 6, 4)
    y = conv(x, delta)
    assert y.shape == (2, 4, 8 // stride, 6 // stride, 4 // stride)
    torch.testing.assert_close(y, shifted(x))
    torch.testing.assert_close(conv(x, torch.zeros_like(delta)), conv(x))
    assert not torch.allclose(y, conv(x))
    torch.testing.assert_close(
        conv.block.conv.weight, weight, rtol=0, atol=0
    )  # the stored kernel is untouched
    leaf = delta.clone().requires_grad_(True)
    conv(x, leaf).square().mean().backward()
    assert leaf.grad is not None and leaf.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------- BackboneOutput


def _output(batch: int = 4, position: bool = True) -> BackboneOutput:
    gen = torch.Generator().manual_seed(0)
    return BackboneOutput(
        torch.randn(batch, 3, 4, 5, 6, generator=gen),
        torch.randn(batch, 7, generator=gen),
        torch.randn(batch, POSITION_CHANNELS, 4, 5, 6, generator=gen) if position else None,
    )


@pytest.mark.parametrize(
    ("index", "rows", "view"),
    [([1, 2, 3], [1, 2, 3], True), ([2], [2], True), (slice(0, 2), [0, 1], True), ([3, 0], [3, 0], False)],
)
@pytest.mark.parametrize("position", [True, False])
def test_take_indexes_every_tensor_and_gives_views_for_runs(
    index: list[int] | slice, rows: list[int], view: bool, position: bool
) -> None:
    out = _output(position=position)
    taken = out.take(index)
    torch.testing.assert_close(taken.features, out.features[rows], rtol=0, atol=0)
    torch.testing.assert_close(taken.embedding, out.embedding[rows], rtol=0, atol=0)
    if position:
        torch.testing.assert_close(taken.position, out.position[rows], rtol=0, atol=0)
    else:
        assert taken.position is None
    assert (taken.features.untyped_storage().data_ptr() == out.features.untyped_storage().data_ptr()) == view


def test_cat_joins_batches_and_drops_positions_unless_all_have_them() -> None:
    a, b = _output(2), _output(3)
    joined = BackboneOutput.cat([a, b])
    assert joined.features.shape[0] == 5 and joined.embedding.shape == (5, 7)
    torch.testing.assert_close(joined.features[2:], b.features, rtol=0, atol=0)
    torch.testing.assert_close(joined.position[:2], a.position, rtol=0, atol=0)
    assert BackboneOutput.cat([a, _output(1, position=False)]).position is None


def test_channel_last_float_and_detach_keep_values_and_shapes() -> None:
    out = _output()
    last = out.channel_last()
    assert last.features.is_contiguous(memory_format=torch.channels_last_3d)
    assert last.position.is_contiguous(memory_format=torch.channels_last_3d)
    torch.testing.assert_close(last.features, out.features, rtol=0, atol=0)
    assert last.features.shape == out.features.shape and last.embedding is out.embedding
    half = BackboneOutput(out.features.bfloat16(), out.embedding.bfloat16(), None).float()
    assert half.features.dtype == half.embedding.dtype == torch.float32 and half.position is None
    assert out.float().features is out.features  # already float32: no copy
    grad = BackboneOutput(*(t.clone().requires_grad_(True) for t in out))
    cut = grad.detach()
    assert not any(t.requires_grad for t in cut)
    assert cut.features.data_ptr() == grad.features.data_ptr()


# ------------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("config", "shape", "match"),
    [
        (CONFIGS[0], (1, 8, 8, 8), r"x must have shape \(B, 1, X, Y, Z\), got \(1, 8, 8, 8\)"),
        (CONFIGS[2], (1, 1, 8, 8, 8), r"x must have shape \(B, 2, X, Y, Z\), got \(1, 1, 8, 8, 8\)"),
        (
            CONFIGS[2],
            (1, 2, 8, 8, 12),
            r"spatial sizes \(8, 8, 12\) must be multiples of 8 .*features=\(4, 4, 8, 8\)",
        ),
        (CONFIGS[0], (1, 1, 3, 4, 4), r"spatial sizes \(3, 4, 4\) must be multiples of 2"),
    ],
)
def test_bad_inputs_name_the_expected_shape(
    config: BackboneConfig, shape: tuple[int, ...], match: str
) -> None:
    net = _net(config)
    for call in (net, net.encode):
        with pytest.raises(ValueError, match=match):
            call(torch.zeros(shape))


def test_from_dict_refuses_unknown_keys_and_to_dict_is_json() -> None:
    data = CONFIGS[2].to_dict()
    assert json.loads(json.dumps(data)) == data and data["features"] == [4, 4, 8, 8]
    with pytest.raises(
        ValueError, match=r"unknown backbone config keys \['depth'\]; valid keys: \['dropout', "
    ):
        BackboneConfig.from_dict({**data, "depth": 4})
