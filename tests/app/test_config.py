"""``--conf`` parsing: valid and invalid tables."""

from __future__ import annotations

from pathlib import Path

import pytest

from medmeta_plugin.app.config import AppConfig, parse_conf
from medmeta_plugin.paths import DEFAULT_BACKBONE


def test_defaults_serve_the_shipped_backbone() -> None:
    config = parse_conf(None)
    assert config == AppConfig()
    assert config.backbone == DEFAULT_BACKBONE and DEFAULT_BACKBONE.is_file()
    assert config.mode == "head"
    assert parse_conf({"server_mode": "true"}) == config  # MONAI Label's own key is accepted


@pytest.mark.parametrize(
    ("conf", "field", "expected"),
    [
        ({"spacing": "1.5"}, "spacing", (1.5, 1.5, 1.5)),
        ({"spacing": "1,1,2.5"}, "spacing", (1.0, 1.0, 2.5)),
        ({"roi": "64 64 32"}, "roi", (64, 64, 32)),
        ({"mode": "lora"}, "mode", "lora"),
        ({"head": "position"}, "head", "position"),
        ({"adapt_steps": "5"}, "adapt_steps", 5),
        ({"labels": "liver,spleen"}, "labels", (("liver", 1), ("spleen", 2))),
        ({"labels": '{"spleen": 7}'}, "labels", (("spleen", 7),)),
        ({"device": "cuda:1"}, "device", "cuda:1"),
        ({"threshold": "0.3"}, "threshold", 0.3),
        ({"score_after_adapt": "off"}, "score_after_adapt", False),
        ({"atlas": "false"}, "atlas", False),
        ({"registration": "rigid"}, "registration", "rigid"),
        ({"registration": "bspline"}, "registration", "bspline"),
        ({"refine": "true"}, "refine", True),
        ({"precision": "auto"}, "precision", "auto"),
    ],
)
def test_valid_values(conf: dict[str, str], field: str, expected: object) -> None:
    assert getattr(parse_conf(conf), field) == expected


@pytest.mark.parametrize(
    ("conf", "needle"),
    [
        ({"spacingg": "1"}, "unknown --conf keys ['spacingg']"),
        ({"spacing": "0"}, "spacing"),
        ({"spacing": "a,b,c"}, "spacing"),
        ({"roi": "64.5"}, "roi"),
        ({"mode": "lorra"}, "lora"),  # look_up_option suggests the close name
        ({"head": "mlp"}, "position"),
        ({"adapt_steps": "-1"}, "adapt_steps"),
        ({"labels": "{bad json"}, "labels"),
        ({"labels": '{"a": 1, "b": 1}'}, "share one value"),
        ({"labels": '{"../x": 1}'}, "invalid label name"),
        ({"device": "tpu"}, "device"),
        ({"threshold": "1.5"}, "threshold"),
        ({"score_after_adapt": "maybe"}, "score_after_adapt"),
        ({"atlas": "registration"}, "atlas"),
        ({"registration": "demons"}, "registration must be one of ['rigid', 'affine', 'bspline']"),
        ({"precision": "fp16"}, "precision must be one of ['fp32', 'bf16', 'auto']"),
        ({"backbone": "/no/such/file.safetensors"}, "no such file"),
    ],
)
def test_invalid_values_name_the_key(conf: dict[str, str], needle: str) -> None:
    with pytest.raises(ValueError) as err:
        parse_conf(conf)
    assert needle in str(err.value)


def test_backbone_path_is_kept(tmp_path: Path) -> None:
    path = tmp_path / "b.safetensors"
    path.write_bytes(b"x")
    assert parse_conf({"backbone": str(path)}).backbone == path


def test_max_revisions_is_zero_for_all_or_a_positive_cap() -> None:
    assert parse_conf({}).max_revisions == 0
    assert parse_conf({"max_revisions": "0"}).max_revisions == 0
    assert parse_conf({"max_revisions": "5"}).max_revisions == 5
    for bad in ("-1", "two"):
        with pytest.raises(ValueError, match="max_revisions"):
            parse_conf({"max_revisions": bad})


def test_concurrent_inferences_is_a_positive_count() -> None:
    assert parse_conf({}).concurrent_inferences == 2
    assert parse_conf({"concurrent_inferences": "4"}).concurrent_inferences == 4
    with pytest.raises(ValueError, match="concurrent_inferences"):
        parse_conf({"concurrent_inferences": "0"})
