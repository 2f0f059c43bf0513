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

#: a non-empty array of plain references, as normalization writes a Provenance's targets, up to
#: its closing bracket. Possessive: a backtracking repeat would keep state for each of its 200k items.
_ARRAY = re.compile(rb'(?:\{"reference":"[^"\\]*+"\},)*+\{"reference":"[^"\\]*+"\}\]')
_REF = re.compile(rb'"reference":"([^"\\]*)"')
_TARGET = b'"target":['
_SENTINEL = "\x00targets"
_PROVENANCE = b'"resourceType":"Provenance"'


class PlainTargets:
    """The references of a Provenance's plain target array, read from the entry's bytes in place."""

    __slots__ = ("_end", "_line", "_start")

    def __init__(self, line: bytes, start: int, end: int) -> None:
        self._line = line
        self._start = start
        self._end = end

    def __iter__(self) -> Iterator[str]:
        for m in _REF.finditer(self._line, self._start, self._end):
            yield m.group(1).decode("utf-8")


def _array_end(line: bytes, pos: int) -> int | None:
    """The index of the ``]`` that closes an array of plain references starting at ``pos`` (just
    after its ``[``); None when the array holds anything else."""
    if line[pos:pos + 1] == b"]":
        return pos
    m = _ARRAY.match(line, pos)
    return m.end() - 1 if m is not None else None


def split_provenance(line: bytes) -> tuple[dict[str, Any], PlainTargets] | None:
    """An entry line of a Provenance split into the entry (its resource without ``target``) and
    its plain target references; None for any other line, or a Provenance whose targets are
    not plain references (then the line is parsed as usual).
    """
    if _PROVENANCE not in line or line.count(_TARGET) != 1:
        return None
    start = line.index(_TARGET) + len(_TARGET)
    end = _array_end(line, start)
    if end is None:
        return None
    rest = line[:start - 1] + orjson.dumps(_SENTINEL) + line[end + 1:]
    try:
        entry = orjson.loads(rest)
    except orjson.JSONDecodeError:
        return None
    res = entry.get("resource") if isinstance(entry, dict) else None
    # the sentinel where the top-level target was proves the array was the resource's own
    if not isinstance(res, dict) or res.get("resourceType") != "Provenance" or res.get("target") != _SENTINEL:
        return None
    del res["target"]
    return entry, PlainTargets(line, start, end)


def entries(record: NormalizedRecord) -> Iterator[tuple[Any, PlainTargets | None]]:
    """Each entry of the record in bundle order, as ``(entry, targets)``: ``targets`` is None,
    except for a Provenance read by :func:`split_provenance` (its entry then lacks ``target``)."""
    for line in record.lines():
        split = split_provenance(line) if _PROVENANCE in line else None
        if split is not None:
            yield split
        else:
            yield orjson.loads(line), None
