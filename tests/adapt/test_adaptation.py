"""Properties of few-shot adaptation."""

from __future__ import annotations

import math

import pytest
import torch

from medmeta_plugin.adapt import (
    AdaptBudget,
    adapt,
    classification_head_init,
    head_mode_budget,
    segmentation_head_init,
)
from medmeta_plugin.adapt.adaptation import _held_out_cases, _voxel_sample
from medmeta_plugin.adapt.head_init import PROTOTYPE_MARGIN
from medmeta_plugin.networks import ADAPTER_MODES, MetaModel
from medmeta_plugin.networks.objectives import task_score
from tests.conftest import blob_cases

FAST = AdaptBudget(steps=6, eval_every=3, lr=0.05)


def _snapshot(model: MetaModel) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.backbone.state_dict().items()}


@pytest.mark.parametrize("mode", ADAPTER_MODES)
def test_adaptation_never_touches_the_backbone(tiny_model: MetaModel, mode: str) -> None:
    before = _snapshot(tiny_model)
    task, report = adapt(tiny_model, blob_cases(2, seed=0), "segmentation", mode, FAST, name="blob")
    for k, v in tiny_model.backbone.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0, msg=f"{k} changed")
    assert all(p.grad is None for p in tiny_model.backbone.parameters())
    assert "blob" not in tiny_model.tasks, "adapt must not attach the adapter itself"
    assert report.mode == mode and report.shots == 2 and report.seconds > 0


def test_support_loss_drops(tiny_model: MetaModel) -> None:
    support = blob_cases(3, seed=1)
    start, _ = adapt(tiny_model, support, "segmentation", "film", AdaptBudget(steps=0), name="b")
    _, report = adapt(
        tiny_model, support, "segmentation", "film", AdaptBudget(steps=15, early_stopping=False)
    )
    assert report.steps == 15
    from medmeta_plugin.adapt import stack_support
    from medmeta_plugin.networks.objectives import task_loss

    images, masks = stack_support(support, "segmentation", torch.device("cpu"))
    tiny_model.attach(start)
    with torch.no_grad():
        start_loss = float(task_loss("segmentation", tiny_model(images, "b"), masks))
    assert report.final_support_loss < start_loss


def test_prototype_head_separates_separable_features() -> None:
    gen = torch.Generator().manual_seed(0)
    mask = (torch.rand(2, 1, 8, 8, 8, generator=gen) > 0.7).float()
    centre = torch.randn(6, generator=gen)
    features = 0.1 * torch.randn(2, 6, 8, 8, 8, generator=gen) + (2 * mask - 1) * centre.view(1, 6, 1, 1, 1)
    weight, bias = segmentation_head_init(features, mask)
    logits = torch.nn.functional.conv3d(features, weight, bias)
    assert task_score("segmentation", logits, mask) > 0.99
    # The margin is placed as documented: +/- MARGIN / 2 at the two prototypes.
    fg = (features * mask).sum((0, 2, 3, 4)) / mask.sum()
    at_fg = torch.nn.functional.conv3d(fg.view(1, 6, 1, 1, 1), weight, bias)
    assert float(at_fg) == pytest.approx(PROTOTYPE_MARGIN / 2, rel=1e-3)


@pytest.mark.parametrize("present", [False, True])
def test_prototype_head_without_one_class(present: bool) -> None:
    mask = torch.full((1, 1, 4, 4, 4), float(present))
    weight, bias = segmentation_head_init(torch.randn(1, 3, 4, 4, 4), mask)
    assert torch.all(weight == 0) and (float(bias) > 0) == present


def test_classification_prototypes_classify_their_own_support() -> None:
    gen = torch.Generator().manual_seed(1)
    centres = 3 * torch.randn(3, 10, generator=gen)
    labels = torch.tensor([0, 0, 1, 1, 2])
    embedding = centres[labels] + 0.1 * torch.randn(5, 10, generator=gen)
    weight, bias = classification_head_init(embedding, labels, num_classes=4)
    assert torch.equal((embedding @ weight.T + bias).argmax(1), labels)
    assert torch.all(weight[3] == 0) and bias[3] < bias[:3].min(), "an unseen class starts last"


