"""Reading a normalized record's entries without materialising its Provenance target lists.

Normalization writes one Provenance per pull, and it targets every resource of that pull: on a
record of 200k resources its ``target`` array is 200k references on one line. Parsed, that line
alone is a dict per resource (~60 MB), held while the rest of the record streams past in a few
kilobytes. The readers here (the checklist engine, the package's summary and document writers)
take such a line apart at the bytes instead: the Provenance is parsed without its target array,
and the array's references are read from the bytes one at a time, for the one reader (the
engine's source attribution) that needs them.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import orjson

from aggregator.model import NormalizedRecord

#: a top-level ``target`` array that holds only plain references (as normalization writes it)
_TARGETS = re.compile(rb'"target":\[((?:\{"reference":"[^"\\]*"\},?)*)\]')
_TARGET_REF = re.compile(rb'"reference":"([^"\\]*)"')
_SENTINEL = "\x00targets"
_PROVENANCE = b'"resourceType":"Provenance"'


def split_provenance(line: bytes) -> tuple[dict[str, Any], bytes] | None:
    """An entry line of a Provenance split into the entry (its resource without ``target``) and
    the bytes of its plain ``target`` array; None for any other line, or a Provenance whose
    targets are not plain references (then the line is parsed as usual).
    """
    if _PROVENANCE not in line or line.count(b'"target":[') != 1:
        return None
    m = _TARGETS.search(line)
    if m is None:
        return None
    rest = line[:m.start()] + b'"target":' + orjson.dumps(_SENTINEL) + line[m.end():]
    try:
        entry = orjson.loads(rest)
    except orjson.JSONDecodeError:
        return None
    res = entry.get("resource") if isinstance(entry, dict) else None
    # the sentinel where the top-level target was proves the array was the resource's own
    if not isinstance(res, dict) or res.get("resourceType") != "Provenance" or res.get("target") != _SENTINEL:
        return None
    del res["target"]
    return entry, m.group(1)


def plain_refs(targets: bytes) -> Iterator[str]:
    """The reference strings of a target array returned by :func:`split_provenance`, in order."""
    for m in _TARGET_REF.finditer(targets):
        yield m.group(1).decode("utf-8")


def entries(record: NormalizedRecord) -> Iterator[tuple[Any, bytes | None]]:
    """Each entry of the record in bundle order, as ``(entry, targets)``: ``targets`` is None,
    except for a Provenance read by :func:`split_provenance` (its entry then lacks ``target``)."""
    for line in record.lines():
        split = split_provenance(line) if _PROVENANCE in line else None
        if split is not None:
            yield split
        else:
            yield orjson.loads(line), None
