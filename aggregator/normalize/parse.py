"""Read raw resources from the blob store and validate them as FHIR R4 with ``fhir.resources.R4B``.

Why the original JSON is kept: the pydantic model is used only as a *checker*. Re-serializing
through it would reorder keys, drop unknown-but-harmless content and change number formats, so
the bundle would no longer be a faithful copy of what the source sent. A resource that fails is
quarantined with the *path and message* of its first error, never the offending value (which may
be PHI).

Why a process pool: R4B validation is pure-Python-heavy (~0.5 ms per resource) and dominates
normalization time. For large inputs the work is split in fixed-size chunks over the machine's
cores; results come back in input order, so the output stays deterministic.

Cheap repairs: an empty Narrative (``text`` without ``div``) is removed, and a few R5 shapes
that differ from R4 only structurally (no information lost) are rewritten to their R4 form and
validated again; the repaired JSON is what goes to the bundle
and the raw store still holds the original. Anything else R4B does not know is "unsupported type".
"""

from __future__ import annotations

import copy
import multiprocessing
import os
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import orjson
from pydantic import ValidationError

from aggregator.blobs import BlobStore
from aggregator.errors import AggregatorError
from aggregator.ledger import LedgerEntry
from aggregator.model import Quarantined

KIND_RESOURCE = "resource"
UNSUPPORTED = "unsupported type"
#: below this many resources a pool costs more than it saves
POOL_MIN = 3000
CHUNK = 400


@dataclass
class Item:
    """One raw resource of one source, as read from the ledger and the blob store."""

    source_id: int
    key: str
    meta: dict[str, Any]
    data: dict[str, Any]
    rtype: str
    rid: str
    #: filled by later stages
    new_id: str = ""
    extra_sources: set[int] = field(default_factory=set)

    @property
    def ref(self) -> str:
        """``Type/id`` as the source wrote it (for messages and reference lookup)."""
        return f"{self.rtype}/{self.rid}" if self.rid else self.key

    @property
    def bundle(self) -> str:
        """The enclosing bundle/file, for resolving urn:uuid and relative references inside it."""
        return str(self.meta.get("bundle") or self.meta.get("file") or "")


def _first_error(exc: ValidationError) -> str:
    """``path: message`` of the first error, without the input value (it may hold PHI)."""
    errs = exc.errors(include_url=False, include_input=False, include_context=False)
    if not errs:
        return "validation failed"
    e = errs[0]
    path = ".".join(str(p) for p in e.get("loc", ()) if p != "__root__") or "(resource)"
    kind = str(e.get("type") or "")
    msg = str(e.get("msg") or kind)
    if kind in ("value_error", "assertion_error"):
        # custom validators may echo the value: keep only the part before any quote or colon
        msg = msg.split(":")[0].split("'")[0].split('"')[0].strip() or kind
    return f"{path}: {msg[:160]}"


def _repair_r5(obj: dict[str, Any]) -> dict[str, Any] | None:
    """An R4 copy of a few R5 shapes that carry the same information, or None."""
    rtype = obj.get("resourceType")
    fixed: dict[str, Any] | None = None
    text = obj.get("text")
    if isinstance(text, dict) and not text.get("div"):
        # a Narrative without its div (only a status) says nothing; R4 requires div when text exists
        fixed = {k: v for k, v in obj.items() if k != "text"}
        return fixed
    if rtype == "DocumentReference" and isinstance(obj.get("context"), list):
        fixed = copy.deepcopy(obj)
        enc: list[Any] = []
        related: list[Any] = []
        for ref in fixed.pop("context"):
            target = str(ref.get("reference") or "") if isinstance(ref, dict) else ""
            (enc if target.startswith(("Encounter/", "EpisodeOfCare/")) else related).append(ref)
        fixed["context"] = {k: v for k, v in (("encounter", enc), ("related", related)) if v}
    elif rtype == "Encounter" and isinstance(obj.get("class"), list):
        fixed = copy.deepcopy(obj)
        classes = fixed.pop("class")
        for cc in classes:
            codings = cc.get("coding") if isinstance(cc, dict) else None
            if codings:
                fixed["class"] = codings[0]
                break
    return fixed


