"""Endpoints, cases and sources: what a navigator sets up before pulling.

Every function takes the :class:`~aggregator.app.App` and plain values, validates them, and
returns plain dicts that the CLI prints (as text or ``--json``) and the API returns. Endpoint
configurations are validated by the connector's own typed config, so a bad option is refused
when the endpoint is added, not when the first pull fails.
"""

from __future__ import annotations

import re
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import func, select

from aggregator.app import App
from aggregator.errors import AlreadyExists, ConfigError, NotFound, UsageError
from aggregator.model import CaseInfo, SourceInfo
from aggregator.store.models import Case, Endpoint, LedgerItem, Pull, Source
from connectors.base import load_connector_class
from connectors.dicom_identifier import matching_key_problem

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
DATE_RE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
#: where the API writes uploaded media, inside the case folder
UPLOADS = "uploads"


def _check_name(what: str, name: str) -> str:
    # Case ids become folder names: refuse anything that could be a path.
    if not NAME_RE.match(name or ""):
        raise UsageError(
            f"invalid {what} name {name!r}: use letters, digits, '.', '_' or '-' (up to 100), starting "
            "with a letter or digit"
        )
    return name


def _check_date(what: str, value: str | None) -> str | None:
    if value is None:
        return None
    if not DATE_RE.match(value):
        raise UsageError(f"invalid {what}: expected YYYY-MM-DD")
    try:
        date.fromisoformat(value)
    except ValueError:
        raise UsageError(f"invalid {what}: not a calendar date")
    return value


# --- endpoints ------------------------------------------------------------------------------


def endpoint_to_dict(ep: Endpoint) -> dict[str, Any]:
    return {"name": ep.name, "kind": ep.kind, "config": dict(ep.config)}


def add_endpoint(app: App, name: str, kind: str, options: dict[str, Any]) -> dict[str, Any]:
    _check_name("endpoint", name)
    cls = load_connector_class(kind)
    config = cls.config_type.from_dict({k: v for k, v in options.items() if v is not None})
    with app.db.session() as s:
        if s.scalar(select(Endpoint).where(Endpoint.name == name)) is not None:
            raise AlreadyExists(f"endpoint {name!r} already exists")
        ep = Endpoint(name=name, kind=kind, config=config.to_dict())
        s.add(ep)
        s.flush()
        return endpoint_to_dict(ep)


def get_endpoint(app: App, name: str) -> Endpoint:
    with app.db.session() as s:
        ep = s.scalar(select(Endpoint).where(Endpoint.name == name))
        if ep is None:
            raise NotFound(f"no endpoint named {name!r}")
        return ep


def list_endpoints(app: App) -> list[dict[str, Any]]:
    with app.db.session() as s:
        return [endpoint_to_dict(ep) for ep in s.scalars(select(Endpoint).order_by(Endpoint.name))]


def check_endpoint(app: App, name: str) -> dict[str, Any]:
    ep = get_endpoint(app, name)
    connector = load_connector_class(ep.kind).from_dict(ep.config)
    try:
        result = connector.check()
    finally:
        connector.close()
    return {"name": ep.name, "kind": ep.kind, "ok": result.ok, "details": result.details}


# --- cases ----------------------------------------------------------------------------------


def create_case(
    app: App,
    case_id: str,
    checklist: str,
    *,
    patient_name: str | None = None,
    birth_date: str | None = None,
    case_date: str | None = None,
    question: str | None = None,
) -> dict[str, Any]:
    from aggregator.checklist import load_checklist

    _check_name("case", case_id)
    question = _check_question(question)
    _check_date("birth date", birth_date)
    _check_date("case date", case_date)
    load_checklist(checklist)  # refuse unknown checklists now, not at check time
    if checklist.endswith((".yaml", ".yml")):
        checklist = str(Path(checklist).resolve())
    with app.db.session() as s:
        if s.get(Case, case_id) is not None:
            raise AlreadyExists(f"case {case_id!r} already exists")
        case = Case(
            id=case_id,
            checklist=checklist,
            patient_name=patient_name,
            birth_date=birth_date,
            case_date=case_date or datetime.now(UTC).date().isoformat(),
            question=question,
        )
        s.add(case)
    app.case_dir(case_id).mkdir(parents=True, exist_ok=True)
    return case_summary(app, case_id)


def get_case(app: App, case_id: str) -> Case:
    with app.db.session() as s:
        case = s.get(Case, case_id)
        if case is None:
            raise NotFound(f"no case named {case_id!r}")
        return case


def case_info(app: App, case_id: str) -> CaseInfo:
    c = get_case(app, case_id)
    return CaseInfo(c.id, c.checklist, c.patient_name, c.birth_date, c.case_date, c.question)


MAX_QUESTION_CHARS = 4000


def _check_question(question: str | None) -> str | None:
    """The question as stored: stripped, None when empty; refused when too long or holding control
    characters other than line breaks and tabs (it is shown to a physician as written)."""
    if question is None:
        return None
    text = question.replace("\r\n", "\n").strip()
    if not text:
        return None
    if len(text) > MAX_QUESTION_CHARS:
        raise UsageError(f"the case question is too long (at most {MAX_QUESTION_CHARS} characters)")
    if any((ord(ch) < 32 and ch not in "\n\t") or ord(ch) == 127 for ch in text):
        raise UsageError("the case question holds control characters")
    return text


