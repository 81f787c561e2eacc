"""Concurrency and load: many clients submit labels and run inference at once against a real server.

``submitters`` clients each submit labels on their own copy of the sample CT at the same moment: half of
them label the same structure, the others one structure each. ``readers`` clients meanwhile run inference on
the MR while the adaptations run, and then until ``requests`` more inferences have been answered in all (a
fixed amount of work, not a duration).
The benchmark then checks that every label is stored (``labels_lost`` must be 0), that the final adapter of
each structure was fitted on all of its labels, and reports inference latency percentiles and throughput
while adaptation was running, errors (which must be 0), and the server's resident memory when it is ready,
once every adaptation is done, and after the last request (over those ``requests`` inferences it must stay
within the adapters and the bounded caches).
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from medmeta_plugin.benchmarks.app_latency import _structure_masks
from medmeta_plugin.paths import SAMPLE_DATA

__all__ = ["run_load_benchmark", "summarise_load"]

_SHARED = "kidney_left"
_OWN = ("kidney_right", "iliopsoas_left", "iliopsoas_right", "gallbladder", "pancreas")


def _rss_mb(pid: int) -> float:
    """Resident memory of a process in MB (Linux ``/proc``)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    return float("nan")


def run_load_benchmark(submitters: int = 8, readers: int = 16, requests: int = 1000) -> dict[str, Any]:
    """Run the load benchmark (see the module docstring)."""
    from monailabel.client import MONAILabelClient

    from medmeta_plugin.app.process import copy_app, running_server
    from medmeta_plugin.io import write_image

    logging.getLogger("monailabel.client.client").setLevel(logging.WARNING)
    if submitters < 2 or readers < 1 or requests < readers:
        raise ValueError(
            f"need submitters >= 2, readers >= 1 and requests >= readers, got {submitters}, {readers}, "
            f"{requests}."
        )
    work = Path(tempfile.mkdtemp(prefix="medmeta-load-"))
    studies, app, labels = work / "studies", work / "app", work / "labels"
    studies.mkdir()
    labels.mkdir()
    ct = next((SAMPLE_DATA / "ct_abdomen_a").glob("image.*"))
    for i in range(submitters):
        shutil.copyfile(ct, studies / f"ct_{i}.nii.gz")
    shutil.copyfile(next((SAMPLE_DATA / "mr_abdomen_d").glob("image.*")), studies / "mr.nii.gz")
    copy_app(app)
    ct_label, ct_meta, names = _structure_masks("ct_abdomen_a")
    plan = {}
    for i in range(submitters):
        structure = _SHARED if i < submitters // 2 else _OWN[(i - submitters // 2) % len(_OWN)]
        mask = (ct_label == names[structure]).astype(np.uint8)
        plan[f"ct_{i}"] = (structure, write_image(labels / f"ct_{i}.nii.gz", mask, ct_meta))
    latencies: list[float] = []
    errors: list[str] = []
    result: dict[str, Any] = {}
    with running_server(str(studies), app, work / "server.log") as (url, server):
        rss = {"ready": _rss_mb(server.pid)}
        share = [requests // readers + (1 if i < requests % readers else 0) for i in range(readers)]
        barrier = threading.Barrier(submitters)

        def submit(image_id: str) -> None:
            client = MONAILabelClient(url, tmpdir=str(work))
            structure, path = plan[image_id]
            barrier.wait()
            try:
                client.save_label(image_id, str(path), params={"label_info": [{"name": structure, "idx": 1}]})
            except Exception as err:
                errors.append(f"save_label {image_id}: {err}")

        adapted = threading.Event()
        after: list[float] = []  # latencies once every adaptation is done

        def read(count: int) -> None:
            client = MONAILabelClient(url, tmpdir=str(work))
            answered = 0
            deadline = time.perf_counter() + 900
            while answered < count and time.perf_counter() < deadline:
                counted = adapted.is_set()
                t0 = time.perf_counter()
                try:
                    client.infer("medmeta", "mr", {"result_extension": ".nii.gz"})
                    latencies.append(time.perf_counter() - t0)
                    if counted:
                        after.append(latencies[-1])
                        answered += 1
                except Exception as err:
                    if "no structure has been adapted yet" not in str(err):
                        errors.append(f"infer: {err}")
                    time.sleep(0.2)

        threads = [threading.Thread(target=submit, args=(i,)) for i in plan]
        threads += [threading.Thread(target=read, args=(n,)) for n in share]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        expected = {s for s, _ in plan.values()}
        timed_out = False
        while True:
            info = json.loads(_get(f"{url}/info/"))
            queue = info["medmeta"]["adaptation"]
            done = (
                expected <= set(info["medmeta"]["adapters"]) and not queue["pending"] and not queue["running"]
            )
            if done:
                break
            if time.perf_counter() - t0 > 600:
                errors.append("adaptation did not finish within 600 s")
                timed_out = True
                break
            time.sleep(0.5)
        adapted_s = time.perf_counter() - t0
        rss["adapted"] = _rss_mb(server.pid)
        adapted.set()
        for t in threads:
            t.join(900)
        elapsed = time.perf_counter() - t0
        rss["end"] = _rss_mb(server.pid)
        store = json.loads(_get(f"{url}/datastore/?output=all"))["objects"]
        stored = sum(1 for image_id in plan if "final" in store.get(image_id, {}).get("labels", {}))
        shots = {}
        for structure in expected:
            meta_files = sorted((app / "model" / "adapters").glob(f"*/{structure}/v*.json"))
            shots[structure] = json.loads(meta_files[-1].read_text()).get("shots") if meta_files else 0
        wanted = {s: sum(1 for v, _ in plan.values() if v == s) for s in expected}
        result = {
            "submitters": submitters,
            "readers": readers,
            "elapsed_s": round(elapsed, 2),
            "adapted_s": None if timed_out else round(adapted_s, 2),
            "server_rss_mb": rss,
            "labels_submitted": len(plan),
            "labels_stored": stored,
            "labels_lost": len(plan) - stored,
            "final_adapter_shots": shots,
            "expected_shots": wanted,
            "infer_requests": len(latencies),
            "infer_requests_while_adapting": len(latencies) - len(after),
            "infer_requests_after": len(after),
            "infer_per_s": round(len(latencies) / elapsed, 2),
            "infer_per_s_after": round(len(after) / max(elapsed - adapted_s, 1e-9), 2),
            "latency_s": {f"p{q}": round(float(np.percentile(latencies, q)), 3) for q in (50, 95, 99)}
            if latencies
            else {},
            "latency_after_s": {f"p{q}": round(float(np.percentile(after, q)), 3) for q in (50, 95, 99)}
            if after
            else {},
            "errors": errors,
        }
    return {"benchmark": "load", "result": result, "work": str(work)}


def _get(url: str) -> str:
    import urllib.request

    with urllib.request.urlopen(url, timeout=30) as response:
        return response.read().decode()


def summarise_load(results: dict[str, Any]) -> str:
    """The figures as Markdown lines."""
    r = results["result"]
    lat, after = r.get("latency_s", {}), r.get("latency_after_s", {})
    return "\n".join(
        [
            f"{r['submitters']} clients submitted labels at once, {r['readers']} ran inference meanwhile "
            f"({r['elapsed_s']} s; "
            + (
                f"every adaptation done after {r['adapted_s']} s):"
                if r["adapted_s"]
                else "not all adapted in 600 s):"
            ),
            f"- labels stored {r['labels_stored']} / {r['labels_submitted']} (lost: {r['labels_lost']})",
            f"- final adapter shots {r['final_adapter_shots']} (labels per structure {r['expected_shots']})",
            f"- inference: {r['infer_requests']} requests, {r['infer_per_s']} /s, latency p50 "
            f"{lat.get('p50')} s, p95 {lat.get('p95')} s, p99 {lat.get('p99')} s",
            f"- of them {r['infer_requests_while_adapting']} while adapting, "
            f"{r['infer_requests_after']} after ({r['infer_per_s_after']} /s, "
            f"p50 {after.get('p50')} s, p95 {after.get('p95')} s, p99 {after.get('p99')} s)",
            f"- errors: {len(r['errors'])} {r['errors'][:3]}",
            f"- server resident memory MB: ready {r['server_rss_mb']['ready']}, adapted "
            f"{r['server_rss_mb']['adapted']}, after the last request {r['server_rss_mb']['end']}",
        ]
    )
