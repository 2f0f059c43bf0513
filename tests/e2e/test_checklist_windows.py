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

import json
from collections.abc import Callable
from datetime import date
from pathlib import Path
from typing import Any

import pytest
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
    Note,
    Visit,
    at,
    encounter_resource,
    generate_cardiology_download,
    note_resource,
)
from fixtures.generate import LOINC, SNOMED, _concept, _Ids

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


# --- notes and visits ------------------------------------------------------------------------


def _cardiology(tmp_path: Path, *, add: Callable[[_Ids], list[dict[str, Any]]]
                ) -> tuple[dict[str, Any], Callable[[str], str]]:
    """The complete cardiology patient with resources added to portal A's bundle, checked.

    Returns the report and a function: fixture key (a visit's or a note's) -> its reference in
    the normalized record (normalization gives resources ids of its own).
    """
    download = tmp_path / "dl"
    info = generate_cardiology_download(download)
    path = download / "portal-a" / "record.json"
    bundle = json.loads(path.read_text(encoding="utf-8"))
    for res in add(_Ids("cardio")):
        bundle["entry"].append({"fullUrl": f"urn:uuid:{res['id']}", "resource": res})
    path.write_text(json.dumps(bundle, indent=1, sort_keys=True), encoding="utf-8")
    report, by_ident = _check_record(tmp_path, download, "cardiology", info.case_date.isoformat(), info)
    ids = _Ids("cardio")
    visits = {v.key: v.identifier for v in (CLINIC_VISIT, CONSULT_VISIT)}

    def ref(key: str) -> str:
        return by_ident[visits[key]] if key in visits else by_ident[f"urn:uuid:{ids(key + '/document')}"]
    return report, ref


def _visits(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {s["ref"]: s for s in _item(report, "clinical-notes").get("subjects", [])}


def _note(key: str, visit: Visit, loinc: tuple[str, str], *, names_encounter: bool) -> Callable[[_Ids], dict]:
    def build(ids: _Ids) -> dict[str, Any]:
        n = Note(key, visit, _concept(LOINC, loinc[0], loinc[1], loinc[1]), CLINIC_NOTE,
                 at(visit.day, "14:30:00"), *CARDIOLOGIST)
        res = note_resource(ids, n)
        if not names_encounter:
            del res["context"]  # no encounter, and no period borrowed from one
        return res
    return build


def test_an_inpatient_stays_note_does_not_cover_an_outpatient_visit_of_the_same_day(tmp_path: Path) -> None:
    report, ref = _cardiology(tmp_path, add=lambda ids: [encounter_resource(ids, CLINIC_VISIT)])
    clinic, stay = ref(CLINIC_VISIT.key), ref(CONSULT_VISIT.key)
    visits = _visits(report)
    assert visits[stay]["status"] == "complete"
    assert visits[clinic]["status"] == "missing" and visits[clinic]["linked"] == []
    assert _gapped(report) == {"clinical-notes": ["not-found"]}
    assert _item(report, "clinical-notes")["gaps"][0]["subject"] == clinic


def test_a_note_naming_the_visit_covers_it(tmp_path: Path) -> None:
    note = _note("note-clinic", CLINIC_VISIT, ("11506-3", "Progress note"), names_encounter=True)
    report, ref = _cardiology(tmp_path, add=lambda ids: [encounter_resource(ids, CLINIC_VISIT), note(ids)])
    visits = _visits(report)
    assert visits[ref(CLINIC_VISIT.key)]["linked"] == [ref("note-clinic")]
    assert ref("note-clinic") not in visits[ref(CONSULT_VISIT.key)]["linked"]
    assert _gapped(report) == {}


@pytest.mark.parametrize(("loinc", "covers_clinic"), [
    (("11506-3", "Progress note"), True),  # written in any setting: the date decides
    (("18842-5", "Discharge summary"), False),  # belongs to an inpatient stay, never to a clinic visit
])
def test_a_note_naming_no_encounter_links_by_date_within_its_class_of_encounter(
        tmp_path: Path, loinc: tuple[str, str], covers_clinic: bool) -> None:
    note = _note("note-unlinked", CLINIC_VISIT, loinc, names_encounter=False)
    report, ref = _cardiology(tmp_path, add=lambda ids: [encounter_resource(ids, CLINIC_VISIT), note(ids)])
    clinic, stay, unlinked = ref(CLINIC_VISIT.key), ref(CONSULT_VISIT.key), ref("note-unlinked")
    visits = _visits(report)
    assert (unlinked in visits[clinic]["linked"]) is covers_clinic
    assert visits[stay]["status"] == "complete"
    if covers_clinic:
        assert _gapped(report) == {}
    else:
        assert _gapped(report) == {"clinical-notes": ["not-found"]}
        assert _item(report, "clinical-notes")["gaps"][0]["subject"] == clinic


def test_fixture_dates_are_what_these_tests_assume() -> None:
    info_day = date.fromisoformat(LAB_DAY)
    assert (date(2026, 10, 1) - info_day).days < 90  # the complete patient's labs are recent
    assert CONSULT_VISIT.act_class[0] == "IMP" and CLINIC_VISIT.day == CONSULT_VISIT.day
