"""OHIF in headless Chromium against the medmeta app on Orthanc's DICOMweb, end to end (``make test-stack``).

One annotator's session, in order: (1) OHIF lists the two patients' studies from Orthanc and opens the CT;
(2) the MONAI Label panel shows the medmeta model, and running it puts the result into OHIF's labelmap;
(3) a structure painted with OHIF's brush is saved from the page, stored in Orthanc as a DICOM SEG of the CT
series and adapted; (4) the MR of the other patient, opened in OHIF, gets that structure from medmeta.
Screenshots of steps 1, 2 and 4 (and 3) go to ``$MEDMETA_ARTIFACTS`` (default: a pytest tmp folder).

Every voxel check is made in OHIF's own volume order, which the test first shows to be the order the app
reads the series in (the displayed CT and MR equal the series as the app reads them), so a result that
OHIF showed mirrored or on the wrong slices would fail.
"""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import urlparse

import numpy as np
import pytest

from medmeta_plugin.stack.orthanc import OrthancServer
from medmeta_plugin.stack.studies import SAMPLE_SERIES, load_sample_studies, sample_mask, submit_sample_label

pytestmark = pytest.mark.stack

CT, MR = "ct_abdomen_a", "mr_abdomen_d"
KNOWN = "spinal_cord"  # labelled on the CT before the session (3D Slicer's way), so step 2 has a result
TAUGHT = "kidney_left"  # painted in OHIF in step 3, served on the MR in step 4
ADAPT_TIMEOUT = 180.0  # seconds; one structure adapts in about 5 s on 2 busy CPU cores
# The only requests the OHIF bundle makes to the internet (its Google Fonts stylesheet); they fail offline.
OHIF_EXTERNAL_HOSTS = {"fonts.googleapis.com"}


class Stack(NamedTuple):
    orthanc: OrthancServer
    uids: dict[str, str]  # sample folder -> SeriesInstanceUID
    dicom: Path  # the DICOM series written for Orthanc, one folder per sample
    url: str  # the MONAI Label server
    browser: Any  # HeadlessChromium


@pytest.fixture
def stack(tmp_path: Path, stack_logs: Any) -> Iterator[Stack]:
    """Orthanc with the sample studies, the app on its DICOMweb, and headless Chromium, on loopback ports."""
    from medmeta_plugin.app.process import copy_app, running_server
    from medmeta_plugin.stack.browser import HeadlessChromium

    with OrthancServer(tmp_path / "orthanc") as orthanc:
        stack_logs("Orthanc log", orthanc.log_path)
        uids = load_sample_studies(orthanc, tmp_path / "dicom")
        app = copy_app(tmp_path / "app")
        env = {
            "MONAI_LABEL_DICOMWEB_SEARCH_FILTER": "{}",
            "MONAI_LABEL_DICOMWEB_CACHE_PATH": str(tmp_path / "cache"),
        }
        log = tmp_path / "server.log"
        stack_logs("MONAI Label server log", log)
        with (
            running_server(orthanc.dicomweb, app, log, env=env) as (url, _),
            HeadlessChromium(tmp_path / "browser") as browser,
        ):
            stack_logs("browser console", lambda: "\n".join(browser.console))
            stack_logs("Chromium log", browser.log_path)
            yield Stack(orthanc, uids, tmp_path / "dicom", url, browser)