def set_case_question(app: App, case_id: str, question: str | None) -> dict[str, Any]:
    """Set (or, with an empty text, clear) what the consultant is asked; the next package shows it."""
    text = _check_question(question)
    with app.db.session() as s:
        case = s.get(Case, case_id)
        if case is None:
            raise NotFound(f"no case named {case_id!r}")
        case.question = text
    return case_summary(app, case_id)


def list_cases(app: App) -> list[dict[str, Any]]:
    with app.db.session() as s:
        rows = s.execute(
            select(Case.id, Case.checklist, Case.status, Case.case_date, func.count(Source.id))
            .outerjoin(Source, Source.case_id == Case.id)
            .group_by(Case.id)
            .order_by(Case.id)
        )
        return [
            {"case": cid, "checklist": cl, "status": st, "case_date": cd, "sources": int(n)}
            for cid, cl, st, cd, n in rows
        ]


CASE_STATES = ("open", "closed")


def set_case_status(app: App, case_id: str, status: str) -> dict[str, Any]:
    """Close a case (its scheduled syncs stop; everything else stays readable) or reopen it."""
    if status not in CASE_STATES:
        raise UsageError(f"a case is {' or '.join(CASE_STATES)}")
    with app.db.session() as s:
        case = s.get(Case, case_id)
        if case is None:
            raise NotFound(f"no case named {case_id!r}")
        previous = case.status
        case.status = status
    return {"case": case_id, "status": status, "previous": previous}


def case_summary(app: App, case_id: str) -> dict[str, Any]:
    """What a navigator wants to see: the case, its sources, and how their pulls went."""
    c = get_case(app, case_id)
    with app.db.session() as s:
        sources = []
        for src in s.scalars(select(Source).where(Source.case_id == case_id).order_by(Source.id)):
            counts: dict[str, int] = {}
            quarantined = 0
            notes = 0
            for kind, state, n in s.execute(
                select(LedgerItem.kind, LedgerItem.state, func.count())
                .where(LedgerItem.source_id == src.id)
                .group_by(LedgerItem.kind, LedgerItem.state)
            ):
                if kind == "quarantine":  # written by normalization, not by the pull
                    quarantined += int(n)
                elif kind == "note":  # normalization's warnings on kept items (no pixel data...)
                    notes += int(n)
                else:
                    counts[state] = counts.get(state, 0) + int(n)
            last = s.scalar(select(Pull).where(Pull.source_id == src.id).order_by(Pull.id.desc()).limit(1))
            sources.append(
                {
                    "id": src.id,
                    "kind": src.kind,
                    "label": src.label,
                    "endpoint": src.endpoint.name if src.endpoint else None,
                    "items": counts,
                    "quarantined": quarantined,
                    "notes": notes,
                    "last_pull": None
                    if last is None
                    else {
                        "id": last.id,
                        "state": last.state,
                        "method": last.method,
                        "started_at": last.started_at.isoformat(),
                        "finished_at": last.finished_at.isoformat() if last.finished_at else None,
                        "error": last.error,
                    },
                }
            )
    return {
        "case": c.id,
        "checklist": c.checklist,
        "status": c.status,
        "case_date": c.case_date,
        "question": c.question,
        "patient": {"name_given": c.patient_name is not None, "birth_date_given": c.birth_date is not None},
        "folder": str(app.case_dir(c.id)),
        "sources": sources,
    }


# --- sources --------------------------------------------------------------------------------


def add_source(
    app: App,
    case_id: str,
    *,
    endpoint: str | None = None,
    patient_id: str | None = None,
    patient_identifier: str | None = None,
    issuer: str | None = None,
    media: str | None = None,
) -> dict[str, Any]:
    get_case(app, case_id)
    if bool(endpoint) == bool(media):
        raise UsageError("give exactly one of --endpoint or --media")
    with app.db.session() as s:
        if media:
            path = Path(media).expanduser()
            if not path.exists():
                raise UsageError("media path does not exist", item=str(media))
            if not (path.is_dir() or path.is_file()):
                raise UsageError("media path is neither a folder nor a file", item=str(media))
            src = Source(case_id=case_id, kind="media", config={"path": str(path.resolve())},
                         label=path.resolve().name or "media")
        else:
            ep = s.scalar(select(Endpoint).where(Endpoint.name == endpoint))
            if ep is None:
                raise NotFound(f"no endpoint named {endpoint!r}")
            if ep.kind in ("fhir", "fhir-bulk", "dimse", "dicomweb") and not (patient_id or patient_identifier):
                # name + birth date lookup uses the case's demographics
                case = s.get(Case, case_id)
                if case is None or not (case.patient_name and case.birth_date):
                    raise UsageError(
                        "give --patient-id or --patient-identifier, or set the case's patient name and "
                        "birth date for a demographic lookup"
                    )
            if patient_identifier and "|" not in patient_identifier:
                raise UsageError("--patient-identifier must be SYSTEM|VALUE")
            if ep.kind in DICOM_QUERY_KINDS:
                _check_matching_keys(patient_id, issuer)
            src = Source(
                case_id=case_id,
                endpoint_id=ep.id,
                kind=ep.kind,
                patient_id=patient_id,
                config={k: v for k, v in {"patient_identifier": patient_identifier, "issuer": issuer}.items() if v},
                label=ep.name,
            )
        s.add(src)
        s.flush()
        return {"id": src.id, "case": case_id, "kind": src.kind, "label": src.label}


