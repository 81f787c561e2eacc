"""A local Orthanc PACS with its DICOMweb plugin, for the clinical stack (Orthanc + the app + OHIF).

:class:`OrthancServer` writes an Orthanc configuration into a work folder (storage, index and log there),
starts Debian's ``Orthanc`` binary on a free HTTP port and a free DICOM port, waits for its REST API, and
stops it by PID. Remote access is off (Orthanc then answers HTTP only from the local host) and no DICOM
modality is configured, so nothing outside this machine can read or write it. Studies are loaded through
Orthanc's REST API as DICOM files written by :func:`medmeta_plugin.io.write_dicom_series`.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from medmeta_plugin.app.process import free_port, stop_process

__all__ = ["DICOMWEB_PLUGIN", "ORTHANC", "OrthancServer", "free_port"]

ORTHANC = "Orthanc"  # /usr/sbin/Orthanc from Debian's `orthanc` package
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")  # Debian's `orthanc-dicomweb`


class OrthancServer:
    """One Orthanc process with DICOMweb at ``http://127.0.0.1:<port>/dicom-web``.

    Args:
        work: folder for the configuration, the storage, the index and the log (created if missing).
        http_port, dicom_port: ports; free ones when None.

    Raises:
        ValueError: if Orthanc or its DICOMweb plugin is not installed (``apt-get install orthanc
            orthanc-dicomweb``).
    """

    def __init__(self, work: str | Path, http_port: int | None = None, dicom_port: int | None = None) -> None:
        if shutil.which(ORTHANC) is None and not Path("/usr/sbin/Orthanc").is_file():
            raise ValueError("Orthanc is not installed: apt-get install orthanc orthanc-dicomweb")
        if not DICOMWEB_PLUGIN.is_file():
            raise ValueError(
                f"the DICOMweb plugin {DICOMWEB_PLUGIN} is missing: apt-get install orthanc-dicomweb"
            )
        self.work = Path(work)
        self.http_port = http_port or free_port()
        self.dicom_port = dicom_port or free_port()
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        """The REST API's base URL."""
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb(self) -> str:
        """The DICOMweb root (what MONAI Label's ``--studies`` takes)."""
        return f"{self.url}/dicom-web"

    @property
    def log_path(self) -> Path:
        return self.work / "orthanc.log"

    def config(self) -> dict[str, Any]:
        """The Orthanc configuration written to ``<work>/orthanc.json``."""
        return {
            "Name": "medmeta-pacs",
            "StorageDirectory": str(self.work / "storage"),
            "IndexDirectory": str(self.work / "index"),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomModalities": {},
            "Plugins": [str(DICOMWEB_PLUGIN)],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": True, "Ssl": False},
        }

    def start(self, timeout: float = 60.0) -> OrthancServer:
        """Start Orthanc and wait until its REST API answers.

        Raises:
            RuntimeError: if it exits or does not answer within ``timeout`` seconds (with the log's tail).
        """
        self.work.mkdir(parents=True, exist_ok=True)
        config = self.work / "orthanc.json"
        config.write_text(json.dumps(self.config(), indent=1))
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [shutil.which(ORTHANC) or "/usr/sbin/Orthanc", str(config)],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.get("/system")
                return self
            except (urllib.error.URLError, ConnectionError, OSError):
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(
                        f"Orthanc did not start on {self.url}:\n{self.log_path.read_text()[-3000:]}"
                    ) from None
                time.sleep(0.2)

    def stop(self, timeout: float = 20.0) -> None:
        """Stop the process (terminate, then kill after ``timeout`` seconds)."""
        if self.process is None:
            return
        stop_process(self.process, timeout)
        self.process = None

    def __enter__(self) -> OrthancServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ----- REST --------------------------------------------------------------------------------------------
    def get(self, path: str) -> Any:
        """GET a REST path and decode its JSON."""
        with urllib.request.urlopen(f"{self.url}{path}", timeout=30) as response:
            return json.loads(response.read())

    def upload(self, files: list[Path]) -> list[dict[str, Any]]:
        """Store DICOM files through ``POST /instances``; returns Orthanc's answer per file.

        Raises:
            ValueError: if Orthanc refuses a file (the message names it).
        """
        answers = []
        for path in files:
            request = urllib.request.Request(
                f"{self.url}/instances",
                data=Path(path).read_bytes(),
                method="POST",
                headers={"Content-Type": "application/dicom"},
            )
            try:
                with urllib.request.urlopen(request, timeout=60) as response:
                    answers.append(json.loads(response.read()))
            except urllib.error.HTTPError as err:
                raise ValueError(f"Orthanc refused {path}: HTTP {err.code} {err.read()[:200]!r}") from err
        return answers
