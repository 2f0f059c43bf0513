"""Replay the recorded FHIR server exchanges (``../shared/recordings``) with ``responses``.

Bodies, statuses and headers are registered exactly as recorded (see the README there).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import responses
from responses import matchers


def load(folder: Path, name_contains: str = "") -> list[dict[str, Any]]:
    return [json.loads(f.read_text()) for f in sorted(Path(folder).glob("*.json")) if name_contains in f.name]


def register_one(rsps: responses.RequestsMock, r: dict[str, Any], *, loose_query: bool = False) -> None:
    """Register one exchange; ``loose_query`` lets the client send extra parameters (``_count``)."""
    resp = r["response"]
    headers = dict(resp["headers"])
    ct = headers.pop("Content-Type", None)
    body = resp["body"]
    body = json.dumps(body) if isinstance(body, dict | list) else (body or "")
    kwargs: dict[str, Any] = {"body": body, "status": resp["status"], "headers": headers}
    if ct:
        kwargs["content_type"] = ct
    url = r["request"]["url"]
    if loose_query and "?" in url:
        url, query = url.split("?", 1)
        params = dict(parse_qsl(query, keep_blank_values=True))
        kwargs["match"] = [matchers.query_param_matcher(params, strict_match=False)]
    rsps.add(r["request"]["method"], url, **kwargs)


def register(rsps: responses.RequestsMock, folder: Path, name_contains: str = "") -> list[dict[str, Any]]:
    """Register every exchange of ``folder`` (optionally only files whose name contains a string)."""
    records = load(folder, name_contains)
    for r in records:
        register_one(rsps, r)
    return records
