"""``medmeta demo-pacs`` (``make demo-pacs``): the whole stack for a person, up, labelled, and stopped."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from medmeta_plugin.app.process import free_port, server_answers
from medmeta_plugin.paths import APP, ROOT

# seconds: Orthanc, the studies, the server (~10 s) and five adaptations, 2 busy cores
STARTUP_TIMEOUT = 240.0


@pytest.mark.stack
def test_demo_pacs_labels_the_ct_serves_ohif_and_stops_on_sigterm(tmp_path: Path) -> None:
    app = tmp_path / "app"
    shutil.copytree(APP, app, ignore=shutil.ignore_patterns("model", "__pycache__"))
    port = free_port()
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "MONAI_LABEL_DICOMWEB_CACHE_PATH": str(tmp_path / "cache"),
    }
    command = [sys.executable, "-m", "medmeta_plugin.cli.main", "demo-pacs", "--root", str(tmp_path / "pacs")]
    command += ["--port", str(port), "--app", str(app)]
    log = tmp_path / "demo-pacs.log"
    with open(log, "w") as out:
        process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        from medmeta_plugin.app.demo import DEMO_STRUCTURES

        deadline = time.monotonic() + STARTUP_TIMEOUT
        while True:
            assert process.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            if server_answers(url):
                with urllib.request.urlopen(f"{url}/info/", timeout=10) as response:
                    adapters = json.loads(response.read())["medmeta"]["adapters"]
                if set(DEMO_STRUCTURES) <= set(adapters):
                    break
            time.sleep(1)
        with urllib.request.urlopen(f"{url}/ohif/", timeout=10) as response:
            assert b"OHIF" in response.read()
        orthanc = re.search(r"DICOMweb (http://127\.0\.0\.1:\d+)/dicom-web", log.read_text()).group(1)
        with urllib.request.urlopen(f"{orthanc}/dicom-web/series?Modality=SEG", timeout=10) as response:
            assert len(json.loads(response.read())) == 1  # the demo label, stored as a DICOM SEG
    finally:
        process.send_signal(signal.SIGTERM)
        code = process.wait(60)
    assert code == 0, log.read_text()[-3000:]
    assert not server_answers(url)
    with pytest.raises(OSError):
        urllib.request.urlopen(f"{orthanc}/system", timeout=5)
