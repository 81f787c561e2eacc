"""The sub-commands of :mod:`medmeta_plugin.cli.commands`: how each parses its arguments (defaults, choices,
the function it runs), argparse's exit 2 for malformed ones, and what ``info --backbone``, ``check``,
``tasks``, ``synth --split held-out`` and ``meta-train`` print and write on data made here, with errors
that exit 2 naming the problem.

``test_main.py`` covers the console script, the synth -> tasks -> check round trip, plain ``info``, the
missing-file and empty-folder errors of check/synth/tasks, and the placement benchmark's options.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from medmeta_plugin.adapt import HEAD_MODE_STEPS
from medmeta_plugin.cli.commands import PARSERS
from medmeta_plugin.cli.main import build_parser, main
from medmeta_plugin.episodes.splits import SYNTHETIC_HELDOUT_TASKS
from medmeta_plugin.io import ImageMeta, write_image
from medmeta_plugin.networks import Backbone3D, backbone_hash, save_backbone
from medmeta_plugin.networks.heads import DEFAULT_SEGMENTATION_HEAD
from tests.conftest import TINY
from tests.episodes.conftest import TASKS_JSON, write_case

# ----- parsing ---------------------------------------------------------------------------------------------

VALID_ARGS = [
    pytest.param(["info"], "_info", {"backbone": None}, id="info"),
    pytest.param(
        ["info", "--backbone", "b.safetensors"], "_info", {"backbone": Path("b.safetensors")}, id="info-b"
    ),
    pytest.param(["check", "ct.nii.gz"], "_check", {"image": Path("ct.nii.gz"), "label": None}, id="check"),
    pytest.param(
        ["tasks", "a", "b/dataset.json"],
        "_tasks",
        {"datasets": [Path("a"), Path("b/dataset.json")], "verify": False, "json": False},
        id="tasks",
    ),
    pytest.param(
        ["tasks", "a", "--verify", "--json"], "_tasks", {"verify": True, "json": True}, id="tasks-flags"
    ),
    pytest.param(
        ["synth", "out"],
        "_synth",
        {"out": Path("out"), "cases": 20, "split": "meta-train", "seed": 0, "shape": (48, 48, 48)},
        id="synth-defaults",
    ),
    pytest.param(
        ["synth", "out", "--cases", "3", "--split", "held-out", "--seed", "7", "--shape", "24", "32", "40"],
        "_synth",
        {"cases": 3, "split": "held-out", "seed": 7, "shape": [24, 32, 40]},
        id="synth",
    ),
    pytest.param(
        ["meta-train", "--config", "c.yaml"],
        "_meta_train",
        {"config": Path("c.yaml"), "out": Path("runs/meta-train"), "resume": False, "steps": None},
        id="meta-train",
    ),
    pytest.param(
        ["meta-train", "--config", "c.yaml", "--out", "o", "--resume", "--steps", "5"],
        "_meta_train",
        {"out": Path("o"), "resume": True, "steps": 5},
        id="meta-train-options",
    ),
    pytest.param(
        ["benchmark", "fewshot", "--suite", "synthetic-heldout"],
        "_benchmark_fewshot",
        {
            "full": False,
            "shots": None,
            "seeds": None,
            "methods": None,
            "atlas": None,
            "tasks": None,
            "heads": [DEFAULT_SEGMENTATION_HEAD],
            "head_steps": HEAD_MODE_STEPS,
            "registration": "affine",
            "precision": "fp32",
            "out": Path("results.json"),
            "plot": None,
        },
        id="fewshot-defaults",
    ),
    pytest.param(
        ["benchmark", "fewshot", "--suite", "brain-dev", "--full", "--shots", "1", "5", "--seeds", "2"]
        + ["--methods", "all", "--atlas", "both", "--precision", "auto", "--tasks", "Left-Caudate"],
        "_benchmark_fewshot",
        {"full": True, "shots": [1, 5], "seeds": 2, "methods": ["all"], "atlas": "both", "precision": "auto"},
        id="fewshot-options",
    ),
    pytest.param(
        ["benchmark", "adapt-speed"],
        "_benchmark_speed",
        {
            "shots": 5,
            "size": 64,
            "modes": ["head", "film", "lora", "full"],
            "repeats": 2,
            "device": None,
            "precisions": ["fp32"],
        },
        id="adapt-speed",
    ),
    pytest.param(
        ["benchmark", "adapt-speed", "--device", "cpu", "--precisions", "fp32", "bf16", "--modes", "head"],
        "_benchmark_speed",
        {"device": "cpu", "precisions": ["fp32", "bf16"], "modes": ["head"]},
        id="adapt-speed-options",
    ),
    pytest.param(
        ["benchmark", "probe", "--suite", "abdomen-ct-to-mr"],
        "_benchmark_probe",
        {
            "levels": [1, 2, 3],
            "steps": 300,
            "tasks": None,
            "head": "linear",
            "out": Path("results_probe.json"),
        },
        id="probe",
    ),
    pytest.param(
        ["benchmark", "probe", "--suite", "brain-dev", "--levels", "3", "--head", "mlp"],
        "_benchmark_probe",
        {"levels": [3], "head": "mlp"},
        id="probe-options",
    ),
    pytest.param(
        ["benchmark", "incontext"],
        "_benchmark_incontext",
        {
            "steps": 1500,
            "batch": 2,
            "patch": 48,
            "seed": 0,
            "full_carries": False,
            "out": Path("results_incontext.json"),
        },
        id="incontext",
    ),
    pytest.param(
        ["benchmark", "incontext", "--steps", "20", "--patch", "32", "--full-carries"],
        "_benchmark_incontext",
        {"steps": 20, "patch": 32, "full_carries": True},
        id="incontext-options",
    ),
]


@pytest.mark.parametrize(("argv", "func", "expected"), VALID_ARGS)
def test_arguments_parse_to_their_command(argv: list[str], func: str, expected: dict) -> None:
    args = build_parser().parse_args(argv)
    assert args.func.__name__ == func
    for name, value in expected.items():
        assert getattr(args, name) == value, name


INVALID_ARGS = [
    pytest.param(["check"], "the following arguments are required: image", id="check-no-image"),
    pytest.param(["tasks"], "the following arguments are required: datasets", id="tasks-no-dataset"),
    pytest.param(["synth"], "the following arguments are required: out", id="synth-no-out"),
    pytest.param(["synth", "o", "--split", "test"], "invalid choice: 'test'", id="synth-split"),
    pytest.param(["synth", "o", "--cases", "many"], "invalid int value: 'many'", id="synth-cases"),
    pytest.param(["synth", "o", "--shape", "24", "24"], "expected 3 arguments", id="synth-shape"),
    pytest.param(["synth", "o", "--seed", "1.5"], "invalid int value: '1.5'", id="synth-seed"),
    pytest.param(["meta-train"], "the following arguments are required: --config", id="meta-train-config"),
    pytest.param(["meta-train", "--config", "c", "--steps", "x"], "invalid int value: 'x'", id="steps"),
    pytest.param(["benchmark"], "the following arguments are required: BENCHMARK", id="benchmark-none"),
    pytest.param(["benchmark", "fewshots"], "invalid choice: 'fewshots'", id="benchmark-unknown"),
    pytest.param(["benchmark", "fewshot"], "the following arguments are required: --suite", id="no-suite"),
    pytest.param(["benchmark", "incontext", "--steps", "many"], "invalid int value: 'many'", id="incontext"),
    pytest.param(["benchmark", "fewshot", "--suite", "liver"], "invalid choice: 'liver'", id="suite"),
    pytest.param(
        ["benchmark", "fewshot", "--suite", "brain-dev", "--heads", "cnn"],
        "invalid choice: 'cnn'",
        id="heads",
    ),
    pytest.param(
        ["benchmark", "fewshot", "--suite", "brain-dev", "--atlas", "yes"],
        "invalid choice: 'yes'",
        id="atlas",
    ),
    pytest.param(
        ["benchmark", "fewshot", "--suite", "brain-dev", "--precision", "fp16"],
        "invalid choice: 'fp16'",
        id="precision",
    ),
    pytest.param(
        ["benchmark", "fewshot", "--suite", "brain-dev", "--shots", "one"],
        "invalid int value: 'one'",
        id="shots",
    ),
    pytest.param(["benchmark", "adapt-speed", "--device", "tpu"], "invalid choice: 'tpu'", id="device"),
    pytest.param(
        ["benchmark", "adapt-speed", "--precisions", "int8"], "invalid choice: 'int8'", id="precisions"
    ),
    pytest.param(
        ["benchmark", "probe", "--suite", "brain-dev", "--head", "cnn"], "invalid choice: 'cnn'", id="head"
    ),
    pytest.param(["benchmark", "probe"], "the following arguments are required: --suite", id="probe-suite"),
]


@pytest.mark.parametrize(("argv", "match"), INVALID_ARGS)
def test_malformed_arguments_exit_2_with_argparses_message(
    capsys: pytest.CaptureFixture[str], argv: list[str], match: str
) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    assert match in capsys.readouterr().err


def _commands() -> list[str]:
    parser = build_parser()
    (action,) = [a for a in parser._subparsers._group_actions if a.dest == "command"]
    return sorted(action.choices)


def test_every_parser_adds_one_command() -> None:
    assert len(_commands()) == len(PARSERS)
    assert {"info", "check", "tasks", "synth", "meta-train", "benchmark"} <= set(_commands())


@pytest.mark.parametrize("command", _commands())
def test_every_command_prints_its_help(capsys: pytest.CaptureFixture[str], command: str) -> None:
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: medmeta {command}")


# ----- running ---------------------------------------------------------------------------------------------


@pytest.fixture
def tiny_backbone(tmp_path: Path) -> tuple[Path, Backbone3D]:
    torch.manual_seed(0)
    backbone = Backbone3D(TINY)
    return save_backbone(backbone, tmp_path / "tiny.safetensors"), backbone


@pytest.mark.parametrize("suffix", [".safetensors", ".json"])
def test_info_describes_a_backbone(
    tiny_backbone: tuple[Path, Backbone3D], capsys: pytest.CaptureFixture[str], suffix: str
) -> None:
    path, backbone = tiny_backbone
    assert main(["info", "--backbone", str(path.with_suffix(suffix))]) == 0
    described = json.loads(capsys.readouterr().out)["backbone"]
    assert described["config"] == backbone.config.to_dict()
    assert described["parameters"] == sum(p.numel() for p in backbone.parameters()) > 0
    assert described["hash"] == backbone_hash(backbone)


def test_info_on_a_missing_backbone_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", "--backbone", str(tmp_path / "none.safetensors")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("medmeta info: error:") and "none." in err


GEOMETRIES = [
    pytest.param("scan.nii.gz", (1.0, 1.0, 2.5), (-10.0, 20.0, 5.0), id="nifti"),
    pytest.param("scan.nrrd", (0.75, 0.75, 3.0), (0.0, -4.5, 12.25), id="nrrd"),
]


@pytest.mark.parametrize(("name", "spacing", "origin"), GEOMETRIES)
def test_check_prints_the_geometry_and_label_counts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str, spacing: tuple, origin: tuple
) -> None:
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = origin
    meta = ImageMeta.from_affine(affine, (6, 5, 4))
    image = np.arange(120, dtype=np.float32).reshape(1, 6, 5, 4) - 20.0
    label = np.zeros((1, 6, 5, 4), np.uint8)
    label[0, :2] = 1
    label[0, 5, 0, 0] = 3
    write_image(tmp_path / name, image, meta)
    write_image(tmp_path / f"label_{name}", label, meta)
    assert main(["check", str(tmp_path / name), "--label", str(tmp_path / f"label_{name}")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["channels"] == 1 and report["shape"] == [6, 5, 4]
    assert report["spacing_mm"] == pytest.approx(list(spacing))
    assert report["intensity_range"] == [-20.0, 99.0]
    # Origin and direction as the file stores them, in the reader's world frame (the same for both formats).
    assert report["origin_mm"] == pytest.approx(list(meta.origin), abs=1e-3)
    np.testing.assert_allclose(report["direction"], np.asarray(meta.direction), atol=1e-4)
    assert report["label"]["voxels_per_value"] == {"0": 120 - 40 - 1, "1": 40, "3": 1}


@pytest.fixture
def datasets(tmp_path: Path) -> tuple[Path, Path]:
    """A case folder dataset (liver, kidney_left, spleen, a "ghost" its label map lacks, two volume-level
    tasks) and a datalist with kidney_left."""
    root = tmp_path / "ct_set"
    root.mkdir()
    (root / "tasks.json").write_text(json.dumps(TASKS_JSON))
    write_case(root, "a", {1: "liver", 3: "kidney_left"}, {"tumour_grade": 2, "age_years": 63.5}, seed=1)
    write_case(root, "b", {1: "liver", 2: "spleen"}, {"tumour_grade": "low"}, seed=2)
    (root / "b" / "labels.json").write_text(json.dumps({"1": "liver", "2": "spleen", "5": "ghost"}))
    other = tmp_path / "mr_set"
    write_case(other, "m", {1: "kidney_left"}, seed=3)
    entry = {"image": "m/image.nii.gz", "label": "m/label.nii.gz"}
    datalist = {"name": "mr_set", "labels": {"1": "kidney_left"}, "training": [entry]}
    (other / "dataset.json").write_text(json.dumps(datalist))
    return root, other / "dataset.json"


def test_tasks_merges_folders_and_datalists(
    datasets: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    folder, datalist = datasets
    assert main(["tasks", str(folder), str(datalist), "--json"]) == 0
    rows = {r["task"]: r for r in json.loads(capsys.readouterr().out)}
    assert set(rows) == {"liver", "kidney_left", "spleen", "ghost", "tumour_grade", "age_years"}
    assert rows["kidney_left"] == {
        "task": "kidney_left",
        "kind": "segmentation",
        "cases": 2,
        "datasets": ["ct_set", "mr_set"],
    }
    assert (rows["liver"]["cases"], rows["tumour_grade"]["kind"], rows["age_years"]["kind"]) == (
        2,
        "classification",
        "regression",
    )


def test_tasks_verify_drops_structures_the_label_maps_lack(
    datasets: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["tasks", str(datasets[0]), "--json", "--verify"]) == 0
    names = {r["task"] for r in json.loads(capsys.readouterr().out)}
    assert "ghost" not in names and {"liver", "spleen", "kidney_left"} <= names


def test_tasks_prints_a_table_with_a_count(
    datasets: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["tasks", *map(str, datasets)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["task", "kind", "cases", "datasets"]
    assert lines[-1] == "6 tasks" and len(lines) == 8
    (kidney,) = [line for line in lines if line.startswith("kidney_left ")]
    assert kidney.split() == ["kidney_left", "segmentation", "2", "ct_set,", "mr_set"]
    # Columns line up: every row's kind starts where the header's does.
    column = lines[0].index("kind")
    assert all(line[column - 2 : column] == "  " and line[column] != " " for line in lines[1:-1])


def test_tasks_of_an_empty_dataset(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty").mkdir()
    assert main(["tasks", str(tmp_path / "empty")]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "0 tasks"


@pytest.mark.parametrize(
    ("files", "match"),
    [
        ({"case/image.nii.gz": None, "case/labels.json": "{"}, "labels.json"),
        ({"dataset.json": '{"training": [{"image": "gone.nii.gz"}]}'}, "gone.nii.gz"),
        ({"case/label.nii.gz": None}, "missing image file"),
    ],
)
def test_tasks_errors_exit_2_naming_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], files: dict[str, str | None], match: str
) -> None:
    meta = ImageMeta.from_affine(np.eye(4), (4, 4, 4))
    for name, text in files.items():
        path = tmp_path / "set" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if text is None:
            write_image(path, np.zeros((1, 4, 4, 4), np.uint8), meta)
        else:
            path.write_text(text)
    target = tmp_path / "set" / "dataset.json" if "dataset.json" in files else tmp_path / "set"
    assert main(["tasks", str(target)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("medmeta tasks: error:") and match in err


def test_synth_held_out_draws_only_held_out_families(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "phantoms"
    argv = [
        "synth",
        str(out),
        "--split",
        "held-out",
        "--cases",
        "3",
        "--shape",
        "24",
        "24",
        "24",
        "--seed",
        "2",
    ]
    assert main(argv) == 0
    assert capsys.readouterr().out.strip() == f"wrote 3 cases to {out}"
    names = set()
    for labels in out.glob("*/labels.json"):
        names |= set(json.loads(labels.read_text()).values())
    assert names and names <= set(SYNTHETIC_HELDOUT_TASKS)


TINY_CONFIG = {
    "seed": 0,
    "algorithm": "anil",
    "steps": 3,
    "meta_batch": 1,
    "inner": {"steps": 1},
    "backbone": {"features": [8, 16], "norm": "group", "groups": 4},
    "episodes": {"k_support": 1, "q_query": 1, "patch_size": [16, 16, 16]},
    "data": {"synthetic_cases": 12, "synthetic_shape": [24, 24, 24]},
    "checkpoint_every": 1,
    "log_every": 1,
}


def test_meta_train_steps_override_the_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(TINY_CONFIG))
    out = tmp_path / "new" / "run"  # created, parents too
    assert main(["meta-train", "--config", str(config), "--out", str(out), "--steps", "1"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith(f"backbone: {out / 'backbone.safetensors'} (1 steps, ")
    assert (out / "backbone.safetensors").is_file()
    steps = [json.loads(line)["step"] for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert steps == [1]


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["meta-train", "--config", "{tmp}/missing.yaml"], "missing.yaml: config file not found"),
        (["meta-train", "--config", "{tmp}/config.yaml", "--out", "{tmp}/run", "--resume"], "no checkpoint"),
        (["meta-train", "--config", "{tmp}/bad.yaml"], "steps must be >= 1, got 0"),
        (["benchmark", "fewshot", "--suite", "brain-dev", "--methods", "meta+lorra"], "unknown methods"),
        (["benchmark", "fewshot", "--suite", "brain-dev", "--methods", "atlas"], "real data not found"),
    ],
)
def test_command_errors_exit_2_with_the_reason(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    argv: list[str],
    match: str,
) -> None:
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(TINY_CONFIG))
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump({**TINY_CONFIG, "steps": 0}))
    monkeypatch.setenv("MEDMETA_REAL_DATA", str(tmp_path / "no-real-data"))
    assert main([a.format(tmp=tmp_path) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"medmeta {argv[0]}: error:") and match in err
