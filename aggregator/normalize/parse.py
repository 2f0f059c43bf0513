"""Read raw resources from the blob store and validate them as FHIR R4 with ``fhir.resources.R4B``.

Why the original JSON is kept: the pydantic model is used only as a *checker*. Re-serializing
through it would reorder keys, drop unknown-but-harmless content and change number formats, so
the bundle would no longer be a faithful copy of what the source sent. A resource that fails is
quarantined with the *path and message* of its first error, never the offending value (which may
be PHI).

Why a process pool: R4B validation is pure-Python-heavy (~0.5-0.7 ms per resource) and dominates
normalization time. For large inputs the work is split in fixed-size chunks over the machine's
cores (``AGGREGATOR_NORMALIZE_WORKERS`` overrides the count); the workers read the blobs
themselves and the parent turns finished chunks into items while later ones are being checked,
so reading the ledger, parsing and validating overlap. Items are sorted by (source, key) at the
end, so the output stays deterministic whatever the timing.

Cheap repairs: an empty Narrative (``text`` without ``div``) is removed, and a few R5 shapes
that differ from R4 only structurally (no information lost) are rewritten to their R4 form and
validated again; the repaired JSON is what goes to the bundle
and the raw store still holds the original. Anything else R4B does not know is "unsupported type".
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import tempfile
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

KIND_RESOURCE = "resource"
UNSUPPORTED = "unsupported type"
#: below this many resources a pool costs more than it saves
POOL_MIN = 3000
CHUNK = 400


class Spool:
    """Append-only scratch file of resource bodies (orjson bytes), so that a record of any size
    holds only compact facts per resource on the heap.

    The file is unlinked as soon as it is created: it disappears when closed, and even when the
    process dies, so no PHI is left behind in TMPDIR. ``pread``/``pwrite`` keep no file position,
    and recently written bodies are served from the page cache.
    """

    def __init__(self, directory: str | None = None) -> None:
        fd, path = tempfile.mkstemp(prefix="aggregator-spool-", dir=directory)
        os.unlink(path)
        self._fd = fd
        self._end = 0

    def append(self, data: bytes) -> tuple[int, int]:
        """Write ``data`` at the end; returns ``(offset, length)``."""
        off = self._end
        view = memoryview(data)
        while view:
            n = os.pwrite(self._fd, view, off + (len(data) - len(view)))
            view = view[n:]
        self._end += len(data)
        return off, len(data)

    def read(self, offset: int, length: int) -> bytes:
        data = os.pread(self._fd, length, offset)
        if len(data) != length:
            raise AggregatorError("normalization scratch file is truncated")
        return data

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


_NO_EXTRA: frozenset[int] = frozenset()


class Item:
    """One resource of one source: compact facts on the heap, the body in the :class:`Spool`.

    The body is read with :meth:`body` (a fresh dict each time) and written back with
    :meth:`store`; a change to a loaded dict that is not stored is lost, so every step that
    changes a resource says so explicitly.
    """

    __slots__ = (
        "_len",
        "_off",
        "_spool",
        "attach_plan",
        "base_url",
        "bundle",
        "chash",
        "derived",
        "extra_sources",
        "facts",
        "file",
        "full_url",
        "key",
        "new_id",
        "patch",
        "refs",
        "rid",
        "rtype",
        "source_id",
    )

    def __init__(self, source_id: int, key: str, meta: dict[str, Any], facts: Facts, spool: Spool,
                 body: bytes | dict[str, Any], *, new_id: str = "",
                 extra_sources: frozenset[int] = _NO_EXTRA) -> None:
        self.source_id = source_id
        self.key = key
        self.rtype = facts.rtype
        self.rid = facts.rid
        self.file = _shared(meta.get("file"))
        self.bundle = _shared(meta.get("bundle") or meta.get("file"))
        self.full_url = str(meta.get("fullUrl") or "")
        self.base_url = _shared(meta.get("base_url"))
        self.derived = bool(meta.get("derived"))
        self.facts = facts
        self.new_id = new_id
        self.extra_sources = extra_sources
        #: resolved targets of the body's references, in :func:`reference_nodes` order (a cache
        #: shared by de-duplication and rewriting); None = not computed
        self.refs: tuple[Any, ...] | None = None
        #: canonical content digest, valid while the groups of its targets do not change
        self.chash: bytes | None = None
        #: changes decided by global steps, applied when the bundle is written
        self.patch: dict[str, Any] | None = None
        #: ``(attachment index, package file facts)`` decided by the documents step
        self.attach_plan: list[tuple[int, Any]] | None = None
        self._spool = spool
        self._off, self._len = spool.append(body if isinstance(body, bytes) else orjson.dumps(body))

    @property
    def ref(self) -> str:
        """``Type/id`` as the source wrote it (for messages and reference lookup)."""
        return f"{self.rtype}/{self.rid}" if self.rid else self.key

    @property
    def meta(self) -> dict[str, Any]:
        """The ledger meta fields normalization uses (a new dict: changing it changes nothing)."""
        out: dict[str, Any] = {}
        for k, v in (("file", self.file), ("bundle", self.bundle), ("fullUrl", self.full_url),
                     ("base_url", self.base_url), ("derived", self.derived)):
            if v:
                out[k] = v
        return out

    def body(self) -> dict[str, Any]:
        """The resource as stored last (a fresh dict: call :meth:`store` to keep a change)."""
        return dict(orjson.loads(self._spool.read(self._off, self._len)))

    def store(self, body: dict[str, Any]) -> None:
        """Replace the stored body (appended; the old bytes stay unused in the scratch file)."""
        self._off, self._len = self._spool.append(orjson.dumps(body))


_SHARED: dict[str, str] = {}


def _shared(value: Any) -> str:
    """One string object per distinct file/bundle/base name (thousands of items share each)."""
    if not value:
        return ""
    text = str(value)
    return _SHARED.setdefault(text, text) if len(_SHARED) < 100_000 else text


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
    return converted if converted is not None else fixed


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


class _Loader:
    """Turns checked chunks into :class:`Item` s (in the parent, while workers check later chunks)."""

    def __init__(self, quarantine: Callable[[Quarantined], None], spool: Spool) -> None:
        self.quarantine = quarantine
        self.spool = spool
        self.items: list[Item] = []

    def take(self, rows: list[LedgerEntry], results: list[Checked]) -> None:
        add = self.items.append
        intern = sys.intern
        for e, (err, raw, facts) in zip(rows, results, strict=True):
            if err is not None or raw is None or facts is None:
                self.quarantine(Quarantined(e.source_id, e.kind, e.key, err or MISSING))
                continue
            # one string object per distinct type and status, not one per resource
            facts.rtype, facts.status, facts.doc_status = (intern(facts.rtype), intern(facts.status),
                                                           intern(facts.doc_status))
            add(Item(e.source_id, e.key, e.meta if e.meta is not None else {}, facts, self.spool, raw))


def load_resources(
    entries: Iterable[LedgerEntry], blobs: BlobStore, quarantine: Callable[[Quarantined], None], spool: Spool
) -> list[Item]:
    """Every valid resource of ``entries`` (kind ``resource``), sorted by (source, key); the others
    go to ``quarantine``.

    ``entries`` is consumed as a stream: once :data:`POOL_MIN` rows have arrived, chunks go to a
    process pool while the rest of the ledger is still being read, and at most a few chunks are
    in flight, so neither the raw bytes nor the ledger rows of the whole record are held at once.
    Validation does not depend on order; the items are sorted afterwards, so the result is the
    same whatever the pool's timing.
    """
    loader = _Loader(quarantine, spool)
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
            loader.take(done_rows, fut.result())

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
                loader.take(buf, _check_chunk(root, [str(e.sha256) for e in buf]))
                buf = []
        if pool is None:
            for i in range(0, len(buf), CHUNK):
                part = buf[i : i + CHUNK]
                loader.take(part, _check_chunk(root, [str(e.sha256) for e in part]))
        else:
            for i in range(0, len(buf), CHUNK):
                submit(buf[i : i + CHUNK])
            while pending:
                done_rows, fut = pending.popleft()
                loader.take(done_rows, fut.result())
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    loader.items.sort(key=lambda it: (it.source_id, it.key))
    return loader.items
