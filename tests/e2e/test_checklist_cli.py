"""Checklist commands and `check --strict` through the installed CLI."""

from __future__ import annotations

import json
from pathlib import Path

from tests.e2e.test_cli_errors import run


def test_checklist_list_show_validate(tmp_path: Path) -> None:
    r = run(tmp_path, "checklist", "list", "--json")
    assert set(json.loads(r.stdout)) >= {"general", "oncology", "surgery", "cardiology"}
    r = run(tmp_path, "checklist", "show", "oncology", "--json")
    shown = json.loads(r.stdout)
    assert any(i["id"] == "pathology-report" for i in shown["items"])
    assert "pathology" in run(tmp_path, "checklist", "show", "oncology").stdout.lower()

    good = tmp_path / "mine.yaml"
    good.write_text((Path(__file__).resolve().parents[2] / "schemas/checklists/general.yaml").read_text())
    r = run(tmp_path, "checklist", "validate", str(good), "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["valid"] is True

    bad = tmp_path / "bad.yaml"
    bad.write_text("name: broken\nitems:\n  - id: x\n    rule: nonsense\n")
    r = run(tmp_path, "checklist", "validate", str(bad))
    assert r.returncode == 1 and "invalid" in r.stdout

    # a custom checklist by path is accepted by `case create`; an invalid one is refused
    assert run(tmp_path, "case", "create", "c1", "--checklist", str(good)).returncode == 0
    assert run(tmp_path, "case", "create", "c2", "--checklist", str(bad)).returncode != 0


def test_check_strict_exits_non_zero_only_when_gaps_remain(tmp_path: Path) -> None:
    from fixtures import generate_download

    for variant, expected in (("complete", 0), ("no-images", 4)):
        home = tmp_path / variant
        info = generate_download(home / "dl", variant=variant)
        assert run(home, "case", "create", "c", "--checklist", "oncology", "--patient-name", info.patient_name,
                   "--birth-date", info.birth_date, "--case-date", info.case_date.isoformat()).returncode == 0
        assert run(home, "source", "add", "c", "--media", str(home / "dl")).returncode == 0
        assert run(home, "pull", "c").returncode == 0
        assert run(home, "check", "c").returncode == 0  # without --strict a gap is not an error
        assert run(home, "check", "c", "--strict").returncode == expected
