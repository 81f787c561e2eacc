"""``medmeta serve`` and ``medmeta demo``: start MONAI Label with the medmeta app.

Both start the server process of :mod:`medmeta_plugin.app.process`.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import time
from pathlib import Path

from medmeta_plugin.app.process import copy_app, server_answers, server_command
from medmeta_plugin.paths import APP, checkout, work_folder

__all__ = ["PARSERS"]


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--app", type=Path, default=APP, help=f"the app folder (default {APP})")
    p.add_argument(
        "--conf", nargs=2, action="append", metavar=("KEY", "VALUE"), help="app setting, repeatable"
    )


def _add_serve(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("serve", help="start the MONAI Label server with the medmeta app")
    p.add_argument("--studies", required=True, help="studies folder or DICOMweb URL")
    _add_arguments(p)
    p.set_defaults(func=_serve)


def _serve(args: argparse.Namespace) -> int:
    command, env = server_command(args.studies, args.app, args.host, args.port, args.conf)
    os.execvpe(command[0], command, env)
    return 0  # not reached


def _add_demo(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("demo", help="serve the sample scans with the shipped backbone (make demo)")
    p.add_argument("--root", type=Path, default=work_folder("demo"), help="where the demo studies live")
    _add_arguments(p)
    p.set_defaults(func=_demo)


def _demo_app(app: Path, root: Path) -> Path:
    """The app folder a demo serves: the checkout's own, or in an installed copy a private copy under the
    demo's root, so the adapters and logs the server writes beside the app stay out of the installation."""
    if checkout() is None and app == APP:
        return copy_app(root / "app", app)
    return app


def _demo(args: argparse.Namespace) -> int:
    from medmeta_plugin.app.demo import DEMO_STRUCTURES, prepare_demo

    studies = prepare_demo(args.root)
    url = f"http://{args.host}:{args.port}"
    print(
        f"""
medmeta demo: MONAI Label server on {url} with the shipped meta-trained backbone
studies: {studies}
  ct_abdomen_a  abdominal CT; {", ".join(DEMO_STRUCTURES)} already labelled (adapted at start-up)
  mr_abdomen_d  abdominal MR of another patient: run medmeta on it
  mr_brain_1    brain MRI with a tumour: label it (as "tumour"), Submit Label
  mr_brain_2    brain MRI of another patient: run medmeta on it

In 3D Slicer: Modules > Active Learning > MONAI Label; server {url}; Next Sample (or pick mr_abdomen_d);
Auto Segmentation: model "medmeta", Run. To teach it a new structure: draw it in Segment Editor on one
scan, Submit Label; a few seconds later "medmeta" segments it on the next scan.
OHIF: {url}/ohif/ (needs a DICOMweb studies source).  Stop with Ctrl+C.
""",
        flush=True,
    )
    app = _demo_app(args.app, args.root)
    command, env = server_command(str(studies), app, args.host, args.port, args.conf)
    os.execvpe(command[0], command, env)
    return 0  # not reached


def _add_demo_pacs(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "demo-pacs",
        help="a local Orthanc PACS with the sample studies + the app on its DICOMweb (make demo-pacs)",
    )
    p.add_argument(
        "--root", type=Path, default=work_folder("demo-pacs"), help="Orthanc storage and DICOM files"
    )
    _add_arguments(p)
    p.set_defaults(func=_demo_pacs)


def _stop_on_sigterm(*_: object) -> None:
    raise KeyboardInterrupt  # so a `kill` (SIGTERM) stops Orthanc and the server like Ctrl+C


def _label_demo_structures(server: subprocess.Popen, url: str, series_dir: Path, names: tuple) -> None:
    """Once the server answers, label the demo structures on the CT as 3D Slicer would: OHIF's panel cannot
    submit labels, and medmeta has nothing to segment until a structure is labelled."""
    from medmeta_plugin.stack.studies import submit_sample_label

    while not server_answers(url):
        if server.poll() is not None:
            return  # the server's own output says why
        time.sleep(0.5)
    submit_sample_label(url, "ct_abdomen_a", series_dir, list(names))
    print(f"medmeta demo-pacs: labelled {', '.join(names)} on the CT; adapting them now.", flush=True)


def _demo_pacs(args: argparse.Namespace) -> int:
    import signal

    signal.signal(signal.SIGTERM, _stop_on_sigterm)

    from medmeta_plugin.app.demo import DEMO_STRUCTURES
    from medmeta_plugin.stack.orthanc import OrthancServer
    from medmeta_plugin.stack.studies import load_sample_studies

    orthanc = OrthancServer(args.root / "orthanc").start()
    try:
        first_run = not orthanc.get("/series")
        if first_run:
            load_sample_studies(orthanc, args.root / "dicom")
        url = f"http://{args.host}:{args.port}"
        print(
            f"""
medmeta demo-pacs: Orthanc (DICOMweb {orthanc.dicomweb}) with the sample CT and MR of two patients,
and the MONAI Label server on {url} reading its studies over DICOMweb; {", ".join(DEMO_STRUCTURES)}
are labelled on the CT (stored in Orthanc as a DICOM SEG) and adapted as the server starts.
OHIF: {url}/ohif/  - open MEDMETA-D (the MR) in the "MONAI Label" mode, connect the MONAI Label panel to
{url}/, Auto-Segmentation: model "medmeta", Run.  Orthanc's explorer: {orthanc.url}/app/explorer.html.
Stop with Ctrl+C.
""",
            flush=True,
        )
        app = _demo_app(args.app, args.root)
        command, env = server_command(orthanc.dicomweb, app, args.host, args.port, args.conf)
        env.setdefault("MONAI_LABEL_DICOMWEB_SEARCH_FILTER", "{}")
        server = subprocess.Popen(command, env=env)
        try:
            if first_run:
                _label_demo_structures(server, url, args.root / "dicom" / "ct_abdomen_a", DEMO_STRUCTURES)
            return server.wait()
        except KeyboardInterrupt:
            server.terminate()
            server.wait(20)
            return 0
    finally:
        orthanc.stop()


PARSERS = (_add_serve, _add_demo, _add_demo_pacs)
