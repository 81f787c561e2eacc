"""Orthanc with DICOMweb, on loopback ports, loaded with the sample studies (``make test-stack``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from medmeta_plugin.stack.orthanc import OrthancServer
from medmeta_plugin.stack.studies import SAMPLE_SERIES, load_sample_studies

pytestmark = pytest.mark.stack


def test_sample_studies_are_served_over_dicomweb(tmp_path: Path) -> None:
    from dicomweb_client.api import DICOMwebClient

    with OrthancServer(tmp_path / "orthanc") as server:
        uids = load_sample_studies(server, tmp_path / "dicom")
        assert set(uids) == set(SAMPLE_SERIES)
        client = DICOMwebClient(url=server.dicomweb)
        series = client.search_for_series()
        found = {s["0020000E"]["Value"][0] for s in series}
        assert set(uids.values()) <= found
        # WADO-RS returns every slice of the CT series.
        ct = uids["ct_abdomen_a"]
        study = next(s["0020000D"]["Value"][0] for s in series if s["0020000E"]["Value"][0] == ct)
        instances = client.retrieve_series(study, ct)
        assert len(instances) == 112 and instances[0].Modality == "CT"
        # Remote access is off and only loopback was used.
        assert server.config()["RemoteAccessAllowed"] is False
    assert server.process is None


def test_label_saved_over_dicomweb_becomes_a_seg_and_adapts(tmp_path: Path) -> None:
    """The app on Orthanc's DICOMweb (started offline: MONAI Label would download dcmqi): a label saved as 3D
    Slicer does is validated, stored in Orthanc as a DICOM SEG that references the CT series, adapted, and
    the structure is segmented on the MR series of the other patient."""
    import io
    import json
    import time
    import urllib.request

    import numpy as np
    import pydicom
    import requests
    from dicomweb_client.api import DICOMwebClient
    from monailabel.client import MONAILabelClient

    from medmeta_plugin.app.process import copy_app, running_server
    from medmeta_plugin.benchmarks.app_latency import _structure_masks
    from medmeta_plugin.io import read_image, write_image

    with OrthancServer(tmp_path / "orthanc") as orthanc:
        uids = load_sample_studies(orthanc, tmp_path / "dicom")
        app = copy_app(tmp_path / "app")
        env = {
            "MONAI_LABEL_DICOMWEB_SEARCH_FILTER": "{}",
            "MONAI_LABEL_DICOMWEB_CACHE_PATH": str(tmp_path / "cache"),
        }

        def info() -> dict:
            with urllib.request.urlopen(f"{url}/info/", timeout=5) as response:
                return json.loads(response.read())

        with running_server(orthanc.dicomweb, app, tmp_path / "server.log", env=env) as (url, _):
            assert info()["datastore"]["total"] == len(uids)
            # The kidney labelled on the CT series, on the grid of that series as it was written.
            ct_label, _, names = _structure_masks("ct_abdomen_a")
            _, series_meta = read_image(tmp_path / "dicom" / "ct_abdomen_a")
            mask = (ct_label == names["kidney_left"]).astype(np.uint8)
            label = write_image(tmp_path / "kidney.nrrd", mask, series_meta)
            client = MONAILabelClient(url, tmpdir=str(tmp_path))
            ct, mr = uids["ct_abdomen_a"], uids["mr_abdomen_d"]
            client.save_label(ct, str(label), params={"label_info": [{"name": "kidney_left", "idx": 1}]})
            # The SEG is in Orthanc and references the CT series.
            pacs = DICOMwebClient(url=orthanc.dicomweb)
            segs = pacs.search_for_series(search_filters={"Modality": "SEG"})
            assert len(segs) == 1
            seg_study, seg_series = segs[0]["0020000D"]["Value"][0], segs[0]["0020000E"]["Value"][0]
            (seg,) = pacs.retrieve_series(seg_study, seg_series)
            assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == ct
            assert [s.SegmentLabel for s in seg.SegmentSequence] == ["kidney_left"]
            # Adapted, and served on the MR series of the other patient.
            deadline = time.monotonic() + 120
            while "kidney_left" not in info()["medmeta"]["adapters"]:
                assert time.monotonic() < deadline, (tmp_path / "server.log").read_text()[-3000:]
                time.sleep(0.5)
            _, params = client.infer("medmeta", mr, {"result_extension": ".nii.gz"})
            assert params["label_names"] == {"kidney_left": 1}
            # The result as DICOM SEG of the MR series (what OHIF asks with output=dicom_seg).
            import io

            import pydicom
            import requests

            response = requests.post(
                f"{url}/infer/medmeta", params={"image": mr, "output": "dicom_seg"}, timeout=120
            )
            assert response.status_code == 200, response.text[:500]
            result = pydicom.dcmread(io.BytesIO(response.content))
            assert result.Modality == "SEG" and result.ReferencedSeriesSequence[0].SeriesInstanceUID == mr


def test_a_series_fetched_by_several_threads_at_once_is_read_whole(tmp_path: Path) -> None:
    """An inference and the background scoring may ask for the same uncached series at the same moment; each
    must get the whole volume, never a half-written cache file (MONAI Label 0.8.5 alone has no lock)."""
    import threading

    from monailabel.datastore.dicom import DICOMwebClientX

    from medmeta_plugin.app.dicomweb import MedMetaDICOMWebDatastore
    from medmeta_plugin.io import read_image

    with OrthancServer(tmp_path / "orthanc") as orthanc:
        uids = load_sample_studies(orthanc, tmp_path / "dicom")
        expected = read_image(tmp_path / "dicom" / "mr_abdomen_d")[0].shape
        client = DICOMwebClientX(url=orthanc.dicomweb, session=None)
        cache = str(tmp_path / "cache")
        datastore = MedMetaDICOMWebDatastore(client=client, search_filter={}, cache_path=cache)
        start = threading.Barrier(4)
        shapes: list[tuple[int, ...]] = []
        errors: list[BaseException] = []

        def fetch() -> None:
            start.wait()
            try:
                shapes.append(read_image(datastore.get_image_uri(uids["mr_abdomen_d"]))[0].shape)
            except BaseException as error:  # reported below, with the others
                errors.append(error)

        threads = [threading.Thread(target=fetch) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not errors, errors
        assert shapes == [expected] * 4
