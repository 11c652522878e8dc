"""Reading a run back from an Arize Phoenix server over its REST API.

``GET /v1/projects/{project}/spans/otlpv1`` returns a project's spans as OTLP JSON in snake_case,
newest first, a page (at most 1000) at a time with a cursor. The run to read is the trace of the
newest root ``invoke_agent rlm`` span, or the trace given. ``PHOENIX_API_KEY``, when set, is sent
as a bearer token (a Phoenix with authentication enabled needs one).

This is application code (``rlmflow trace --phoenix``): it blocks while it reads.
"""

from __future__ import annotations

import os
from typing import Any
from urllib.parse import quote

import httpx

from . import attributes as attr
from .report import TraceData, normalise_span, trace_from_spans

__all__ = ["PhoenixError", "fetch_spans", "load_phoenix_trace"]

PAGE = 1000  # the largest page the endpoint serves


class PhoenixError(Exception):
    """The Phoenix server could not be read, or holds no such project or run."""


def _get(client: httpx.Client, path: str, params: dict[str, Any]) -> dict[str, Any]:
    try:
        response = client.get(path, params=params)
    except httpx.HTTPError as exc:
        raise PhoenixError(f"cannot reach Phoenix at {client.base_url}: {exc}") from exc
    if response.status_code == 404:
        raise PhoenixError(f"Phoenix answered 404 for {path}: {response.text[:200]}")
    if response.status_code != 200:
        raise PhoenixError(f"Phoenix answered {response.status_code} for {path}: {response.text[:200]}")
    body: dict[str, Any] = response.json()
    return body


def fetch_spans(
    url: str, project: str, *, trace_id: str | None = None, timeout: float = 30.0
) -> list[dict[str, Any]]:
    """Every span of one trace of ``project`` (the newest rlmflow run unless ``trace_id``), as OTLP JSON.

    Raises :class:`PhoenixError` when the server cannot be read, the project does not exist, or
    it holds no rlmflow run.
    """
    headers = {}
    if os.environ.get("PHOENIX_API_KEY"):
        headers["Authorization"] = f"Bearer {os.environ['PHOENIX_API_KEY']}"
    path = f"/v1/projects/{quote(project, safe='')}/spans/otlpv1"
    with httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout) as client:
        if trace_id is None:
            roots = _get(client, path, {"parent_id": "null", "name": attr.SPAN_RUN, "limit": 1}).get("data") or []
            if not roots:
                raise PhoenixError(f"no rlmflow run ({attr.SPAN_RUN!r} root span) in project {project!r}")
            trace_id = str(roots[0]["trace_id"])
        spans: list[dict[str, Any]] = []
        cursor: str | None = None
        while True:
            params: dict[str, Any] = {"trace_id": trace_id, "limit": PAGE}
            if cursor:
                params["cursor"] = cursor
            page = _get(client, path, params)
            spans.extend(normalise_span(span) for span in page.get("data") or [])
            cursor = page.get("next_cursor")
            if not cursor:
                break
    if not spans:
        raise PhoenixError(f"no spans of trace {trace_id} in project {project!r}")
    return spans


def load_phoenix_trace(url: str, project: str, *, trace_id: str | None = None) -> TraceData:
    """The :class:`TraceData` of one run stored in Phoenix (see :func:`fetch_spans`)."""
    return trace_from_spans(fetch_spans(url, project, trace_id=trace_id))
