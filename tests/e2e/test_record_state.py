"""The record ``check`` keeps, and when it stops holding (issue 12 part 2: ``package`` after
``check`` does not normalize the whole record again).

The kept record must be the computed one in every part (bundle bytes and side lists), must be
used only while nothing it was computed from changed, and must be private.
"""

from __future__ import annotations

import stat
from dataclasses import asdict
from datetime import date
from pathlib import Path

from aggregator import record_state
from aggregator.app import App
from aggregator.cases import add_source, create_case
from aggregator.jobs.pull import pull_case
from aggregator.pipeline import check_case, checked_case
from aggregator.records_requests import draft_requests, mark_sent
from fixtures.generate import generate_download


def _case(tmp_path: Path, variant: str = "no-images") -> App:
    info = generate_download(tmp_path / "dl", variant=variant)
    app = App.open(tmp_path / "home")
    create_case(app, "c", "oncology", patient_name=info.patient_name, birth_date=info.birth_date,
                case_date=info.case_date.isoformat())
    add_source(app, "c", media=str(tmp_path / "dl"))
    (summary,) = pull_case(app, "c")
    assert summary.state == "done", summary.error
    return app


def test_the_kept_record_is_the_computed_one(tmp_path: Path) -> None:
    app = _case(tmp_path)
    report, cr = check_case(app, "c")
    kept = record_state.load(app, "c")
    assert kept is not None
    record, kept_report = kept
    assert kept_report == report
    assert record.digest() == cr.record.digest()
    assert record.bundle_path != cr.record.bundle_path  # its own link, removed with it
    for part in ("documents", "images", "quarantine", "notes"):
        assert [asdict(x) for x in getattr(record, part)] == [asdict(x) for x in getattr(cr.record, part)], part
        assert getattr(record, part) == getattr(cr.record, part), part
    for part in ("unresolved", "conflicts", "patient_ref", "identity", "source_times", "kept"):
        assert getattr(record, part) == getattr(cr.record, part), part
    assert {t: record.count(t) for t in record.types()} == {t: cr.record.count(t) for t in cr.record.types()}
    assert list(record.entries(["DiagnosticReport"])) == list(cr.record.entries(["DiagnosticReport"]))
    path = record.bundle_path
    record.close()
    assert not path.exists()
    # closing the loaded record leaves the kept one in place
    assert record_state.load(app, "c") is not None
    d = record_state.folder(app, "c")
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    for f in d.iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o600, f.name


def test_any_change_of_inputs_drops_the_kept_record(tmp_path: Path) -> None:
    app = _case(tmp_path)
    report, cr = check_case(app, "c")
    assert record_state.report_bytes(app, "c") is not None
    # a records request marked sent changes what the report says of its gaps
    (letter,) = draft_requests(app, "c", report, cr, send_to="navigator@example.org")["drafted"]
    assert record_state.load(app, "c") is None
    check_case(app, "c")
    assert record_state.load(app, "c") is not None
    mark_sent(app, letter["id"], date(2026, 10, 2), "fax")
    assert record_state.load(app, "c") is None
    check_case(app, "c")
    # a new source and its pull
    generate_download(tmp_path / "cd", variant="complete")
    add_source(app, "c", media=str(tmp_path / "cd"))
    assert record_state.report_bytes(app, "c") is None
    checked_case(app, "c")  # computes, and keeps
    assert record_state.load(app, "c") is not None
    assert all(s.state == "done" for s in pull_case(app, "c"))
    assert record_state.load(app, "c") is None
    report_after, _ = checked_case(app, "c")
    assert report_after["complete"] and not report["complete"]  # the CD filled the gaps
    # a kept state whose bundle was damaged is not trusted
    bundle = record_state.folder(app, "c") / record_state.BUNDLE
    with bundle.open("ab") as f:
        f.write(b"\n")
    assert record_state.load(app, "c") is None
