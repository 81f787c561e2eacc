"""``medmeta benchmark app``, ``active`` and ``load``: their options, defaults, and bad input refused with a
reason (the runs themselves start real servers: the benchmark tests and ``docs/benchmarks`` cover them)."""

from __future__ import annotations

from pathlib import Path

import pytest

from medmeta_plugin.benchmarks.app_latency import PAIRS
from medmeta_plugin.cli.main import build_parser, main


def test_the_app_benchmark_takes_a_pair_and_repeatable_settings() -> None:
    conf = ["--conf", "incontext", "true", "--conf", "spacing", "2"]
    args = build_parser().parse_args(["benchmark", "app", "--pair", "brain-tumour", *conf])
    assert args.pair == "brain-tumour" and args.conf == [["incontext", "true"], ["spacing", "2"]]
    assert args.scratch_steps == 30 and args.out == Path("results_app.json") and args.overlay is None
    defaults = build_parser().parse_args(["benchmark", "app"])
    assert defaults.pair == "abdomen-ct-to-mr" and defaults.conf is None and defaults.structures is None
    assert set(PAIRS) >= {"abdomen-ct-to-mr", "brain-tumour"}


def test_an_unknown_pair_is_refused_by_the_parser(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["benchmark", "app", "--pair", "knee"])
    assert exit_.value.code == 2 and "invalid choice: 'knee'" in capsys.readouterr().err


def test_active_and_load_defaults() -> None:
    active = build_parser().parse_args(["benchmark", "active"])
    assert (active.rounds, active.pool, active.seeds, active.plot) == (4, 24, 3, None)
    load = build_parser().parse_args(["benchmark", "load"])
    assert (load.submitters, load.readers, load.requests) == (8, 16, 1000)


def test_a_load_too_small_to_measure_exits_2_with_the_reason(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "load.json"
    assert main(["benchmark", "load", "--submitters", "1", "--out", str(out)]) == 2
    assert "need submitters >= 2" in capsys.readouterr().err
    assert not out.exists(), "nothing is written for a refused run"
