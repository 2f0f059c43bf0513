"""``aggregator reconcile``: per source and type, pulled = kept + merged + quarantined, exactly.

On every generated record (each variant of the oncology, cardiology and surgery patients), on
every FHIR collection under ``../shared/data`` (skipped when absent), and through the CLI in text
and ``--json``. ``kept`` is counted from the normalized record, not derived from the others, so a
line that adds up means every pulled item has exactly one fate.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from aggregator.app import App
from aggregator.cases import add_source, create_case
from aggregator.cli import main
from aggregator.jobs.pull import pull_case
from aggregator.ledger import DONE, entries_for_case
from aggregator.reconcile import reconcile
from fixtures import VARIANTS, generate_download
from fixtures.cardiology import VARIANTS as CARDIO_VARIANTS
from fixtures.cardiology import generate_cardiology_download
from fixtures.surgery import VARIANTS as SURGERY_VARIANTS
from fixtures.surgery import generate_surgery_download

GENERATORS: dict[str, tuple[Callable[..., Any], dict[str, str]]] = {
    "oncology": (generate_download, VARIANTS),
    "cardiology": (generate_cardiology_download, CARDIO_VARIANTS),
    "surgery": (generate_surgery_download, SURGERY_VARIANTS),
}
RECORDS = [(patient, variant) for patient, (_, variants) in GENERATORS.items() for variant in variants]
COUNTED = ("resource", "dicom", "binary")


def _case(tmp_path: Path, folders: list[Path], home: str = "home") -> App:
    app = App.open(tmp_path / home)
    create_case(app, "c", "general", case_date="2026-10-01")
    for folder in folders:
        add_source(app, "c", media=str(folder))
    for summary in pull_case(app, "c"):
        assert summary.state == "done", summary.error
    return app


def assert_adds_up(app: App, data: dict[str, Any]) -> None:
    assert data["balanced"], json.dumps(data, indent=1)[:4000]
    pulled = sum(1 for e in entries_for_case(app.db, "c", state=DONE) if e.kind in COUNTED)
    assert pulled > 0 and data["totals"]["pulled"] == pulled
    tot = data["totals"]
    assert tot["pulled"] == tot["kept"] + tot["merged"] + tot["quarantined"]
    for src in data["sources"]:
        assert src["balanced"]
        for t in src["types"]:
            assert t["pulled"] == t["kept"] + t["merged"] + t["quarantined"], (src["id"], t["type"])
            assert len(t["merges"]) == t["merged"] and sum(t["reasons"].values()) == t["quarantined"]
            assert all(m["into"].count("/") == 1 and m["item"] for m in t["merges"])
    # the ledger says the same: one quarantine row per merged or quarantined item
    rows = [e for e in entries_for_case(app.db, "c") if e.kind == "quarantine"]
    assert len(rows) == tot["merged"] + tot["quarantined"]
    merged_rows = [e for e in rows if (e.reason or "").startswith("merged into ")]
    assert len(merged_rows) == tot["merged"]
    for e in merged_rows:  # the ledger names the survivor, in the reason and in the meta
        into = e.meta.get("merged_into")
        assert into and (e.reason == f"merged into {into}" or str(e.reason).startswith(f"merged into {into} "))


@pytest.mark.parametrize(("patient", "variant"), RECORDS)
def test_every_generated_record_adds_up(tmp_path: Path, patient: str, variant: str) -> None:
    generate, _ = GENERATORS[patient]
    generate(tmp_path / "dl", variant=variant)
    app = _case(tmp_path, [tmp_path / "dl"])
    data = reconcile(app, "c")
    assert_adds_up(app, data)
    types = {t["type"] for s in data["sources"] for t in s["types"]}
    assert "Patient" in types and "Observation" in types
    if variant == "second-patient":  # the other patient's items are quarantined, and counted
        assert data["totals"]["quarantined"] > 0
        assert any(t["quarantined"] for s in data["sources"] for t in s["types"] if t["type"] == "DICOM instance")


def test_two_copies_of_one_download_merge_and_add_up(tmp_path: Path) -> None:
    """The same download added twice: every resource of the second copy is merged into the
    first's, every DICOM instance too, and the counts still add up per source."""
    generate_download(tmp_path / "a", variant="complete")
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    app = _case(tmp_path, [tmp_path / "a", tmp_path / "b"])
    data = reconcile(app, "c")
    assert_adds_up(app, data)
    first, second = data["sources"]
    assert sum(t["merged"] for t in second["types"] if t["kind"] == "resource") > 0
    obs = next(t for t in second["types"] if t["type"] == "Observation")
    assert obs["merged"] == obs["pulled"] and obs["kept"] == 0
    dicom = next(t for t in second["types"] if t["type"] == "DICOM instance")
    assert dicom["merged"] == dicom["pulled"]
    kept_obs = next(t for t in first["types"] if t["type"] == "Observation")["kept"]
    assert kept_obs == obs["pulled"]


def test_cli_text_and_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    generate_download(tmp_path / "dl", variant="second-patient")
    _case(tmp_path, [tmp_path / "dl"])
    home = str(tmp_path / "home")
    assert main(["--home", home, "reconcile", "c", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["case"] == "c" and data["balanced"] is True
    assert main(["--home", home, "reconcile", "c"]) == 0
    text = capsys.readouterr().out
    assert "every pulled item accounted for" in text
    for src in data["sources"]:
        for t in src["types"]:
            assert (f"  {t['type']}: pulled {t['pulled']} = kept {t['kept']} + merged {t['merged']} "
                    f"+ quarantined {t['quarantined']}") in text
    tot = data["totals"]
    assert f"total: pulled {tot['pulled']} = kept {tot['kept']} + merged {tot['merged']}" in text


def test_unknown_case_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--home", str(tmp_path / "home"), "reconcile", "nope"]) == 3


def _shared_groups() -> list[str]:
    from tests.conftest import SHARED

    root = SHARED / "data" / "fhir"
    return sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else ["(absent)"]


@pytest.mark.parametrize("group", _shared_groups())
def test_every_shared_fhir_record_adds_up(shared_data: Path, tmp_path: Path, group: str) -> None:
    """Each collection of public FHIR records as one download (several patients: the others are
    quarantined as another patient, and that must add up too)."""
    folder = shared_data / "fhir" / group
    if not folder.is_dir():
        pytest.skip(f"no FHIR records under {shared_data / 'fhir'}")
    app = _case(tmp_path, [folder])
    assert_adds_up(app, reconcile(app, "c"))
