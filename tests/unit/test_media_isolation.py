"""One bad item never sinks a media pull (issue 12, part 1).

Every test feeds a real download made by the project's generator plus hostile files, through the
real connector into a real SQLite ledger and blob store, and checks that the valid files beside
the bad ones are all kept. The fuzz test mutates the project's own fixture files with Hypothesis;
``AGGREGATOR_FUZZ_EXAMPLES=2000`` runs it longer on demand.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aggregator.ledger import DONE, FAILED, LedgerEntry
from connectors.base import NullProgress, PatientRef
from connectors.media import MediaConfig, MediaConnector
from tests.support import make_sink

FUZZ_EXAMPLES = int(os.environ.get("AGGREGATOR_FUZZ_EXAMPLES", "40"))
CCDA = ('<?xml version="1.0" encoding="{enc}"?>\n'
        '<ClinicalDocument xmlns="urn:hl7-org:v3"><templateId root="2.16.840.1.113883.10.20.22.1.1"/>'
        '<code code="11506-3" codeSystem="2.16.840.1.113883.6.1" displayName="Progress note"/>'
        '<title>Progress note</title><effectiveTime value="20260301"/>'
        '<component><nonXMLBody><text>Seen today.</text></nonXMLBody></component></ClinicalDocument>')


@pytest.fixture(scope="module")
def download(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from fixtures.generate import generate_download

    root = tmp_path_factory.mktemp("iso") / "dl"
    generate_download(root)
    return root


def _pull(path: Path, store: Path, tmp_dir: Path | None = None) -> tuple[str, list[LedgerEntry]]:
    h = make_sink(store)
    conn = MediaConnector(MediaConfig(path=str(path), tmp_dir=str(tmp_dir) if tmp_dir else None))
    try:
        conn.pull(PatientRef(id=None), None, h.sink, NullProgress())
    finally:
        conn.close()
    rows = h.entries()
    h.db.dispose()
    state = "partial" if any(r.state == FAILED for r in rows) else "done"
    return state, rows


def _done_keys(rows: list[LedgerEntry]) -> set[str]:
    return {r.key for r in rows if r.state == DONE}


@pytest.fixture(scope="module")
def clean_keys(download: Path, tmp_path_factory: pytest.TempPathFactory) -> set[str]:
    _, rows = _pull(download, tmp_path_factory.mktemp("clean"))
    keys = _done_keys(rows)
    assert len(keys) > 20
    return keys


def _with(download: Path, tmp_path: Path, files: dict[str, bytes]) -> Path:
    work = tmp_path / "dl"
    shutil.copytree(download, work)
    for rel, data in files.items():
        p = work / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    return work


def test_unknown_xml_encoding_fails_that_file_only(download: Path, clean_keys: set[str], tmp_path: Path) -> None:
    # sorted first, so every valid file is read after it
    work = _with(download, tmp_path, {"0-evil.xml": CCDA.format(enc="EVIL-9").encode()})
    state, rows = _pull(work, tmp_path / "store")
    assert state == "partial"
    (bad,) = [r for r in rows if r.key == "file:0-evil.xml"]
    assert bad.state == FAILED and "encoding" in (bad.reason or "")
    assert clean_keys <= _done_keys(rows)


@pytest.mark.parametrize("codec", ["utf-16", "utf-16-le", "utf-16-be"])
def test_utf16_ccda_is_read_not_skipped_as_binary(tmp_path: Path, codec: str) -> None:
    folder = tmp_path / "dl"
    folder.mkdir()
    data = CCDA.format(enc="UTF-16").encode(codec)  # "utf-16" writes a BOM, the others none
    (folder / "note.xml").write_bytes(data)
    _, rows = _pull(folder, tmp_path / "store")
    docs = [r for r in rows if r.key.startswith("file:note.xml") and r.state == DONE]
    assert docs, [(r.key, r.state, r.reason) for r in rows]
    assert any(r.meta.get("resourceType") == "DocumentReference" or "#docref" in r.key for r in docs)


def test_an_unexpected_library_exception_fails_one_file(download: Path, clean_keys: set[str], tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Any exception type from a parser (here the XML library's, injected) stays with its file."""
    import defusedxml.ElementTree as SafeET

    real = SafeET.fromstring

    def flaky(data: Any, *a: Any, **k: Any) -> Any:
        if b"TRIGGER" in (data if isinstance(data, bytes) else b""):
            raise ZeroDivisionError("library bug")
        return real(data, *a, **k)

    monkeypatch.setattr(SafeET, "fromstring", flaky)
    work = _with(download, tmp_path, {"0-trigger.xml": CCDA.format(enc="UTF-8").replace("Seen", "TRIGGER").encode()})
    _, rows = _pull(work, tmp_path / "store")
    (bad,) = [r for r in rows if r.key == "file:0-trigger.xml"]
    assert bad.state == FAILED and bad.reason == "could not be read: unexpected ZeroDivisionError"
    assert "library bug" not in (bad.reason or "")
    assert clean_keys <= _done_keys(rows)


def _zip_with_hostile_members(src: Path, out: Path) -> None:
    with zipfile.ZipFile(out, "w") as z:
        for p in sorted(src.rglob("*")):
            if p.is_file():
                z.write(p, p.relative_to(src).as_posix())
        z.writestr("../../escape.txt", b"outside")
        z.writestr("dup/a", b"1")
        z.writestr("dup/a/b", b"2")  # 'a' is a file and a folder: path conflict


