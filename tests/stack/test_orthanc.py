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


def test_the_app_serves_orthanc_studies_over_dicomweb_offline(tmp_path: Path) -> None:
    # MONAI Label's DICOMweb datastore downloads dcmqi from GitHub at start; the app must start without it.
    import json
    import shutil
    import subprocess
    import time
    import urllib.request

    from medmeta_plugin.cli.serve import DEFAULT_APP, server_command
    from medmeta_plugin.stack.orthanc import free_port

    with OrthancServer(tmp_path / "orthanc") as orthanc:
        uids = load_sample_studies(orthanc, tmp_path / "dicom")
        app = tmp_path / "app"
        shutil.copytree(DEFAULT_APP, app, ignore=shutil.ignore_patterns("model", "__pycache__"))
        port = free_port()
        command, env = server_command(orthanc.dicomweb, app, "127.0.0.1", port)
        env["MONAI_LABEL_DICOMWEB_SEARCH_FILTER"] = "{}"
        with open(tmp_path / "server.log", "w") as log:
            process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
        try:
            deadline = time.monotonic() + 120
            info = None
            while info is None:
                try:
                    info = json.loads(
                        urllib.request.urlopen(f"http://127.0.0.1:{port}/info/", timeout=2).read()
                    )
                except OSError:
                    log_tail = (tmp_path / "server.log").read_text()[-3000:]
                    assert process.poll() is None and time.monotonic() < deadline, log_tail
                    time.sleep(0.5)
            assert info["datastore"]["total"] == len(uids)
            assert "medmeta" in info["models"]
        finally:
            process.terminate()
            process.wait(20)
