"""Read raw resources from the blob store and validate them as FHIR R4 with ``fhir.resources.R4B``.

Why the original JSON is kept: the pydantic model is used only as a *checker*. Re-serializing
through it would reorder keys, drop unknown-but-harmless content and change number formats, so
the bundle would no longer be a faithful copy of what the source sent. A resource that fails is
quarantined with the *path and message* of its first error, never the offending value (which may
be PHI).

Why a process pool: R4B validation is pure-Python-heavy (~0.5-0.7 ms per resource) and dominates
normalization time. For large inputs the work is split in fixed-size chunks over the machine's
cores (``AGGREGATOR_NORMALIZE_WORKERS`` overrides the count); the workers read the blobs
themselves and the parent stores finished chunks (:mod:`.loader`) while later ones are being
checked, so reading the ledger, parsing and validating overlap. The scratch database ranks the
resources by (source, key) afterwards, so the output stays deterministic whatever the timing.

Cheap repairs: an empty Narrative (``text`` without ``div``) is removed, ImagingStudy series and
instance UIDs written as ``urn:oid:`` lose the prefix (R4 types them ``id``), and a few R5 shapes
that differ from R4 only structurally (no information lost) are rewritten to their R4 form and
validated again; the repaired JSON is what goes to the bundle
and the raw store still holds the original. Anything else R4B does not know is "unsupported type".
"""

from __future__ import annotations

import multiprocessing
import os
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path
from typing import Any

import orjson
from pydantic import ValidationError

from aggregator.blobs import BlobStore
from aggregator.errors import AggregatorError
from aggregator.ledger import LedgerEntry
from aggregator.model import Quarantined
from aggregator.normalize.facts import Facts, facts_of
from aggregator.normalize.r5 import to_r4
from aggregator.normalize.scratch import Spool
from aggregator.normalize.uids import plain_series_uids

__all__ = ["CHUNK", "KIND_RESOURCE", "POOL_MIN", "Spool", "check_resource", "load_resources"]

KIND_RESOURCE = "resource"
UNSUPPORTED = "unsupported type"
#: below this many resources a pool costs more than it saves
POOL_MIN = 3000
CHUNK = 400


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
    """An R4 copy that carries the same information, or None (see :mod:`.r5`)."""
    fixed: dict[str, Any] | None = None
    text = obj.get("text")
    if isinstance(text, dict) and not text.get("div"):
        # a Narrative without its div (only a status) says nothing; R4 requires div when text exists
        fixed = {k: v for k, v in obj.items() if k != "text"}
    converted = to_r4(fixed if fixed is not None else obj)
    fixed = converted if converted is not None else fixed
    plain = plain_series_uids(fixed if fixed is not None else obj)  # urn:oid: series/instance UIDs
    return plain if plain is not None else fixed


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


MISSING = "raw content missing from the blob store"


Checked = tuple[str | None, bytes | None, Facts | None]


def _check_chunk(root: str, shas: list[str]) -> list[Checked]:
    """Read, parse and validate stored resources; ``(error, JSON to keep, facts)`` per SHA-256.

    Runs in a worker: it reads the blobs itself, so the parent never holds the raw bytes of more
    than the few chunks in flight, and it sends back bytes (cheap to pickle) and the resource's
    compact :class:`Facts`, so the parent never parses the JSON at all.
    """
    store = BlobStore(Path(root))
    out: list[Checked] = []
    for sha in shas:
        try:
            raw = store.read_bytes(sha)
        except AggregatorError:
            out.append((MISSING, None, None))
            continue
        try:
            obj = orjson.loads(raw)
        except orjson.JSONDecodeError:
            out.append(("invalid FHIR R4: malformed JSON", None, None))
            continue
        err, fixed = check_resource(obj)
        if err is not None:
            out.append((err, None, None))
        else:
            out.append((None, orjson.dumps(fixed) if fixed is not None else raw, facts_of(fixed or obj)))
    return out


def _workers() -> int:
    env = os.environ.get("AGGREGATOR_NORMALIZE_WORKERS")
    if env and env.isdigit():
        return max(1, int(env))
    return max(1, os.cpu_count() or 1)


#: receives finished chunks: the ledger rows and, for each, ``(error, JSON to keep, facts)``
Take = Callable[[list[LedgerEntry], list[Checked]], None]


def load_resources(entries: Iterable[LedgerEntry], blobs: BlobStore, quarantine: Callable[[Quarantined], None],
                   take: Take) -> None:
    """Validate every resource of ``entries`` (kind ``resource``) and hand the results to ``take``
    chunk by chunk, in the order of ``entries``; rows without stored content go to ``quarantine``.

    ``entries`` is consumed as a stream: once :data:`POOL_MIN` rows have arrived, chunks go to a
    process pool while the rest of the ledger is still being read, and at most a few chunks are
    in flight, so neither the raw bytes nor the ledger rows of the whole record are held at once.
    Chunks are handed over in submission order, whatever the pool's timing.
    """
    root = str(blobs.root)
    workers = _workers()
    buf: list[LedgerEntry] = []
    pool: ProcessPoolExecutor | None = None
    pending: deque[tuple[list[LedgerEntry], Future[list[Checked]]]] = deque()

    def submit(rows: list[LedgerEntry]) -> None:
        assert pool is not None
        pending.append((rows, pool.submit(_check_chunk, root, [str(e.sha256) for e in rows])))
        while len(pending) > 3 * workers:
            done_rows, fut = pending.popleft()
            take(done_rows, fut.result())

    try:
        for e in entries:
            if e.kind != KIND_RESOURCE:
                continue
            if not e.sha256:
                quarantine(Quarantined(e.source_id, e.kind, e.key, "invalid FHIR R4: no stored content"))
                continue
            buf.append(e)
            if len(buf) < CHUNK:
                continue
            if pool is None and workers >= 2 and len(buf) >= POOL_MIN:
                method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
                pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context(method))
            if pool is not None:
                for i in range(0, len(buf), CHUNK):
                    submit(buf[i : i + CHUNK])
                buf = []
            elif workers < 2:
                take(buf, _check_chunk(root, [str(e.sha256) for e in buf]))
                buf = []
        if pool is None:
            for i in range(0, len(buf), CHUNK):
                part = buf[i : i + CHUNK]
                take(part, _check_chunk(root, [str(e.sha256) for e in part]))
        else:
            for i in range(0, len(buf), CHUNK):
                submit(buf[i : i + CHUNK])
            while pending:
                done_rows, fut = pending.popleft()
                take(done_rows, fut.result())
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
