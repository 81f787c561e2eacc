"""The app benchmark: a real MONAI Label server, a 1-shot label on one patient, the structure on another.

Two pairs of sample scans (:data:`PAIRS`): ``abdomen-ct-to-mr`` (the held-out abdominal structures,
:data:`~medmeta_plugin.episodes.splits.ABDOMEN_HELDOUT`, labelled on the 3 mm CT of one patient and
segmented on the MR of another) and ``brain-tumour`` (the tumour labelled on the brain MRI of one patient,
segmented on the brain MRI of the other: same modality, a different patient). No structure evaluated here is
in meta-training. For each structure it measures, against a real server process on 127.0.0.1 driven by
``monailabel.client``:

- ``submit_to_infer_s``: from ``PUT /datastore/label`` (the structure labelled on the support scan, as 3D
  Slicer submits it) to the first ``POST /infer/medmeta`` on the other patient's scan whose response includes
  the structure (the client polls, as a user pressing Run again would);
- ``dice``: of that result against the other scan's reference label;
- ``scratch_dice`` / ``scratch_s``: the same network from random initialisation, every parameter trained on
  the same label on the same working grid for ``scratch_steps`` steps: what a plain trainer does with one
  label (``scratch_steps=0`` skips it: on 2 CPU cores it costs about 7 minutes per structure);

and for the server as a whole: inference of every adapted structure on a scan it has not seen (``cold``:
read, resample, backbone, heads, write) and again (``warm``: features cached), and the server's resident
memory before and after the adapters were added.
"""

from __future__ import annotations

import json
import platform
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from medmeta_plugin.benchmarks.scoring import mask_dice
from medmeta_plugin.episodes.splits import ABDOMEN_HELDOUT, TUMOUR_HELDOUT
from medmeta_plugin.paths import SAMPLE_DATA

__all__ = ["PAIRS", "ScanPair", "run_app_benchmark", "scratch_baseline", "summarise_app"]


@dataclass(frozen=True)
class ScanPair:
    """Two sample scans of different patients: labels are submitted on ``support``, scored on ``query``.

    Attributes:
        support: sample case folder (``sample_apps/data/real/<support>``) the user labels.
        query: sample case folder of another patient, segmented by the server.
        structures: the held-out structures the pair evaluates by default.
    """

    support: str
    query: str
    structures: tuple[str, ...]


PAIRS: dict[str, ScanPair] = {
    "abdomen-ct-to-mr": ScanPair("ct_abdomen_a", "mr_abdomen_d", ABDOMEN_HELDOUT),
    "brain-tumour": ScanPair("mr_brain_tumour_1", "mr_brain_tumour_2", TUMOUR_HELDOUT),
}


def _rss_mb(pid: int) -> float:
    import psutil

    return psutil.Process(pid).memory_info().rss / 2**20


def _structure_masks(case: str) -> tuple[np.ndarray, Any, dict[str, int]]:
    from medmeta_plugin.io import read_image, read_label

    folder = SAMPLE_DATA / case
    _, meta = read_image(next(folder.glob("image.*")))
    label, _ = read_label(next(folder.glob("label.*")), meta)
    names = {n: int(v) for v, n in json.loads((folder / "labels.json").read_text()).items()}
    return label, meta, names


def scratch_baseline(
    support_image: Path, support_mask: Path, query_image: Path, steps: int, seed: int = 0
) -> tuple[np.ndarray, float]:
    """Train the app's network from random initialisation on one label, as the app would see it.

    Returns:
        The query's label map (1, X, Y, Z) on the query's own grid, and the training seconds.
    """
    from medmeta_plugin.adapt import AdaptBudget, adapt
    from medmeta_plugin.app.config import AppConfig
    from medmeta_plugin.app.grid import label_to_working, load_working, to_original_grid
    from medmeta_plugin.networks import Backbone3D, MetaModel, load_backbone

    config = AppConfig()
    shipped = load_backbone(config.backbone)
    torch.manual_seed(seed)
    model = MetaModel(Backbone3D(shipped.config))
    divisor = model.backbone.size_divisor
    working = load_working(support_image, config.spacing, divisor, config.max_voxels)
    mask = label_to_working(support_mask, working, divisor) == 1
    support = [{"image": working.image[0], "label": torch.as_tensor(mask[None].astype(np.float32))}]
    budget = AdaptBudget(steps=steps, head_init=False, early_stopping=False)
    adapter, report = adapt(model, support, "segmentation", "full", budget, name="scratch", seed=seed)
    model.attach(adapter)
    query = load_working(query_image, config.spacing, divisor, config.max_voxels)
    with torch.no_grad():
        prob = torch.sigmoid(model(query.image, "scratch"))[0, 0]
    labels = (query.crop(prob) > config.threshold).numpy().astype(np.uint8)
    return to_original_grid(labels, query), report.seconds


