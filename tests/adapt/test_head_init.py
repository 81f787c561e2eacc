"""Closed-form head initialisation on synthetic features, beyond what ``test_adaptation.py`` checks.

- Shapes: each function returns the documented ``weight`` and ``bias`` shapes, and :func:`init_head`
  dispatches each kind to its function.
- Segmentation: the decision boundary passes midway between the prototypes, with the background prototype
  at ``-PROTOTYPE_MARGIN / 2``.
- Classification: the head is nearest-prototype classification of any query, its logits do not depend on
  the embeddings' scale, and zero embeddings give a finite head.
- Regression: the dual form equals the primal ridge solution, a tiny ridge recovers an exact linear map, and
  one support case gives a zero weight and the target as bias.
- All three are differentiable in the features (``torch.autograd.gradcheck``).
"""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from medmeta_plugin.adapt.head_init import (
    PROTOTYPE_MARGIN,
    classification_head_init,
    init_head,
    regression_head_init,
    segmentation_head_init,
)
from medmeta_plugin.networks.backbone import BackboneOutput


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def _output(gen: torch.Generator, k: int = 3, channels: int = 4, embedding: int = 6) -> BackboneOutput:
    """A support batch's backbone output: features (k, C, 5, 4, 3) and embedding (k, E)."""
    return BackboneOutput(
        torch.randn(k, channels, 5, 4, 3, generator=gen), torch.randn(k, embedding, generator=gen)
    )


# ----- shapes and dispatch ----------------------------------------------------------------------------------
KINDS = [
    # kind, targets of a 3-case support set, num_outputs, weight shape, bias shape
    (
        "segmentation",
        lambda g: (torch.rand(3, 1, 5, 4, 3, generator=g) > 0.5).float(),
        1,
        (1, 4, 1, 1, 1),
        (1,),
    ),
    ("classification", lambda g: torch.tensor([0, 2, 2]), 3, (3, 6), (3,)),
    ("classification", lambda g: torch.tensor([1, 0, 1]), 5, (5, 6), (5,)),
    ("regression", lambda g: torch.randn(3, generator=g), 1, (1, 6), (1,)),
    ("regression", lambda g: torch.randn(3, 2, generator=g), 2, (2, 6), (2,)),
]
DIRECT = {
    "segmentation": lambda base, targets, n: segmentation_head_init(base.features, targets),
    "classification": lambda base, targets, n: classification_head_init(base.embedding, targets, n),
    "regression": lambda base, targets, n: regression_head_init(base.embedding, targets),
}


@pytest.mark.parametrize(("kind", "targets", "outputs", "weight_shape", "bias_shape"), KINDS)
def test_init_head_gives_the_documented_shapes_of_its_kinds_function(
    gen: torch.Generator, kind: str, targets, outputs: int, weight_shape: tuple, bias_shape: tuple
) -> None:
    base, y = _output(gen), targets(gen)
    head = init_head(kind, base, y, outputs)
    assert set(head) == {"weight", "bias"}
    assert head["weight"].shape == weight_shape and head["bias"].shape == bias_shape
    weight, bias = DIRECT[kind](base, y, outputs)
    torch.testing.assert_close(head["weight"], weight, rtol=0, atol=0)
    torch.testing.assert_close(head["bias"], bias, rtol=0, atol=0)
    assert torch.isfinite(head["weight"]).all() and torch.isfinite(head["bias"]).all()


@pytest.mark.parametrize("kind", ["classificaton", "detection"])
def test_init_head_refuses_an_unknown_kind(gen: torch.Generator, kind: str) -> None:
    with pytest.raises(ValueError, match=kind):
        init_head(kind, _output(gen), torch.tensor([0, 1, 1]), 2)


# ----- segmentation -----------------------------------------------------------------------------------------
def test_the_segmentation_boundary_lies_midway_between_the_prototypes(gen: torch.Generator) -> None:
    features = torch.randn(2, 5, 6, 6, 6, generator=gen)
    mask = (torch.rand(2, 1, 6, 6, 6, generator=gen) > 0.6).float()
    weight, bias = segmentation_head_init(features, mask)
    fg = (features * mask).sum((0, 2, 3, 4)) / mask.sum()
    bg = (features * (1 - mask)).sum((0, 2, 3, 4)) / (1 - mask).sum()

    def logit(point: torch.Tensor) -> float:
        return float(F.conv3d(point.view(1, 5, 1, 1, 1), weight, bias))

    assert logit(bg) == pytest.approx(-PROTOTYPE_MARGIN / 2, rel=1e-3)
    assert logit((fg + bg) / 2) == pytest.approx(0.0, abs=1e-4)
    # The weight points from the background to the foreground prototype.
    torch.testing.assert_close(F.normalize(weight.flatten(), dim=0), F.normalize(fg - bg, dim=0))