def test_leave_one_out_chooses_the_step_count(tiny_model: MetaModel) -> None:
    _, one = adapt(tiny_model, blob_cases(1, seed=4), "segmentation", "head", FAST)
    assert one.steps == FAST.steps and one.loo_score is None, "k = 1 uses the fixed budget"
    _, many = adapt(tiny_model, blob_cases(3, seed=4), "segmentation", "head", FAST)
    assert many.loo_score is not None and 0.0 <= many.loo_score <= 1.0
    assert many.steps in {s for s, _ in many.loo_curve}
    assert [s for s, _ in many.loo_curve] == [0, 3, 6]
    assert many.loo_score == max(v for _, v in many.loo_curve)


@pytest.mark.parametrize("mode", ["head", "lora"])
def test_adaptation_is_seeded(tiny_model: MetaModel, mode: str) -> None:
    support = blob_cases(2, seed=5)
    a, _ = adapt(tiny_model, support, "segmentation", mode, FAST, seed=7)
    b, _ = adapt(tiny_model, support, "segmentation", mode, FAST, seed=7)
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(va, vb, rtol=0, atol=0, msg=k)


@pytest.mark.parametrize(
    ("kind", "targets", "outputs"),
    [
        ("classification", [0, 1, 1], 2),
        ("regression", [1.5, -0.5, 3.0], None),
    ],
)
def test_volume_level_kinds(tiny_model: MetaModel, kind: str, targets: list, outputs: int | None) -> None:
    cases = [{"image": c["image"], "target": torch.tensor(t)} for c, t in zip(blob_cases(3, seed=6), targets)]
    task, report = adapt(tiny_model, cases, kind, "head", FAST, num_outputs=outputs)
    tiny_model.attach(task)
    out = tiny_model(torch.stack([c["image"] for c in cases]), "adapted")
    assert out.shape == (3, outputs or 1)
    assert report.kind == kind


def test_regression_init_fits_the_support_mean_with_one_shot(tiny_model: MetaModel) -> None:
    case = {"image": blob_cases(1, seed=7)[0]["image"], "target": torch.tensor(42.0)}
    task, _ = adapt(tiny_model, [case], "regression", "head", AdaptBudget(steps=0))
    tiny_model.attach(task)
    assert float(tiny_model(case["image"][None], "adapted")) == pytest.approx(42.0, rel=1e-4)


