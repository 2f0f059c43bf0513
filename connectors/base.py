"""The connector protocol: what every source of records implements, and the registry.

A connector knows one protocol (a FHIR API, DIMSE, a folder of downloads). It does not know
about cases, checklists, files or the database: it pulls items for one patient and streams
them into a :class:`Sink`, which the core implements (blob store + ledger). It returns a new
:class:`Cursor`, which the core commits only together with the data it covers.

Connectors register under the entry-point group ``aggregator.connectors``; the built-in ones
register there exactly as a third-party one would (see ``pyproject.toml``).
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, BinaryIO, ClassVar, Protocol

from aggregator.blobs import BlobRef
from aggregator.errors import ConfigError, NotFound

ENTRY_POINT_GROUP = "aggregator.connectors"

#: Ledger item kinds. ``file`` is an input file a connector looked at but could not use.
KIND_RESOURCE = "resource"
KIND_BINARY = "binary"
KIND_DICOM = "dicom"
KIND_FILE = "file"
KIND_QUERY = "query"

#: Incremental state: stream name (e.g. a resource type) -> a small JSON object.
Cursor = dict[str, dict[str, Any]]

#: Streams of a checkpoint (see :meth:`Sink.checkpoint`) are kept as ``partial:<pull>:<stream>``.
CHECKPOINT_PREFIX = "partial:"


def checkpoint_name(pull_id: int | None, stream: str) -> str:
    """The cursor stream under which a pull's checkpoint of ``stream`` is kept."""
    return f"{CHECKPOINT_PREFIX}{pull_id or 0}:{stream}"


def checkpoints(since: Cursor | None, stream: str) -> list[dict[str, Any]]:
    """The checkpointed values of ``stream`` and of its parts (``stream.<part>``) in ``since``.

    Oldest pull first, parts in name order, so that a later pull's value of a key wins when a
    connector merges them. These are what interrupted pulls got through: the connector's own
    cursor value (``since[stream]``) is the last *finished* pull's.
    """
    found: list[tuple[int, str, dict[str, Any]]] = []
    for name, value in (since or {}).items():
        if not name.startswith(CHECKPOINT_PREFIX) or not isinstance(value, dict):
            continue
        pull, _, part = name[len(CHECKPOINT_PREFIX):].partition(":")
        if (part == stream or part.startswith(stream + ".")) and pull.isdigit():
            found.append((int(pull), part, value))
    return [v for _, _, v in sorted(found, key=lambda t: (t[0], t[1]))]

Data = bytes | BinaryIO | Iterable[bytes]


@dataclass(frozen=True)
class PatientRef:
    """Who to pull. Connectors use what their protocol can search on."""

    id: str | None = None
    """The patient's logical id at this source (FHIR Patient id, DICOM PatientID)."""
    identifier: str | None = None
    """A business identifier as ``system|value`` (FHIR) ."""
    issuer: str | None = None
    """DICOM IssuerOfPatientID, when the archive needs it to disambiguate PatientID."""
    name: str | None = None
    birth_date: str | None = None

    def describe(self) -> str:
        """A PHI-free description for logs: which kinds of criteria are set, never their values."""
        parts = [k for k in ("id", "identifier", "issuer", "name", "birth_date") if getattr(self, k)]
        return "patient(" + ",".join(parts) + ")"


class Progress(Protocol):
    """Where a connector reports how far it got; the CLI draws a bar, the API stores numbers."""

    def set_total(self, total: int | None) -> None: ...

    def advance(self, n: int = 1) -> None: ...

    def message(self, text: str) -> None: ...


class NullProgress:
    def set_total(self, total: int | None) -> None:
        pass

    def advance(self, n: int = 1) -> None:
        pass

    def message(self, text: str) -> None:
        pass