# ----- classification ---------------------------------------------------------------------------------------
def test_the_classification_head_is_nearest_prototype_for_any_query(gen: torch.Generator) -> None:
    labels = torch.tensor([0, 0, 1, 2, 2, 2, 4])  # class 3 unseen
    embedding = torch.randn(7, 8, generator=gen)
    weight, bias = classification_head_init(embedding, labels, num_classes=5)
    seen = torch.tensor([0, 1, 2, 4])
    protos = torch.stack([embedding[labels == c].mean(0) for c in seen.tolist()])
    queries = 2 * torch.randn(200, 8, generator=gen)
    nearest = seen[torch.cdist(queries, protos).argmin(1)]
    assert torch.equal((queries @ weight.T + bias).argmax(1), nearest)


@pytest.mark.parametrize("scale", [0.05, 1e3])  # above the floor of tau (1e-3)
def test_classification_logits_do_not_depend_on_the_embeddings_scale(
    gen: torch.Generator, scale: float
) -> None:
    labels = torch.tensor([0, 1, 1, 2])
    embedding = torch.randn(4, 6, generator=gen, dtype=torch.float64)
    queries = torch.randn(10, 6, generator=gen, dtype=torch.float64)
    weight, bias = classification_head_init(embedding, labels, 3)
    scaled_weight, scaled_bias = classification_head_init(scale * embedding, labels, 3)
    torch.testing.assert_close(scale * queries @ scaled_weight.T + scaled_bias, queries @ weight.T + bias)


def test_zero_embeddings_give_a_finite_classification_head() -> None:
    weight, bias = classification_head_init(torch.zeros(3, 4), torch.tensor([0, 1, 1]), 3)
    assert torch.isfinite(weight).all() and torch.isfinite(bias).all()
    assert bias[2] < bias[:2].min(), "the unseen class stays last"


# ----- regression -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("cases", "dims", "ridge"), [(4, 7, 1.0), (9, 3, 0.1), (5, 5, 10.0)])
def test_the_dual_ridge_solution_equals_the_primal_one(
    gen: torch.Generator, cases: int, dims: int, ridge: float
) -> None:
    embedding = torch.randn(cases, dims, generator=gen, dtype=torch.float64)
    values = torch.randn(cases, 2, generator=gen, dtype=torch.float64)
    weight, bias = regression_head_init(embedding, values, ridge=ridge)
    e = embedding - embedding.mean(0)
    primal = torch.linalg.solve(
        e.T @ e + ridge * torch.eye(dims, dtype=e.dtype), e.T @ (values - values.mean(0))
    )
    torch.testing.assert_close(weight, primal.T)
    # The fitted line passes through the means.
    torch.testing.assert_close(embedding.mean(0) @ weight.T + bias, values.mean(0))


def test_a_tiny_ridge_recovers_an_exact_linear_map(gen: torch.Generator) -> None:
    embedding = torch.randn(12, 4, generator=gen, dtype=torch.float64)
    true_weight = torch.randn(3, 4, generator=gen, dtype=torch.float64)
    true_bias = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    weight, bias = regression_head_init(embedding, embedding @ true_weight.T + true_bias, ridge=1e-9)
    torch.testing.assert_close(weight, true_weight, atol=1e-6, rtol=0)
    torch.testing.assert_close(bias, true_bias, atol=1e-6, rtol=0)


def test_one_regression_case_gives_a_zero_weight_and_its_target_as_bias(gen: torch.Generator) -> None:
    weight, bias = regression_head_init(torch.randn(1, 5, generator=gen), torch.tensor([[3.0, -7.0]]))
    assert torch.equal(weight, torch.zeros(2, 5))
    torch.testing.assert_close(bias, torch.tensor([3.0, -7.0]))


# ----- differentiability ------------------------------------------------------------------------------------
def test_segmentation_init_is_differentiable_in_the_features(gen: torch.Generator) -> None:
    features = torch.randn(2, 3, 3, 3, 2, generator=gen, dtype=torch.float64, requires_grad=True)
    mask = (torch.rand(2, 1, 3, 3, 2, generator=gen) > 0.5).double()
    assert torch.autograd.gradcheck(lambda f: segmentation_head_init(f, mask), (features,))


def test_classification_init_is_differentiable_in_the_embedding(gen: torch.Generator) -> None:
    embedding = torch.randn(4, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 1, 1, 3])  # class 2 unseen: its floor bias follows the seen biases
    assert torch.autograd.gradcheck(lambda e: classification_head_init(e, labels, 4), (embedding,))


def test_regression_init_is_differentiable_in_the_embedding(gen: torch.Generator) -> None:
    embedding = torch.randn(4, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    values = torch.randn(4, 2, generator=gen, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda e: regression_head_init(e, values), (embedding,))
