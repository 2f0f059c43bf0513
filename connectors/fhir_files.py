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
        yield from _entry(entry, f"{pointer}/entry/{i}", pointer, btype, depth + 1)


def _entry(entry: Any, ep: str, bundle: str, btype: str | None, depth: int) -> Iterator[Found | Problem]:
    """One Bundle entry at pointer ``ep``: its resource walked, or why it has none.

    Shared by :func:`_walk` and :func:`stream_json` so that a Bundle parsed whole and one streamed
    entry by entry give the same findings, problems and pointers."""
    if not isinstance(entry, dict):
        yield Problem(ep, f"Bundle entry is {_describe(entry)}, not an object")
        return
    res = entry.get("resource")
    if res is None:
        yield Problem(ep, _no_resource_reason(entry))
        return
    fu = entry.get("fullUrl") if isinstance(entry.get("fullUrl"), str) else None
    yield from _walk(res, f"{ep}/resource", bundle, fu, btype, depth)


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


# --- large files, streamed ---------------------------------------------------------------------

#: bytes of the first line read to tell a ``.json`` that is really NDJSON
_FIRST_LINE_PEEK = 1 << 20


def first_line_is_object(fp: BinaryIO) -> bool:
    """True when the file's first line is a complete JSON object and another line follows."""
    fp.seek(0)
    head = fp.readline(_FIRST_LINE_PEEK).strip()
    if head.startswith(b"\xef\xbb\xbf"):
        head = head[3:].strip()
    rest = fp.read(4096).strip()
    fp.seek(0)
    if not head or not rest:
        return False
    try:
        return isinstance(orjson.loads(head), dict)
    except orjson.JSONDecodeError:
        return False


def stream_json(fp: BinaryIO) -> Iterator[Found | Problem]:
    """Like :func:`walk` over a file too large to parse whole: one entry in memory at a time.

    A portal's "download everything" can be one multi-gigabyte Bundle; parsed whole it took
    more than twice its size in memory. Here ``ijson`` (C backend) yields the top-level array's
    items or the Bundle's entries one by one, with the same pointers, fullUrls and Bundle type
    that :func:`walk` gives, so normalization cannot tell the two paths apart. Only a single
    resource that is not a Bundle is refused: it cannot be split. Malformed JSON part-way
    raises :class:`MalformedJson` after the entries before it were yielded (they are kept).
    """
    import ijson

    try:
        first = _first_char(fp)
        if first == b"[":
            for i, item in enumerate(ijson.items(fp, "item", use_float=True)):
                yield from walk(item, f"/{i}")
            return
        if first != b"{":
            raise MalformedJson("not a JSON object or array")
        rtype, btype = _top_level(fp)
        if rtype != "Bundle":
            what = f"a single {rtype} resource" if rtype else "a JSON object without resourceType"
            yield Problem("", f"{what} too large to read in memory (only Bundles and arrays are streamed)")
            return
        fp.seek(0)
        n = 0
        for n, entry in enumerate(ijson.items(fp, "entry.item", use_float=True), start=1):
            yield from _entry(entry, f"/entry/{n - 1}", "", btype, 1)
        if n == 0:
            yield Problem("", f"empty Bundle (type {btype or 'unknown'})")
    except ijson.JSONError as exc:
        # ijson's messages quote the bytes they stopped at: keep only its kind
        raise MalformedJson(f"malformed JSON in a large file ({type(exc).__name__})") from exc


def _first_char(fp: BinaryIO) -> bytes:
    fp.seek(0)
    while True:
        c = fp.read(1)
        if not c:
            raise MalformedJson("empty JSON file")
        if c in b"\xef\xbb\xbf \t\r\n":
            continue
        fp.seek(fp.tell() - 1)
        return c


def _top_level(fp: BinaryIO) -> tuple[str | None, str | None]:
    """The root object's ``resourceType`` and ``type``, reading no further than needed."""
    import ijson

    fp.seek(0)
    rtype: str | None = None
    btype: str | None = None
    for prefix, event, value in ijson.parse(fp):
        if prefix == "resourceType" and event == "string":
            rtype = value
        elif prefix == "type" and event == "string":
            btype = value
        if rtype is not None and (btype is not None or rtype != "Bundle"):
            break
    return rtype, btype
