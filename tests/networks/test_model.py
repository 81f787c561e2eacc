"""Properties of the composed model: identity adapters, fast/meta split, functional calls, budgets."""

from __future__ import annotations

import pytest
import torch

from medmeta_plugin.networks import ADAPTER_MODES, Backbone3D, BackboneConfig, MetaModel

SMALL = BackboneConfig(features=(8, 16, 16), norm="group", groups=4)


@pytest.fixture
def model() -> MetaModel:
    torch.manual_seed(0)
    return MetaModel(config=SMALL)


@pytest.fixture
def x() -> torch.Tensor:
    return torch.randn(2, 1, 16, 16, 8, generator=torch.Generator().manual_seed(1))


def _perturb(params: dict[str, torch.Tensor], scale: float = 0.1) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(2)
    return {k: p.detach() + scale * torch.randn(p.shape, generator=gen) for k, p in params.items()}


@pytest.mark.parametrize("mode", ADAPTER_MODES)
def test_fresh_adapter_is_identity(model: MetaModel, x: torch.Tensor, mode: str) -> None:
    task = model.add_task("t", "segmentation", mode=mode)
    backbone = task.adapter.backbone if mode == "full" else model.backbone
    plain = model.backbone(x)
    adapted = backbone(x, adapter=task.adapter)
    torch.testing.assert_close(adapted.features, plain.features, rtol=0, atol=0)
    torch.testing.assert_close(adapted.embedding, plain.embedding, rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["film", "lora", "full"])
def test_perturbed_adapter_changes_features(model: MetaModel, x: torch.Tensor, mode: str) -> None:
    """The identity test above is meaningful only if a non-zero adapter does change the features."""
    model.add_task("t", "segmentation", mode=mode)
    fast = {k: v for k, v in model.fast_parameters("t").items() if ".head." not in k}
    before = model(x, "t")
    after = model.functional_forward(x, "t", _perturb(fast))
    assert not torch.allclose(before, after)


@pytest.mark.parametrize("mode", ADAPTER_MODES)
def test_fast_step_leaves_backbone_unchanged(model: MetaModel, x: torch.Tensor, mode: str) -> None:
    model.add_task("t", "segmentation", mode=mode)
    backbone_before = {k: v.detach().clone() for k, v in model.meta_parameters().items()}
    fast = model.fast_parameters("t")
    fast_before = {k: v.detach().clone() for k, v in fast.items()}
    optimizer = torch.optim.SGD(fast.values(), lr=0.5)
    loss = model(x, "t").sigmoid().mean()
    loss.backward()
    optimizer.step()
    for k, v in model.meta_parameters().items():
        torch.testing.assert_close(v, backbone_before[k], rtol=0, atol=0, msg=f"{k} changed")
    assert any(not torch.equal(v, fast_before[k]) for k, v in fast.items()), "the step moved nothing"


@pytest.mark.parametrize("mode", ADAPTER_MODES)
@pytest.mark.parametrize(
    ("kind", "outputs"), [("segmentation", None), ("classification", 3), ("regression", 2)]
)
def test_functional_call_equals_module_call(
    model: MetaModel, x: torch.Tensor, mode: str, kind: str, outputs: int | None
) -> None:
    model.add_task("t", kind, mode=mode, num_outputs=outputs)
    fast = model.fast_parameters("t")
    torch.testing.assert_close(model.functional_forward(x, "t", fast), model(x, "t"))
    # With other values: functional output equals the module's output after loading those values, and the
    # functional call itself left the stored parameters alone.
    new = _perturb(fast)
    stored = {k: v.detach().clone() for k, v in fast.items()}
    functional = model.functional_forward(x, "t", new)
    for k, v in fast.items():
        torch.testing.assert_close(v.detach(), stored[k], rtol=0, atol=0)
    with torch.no_grad():
        for k, v in fast.items():
            v.copy_(new[k])
    torch.testing.assert_close(functional, model(x, "t"))


def test_functional_gradients_reach_fast_and_meta_parameters(model: MetaModel, x: torch.Tensor) -> None:
    model.add_task("t", "segmentation", mode="film")
    params = {k: v.detach().clone().requires_grad_(True) for k, v in model.named_parameters()}
    loss = model.functional_forward(x, "t", params).square().mean()
    grads = torch.autograd.grad(loss, [params[k] for k in params], allow_unused=True)
    named = dict(zip(params, grads))
    assert named["tasks.t.head.conv.weight"].abs().sum() > 0
    assert named["tasks.t.adapter.beta.0"].abs().sum() > 0
    assert named["backbone.encoder.0.conv1.block.conv.weight"].abs().sum() > 0


@pytest.mark.parametrize(
    ("kind", "outputs", "shape"),
    [
        ("segmentation", None, (2, 1, 16, 16, 8)),
        ("classification", 4, (2, 4)),
        ("regression", None, (2, 1)),
        ("regression", 3, (2, 3)),
    ],
)
def test_output_shapes(
    model: MetaModel, x: torch.Tensor, kind: str, outputs: int | None, shape: tuple
) -> None:
    model.add_task("t", kind, mode="film", num_outputs=outputs)
    assert tuple(model(x, "t").shape) == shape


@pytest.mark.parametrize("mode", ["film", "lora"])
@pytest.mark.parametrize("features", [(16, 32, 64, 128), (32, 64, 128, 256), (16, 32, 64, 128, 256)])
def test_light_adapters_stay_within_two_percent(mode: str, features: tuple[int, ...]) -> None:
    model = MetaModel(config=BackboneConfig(features=features))
    task = model.add_task("t", "segmentation", mode=mode)
    n_adapter = sum(p.numel() for p in task.adapter.parameters())
    n_backbone = sum(p.numel() for p in model.backbone.parameters())
    assert 0 < n_adapter <= 0.02 * n_backbone