def _gap_reasons(home: Path, download: Path, info: Any, media: Path) -> dict[str, list[str]]:
    from aggregator.app import App
    from aggregator.cases import add_source, create_case
    from aggregator.jobs.pull import pull_case
    from aggregator.pipeline import check_case

    app = App.open(home)
    try:
        create_case(app, "c", "oncology", patient_name=info.patient_name, birth_date=info.birth_date,
                    case_date=info.case_date.isoformat())
        add_source(app, "c", media=str(media))
        pull_case(app, "c")
        report, _ = check_case(app, "c")
    finally:
        app.close()
    return {i["id"]: sorted(g["reason"] for g in i.get("gaps", [])) for i in report["items"]}


def test_rejected_zip_members_do_not_change_unrelated_gap_reasons(tmp_path: Path) -> None:
    from fixtures.generate import generate_download

    info = generate_download(tmp_path / "dl", variant="no-pathology-text")
    plain, hostile = tmp_path / "plain.zip", tmp_path / "hostile.zip"
    with zipfile.ZipFile(plain, "w") as z:
        for p in sorted((tmp_path / "dl").rglob("*")):
            if p.is_file():
                z.write(p, p.relative_to(tmp_path / "dl").as_posix())
    _zip_with_hostile_members(tmp_path / "dl", hostile)
    before = _gap_reasons(tmp_path / "h1", tmp_path / "dl", info, plain)
    after = _gap_reasons(tmp_path / "h2", tmp_path / "dl", info, hostile)
    assert any(before.values()), "the variant must leave a gap to compare"
    assert after == before
    assert not (tmp_path / "escape.txt").exists()


# --- fuzzing ----------------------------------------------------------------------------------


def _seed_corpus(download: Path) -> list[tuple[str, bytes]]:
    seeds = []
    for p in sorted(download.rglob("*")):
        if p.is_file() and p.stat().st_size < 200_000:
            seeds.append((p.name, p.read_bytes()))
    tmp = Path(tempfile.mkdtemp()) / "seed.zip"
    with zipfile.ZipFile(tmp, "w") as z:
        for name, data in seeds[:4]:
            z.writestr(name, data)
    seeds.append(("seed.zip", tmp.read_bytes()))
    shutil.rmtree(tmp.parent)
    return seeds


@st.composite
def _mutated(draw: st.DrawFn, seeds: list[tuple[str, bytes]]) -> tuple[str, bytes]:
    name, data = draw(st.sampled_from(seeds))
    buf = bytearray(data)
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.sampled_from(["flip", "truncate", "insert", "splice", "huge-length"]))
        pos = draw(st.integers(0, max(0, len(buf) - 1)))
        if op == "flip" and buf:
            buf[pos] ^= draw(st.integers(1, 255))
        elif op == "truncate":
            del buf[pos:]
        elif op == "insert":
            buf[pos:pos] = draw(st.binary(min_size=1, max_size=64))
        elif op == "splice":
            other = draw(st.sampled_from(seeds))[1]
            start = draw(st.integers(0, max(0, len(other) - 1)))
            buf[pos:pos] = other[start:start + draw(st.integers(1, 512))]
        elif op == "huge-length" and len(buf) > pos + 4:
            buf[pos:pos + 4] = b"\xff\xff\xff\x7f"
    exts = ["", ".xml", ".json", ".ndjson", ".dcm", ".pdf", ".zip", ".txt", os.path.splitext(name)[1]]
    ext = draw(st.sampled_from(exts))
    return f"0-fuzz{ext}", bytes(buf)


def _files_under(root: Path) -> set[str]:
    return {str(p) for p in root.rglob("*")}


@pytest.fixture(scope="module")
def fuzz_base(download: Path,
              tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, list[tuple[str, bytes]]]]:
    base = tmp_path_factory.mktemp("fuzz")
    valid = base / "valid"
    valid.mkdir()
    # two valid files beside every fuzzed one: a FHIR bundle and a DICOM instance
    shutil.copy(download / "portal-a" / "record.json", valid / "record.json")
    shutil.copy(download / "cd" / "DICOM" / "PT000000" / "ST000000" / "SE000000" / "IM000000", valid / "image.dcm")
    yield base, _seed_corpus(download)


def test_fuzzed_media_never_escapes_and_keeps_the_valid_files(fuzz_base: tuple[Path, list[tuple[str, bytes]]]) -> None:
    base, seeds = fuzz_base
    counter = iter(range(10**9))

    @settings(max_examples=FUZZ_EXAMPLES, deadline=None, derandomize=not os.environ.get("AGGREGATOR_FUZZ_EXAMPLES"),
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(_mutated(seeds))
    def one(item: tuple[str, bytes]) -> None:
        n = next(counter)
        case = base / f"case{n}"
        folder = case / "in"
        shutil.copytree(base / "valid", folder)
        name, data = item
        (folder / name).write_bytes(data)
        outside_before = _files_under(base) - _files_under(case)
        # no exception may escape the connector
        _, rows = _pull(folder, case / "store", tmp_dir=case / "tmp")
        done = _done_keys(rows)
        assert any(k.startswith("file:record.json") for k in done), "the valid bundle was lost"
        assert any(r.kind == "dicom" and r.state == DONE and r.meta.get("file") == "image.dcm" for r in rows), \
            "the valid image was lost"
        assert _files_under(base) - _files_under(case) == outside_before, "a file was written outside the case"
        shutil.rmtree(case)

    one()
