"""One exception tree for the whole service.

Every error we raise derives from :class:`AggregatorError`. The tree is split by *phase*
(config, store, connector, normalize, checklist, package) so a caller can tell where a job
failed, and by *retriability* as a separate axis (:class:`Retriable` / :class:`Fatal` mixins)
so the job runner can decide whether to try again without knowing which phase raised.

Messages must never carry protected health information: name resource ids, SOP Instance
UIDs, file names inside the case folder, HTTP statuses; never names, birth dates, identifier
values or resource bodies.
"""

from __future__ import annotations


class AggregatorError(Exception):
    """Root of every error this project raises on purpose."""

    exit_code: int = 1

    def __init__(self, message: str, *, item: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        #: the item (file, resource key, SOP UID, endpoint) the error is about, when there is one
        self.item = item

    def __str__(self) -> str:
        return f"{self.item}: {self.message}" if self.item else self.message


class Retriable:
    """Mixin: trying the same operation again later may succeed (timeouts, 429, 503)."""


class Fatal:
    """Mixin: repeating the operation will give the same answer (403, invalid data)."""


# --- usage and configuration -------------------------------------------------------------


class UsageError(AggregatorError, Fatal):
    """The user asked for something that cannot be done as asked (bad option, bad path)."""

    exit_code = 2


class ConfigError(AggregatorError, Fatal):
    """Settings, endpoint definitions or secrets are missing or wrong."""

    exit_code = 2


class NotFound(AggregatorError, Fatal):
    """A named case, source, endpoint or checklist does not exist."""

    exit_code = 3


class AlreadyExists(AggregatorError, Fatal):
    exit_code = 2


class AuthenticationRequired(AggregatorError, Fatal):
    """No credentials, or credentials that are unknown, wrong, revoked or expired (HTTP 401)."""

    exit_code = 2


class PermissionDenied(AggregatorError, Fatal):
    """The caller's role may not do this, on any resource (HTTP 403)."""

    exit_code = 2


class RequestTooLarge(AggregatorError, Fatal):
    """A request body (an upload) is over the size limit (HTTP 413)."""

    exit_code = 2


class RateLimited(AggregatorError, Retriable):
    """Too many requests from one API token or address (HTTP 429); ``retry_after`` in seconds."""

    def __init__(self, retry_after: float) -> None:
        super().__init__("too many requests; slow down")
        self.retry_after = retry_after


class NotImplementedYet(AggregatorError, Fatal):
    """A documented capability that this version does not provide yet; says so plainly."""


# --- storage ------------------------------------------------------------------------------


class StoreError(AggregatorError):
    """Database or blob-store failure."""


class DatabaseUnavailable(StoreError, Retriable):
    """The database connection was lost (a restart, a failover, a dropped backend): try again later."""


class UnsafePath(AggregatorError, Fatal):
    """A path would escape the folder it must stay in (zip slip, hostile file name)."""


# --- connectors ---------------------------------------------------------------------------


class ConnectorError(AggregatorError):
    """Raised by connectors; protocol exceptions are translated into these at the boundary."""

    def __init__(
        self,
        message: str,
        *,
        item: str | None = None,
        status: int | str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message, item=item)
        #: protocol status: an HTTP status code, a DIMSE status such as "0xA702", ...
        self.status = status
        #: seconds the peer asked us to wait before trying again
        self.retry_after = retry_after


class TransientConnectorError(ConnectorError, Retriable):
    """Timeouts, resets, 429, 502-504: worth another attempt."""


class AuthError(ConnectorError, Fatal):
    """Authentication failed (401 after one refresh, bad credentials, bad key)."""


class AccessDenied(ConnectorError, Fatal):
    """The peer refused access to an item (HTTP 403, DIMSE refused)."""


class RemoteNotFound(ConnectorError, Fatal):
    """The peer says the item does not exist (HTTP 404/410)."""


class ProtocolError(ConnectorError, Fatal):
    """The peer answered something the protocol does not allow (bad paging, bad multipart)."""


class UnsupportedInput(ConnectorError, Fatal):
    """A file or item that no connector can read; becomes a 'skipped' ledger row."""


class InputTooLarge(ConnectorError, Fatal):
    """An archive or file exceeds the safety limits (zip bombs, runaway sizes)."""


# --- later phases -------------------------------------------------------------------------


class NormalizeError(AggregatorError, Fatal):
    """A raw item cannot be turned into a valid FHIR resource."""


class ChecklistError(AggregatorError, Fatal):
    """A checklist is invalid or unknown."""


class PackageError(AggregatorError, Fatal):
    """Writing or verifying a package failed."""


class VerificationFailed(PackageError):
    """A package does not match its manifest; ``problems`` lists each file concerned."""

    def __init__(self, message: str, problems: list[tuple[str, str]]) -> None:
        super().__init__(message)
        self.problems = problems


def is_retriable(exc: BaseException) -> bool:
    """True when the error says that trying again may help."""
    return isinstance(exc, Retriable)
