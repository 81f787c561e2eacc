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
