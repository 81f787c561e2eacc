"""The meta-training task pool: which real cases it reads (``data.real_cases``), and never a held-out task."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from medmeta_plugin.episodes.splits import is_held_out
from medmeta_plugin.meta.config import load_config
from medmeta_plugin.meta.data import build_sampler, meta_training_registry
from medmeta_plugin.paths import BACKBONES
from tests.episodes.conftest import blob_volumes, write_case, write_nifti


@pytest.fixture
def real_root(tmp_path: Path) -> Path:
    """Three NIfTI case folders in dataset ``real``, and a datalist dataset ``mr_set`` with one case.

    ``scan_a`` also holds a held-out structure (kidney_left) and ``scan_c`` only one (tumour), as the real
    tumour scans do; ``mr_set``'s case is called ``scan_a`` too.
    """
    root = tmp_path / "real"
    write_case(root, "scan_a", {1: "liver_like", 2: "kidney_left"}, seed=1)
    write_case(root, "scan_b", {1: "spleen_like"}, seed=2)
    write_case(root, "scan_c", {1: "tumour"}, seed=3)
    mr = tmp_path / "mr_set"
    mr.mkdir()
    image, label = blob_volumes(4, (1,))
    write_nifti(mr / "image.nii.gz", image)
    write_nifti(mr / "label.nii.gz", label)
    entry = {"image": "image.nii.gz", "label": "label.nii.gz", "id": "scan_a", "labels": {"1": "bone_like"}}
    (mr / "dataset.json").write_text(json.dumps({"name": "mr_set", "training": [entry]}))
    return tmp_path


def _config(root: Path, real: list[str], **data: object):
    """A config with no phantoms, episodes of two cases, two copies per case and ``data`` added."""
    raw = {
        "episodes": {"k_support": 1, "q_query": 1},
        "data": {"synthetic_cases": 0, "real": real, "real_copies": 2, **data},
    }
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return load_config(path)


@pytest.mark.parametrize(
    ("real", "real_cases", "tasks", "cases"),
    [
        (["real"], [], ["liver_like", "spleen_like"], ["scan_a", "scan_b"]),
        (["real"], ["scan_a"], ["liver_like"], ["scan_a"]),
        (["real"], ["real:scan_b"], ["spleen_like"], ["scan_b"]),
        (["real"], ["scan_b", "scan_a"], ["liver_like", "spleen_like"], ["scan_a", "scan_b"]),
        # A listed case whose only structure is held out is known, and adds no task.
        (["real"], ["scan_a", "scan_c"], ["liver_like"], ["scan_a"]),
        (["real"], ["scan_c"], [], []),
        # A datalist entry is named by its id; an id two datasets share names both, unless qualified.
        (["real", "mr_set/dataset.json"], ["scan_a"], ["bone_like", "liver_like"], ["scan_a", "scan_a"]),
        (["real", "mr_set/dataset.json"], ["mr_set:scan_a"], ["bone_like"], ["scan_a"]),
        (["real", "mr_set/dataset.json"], [], ["bone_like", "liver_like", "spleen_like"], None),
    ],
)
def test_real_cases_choose_the_cases(
    real_root: Path, real: list[str], real_cases: list[str], tasks: list[str], cases: list[str] | None
) -> None:
    synthetic, registry = meta_training_registry(_config(real_root, real, real_cases=real_cases))
    assert len(synthetic) == 0 and registry.names() == tasks
    assert not any(is_held_out(name) for name in registry.names())
    if cases is not None:
        # Each chosen case enters as its deformed copies, and no other case does.
        uids = {c.uid for task in registry for c in task.cases}
        assert sorted(u.split(":")[1].rsplit("-copy", 1)[0] for u in uids) == sorted(2 * cases)


def test_a_case_folder_left_off_the_list_stays_out(real_root: Path) -> None:
    """A case folder added to a dataset after a config listed its cases changes nothing."""
    before = meta_training_registry(_config(real_root, ["real"], real_cases=["scan_a", "scan_b"]))[1]
    write_case(real_root / "real", "scan_new", {1: "liver_like", 2: "colin_like"}, seed=9)
    listed = meta_training_registry(_config(real_root, ["real"], real_cases=["scan_a", "scan_b"]))[1]
    every = meta_training_registry(_config(real_root, ["real"]))[1]
    assert "colin_like" in every, "without a list, the new case joins the pool"
    assert "scan_new-copy0" in {c.case_id for c in every.get("liver_like").cases}
    assert listed.names() == before.names() == ["liver_like", "spleen_like"]
    for name in listed.names():
        assert [c.uid for c in listed.get(name).cases] == [c.uid for c in before.get(name).cases]


@pytest.mark.parametrize(
    ("real", "real_cases", "match"),
    [
        (
            ["real"],
            ["scan_x"],
            r"case 'scan_x' is in none of the data.real datasets.*Cases: scan_a, scan_b, scan_c\.",
        ),
        (["real"], ["scan_aa"], r"Did you mean 'scan_a'"),
        (["real"], ["scan_a", "Scan_B"], "'Scan_B'"),
        (["real"], ["mr_set:scan_a"], "'mr_set:scan_a'"),  # that dataset is not among data.real
        (["mr_set/dataset.json"], ["scan_b"], r"Cases: scan_a\."),
    ],
)
def test_unknown_real_cases_are_errors(
    real_root: Path, real: list[str], real_cases: list[str], match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        meta_training_registry(_config(real_root, real, real_cases=real_cases))


@pytest.mark.parametrize(
    ("config", "record"), [("meta_train.yaml", "backbone.json"), ("multitask.yaml", "multitask.json")]
)
def test_shipped_configs_give_the_recorded_task_pool(config: str, record: str) -> None:
    """The shipped configs still build the pool their backbones were trained on, whatever joins the data."""
    real = [
        (BACKBONES / p).resolve() for p in yaml.safe_load((BACKBONES / config).read_text())["data"]["real"]
    ]
    if not all(p.is_dir() for p in real) or not (BACKBONES / record).is_file():
        pytest.skip("the shipped backbone or its real data (../shared/data/real) is not beside this checkout")
    _, names = build_sampler(load_config(BACKBONES / config))
    assert names == json.loads((BACKBONES / record).read_text())["training"]["tasks"]
