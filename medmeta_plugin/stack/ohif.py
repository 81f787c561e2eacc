"""OHIF, as MONAI Label 0.8.5 serves it at ``/ohif/``, driven in a real browser page as an annotator would.

What that OHIF build is (read from its bundle, ``monailabel/endpoints/static/ohif``): OHIF 3.10 with the
``monai-label`` mode and extension. Its ``app-config.js`` reads studies through the MONAI Label server's
``/proxy/dicom/{qido,wado}`` endpoints, which forward to the ``--studies`` DICOMweb server (Orthanc here).
The mode opens a study in three MPR volume viewports; its MONAI Label panel asks for the server URL
(default ``http://<host>:8000/``), reads ``GET /info/``, creates one OHIF segment per label name (sorted),
and its *Run* button posts ``POST /infer/{model}?image=<SeriesInstanceUID>&output=image`` with
``result_extension=.nrrd`` and copies the returned voxels, remapped to OHIF's segment numbers, into its
labelmap.

Two things the build cannot do from its UI, and how this driver stands in for them:

- The mode's brush tools are registered (``CircularBrush`` in the ``mpr`` tool group) but no toolbar or panel
  of the mode shows them, and the panel has no *Add segment*: :meth:`OhifViewer.paint` adds the segment
  through OHIF's ``segmentationService`` and selects the brush through OHIF's ``setToolActive`` command;
  the painting itself is real mouse strokes on the axial viewport, handled by OHIF's brush tool.
- ``MonaiLabelClient.save_label`` (``PUT datastore/label?image=`` with form fields ``params`` and ``label``
  as ``label.bin``) exists in the extension but nothing in its UI calls it: :meth:`OhifViewer.submit_label`
  sends that same request from the page, with OHIF's labelmap voxels as ``label.bin``.

Voxel arrays cross the page boundary as (X, Y, Z) numpy arrays in OHIF's own volume order (X = columns,
Y = rows, Z = slices as OHIF sorted them); :meth:`OhifViewer.slice_sop_uids` names the DICOM instance of
each Z.
"""

from __future__ import annotations

import base64
import re
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["OhifViewer"]

# JavaScript run in the page; `window.services`, `window.commandsManager` and `window.cornerstone(Tools)` are
# what OHIF 3.10 exposes for its own end-to-end tests.
_VOLUME = """(viewportId) => {
  const vp = cornerstone.getRenderingEngines()[0].getViewport(viewportId);
  return cornerstone.cache.getVolume(vp.getAllVolumeIds()[0]);
}"""
_VOLUME_LOADED = f"""() => {{
  const engine = window.cornerstone && cornerstone.getRenderingEngines()[0];
  if (!engine || engine.getViewports().length < 3) return false;
  const vp = engine.getViewport('mpr-axial');
  if (!vp || vp.getAllVolumeIds().length === 0) return false;
  const volume = ({_VOLUME})('mpr-axial');
  return !!(volume && volume.loadStatus && volume.loadStatus.loaded);
}}"""
_BASE64 = """(array) => {
  const bytes = new Uint8Array(array.buffer, array.byteOffset, array.byteLength);
  let text = '';
  for (let i = 0; i < bytes.length; i += 0x8000) {
    text += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
  }
  return btoa(text);
}"""
_GEOMETRY = f"""() => {{
  const volume = ({_VOLUME})('mpr-axial');
  return {{dims: volume.dimensions, origin: volume.origin, direction: Array.from(volume.direction),
          spacing: volume.spacing, imageIds: volume.imageIds}};
}}"""
_IMAGE = f"""() => {{
  const data = ({_VOLUME})('mpr-axial').voxelManager.getCompleteScalarDataArray();
  return {{dims: ({_GEOMETRY})().dims, dtype: data.constructor.name, data: ({_BASE64})(data)}};
}}"""
_LABELMAP = f"""() => {{
  const volume = services.segmentationService.getLabelmapVolume('1');
  const data = volume.voxelManager.getCompleteScalarDataArray();
  return {{dims: volume.dimensions, dtype: data.constructor.name, data: ({_BASE64})(data)}};
}}"""
_SEGMENTS = """() => {
  const segmentation = services.segmentationService.getSegmentation('1');
  return segmentation ? Object.values(segmentation.segments).map(s => [s.label, s.segmentIndex]) : [];
}"""
_STROKE_AT = """([world, radius]) => {
  const vp = cornerstone.getRenderingEngines()[0].getViewport('mpr-axial');
  cornerstoneTools.utilities.segmentation.setBrushSizeForToolGroup('mpr', radius);
  vp.jumpToWorld(world);
  vp.render();
  const canvas = vp.worldToCanvas(world);
  const box = vp.element.getBoundingClientRect();
  return [box.left + canvas[0], box.top + canvas[1]];
}"""
# MonaiLabelClient.save_label of the extension, as a fetch: the same URL, form fields and file name.
_SAVE_LABEL = """async ([server, image, params]) => {
  const url = new URL('datastore/label', server);
  url.searchParams.append('image', image);
  const labelmap = services.segmentationService.getLabelmapVolume('1');
  const voxels = labelmap.voxelManager.getCompleteScalarDataArray();
  const form = new FormData();
  form.append('params', JSON.stringify(params));
  form.append('label', new Blob([Uint8Array.from(voxels)]), 'label.bin');
  const headers = {accept: 'application/json'};
  const response = await fetch(url.toString(), {method: 'PUT', body: form, headers});
  return {status: response.status, body: await response.text()};
}"""
_DTYPES = {
    "Int16Array": np.int16,
    "Uint16Array": np.uint16,
    "Float32Array": np.float32,
    "Uint8Array": np.uint8,
}
_SOP_UID = re.compile(r"/instances/([0-9.]+)/frames/")