def run_app_benchmark(
    structures: tuple[str, ...] | None = None,
    scratch_steps: int = 30,
    work: Path | None = None,
    pair: str = "abdomen-ct-to-mr",
    conf: list[tuple[str, str]] | None = None,
    overlay: Path | None = None,
) -> dict[str, Any]:
    """Run the benchmark (see the module docstring) on one of :data:`PAIRS` and return its records.

    Args:
        structures: structures to label and score (default: the pair's).
        scratch_steps: steps of the from-scratch baseline per structure (0 skips it).
        work: working folder (default: a new temporary one).
        pair: key of :data:`PAIRS`.
        conf: the app's ``--conf`` settings, ``[(key, value), ...]`` (e.g. ``[("registration", "bspline")]``).
        overlay: write a PNG of each structure's served mask and reference on the query scan here
            (:func:`~medmeta_plugin.benchmarks.overlay.plot_overlay`).

    Raises:
        ValueError: for an unknown pair, or a structure that is not held out or not labelled in both scans.
    """
    if pair not in PAIRS:
        raise ValueError(f"unknown pair {pair!r}; valid pairs: {sorted(PAIRS)}.")
    scans = PAIRS[pair]
    structures = scans.structures if structures is None else tuple(structures)
    import logging

    from monailabel.client import MONAILabelClient

    # The client logs every request at INFO; the benchmark polls, so that would be thousands of lines.
    logging.getLogger("monailabel.client.client").setLevel(logging.WARNING)

    from medmeta_plugin.app.process import copy_app, running_server
    from medmeta_plugin.episodes.splits import is_held_out
    from medmeta_plugin.io import read_image, write_image

    support_label, support_meta, support_names = _structure_masks(scans.support)
    query_label, _, query_names = _structure_masks(scans.query)
    for name in structures:
        if not is_held_out(name):
            raise ValueError(f"{name!r} is not a held-out structure; the benchmark evaluates only those.")
        if name not in support_names or name not in query_names:
            raise ValueError(
                f"{name!r} is not labelled in both scans of {pair} ({scans.support}, {scans.query})."
            )
    work = Path(work or tempfile.mkdtemp(prefix="medmeta-appbench-"))
    studies, app, labels = work / "studies", work / "app", work / "labels"
    for folder in (studies, labels):
        folder.mkdir(parents=True, exist_ok=True)
    # Image ids "support" and "query", each keeping its file format (NIfTI, NRRD).
    files = {}
    for image_id, case in (("support", scans.support), ("query", scans.query)):
        source = next((SAMPLE_DATA / case).glob("image.*"))
        files[image_id] = studies / f"{image_id}{''.join(source.suffixes)}"
        shutil.copyfile(source, files[image_id])
    copy_app(app)
    records, server = [], {}
    served, truths = {}, {}  # per structure, shape (X, Y, Z): for the overlay
    start = time.perf_counter()
    settings = [[str(k), str(v)] for k, v in conf or []]
    with running_server(str(studies), app, work / "server.log", conf=settings) as (url, process):
        server["startup_s"] = round(time.perf_counter() - start, 2)
        client = MONAILabelClient(url, tmpdir=str(work / "client"))
        (work / "client").mkdir(exist_ok=True)
        server["rss_before_mb"] = round(_rss_mb(process.pid), 1)
        for name in tqdm(structures, desc="submit -> infer (server)"):
            path = write_image(
                labels / f"{name}.nii.gz",
                (support_label == support_names[name]).astype(np.uint8),
                support_meta,
            )
            t0 = time.perf_counter()
            client.save_label("support", str(path), params={"label_info": [{"name": name, "idx": 1}]})
            while True:
                try:
                    out, params = client.infer("medmeta", "query", {"tasks": [name]})
                    if name in params.get("label_names", {}):
                        break
                except Exception:  # a 400 "not adapted yet": ask again, as a user pressing Run would
                    pass
                if time.perf_counter() - t0 > 300:
                    raise RuntimeError(f"{name} not served within 300 s; see {work / 'server.log'}")
                time.sleep(0.1)
            submit_to_infer = time.perf_counter() - t0
            result, _ = read_image(out)
            value = params["label_names"][name]
            truth = query_label == query_names[name]
            served[name] = np.asarray(result == value).reshape(truth.shape[-3:])
            truths[name] = truth.reshape(truth.shape[-3:])
            records.append(
                {
                    "structure": name,
                    "submit_to_infer_s": round(submit_to_infer, 2),
                    "dice": round(mask_dice(result == value, truth), 4),
                    "query_voxels": int(truth.sum()),
                }
            )
        server["rss_after_mb"] = round(_rss_mb(process.pid), 1)
        # Cold: a scan the server has never seen (uploaded now); warm: the same request again.
        client.upload_image(str(files["query"]), image_id="query_copy")
        # Each with the server's own breakdown (the infer response's ``latencies``: reading, working grid,
        # features, placement and registration, heads, writing), so a budget that is missed says where.
        for key, image_id in (
            ("infer_cold", "query_copy"),
            ("infer_warm", "query_copy"),
            ("infer_cold_support", "support_copy"),
        ):
            if key == "infer_cold_support":
                client.upload_image(str(files["support"]), image_id="support_copy")
            t0 = time.perf_counter()
            _, answer = client.infer(
                "medmeta", image_id, {"result_extension": ".nrrd", "result_dtype": "uint8"}
            )
            server[f"{key}_s"] = round(time.perf_counter() - t0, 3)
            server[f"{key}_latencies"] = answer.get("latencies", {})
    baseline = records if scratch_steps > 0 else []
    for record in tqdm(baseline, desc=f"scratch baseline ({scratch_steps} steps)"):
        name = record["structure"]
        path = labels / f"{name}.nii.gz"
        result, seconds = scratch_baseline(files["support"], path, files["query"], scratch_steps)
        record["scratch_dice"] = round(mask_dice(result == 1, query_label == query_names[name]), 4)
        record["scratch_s"] = round(seconds, 2)
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu: {platform.machine()}"
    if overlay is not None:
        from medmeta_plugin.benchmarks.overlay import plot_overlay

        query_image = np.asarray(read_image(files["query"])[0], np.float32).reshape(query_label.shape[-3:])
        plot_overlay(
            query_image,
            truths,
            served,
            {r["structure"]: r["dice"] for r in records},
            overlay,
            title=f"medmeta benchmark app: labelled once on {scans.support}, served on {scans.query}",
        )
    return {
        "benchmark": "app",
        "pair": {"name": pair, "support": scans.support, "query": scans.query},
        "device": f"{device}, {torch.get_num_threads()} torch threads in the benchmark process",
        "scratch_steps": scratch_steps,
        "conf": dict(settings),
        "server": server,
        "records": records,
    }


