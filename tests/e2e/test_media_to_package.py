"""Issue 2 end to end through the installed CLI: a patient's download -> verified package."""

from __future__ import annotations

import json
import shutil
import subprocess
import zipfile
from pathlib import Path

import jsonschema
import pydicom
import pytest
from pydicom.fileset import FileSet

from tests.e2e.test_cli_errors import run

SCHEMAS = Path(__file__).resolve().parents[2] / "schemas"


@pytest.fixture(scope="module")
def download(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    from fixtures.generate import generate_download

    root = tmp_path_factory.mktemp("download")
    info = generate_download(root / "dl")
    return root / "dl", info


@pytest.fixture(scope="module")
def pulled(tmp_path_factory: pytest.TempPathFactory, download: tuple[Path, object]) -> Path:
    path, info = download
    home = tmp_path_factory.mktemp("home")
    r = run(home, "case", "create", "jd", "--checklist", "oncology", "--patient-name", info.patient_name,  # type: ignore[attr-defined]
            "--birth-date", info.birth_date, "--case-date", info.case_date.isoformat())  # type: ignore[attr-defined]
    assert r.returncode == 0, r.stderr
    r = run(home, "source", "add", "jd", "--media", str(path))
    assert r.returncode == 0, r.stderr
    r = run(home, "pull", "jd", "--json")
    assert r.returncode == 0, r.stderr + r.stdout
    return home


def test_pull_reports_every_item(pulled: Path) -> None:
    r = run(pulled, "case", "show", "jd", "--json")
    shown = json.loads(r.stdout)
    (src,) = shown["sources"]
    assert src["last_pull"]["state"] in ("done", "partial") and src["last_pull"]["method"] == "media"
    assert src["items"]["done"] > 20
    # the download holds one unsupported file: it is in the ledger as skipped, not dropped
    assert src["items"].get("skipped", 0) >= 1


def test_check_json_matches_the_gap_report_schema(pulled: Path) -> None:
    r = run(pulled, "check", "jd", "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    schema = json.loads((SCHEMAS / "gap-report.schema.json").read_text())
    jsonschema.validate(report, schema)
    assert {i["status"] for i in report["items"]} <= {"complete", "partial", "missing", "not-applicable"}
    r = run(pulled, "check", "jd")
    assert r.returncode == 0 and r.stdout.strip()


def test_package_verify_and_tamper(pulled: Path, tmp_path: Path) -> None:
    out = tmp_path / "pkg"
    r = run(pulled, "package", "jd", "--out", str(out), "--json")
    assert r.returncode == 0, r.stderr
    pkg = Path(json.loads(r.stdout)["package"])
    for name in ("INDEX.HTM", "README.TXT", "summary.html", "fhir/bundle.json", "fhir/gap-report.json",
                 "DICOMDIR", "IHE_XDM/SUBSET01/METADATA.XML", "manifest.json"):
        assert (pkg / name).is_file(), name
    assert any((pkg / "documents").iterdir())
    bundle = json.loads((pkg / "fhir/bundle.json").read_text())
    assert bundle["type"] == "document" and bundle["entry"][0]["resource"]["resourceType"] == "Composition"

    fs = FileSet(pydicom.dcmread(pkg / "DICOMDIR"))
    assert len(fs) > 0
    for inst in fs:
        assert all(len(part) <= 8 for part in Path(inst.path).relative_to(pkg).parts)
    if shutil.which("dcmdump"):
        d = subprocess.run(["dcmdump", str(pkg / "DICOMDIR")], capture_output=True, text=True, timeout=60)
        assert d.returncode == 0, d.stderr
        assert "DirectoryRecordType" in d.stdout

    r = run(pulled, "verify", str(pkg), "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["ok"] is True

    victim = next(p for p in sorted((pkg / "documents").iterdir()))
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    (pkg / "extra.txt").write_text("not in the manifest")
    (pkg / "README.TXT").unlink()
    r = run(pulled, "verify", str(pkg))
    assert r.returncode != 0
    for name in (victim.name, "extra.txt", "README.TXT"):
        assert name in r.stdout + r.stderr


def test_zip_package_verifies_and_is_deterministic(pulled: Path, tmp_path: Path) -> None:
    a = run(pulled, "package", "jd", "--out", str(tmp_path / "a.zip"), "--zip", "--json")
    b = run(pulled, "package", "jd", "--out", str(tmp_path / "b.zip"), "--zip", "--json")
    assert a.returncode == 0 and b.returncode == 0, a.stderr + b.stderr
    za, zb = Path(json.loads(a.stdout)["package"]), Path(json.loads(b.stdout)["package"])
    assert za.read_bytes() == zb.read_bytes()
    with zipfile.ZipFile(za) as z:
        assert "manifest.json" in {n.split("/", 1)[-1] for n in z.namelist()}
    r = run(pulled, "verify", str(za))
    assert r.returncode == 0, r.stdout + r.stderr


def test_repull_adds_no_duplicates(pulled: Path) -> None:
    before = json.loads(run(pulled, "case", "show", "jd", "--json").stdout)["sources"][0]["items"]
    r = run(pulled, "pull", "jd", "--json")
    assert r.returncode == 0, r.stderr
    after = json.loads(run(pulled, "case", "show", "jd", "--json").stdout)["sources"][0]["items"]
    assert after == before