def test_ohif_session_segments_teaches_and_serves_the_next_study(stack: Stack, artifacts: Path) -> None:
    from medmeta_plugin.io import read_image
    from medmeta_plugin.stack.ohif import OhifViewer

    ct, mr = stack.uids[CT], stack.uids[MR]
    ct_voxels, ct_meta = read_image(stack.dicom / CT)
    submit_sample_label(stack.url, CT, stack.dicom / CT, [KNOWN])
    _wait_adapted(stack.url, KNOWN, version=1)
    viewer = OhifViewer(stack.browser.new_page(), stack.url)

    # (1) The study list comes from Orthanc through the server's DICOMweb proxy; the CT opens.
    patients = [patient for _, patient in SAMPLE_SERIES.values()]
    viewer.study_list(patients)
    viewer.screenshot(artifacts / "1-study-list.png")
    viewer.open_study(SAMPLE_SERIES[CT][1])
    assert np.array_equal(viewer.image(), ct_voxels[0]), "OHIF's CT volume is not the series the app reads"

    # (2) The panel lists medmeta with the structure it knows; Run shows the server's result in OHIF.
    info = viewer.connect()
    assert viewer.models() == ["medmeta"]  # medmeta_volume (classification) has no place in this panel
    assert list(info["models"]["medmeta"]["labels"]) == [KNOWN]
    result = _nrrd_labels(viewer.run_model("medmeta"), stack.browser.work)
    shown, segments = viewer.labelmap(), viewer.segments()
    known = shown == segments[KNOWN]
    assert known.any(), f"OHIF shows no {KNOWN}"
    assert np.array_equal(known, result == info["models"]["medmeta"]["labels"][KNOWN])
    viewer.show(known)
    viewer.screenshot(artifacts / "2-ct-medmeta.png")

    # (3) Paint a structure with OHIF's brush, save it from the page; it becomes a SEG of the CT and adapts.
    truth = sample_mask(CT, TAUGHT)
    number = viewer.paint(TAUGHT, truth)
    painted = viewer.labelmap()
    assert _dice(painted == number, truth) > 0.5, "the brush strokes did not land on the structure"
    viewer.show(painted == number)
    viewer.screenshot(artifacts / "3-ct-painted.png")
    # Name only the segments that hold voxels: the app takes a named structure with none as "absent here".
    label_info = [{"name": n, "idx": i} for n, i in viewer.segments().items() if (painted == i).any()]
    status, body = viewer.submit_label(ct, label_info)
    assert status == 200, body
    assert TAUGHT in json.loads(body)["medmeta"]["adapting"]
    seg = _seg_of(stack, ct, TAUGHT)
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == ct
    assert seg.SeriesDescription == "medmeta label"
    assert sorted(s.SegmentLabel for s in seg.SegmentSequence) == sorted(e["name"] for e in label_info)
    # One frame per CT slice and segment (empty ones included), each of the CT's rows and columns.
    columns, rows, slices = ct_meta.shape
    assert (seg.Rows, seg.Columns, int(seg.NumberOfFrames)) == (rows, columns, slices * len(label_info))
    stored = _seg_masks(seg, viewer.slice_sop_uids(), painted.shape)
    for entry in label_info:
        assert np.array_equal(stored[entry["name"]], painted == entry["idx"]), f"SEG {entry['name']} differs"
    _wait_adapted(stack.url, TAUGHT, version=1)

    # (4) The MR of the other patient, opened in OHIF, gets the structure taught in step 3.
    mr_voxels, _ = read_image(stack.dicom / MR)
    viewer.study_list(patients)
    viewer.open_study(SAMPLE_SERIES[MR][1])
    assert np.array_equal(viewer.image(), mr_voxels[0]), "OHIF's MR volume is not the series the app reads"
    info = viewer.connect()
    assert TAUGHT in info["models"]["medmeta"]["labels"]
    result = _nrrd_labels(viewer.run_model("medmeta"), stack.browser.work)
    shown, segments = viewer.labelmap(), viewer.segments()
    taught = shown == segments[TAUGHT]
    assert np.array_equal(taught, result == info["models"]["medmeta"]["labels"][TAUGHT])
    assert taught.any(), f"medmeta returned no {TAUGHT} on the MR"
    viewer.show(taught)
    viewer.screenshot(artifacts / "4-mr-adapted.png")
    assert mr != ct and {urlparse(u).hostname for u in stack.browser.external} <= OHIF_EXTERNAL_HOSTS


# ----- helpers ---------------------------------------------------------------------------------------------
def _wait_adapted(url: str, name: str, version: int) -> None:
    """Wait until the server serves ``name`` at ``version`` or later; fail at once if its adaptation fails."""
    deadline = time.monotonic() + ADAPT_TIMEOUT
    while True:
        with urllib.request.urlopen(f"{url}/info/", timeout=10) as response:
            status = json.loads(response.read())["medmeta"]
        if status["adapters"].get(name, {}).get("version", 0) >= version:
            return
        task = status["adaptation"]["tasks"].get(name, {})
        assert task.get("state") != "failed", f"adaptation of {name} failed: {task.get('error')}"
        assert time.monotonic() < deadline, f"{name} not adapted within {ADAPT_TIMEOUT} s: {status}"
        time.sleep(0.5)


def _nrrd_labels(content: bytes, work: Path) -> np.ndarray:
    """The label map of an NRRD answer, (X, Y, Z)."""
    from medmeta_plugin.io import read_label

    path = work / "answer.nrrd"
    path.write_bytes(content)
    return read_label(path)[0][0]


def _seg_of(stack: Stack, series: str, segment: str) -> Any:
    """The DICOM SEG in Orthanc that references ``series`` and holds ``segment``, read with pydicom."""
    from dicomweb_client.api import DICOMwebClient

    pacs = DICOMwebClient(url=stack.orthanc.dicomweb)
    found = []
    for entry in pacs.search_for_series(search_filters={"Modality": "SEG"}):
        study, uid = entry["0020000D"]["Value"][0], entry["0020000E"]["Value"][0]
        (seg,) = pacs.retrieve_series(study, uid)
        labels = {s.SegmentLabel for s in seg.SegmentSequence}
        if seg.ReferencedSeriesSequence[0].SeriesInstanceUID == series and segment in labels:
            found.append(seg)
    assert len(found) == 1, f"{len(found)} SEGs of series {series} hold {segment!r}"
    return found[0]


def _seg_masks(seg: Any, slice_uids: list[str], shape: tuple[int, ...]) -> dict[str, np.ndarray]:
    """Each segment of a SEG as an (X, Y, Z) mask, its frames placed by the source instance they name."""
    names = {int(s.SegmentNumber): str(s.SegmentLabel) for s in seg.SegmentSequence}
    masks = {name: np.zeros(shape, bool) for name in names.values()}
    pixels = seg.pixel_array.reshape(int(seg.NumberOfFrames), seg.Rows, seg.Columns)
    for frame, group in zip(pixels, seg.PerFrameFunctionalGroupsSequence, strict=True):
        number = int(group.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        source = group.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        masks[names[number]][:, :, slice_uids.index(source)] |= frame.T.astype(bool)  # (rows, cols) -> (X, Y)
    return masks


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum() + b.sum())
    return 2 * int((a & b).sum()) / total if total else 1.0
