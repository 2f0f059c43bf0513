"""FHIR JSON files from a download -> the resources they hold, each with where it was found.

Portals export FHIR in many shapes: one resource per file, a Bundle of any type (transaction,
collection, searchset, document, batch-response, ...), Bundles nested inside Bundles, a plain
JSON array of resources, or NDJSON (one resource per line, as Bulk Data writes it). This module
turns all of them into a flat stream of :class:`Found` resources, each with a JSON pointer to
its place in the file, the pointer of the Bundle that encloses it and the entry's ``fullUrl`` -
what normalization needs to resolve ``urn:uuid:`` and relative references *within* that Bundle.

Containers are not emitted themselves: a Bundle is the envelope of its entries. Anything that
is not taken (an entry without a resource, an object without ``resourceType``) comes out as a
:class:`Problem` with a PHI-free reason, so the caller can put it in the ledger. Nothing here
validates FHIR: normalization does that, with the whole record in view.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO

import orjson

from aggregator.errors import UnsupportedInput

#: Deeper nesting than this is refused rather than recursed into (a hostile file could nest
#: Bundles until the interpreter's stack runs out).
MAX_BUNDLE_DEPTH = 32


class MalformedJson(UnsupportedInput):
    """A file (or NDJSON line) is not valid JSON."""


@dataclass(frozen=True)
class Found:
    pointer: str
    """JSON pointer (RFC 6901) of the resource inside its document; ``""`` for the root."""
    resource: dict[str, Any]
    bundle: str | None
    """Pointer of the Bundle whose entry holds this resource; None when not in a Bundle."""
    full_url: str | None
    bundle_type: str | None


@dataclass(frozen=True)
class Problem:
    pointer: str
    reason: str


def escape_token(token: str | int) -> str:
    return str(token).replace("~", "~0").replace("/", "~1")


def _describe(value: Any) -> str:
    if isinstance(value, dict):
        return "a JSON object"
    if isinstance(value, list):
        return "a JSON array"
    return f"a JSON {type(value).__name__}"


def walk(doc: Any, pointer: str = "") -> Iterator[Found | Problem]:
    """Resources in a parsed JSON document: a resource, a Bundle (nested too) or an array."""
    if isinstance(doc, list):
        for i, item in enumerate(doc):
            yield from walk(item, f"{pointer}/{i}")
        return
    yield from _walk(doc, pointer, None, None, None, 0)


def _walk(obj: Any, pointer: str, bundle: str | None, full_url: str | None, bundle_type: str | None,
          depth: int) -> Iterator[Found | Problem]:
    if not isinstance(obj, dict):
        yield Problem(pointer, f"{_describe(obj)} where a FHIR resource was expected")
        return
    rtype = obj.get("resourceType")
    if not isinstance(rtype, str) or not rtype:
        yield Problem(pointer, "JSON object without resourceType (not a FHIR resource)")
        return
    if rtype != "Bundle":
        yield Found(pointer, obj, bundle, full_url, bundle_type)
        return
    if depth >= MAX_BUNDLE_DEPTH:
        yield Problem(pointer, f"Bundles nested more than {MAX_BUNDLE_DEPTH} deep")
        return
    btype = obj.get("type") if isinstance(obj.get("type"), str) else None
    entries = obj.get("entry")
    if entries is None or entries == []:
        yield Problem(pointer, f"empty Bundle (type {btype or 'unknown'})")
        return
    if not isinstance(entries, list):
        yield Problem(pointer, "Bundle.entry is not an array")
        return
    for i, entry in enumerate(entries):
        ep = f"{pointer}/entry/{i}"
        if not isinstance(entry, dict):
            yield Problem(ep, f"Bundle entry is {_describe(entry)}, not an object")
            continue
        res = entry.get("resource")
        if res is None:
            yield Problem(ep, _no_resource_reason(entry))
            continue
        fu = entry.get("fullUrl") if isinstance(entry.get("fullUrl"), str) else None
        yield from _walk(res, f"{ep}/resource", pointer, fu, btype, depth + 1)


def _no_resource_reason(entry: dict[str, Any]) -> str:
    req = entry.get("request")
    resp = entry.get("response")
    if isinstance(req, dict) and isinstance(req.get("method"), str):
        return f"Bundle entry has no resource (request {req['method'][:10]})"
    if isinstance(resp, dict) and resp.get("status"):
        status = str(resp["status"]).split(" ", 1)[0][:10]
        return f"Bundle entry has no resource (response status {status})"
    return "Bundle entry has no resource"


def json_error(exc: orjson.JSONDecodeError, *, line_offset: int = 0) -> str:
    """``malformed JSON at line N: message`` without echoing the document's content."""
    return f"malformed JSON at line {exc.lineno + line_offset}, column {exc.colno}: {exc.msg}"


def parse_json(data: bytes) -> Any:
    """Parse a whole JSON document; raises :class:`MalformedJson` naming the line."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise MalformedJson(json_error(exc)) from exc


def looks_like_ndjson(data: bytes) -> bool:
    """True when a file that failed to parse as one document is one JSON object per line.

    Used for ``.json`` files that are really NDJSON: the first non-empty line must be a complete
    JSON object on its own, and there must be a second line.
    """
    lines = [ln for ln in data.splitlines() if ln.strip()]
    if len(lines) < 2:
        return False
    try:
        return isinstance(orjson.loads(lines[0]), dict)
    except orjson.JSONDecodeError:
        return False


@dataclass(frozen=True)
class Line:
    number: int
    """1-based line number in the file."""
    items: list[Found | Problem]
    error: str | None = None


def iter_ndjson(stream: BinaryIO | Iterable[bytes]) -> Iterator[Line]:
    """Stream an NDJSON file line by line; a bad line is reported and the next one is read."""
    for number, raw in enumerate(stream, start=1):
        text = raw.strip()
        if number == 1 and text.startswith(b"\xef\xbb\xbf"):
            text = text[3:].strip()
        if not text:
            continue
        try:
            obj = orjson.loads(text)
        except orjson.JSONDecodeError as exc:
            yield Line(number, [], f"malformed JSON at line {number}, column {exc.colno}: {exc.msg}")
            continue
        yield Line(number, list(walk(obj)))
