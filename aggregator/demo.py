"""`aggregator demo`: a whole case on the built-in synthetic patient, end to end.

It generates a patient's portal downloads with the deterministic fixtures generator, opens a
case with the oncology checklist, adds the download as a media source, pulls, checks, writes
the consultant package and verifies it. Re-running replaces the previous demo case.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from aggregator.app import App
from aggregator.cases import add_source, create_case, delete_case
from aggregator.errors import NotFound
from aggregator.jobs.pull import pull_case
from aggregator.pipeline import package_case

DEMO_CASE = "demo"


def run_demo(app: App, out: Path | None = None, *, progress: bool = True) -> dict[str, Any]:
    from aggregator.package import verify_package
    from aggregator.progress import ProgressBoard
    from fixtures.generate import generate_download

    root = app.settings.home / "demo"
    download = root / "download"
    if download.exists():
        shutil.rmtree(download)
    info = generate_download(download)
    try:
        delete_case(app, DEMO_CASE)
    except NotFound:
        pass
    create_case(app, DEMO_CASE, "oncology", patient_name=info.patient_name, birth_date=info.birth_date,
                case_date=info.case_date.isoformat())
    add_source(app, DEMO_CASE, media=str(download))
    board = ProgressBoard(enabled=None if progress else False)
    try:
        summaries = pull_case(app, DEMO_CASE, progress_for=board.source)
    finally:
        board.close()
    target = out or root / "package"
    if target.exists():
        shutil.rmtree(target)
    path, report = package_case(app, DEMO_CASE, target)
    problems = verify_package(path)
    gaps = [i for i in report.get("items", []) if i.get("status") in ("missing", "partial")]
    return {
        "case": DEMO_CASE,
        "checklist": "oncology",
        "sources": len(summaries),
        "pulls": [s.to_dict() for s in summaries],
        "completeness": float(report.get("score") or 0.0),
        "gaps": len(gaps),
        "package": str(path),
        "verified": not problems,
        "problems": [{"file": f, "problem": p} for f, p in problems],
    }
