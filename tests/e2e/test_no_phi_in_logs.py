"""Protected health information never reaches logs, terminal errors or the ledger's reasons."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from aggregator.app import App
from aggregator.ledger import entries_for_case
from aggregator.pipeline import build_record
from tests.e2e.test_cli_errors import EXE


def test_debug_logs_and_ledger_carry_no_phi(tmp_path: Path) -> None:
    from fixtures.generate import generate_download

    info = generate_download(tmp_path / "dl", variant="identity-conflict")
    home = tmp_path / "home"
    scratch = tmp_path / "tmpdir"
    scratch.mkdir()
    env = {**os.environ, "AGGREGATOR_HOME": str(home), "AGGREGATOR_LOG_LEVEL": "DEBUG", "TMPDIR": str(scratch)}
    env.pop("AGGREGATOR_DATABASE_URL", None)

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(EXE), *args], capture_output=True, text=True, env=env, timeout=300)

    steps = [
        run("case", "create", "c", "--checklist", "oncology", "--patient-name", info.patient_name,
            "--birth-date", info.birth_date, "--case-date", info.case_date.isoformat()),
        run("source", "add", "c", "--media", str(tmp_path / "dl")),
        run("pull", "c"),
        run("check", "c", "--json"),
        run("package", "c", "--out", str(tmp_path / "pkg")),
    ]
    for r in steps:
        assert r.returncode == 0, r.stderr
    stderr = "\n".join(r.stderr for r in steps)
    words = [w for w in info.patient_name.replace(",", " ").replace("^", " ").split() if len(w) > 2]
    assert words
    for secret in [*words, info.birth_date, info.mrn]:
        assert secret not in stderr, "patient data in the log output"

    # scratch copies of the record (spooled resources, the bundle) stay inside the case's folder
    # and are gone once each command ends: nothing is left in the shared temporary directory
    assert list(scratch.iterdir()) == []
    leftovers = [p for p in home.rglob("aggregator-*") if "tmp" in p.parts]
    assert leftovers == []

    app = App.open(home)
    record = build_record(app, "c").record
    try:
        assert record.bundle_path.is_relative_to(app.case_dir("c"))
    finally:
        record.close()
    assert not record.bundle_path.exists()
    for e in entries_for_case(app.db, "c"):
        blob = json.dumps({"reason": e.reason, "meta": e.meta, "key": e.key})
        for secret in [*words, info.birth_date, info.mrn]:
            assert secret not in blob, f"patient data in the ledger row {e.kind}"
