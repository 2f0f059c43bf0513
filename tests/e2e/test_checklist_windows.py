"""Windows and visit links of the checklist rules, on the project's generated patients.

Each test takes a generated download (``fixtures/``), changes one thing a navigator meets in real
records - the case date, or one encounter or note added with the fixture's own builders - and
runs it the whole way: files on disk -> media pull -> normalize -> checklist.

* A "recent" window runs from the case date back ``within`` days, and forward only the
  checklist's grace period: results from after that do not satisfy it, and the gap says so.
* Results that exist but are all too old are ``outdated``, not ``not-found``: the gap names the
  newest date and the window.
* A visit's note is linked by encounter reference first: an inpatient stay's note does not cover
  an outpatient visit of the same day; a note naming no encounter links by date, and only to a
  visit of the class of encounter it is written in.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from aggregator.app import App
from aggregator.cases import add_source, create_case
from aggregator.checklist import load_checklist, render_text
from aggregator.checklist.stream import entries
from aggregator.jobs.pull import pull_case
from aggregator.pipeline import check_case
from fixtures import generate_download
from fixtures.cardiology import (
    CARDIOLOGIST,
    CONSULT_VISIT,
    Visit,
)
from fixtures.generate import SNOMED

LAB_DAY = "2026-09-15"  # every laboratory result of the complete oncology patient (bundle and NDJSON)
CLINIC_VISIT = Visit("enc-clinic-same-day", "ENC-1099", CONSULT_VISIT.day, "14:00:00", "14:30:00",
                     ("AMB", "ambulatory"),
                     (SNOMED, "185349003", "Encounter for check up", "Heart failure clinic"),
                     "Heart failure education", *CARDIOLOGIST)
CLINIC_NOTE = ("HEART FAILURE CLINIC (synthetic)\nDate: 2026-08-04. Diuretic and fluid education before "
               "discharge planning. Daily weights reviewed.\nAvery Brooks, MD\n")


def _check(tmp_path: Path, download: Path, checklist: str, case_date: str, info: Any) -> dict[str, Any]:
    return _check_record(tmp_path, download, checklist, case_date, info)[0]


def _check_record(tmp_path: Path, download: Path, checklist: str, case_date: str, info: Any
                  ) -> tuple[dict[str, Any], dict[str, str]]:
    """The gap report, and ``Type/id`` in the normalized record by business identifier value."""
    app = App.open(tmp_path / "home")
    create_case(app, "c", checklist, patient_name=info.patient_name, birth_date=info.birth_date,
                case_date=case_date)
    add_source(app, "c", media=str(download))
    (summary,) = pull_case(app, "c")
    assert summary.state == "done", summary.error
    report, cr = check_case(app, "c")
    refs: dict[str, str] = {}
    for entry, _ in entries(cr.record):
        res = entry["resource"]
        for ident in res.get("identifier") or []:
            refs[str(ident.get("value"))] = f"{res['resourceType']}/{res['id']}"
    return report, refs


def _item(report: dict[str, Any], item_id: str) -> dict[str, Any]:
    return next(i for i in report["items"] if i["id"] == item_id)


def _gapped(report: dict[str, Any]) -> dict[str, list[str]]:
    return {i["id"]: [g["reason"] for g in i["gaps"]] for i in report["items"] if i["gaps"]}


# --- windows ---------------------------------------------------------------------------------


def test_results_after_the_case_date_beyond_the_grace_do_not_count(tmp_path: Path) -> None:
    info = generate_download(tmp_path / "dl")
    # the labs of 2026-09-15 are 14 days after this case date; the oncology checklist's grace is 7 days
    report = _check(tmp_path, tmp_path / "dl", "oncology", "2026-09-01", info)
    assert _gapped(report) == {"lab-results": ["not-found"]}
    gap = _item(report, "lab-results")["gaps"][0]
    assert gap["detail"] == ("nothing in the window 2026-06-03 to 2026-09-08 (90 days before the case date "
                             f"2026-09-01, up to 7 days after): the only ones are dated after the case date, beyond "
                             f"the 7-day grace period, the earliest from {LAB_DAY}")
    assert "laboratory results of the last 90 days" in gap["next_action"]


def test_results_within_the_grace_after_the_case_date_count(tmp_path: Path) -> None:
    info = generate_download(tmp_path / "dl")
    report = _check(tmp_path, tmp_path / "dl", "oncology", "2026-09-10", info)  # labs 5 days later
    assert _gapped(report) == {}
    assert _item(report, "lab-results")["status"] == "complete"


def test_the_grace_period_is_the_checklists_setting(tmp_path: Path) -> None:
    info = generate_download(tmp_path / "dl")
    mine = load_checklist("oncology").to_dict()
    mine.pop("source")
    mine["grace"] = "0d"
    path = tmp_path / "strict.yaml"
    path.write_text(yaml.safe_dump(mine, sort_keys=False), encoding="utf-8")
    assert load_checklist(str(path)).grace_days == 0
    assert load_checklist("oncology").grace_days == 7
    report = _check(tmp_path, tmp_path / "dl", str(path), "2026-09-10", info)
    assert _gapped(report) == {"lab-results": ["not-found"]}
    assert "2026-06-12 to 2026-09-10 (90 days before the case date 2026-09-10)" in (
        _item(report, "lab-results")["gaps"][0]["detail"])


def test_results_that_exist_but_are_too_old_are_outdated(tmp_path: Path) -> None:
    info = generate_download(tmp_path / "dl", variant="no-recent-labs")  # labs of 2025-06-16
    report = _check(tmp_path, tmp_path / "dl", "oncology", info.case_date.isoformat(), info)
    assert _gapped(report) == {"lab-results": ["outdated"]}
    gap = _item(report, "lab-results")["gaps"][0]
    assert gap["detail"] == ("nothing recent at any source: the newest is from 2025-06-16, older than the window "
                             "2026-07-03 to 2026-10-08 (90 days before the case date 2026-10-01, up to 7 days "
                             "after)")
    assert gap["next_action"].startswith("Ask ")
    assert "for recent results: the laboratory results of the last 90 days" in gap["next_action"]
    assert "outdated: nothing recent" in render_text(report)
    assert report["counts"]["by_reason"] == {"outdated": 1}
