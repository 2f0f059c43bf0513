"""Issue 11 part 7: DICOM person names keep every component group; PatientIDs that an
archive would read as a pattern are refused at ``source add``.

The images are pydicom's bundled character-set test files (real ISO 2022 Japanese and Korean,
UTF-8 and GB18030 encodings), pulled and packaged through the CLI (in this interpreter).
"""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path
from typing import Any

import orjson
import pytest
from pydicom.data import get_charset_files

from aggregator.cli import main
from aggregator.normalize.identity import EN_REPRESENTATION, dicom_human_names, dicom_name
from connectors.dicom_identifier import patient_key_problem


def _charset_file(name: str) -> Path:
    found = get_charset_files(name)
    if not found:
        pytest.skip(f"pydicom's charset test file {name} is not installed")
    return Path(found[0])


def _names(patient: dict[str, Any]) -> list[tuple[str, str]]:
    out = []
    for n in patient.get("name") or []:
        code = next((e["valueCode"] for e in n.get("extension") or [] if e["url"] == EN_REPRESENTATION), "")
        out.append((code, n.get("text", "")))
    return out


def _package(tmp: Path, case: str, files: list[Path], typed: str | None,
             extra: tuple[Path, ...] = ()) -> tuple[dict[str, Any], str]:
    """create -> source add --media -> pull -> package through the CLI, in this interpreter
    (the ``home`` fixture points AGGREGATOR_HOME at a fresh folder)."""
    media = tmp / f"media-{case}"
    media.mkdir()
    for f in [*files, *extra]:
        shutil.copy(f, media / f.name)
    args = ["case", "create", case, "--checklist", "general", "--case-date", "2026-01-05"]
    assert main([*args, *(["--patient-name", typed] if typed else [])]) == 0
    assert main(["source", "add", case, "--media", str(media)]) == 0
    assert main(["pull", case]) == 0
    out = tmp / f"pkg-{case}"
    assert main(["package", case, "--out", str(out)]) == 0
    bundle = orjson.loads((out / "fhir/bundle.json").read_bytes())
    (patient,) = [e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "Patient"]
    return patient, (out / "summary.html").read_text(encoding="utf-8")


CASES = [
    # file, name typed at case create, expected (representation, text) in order
    ("chrH31.dcm", "Tarou Yamada", [("ABC", "Yamada Tarou"), ("IDE", "山田 太郎"), ("SYL", "やまだ たろう")]),
    ("chrH32.dcm", None, [("ABC", "ﾔﾏﾀﾞ ﾀﾛｳ"), ("IDE", "山田 太郎"), ("SYL", "やまだ たろう")]),
    ("chrI2.dcm", "Gildong Hong", [("ABC", "Hong Gildong"), ("IDE", "洪 吉洞"), ("SYL", "홍 길동")]),
    ("chrX1.dcm", "XiaoDong Wang", [("ABC", "Wang XiaoDong"), ("IDE", "王 小東")]),
    ("chrX2.dcm", "XiaoDong Wang", [("ABC", "Wang XiaoDong"), ("IDE", "王 小东")]),
]


@pytest.mark.parametrize(("name", "typed", "expected"), CASES, ids=[c[0] for c in CASES])
def test_every_component_group_reaches_the_bundle_and_summary(
        home: Path, tmp_path: Path, name: str, typed: str | None, expected: list[tuple[str, str]]) -> None:
    patient, summary = _package(tmp_path, "c1", [_charset_file(name)], typed)
    assert _names(patient) == expected
    primary = patient["name"][0]
    assert primary["family"] and primary["given"]  # the alphabetic group stays the structured primary name
    for code, text in expected[1:]:
        label = {"IDE": "ideographic", "SYL": "phonetic"}[code]
        assert f"{text} ({label})" in summary
    assert expected[0][1] in summary


def test_matching_uses_the_alphabetic_group_and_keeps_the_others(home: Path, tmp_path: Path) -> None:
    """A FHIR Patient and the DICOM image join one patient by the typed (alphabetic) name;
    the FHIR name stays the primary one and the image's ideographic and phonetic spellings are
    added, not dropped because its alphabetic spelling was already known."""
    fhir = tmp_path / "patient.json"
    fhir.write_bytes(orjson.dumps({"resourceType": "Patient", "id": "yt1", "birthDate": "1970-05-01",
                                   "name": [{"family": "Yamada", "given": ["Tarou"]}]}))
    patient, _ = _package(tmp_path, "c2", [_charset_file("chrH31.dcm")], "Yamada Tarou", extra=(fhir,))
    assert [n.get("family") for n in patient["name"]] == ["Yamada", "山田", "やまだ"]
    assert _names(patient)[1:] == [("IDE", "山田 太郎"), ("SYL", "やまだ たろう")]
    assert {"value": "H31EXAMPLE"}.items() <= next(
        i for i in patient["identifier"] if i["value"] == "H31EXAMPLE").items()


