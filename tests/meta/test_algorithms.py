"""Properties of the meta-learning algorithms and their functional inner loop."""

from __future__ import annotations

import pytest
import torch

from medmeta_plugin.adapt import adapt_batch, first_order_head, head_mode_budget, init_head
from medmeta_plugin.meta import ALGORITHMS, InnerConfig, TaskBatch, episode_gradients
from medmeta_plugin.networks import MetaModel, TaskInfo
from medmeta_plugin.networks.objectives import task_loss, task_score
from medmeta_plugin.networks.position import body_position
from tests.conftest import blob_cases


def _batch(seed: int = 0) -> TaskBatch:
    cases = blob_cases(4, seed=seed)
    xs, ys = (torch.stack([c[k] for c in cases[:2]]) for k in ("image", "label"))
    xq, yq = (torch.stack([c[k] for c in cases[2:]]) for k in ("image", "label"))
    return TaskBatch("blob", "segmentation", 1, xs, ys, xq, yq)


def test_first_order_head_has_the_fitted_values_and_the_gradient_of_its_start(tiny_model: MetaModel) -> None:
    batch = _batch()
    base = tiny_model.backbone(batch.xs)
    info = TaskInfo("blob", "segmentation", "head", 1, head="position")
    budget = head_mode_budget(10)
    task, _ = adapt_batch(tiny_model, batch.xs, batch.ys, info, budget, features=base, seed=0)
    head = first_order_head(task, base, batch.ys, budget)
    assert torch.allclose(head["conv.weight"], task.head.conv.weight, atol=1e-6)
    assert torch.allclose(head["conv.bias"], task.head.conv.bias, atol=1e-6)
    assert not torch.equal(task.head.conv.weight, init_head("segmentation", base, batch.ys, 1)["weight"])
    (g_head,) = torch.autograd.grad(head["conv.weight"].sum(), base.features, retain_graph=True)
    start = init_head("segmentation", base, batch.ys, 1)
    (g_start,) = torch.autograd.grad(start["weight"].sum(), base.features)
    assert torch.allclose(g_head, g_start), "each step's change is a constant: the start's gradient only"


def test_anil_inner_loop_is_the_apps_adaptation(tiny_model: MetaModel) -> None:
    """anil's query output is that of adapt_batch, the app's adaptation, fitted on the support."""
    batch, inner = _batch(seed=2), InnerConfig(steps=12)
    torch.manual_seed(5)
    _, metrics = episode_gradients("anil", tiny_model, batch, inner)
    torch.manual_seed(5)
    seed = int(torch.randint(0, 2**31 - 1, ()))
    info = TaskInfo("episode", "segmentation", "head", 1, head=inner.head)
    task, report = adapt_batch(tiny_model, batch.xs, batch.ys, info, inner.budget(), seed=seed)
    assert report.loo_curve, "k = 2: the inner loop chooses its steps by leave-one-out, as the app does"
    with torch.no_grad():
        base = tiny_model.backbone(batch.xq)
        out = task.head(base._replace(position=body_position(batch.xq)))
    assert metrics["query_score"] == pytest.approx(task_score("segmentation", out, batch.yq), abs=1e-5)
    assert metrics["query_loss"] == pytest.approx(float(task_loss("segmentation", out, batch.yq)), abs=1e-5)


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
        ({"mode": "full"}, "head"),
        ({"head": "mlp"}, "position"),
    ],
)
def test_invalid_inner_config(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        InnerConfig(**kwargs)


def test_unknown_algorithm(tiny_model: MetaModel) -> None:
    with pytest.raises(ValueError, match="reptile"):
        episode_gradients("reptil", tiny_model, _batch(), InnerConfig())


def test_meta_training_the_app_and_the_benchmark_share_one_step_budget() -> None:
    """One number caps the adaptation's steps for all three users, and they build the same budget from it."""
    from medmeta_plugin.adapt import HEAD_MODE_STEPS
    from medmeta_plugin.app.config import AppConfig
    from medmeta_plugin.benchmarks.fewshot import BenchmarkConfig
    from medmeta_plugin.networks.heads import DEFAULT_SEGMENTATION_HEAD

    assert (
        InnerConfig().steps
        == AppConfig().adapt_steps
        == BenchmarkConfig("synthetic-heldout").head_steps
        == HEAD_MODE_STEPS
    )
    assert InnerConfig().budget() == head_mode_budget(HEAD_MODE_STEPS)
    assert InnerConfig().head == AppConfig().head == DEFAULT_SEGMENTATION_HEAD