def summarise_app(results: dict[str, Any]) -> str:
    """A Markdown table per structure and the server figures."""
    lines = [
        "| structure (held out) | submit -> infer s | Dice medmeta 1 shot | Dice scratch | scratch train s |",
        "|---|---|---|---|---|",
    ]
    records = results["records"]
    for r in records:
        lines.append(
            f"| {r['structure']} | {r['submit_to_infer_s']:.2f} | {r['dice']:.3f} | "
            f"{r.get('scratch_dice', float('nan')):.3f} | {r.get('scratch_s', float('nan')):.1f} |"
        )
    if records:
        mean = {k: np.mean([r.get(k, np.nan) for r in records]) for k in ("dice", "scratch_dice")}
        seconds = np.mean([r["submit_to_infer_s"] for r in records])
        lines.append(f"| **mean** | {seconds:.2f} | {mean['dice']:.3f} | {mean['scratch_dice']:.3f} | |")
    s = results["server"]
    pair = results.get("pair", {"support": "ct_abdomen_a", "query": "mr_abdomen_d"})
    cold_support = s.get("infer_cold_support_s", s.get("infer_cold_ct_s"))
    lines += [
        "",
        f"Labelled on {pair['support']}, scored on {pair['query']}. Server: start-up {s.get('startup_s')} s; "
        f"all {len(records)} structures inferred on an unseen copy of {pair['query']} "
        f"{s.get('infer_cold_s')} s (cold), {s.get('infer_warm_s')} s (warm); on an unseen copy of "
        f"{pair['support']} {cold_support} s; "
        f"resident memory {s.get('rss_before_mb')} MB before the adapters, {s.get('rss_after_mb')} MB after.",
    ]
    for key, what in (("infer_cold", "unseen query"), ("infer_cold_support", f"unseen {pair['support']}")):
        parts = s.get(f"{key}_latencies") or {}
        if parts:
            lines.append(
                f"Server's breakdown, {what} (s): " + ", ".join(f"{k} {v}" for k, v in parts.items())
            )
    return "\n".join(lines)
