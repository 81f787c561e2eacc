"""The meta-training loop: episodes -> meta-gradients -> one outer step, with logs and checkpoints.

Runs on one CPU or GPU, or on several processes under ``torchrun`` (each process draws its own episodes;
meta-gradients are averaged with an all-reduce before every outer step, which is what DDP does, written out
because inner loops are functional and DDP's module wrapper cannot see them). bf16 autocast on a GPU
(``amp``), and on a CPU with native bf16 if asked (``cpu_amp``).
"""

from __future__ import annotations

import io
import json
import logging
import os
import time
from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from medmeta_plugin.atomic import atomic_write_bytes
from medmeta_plugin.episodes import Episode, stack_items
from medmeta_plugin.meta.algorithms import TaskBatch, episode_gradients
from medmeta_plugin.meta.config import MetaTrainConfig
from medmeta_plugin.meta.data import build_sampler
from medmeta_plugin.networks import MetaModel, load_backbone, save_backbone
from medmeta_plugin.networks.precision import native_bf16

__all__ = ["TrainResult", "episode_to_batch", "meta_train"]

logger = logging.getLogger(__name__)
CHECKPOINT = "checkpoint.pt"


@dataclass
class TrainResult:
    """Where a run wrote its outputs, and its final figures."""

    backbone_path: Path
    steps: int
    seconds: float
    episodes_per_second: float
    final_metrics: dict[str, float]


def episode_to_batch(episode: Episode, device: torch.device) -> TaskBatch:
    """Stack an episode's items into a :class:`TaskBatch` on ``device``."""
    task = episode.task
    support, query = stack_items(episode.support), stack_items(episode.query)
    key = "label" if task.kind == "segmentation" else "target"

    def target(part: dict[str, Any]) -> torch.Tensor:
        t = part[key]
        return t.view(-1, 1).float() if task.kind == "regression" else t

    return TaskBatch(
        name=task.name,
        kind=task.kind,
        num_outputs=task.num_classes,
        xs=support["image"].to(device),
        ys=target(support).to(device),
        xq=query["image"].to(device),
        yq=target(query).to(device),
    )


def _distributed() -> tuple[int, int, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    return rank, world, device


def _save_checkpoint(path: Path, model: MetaModel, optimizer: torch.optim.Optimizer, step: int) -> None:
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step}, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def _uses_bf16(config: MetaTrainConfig, device: torch.device) -> bool:
    """Whether episodes run under bfloat16 autocast: ``amp`` on a GPU, ``amp`` and ``cpu_amp`` on a CPU, and
    only where bfloat16 is native (emulated bfloat16 is slower than float32)."""
    wanted = config.amp and (device.type == "cuda" or config.cpu_amp)
    if wanted and not native_bf16(device):
        logger.warning("amp: %s has no native bfloat16; training in float32.", device)
        return False
    return wanted