def check_resource(obj: Any) -> tuple[str | None, dict[str, Any] | None]:
    """``(error, repaired)``: error is None when ``obj`` is valid R4 (possibly after a repair)."""
    from fhir.resources.R4B import get_fhir_model_class

    if not isinstance(obj, dict):
        return "invalid FHIR R4: not a JSON object", None
    rtype = obj.get("resourceType")
    if not isinstance(rtype, str) or not rtype:
        return "invalid FHIR R4: resourceType is missing", None
    try:
        cls = get_fhir_model_class(rtype)
    except (ValueError, KeyError, AttributeError, ImportError):
        return UNSUPPORTED, None
    try:
        cls.model_validate(obj)
        return None, None
    except ValidationError as exc:
        error = "invalid FHIR R4: " + _first_error(exc)
    except (ValueError, TypeError, AttributeError, KeyError) as exc:
        error = f"invalid FHIR R4: {type(exc).__name__}"
    repaired = _repair_r5(obj)
    if repaired is not None:
        try:
            cls.model_validate(repaired)
            return None, repaired
        except (ValidationError, ValueError, TypeError, AttributeError, KeyError):
            pass
    return error, None


def _check_chunk(blobs: list[bytes]) -> list[tuple[str | None, bytes | None]]:
    out: list[tuple[str | None, bytes | None]] = []
    for raw in blobs:
        try:
            obj = orjson.loads(raw)
        except orjson.JSONDecodeError:
            out.append(("invalid FHIR R4: malformed JSON", None))
            continue
        err, fixed = check_resource(obj)
        out.append((err, orjson.dumps(fixed) if fixed is not None else None))
    return out


def _workers() -> int:
    env = os.environ.get("AGGREGATOR_NORMALIZE_WORKERS")
    if env and env.isdigit():
        return max(1, int(env))
    return max(1, os.cpu_count() or 1)


def check_many(raws: Sequence[bytes]) -> list[tuple[str | None, bytes | None]]:
    """Validate JSON texts; a process pool over all cores when there are many (order kept)."""
    workers = _workers()
    if workers < 2 or len(raws) < POOL_MIN:
        return _check_chunk(list(raws))
    chunks = [list(raws[i : i + CHUNK]) for i in range(0, len(raws), CHUNK)]
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context(method)) as pool:
        results: list[tuple[str | None, bytes | None]] = []
        for part in pool.map(_check_chunk, chunks):
            results.extend(part)
    return results


def load_resources(
    entries: Iterable[LedgerEntry], blobs: BlobStore, quarantine: Callable[[Quarantined], None]
) -> list[Item]:
    """Every valid resource of ``entries`` (kind ``resource``); the others go to ``quarantine``."""
    rows: list[LedgerEntry] = []
    raws: list[bytes] = []
    for e in entries:
        if e.kind != KIND_RESOURCE:
            continue
        if not e.sha256:
            quarantine(Quarantined(e.source_id, e.kind, e.key, "invalid FHIR R4: no stored content"))
            continue
        try:
            raws.append(blobs.read_bytes(e.sha256))
        except AggregatorError:
            quarantine(Quarantined(e.source_id, e.kind, e.key, "raw content missing from the blob store"))
            continue
        rows.append(e)
    items: list[Item] = []
    for e, raw, (err, fixed) in zip(rows, raws, check_many(raws), strict=True):
        if err is not None:
            quarantine(Quarantined(e.source_id, e.kind, e.key, err))
            continue
        data = orjson.loads(fixed if fixed is not None else raw)
        items.append(Item(e.source_id, e.key, dict(e.meta or {}), data, str(data["resourceType"]),
                          str(data.get("id") or "")))
    return items
