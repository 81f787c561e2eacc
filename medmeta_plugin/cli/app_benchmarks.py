"""``medmeta benchmark app``, ``active`` and ``load``: the app's benchmarks (a real server; the
active-learning loop; concurrent clients)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

__all__ = ["add_parsers"]


def add_parsers(inner: argparse._SubParsersAction) -> None:
    """Add the app benchmarks to ``medmeta benchmark``'s sub-parsers."""
    from medmeta_plugin.benchmarks.app_latency import PAIRS

    a = inner.add_parser(
        "app", help="real server: 1-shot label on one patient's scan -> structure on another's, vs scratch"
    )
    a.add_argument(
        "--pair",
        choices=sorted(PAIRS),
        default="abdomen-ct-to-mr",
        help="abdomen-ct-to-mr: CT -> MR of another patient; brain-tumour: brain MRI -> that of another",
    )
    a.add_argument("--structures", nargs="+", help="held-out structures (default: the pair's)")
    a.add_argument("--scratch-steps", type=int, default=30, help="from-scratch baseline steps (0: skip)")
    a.add_argument(
        "--conf",
        nargs=2,
        action="append",
        metavar=("KEY", "VALUE"),
        help="an app setting for the server, as monailabel start_server --conf (repeatable)",
    )
    a.add_argument("--out", type=Path, default=Path("results_app.json"))
    a.add_argument("--overlay", type=Path, help="PNG: each structure's served mask and reference on the scan")
    a.set_defaults(func=_app)
    s = inner.add_parser(
        "active", help="active learning on a synthetic pool: uncertainty vs random selection"
    )
    s.add_argument("--rounds", type=int, default=4)
    s.add_argument("--pool", type=int, default=24, help="unlabelled scans per task")
    s.add_argument("--seeds", type=int, default=3)
    s.add_argument("--out", type=Path, default=Path("results_active.json"))
    s.add_argument("--plot", type=Path, help="PNG of Dice against labelled scans per strategy")
    s.set_defaults(func=_active)
    m = inner.add_parser("load", help="real server: concurrent label submissions and inference; nothing lost")
    m.add_argument("--submitters", type=int, default=8, help="labellers submitting at once")
    m.add_argument("--readers", type=int, default=16, help="inference clients")
    m.add_argument("--requests", type=int, default=1000, help="inferences answered in all")
    m.add_argument("--out", type=Path, default=Path("results_load.json"))
    m.set_defaults(func=_load)


def _app(args: argparse.Namespace) -> int:
    from medmeta_plugin.benchmarks.app_latency import run_app_benchmark, summarise_app

    structures = tuple(args.structures) if args.structures else None
    results = run_app_benchmark(
        structures, args.scratch_steps, pair=args.pair, conf=args.conf, overlay=args.overlay
    )
    args.out.write_text(json.dumps(results, indent=1))
    print(f"app benchmark on {results['device']}")
    print(summarise_app(results))
    if args.overlay is not None:
        print(f"overlay: {args.overlay}")
    print(f"results: {args.out}")
    return 0


def _active(args: argparse.Namespace) -> int:
    from medmeta_plugin.benchmarks.active import plot_active, run_active_benchmark, summarise_active

    results = run_active_benchmark(rounds=args.rounds, pool=args.pool, seeds=args.seeds)
    args.out.write_text(json.dumps(results, indent=1))
    print(f"active-learning benchmark on {results['device']}")
    print(summarise_active(results))
    if args.plot is not None:
        print(f"plot: {plot_active(results, args.plot)}")
    print(f"results: {args.out}")
    return 0


def _load(args: argparse.Namespace) -> int:
    from medmeta_plugin.benchmarks.load import run_load_benchmark, summarise_load

    results = run_load_benchmark(args.submitters, args.readers, args.requests)
    args.out.write_text(json.dumps(results, indent=1))
    print(summarise_load(results))
    print(f"results: {args.out}")
    return 0 if results["result"]["labels_lost"] == 0 and not results["result"]["errors"] else 1
