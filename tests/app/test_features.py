"""Backbone features of whole scans (``app/features.py``): a file's cache key, the backbone output of one pass
or of a sliding window (its embedding from the scan shrunk to the whole-volume budget, a ``full`` adapter's
own backbone), and the feature cache: per file version, divisor and backbone, forgotten on ``reset``.

Every scan is a phantom written as a real NIfTI file (``tests/app/conftest.py``); the backbone is the tiny one
saved there. Concurrent requests for one scan are tested in ``test_engine.py``, the first-use error of
``size_divisor`` in ``test_serving.py``.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

import pytest
import torch

from medmeta_plugin.app.config import AppConfig, parse_conf
from medmeta_plugin.app.features import CACHE_ENTRIES, FeatureCache, backbone_output, file_key
from medmeta_plugin.app.grid import load_working
from medmeta_plugin.networks import Backbone3D, TaskAdapter, TaskInfo, load_backbone
from medmeta_plugin.networks.position import body_position
from tests.app.conftest import app_conf
from tests.conftest import TINY

CPU = torch.device("cpu")


@pytest.fixture
def config(tiny_backbone: Path) -> AppConfig:
    return parse_conf(app_conf(tiny_backbone, device="cpu"))


@pytest.fixture
def backbone(tiny_backbone: Path) -> Backbone3D:
    return load_backbone(tiny_backbone).eval()


@pytest.fixture
def cache(config: AppConfig, backbone: Backbone3D) -> FeatureCache:
    features = FeatureCache(config, CPU)
    features.reset(backbone.size_divisor)
    return features


@pytest.fixture
def scan_a(studies: dict) -> Path:
    return studies["studies"] / "a.nii.gz"


# ----- file_key --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["file", "symlink", "folder"])
def test_file_key_is_the_real_path_and_version(tmp_path: Path, scan_a: Path, how: str) -> None:
    target = scan_a if how != "folder" else scan_a.parent
    path = target
    if how == "symlink":
        path = tmp_path / "link.nii.gz"
        path.symlink_to(scan_a)
    stat = os.stat(target)
    assert file_key(path) == (os.path.realpath(target), stat.st_mtime_ns, stat.st_size)
    assert file_key(str(path)) == file_key(path)


def test_file_key_changes_with_the_file_version(tmp_path: Path, scan_a: Path, studies: dict) -> None:
    copy = tmp_path / "scan.nii.gz"
    shutil.copyfile(scan_a, copy)
    before = file_key(copy)
    shutil.copyfile(studies["studies"] / "c.nii.gz", copy)  # another scan under the same name
    os.utime(copy, ns=(before[1] + 10**9, before[1] + 10**9))
    after = file_key(copy)
    assert after[0] == before[0] and after[1:] != before[1:]


@pytest.mark.parametrize(
    ("name", "make", "reason"),
    [
        pytest.param("missing.nii.gz", None, "No such file", id="missing"),
        pytest.param("dangling.nii.gz", "dangling", "No such file", id="dangling-symlink"),
        pytest.param("a-file/inner.nii.gz", "file", "Not a directory", id="through-a-file"),
    ],
)
def test_file_key_names_a_file_that_cannot_be_read(
    tmp_path: Path, name: str, make: str | None, reason: str
) -> None:
    if make == "dangling":
        (tmp_path / name).symlink_to(tmp_path / "gone.nii.gz")
    elif make == "file":
        (tmp_path / "a-file").write_text("x")
    with pytest.raises(ValueError, match=f"file .*{name}: cannot be read \\({reason}"):
        file_key(tmp_path / name)


# ----- backbone_output -------------------------------------------------------------------------------------


def _image(config: AppConfig, backbone: Backbone3D, path: Path) -> torch.Tensor:
    return load_working(path, config.spacing, backbone.size_divisor, config.max_voxels).image


def test_a_scan_within_the_whole_volume_budget_is_one_pass(
    config: AppConfig, backbone: Backbone3D, scan_a: Path
) -> None:
    image = _image(config, backbone, scan_a)
    assert image[0, 0].numel() <= config.whole_volume_voxels
    with torch.no_grad():
        out, plain = backbone_output(backbone, image, None, config), backbone(image)
    assert out.features.dtype is torch.float32
    torch.testing.assert_close(out.features, plain.features, rtol=0, atol=0)
    torch.testing.assert_close(out.embedding, plain.embedding, rtol=0, atol=0)
    torch.testing.assert_close(out.position, plain.position, rtol=0, atol=0)


def test_a_sliding_window_as_large_as_the_scan_gives_the_one_pass_features(
    config: AppConfig, backbone: Backbone3D, scan_a: Path
) -> None:
    image = _image(config, backbone, scan_a)
    window = dataclasses.replace(config, whole_volume_voxels=1000, roi=tuple(image.shape[2:]))
    with torch.no_grad():
        out, plain = backbone_output(backbone, image, None, window), backbone(image)
    torch.testing.assert_close(out.features, plain.features, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.position, body_position(image), rtol=0, atol=0)


@pytest.mark.parametrize(
    ("whole_volume_voxels", "size"),
    [
        # (1000 / 24^3)^(1/3) * 24 = 10 voxels, 8 on the divisor's (4) multiples
        pytest.param(1000, (8, 8, 8), id="shrunk-to-the-budget"),
        pytest.param(1, (8, 8, 8), id="at-least-two-coarsest-voxels"),
        pytest.param(13823, (20, 20, 20), id="just-under-the-scan"),
    ],
)
def test_the_sliding_window_embedding_is_that_of_the_scan_shrunk_to_the_budget(
    config: AppConfig, backbone: Backbone3D, scan_a: Path, whole_volume_voxels: int, size: tuple
) -> None:
    image = _image(config, backbone, scan_a)
    assert tuple(image.shape[2:]) == (24, 24, 24) and backbone.size_divisor == 4
    # One window as large as the scan: the features cost one pass, the embedding is what is checked.
    window = dataclasses.replace(config, whole_volume_voxels=whole_volume_voxels, roi=(24, 24, 24))
    small = torch.nn.functional.interpolate(image, size=size, mode="trilinear", align_corners=False)
    with torch.no_grad():
        out, expected = backbone_output(backbone, image, None, window), backbone(small).embedding
    assert out.features.shape == (1, backbone.feature_channels, 24, 24, 24)
    assert torch.isfinite(out.features).all()
    torch.testing.assert_close(out.embedding, expected, rtol=0, atol=0)


@pytest.mark.parametrize("whole_volume_voxels", [10**6, 1000], ids=["one-pass", "sliding-window"])
def test_a_full_adapter_runs_its_own_backbone(
    config: AppConfig, backbone: Backbone3D, scan_a: Path, whole_volume_voxels: int
) -> None:
    image = _image(config, backbone, scan_a)
    conf = dataclasses.replace(config, whole_volume_voxels=whole_volume_voxels, roi=(24, 24, 24))
    task = TaskAdapter(TaskInfo("ball", "segmentation", "full"), backbone)
    head_task = TaskAdapter(TaskInfo("box", "segmentation", "head"), backbone)
    with torch.no_grad():
        for p in task.adapter.backbone.parameters():
            p.mul_(1.5)  # the private copy drifts from the shared backbone during adaptation
        shared = backbone_output(backbone, image, None, conf)
        own = backbone_output(backbone, image, task, conf)
        head_only = backbone_output(backbone, image, head_task, conf)
        reference = backbone_output(task.adapter.backbone, image, None, conf)
    assert not torch.allclose(own.features, shared.features)
    torch.testing.assert_close(own.features, reference.features, rtol=0, atol=0)
    torch.testing.assert_close(own.embedding, reference.embedding, rtol=0, atol=0)
    torch.testing.assert_close(head_only.features, shared.features, rtol=0, atol=0)


# ----- FeatureCache ----------------------------------------------------------------------------------------


def test_a_volume_is_read_once_per_file_version_and_divisor(
    cache: FeatureCache, studies: dict, tmp_path: Path
) -> None:
    scan = tmp_path / "scan.nii.gz"
    shutil.copyfile(studies["studies"] / "c.nii.gz", scan)  # 24 x 24 x 25 voxels on the working grid
    four, eight = cache.volume(scan, 4), cache.volume(scan, 8)
    assert four.shape == eight.shape == (24, 24, 25)
    assert tuple(four.image.shape[2:]) == (24, 24, 28) and tuple(eight.image.shape[2:]) == (24, 24, 32)
    assert cache.volume(scan, 4) is four and cache.volume(str(scan), 8) is eight
    link = tmp_path / "link.nii.gz"
    link.symlink_to(scan)
    assert cache.volume(link, 4) is four, "keyed by the real path"
    assert cache.scan(scan) is four, "scan() pads for the backbone in use"
    key = file_key(scan)
    os.utime(scan, ns=(key[1] + 10**9, key[1] + 10**9))  # a new version of the file
    again = cache.volume(scan, 4)
    assert again is not four and torch.equal(again.image, four.image)


def test_reset_forgets_every_scan_and_sets_the_divisor(
    cache: FeatureCache, scan_a: Path, backbone: Backbone3D
) -> None:
    volume, (entry, base) = cache.scan(scan_a), cache.get(scan_a, backbone)
    assert entry is volume
    cache.reset(8)
    assert cache.size_divisor() == 8
    assert cache.scan(scan_a) is not volume and cache.scan(scan_a).image.shape[2:] == (24, 24, 24)
    assert cache.get(scan_a, backbone)[1] is not base


def test_get_computes_a_scans_channel_last_output_once_per_backbone(
    cache: FeatureCache, config: AppConfig, backbone: Backbone3D, scan_a: Path
) -> None:
    volume, base = cache.get(scan_a, backbone)
    assert volume is cache.volume(scan_a, backbone.size_divisor), "the same read of the scan"
    assert base.features.is_contiguous(memory_format=torch.channels_last_3d)
    with torch.no_grad():
        expected = backbone_output(backbone, volume.image, None, config)
    torch.testing.assert_close(base.features, expected.features, rtol=0, atol=0)
    torch.testing.assert_close(base.embedding, expected.embedding, rtol=0, atol=0)
    assert not base.features.requires_grad
    assert cache.get(str(scan_a), backbone)[1] is base
    torch.manual_seed(5)
    other = Backbone3D(TINY).eval()  # another backbone: another entry
    _, other_base = cache.get(scan_a, other)
    assert other_base is not base and not torch.allclose(other_base.features, base.features)
    assert cache.get(scan_a, backbone)[1] is base, "the first backbone's entry is kept"


def test_the_cache_keeps_its_most_recent_scans(cache: FeatureCache, scan_a: Path, tmp_path: Path) -> None:
    copies = []
    for i in range(CACHE_ENTRIES + 1):
        copies.append(tmp_path / f"copy{i}.nii.gz")
        shutil.copyfile(scan_a, copies[-1])
    first = [cache.scan(p) for p in copies[:CACHE_ENTRIES]]
    assert all(a is b for a, b in zip(first, [cache.scan(p) for p in copies[:CACHE_ENTRIES]])), "all kept"
    cache.scan(copies[0])  # most recently used: copy 1 is now the oldest
    cache.scan(copies[-1])
    assert cache.scan(copies[0]) is first[0]
    assert cache.scan(copies[1]) is not first[1], "the least recently used scan left"


@pytest.mark.parametrize(
    ("make", "conf", "needle"),
    [
        pytest.param(None, {}, "missing.nii.gz: cannot be read", id="missing"),
        pytest.param("junk", {}, "scan.nii.gz", id="not-an-image"),
        pytest.param("scan", {"max_voxels": "1000"}, "max_voxels", id="too-large"),
    ],
)
def test_a_scan_that_cannot_be_served_is_a_value_error_naming_it(
    tiny_backbone: Path, backbone: Backbone3D, scan_a: Path, tmp_path: Path, make, conf: dict, needle: str
) -> None:
    cache = FeatureCache(parse_conf(app_conf(tiny_backbone, device="cpu", **conf)), CPU)
    cache.reset(backbone.size_divisor)
    path = tmp_path / ("missing.nii.gz" if make is None else "scan.nii.gz")
    if make == "junk":
        path.write_bytes(b"\x1f\x8b not a NIfTI at all")
    elif make == "scan":
        shutil.copyfile(scan_a, path)
    for call in (lambda: cache.scan(path), lambda: cache.get(path, backbone)):
        with pytest.raises(ValueError, match=needle):
            call()


def test_a_scan_that_could_not_be_read_is_read_once_it_exists(
    cache: FeatureCache, scan_a: Path, tmp_path: Path
) -> None:
    path = tmp_path / "later.nii.gz"
    with pytest.raises(ValueError, match="cannot be read"):
        cache.scan(path)
    shutil.copyfile(scan_a, path)
    assert cache.scan(path).shape == (24, 24, 24), "a failure is not remembered"