def test_human_names_of_each_group() -> None:
    assert dicom_human_names("Rivera^Alex") == [("ABC", {"text": "Rivera Alex", "family": "Rivera",
                                                         "given": ["Alex"]})]
    ((code, hn),) = dicom_human_names("Doe^Jane^Q^Dr^III")
    assert code == "ABC" and hn["given"] == ["Jane", "Q"] and hn["prefix"] == ["Dr"] and hn["suffix"] == ["III"]
    # no alphabetic group: the ideographic one is still kept, and marked as such
    ((code, hn),) = dicom_human_names("=山田^太郎")
    assert code == "IDE" and hn["extension"] == [{"url": EN_REPRESENTATION, "valueCode": "IDE"}]
    assert dicom_human_names("") == [] and dicom_human_names("^=^") == []
    # matching reads the alphabetic group only
    pn = dicom_name("Yamada^Tarou=山田^太郎=やまだ^たろう")
    assert pn is not None and pn.family == ("yamada",) and pn.given == ("tarou",)


REFUSED = [("AB*12", "wildcard"), ("AB?12", "wildcard"), ("AB\\12", "backslash"), ("X" * 65, "longer than 64"),
           ("   ", "empty"), ("AB\t12", "control character")]


def test_source_add_refuses_a_patient_id_that_would_be_a_pattern(home: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """In-process CLI (one interpreter for the 25 commands): exit 2, the rule named, the value not echoed."""
    assert main(["case", "create", "c1", "--checklist", "general"]) == 0
    assert main(["endpoint", "add", "pacs", "--kind", "dimse", "--host", "127.0.0.1", "--port", "104",
                 "--called-ae", "PACS"]) == 0
    assert main(["endpoint", "add", "web", "--kind", "dicomweb", "--url", "http://127.0.0.1:9/dicom-web"]) == 0
    capsys.readouterr()
    for patient_id, rule in REFUSED:
        for ep in ("pacs", "web"):
            assert main(["source", "add", "c1", "--endpoint", ep, "--patient-id", patient_id]) == 2
            err = capsys.readouterr().err
            assert "--patient-id cannot be a DICOM query key" in err and rule in err, err
            assert patient_id.strip() not in err or not patient_id.strip()  # the value is never echoed
            assert main(["source", "add", "c1", "--endpoint", ep, "--patient-id", "OK-1", "--issuer", patient_id,
                         "--json"]) == 2
            error = json.loads(capsys.readouterr().out)["error"]
            assert error["type"] == "UsageError" and "--issuer" in error["message"] and rule in error["message"]
    assert main(["source", "add", "c1", "--endpoint", "pacs", "--patient-id", "X" * 64, "--json"]) == 0
    capsys.readouterr()
    assert main(["case", "show", "c1", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["sources"]) == 1


def test_a_pull_refuses_a_stored_pattern_patient_id(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A source stored before ``source add`` checked (here: written to the database directly)
    is refused by both DICOM connectors before they send any query (nothing listens on the
    port: without the check the pull would fail on the connection instead)."""
    assert main(["case", "create", "c1", "--checklist", "general"]) == 0
    assert main(["endpoint", "add", "pacs", "--kind", "dimse", "--host", "127.0.0.1", "--port", "9",
                 "--called-ae", "PACS"]) == 0
    assert main(["endpoint", "add", "web", "--kind", "dicomweb", "--url", "http://127.0.0.1:9/dicom-web"]) == 0
    assert main(["source", "add", "c1", "--endpoint", "pacs", "--patient-id", "OK-1"]) == 0
    assert main(["source", "add", "c1", "--endpoint", "web", "--patient-id", "OK-2"]) == 0
    with sqlite3.connect(home / "aggregator.db") as db:
        db.execute("UPDATE sources SET patient_id = 'AB*' || id")
    capsys.readouterr()
    with pytest.raises(SystemExit) as stopped:
        main(["pull", "c1", "--json"])
    assert stopped.value.code == 1
    rows = json.loads(capsys.readouterr().out)
    assert [r["state"] for r in rows] == ["failed", "failed"]
    for r in rows:
        assert r["error"].startswith("the source's PatientID cannot be a DICOM query key: it contains a wildcard")
        assert "AB*" not in r["error"]
    assert patient_key_problem("OK", "ISS\\UER") == ("the source's IssuerOfPatientID cannot be a DICOM query key: "
                                                   "it contains a backslash, which DICOM treats as a separator "
                                                   "between several values")
    assert patient_key_problem("OK-1", None) is None and patient_key_problem("OK-1", "") is None
    assert patient_key_problem("É" * 64, "2.16.840.1.113883.3.1") is None  # 64 characters, not bytes