def meta_train(
    config: MetaTrainConfig, out_dir: str | Path, resume: bool = False, progress: bool = True
) -> TrainResult:
    """Meta-train a backbone.

    Args:
        config: the run's configuration.
        out_dir: folder for ``checkpoint.pt``, ``backbone.safetensors`` + ``.json``, ``train_log.jsonl``
            and TensorBoard event files.
        resume: continue from ``out_dir/checkpoint.pt`` (the episode stream continues deterministically:
            each process's sampler is seeded from the run seed, its rank and the step it starts at).
        progress: show a progress bar (rank 0 only).

    Returns:
        A :class:`TrainResult` (on every rank; only rank 0 writes files).

    Raises:
        ValueError: if ``resume`` is set but there is no checkpoint, or the checkpoint does not fit.
    """
    from torch.utils.tensorboard import SummaryWriter

    rank, world, device = _distributed()
    out_dir = Path(out_dir)
    torch.manual_seed(config.seed)
    np.random.seed(config.seed)
    model = MetaModel(config=config.backbone).to(device)
    if config.init_backbone:
        # Fine-tuning: start from a trained backbone (e.g. the shipped one) instead of random weights.
        init = Path(config.init_backbone)
        init = init if init.is_absolute() else Path(config.base_dir) / init
        source = load_backbone(init)
        if source.config != model.backbone.config:
            raise ValueError(
                f"init_backbone {init}: its config {source.config} differs from backbone {config.backbone}."
            )
        model.backbone.load_state_dict(source.state_dict())
    start = 0
    checkpoint = out_dir / CHECKPOINT
    state = None
    if resume:
        if not checkpoint.is_file():
            raise ValueError(f"--resume: no checkpoint at {checkpoint}.")
        state = torch.load(checkpoint, map_location=device, weights_only=True)
        start = int(state["step"])
    # Offsetting the seed by the start step gives a resumed run a fresh, reproducible episode stream.
    sampler, task_names = build_sampler(replace(config, seed=config.seed + 7919 * start), rank=rank)
    if config.algorithm == "multitask":
        for name in task_names:
            spec = sampler.registry.get(name)
            model.add_task(name, spec.kind, mode="head", num_outputs=spec.num_classes)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.outer_lr)
    if state is not None:
        try:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as err:
            raise ValueError(f"{checkpoint}: does not fit this config ({err}).") from err
    writer = SummaryWriter(str(out_dir / "tensorboard")) if rank == 0 else None
    log_file = (out_dir / "train_log.jsonl").open("a") if rank == 0 else None
    bf16 = _uses_bf16(config, device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    params = dict(model.named_parameters())
    window: dict[str, list[float]] = defaultdict(list)
    last_metrics: dict[str, float] = {}
    began = time.perf_counter()
    show = progress and rank == 0
    bar = tqdm(range(start, config.steps), initial=start, total=config.steps, disable=not show)
    bar.set_description(f"meta-train {config.algorithm} ({'bf16' if bf16 else 'fp32'})")
    for step in bar:
        grads: dict[str, torch.Tensor] = {}
        for _ in range(config.meta_batch):
            batch = episode_to_batch(sampler.sample(), device)
            with autocast:
                g, metrics = episode_gradients(config.algorithm, model, batch, config.inner)
            for name, value in g.items():
                grads[name] = grads[name] + value if name in grads else value.float()
            window[f"{batch.kind}/query_loss"].append(metrics["query_loss"])
            window[f"{batch.kind}/query_score"].append(metrics["query_score"])
        for name, p in params.items():
            g = grads.get(name)
            g = torch.zeros_like(p) if g is None else g / config.meta_batch
            if world > 1:
                dist.all_reduce(g)
                g = g / world
            p.grad = g
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        done = step + 1
        if done % config.log_every == 0 or done == config.steps:
            means = {k: float(np.mean(v)) for k, v in window.items()}
            window.clear()
            eps = (done - start) * config.meta_batch * world / (time.perf_counter() - began)
            if rank == 0:
                for k, v in means.items():
                    writer.add_scalar(k, v, done)
                writer.add_scalar("episodes_per_second", eps, done)
                record = {"step": done, "episodes_per_second": round(eps, 3), **means}
                log_file.write(json.dumps(record) + "\n")
                log_file.flush()
                seg = means.get("segmentation/query_score")
                bar.set_postfix({"dice": f"{seg:.3f}" if seg is not None else "-", "ep/s": f"{eps:.2f}"})
            last_metrics = means
        if rank == 0 and (done % config.checkpoint_every == 0 or done == config.steps):
            _save_checkpoint(checkpoint, model, optimizer, done)
    seconds = time.perf_counter() - began
    eps = (config.steps - start) * config.meta_batch * world / max(seconds, 1e-9)
    final = last_metrics
    backbone_path = out_dir / "backbone.safetensors"
    if rank == 0:
        extra = {
            "training": {
                "config": config.to_dict(),
                "tasks": task_names,
                "steps": config.steps,
                "processes": world,
                "precision": "bf16" if bf16 else "fp32",
                "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                "seconds_this_run": round(seconds, 1),
                "episodes_per_second": round(eps, 3),
                "final_metrics": final,
            }
        }
        save_backbone(model.backbone, backbone_path, extra=extra)
        writer.close()
        log_file.close()
    if world > 1:
        dist.barrier()
    return TrainResult(backbone_path, config.steps, seconds, eps, final)