class Sink(Protocol):
    """Where connectors put what they fetched. Implemented by the core, never by connectors."""

    def is_done(self, kind: str, key: str) -> bool:
        """True when an earlier pull already fetched this item: resume skips it."""
        ...

    def retry_candidates(self, kind: str) -> list[tuple[str, dict[str, Any]]]:
        """(key, meta) of items of ``kind`` that failed in earlier pulls. A connector retries them
        even when nothing that points at them changed, so an incremental pull does not leave an
        old failure standing forever."""
        ...

    def set_method(self, method: str) -> None:
        """Record how the data was obtained ($everything, crawl, $export, C-GET, WADO, media)."""
        ...

    def resource(
        self, resource: Mapping[str, Any], *, key: str | None = None, meta: Mapping[str, Any] | None = None
    ) -> None:
        """A FHIR resource as a JSON object; ``key`` defaults to ``Type/id``."""
        ...

    def binary(
        self,
        key: str,
        data: Data,
        content_type: str,
        *,
        meta: Mapping[str, Any] | None = None,
        expected_sha256: str | None = None,
    ) -> BlobRef:
        """Attachment bytes; ``key`` is the URL or path other resources use to point at them."""
        ...

    def dicom(self, sop_instance_uid: str, data: Data, *, meta: Mapping[str, Any] | None = None) -> int:
        """One DICOM instance, bytes exactly as received (Part 10 file), kept by its SOP
        Instance UID; returns the number of bytes stored."""
        ...

    def failed(
        self,
        kind: str,
        key: str,
        reason: str,
        *,
        status: int | str | None = None,
        meta: Mapping[str, Any] | None = None,
    ) -> None:
        """An item that could not be fetched. ``reason`` must not contain PHI."""
        ...

    def skipped(self, kind: str, key: str, reason: str, *, meta: Mapping[str, Any] | None = None) -> None:
        """An item deliberately not taken (unsupported, duplicate, another patient)."""
        ...

    def checkpoint(self, cursor: Cursor, *, aligned: bool = False) -> None:
        """Progress so far, kept even if this pull never finishes: a resumed pull starts from it.

        ``cursor`` (stream -> value, each stream replacing its earlier checkpoint) must cover
        only items already handed to the sink: the core writes it in the same transaction as
        their ledger rows, so an interrupted pull leaves no checkpoint ahead of its data. The
        next pull's ``since`` holds it under :func:`checkpoint_name` (read it with
        :func:`checkpoints`) until a pull finishes and its own cursor replaces it.

        ``aligned``: the connector checkpoints after every item, so rows are written only at
        checkpoints (up to a memory cap), and an interruption cannot leave an item's rows
        committed without the checkpoint that covers it (the item would be read again).
        """
        ...


@dataclass
class CheckResult:
    ok: bool
    details: dict[str, Any] = field(default_factory=dict)


def option(default: Any = dataclasses.MISSING, *, help: str, choices: Iterable[str] | None = None,
           aliases: Iterable[str] = (), cli: bool = True) -> Any:
    """A config field that describes itself, so the CLI and the API derive their options from it.

    ``help`` is the one-line description shown by ``endpoint add --help`` and in the API's
    schema; ``choices`` restricts the value; ``aliases`` are further option names that set this
    field too (``--timeout`` sets both DIMSE timeouts); ``cli=False`` keeps an internal field
    (set by the core, never by a user) out of both.
    """
    meta = {"help": help, "choices": tuple(choices) if choices else None, "aliases": tuple(aliases), "cli": cli}
    if default is dataclasses.MISSING:
        return field(metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ConnectorConfig:
    """Base for typed connector configs: plain dataclasses that round-trip through JSON."""

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ConnectorConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ConfigError(f"unknown option(s) for {cls.__name__}: {', '.join(sorted(unknown))}")
        try:
            return cls(**dict(data))
        except TypeError as exc:
            raise ConfigError(f"invalid {cls.__name__}: {exc}") from exc

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class Connector(ABC):
    """One protocol. Subclasses set ``kind`` and ``config_type``."""

    kind: ClassVar[str]
    config_type: ClassVar[type[ConnectorConfig]]

    def __init__(self, config: ConnectorConfig) -> None:
        self.config = config

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Connector:
        return cls(cls.config_type.from_dict(data))

    @abstractmethod
    def check(self) -> CheckResult:
        """Test connectivity and authentication; report what the peer supports."""

    @abstractmethod
    def pull(self, patient: PatientRef, since: Cursor | None, sink: Sink, progress: Progress) -> Cursor:
        """Fetch everything for ``patient`` changed after ``since`` into ``sink``; return the new cursor."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release sockets and sessions."""


def available_kinds() -> list[str]:
    from importlib.metadata import entry_points  # ~2.6 MiB resident: only where connectors are looked up

    return sorted(ep.name for ep in entry_points(group=ENTRY_POINT_GROUP))


_LOADED: dict[str, type[Connector]] = {}


def load_connector_class(kind: str) -> type[Connector]:
    """Find a connector class by its kind through the entry-point registry.

    A class once found is kept for the process: scanning the installed distributions costs
    about 10 ms, on every pull of a worker otherwise. A plugin installed later is seen by the
    next process (and an unknown kind is looked up afresh each time).
    """
    from importlib.metadata import entry_points

    if kind in _LOADED:
        return _LOADED[kind]
    matches = [ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name == kind]
    if not matches:
        known = ", ".join(available_kinds()) or "none"
        raise NotFound(f"no connector of kind {kind!r} is installed (known: {known})")
    cls = matches[0].load()
    if not (isinstance(cls, type) and issubclass(cls, Connector)):
        raise ConfigError(f"entry point {kind!r} does not name a Connector class")
    _LOADED[kind] = cls
    return cls


def create_connector(kind: str, config: Mapping[str, Any]) -> Connector:
    return load_connector_class(kind).from_dict(config)