def _array(payload: dict[str, Any]) -> np.ndarray:
    """A page's typed array (x fastest) as an (X, Y, Z) numpy array."""
    flat = np.frombuffer(base64.b64decode(payload["data"]), dtype=_DTYPES[payload["dtype"]])
    return flat.reshape(payload["dims"], order="F")


class OhifViewer:
    """OHIF in one Playwright page, against one MONAI Label server.

    Args:
        page: a ``playwright.sync_api.Page`` (see :class:`medmeta_plugin.stack.browser.HeadlessChromium`).
        server: the MONAI Label server's URL (``http://127.0.0.1:<port>``); OHIF is at ``<server>/ohif/``.
        timeout: seconds any one wait may take (loading a study, a model run).
    """

    def __init__(self, page: Any, server: str, timeout: float = 120.0) -> None:
        if not server.startswith(("http://", "https://")):
            raise ValueError(f"server must be an http(s) URL, got {server!r}.")
        self.page = page
        self.server = server.rstrip("/")
        self.timeout_ms = timeout * 1000
        page.set_default_timeout(self.timeout_ms)

    # ----- study list and viewer ---------------------------------------------------------------------------
    def study_list(self, patients: list[str]) -> None:
        """Open OHIF's study list and wait until each of ``patients`` (PatientName) is listed."""
        self.page.goto(f"{self.server}/ohif/", wait_until="load")
        for patient in patients:
            self.page.get_by_text(patient, exact=True).first.wait_for()
        # OHIF's "investigational use only" banner, until a user confirms it once (kept in localStorage).
        hide = self.page.get_by_role("button", name="Confirm and Hide")
        if hide.is_visible():
            hide.click()
            hide.wait_for(state="detached")

    def open_study(self, patient: str) -> None:
        """From the study list: expand the patient's study, open it in the MONAI Label mode, and wait until
        the series is loaded in the viewports."""
        self.page.get_by_text(patient, exact=True).first.click()
        self.page.get_by_role("button", name="MONAI Label").click()
        self.page.wait_for_function(_VOLUME_LOADED)

    def screenshot(self, path: str | Path) -> Path:
        """Save what the page shows now as a PNG."""
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=str(path))
        return Path(path)

    # ----- the MONAI Label panel ---------------------------------------------------------------------------
    def connect(self) -> dict[str, Any]:
        """Type the server's URL into the panel and connect, as a user does.

        Returns:
            The ``GET /info/`` answer the panel received.
        """
        field = self.page.locator("#monailabelServerURL")
        field.fill(f"{self.server}/")
        field.press("Tab")
        with self.page.expect_response(lambda r: r.url == f"{self.server}/info/") as info:
            field.locator("xpath=ancestor::tr[1]").get_by_role("button").click()
        self.page.get_by_text("Auto-Segmentation").wait_for()
        self.page.wait_for_function("() => !!services.segmentationService.getLabelmapVolume('1')")
        return info.value.json()

    def models(self) -> list[str]:
        """The models the panel offers under Auto-Segmentation (those of type ``segmentation``)."""
        select = self.page.locator(".modelSelector select").first
        return select.evaluate("(s) => Array.from(s.options).map(o => o.value)")

    def run_model(self, model: str) -> bytes:
        """Pick ``model`` under Auto-Segmentation, press *Run*, and wait until OHIF has put the result into
        its labelmap.

        Returns:
            The server's answer (an NRRD file), as the page received it.

        Raises:
            RuntimeError: if the server answers with an error.
        """
        self.page.locator(".modelSelector select").first.select_option(model)
        done = "updated the segmentation's scalar data"  # logged by the panel's updateView when it is done
        with self.page.expect_console_message(lambda m: done in m.text):
            with self.page.expect_response(lambda r: f"/infer/{model}?" in r.url) as answer:
                self.page.get_by_title("Run Segmentation", exact=True).click()
            if answer.value.status != 200:
                raise RuntimeError(f"infer answered {answer.value.status}: {answer.value.text()[:500]}")
        return answer.value.body()

    # ----- what OHIF holds ---------------------------------------------------------------------------------
    def image(self) -> np.ndarray:
        """The displayed series' voxels, (X, Y, Z) in OHIF's volume order."""
        return _array(self.page.evaluate(_IMAGE))

    def slice_sop_uids(self) -> list[str]:
        """SOPInstanceUID of each Z of OHIF's volume (from its WADO-RS image ids)."""
        return [_SOP_UID.search(i).group(1) for i in self.page.evaluate(_GEOMETRY)["imageIds"]]

    def labelmap(self) -> np.ndarray:
        """OHIF's segmentation voxels (OHIF's segment numbers), (X, Y, Z) in OHIF's volume order."""
        return _array(self.page.evaluate(_LABELMAP))

    def segments(self) -> dict[str, int]:
        """OHIF's segments: ``{label: segment number}``."""
        return dict(self.page.evaluate(_SEGMENTS))

    def _world(self, voxel: np.ndarray) -> list[float]:
        """World (patient, mm) position of a voxel index (X, Y, Z) of OHIF's volume."""
        geometry = self.page.evaluate(_GEOMETRY)
        axes = np.asarray(geometry["direction"]).reshape(3, 3)  # row a: world direction of voxel axis a
        world = np.asarray(geometry["origin"]) + (voxel * np.asarray(geometry["spacing"])) @ axes
        return world.tolist()

    def show(self, mask: np.ndarray) -> None:
        """Move the three viewports to the centroid of ``mask`` ((X, Y, Z), OHIF's order), for a screenshot.

        Raises:
            ValueError: if the mask is empty.
        """
        if not mask.any():
            raise ValueError("mask is empty: nothing to show.")
        world = self._world(np.argwhere(mask).mean(axis=0))
        self.page.evaluate(
            "(w) => { for (const vp of cornerstone.getRenderingEngines()[0].getViewports()) "
            "{ vp.jumpToWorld(w); vp.render(); } }",
            world,
        )

    # ----- annotating --------------------------------------------------------------------------------------
    def paint(self, name: str, mask: np.ndarray) -> int:
        """Paint ``mask`` as a new segment ``name`` with OHIF's circular brush, one stroke per slice.

        On each slice of the mask the axial viewport is moved to the slice, and a short drag is made at the
        mask's centroid with a brush of the mask's equivalent radius: an annotator's rough fill, not a copy.

        Args:
            name: the segment's label.
            mask: (X, Y, Z) boolean, in OHIF's volume order (the shape of :meth:`labelmap`).

        Returns:
            The new segment's number.

        Raises:
            ValueError: if the mask's shape is not the labelmap's, or it is empty.
        """
        geometry = self.page.evaluate(_GEOMETRY)
        if tuple(mask.shape) != tuple(geometry["dims"]):
            raise ValueError(
                f"mask shape {mask.shape} is not the volume's {tuple(geometry['dims'])} (X, Y, Z)."
            )
        if not mask.any():
            raise ValueError(f"mask for {name!r} is empty.")
        number = max(self.segments().values(), default=0) + 1
        self.page.evaluate(
            """([name, number]) => {
              services.segmentationService.addSegment('1', {segmentIndex: number, label: name});
              commandsManager.runCommand('setToolActive', {toolName: 'CircularBrush', toolGroupId: 'mpr'});
            }""",
            [name, number],
        )
        spacing = np.asarray(geometry["spacing"])
        for z in np.flatnonzero(mask.any(axis=(0, 1))):
            xs, ys = np.nonzero(mask[:, :, z])
            world = self._world(np.array([xs.mean(), ys.mean(), z]))
            radius = float(np.sqrt(len(xs) / np.pi) * spacing[:2].mean())
            x, y = self.page.evaluate(_STROKE_AT, [world, radius])
            self.page.mouse.move(x - 2, y)
            self.page.mouse.down()
            self.page.mouse.move(x + 2, y, steps=4)  # the brush fills along a drag, not on a bare click
            self.page.mouse.up()
        return number

    def submit_label(self, image: str, label_info: list[dict[str, Any]]) -> tuple[int, str]:
        """Send OHIF's labelmap to the server as the extension's ``save_label`` does.

        Args:
            image: the image id (the series' SeriesInstanceUID, as the panel uses it).
            label_info: ``[{"name": ..., "idx": segment number}, ...]`` for ``params``.

        Returns:
            ``(HTTP status, response body)``.
        """
        answer = self.page.evaluate(_SAVE_LABEL, [f"{self.server}/", image, {"label_info": label_info}])
        return int(answer["status"]), str(answer["body"])
