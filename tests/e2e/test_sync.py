"""Scheduled sync: only what changed is pulled again, and the gap report says what got filled."""

from __future__ import annotations

import json
from pathlib import Path

from aggregator.app import App
from aggregator.cases import add_source, create_case
from aggregator.jobs.pull import pull_case
from aggregator.jobs.sync import render_sync, sync_cases
from aggregator.pipeline import check_case


def test_sync_pulls_new_files_and_reports_the_filled_gap(tmp_path: Path) -> None:
    from fixtures import build_record, generate_download

    info = generate_download(tmp_path / "dl", variant="no-recent-labs")
    app = App.open(tmp_path / "home")
    create_case(app, "c", "oncology", patient_name=info.patient_name, birth_date=info.birth_date,
                case_date=info.case_date.isoformat())
    add_source(app, "c", media=str(tmp_path / "dl"))
    pull_case(app, "c")
    report, _ = check_case(app, "c")
    assert any(i["id"] == "lab-results" and i["status"] == "missing" for i in report["items"])

    # nothing changed: sync fetches nothing and reports no movement
    (first,) = sync_cases(app)
    assert sum(p["items"].get("done", 0) for p in first["pulls"]) == 0
    assert first["filled"] == [] and first["new_gaps"] == []

    # the patient brings this month's labs: sync takes just that file and the gap closes
    _, recent = build_record("complete", "demo")
    labs = [r for r in recent if r["resourceType"] == "Observation"]
    assert labs
    (tmp_path / "dl" / "new-labs.ndjson").write_text("\n".join(json.dumps(r) for r in labs) + "\n")
    (second,) = sync_cases(app)
    assert sum(p["items"].get("done", 0) for p in second["pulls"]) == len(labs)
    assert "lab-results" in second["filled"]
    assert "lab-results" not in second["open_gaps"]
    assert "newly filled: lab-results" in render_sync([second])