#: endpoint kinds whose --patient-id / --issuer become C-FIND or QIDO-RS matching keys
DICOM_QUERY_KINDS = frozenset({"dimse", "dicomweb"})


def _check_matching_keys(patient_id: str | None, issuer: str | None) -> None:
    """Refuse a PatientID or issuer that an archive would read as a pattern, a list or
    nothing at all (it would silently match no study, or another patient's); the message names
    the rule that failed, never the value."""
    for option, value in (("--patient-id", patient_id), ("--issuer", issuer)):
        problem = None if value is None else matching_key_problem(value)
        if problem:
            raise UsageError(f"{option} cannot be a DICOM query key: it {problem}")


def list_sources(app: App, case_id: str) -> list[dict[str, Any]]:
    return case_summary(app, case_id)["sources"]


def source_infos(app: App, case_id: str) -> list[SourceInfo]:
    """PHI-free descriptions of a case's sources, with how and when each was last pulled."""
    out = []
    with app.db.session() as s:
        for src in s.scalars(select(Source).where(Source.case_id == case_id).order_by(Source.id)):
            last_ok = s.scalar(
                select(Pull)
                .where(Pull.source_id == src.id, Pull.state.in_(("done", "partial")))
                .order_by(Pull.id.desc())
                .limit(1)
            )
            ep = src.endpoint
            out.append(
                SourceInfo(
                    id=src.id,
                    kind=src.kind,
                    label=src.label,
                    endpoint_name=ep.name if ep else None,
                    base_url=(ep.config.get("url") if ep else None),
                    method=last_ok.method if last_ok else "",
                    pulled_at=last_ok.started_at.replace(tzinfo=UTC).isoformat() if last_ok else None,
                    organization=(ep.config.get("organization") if ep else None),
                    patient_id=src.patient_id,
                )
            )
    return out


def connector_config(app: App, source_id: int) -> tuple[str, dict[str, Any], Source]:
    """The connector kind and config for a source: the endpoint's config plus the source's own."""
    with app.db.session() as s:
        src = s.get(Source, source_id)
        if src is None:
            raise NotFound(f"no source with id {source_id}")
        if src.kind == "media":
            # Archives are unpacked inside the case folder: nothing of a case is written elsewhere.
            tmp = app.case_dir(src.case_id) / "tmp"
            return "media", {"path": src.config["path"], "tmp_dir": str(tmp)}, src
        if src.endpoint is None:
            raise ConfigError("source has no endpoint", item=f"source {source_id}")
        return src.kind, dict(src.endpoint.config), src


def delete_case(app: App, case_id: str) -> None:
    """Remove a case, its sources, pulls and ledger, and its folder (raw records included)."""
    import shutil

    from sqlalchemy import delete

    from aggregator.store.models import Cursor

    get_case(app, case_id)
    with app.db.session() as s:
        source_ids = list(s.scalars(select(Source.id).where(Source.case_id == case_id)))
        if source_ids:
            for table in (LedgerItem, Cursor, Pull):
                s.execute(delete(table).where(table.source_id.in_(source_ids)))
            s.execute(delete(Source).where(Source.id.in_(source_ids)))
        s.execute(delete(Case).where(Case.id == case_id))
    folder = app.case_dir(case_id)
    if folder.is_dir() and folder.resolve().parent == app.settings.cases_dir.resolve():
        shutil.rmtree(folder)


def remove_source(app: App, case_id: str, source_id: int) -> dict[str, Any]:
    """Remove one source of a case, with its pulls, ledger and cursors; an upload of it too.

    Raw blobs stay in the case's store (they are content-addressed and may be shared with
    another source); without ledger rows nothing reads them, and deleting the case removes them.
    """
    from sqlalchemy import delete

    from aggregator.store.models import Cursor

    get_case(app, case_id)
    with app.db.session() as s:
        src = s.get(Source, source_id)
        if src is None or src.case_id != case_id:
            raise NotFound(f"case {case_id!r} has no source with id {source_id}")
        upload = Path(src.config["path"]) if src.kind == "media" and src.config.get("path") else None
        for table in (LedgerItem, Cursor, Pull):
            s.execute(delete(table).where(table.source_id == source_id))
        s.execute(delete(Source).where(Source.id == source_id))
    uploads = (app.case_dir(case_id) / UPLOADS).resolve()
    if upload is not None and upload.resolve().parent == uploads:  # only what the API received
        upload.unlink(missing_ok=True)
    return {"case": case_id, "source": source_id, "removed": True}
