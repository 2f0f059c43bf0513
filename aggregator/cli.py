"""The ``aggregator`` command.

Every command prints human-readable text by default and one JSON document with ``--json``
(the names in that JSON are a contract for users' scripts). Errors are one line on stderr
(or a JSON ``{"error": ...}`` with ``--json``) and a non-zero exit: 2 for bad usage, 3 for an
unknown case/endpoint/source, 1 otherwise. Secrets are never options: options name the
environment variable or file that holds them.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from aggregator import __version__
from aggregator.errors import AggregatorError, NotFound, UsageError

F = TypeVar("F", bound=Callable[..., Any])
log = logging.getLogger("aggregator")


class State:
    """Per-invocation state: the home directory and a lazily opened App."""

    def __init__(self, home: str | None) -> None:
        self.home = home
        self._app: Any = None

    @property
    def app(self) -> Any:
        if self._app is None:
            from aggregator.app import App

            self._app = App.open(self.home)
            for warning in self._app.warnings:
                click.echo(warning, err=True)
        return self._app

    def reader(self) -> Any:
        """The home on the quick path (``store.lite``: no SQLAlchemy) when it can be, else :attr:`app`."""
        if self._app is None:
            from aggregator.app import LiteApp

            lite = LiteApp.open(self.home)
            if lite is None:
                return self.app
            self._app = lite
            for warning in lite.warnings:
                click.echo(warning, err=True)
        return self._app


def _emit(as_json: bool, data: Any, text: str | Callable[[], str]) -> None:
    if as_json:
        click.echo(json.dumps(data, indent=2, sort_keys=True, default=str))
    else:
        click.echo(text() if callable(text) else text)


def json_option(f: F) -> F:
    return click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")(f)


def with_app(f: F) -> F:
    @functools.wraps(f)
    @click.pass_obj
    def wrapper(state: State, *args: Any, **kwargs: Any) -> Any:
        return f(state.app, *args, **kwargs)

    return wrapper  # type: ignore[return-value]


def with_reader(f: F) -> F:
    """Like :func:`with_app`, for a command that runs on either path: it gets what ``State.reader`` gives."""

    @functools.wraps(f)
    @click.pass_obj
    def wrapper(state: State, *args: Any, **kwargs: Any) -> Any:
        return f(state.reader(), *args, **kwargs)

    return wrapper  # type: ignore[return-value]


def audited(action: str, what: str, *, access_change: bool = False) -> Callable[[F], F]:
    """Record the command in the audit trail, attributed to the operating-system user.

    Reads of patient data, pulls, packages and changes of access through the CLI are audited
    like the API's; a failure is recorded with the error's type only (its text may name data).
    Goes between ``with_app`` and the command function.
    """

    def deco(f: F) -> F:
        @functools.wraps(f)
        def wrapper(app: Any, *args: Any, **kwargs: Any) -> Any:
            from aggregator import audit

            case_id = kwargs.get("case_id")
            actor = audit.os_actor()
            try:
                rv = f(app, *args, **kwargs)
            except SystemExit as exc:
                ok = exc.code in (0, None)
                audit.record(app.db, actor, action, what, case_id=case_id,
                             outcome=audit.SUCCESS if ok else audit.MINOR_FAILURE,
                             detail="" if ok else f"exit status {exc.code}", access_change=access_change)
                raise
            except Exception as exc:
                audit.record(app.db, actor, action, what, case_id=case_id,
                             outcome=audit.MINOR_FAILURE if isinstance(exc, AggregatorError) else audit.SERIOUS_FAILURE,
                             detail=type(exc).__name__, access_change=access_change)
                raise
            audit.record(app.db, actor, action, what, case_id=case_id, access_change=access_change)
            return rv

        return wrapper  # type: ignore[return-value]

    return deco


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--home", type=click.Path(file_okay=False), default=None,
              help="Home directory (default: $AGGREGATOR_HOME or ~/.aggregator).")
@click.version_option(__version__, prog_name="aggregator")
@click.pass_context
def cli(ctx: click.Context, home: str | None) -> None:
    """Gather a patient's records for a second opinion: pull, normalize, check, package."""
    ctx.obj = State(home)


# --- endpoints ------------------------------------------------------------------------------

@cli.group()
def endpoint() -> None:
    """FHIR servers and imaging archives that records are pulled from."""


class _EndpointAdd(click.Command):
    """``endpoint add``, whose connector options come from the installed kinds' config types.

    They are built on first use (parsing or ``--help`` of this command only): building them
    imports every connector, which no other command should pay for at start-up.
    """

    RESERVED = frozenset({"kind", "option", "json", "help", "name"})

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._derived = False

    def get_params(self, ctx: click.Context) -> list[click.Parameter]:
        if not self._derived:
            self._derived = True
            from aggregator.connector_options import cli_options, endpoint_kinds

            for opt in cli_options(endpoint_kinds()):
                if opt.dest in self.RESERVED:
                    continue  # settable with --option KEY=VALUE
                type_: Any = click.Choice(opt.choices) if opt.choices else (
                    click.BOOL if opt.py_type is bool else opt.py_type)
                self.params.append(click.Option([opt.flag, opt.dest], type=type_, help=opt.help))
        return super().get_params(ctx)


@endpoint.command("add", cls=_EndpointAdd)
@click.argument("name")
@click.option("--kind", required=True, help="Connector kind: fhir, fhir-bulk, dimse, dicomweb, or an installed one.")
@click.option("--option", "extra", multiple=True, metavar="KEY=VALUE",
              help="Any connector option, also those without a flag of their own.")
