"""What a navigator reads after a pull: who to ask for each gap, what was skipped, signs of life.

Generated downloads go the whole way (files -> media pull -> normalize -> check). The download
folder has a distinctive name, so a next action that names the folder instead of the
institution is caught. The CLI runs as a subprocess from this checkout (``python -m
aggregator.cli``) with stdout and stderr as pipes, i.e. not a terminal.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest

from aggregator.app import App
from aggregator.cases import add_source, create_case
from aggregator.checklist import render_text
from aggregator.jobs.pull import pull_case
from aggregator.pipeline import check_case

ROOT = Path(__file__).resolve().parents[2]
FOLDER = "portal-download"
HOSPITAL = "Synthetic General Hospital"  # the fixtures' Organization, C-CDA custodian and DICOM InstitutionName
GAP_SCHEMA = json.loads((ROOT / "schemas" / "gap-report.schema.json").read_text())


def _case(tmp_path: Path, variant: str) -> tuple[dict, App]:
    from fixtures import generate_download

    info = generate_download(tmp_path / FOLDER, variant=variant)
    app = App.open(tmp_path / "home")
    create_case(app, "c", "oncology", patient_name=info.patient_name, birth_date=info.birth_date,
                case_date=info.case_date.isoformat())
    add_source(app, "c", media=str(tmp_path / FOLDER))
    (summary,) = pull_case(app, "c")
    assert summary.state == "done", summary.error
    report, _ = check_case(app, "c")
    jsonschema.validate(report, GAP_SCHEMA)
    return report, app


@pytest.mark.parametrize("variant", ["no-pathology-text", "no-images", "no-recent-labs", "no-visit-note"])
def test_every_gap_names_the_institution_not_the_folder(tmp_path: Path, variant: str) -> None:
    report, _ = _case(tmp_path, variant)
    gaps = [g for i in report["items"] if i["rule"] != "identity" for g in i["gaps"]]
    assert gaps, f"{variant}: the variant removes something"
    for g in gaps:
        assert HOSPITAL in g["next_action"], g
        assert FOLDER not in g["next_action"], g
    text = render_text(report)
    assert f"{FOLDER} (media" in text  # the source is still listed under its own label


def test_skipped_files_are_in_the_gap_report(tmp_path: Path) -> None:
    report, _ = _case(tmp_path, "complete")
    (src,) = report["sources"]
    assert [(s["key"], s["reason"]) for s in src["skipped"]] == [
        ("file:portal-b/photo.jpg", "unsupported file type: JPEG image")]
    text = render_text(report)
    assert "SKIPPED AT PULL (1 item(s)" in text
    assert "portal-b/photo.jpg: unsupported file type: JPEG image" in text


def _cli(home: Path, *args: str, interval: str = "0.01") -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "AGGREGATOR_HOME": str(home), "AGGREGATOR_PROGRESS_INTERVAL": interval}
    env.pop("AGGREGATOR_DATABASE_URL", None)
    return subprocess.run([sys.executable, "-m", "aggregator.cli", *args], cwd=ROOT, capture_output=True,
                          text=True, env=env, timeout=300)


def test_pull_lists_skipped_files_and_prints_progress_lines_off_a_terminal(tmp_path: Path) -> None:
    from fixtures import generate_download

    info = generate_download(tmp_path / FOLDER, variant="complete")
    home = tmp_path / "home"
    for case in ("text", "json"):
        r = _cli(home, "case", "create", case, "--checklist", "oncology", "--patient-name", info.patient_name,
                 "--birth-date", info.birth_date, "--case-date", info.case_date.isoformat())
        assert r.returncode == 0, r.stderr
        assert _cli(home, "source", "add", case, "--media", str(tmp_path / FOLDER)).returncode == 0

    r = _cli(home, "pull", "text")
    assert r.returncode == 0, r.stderr
    assert "skipped portal-b/photo.jpg: unsupported file type: JPEG image" in r.stdout
    progress = [line for line in r.stderr.splitlines() if line.startswith("pull: ")]
    assert progress, f"no progress line on a non-terminal stderr: {r.stderr!r}"
    assert "\r" not in r.stderr

    r = _cli(home, "pull", "json", "--json")
    assert r.returncode == 0, r.stderr
    (summary,) = json.loads(r.stdout)
    assert summary["items"]["skipped"] == 1
    assert summary["skipped"] == [{"kind": "file", "key": "file:portal-b/photo.jpg",
                                   "reason": "unsupported file type: JPEG image"}]

    r = _cli(home, "check", "json", "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    jsonschema.validate(report, GAP_SCHEMA)
    assert report["sources"][0]["skipped"] == summary["skipped"]


def test_a_dicom_disc_alone_is_named_by_its_institution_name(tmp_path: Path) -> None:
    """Only the CD: no FHIR, no C-CDA; who to ask comes from the DICOM headers' InstitutionName."""
    from aggregator.checklist import stream
    from aggregator.pipeline import build_record
    from fixtures import generate_download

    info = generate_download(tmp_path / "dl", variant="complete")
    app = App.open(tmp_path / "home")
    create_case(app, "c", "oncology", patient_name=info.patient_name, birth_date=info.birth_date,
                case_date=info.case_date.isoformat())
    add_source(app, "c", media=str(tmp_path / "dl" / "cd"))
    (summary,) = pull_case(app, "c")
    assert summary.state == "done", summary.error
    record = build_record(app, "c").record
    try:
        performers = [s.get("performer") for e, _ in stream.entries(record)
                      if e["resource"]["resourceType"] == "ImagingStudy" for s in e["resource"]["series"]]
    finally:
        record.close()
    assert performers and all(p == [{"actor": {"type": "Organization", "display": HOSPITAL}}] for p in performers)
    report, _ = check_case(app, "c")
    gaps = [g for i in report["items"] if i["rule"] != "identity" for g in i["gaps"]]
    assert gaps  # no reports, no labs: plenty to ask for
    for g in gaps:
        assert g["next_action"].count(HOSPITAL) >= 1 and "from cd" not in g["next_action"], g
