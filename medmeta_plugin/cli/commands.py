"""Sub-commands that inspect data and models: ``info``, ``check``, ``tasks``, ``synth``."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
from pathlib import Path

from medmeta_plugin.cli import app_benchmarks, labels, serve

__all__ = ["PARSERS"]


def _add_info(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("info", help="versions, compute device and (optionally) a backbone's summary")
    p.add_argument("--backbone", type=Path, help="a backbone .safetensors/.json pair to describe")
    p.set_defaults(func=_info)


def _info(args: argparse.Namespace) -> int:
    import monai
    import torch

    from medmeta_plugin import __version__

    device = (
        torch.cuda.get_device_name(0)
        if torch.cuda.is_available()
        else f"cpu ({platform.processor() or 'cpu'})"
    )
    out: dict[str, object] = {
        "medmeta": __version__,
        "torch": torch.__version__,
        "monai": monai.__version__,
        "python": platform.python_version(),
        "device": device,
    }
    if args.backbone is not None:
        from medmeta_plugin.networks import backbone_hash, load_backbone

        backbone = load_backbone(args.backbone)
        out["backbone"] = {
            "config": backbone.config.to_dict(),
            "parameters": sum(p.numel() for p in backbone.parameters()),
            "hash": backbone_hash(backbone),
        }
    print(json.dumps(out, indent=2))
    return 0


def _add_check(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "check",
        help="read an image (NIfTI, NRRD or a DICOM series folder) and optionally its label; print geometry",
    )
    p.add_argument("image", type=Path)
    p.add_argument("--label", type=Path, help="label map that must match the image's geometry")
    p.set_defaults(func=_check)


def _check(args: argparse.Namespace) -> int:
    import numpy as np

    from medmeta_plugin.io import read_image, read_label

    image, meta = read_image(args.image)
    out: dict[str, object] = {
        "image": str(args.image),
        "channels": int(image.shape[0]),
        "shape": list(meta.shape),
        "spacing_mm": [round(s, 4) for s in meta.spacing],
        "origin_mm": [round(o, 3) for o in meta.origin],
        "direction": [[round(v, 4) for v in row] for row in meta.direction],
        "intensity_range": [float(image.min()), float(image.max())],
    }
    if args.label is not None:
        label, _ = read_label(args.label, image_meta=meta)
        values, counts = np.unique(label, return_counts=True)
        out["label"] = {
            "path": str(args.label),
            "voxels_per_value": {int(v): int(c) for v, c in zip(values, counts)},
        }
    print(json.dumps(out, indent=2))
    return 0


def _add_tasks(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "tasks", help="list the tasks of labelled datasets (case folders or MONAI datalist JSON files)"
    )
    p.add_argument("datasets", nargs="+", type=Path, help="dataset folders or datalist .json files")
    p.add_argument("--verify", action="store_true", help="read label maps and drop structures they lack")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=_tasks)


def _tasks(args: argparse.Namespace) -> int:
    from medmeta_plugin.episodes import TaskRegistry

    registry = TaskRegistry()
    for path in args.datasets:
        if path.suffix == ".json":
            part = TaskRegistry.from_datalist(path, verify=args.verify)
        else:
            part = TaskRegistry.from_folder(path, verify=args.verify)
        registry = registry.merge(part)
    rows = [
        {
            "task": t.name,
            "kind": t.kind,
            "cases": len(t.cases),
            "datasets": sorted({c.dataset for c in t.cases}),
        }
        for t in registry
    ]
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    width = max(len(r["task"]) for r in rows) if rows else 4
    print(f"{'task':<{width}}  {'kind':<14}  cases  datasets")
    for r in rows:
        print(f"{r['task']:<{width}}  {r['kind']:<14}  {r['cases']:>5}  {', '.join(r['datasets'])}")
    print(f"{len(rows)} tasks")
    return 0


def _add_synth(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("synth", help="write a seeded synthetic phantom dataset (NIfTI case folders)")
    p.add_argument("out", type=Path, help="new, empty destination folder")
    p.add_argument("--cases", type=int, default=20, help="number of cases (default 20)")
    p.add_argument(
        "--split",
        choices=("meta-train", "held-out"),
        default="meta-train",
        help="phantom families to draw from (held-out families are the ones benchmarks evaluate)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shape", type=int, nargs=3, default=(48, 48, 48), metavar=("X", "Y", "Z"))
    p.set_defaults(func=_synth)


def _synth(args: argparse.Namespace) -> int:
    from medmeta_plugin.episodes import HELDOUT_FAMILIES, META_TRAIN_FAMILIES, write_synthetic_dataset

    families = META_TRAIN_FAMILIES if args.split == "meta-train" else HELDOUT_FAMILIES
    root = write_synthetic_dataset(args.out, families, args.cases, args.seed, tuple(args.shape))
    print(f"wrote {args.cases} cases to {root}")
    return 0


def _add_meta_train(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "meta-train",
        help="meta-train a backbone from a YAML config (works under torchrun for several processes)",
    )
    p.add_argument("--config", type=Path, required=True, help="YAML file, see medmeta_plugin/meta/config.py")
    p.add_argument(
        "--out", type=Path, default=Path("runs/meta-train"), help="output folder (default runs/meta-train)"
    )
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument("--steps", type=int, help="override the config's number of outer steps")
    p.set_defaults(func=_meta_train)


def _meta_train(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from medmeta_plugin.meta.config import load_config
    from medmeta_plugin.meta.trainer import meta_train

    config = load_config(args.config)
    if args.steps is not None:
        config = replace(config, steps=args.steps)
    args.out.mkdir(parents=True, exist_ok=True)
    result = meta_train(config, args.out, resume=args.resume)
    print(
        f"backbone: {result.backbone_path} ({result.steps} steps, {result.seconds:.0f} s, "
        f"{result.episodes_per_second:.2f} episodes/s)"
    )
    return 0


def _add_benchmark(subparsers: argparse._SubParsersAction) -> None:
    from medmeta_plugin.adapt import HEAD_MODE_STEPS
    from medmeta_plugin.benchmarks.fewshot import METHODS
    from medmeta_plugin.benchmarks.suites import SUITES
    from medmeta_plugin.networks.heads import DEFAULT_SEGMENTATION_HEAD, SEGMENTATION_HEADS
    from medmeta_plugin.networks.precision import PRECISIONS
    from medmeta_plugin.paths import DEFAULT_BACKBONE, MULTITASK_BACKBONE

    p = subparsers.add_parser("benchmark", help="benchmarks that print figures")
    inner = p.add_subparsers(dest="benchmark", metavar="BENCHMARK", required=True)
    f = inner.add_parser("fewshot", help="few-shot adaptation: every method on the same held-out episodes")
    f.add_argument("--suite", required=True, choices=sorted(SUITES))
    f.add_argument(
        "--full",
        action="store_true",
        help="the whole grid (every method, 3 seeds, fused variants); without it each suite runs a default "
        "plan sized for about 20 minutes on 2 cores, and says what it skipped",
    )
    f.add_argument("--shots", type=int, nargs="+", help="support sizes (default: the suite's plan)")
    f.add_argument("--seeds", type=int, help="seeds (default: the suite's plan)")
    f.add_argument(
        "--methods", nargs="+", help=f"'all' or some of: {' '.join(METHODS)} (default: the suite's plan)"
    )
    f.add_argument("--meta-backbone", default=str(DEFAULT_BACKBONE))
    f.add_argument("--multitask-backbone", default=str(MULTITASK_BACKBONE))
    f.add_argument("--tasks", nargs="+", help="only these tasks of the suite")
    f.add_argument(
        "--heads",
        nargs="+",
        choices=SEGMENTATION_HEADS,
        default=[DEFAULT_SEGMENTATION_HEAD],
        help="segmentation head kinds to compare (each method but scratch runs once per kind)",
    )
    f.add_argument(
        "--head-steps",
        type=int,
        default=HEAD_MODE_STEPS,
        help="step budget of head mode (leave-one-out picks fewer)",
    )
    f.add_argument(
        "--atlas",
        choices=("off", "on", "both"),
        help="score adapted methods without/with the registered support masks fused in (real suites; "
        "default: the suite's plan)",
    )
    f.add_argument(
        "--registration",
        choices=("rigid", "affine", "bspline"),  # REGISTRATION_TRANSFORMS, without importing ITK here
        default="affine",
        help="what the atlas prior's registration fits (default affine: rigid, then affine; bspline: "
        "then a coarse deformation)",
    )
    f.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="fp32",
        help="of backbone passes: fp32, bf16 autocast, or auto (bf16 where the CPU or GPU has it natively)",
    )
    f.add_argument("--out", type=Path, default=Path("results.json"))
    f.add_argument("--plot", type=Path, help="PNG of the metric against shots per method")
    f.set_defaults(func=_benchmark_fewshot)
    s = inner.add_parser("adapt-speed", help="seconds per adaptation for each adapter mode, side by side")
    s.add_argument("--backbone", default=str(DEFAULT_BACKBONE))
    s.add_argument("--shots", type=int, default=5)
    s.add_argument("--size", type=int, default=64, help="edge of the cubic support volumes (default 64)")
    s.add_argument("--modes", nargs="+", default=["head", "film", "lora", "full"])
    s.add_argument("--repeats", type=int, default=2)
    s.add_argument("--device", choices=("cpu", "cuda"))
    s.add_argument(
        "--precisions",
        nargs="+",
        choices=PRECISIONS,
        default=["fp32"],
        help="backbone precisions to compare side by side (e.g. fp32 auto)",
    )
    s.set_defaults(func=_benchmark_speed)
    r = inner.add_parser(
        "probe", help="what a backbone's features give: a head fitted on all support cases, and on the query"
    )
    r.add_argument("--suite", required=True, choices=sorted(SUITES))
    r.add_argument("--backbone", default=str(DEFAULT_BACKBONE))
    r.add_argument("--levels", type=int, nargs="+", default=[1, 2, 3], help="decoder levels in the features")
    r.add_argument("--steps", type=int, default=300, help="Adam steps of the ceiling head")
    r.add_argument("--tasks", nargs="+", help="only these tasks of the suite")
    r.add_argument("--head", choices=("linear", "mlp"), default="linear", help="the probe's head")
    r.add_argument("--out", type=Path, default=Path("results_probe.json"))
    r.set_defaults(func=_benchmark_probe)
    c = inner.add_parser(
        "incontext",
        help="does a network that reads the carried mask beside the scan refine it? (issue 18's probe)",
    )
    c.add_argument("--steps", type=int, default=1500, help="training steps of the refiner")
    c.add_argument("--batch", type=int, default=2, help="crops per step")
    c.add_argument("--patch", type=int, default=48, help="crop edge in voxels (a multiple of 8)")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument(
        "--full-carries",
        action="store_true",
        help="draw every training carry at its largest departure (docs/benchmarks/incontext.md, first run)",
    )
    c.add_argument(
        "--save",
        type=Path,
        help="also save the trained refiner (.safetensors + .json with its config, log and this command); "
        "the shipped one: sample_apps/backbone/refiner.safetensors",
    )
    c.add_argument(
        "--refiner", type=Path, help="score this saved refiner instead of training one (no --save then)"
    )
    c.add_argument("--out", type=Path, default=Path("results_incontext.json"))
    c.set_defaults(func=_benchmark_incontext)
    _add_placement(inner)
    app_benchmarks.add_parsers(inner)


def _add_placement(inner: argparse._SubParsersAction) -> None:
    from medmeta_plugin.benchmarks.fov import FOV_CLASSES
    from medmeta_plugin.benchmarks.placement import PLACEMENT_METHODS

    p = inner.add_parser(
        "placement",
        help="the field-of-view suite: where a scan lies in another (slabs, poses, modalities), and how sure",
    )
    p.add_argument("--split", choices=("dev", "test"), default="test", help="dev: calibration pairs")
    p.add_argument("--repeats", type=int, default=2, help="pairs per plan (20 plans)")
    p.add_argument(
        "--methods", nargs="+", choices=PLACEMENT_METHODS, default=["medmeta", "truth-start", "centres"]
    )
    p.add_argument("--classes", nargs="+", choices=FOV_CLASSES, default=list(FOV_CLASSES))
    p.add_argument("--transform", choices=("rigid", "affine", "bspline"), default="affine")
    p.add_argument("--out", type=Path, default=Path("results_placement.json"))
    p.add_argument("--plot", type=Path, help="PNG: placement error per class, Dice against the ceiling")
    p.add_argument(
        "--calibrate",
        action="store_true",
        help="fit the placement confidence's weights on this run (a dev run) and print them",
    )
    p.set_defaults(func=_benchmark_placement)


def _benchmark_fewshot(args: argparse.Namespace) -> int:
    from medmeta_plugin.benchmarks.fewshot import (
        DEFAULT_PLANS,
        FULL_PLAN,
        BenchmarkConfig,
        parse_methods,
        plot,
        run_benchmark,
        skipped_by_default,
        summarise,
        write_results,
    )

    start = time.perf_counter()
    plan = FULL_PLAN if args.full else DEFAULT_PLANS[args.suite]
    chosen = [args.methods, args.shots, args.seeds, args.atlas]
    if not args.full and all(c is None for c in chosen):
        print(
            f"default plan of {args.suite} (about 20 min on 2 cores); --full adds: "
            f"{skipped_by_default(args.suite)}"
        )
    config = BenchmarkConfig(
        suite=args.suite,
        shots=tuple(args.shots or plan.shots),
        seeds=args.seeds if args.seeds is not None else plan.seeds,
        methods=parse_methods(args.methods) if args.methods else plan.methods,
        meta_backbone=args.meta_backbone,
        multitask_backbone=args.multitask_backbone,
        tasks=tuple(args.tasks) if args.tasks else None,
        heads=tuple(args.heads),
        head_steps=args.head_steps,
        atlas=args.atlas or plan.atlas,
        registration=args.registration,
        precision=args.precision,
    )
    results = run_benchmark(config)
    results["wall_seconds"] = round(time.perf_counter() - start, 1)
    write_results(results, args.out)
    print(f"suite {results['suite']} on {results['device']}")
    print(summarise(results))
    if args.plot is not None:
        print(f"plot: {plot(results, args.plot)}")
    print(f"results: {args.out}")
    print(f"wall time: {results['wall_seconds'] / 60:.1f} min")
    return 0


def _benchmark_speed(args: argparse.Namespace) -> int:
    from medmeta_plugin.benchmarks.speed import adapt_speed

    result = adapt_speed(
        args.backbone,
        args.shots,
        args.size,
        tuple(args.modes),
        args.repeats,
        device=args.device,
        precisions=tuple(args.precisions),
    )
    print(f"adaptation of {result['shots']} shots at {result['size']}^3 on {result['device']}")
    print("| mode | precision | seconds | x head | x fp32 | steps | peak mem MB |")
    print("|---|---|---|---|---|---|---|")
    for r in result["rows"]:
        ratios = [f"{r[k]:.2f}" if r[k] is not None else "-" for k in ("ratio_to_head", "ratio_to_fp32")]
        precision = f"{r['precision']} ({'bf16' if r['bf16'] else 'fp32'})"
        print(
            f"| {r['mode']} | {precision} | {r['seconds']:.2f} | {ratios[0]} | {ratios[1]} | {r['steps']} "
            f"| {r['peak_mem_mb']:.0f} |"
        )
    return 0


def _benchmark_probe(args: argparse.Namespace) -> int:
    from medmeta_plugin.benchmarks.probe import run_probe, summarise_probe

    results = run_probe(
        args.suite, args.backbone, tuple(args.levels), args.steps, tasks=args.tasks, head=args.head
    )
    args.out.write_text(json.dumps(results, indent=1))
    print(
        f"feature probe ({results['head']} head), suite {results['suite']}, {results['backbone']}, "
        f"on {results['device']}"
    )
    print(summarise_probe(results))
    print(f"results: {args.out}")
    return 0


def _benchmark_placement(args: argparse.Namespace) -> int:
    import time

    from medmeta_plugin.benchmarks.placement import (
        PlacementBenchmark,
        calibrate,
        format_summary,
        plot,
        run_placement_benchmark,
        summarise,
        write_results,
    )

    config = PlacementBenchmark(
        split=args.split,
        repeats=args.repeats,
        methods=tuple(args.methods),
        classes=tuple(args.classes),
        transform=args.transform,
    )
    start = time.perf_counter()
    records = run_placement_benchmark(config, progress=print)
    meta = {
        "command": "medmeta benchmark placement " + " ".join(sys.argv[3:]),
        "code_version": _code_version(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch threads {_torch_threads()}",
        "seconds": round(time.perf_counter() - start, 1),
        "config": dataclasses.asdict(config),
    }
    write_results(str(args.out), records, meta)
    print(format_summary(summarise(records)))
    if args.plot is not None:
        print(f"plot: {plot(records, str(args.plot))}")
    if args.calibrate:
        print("confidence fitted on this run:", json.dumps(calibrate(records), indent=1))
    print(f"results: {args.out} ({meta['seconds']:.0f} s)")
    return 0


def _code_version() -> str:
    """``git describe --always --dirty`` of the working directory; empty outside a checkout."""
    import subprocess

    try:
        return subprocess.run(
            ["git", "describe", "--always", "--dirty"], capture_output=True, text=True, check=False
        ).stdout.strip()
    except OSError:
        return ""


def _benchmark_incontext(args: argparse.Namespace) -> int:
    from medmeta_plugin.benchmarks.incontext import (
        InContextConfig,
        format_incontext,
        run_incontext,
        write_incontext,
    )
    from medmeta_plugin.episodes.carried import CarryConfig
    from medmeta_plugin.networks import load_refiner, save_refiner

    if args.refiner is not None and args.save is not None:
        raise ValueError("--refiner scores a saved refiner; --save saves a trained one: give one of them.")
    refiner = None if args.refiner is None else load_refiner(args.refiner)
    config = InContextConfig(
        steps=args.steps,
        batch=args.batch,
        patch=args.patch,
        seed=args.seed,
        carry=CarryConfig(varied=not args.full_carries),
    )
    if refiner is not None:
        config = dataclasses.replace(config, features=tuple(refiner.backbone.config.features))
    command = "medmeta benchmark incontext " + " ".join(sys.argv[3:])
    results, model = run_incontext(config, refiner=refiner)
    trained = "a saved refiner" if refiner is not None else f"{config.steps} steps"
    print(f"in-context probe: {trained}, on {results['device']}, {results['seconds']:.0f} s")
    if results["log"]:
        print("training log:", json.dumps(results["log"][-3:]))
    print(format_incontext(results))
    write_incontext(args.out, results, command, _code_version())
    print(f"results: {args.out}")
    if args.save is not None:
        extra = {
            "config": results["config"],
            "training": results["training"],
            "training_structures": results["training_structures"],
            "log": results["log"],
            "summary": results["summary"],
            "device": results["device"],
            "train_seconds": results["train_seconds"],
            "command": command,
            "code_version": _code_version(),
        }
        print(f"refiner: {save_refiner(model, args.save, extra)}")
    return 0


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


PARSERS = (
    _add_info,
    _add_check,
    _add_tasks,
    _add_synth,
    _add_meta_train,
    _add_benchmark,
    *serve.PARSERS,
    *labels.PARSERS,
)
