"""The app benchmark: input checks (fast) and one real run on one structure (slow: it starts a server)."""

from __future__ import annotations

import pytest

from medmeta_plugin.benchmarks.app_latency import run_app_benchmark, summarise_app


@pytest.mark.parametrize(
    ("structure", "needle"),
    [("liver", "not a held-out structure"), ("Left-Hippocampus", "not labelled in both")],
)
def test_structures_must_be_held_out_and_in_both_scans(structure: str, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        run_app_benchmark((structure,))


def test_pairs_are_two_patients_with_held_out_structures_in_both() -> None:
    from medmeta_plugin.benchmarks.app_latency import PAIRS, _structure_masks
    from medmeta_plugin.episodes.splits import is_held_out

    for pair in PAIRS.values():
        assert pair.support != pair.query
        for case in (pair.support, pair.query):
            label, _, names = _structure_masks(case)
            assert all(is_held_out(n) and (label == names[n]).any() for n in pair.structures), case
    with pytest.raises(ValueError, match="unknown pair"):
        run_app_benchmark(pair="brain-tumor")
    with pytest.raises(ValueError, match="not labelled in both scans of brain-tumour"):
        run_app_benchmark(("kidney_left",), pair="brain-tumour")


@pytest.mark.slow
def test_one_structure_end_to_end(tmp_path) -> None:
    results = run_app_benchmark(("kidney_left",), scratch_steps=1, work=tmp_path)
    (record,) = results["records"]
    assert record["structure"] == "kidney_left"
    assert record["submit_to_infer_s"] > 0 and 0.0 <= record["dice"] <= 1.0
    assert 0.0 <= record["scratch_dice"] <= 1.0
    server = results["server"]
    assert server["infer_cold_s"] > 0 and server["rss_after_mb"] > 0
    assert "kidney_left" in summarise_app(results)


@pytest.mark.slow
def test_load_benchmark_loses_no_label_and_reports_memory() -> None:
    """A small run of `medmeta benchmark load` against a real server: labels at once, a fixed number of
    inferences, nothing lost, no error, the server's memory at three moments."""
    from medmeta_plugin.benchmarks.load import run_load_benchmark, summarise_load

    result = run_load_benchmark(submitters=2, readers=2, requests=6)["result"]
    assert result["labels_lost"] == 0 and not result["errors"], result
    assert result["infer_requests_after"] == 6 and result["infer_requests"] >= 6
    assert result["final_adapter_shots"] == result["expected_shots"]
    assert set(result["server_rss_mb"]) == {"ready", "adapted", "end"}
    assert all(v > 0 for v in result["server_rss_mb"].values())
    assert "resident memory" in summarise_load({"result": result})
