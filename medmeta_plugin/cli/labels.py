"""``medmeta labels``: an image's label revisions on a running server, and restoring one.

Over the server's REST API (``GET /datastore/label/revisions``, ``POST /datastore/label/restore``), so a
restore is adapted from like any new label; ``--token`` passes a bearer token when auth is on.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import urllib.error
import urllib.parse
import urllib.request
from datetime import UTC, datetime
from typing import Any

__all__ = ["PARSERS"]


def _call(args: argparse.Namespace, method: str, path: str, params: dict[str, Any]) -> dict[str, Any]:
    url = f"{args.server.rstrip('/')}{path}?{urllib.parse.urlencode(params)}"
    request = urllib.request.Request(url, method=method)
    if args.token:
        request.add_header("Authorization", f"Bearer {args.token}")
    try:
        with urllib.request.urlopen(request, timeout=args.timeout) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as err:
        detail = err.read().decode(errors="replace")
        with contextlib.suppress(json.JSONDecodeError, AttributeError):
            detail = json.loads(detail).get("detail", detail)
        raise ValueError(f"{method} {path}: {err.code} {detail}") from err
    except urllib.error.URLError as err:
        raise ValueError(f"no server answers at {args.server} ({err.reason}).") from err


def _when(ts: Any) -> str:
    return datetime.fromtimestamp(float(ts), tz=UTC).strftime("%Y-%m-%d %H:%M:%S UTC") if ts else "-"


def _revisions(args: argparse.Namespace) -> int:
    body = _call(args, "GET", "/datastore/label/revisions", {"image": args.image, "tag": args.tag})
    current = body.get("current")
    print(f"{args.image} ({args.tag}): current label saved {_when(current and current.get('ts'))}")
    print("| revision | saved | replaced | by | structures |")
    print("|---|---|---|---|---|")
    for r in body["revisions"]:
        by = "a restore" if r["reason"] == "restored" else "a new label"
        print(
            f"| {r['revision']} | {_when(r['ts'])} | {_when(r['replaced_at'])} | {by} | "
            f"{', '.join(r['structures']) or '-'} |"
        )
    if not body["revisions"]:
        print("(no earlier label)")
    return 0


def _restore(args: argparse.Namespace) -> int:
    params = {"image": args.image, "revision": args.revision, "tag": args.tag}
    body = _call(args, "POST", "/datastore/label/restore", params)
    adapting = (body.get("medmeta") or {}).get("adapting") or []
    print(
        f"{args.image} ({args.tag}): revision {args.revision} is the current label again; the label it "
        f"replaced is kept as a revision. Adapting: {', '.join(adapting) or 'nothing'}."
    )
    return 0


def _add_labels(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("labels", help="label revisions on a running server: list, restore")
    inner = p.add_subparsers(dest="labels", metavar="ACTION", required=True)
    for name, func, text in (
        ("revisions", _revisions, "list an image's earlier labels"),
        ("restore", _restore, "make an earlier label current again (undoable: a restore is a revision)"),
    ):
        q = inner.add_parser(name, help=text)
        q.add_argument("image", help="image id in the datastore")
        if name == "restore":
            q.add_argument("revision", type=int, help="revision number (see `medmeta labels revisions`)")
        q.add_argument("--server", default="http://127.0.0.1:8000", help="the MONAI Label server")
        q.add_argument("--tag", default="final", help="label tag (default final)")
        q.add_argument("--token", help="bearer token, when the server's auth is on")
        q.add_argument("--timeout", type=float, default=60.0)
        q.set_defaults(func=func)


PARSERS = (_add_labels,)
