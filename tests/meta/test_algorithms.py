"""Properties of the meta-learning algorithms and their functional inner loop."""

from __future__ import annotations

import pytest
import torch

from medmeta_plugin.meta import ALGORITHMS, InnerConfig, TaskBatch, episode_gradients
from medmeta_plugin.meta.inner import sgd_steps
from medmeta_plugin.networks import MetaModel
from tests.conftest import blob_cases


def _batch(seed: int = 0) -> TaskBatch:
    cases = blob_cases(4, seed=seed)
    xs, ys = (torch.stack([c[k] for c in cases[:2]]) for k in ("image", "label"))
    xq, yq = (torch.stack([c[k] for c in cases[2:]]) for k in ("image", "label"))
    return TaskBatch("blob", "segmentation", 1, xs, ys, xq, yq)


def test_first_order_steps_match_a_hand_computed_reference() -> None:
    # loss(w) = a * w^2: one step is w - lr * 2 a w, and d(w_1)/d(w_0) = 1 - 2 a lr with second order.
    a, lr, w0 = 3.0, 0.05, torch.tensor(2.0, requires_grad=True)
    out = sgd_steps(lambda p: a * p["w"] ** 2, {"w": w0}, steps=2, lr=lr, first_order=True)
    assert float(out["w"].detach()) == pytest.approx(2.0 * (1 - 2 * a * lr) ** 2)
    (g_first,) = torch.autograd.grad(out["w"], w0)
    assert float(g_first) == pytest.approx(1.0), "first order treats each step's gradient as a constant"
    out = sgd_steps(lambda p: a * p["w"] ** 2, {"w": w0}, steps=2, lr=lr, first_order=False)
    (g_second,) = torch.autograd.grad(out["w"], w0)
    assert float(g_second) == pytest.approx((1 - 2 * a * lr) ** 2)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_gradients_reach_the_backbone_and_leave_it_unchanged(tiny_model: MetaModel, algorithm: str) -> None:
    tiny_model.add_task("blob", "segmentation", mode="head")
    before = {k: v.detach().clone() for k, v in tiny_model.meta_parameters().items()}
    grads, metrics = episode_gradients(algorithm, tiny_model, _batch(), InnerConfig(steps=2))
    backbone_grads = {k: g for k, g in grads.items() if k.startswith("backbone.")}
    assert set(backbone_grads) == set(before)
    assert all(torch.isfinite(g).all() for g in grads.values())
    assert sum(float(g.abs().sum()) for g in backbone_grads.values()) > 0
    for k, v in tiny_model.meta_parameters().items():
        torch.testing.assert_close(v.detach(), before[k], rtol=0, atol=0)
    assert set(metrics) == {"query_loss", "query_score"}


@pytest.mark.parametrize("mode", ["film", "lora"])
def test_anil_adapts_adapters_in_the_inner_loop(tiny_model: MetaModel, mode: str) -> None:
    grads, _ = episode_gradients("anil", tiny_model, _batch(), InnerConfig(steps=1, mode=mode))
    assert all(k.startswith("backbone.") for k in grads)


def test_reptile_without_steps_has_zero_gradient(tiny_model: MetaModel) -> None:
    grads, _ = episode_gradients("reptile", tiny_model, _batch(), InnerConfig(steps=0))
    assert all(float(g.abs().max()) == 0 for g in grads.values())


def test_multitask_needs_the_task_head(tiny_model: MetaModel) -> None:
    with pytest.raises(ValueError, match="unknown task 'blob'"):
        episode_gradients("multitask", tiny_model, _batch(), InnerConfig())


@pytest.mark.parametrize("algorithm", ["anil", "fomaml"])
def test_outer_steps_lower_the_query_loss(tiny_model: MetaModel, algorithm: str) -> None:
    """The meta-gradient is a descent direction: a few outer steps on one episode improve its query loss."""
    batch = _batch(seed=3)
    inner = InnerConfig(steps=1)
    optimizer = torch.optim.Adam(tiny_model.backbone.parameters(), lr=3e-3)
    losses = []
    for _ in range(6):
        grads, metrics = episode_gradients(algorithm, tiny_model, batch, inner)
        losses.append(metrics["query_loss"])
        for name, p in tiny_model.meta_parameters().items():
            p.grad = grads[name]
        optimizer.step()
    assert losses[-1] < losses[0], losses


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"steps": -1}, "steps"),
        ({"lr": 0.0}, "lr"),
        ({"backbone_lr": -1.0}, "lr"),
        ({"mode": "full"}, "head"),
    ],
)
def test_invalid_inner_config(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        InnerConfig(**kwargs)


def test_unknown_algorithm(tiny_model: MetaModel) -> None:
    with pytest.raises(ValueError, match="reptile"):
        episode_gradients("reptil", tiny_model, _batch(), InnerConfig())