@json_option
@with_app
def endpoint_add(app: Any, name: str, kind: str, extra: tuple[str, ...], as_json: bool, **options: Any) -> None:
    """Define an endpoint NAME of the given kind.

    The connector options below are those of the installed connector kinds (each says which
    kinds it applies to); an option of another kind is refused.
    """
    from aggregator.cases import add_endpoint
    from aggregator.connector_options import NOT_ENDPOINTS, config_from_options, endpoint_kinds

    kinds = endpoint_kinds()
    if kind in NOT_ENDPOINTS:
        raise UsageError(f"{kind} sources are added with `source add CASE --{kind} PATH`, not as endpoints")
    if kind not in kinds:
        raise NotFound(f"no connector of kind {kind!r} is installed (known: {', '.join(sorted(kinds))})")
    config = config_from_options(kind, kinds[kind], options)
    for item in extra:
        if "=" not in item:
            raise UsageError(f"--option expects KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        key = k.strip().replace("-", "_")
        spec = next((f for f in kinds[kind] if f.name == key), None)
        config[key] = config_from_options(kind, [spec], {key: v})[key] if spec else v
    data = add_endpoint(app, name, kind, config)
    _emit(as_json, data, f"endpoint {name} added ({kind})")


@endpoint.command("list")
@json_option
@with_app
def endpoint_list(app: Any, as_json: bool) -> None:
    """List endpoints."""
    from aggregator.cases import list_endpoints

    eps = list_endpoints(app)
    _emit(as_json, eps, lambda: "\n".join(
        f"{e['name']:<20} {e['kind']:<10} {e['config'].get('url') or e['config'].get('host') or ''}" for e in eps
    ) or "no endpoints")


@endpoint.command("check")
@click.argument("name")
@json_option
@with_app
def endpoint_check(app: Any, name: str, as_json: bool) -> None:
    """Test connectivity and authentication; report what the endpoint supports."""
    from aggregator.cases import check_endpoint

    result = check_endpoint(app, name)

    def text() -> str:
        lines = [f"endpoint {name}: {'OK' if result['ok'] else 'NOT OK'}"]
        lines += [f"  {k}: {v}" for k, v in sorted(result["details"].items())]
        return "\n".join(lines)

    _emit(as_json, result, text)
    if not result["ok"]:
        sys.exit(1)


# --- cases ----------------------------------------------------------------------------------


@cli.group()
def case() -> None:
    """Second-opinion cases."""


@case.command("create")
@click.argument("case_id", metavar="CASE")
@click.option("--checklist", required=True, help="Checklist name (see `aggregator checklist list`) or YAML path.")
@click.option("--patient-name", help="The patient's name, for identity matching.")
@click.option("--birth-date", help="YYYY-MM-DD, for identity matching.")
@click.option("--case-date", help="YYYY-MM-DD reference date for freshness windows (default: today).")
@click.option("--question", help="The case question for the consultant (free text; first on the summary page).")
@json_option
@with_app
@audited("C", "case")
def case_create(app: Any, case_id: str, checklist: str, patient_name: str | None, birth_date: str | None,
                case_date: str | None, question: str | None, as_json: bool) -> None:
    """Open a case CASE."""
    from aggregator.cases import create_case

    data = create_case(app, case_id, checklist, patient_name=patient_name, birth_date=birth_date,
                       case_date=case_date, question=question)
    _emit(as_json, data, f"case {case_id} created (checklist {checklist})")


@case.command("set")
@click.argument("case_id", metavar="CASE")
@click.option("--question", required=True,
              help="The case question for the consultant (free text; an empty text clears it).")
@json_option
@with_app
@audited("U", "case")
def case_set(app: Any, case_id: str, question: str, as_json: bool) -> None:
    """Change CASE's settings: the case question shown first on the summary page."""
    from aggregator.cases import set_case_question

    data = set_case_question(app, case_id, question)
    _emit(as_json, data, f"case {case_id}: question {'set' if data['question'] else 'cleared'}")


@case.command("list")
@json_option
@with_reader
@audited("R", "case-list")
def case_list(app: Any, as_json: bool) -> None:
    """List cases."""
    from aggregator.store import lite

    if isinstance(app.db, lite.LiteDatabase):
        rows = lite.list_cases(app.db)
    else:
        from aggregator.cases import list_cases

        rows = list_cases(app)
    _emit(as_json, rows, lambda: "\n".join(
        f"{r['case']:<24} {r['status']:<8} {r['checklist']:<12} sources: {r['sources']}" for r in rows
    ) or "no cases")


@case.command("show")
@click.argument("case_id", metavar="CASE")
@json_option
@with_app
@audited("R", "case")
def case_show(app: Any, case_id: str, as_json: bool) -> None:
    """Show a case, its sources and their last pulls."""
    from aggregator.cases import case_summary
    from aggregator.jobs.pull import reap_dead_pulls, reap_stale_pulls

    reap_dead_pulls(app)
    reap_stale_pulls(app)
    data = case_summary(app, case_id)

    def text() -> str:
        lines = [f"case {data['case']}  checklist: {data['checklist']}  status: {data['status']}  "
                 f"case date: {data['case_date']}", f"folder: {data['folder']}"]
        if data.get("question"):
            lines.append(f"question: {data['question']}")
        if not data["sources"]:
            lines.append("no sources yet: add one with `aggregator source add`")
        for src in data["sources"]:
            items = ", ".join(f"{k} {v}" for k, v in sorted(src["items"].items())) or "nothing pulled yet"
            lp = src["last_pull"]
            last = f"last pull {lp['state']} ({lp['method'] or '-'})" if lp else "never pulled"
            lines.append(f"  [{src['id']}] {src['kind']:<9} {src['label']:<24} {last}; {items}")
            if lp and lp.get("error"):
                lines.append(f"      error: {lp['error']}")
        return "\n".join(lines)

    _emit(as_json, data, text)


@case.command("delete")
@click.argument("case_id", metavar="CASE")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@json_option
@with_app
@audited("D", "case")
def case_delete(app: Any, case_id: str, yes: bool, as_json: bool) -> None:
    """Delete a case, its ledger and its raw records."""
    from aggregator.cases import delete_case

    if not yes and not click.confirm(f"Delete case {case_id} and all its records?", default=False):
        raise click.Abort()
    delete_case(app, case_id)
    _emit(as_json, {"case": case_id, "deleted": True}, f"case {case_id} deleted")


@case.command("close")
@click.argument("case_id", metavar="CASE")
@json_option
@with_app
@audited("U", "case")
def case_close(app: Any, case_id: str, as_json: bool) -> None:
    """Close CASE: its scheduled syncs stop; its records, reports and packages stay."""
    from aggregator.cases import set_case_status

    data = set_case_status(app, case_id, "closed")
    _emit(as_json, data, f"case {case_id} closed: scheduled syncs stop (`aggregator case reopen` to resume)")


@case.command("reopen")
@click.argument("case_id", metavar="CASE")
@json_option
@with_app
@audited("U", "case")
def case_reopen(app: Any, case_id: str, as_json: bool) -> None:
    """Reopen a closed CASE: its schedule, if it has one, runs again."""
    from aggregator.cases import set_case_status

    data = set_case_status(app, case_id, "open")
    _emit(as_json, data, f"case {case_id} reopened")


@case.command("assign")
@click.argument("case_id", metavar="CASE")
@click.argument("user_name", metavar="USER")
@json_option
@with_app
@audited("U", "assignment", access_change=True)
def case_assign(app: Any, case_id: str, user_name: str, as_json: bool) -> None:
    """Let USER (a consultant) see CASE: its gap report, summary and package."""
    from aggregator.accounts import assign_case

    data = assign_case(app.db, case_id, user_name)
    _emit(as_json, data, f"case {case_id} assigned to {data['user']} ({data['role']})")


# --- users and tokens -----------------------------------------------------------------------


@cli.group()
def user() -> None:
    """People who use the HTTP API: admin, navigator or consultant."""


def _read_password(password_file: str | None) -> str:
    if password_file is not None:
        try:
            return Path(password_file).read_text(encoding="utf-8").rstrip("\r\n")
        except OSError:
            raise UsageError("cannot read the password file", item=password_file) from None
    if not sys.stdin.isatty():
        raise UsageError("no terminal to ask for the password on: give --password-file")
    return str(click.prompt("Password", hide_input=True, confirmation_prompt=True))


@user.command("add")
@click.argument("name")
@click.option("--role", required=True, type=click.Choice(["admin", "navigator", "consultant"]))
@click.option("--password-file", type=click.Path(dir_okay=False),
              help="File holding the password (asked for on the terminal when absent).")
@json_option
@with_app
@audited("C", "user", access_change=True)
def user_add(app: Any, name: str, role: str, password_file: str | None, as_json: bool) -> None:
    """Add a user NAME with a role."""
    from aggregator.accounts import add_user

    data = add_user(app.db, name, role, _read_password(password_file))
    _emit(as_json, data, f"user {name} added ({role})")


@user.command("list")
@json_option
@with_app
def user_list(app: Any, as_json: bool) -> None:
    """List users."""
    from aggregator.accounts import list_users

    rows = list_users(app.db)
    _emit(as_json, rows, lambda: "\n".join(f"{r['name']:<24} {r['role']:<11} {'active' if r['active'] else 'inactive'}"
                                           for r in rows) or "no users")


@cli.group()
def token() -> None:
    """API tokens: shown once when created, stored only as a hash."""


@token.command("create")
@click.argument("user_name", metavar="USER")
@click.option("--expires", default="90d", show_default=True, metavar="DURATION",
              help="Lifetime: 90m, 12h, 30d, 2w, or 'never'.")
@json_option
@with_app
@audited("C", "token", access_change=True)
def token_create(app: Any, user_name: str, expires: str, as_json: bool) -> None:
    """Create an API token for USER and print it (the only time it is shown)."""
    from aggregator.accounts import create_token, parse_duration

    data = create_token(app.db, user_name, parse_duration(expires))
    _emit(as_json, data, lambda: "\n".join([
        f"token {data['id']} for {data['user']} ({data['role']}), expires {data['expires_at'] or 'never'}",
        data["token"],
        "keep it safe: it is not shown again (send it as 'Authorization: Bearer TOKEN')"]))


@token.command("revoke")
@click.argument("token_id", metavar="TOKEN_ID")
@json_option
@with_app
@audited("U", "token", access_change=True)
def token_revoke(app: Any, token_id: str, as_json: bool) -> None:
    """Revoke the API token TOKEN_ID at once."""
    from aggregator.accounts import revoke_token

    data = revoke_token(app.db, token_id)
    _emit(as_json, data, f"token {token_id} revoked")


# --- sources --------------------------------------------------------------------------------


@cli.group()
def source() -> None:
    """Where a case's records come from."""


@source.command("add")
@click.argument("case_id", metavar="CASE")
@click.option("--endpoint", help="An endpoint defined with `endpoint add`.")
@click.option("--patient-id", help="The patient's id at that endpoint (FHIR Patient id, DICOM PatientID).")
@click.option("--patient-identifier", help="FHIR identifier SYSTEM|VALUE to look the patient up by.")
@click.option("--issuer", help="DICOM IssuerOfPatientID.")
@click.option("--media", type=click.Path(), help="A folder or zip the patient downloaded, or a DICOM disc.")
@json_option
@with_app
@audited("U", "source")
def source_add(app: Any, case_id: str, endpoint: str | None, patient_id: str | None,
               patient_identifier: str | None, issuer: str | None, media: str | None, as_json: bool) -> None:
    """Add a source to CASE."""
    from aggregator.cases import add_source

    data = add_source(app, case_id, endpoint=endpoint, patient_id=patient_id,
                      patient_identifier=patient_identifier, issuer=issuer, media=media)
    _emit(as_json, data, f"source {data['id']} added to case {case_id} ({data['kind']}: {data['label']})")


@source.command("list")
@click.argument("case_id", metavar="CASE")
@json_option
@with_app
@audited("R", "source-list")
def source_list(app: Any, case_id: str, as_json: bool) -> None:
    """List a case's sources."""
    from aggregator.cases import list_sources

    rows = list_sources(app, case_id)
    _emit(as_json, rows, lambda: "\n".join(f"[{r['id']}] {r['kind']:<9} {r['label']}" for r in rows)
          or "no sources")


# --- pull, check, package, verify -----------------------------------------------------------


def _pull_text(summaries: list[Any]) -> str:
    lines = []
    for s in summaries:
        items = ", ".join(f"{k} {v}" for k, v in sorted(s.counts.items()) if v) or "no items"
        lines.append(f"[{s.source_id}] {s.label}: {s.state} ({s.method or '-'}); {items}")
        if s.error:
            lines.append(f"    error: {s.error}")
        for row in s.skipped[:_SKIPPED_SHOWN]:
            lines.append(f"    skipped {row['key'].removeprefix('file:')}: {row['reason']}")
        if len(s.skipped) > _SKIPPED_SHOWN:
            lines.append(f"    ... and {len(s.skipped) - _SKIPPED_SHOWN} more skipped (all in --json and `check`)")
    return "\n".join(lines) or "no sources to pull"


_SKIPPED_SHOWN = 50


@cli.command()
@click.argument("case_id", metavar="CASE")
@click.option("--source", "source_ids", type=int, multiple=True, help="Only this source id (repeatable).")
@click.option("--wait", "wait", is_flag=True,
              help="If another process is pulling this case, wait for it instead of exiting (exit code 5).")
@json_option
@with_app
@audited("E", "pull")
def pull(app: Any, case_id: str, source_ids: tuple[int, ...], wait: bool, as_json: bool) -> None:
    """Fetch everything for CASE from its sources (in parallel, resumable)."""
    from aggregator.jobs.pull import pull_case
    from aggregator.progress import ProgressBoard

    board = ProgressBoard(enabled=None if not as_json else False)
    try:
        summaries = pull_case(app, case_id, source_ids=source_ids or None, progress_for=board.source,
                              wait=None if wait else 0.0)
    finally:
        board.close()
    received = None
    if any(s.state != "failed" for s in summaries):
        from aggregator.records_requests.store import track_after_pull

        received = track_after_pull(app, case_id)  # what arrived fills the lines of records requests
    note = f"\nrecords requests: {received} line(s) received" if received else ""
    _emit(as_json, [s.to_dict() for s in summaries], lambda: _pull_text(summaries) + note)
    if any(s.state == "failed" for s in summaries):
        sys.exit(1)


@cli.command()
@click.argument("case_id", metavar="CASE")
@click.option("--strict", is_flag=True, help="Exit non-zero when gaps remain.")
@json_option
@with_app
@audited("R", "gap-report")
def check(app: Any, case_id: str, strict: bool, as_json: bool) -> None:
    """Check CASE against its checklist and print the gap report."""
    from aggregator.checklist import render_text
    from aggregator.pipeline import check_case

    report, _ = check_case(app, case_id)
    _emit(as_json, report, lambda: render_text(report))
    if strict and _has_gaps(report):
        sys.exit(4)


def _has_gaps(report: dict[str, Any]) -> bool:
    return any(item.get("status") in ("missing", "partial") for item in report.get("items", []))


@cli.command()
@click.argument("case_id", metavar="CASE")
@click.option("--out", required=True, type=click.Path(), help="Folder (or .zip with --zip) to write.")
@click.option("--zip", "as_zip", is_flag=True, help="Write the package as one zip file.")
@click.option("--mode", "mode_text", metavar="OCTAL",
              help="File mode for the package (default 0600 files / 0700 folders: owner only), e.g. 0640.")
@click.option("--encrypt", is_flag=True,
              help="Encrypt the zip with AES-256 (WinZip AES; opens in 7-Zip) using the passphrase from "
                   "--passphrase-file or --passphrase-env, or to --recipient age keys.")
@click.option("--passphrase-file", type=click.Path(dir_okay=False), help="File holding the passphrase (one line).")
@click.option("--passphrase-env", metavar="VAR", help="Environment variable holding the passphrase.")
@click.option("--recipient", "recipients", multiple=True, metavar="AGE_PUBLIC_KEY",
              help="Encrypt to this age public key (age1...; repeatable); writes OUT.zip.age.")
@json_option
@with_app
@audited("C", "package")
def package(app: Any, case_id: str, out: str, as_zip: bool, mode_text: str | None, encrypt: bool,
            passphrase_file: str | None, passphrase_env: str | None, recipients: tuple[str, ...],
            as_json: bool) -> None:
    """Write the consultant package for CASE."""
    from aggregator.pipeline import package_case
    from aggregator.privacy import apply_mode, parse_mode

    try:
        mode = parse_mode(mode_text) if mode_text is not None else None
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    sealing = _sealing(encrypt, as_zip, passphrase_file, passphrase_env, recipients)
    path, report = package_case(app, case_id, Path(out), as_zip=as_zip, sealing=sealing)
    if mode is not None:
        apply_mode(path, mode)
    data = {"case": case_id, "package": str(path), "zip": as_zip, "completeness": report.get("score"),
            "encrypted": sealing.kind if sealing is not None else None}
    _emit(as_json, data, f"package written: {path}" + (f" (encrypted: {sealing.kind})" if sealing else ""))


def _sealing(encrypt: bool, as_zip: bool, passphrase_file: str | None, passphrase_env: str | None,
             recipients: tuple[str, ...]) -> Any:
    """The encryption that ``package``'s options ask for, or None; refuses half-given options, so
    nobody believes a package is encrypted when it is not."""
    from aggregator.package.sealing import Sealing, parse_recipients, read_passphrase

    has_pass = passphrase_file is not None or passphrase_env is not None
    if not (encrypt or has_pass or recipients):
        return None
    if has_pass and recipients:
        raise UsageError("use either a passphrase or --recipient, not both")
    if has_pass and not encrypt:
        raise UsageError("--passphrase-file/--passphrase-env encrypt only with --encrypt")
    if not has_pass and not recipients:
        raise UsageError("--encrypt needs --passphrase-file, --passphrase-env or --recipient "
                         "(a passphrase is never given on the command line)")
    if not as_zip:
        raise UsageError("an encrypted package is a zip: add --zip")
    if recipients:
        return Sealing(recipients=parse_recipients(recipients))
    return Sealing(passphrase=read_passphrase(file=passphrase_file, env=passphrase_env))


@cli.command()
@click.argument("package_path", metavar="PACKAGE", type=click.Path())
@click.option("--passphrase-file", type=click.Path(dir_okay=False), help="File holding the package's passphrase.")
@click.option("--passphrase-env", metavar="VAR", help="Environment variable holding the package's passphrase.")
@click.option("--identity-file", type=click.Path(dir_okay=False),
              help="age identity file (AGE-SECRET-KEY-...) for a package encrypted to a --recipient.")
@json_option
def verify(package_path: str, passphrase_file: str | None, passphrase_env: str | None, identity_file: str | None,
           as_json: bool) -> None:
    """Check every file of PACKAGE against its manifest (an encrypted one with its passphrase or key)."""
    from aggregator.package import verify_package
    from aggregator.package.sealing import read_identities, read_passphrase

    path = Path(package_path)
    if not path.exists():
        raise UsageError("package not found", item=package_path)
    passphrase = None
    if passphrase_file is not None or passphrase_env is not None:
        passphrase = read_passphrase(file=passphrase_file, env=passphrase_env, new=False)
    identities = read_identities(identity_file) if identity_file is not None else None
    problems = verify_package(path, passphrase=passphrase, identities=identities)
    data = {"package": str(path), "ok": not problems,
            "problems": [{"file": f, "problem": p} for f, p in problems]}
    _emit(as_json, data, lambda: "package OK: every file matches the manifest" if not problems else
          "package FAILED verification:\n" + "\n".join(f"  {f}: {p}" for f, p in problems))
    if problems:
        sys.exit(1)


@cli.command()
@click.argument("case_id", metavar="CASE")
@json_option
@with_app
@audited("R", "reconcile")
def reconcile(app: Any, case_id: str, as_json: bool) -> None:
    """Account for every pulled item of CASE: per source and type, pulled = kept + merged + quarantined.

    Exits 1 when a count does not add up (an item with no fate or with two)."""
    from aggregator import reconcile as rc

    data = rc.reconcile(app, case_id)
    _emit(as_json, data, lambda: rc.render_text(data))
    if not data["balanced"]:
        sys.exit(1)


# --- checklists -----------------------------------------------------------------------------


@cli.group()
def checklist() -> None:
    """Second-opinion checklists."""


@checklist.command("list")
@json_option
def checklist_list(as_json: bool) -> None:
    """List the built-in checklists."""
    from aggregator.checklist import list_checklists

    names = list_checklists()
    _emit(as_json, names, "\n".join(names))


@checklist.command("show")
@click.argument("name")
@json_option
def checklist_show(name: str, as_json: bool) -> None:
    """Show a checklist's items."""
    from aggregator.checklist import load_checklist

    cl = load_checklist(name)
    data = cl.to_dict() if hasattr(cl, "to_dict") else cl
    _emit(as_json, data, lambda: _checklist_text(data))


def _checklist_text(data: Any) -> str:
    if not isinstance(data, dict):
        return str(data)
    lines = [f"{data.get('name', '')}: {data.get('title', '')}"]
    for item in data.get("items", []):
        lines.append(f"  - {item.get('id')}: {item.get('title', '')}")
    return "\n".join(lines)


@checklist.command("validate")
@click.argument("file", type=click.Path())
@json_option
def checklist_validate(file: str, as_json: bool) -> None:
    """Validate a checklist YAML file against the schema."""
    from aggregator.checklist import validate_checklist_file

    if not Path(file).is_file():
        raise UsageError("checklist file not found", item=file)
    errors = validate_checklist_file(Path(file))
    _emit(as_json, {"file": file, "valid": not errors, "errors": errors},
          "valid" if not errors else "invalid:\n" + "\n".join(f"  {e}" for e in errors))
    if errors:
        sys.exit(1)


# --- sync, serve, demo ----------------------------------------------------------------------


@cli.group(invoke_without_command=True)
@click.option("--case", "case_id", help="Only the entries of this case.")
@json_option
@click.pass_context
def audit(ctx: click.Context, case_id: str | None, as_json: bool) -> None:
    """List the audit trail (or check it with `audit verify`)."""
    if ctx.invoked_subcommand is not None:
        return
    from aggregator import audit as audit_log

    app = ctx.obj.app
    rows = list(audit_log.events(app.db, case_id=case_id))

    def text() -> str:
        lines = []
        for r in rows:
            e = r["event"]
            who = e["agent"][0]["who"]["identifier"]["value"]
            case = audit_log.case_of(e) or "-"
            lines.append(f"{r['seq']:>6} {e['recorded']} {e['action']} {e['subtype'][0]['code']:<16} "
                         f"case {case:<20} {who:<16} outcome {e['outcome']}")
        return "\n".join(lines) or "no audit entries"

    _emit(as_json, rows, text)


@audit.command("verify")
@json_option
@with_app
def audit_verify(app: Any, as_json: bool) -> None:
    """Check the hash chain: an edited, deleted or reordered entry is found and named."""
    from aggregator import audit as audit_log

    result = audit_log.verify(app.db)
    text = (f"audit trail intact: {result.count} entries, head {result.head}" if result.ok else
            f"audit trail BROKEN at entry {result.bad_seq}: {result.problem}")
    _emit(as_json, result.to_dict(), text)
    if not result.ok:
        sys.exit(6)


@cli.command()
@click.option("--case", "case_ids", multiple=True, help="Only this case (repeatable).")
@click.option("--due", is_flag=True, help="Only the cases whose schedule is due now (for cron or a systemd timer).")
@click.option("--history", is_flag=True, help="List the stored syncs and what each changed; run nothing.")
@click.option("--limit", default=20, show_default=True, type=int, help="With --history: how many, newest first.")
@json_option
@with_app
def sync(app: Any, case_ids: tuple[str, ...], due: bool, history: bool, limit: int, as_json: bool) -> None:
    """Re-pull every open case incrementally, re-check it, and report what changed.

    What changed (new items by type, gaps filled, new gaps, failed sources) is kept per sync.
    Exits 1 when a source failed."""
    from aggregator import audit
    from aggregator.jobs.sync import has_failures, list_syncs, render_sync, sync_cases

    if history:
        if due:
            raise UsageError("--history lists syncs; it does not go with --due")
        if len(case_ids) > 1:
            raise UsageError("--history takes at most one --case")
        rows = list_syncs(app, case_ids[0] if case_ids else None, limit=limit)
        audit.record(app.db, audit.os_actor(), audit.READ, "sync-list", case_id=case_ids[0] if case_ids else None)
        _emit(as_json, rows, lambda: render_sync(rows) if rows else "no syncs yet")
        return
    if due:
        if case_ids:
            raise UsageError("--due runs every case whose schedule is due; it does not go with --case")
        from aggregator.jobs.schedule import run_due

        results = run_due(app, actor=audit.os_actor())
        _emit(as_json, results, lambda: render_sync(results) if results else "no scheduled sync is due")
    else:
        results = sync_cases(app, list(case_ids) or None, actor=audit.os_actor())
        _emit(as_json, results, lambda: render_sync(results))
    if has_failures(results):
        sys.exit(1)


# --- schedules ------------------------------------------------------------------------------


@cli.group()
def schedule() -> None:
    """When each case syncs on its own (cron syntax), and where to send word of it."""


def _schedule_text(d: dict[str, Any]) -> str:
    state = "" if d.get("active", True) else f"  (case {d.get('case_status')}: not syncing)"
    hook = f"  webhook: {d['webhook']['url']}" if d.get("webhook") else ""
    return f"{d['case']:<24} {d['cron']:<18} {d['timezone']:<20} next {d['next_due_at']}{state}{hook}"


@schedule.command("set")
@click.argument("case_id", metavar="CASE")
@click.argument("expr", metavar="CRON")
@click.option("--tz", "timezone", default="UTC", show_default=True,
              help="IANA time zone the cron is read in (e.g. America/New_York).")
@click.option("--webhook", "webhook_url", default=None, help="POST a signed summary here after each sync of CASE.")
@click.option("--webhook-secret-env", default=None, metavar="NAME",
              help="Environment variable holding the webhook's HMAC secret.")
@click.option("--webhook-secret-file", default=None, type=click.Path(dir_okay=False),
              help="File holding the webhook's HMAC secret.")
@json_option
@with_app
@audited("U", "schedule")
def schedule_set(app: Any, case_id: str, expr: str, timezone: str, webhook_url: str | None,
                 webhook_secret_env: str | None, webhook_secret_file: str | None, as_json: bool) -> None:
    """Sync CASE whenever CRON (five fields: minute hour day month weekday) says, e.g. "0 6 * * *"."""
    from aggregator.jobs.schedule import set_schedule

    secret_file = str(Path(webhook_secret_file).expanduser().resolve()) if webhook_secret_file else None
    data = set_schedule(app, case_id, expr, timezone=timezone, webhook_url=webhook_url,
                        webhook_secret_env=webhook_secret_env, webhook_secret_file=secret_file)
    _emit(as_json, data, lambda: "schedule set: " + _schedule_text(data))


@schedule.command("show")
@click.argument("case_id", metavar="CASE")
@json_option
@with_app
def schedule_show(app: Any, case_id: str, as_json: bool) -> None:
    """Show CASE's schedule and when it next runs."""
    from aggregator.jobs.schedule import get_schedule

    data = get_schedule(app, case_id)
    _emit(as_json, data, lambda: _schedule_text(data))


@schedule.command("clear")
@click.argument("case_id", metavar="CASE")
@json_option
@with_app
@audited("U", "schedule")
def schedule_clear(app: Any, case_id: str, as_json: bool) -> None:
    """Remove CASE's schedule (its past syncs stay)."""
    from aggregator.jobs.schedule import clear_schedule

    data = clear_schedule(app, case_id)
    _emit(as_json, data, f"schedule of case {case_id} cleared")


@schedule.command("list")
@json_option
@with_app
def schedule_list(app: Any, as_json: bool) -> None:
    """Every schedule, with the next time it runs."""
    from aggregator.jobs.schedule import list_schedules

    rows = list_schedules(app)
    _emit(as_json, rows, lambda: "\n".join(_schedule_text(r) for r in rows) or "no schedules")


@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (loopback unless told otherwise).")
@click.option("--port", default=8080, type=int, show_default=True)
@with_app
def serve(app: Any, host: str, port: int) -> None:
    """Run the HTTP API (OpenAPI at /openapi.json, docs at /docs); pulls run in this process."""
    import uvicorn

    from aggregator.api import create_app

    if host not in ("127.0.0.1", "::1", "localhost"):
        click.echo(f"warning: listening on {host}, not loopback: put TLS in front of it", err=True)
    logging.getLogger("aggregator.api.access").setLevel(logging.INFO)
    # uvicorn's own access log prints query strings: ours masks them (aggregator.api.middleware)
    uvicorn.run(create_app(app), host=host, port=port, access_log=False, server_header=False,
                log_level=os.environ.get("AGGREGATOR_LOG_LEVEL", "info").lower())


@cli.group()
def job() -> None:
    """Jobs (pulls and packages queued through the API or a schedule): list, show, cancel."""


def _job_line(j: dict[str, Any]) -> str:
    line = f"{j['id']}  {j['kind']:<8} {j['case']:<20} {j['state']:<9} attempts {j['attempts']}"
    if j.get("worker"):
        line += f"  on {j['worker']}"
    if j.get("error"):
        line += f"  ({j['error']})"
    return line


@job.command("list")
@click.option("--case", "case_id", default=None, help="Only this case's jobs.")
@click.option("--state", "states", multiple=True,
              type=click.Choice(["queued", "running", "done", "partial", "failed", "cancelled"]),
              help="Only jobs in this state (repeatable).")
@json_option
@with_app
def job_list(app: Any, case_id: str | None, states: tuple[str, ...], as_json: bool) -> None:
    """Jobs, oldest first."""
    from aggregator.jobs import records

    jobs = [j.to_dict() for j in records.list_jobs(app, case_id, states=states or None)]
    _emit(as_json, jobs, lambda: "\n".join(_job_line(j) for j in jobs) or "no jobs")


@job.command("show")
@click.argument("job_id", metavar="JOB")
@json_option
@with_app
def job_show(app: Any, job_id: str, as_json: bool) -> None:
    """A job's state, times, per-source progress and error."""
    from aggregator.jobs import records
    from aggregator.jobs.view import job_detail

    data = job_detail(app, records.get(app, job_id))

    def text() -> str:
        lines = [_job_line(data)]
        for k in ("created_at", "started_at", "heartbeat_at", "finished_at"):
            if data.get(k):
                lines.append(f"  {k.replace('_at', ''):<9} {data[k]}")
        if data["cancel_requested"] and data["state"] not in ("cancelled",):
            lines.append("  cancel requested")
        for src in data["sources"]:
            expected = f"/{src['expected']}" if src.get("expected") is not None else ""
            lines.append(f"  source {src['source']} {src['label']}: {src['state']}, {src['done']}{expected} done, "
                         f"{src['failed']} failed, {src['skipped']} skipped")
        return "\n".join(lines)

    _emit(as_json, data, text)


@job.command("cancel")
@click.argument("job_id", metavar="JOB")
@json_option
@with_app
def job_cancel(app: Any, job_id: str, as_json: bool) -> None:
    """Cancel a job: a queued one at once, a running one at its next step (within seconds)."""
    from aggregator import audit
    from aggregator.jobs import records
    job = records.request_cancel(app, job_id)
    if job.cancel_requested and job.queue_job_id is not None and app.db.engine.dialect.name == "postgresql":
        from aggregator.jobs.queue import QueueDispatcher

        queue = QueueDispatcher(app)
        try:
            queue.cancel(job)
        finally:
            queue.shutdown()
    audit.record(app.db, audit.os_actor(), audit.EXECUTE, "job-cancel", case_id=job.case_id, entity={"job": job.id})
    data = job.to_dict()
    _emit(as_json, data, lambda: _job_line(data) + ("" if job.final else "  (cancel requested)"))


@cli.command()
@click.option("--concurrency", default=2, type=click.IntRange(1, 64), show_default=True,
              help="Jobs this worker runs at once.")
@with_app
def worker(app: Any, concurrency: int) -> None:
    """Run jobs from the PostgreSQL queue (Procrastinate) until stopped; start as many as you like."""
    from aggregator.errors import ConfigError
    from aggregator.jobs.queue import run_worker

    if app.db.engine.dialect.name != "postgresql":
        raise ConfigError("workers need PostgreSQL: set AGGREGATOR_DATABASE_URL to a postgresql:// URL; "
                          "on SQLite, `aggregator serve` runs the jobs in its own process")
    if "AGGREGATOR_LOG_LEVEL" not in os.environ:
        logging.getLogger("aggregator").setLevel(logging.INFO)
    run_worker(app, concurrency=concurrency)


@cli.command()
@click.option("--out", type=click.Path(), help="Where to write the package (default: HOME/demo/package).")
@json_option
@with_app
def demo(app: Any, out: str | None, as_json: bool) -> None:
    """Run a whole case on built-in synthetic data and print where the package is."""
    from aggregator.demo import run_demo

    result = run_demo(app, Path(out) if out else None, progress=not as_json)
    _emit(as_json, result, lambda: "\n".join([
        f"demo case '{result['case']}': {result['sources']} source(s) pulled",
        f"checklist '{result['checklist']}': completeness {result['completeness']:.0%}, "
        f"{result['gaps']} gap(s)",
        f"package: {result['package']}",
        f"verify:  {'OK' if result['verified'] else 'FAILED'}",
        f"open {result['package']}/INDEX.HTM in a browser, or run: aggregator verify {result['package']}",
    ]))


# --- records requests -----------------------------------------------------------------------

@cli.group("request")
def request_group() -> None:
    """Right-of-access letters for what the gap report says is missing, tracked until it arrives."""


def _request_text(r: dict[str, Any]) -> str:
    sent = f"sent {r['sent_on']} ({r['channel']}), {r['days_since_sent']} days ago" if r["sent_on"] else "not sent"
    due = f", due {r['due_on']}" if r.get("due_on") and r["state"] not in ("received", "closed") else ""
    flag = "  OVERDUE" if r["overdue"] else ""
    head = (f"{r['id']}  {r['state']:<8}  {r['institution']}: {r['outstanding']} of {len(r['items'])} "
            f"outstanding; {sent}{due}{flag}")
    lines = [f"    [{'x' if it['status'] in ('received', 'resolved') else ' '}] {it['text']}" for it in r["items"]]
    rem = r.get("reminder_due")
    if rem:
        lines.append(f"    follow-up due: {_reminder_words(rem)}")
    return "\n".join([head, *lines])


def _reminder_words(rem: dict[str, Any]) -> str:
    if rem["kind"] == "overdue":
        return f"overdue since {rem['on']} (day {rem['day']} after sending)"
    return f"day-{rem['day']} reminder, since {rem['on']}"


def _audit_request(app: Any, request_id: str, action: str) -> None:
    """Viewing or changing one letter is a read/change of its case's patient data."""
    from aggregator import audit
    from aggregator.records_requests.store import case_of

    audit.record(app.db, audit.os_actor(), action, "records-request", case_id=case_of(app, request_id),
                 entity={"records-request": request_id})


def _day_option(on: str | None) -> Any:
    from datetime import date

    try:
        return date.fromisoformat(on) if on else None
    except ValueError as exc:
        raise UsageError("--on takes a date as YYYY-MM-DD") from exc


def _today(app: Any) -> Any:
    """Today in the navigators' zone (the records request rules' timezone)."""
    from datetime import UTC, datetime

    from aggregator.records_requests.rules import load_rules
    from aggregator.records_requests.schedule import local_today

    return local_today(datetime.now(UTC), load_rules(Path(app.settings.home)).zone())


@request_group.command("draft")
@click.argument("case_id", metavar="CASE")
@click.option("--institution", default=None, help="Only the letter to this institution (as the gap report names it).")
@click.option("--send-to", default=None,
              help="Where the records should be sent (the navigator's address); default $AGGREGATOR_REQUEST_SEND_TO.")
@json_option
@with_app
@audited("R", "records-request")
def request_draft(app: Any, case_id: str, institution: str | None, send_to: str | None, as_json: bool) -> None:
    """Check CASE and draft one records request per institution for the open gaps not yet requested."""
    from aggregator.pipeline import check_case
    from aggregator.records_requests import draft_requests

    report, cr = check_case(app, case_id)
    out = draft_requests(app, case_id, report, cr, institution=institution, send_to=send_to)

    def text() -> str:
        parts = [_request_text(r) + f"\n    letter: {r['text_file']}  pdf: {r['pdf_file']}" for r in out["drafted"]]
        if not parts:
            parts.append("no new request: every open gap is already requested" if out["already_requested"]
                         else "no open gap a records request can ask for")
        if out["not_requestable"]:
            parts.append(f"{len(out['not_requestable'])} identity gap(s) are not for a records request: "
                         "settle the patient's identity (see `aggregator check`)")
        return "\n".join(parts)

    _emit(as_json, out, text)


@request_group.command("list")
@click.argument("case_id", metavar="[CASE]", required=False)
@click.option("--due", is_flag=True,
              help="Only requests with a follow-up due today (every open case when CASE is not given).")
@click.option("--overdue-days", type=int, default=None,
              help="Days after sending before a request is overdue (default: the rule it was drafted under; "
                   "$AGGREGATOR_REQUEST_OVERDUE_DAYS or 30 under HIPAA).")
@json_option
@with_app
@audited("R", "records-request")
def request_list(app: Any, case_id: str | None, due: bool, overdue_days: int | None, as_json: bool) -> None:
    """The records requests of CASE: state, what is outstanding, days since sent, due date, follow-ups."""
    from aggregator.records_requests import due_reminders, list_requests

    if case_id is None and not due:
        raise UsageError("give a CASE, or --due for the follow-ups due in every open case")
    if case_id is None:
        found = due_reminders(app)

        def text() -> str:
            return "\n".join(
                f"{d['case']}  {d['request']}  {d['institution']}: {_reminder_words(d)}; "
                f"{d['outstanding']} of {d['items']} outstanding; sent {d['sent_on']}, due {d['due_on']}"
                for d in found) or "no follow-up due"

        _emit(as_json, found, text)
        return
    rows = list_requests(app, case_id, overdue_after=overdue_days, due_only=due)
    empty = "no follow-up due" if due else "no records requests"
    _emit(as_json, rows, lambda: "\n".join(_request_text(r) for r in rows) or empty)


@request_group.command("show")
@click.argument("request_id", metavar="ID")
@click.option("--pdf", "pdf_out", type=click.Path(dir_okay=False), default=None,
              help="Also write the letter as PDF to this file (owner-only).")
@json_option
@with_app
def request_show(app: Any, request_id: str, pdf_out: str | None, as_json: bool) -> None:
    """Print the letter of request ID (and its tracking state with --json)."""
    from aggregator.privacy import make_private
    from aggregator.records_requests import get_request

    _audit_request(app, request_id, "R")
    r = get_request(app, request_id)
    if pdf_out:
        import shutil

        shutil.copyfile(r["pdf_file"], pdf_out)
        make_private(Path(pdf_out))
        r["pdf_written"] = pdf_out
    _emit(as_json, r, lambda: Path(r["text_file"]).read_text(encoding="utf-8"))


@request_group.command("sent")
@click.argument("request_id", metavar="ID")
@click.option("--on", "on", default=None, metavar="YYYY-MM-DD", help="The day it was sent (default today).")
@click.option("--channel", default="mail", show_default=True, help="How it was sent (mail, fax, e-mail, portal...).")
@json_option
@with_app
def request_sent(app: Any, request_id: str, on: str | None, channel: str, as_json: bool) -> None:
    """Record that request ID was sent: the due date and the follow-up reminders count from that day."""
    from aggregator.records_requests import mark_sent

    day = _day_option(on) or _today(app)
    _audit_request(app, request_id, "U")
    r = mark_sent(app, request_id, day, channel)
    _emit(as_json, r, lambda: _request_text(r))


@request_group.command("acknowledged")
@click.argument("request_id", metavar="ID")
@click.option("--on", "on", default=None, metavar="YYYY-MM-DD",
              help="The day the institution answered (default today).")
@click.option("--extended", is_flag=True,
              help="The institution takes its one extension (HIPAA: 30 more days): the due date moves.")
@json_option
@with_app
def request_acknowledged(app: Any, request_id: str, on: str | None, extended: bool, as_json: bool) -> None:
    """Record that the institution acknowledged request ID (and whether it extended its time)."""
    from aggregator.records_requests import mark_acknowledged

    day = _day_option(on) or _today(app)
    _audit_request(app, request_id, "U")
    r = mark_acknowledged(app, request_id, day, extended=extended)
    _emit(as_json, r, lambda: _request_text(r))


@request_group.command("followed-up")
@click.argument("request_id", metavar="ID")
@click.option("--on", "on", default=None, metavar="YYYY-MM-DD", help="The day of the follow-up (default today).")
@json_option
@with_app
def request_followed_up(app: Any, request_id: str, on: str | None, as_json: bool) -> None:
    """Record a follow-up call or letter for request ID: the reminders due until then are answered."""
    from aggregator.records_requests import mark_followed_up

    day = _day_option(on) or _today(app)
    _audit_request(app, request_id, "U")
    r = mark_followed_up(app, request_id, day)
    _emit(as_json, r, lambda: _request_text(r))


@request_group.command("received")
@click.argument("request_id", metavar="ID")
@json_option
@with_app
def request_received(app: Any, request_id: str, as_json: bool) -> None:
    """Mark every outstanding line of request ID received by hand (records that came outside the tool).

    Lines are marked received on their own when a pull or upload fills their gaps; this is for the rest.
    """
    from aggregator.records_requests import mark_received

    _audit_request(app, request_id, "U")
    r = mark_received(app, request_id)
    _emit(as_json, r, lambda: _request_text(r))


@request_group.command("close")
@click.argument("request_id", metavar="ID")
@json_option
@with_app
def request_close(app: Any, request_id: str, as_json: bool) -> None:
    """Close request ID by hand (answered otherwise, withdrawn); its gaps can be requested again."""
    from aggregator.records_requests.store import close

    _audit_request(app, request_id, "U")
    r = close(app, request_id)
    _emit(as_json, r, lambda: _request_text(r))


# --- entry point ----------------------------------------------------------------------------


def _setup_logging() -> None:
    level = os.environ.get("AGGREGATOR_LOG_LEVEL", "WARNING").upper()
    logging.basicConfig(level=getattr(logging, level, logging.WARNING), stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")


def main(argv: list[str] | None = None) -> int:
    _setup_logging()
    args = sys.argv[1:] if argv is None else argv
    as_json = "--json" in args
    try:
        rv = cli.main(args=args, prog_name="aggregator", standalone_mode=False)
        return rv if isinstance(rv, int) else 0
    except click.exceptions.Exit as exc:
        return int(exc.exit_code)
    except click.ClickException as exc:
        if as_json:
            click.echo(json.dumps({"error": {"type": "UsageError", "message": exc.format_message()}}))
        else:
            exc.show()
        return int(exc.exit_code)
    except click.Abort:
        click.echo("aborted", err=True)
        return 130
    except AggregatorError as exc:
        if as_json:
            click.echo(json.dumps({"error": {"type": type(exc).__name__, "message": exc.message,
                                             "item": exc.item}}))
        else:
            click.echo(f"error: {exc}", err=True)
        return exc.exit_code
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        return 130
    except Exception as exc:
        # Library exception text can quote the data it choked on, so only the type is shown;
        # the traceback is logged at DEBUG for developers.
        log.debug("internal error %s at:\n%s", type(exc).__name__, "".join(traceback.format_tb(exc.__traceback__)))
        if as_json:
            click.echo(json.dumps({"error": {"type": "InternalError", "message": type(exc).__name__}}))
        else:
            click.echo(f"internal error ({type(exc).__name__}); run with AGGREGATOR_LOG_LEVEL=DEBUG for details",
                       err=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