def test_tasks_are_independent(model: MetaModel, x: torch.Tensor) -> None:
    model.add_task("a", "segmentation", mode="film")
    model.add_task("b", "segmentation", mode="film")
    b_before = model(x, "b")
    with torch.no_grad():
        for p in model.fast_parameters("a").values():
            p.add_(0.5)
    torch.testing.assert_close(model(x, "b"), b_before, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda m: m.add_task("t", "segmentation", mode="lorra"), "lora"),
        (lambda m: m.add_task("t", "segmentatoin"), "segmentation"),
        (lambda m: m.add_task("t", "classification"), "num_outputs"),
        (lambda m: m.add_task("t", "classification", num_outputs=1), "num_classes"),
        (lambda m: m.add_task("t", "segmentation", num_outputs=2), "one output"),
        (lambda m: m.add_task("../etc", "segmentation"), "invalid task name"),
        (lambda m: m.add_task("a/b", "segmentation"), "invalid task name"),
        (lambda m: m.add_task("t", "segmentation", mode="film", rank=2), "no hyper-parameters"),
        (lambda m: m.add_task("t", "segmentation", mode="lora", rank=0), "rank"),
        (lambda m: m(torch.zeros(1, 1, 16, 16, 8), "missing"), "unknown task 'missing'"),
        (lambda m: m.backbone(torch.zeros(1, 2, 16, 16, 8)), r"shape \(B, 1, X, Y, Z\)"),
        (lambda m: m.backbone(torch.zeros(1, 1, 16, 16, 6)), "multiples of 4"),
        (
            lambda m: m.functional_forward(torch.zeros(1, 1, 8, 8, 8), "t", {"nope": torch.zeros(1)}),
            "unknown parameters",
        ),
    ],
)
def test_invalid_inputs(model: MetaModel, call, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        call(model)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"features": (8,)}, "at least two"),
        ({"features": (8, 0)}, "at least two"),
        ({"norm": "batch"}, "instance"),
        ({"norm": "group", "features": (6, 12), "groups": 4}, "divisible"),
        ({"in_channels": 0}, "in_channels"),
        ({"dropout": 1.0}, "dropout"),
        ({"feature_levels": 0}, "feature_levels"),
        ({"features": (8, 16), "feature_levels": 2}, "feature_levels"),
    ],
)
def test_invalid_backbone_config(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        BackboneConfig(**kwargs)


@pytest.mark.parametrize(
    "config",
    [
        BackboneConfig(),
        BackboneConfig(in_channels=2, features=(8, 16), norm="group", groups=8, dropout=0.1),
        BackboneConfig(features=(8, 16, 32), feature_levels=2),
    ],
)
def test_backbone_config_round_trip(config: BackboneConfig) -> None:
    assert BackboneConfig.from_dict(config.to_dict()) == config
    net = Backbone3D(config)
    out = net(torch.zeros(1, config.in_channels, 16, 16, 16))
    assert out.features.shape[1] == net.feature_channels
    assert out.embedding.shape == (1, net.embedding_dim)


@pytest.mark.parametrize("levels", [2, 3])
def test_coarser_feature_levels_append_upsampled_decoder_outputs(levels: int) -> None:
    """The finest level's channels come first and are those of a one-level backbone with the same weights;
    each coarser decoder level follows at full resolution; a config without the key means one level."""
    torch.manual_seed(0)
    wide = Backbone3D(BackboneConfig(features=(4, 8, 16, 32), feature_levels=levels))
    narrow = Backbone3D(BackboneConfig(features=(4, 8, 16, 32)))
    narrow.load_state_dict(wide.state_dict())
    x = torch.randn(2, 1, 16, 24, 16)
    levels_out, finest = wide(x).features, narrow(x).features
    assert wide.feature_channels == sum((4, 8, 16)[:levels]) == levels_out.shape[1]
    assert levels_out.shape[2:] == x.shape[2:]
    torch.testing.assert_close(levels_out[:, :4], finest)
    assert levels_out[:, 4:].abs().sum() > 0
    legacy = {k: v for k, v in wide.config.to_dict().items() if k != "feature_levels"}
    assert BackboneConfig.from_dict(legacy).feature_levels == 1


@pytest.mark.parametrize("mode", ["film", "lora"])
def test_a_reused_encoding_gives_the_same_features(model: MetaModel, x: torch.Tensor, mode: str) -> None:
    """film and lora adapt the decoder only: adaptation encodes its support once and reuses it every step."""
    task = model.add_task("t", "segmentation", mode=mode)
    fast = {k: v for k, v in model.fast_parameters("t").items() if ".head." not in k}
    with torch.no_grad():
        for name, value in _perturb(fast).items():  # a non-identity adapter
            model.get_parameter(name).copy_(value)
    encoded = model.backbone.encode(x)
    assert [tuple(e.shape[1:2]) for e in encoded] == [(c,) for c in SMALL.features]
    whole = model.backbone(x, adapter=task.adapter)
    reused = model.backbone(x, adapter=task.adapter, encoded=encoded)
    torch.testing.assert_close(reused.features, whole.features, rtol=0, atol=0)
    torch.testing.assert_close(reused.embedding, whole.embedding, rtol=0, atol=0)


def test_a_full_adapter_cannot_reuse_an_encoding(model: MetaModel, x: torch.Tensor) -> None:
    task = model.add_task("t", "segmentation", mode="full")
    with pytest.raises(ValueError, match="changes the encoder"):
        task.adapter.backbone(x, adapter=task.adapter, encoded=model.backbone.encode(x))
