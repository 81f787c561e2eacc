"""The ``medmeta`` command line: the installed console script and each sub-command on real files."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from medmeta_plugin.cli.main import build_parser, main
from medmeta_plugin.io import ImageMeta, write_image
from medmeta_plugin.registration import REGISTRATION_TRANSFORMS


def test_console_script_prints_help() -> None:
    script = shutil.which("medmeta") or str(Path(sys.executable).with_name("medmeta"))
    result = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0
    for command in ("info", "check", "tasks", "synth"):
        assert command in result.stdout


def test_synth_then_tasks_then_check(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "phantoms"
    assert main(["synth", str(out), "--cases", "3", "--shape", "24", "24", "24", "--seed", "1"]) == 0
    assert main(["tasks", str(out), "--json", "--verify"]) == 0
    rows = json.loads(capsys.readouterr().out.split("\n", 1)[1])
    kinds = {r["kind"] for r in rows}
    assert kinds == {"segmentation", "classification", "regression"}
    assert all(r["task"].startswith("synth_") and r["cases"] >= 1 for r in rows)
    case = out / "case00000"
    assert main(["check", str(case / "image.nii.gz"), "--label", str(case / "label.nii.gz")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["shape"] == [24, 24, 24] and len(report["label"]["voxels_per_value"]) >= 2


def test_info(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info"]) == 0
    assert {"medmeta", "torch", "monai", "device"} <= set(json.loads(capsys.readouterr().out))


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["check", "{tmp}/missing.nii.gz"], "missing.nii.gz"),
        (["check", "{tmp}/image.nii.gz", "--label", "{tmp}/small.nii.gz"], "small.nii.gz"),
        (["synth", "{tmp}", "--cases", "1"], "not an empty folder"),
        (["synth", "{tmp}/new", "--cases", "0"], "n_cases"),
        (["tasks", "{tmp}/nowhere"], "nowhere"),
    ],
)
def test_errors_exit_2_with_a_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], match: str
) -> None:
    meta = ImageMeta.from_affine(np.eye(4), (8, 8, 8))
    write_image(tmp_path / "image.nii.gz", np.zeros((1, 8, 8, 8), np.float32), meta)
    write_image(
        tmp_path / "small.nii.gz",
        np.zeros((1, 4, 4, 4), np.uint8),
        ImageMeta.from_affine(np.eye(4), (4, 4, 4)),
    )
    assert main([a.format(tmp=tmp_path) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("medmeta ") and match in err


def test_benchmark_offers_every_registration_transform() -> None:
    """The CLI lists the transforms without importing ITK; they must stay those the library fits."""
    parser = build_parser()
    command = ["benchmark", "fewshot", "--suite", "brain-dev", "--registration"]
    for transform in REGISTRATION_TRANSFORMS:
        assert parser.parse_args([*command, transform]).registration == transform
    with pytest.raises(SystemExit):
        parser.parse_args([*command, "demons"])


def test_benchmark_placement_prints_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["benchmark", "placement", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for option in ("--split", "--repeats", "--methods", "--classes", "--transform", "--plot", "--calibrate"):
        assert option in out


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ([], {"split": "test", "repeats": 2, "methods": ["medmeta", "truth-start", "centres"]}),
        (
            ["--split", "dev", "--repeats", "1", "--classes", "mr-mr", "brain", "--calibrate"],
            {"split": "dev", "repeats": 1, "classes": ["mr-mr", "brain"], "calibrate": True},
        ),
        (["--methods", "medmeta", "elastix-affine", "--transform", "rigid"], {"transform": "rigid"}),
    ],
)
def test_benchmark_placement_parses_its_options(options: list[str], expected: dict) -> None:
    args = build_parser().parse_args(["benchmark", "placement", *options])
    assert args.func.__name__ == "_benchmark_placement"
    for name, value in expected.items():
        assert getattr(args, name) == value


@pytest.mark.parametrize(
    ("options", "match"),
    [
        (["--split", "val"], "invalid choice: 'val'"),
        (["--classes", "mr-ct"], "invalid choice: 'mr-ct'"),
        (["--methods", "ants"], "invalid choice: 'ants'"),
        (["--transform", "demons"], "invalid choice: 'demons'"),
        (["--repeats", "two"], "invalid int value: 'two'"),
    ],
)
def test_benchmark_placement_rejects_invalid_options(
    capsys: pytest.CaptureFixture[str], options: list[str], match: str
) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["benchmark", "placement", *options])
    assert exit_.value.code == 2
    assert match in capsys.readouterr().err
