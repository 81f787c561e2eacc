"""Active-learning benchmark: does choosing the next scan by uncertainty beat choosing it at random?

On a synthetic pool of each held-out phantom family (families never seen in meta-training), every strategy
starts from the same randomly chosen first labelled scan and runs ``rounds`` rounds of
*label -> adapt -> select*: adapt the family's head on the labelled scans (the app's ``head`` mode with the
shipped backbone), score Dice on a fixed test set, then pick the next scan to label with

- ``uncertainty``: :func:`~medmeta_plugin.app.segmenting.mask_uncertainty`, the app's ``medmeta_uncertainty``;
- ``diversity``: the app's core-set step on backbone embeddings (``medmeta_diversity``);
- ``random``: uniformly among the unlabelled scans.

The figure is Dice against the number of labelled scans per strategy, averaged over families and seeds.
"""

from __future__ import annotations

import platform
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from medmeta_plugin.adapt import AdaptBudget, adapt
from medmeta_plugin.app.segmenting import mask_uncertainty
from medmeta_plugin.app.strategy import select_diverse, select_uncertain
from medmeta_plugin.episodes import HELDOUT_FAMILIES
from medmeta_plugin.networks import BackboneOutput, MetaModel, load_backbone
from medmeta_plugin.networks.objectives import task_score
from medmeta_plugin.paths import DEFAULT_BACKBONE

__all__ = ["STRATEGIES", "plot_active", "run_active_benchmark", "summarise_active"]

STRATEGIES = ("uncertainty", "diversity", "random")
_TEST_CASES = 8


def _family_pools(
    families: tuple[str, ...], n: int, seed: int, shape: tuple[int, int, int]
) -> dict[str, list[dict[str, torch.Tensor]]]:
    """``n`` phantoms containing each family (image (1, *shape), binary label of that family).

    One stream of held-out-family phantoms serves every family (each phantom holds two or three), so the
    pools are built from a few hundred phantoms rather than a few hundred per family.
    """
    from medmeta_plugin.benchmarks.suites import _image, _synthetic_cases

    pools: dict[str, list[dict[str, torch.Tensor]]] = {f: [] for f in families}
    batch = 0
    while any(len(p) < n for p in pools.values()):
        if batch > 20:
            raise ValueError(f"could not draw {n} phantoms of every family in {families}.")
        for img, lab, names, _ in _synthetic_cases(5 * n, seed * 1000 + batch, shape):
            for family, value in names.items():
                if family in pools and len(pools[family]) < n:
                    label = torch.as_tensor((lab == value).astype(np.float32))
                    pools[family].append({"image": _image(img), "label": label})
        batch += 1
    return pools


def _features(model: MetaModel, items: list[dict[str, torch.Tensor]]) -> BackboneOutput:
    with torch.no_grad():
        outs = [model.backbone(it["image"][None]) for it in items]
    return BackboneOutput.cat(outs)


def _run_strategy(
    strategy: str,
    model: MetaModel,
    train: list[dict[str, torch.Tensor]],
    train_feats: BackboneOutput,
    test_feats: BackboneOutput,
    test_masks: torch.Tensor,
    first: int,
    rounds: int,
    steps: int,
    seed: int,
) -> list[tuple[int, float]]:
    """``rounds`` of adapt -> score -> select, from the labelled scan ``first``; [(labelled, test Dice)]."""
    rng = np.random.default_rng(seed + 1)
    labelled, curve = [first], []
    embeddings = train_feats.embedding.numpy()
    for _ in range(rounds):
        idx = list(labelled)
        base = train_feats.take(idx)
        budget = AdaptBudget(steps=steps)
        support = [train[i] for i in idx]
        adapter, _ = adapt(
            model, support, "segmentation", "head", budget, name="al", seed=seed, features=base
        )
        with torch.no_grad():
            curve.append((len(idx), task_score("segmentation", adapter.head(test_feats), test_masks)))
            probs = torch.sigmoid(adapter.head(train_feats))[:, 0]
        candidates = [str(i) for i in range(len(train)) if i not in labelled]
        if strategy == "uncertainty":
            scores = {c: mask_uncertainty([probs[int(c)]]) for c in candidates}
            chosen = select_uncertain(candidates, scores.get)
        elif strategy == "diversity":
            chosen = select_diverse(candidates, [str(i) for i in labelled], lambda c: embeddings[int(c)])
        else:
            chosen = (candidates[int(rng.integers(len(candidates)))], 0.0)
        labelled.append(int(chosen[0]))
    return curve


