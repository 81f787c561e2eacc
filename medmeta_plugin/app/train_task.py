"""Train tasks for 3D Slicer's Train button: ``medmeta_adapt`` and ``medmeta_metatrain``.

MONAI Label runs train tasks in a separate process that rebuilds the app; both tasks write what they produce
where the server looks for it (a new adapter version in the store, or ``<model_dir>/backbone.safetensors``),
and the server picks it up at its next request. Progress goes to a JSON file that ``stats()`` returns, in the
fields Slicer's progress and accuracy bars read (``epoch``, ``total_epochs``, ``total_time``,
``best_metric``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.train import TrainTask

from medmeta_plugin.app.datastore import collect_examples, stored_submission
from medmeta_plugin.app.runtime import MedMetaRuntime
from medmeta_plugin.atomic import atomic_write_bytes
from medmeta_plugin.names import parse_name_list

__all__ = ["AdaptTrain", "MetaTrain", "write_datalist"]

logger = logging.getLogger(__name__)


class _StatsTrain(TrainTask):
    def __init__(self, runtime: MedMetaRuntime, name: str, description: str) -> None:
        super().__init__(description)
        self.runtime = runtime
        self.stats_path = runtime.engine.model_dir / f"train_stats_{name}.json"

    def stats(self) -> dict[str, Any]:
        if not self.stats_path.is_file():
            return {}
        try:
            return json.loads(self.stats_path.read_text())
        except (OSError, json.JSONDecodeError):
            return {}

    def _write_stats(self, stats: dict[str, Any]) -> None:
        atomic_write_bytes(self.stats_path, json.dumps(stats, indent=1).encode())


class AdaptTrain(_StatsTrain):
    """Adapt one structure, several, or all of them from every final label in the datastore.

    Request keys: ``structures`` (``"all"`` default, a name, a comma list or a JSON list).
    ``best_metric`` is the mean leave-one-out Dice (structures with two or more labels).
    """

    def __init__(self, runtime: MedMetaRuntime) -> None:
        super().__init__(runtime, "medmeta_adapt", "Adapt structure adapters from all submitted labels")

    def config(self) -> dict[str, Any]:
        return {"structures": "all"}

    def __call__(self, request: dict[str, Any], datastore: Datastore) -> dict[str, Any]:
        available = self.runtime.labelled_tasks()
        wanted = parse_name_list(request.get("structures", "all"), "structures") or ["all"]
        names = sorted(available) if wanted == ["all"] else wanted
        unknown = sorted(set(names) - set(available))
        if unknown:
            known = sorted(available) or "none"
            raise ValueError(f"no final label names {unknown}; labelled tasks: {known}.")
        start = time.time()
        stats: dict[str, Any] = {
            "name": "medmeta_adapt",
            "epoch": 0,
            "total_epochs": len(names),
            "start_ts": int(start),
            "total_time": 0.0,
            "best_metric": 0.0,
            "structures": {},
        }
        self._write_stats(stats)
        scores = []
        for i, name in enumerate(names, start=1):
            try:
                outcome = self.runtime.adapt_now(name)
            except Exception as err:
                outcome = {"error": f"{type(err).__name__}: {err}"}
            stats["structures"][name] = outcome
            if outcome.get("loo_score") is not None:
                scores.append(outcome["loo_score"])
            stats.update(
                epoch=i,
                total_time=round(time.time() - start, 2),
                best_metric=round(sum(scores) / len(scores), 4) if scores else 0.0,
            )
            self._write_stats(stats)
        failed = [n for n, o in stats["structures"].items() if "error" in o]
        if failed and len(failed) == len(names):
            raise RuntimeError(f"adaptation failed for every structure: {failed}")
        return stats


def write_datalist(datastore: Datastore, path: Path, fallback: dict[str, int]) -> int:
    """Write the datastore's final labels as a medmeta datalist (structures and targets per scan).

    Returns:
        The number of entries written.
    """
    entries, tasks = [], {}
    examples = collect_examples(datastore, fallback)
    for image_id in datastore.get_labeled_images("final"):
        submission = stored_submission(datastore, image_id, fallback)
        if submission is None:
            continue
        entry: dict[str, Any] = {
            "id": image_id,
            "image": datastore.get_image_uri(image_id),
            "label": datastore.get_label_uri(image_id, "final"),
            "labels": {str(v): n for n, v in submission.structures.items()},
        }
        if submission.targets:
            entry["targets"] = {t.task: t.value for t in submission.targets}
            for t in submission.targets:
                spec = {"kind": t.kind}
                if t.kind == "classification":
                    spec["classes"] = [str(c) for c in range(int(examples[t.task].num_outputs or 2))]
                tasks[t.task] = spec
        entries.append(entry)
    atomic_write_bytes(path, json.dumps({"name": "datastore", "tasks": tasks, "training": entries}).encode())
    return len(entries)


class MetaTrain(_StatsTrain):
    """Meta-train (fine-tune) the backbone on the datastore's labelled tasks mixed with the synthetic ones.

    Starts from the backbone being served, runs the shipped meta-training recipe
    (``sample_apps/backbone/meta_train.yaml``) for ``steps`` outer steps (request key, default 100) with the
    datastore's tasks as the real data, and installs the result as ``<model_dir>/backbone.safetensors``;
    the server then reloads it and re-adapts every structure on it. Held-out benchmark structures are left
    out of meta-training, as always.
    """

    def __init__(self, runtime: MedMetaRuntime, recipe: Path) -> None:
        super().__init__(runtime, "medmeta_metatrain", "Meta-train the shared backbone on all labelled tasks")
        self.recipe = recipe

    def config(self) -> dict[str, Any]:
        return {"steps": 100, "synthetic_cases": 100}

    def __call__(self, request: dict[str, Any], datastore: Datastore) -> dict[str, Any]:
        from medmeta_plugin.meta.config import load_config
        from medmeta_plugin.meta.trainer import meta_train

        steps = int(request.get("steps", 100))
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}.")
        work = self.runtime.engine.model_dir / "metatrain"
        work.mkdir(parents=True, exist_ok=True)
        count = write_datalist(datastore, work / "datalist.json", self.runtime.config.label_map)
        base = load_config(self.recipe)
        data = dataclasses.replace(
            base.data,
            real=(str(work / "datalist.json"),) if count else (),
            real_cases=(),  # the recipe's list names its own datasets' cases: here all the datastore's
            synthetic_cases=int(request.get("synthetic_cases", 100)),
        )
        config = dataclasses.replace(
            base,
            steps=steps,
            data=data,
            checkpoint_every=max(1, steps),
            init_backbone=str(self.runtime.engine.backbone_path),
            base_dir=str(work),
        )
        start = time.time()
        self._write_stats({"name": "medmeta_metatrain", "epoch": 0, "total_epochs": steps, "total_time": 0.0})
        run = work / f"run-{int(start)}"
        result = meta_train(config, run, progress=False)
        target = self.runtime.engine.model_dir / "backbone.safetensors"
        # The JSON first, the weights last: the server reloads when the weights file changes.
        shutil.copyfile(result.backbone_path.with_suffix(".json"), target.with_suffix(".json.tmp"))
        Path(target.with_suffix(".json.tmp")).replace(target.with_suffix(".json"))
        shutil.copyfile(result.backbone_path, target.with_suffix(".tmp"))
        Path(target.with_suffix(".tmp")).replace(target)
        stats = {
            "name": "medmeta_metatrain",
            "epoch": steps,
            "total_epochs": steps,
            "total_time": round(time.time() - start, 2),
            "best_metric": float(result.final_metrics.get("segmentation/query_score", 0.0)),
            "tasks_from_datastore": count,
        }
        self._write_stats(stats)
        return stats