@pytest.mark.parametrize(
    ("support", "kind", "kwargs", "match"),
    [
        ([], "segmentation", {}, "support is empty"),
        ([{"image": torch.zeros(1, 16, 16, 16)}], "segmentation", {}, "needs keys"),
        (
            [{"image": torch.zeros(16, 16, 16), "label": torch.zeros(16, 16, 16)}],
            "segmentation",
            {},
            r"\(C, X, Y, Z\)",
        ),
        (
            [{"image": torch.zeros(1, 16, 16, 16), "label": torch.zeros(1, 8, 8, 8)}],
            "segmentation",
            {},
            "does not match",
        ),
        (
            [
                {"image": torch.zeros(1, 16, 16, 16), "label": torch.zeros(1, 16, 16, 16)},
                {"image": torch.zeros(1, 16, 16, 8), "label": torch.zeros(1, 16, 16, 8)},
            ],
            "segmentation",
            {},
            "share one shape",
        ),
        ([{"image": torch.zeros(1, 16, 16, 16), "target": 1}], "classification", {}, "num_outputs"),
        (
            [{"image": torch.zeros(1, 16, 16, 16), "target": 3}],
            "classification",
            {"num_outputs": 3},
            "out of range",
        ),
        (
            [{"image": torch.zeros(1, 16, 16, 16), "label": torch.zeros(1, 16, 16, 16)}],
            "segmentaton",
            {},
            "segmentation",
        ),
        (
            [{"image": torch.zeros(1, 16, 16, 16), "label": torch.zeros(1, 16, 16, 16)}],
            "segmentation",
            {"mode": "flim"},
            "film",
        ),
    ],
)
def test_invalid_support(tiny_model: MetaModel, support, kind: str, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        adapt(tiny_model, support, kind, budget=FAST, **kwargs)


def _masks(fg_counts: list[int], n_vox: int = 4096) -> torch.Tensor:
    masks = torch.zeros(len(fg_counts), 1, n_vox)
    for i, count in enumerate(fg_counts):
        masks[i, 0, torch.randperm(n_vox, generator=torch.Generator().manual_seed(i))[:count]] = 1
    return masks.view(len(fg_counts), 1, 16, 16, 16)


@pytest.mark.parametrize(
    ("how", "fg_counts", "n", "fg_taken"),
    [
        ("stratified", [10, 0], 512, [10, 0]),  # a small structure: every foreground voxel
        ("stratified", [3000, 40], 512, [256, 40]),  # a large one: half the sample
        ("stratified", [4000], 512, [416]),  # 96 background voxels: all of them, foreground fills up
        ("balanced", [10, 3000], 512, [10, 256]),
    ],
)
def test_stratified_voxel_sample(how: str, fg_counts: list[int], n: int, fg_taken: list[int]) -> None:
    masks = _masks(fg_counts)
    index, weight = _voxel_sample(masks, n, how)
    assert index.shape == (len(fg_counts), n)
    flat = masks.view(len(fg_counts), -1)
    for i, (count, taken) in enumerate(zip(fg_counts, fg_taken)):
        assert len(set(index[i].tolist())) == n, "no voxel twice"
        picked = flat[i, index[i]]
        assert int(picked.sum()) == taken
        if how == "stratified":
            # Each stratum's weights add up to its population: the loss sums estimate whole-volume sums.
            w = weight[i].view(-1)
            assert float(w[picked > 0].sum()) == pytest.approx(count)
            assert float(w[picked == 0].sum()) == pytest.approx(flat.shape[1] - count)
    assert (weight is None) == (how == "balanced")


def test_uniform_voxel_sample_keeps_the_foreground_fraction() -> None:
    masks = _masks([400, 400])
    index, weight = _voxel_sample(masks, 2048, "uniform")
    assert weight is None and torch.equal(index[0], index[1])
    assert 100 < int(masks.view(2, -1)[0, index[0]].sum()) < 300  # ~200 expected


@pytest.mark.parametrize("how", ["uniform", "stratified", "balanced"])
def test_head_mode_fits_whole_volumes_larger_than_the_sample(tiny_model: MetaModel, how: str) -> None:
    support = blob_cases(2, seed=3, size=36)  # 46,656 voxels > HEAD_VOXELS
    budget = AdaptBudget(steps=10, early_stopping=False, voxel_sample=how)
    start, _ = adapt(tiny_model, support, "segmentation", "head", AdaptBudget(steps=0), name="b")
    _, report = adapt(tiny_model, support, "segmentation", "head", budget, name="b")
    from medmeta_plugin.adapt import stack_support
    from medmeta_plugin.networks.objectives import task_loss

    images, masks = stack_support(support, "segmentation", torch.device("cpu"))
    tiny_model.attach(start)
    with torch.no_grad():
        start_loss = float(task_loss("segmentation", tiny_model(images, "b"), masks))
    assert report.final_support_loss < start_loss


def test_cached_features_must_match_the_support(tiny_model: MetaModel) -> None:
    support = blob_cases(2, seed=0)
    from medmeta_plugin.adapt import stack_support

    images, _ = stack_support(support, "segmentation", torch.device("cpu"))
    with torch.no_grad():
        features = tiny_model.backbone(images[:1])
    with pytest.raises(ValueError, match="do not belong to the support"):
        adapt(tiny_model, support, "segmentation", "head", FAST, features=features)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"steps": -1}, "steps"),
        ({"lr": 0}, "lr"),
        ({"eval_every": 0}, "eval_every"),
        ({"voxel_sample": "stratifed"}, "stratified"),
        ({"step_voxels": -1}, "step_voxels"),
        ({"precision": "fp16"}, "bf16"),
        ({"loo_folds": 0}, "loo_folds"),
    ],
)
def test_invalid_budget(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        AdaptBudget(**kwargs)


def test_the_prior_shift_restores_the_volumes_foreground_fraction(tiny_model: MetaModel) -> None:
    """The balanced sample takes every foreground voxel (up to half the sample), so a structure that is 1%
    of the volume is 2% of the sample; the shift moves the bias by logit(1%) - logit(2%)."""
    from medmeta_plugin.adapt.adaptation import HEAD_VOXELS

    size = 40  # 64k voxels > HEAD_VOXELS, so head mode fits on the sample
    assert size**3 > HEAD_VOXELS
    case = blob_cases(1, seed=3, size=size)[0]
    case["label"] = torch.zeros_like(case["label"])
    case["label"][:, 5:13, 5:13, 5:15] = 1.0  # 640 voxels, 1% of the volume
    budget = AdaptBudget(steps=0)
    shifted, _ = adapt(tiny_model, [case], "segmentation", "head", budget)
    plain, _ = adapt(tiny_model, [case], "segmentation", "head", AdaptBudget(steps=0, prior_shift=False))
    whole = 640 / size**3
    sampled = 640 / HEAD_VOXELS
    expected = math.log(whole / (1 - whole)) - math.log(sampled / (1 - sampled))
    shift = float(shifted.head.conv.bias - plain.head.conv.bias)
    assert shift == pytest.approx(expected, rel=1e-4) and shift < -0.6
    # No shift for the uniform sample, which keeps the volumes' prior.
    uniform = AdaptBudget(steps=0, voxel_sample="uniform")
    a, _ = adapt(tiny_model, [case], "segmentation", "head", uniform)
    b, _ = adapt(
        tiny_model,
        [case],
        "segmentation",
        "head",
        AdaptBudget(steps=0, voxel_sample="uniform", prior_shift=False),
    )
    assert torch.equal(a.head.conv.bias, b.head.conv.bias)


def test_head_mode_steps_draw_fresh_voxel_subsets_deterministically(tiny_model: MetaModel) -> None:
    """Stochastic steps on subsets of the sample: the same seed gives the same adapter; the whole sample
    every step gives another."""
    case = blob_cases(1, seed=4, size=40)[0]
    budget = AdaptBudget(steps=5, step_voxels=1024)
    a, _ = adapt(tiny_model, [case], "segmentation", "head", budget, seed=1, head="position")
    b, _ = adapt(tiny_model, [case], "segmentation", "head", budget, seed=1, head="position")
    whole, _ = adapt(
        tiny_model,
        [case],
        "segmentation",
        "head",
        AdaptBudget(steps=5, step_voxels=0),
        seed=1,
        head="position",
    )
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa, pb), name
    assert not all(torch.equal(pa, pw) for pa, pw in zip(a.parameters(), whole.parameters()))