def run_active_benchmark(
    rounds: int = 4,
    pool: int = 24,
    seeds: int = 3,
    families: tuple[str, ...] = HELDOUT_FAMILIES,
    backbone: str | Path = DEFAULT_BACKBONE,
    steps: int = 30,
    shape: tuple[int, int, int] = (48, 48, 48),
) -> dict[str, Any]:
    """Run every strategy on the same pools and first labels.

    Args:
        rounds: label -> adapt -> select rounds (the last adapts on ``rounds`` labelled scans).
        pool: unlabelled scans per family to select from (8 more per family form the test set).
        seeds: repetitions with other phantoms and another first label.
        families: phantom families, one task each (default: the held-out ones).
        backbone: the backbone to adapt on (default: the shipped one).
        steps: head-mode adaptation steps (the app's default).
        shape: phantom size.

    Returns:
        ``{"device", "config", "records": [{"strategy", "family", "seed", "labelled", "dice"}]}``.

    Raises:
        ValueError: for ``rounds`` or ``pool`` too small.
    """
    if rounds < 1 or pool < rounds + 1:
        raise ValueError(f"need rounds >= 1 and pool > rounds, got rounds={rounds}, pool={pool}.")
    model = MetaModel(load_backbone(backbone).eval())
    records = []
    jobs = [(f, s) for s in range(seeds) for f in families]
    pools: dict[int, dict[str, list]] = {}
    for family, seed in tqdm(jobs, desc="active learning"):
        if seed not in pools:
            pools = {seed: _family_pools(families, pool + _TEST_CASES, seed, shape)}
        items = pools[seed][family]
        train, test = items[:pool], items[pool:]
        train_feats, test_feats = _features(model, train), _features(model, test)
        test_masks = torch.stack([t["label"] for t in test])
        first = int(np.random.default_rng(seed).integers(pool))
        for strategy in STRATEGIES:
            curve = _run_strategy(
                strategy, model, train, train_feats, test_feats, test_masks, first, rounds, steps, seed
            )
            records += [
                {"strategy": strategy, "family": family, "seed": seed, "labelled": n, "dice": d}
                for n, d in curve
            ]
    device = f"cpu: {platform.machine()}, {torch.get_num_threads()} threads"
    config = {"rounds": rounds, "pool": pool, "seeds": seeds, "families": list(families), "steps": steps}
    config["shape"] = list(shape)
    return {"benchmark": "active", "device": device, "config": config, "records": records}


def _table(results: dict[str, Any]) -> dict[str, dict[int, list[float]]]:
    table: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in results["records"]:
        table[r["strategy"]][r["labelled"]].append(r["dice"])
    return table


def summarise_active(results: dict[str, Any]) -> str:
    """Mean test Dice per strategy after each number of labelled scans."""
    table = _table(results)
    counts = sorted({r["labelled"] for r in results["records"]})
    lines = [
        "| strategy | " + " | ".join(f"Dice @ {n} labelled" for n in counts) + " |",
        "|---" * (len(counts) + 1) + "|",
    ]
    for strategy, per in table.items():
        lines.append(f"| {strategy} | " + " | ".join(f"{np.mean(per[n]):.3f}" for n in counts) + " |")
    return "\n".join(lines)


def plot_active(results: dict[str, Any], path: str | Path) -> Path:
    """Dice against labelled scans, one line per strategy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for strategy, per in _table(results).items():
        counts = sorted(per)
        ax.plot(counts, [np.mean(per[n]) for n in counts], marker="o", label=strategy)
    ax.set_xticks(sorted({r["labelled"] for r in results["records"]}))
    ax.set_xlabel("labelled scans")
    ax.set_ylabel("mean test Dice (held-out families)")
    ax.set_title(f"active learning ({results['device']})", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