@pytest.mark.parametrize("mode", ADAPTER_MODES)
def test_bf16_adaptation_fits_as_float32_does(tiny_model: MetaModel, mode: str) -> None:
    """bfloat16 backbone passes (``precision="bf16"``) change the numbers a little, not the fit: the head
    still works in float32, and the support loss falls about as far as in float32."""
    support = blob_cases(3, seed=4)
    losses = {}
    for value in ("fp32", "bf16"):
        for steps in (0, 15):
            budget = AdaptBudget(steps=steps, early_stopping=False, lr=0.05, precision=value)
            task, report = adapt(tiny_model, support, "segmentation", mode, budget, name=value, seed=0)
            assert all(p.dtype is torch.float32 for p in task.parameters())
            losses[value, steps] = report.final_support_loss
    assert losses["bf16", 0] == pytest.approx(losses["fp32", 0], rel=0.05)  # the closed-form head
    assert losses["bf16", 15] < 0.8 * losses["bf16", 0]
    assert losses["bf16", 15] < 1.25 * losses["fp32", 15]


@pytest.mark.parametrize(
    ("k", "folds", "held_out"),
    [
        (5, None, [0, 1, 2, 3, 4]),
        (5, 3, [0, 2, 4]),
        (8, 4, [0, 2, 5, 7]),
        (8, 1, [0]),
        (2, 3, [0, 1]),
        (3, 3, [0, 1, 2]),
    ],
)
def test_leave_one_out_folds_are_capped_evenly(k: int, folds: int | None, held_out: list[int]) -> None:
    assert _held_out_cases(k, folds) == held_out


def test_capped_leave_one_out_still_chooses_the_step_count(tiny_model: MetaModel) -> None:
    budget = AdaptBudget(steps=6, eval_every=3, lr=0.05, loo_folds=2)
    _, report = adapt(tiny_model, blob_cases(4, seed=5), "segmentation", "head", budget)
    assert report.loo_score is not None and [s for s, _ in report.loo_curve] == [0.0, 3.0, 6.0]


def test_the_products_head_mode_budget_caps_leave_one_out() -> None:
    from medmeta_plugin.adapt.adaptation import HEAD_MODE_LOO_FOLDS

    assert head_mode_budget().loo_folds == HEAD_MODE_LOO_FOLDS
    assert head_mode_budget(40, loo_folds=None).loo_folds is None
    assert head_mode_budget(40, eval_every=7).eval_every == 7
