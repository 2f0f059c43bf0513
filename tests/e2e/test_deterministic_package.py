"""Issue 12 part 5: the same inputs give a byte-identical package on any machine.

Two fresh homes at different paths (so the case folders differ too), each with its own copy of
the same generated download, run with a different TZ and umask, at different moments: case
create, source add --media, pull, check, package (folder and zip). Every file of the two
packages, and the two zips, must be the same bytes: ids come from content and source, times
from the data or the case, never from a clock.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from aggregator.normalize.facts import instant
from tests.e2e.test_cli_errors import EXE


def _build(root: Path, download: Path, *, tz: str, umask: int, check_first: bool = True) -> tuple[Path, Path, str]:
    """One machine's run; returns the package folder, the zip and the pull's real start time.

    With ``check_first`` the package is written from the record ``check`` kept; without, from
    a record computed by ``package`` itself: both paths must give the same bytes."""
    home = root / "home"
    inputs = root / "inputs"
    inputs.mkdir(parents=True)
    media = inputs / download.name  # same file name: the media source's label is its name
    shutil.copy(download, media)
    env = {**os.environ, "AGGREGATOR_HOME": str(home), "TZ": tz}
    env.pop("AGGREGATOR_DATABASE_URL", None)

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        r = subprocess.run([str(EXE), *args], capture_output=True, text=True, env=env, umask=umask, timeout=300)
        assert r.returncode == 0, r.stderr + r.stdout
        return r

    run("case", "create", "jd", "--checklist", "oncology", "--patient-name", "Alex Rivera",
        "--birth-date", "1971-03-14", "--case-date", "2026-10-01")
    run("source", "add", "jd", "--media", str(media))
    run("pull", "jd")
    if check_first:
        run("check", "jd", "--json")
    pkg, zipped = root / "out" / "pkg", root / "out" / "pkg.zip"
    run("package", "jd", "--out", str(pkg))
    run("package", "jd", "--out", str(zipped), "--zip")
    shown = json.loads(run("case", "show", "jd", "--json").stdout)
    return pkg, zipped, shown["sources"][0]["last_pull"]["started_at"]


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.skipif(not EXE.exists(), reason=f"the console script is not installed next to {sys.executable}")
def test_two_homes_build_byte_identical_packages(tmp_path: Path) -> None:
    from fixtures.generate import generate_zip

    download = tmp_path / "download.zip"
    generate_zip(download)
    pkg_a, zip_a, pulled_a = _build(tmp_path / "machine-a", download, tz="UTC", umask=0o022)
    time.sleep(1.1)  # the second pull's clock differs by more than any rounding
    pkg_b, zip_b, pulled_b = _build(tmp_path / "elsewhere" / "machine-b", download,
                                    tz="America/Los_Angeles", umask=0o077, check_first=False)
    assert pulled_a != pulled_b  # the ledger keeps real times; the packages must not show them

    files_a, files_b = _files(pkg_a), _files(pkg_b)
    assert sorted(files_a) == sorted(files_b)
    for name in ("DICOMDIR", "IHE_XDM/SUBSET01/METADATA.XML", "fhir/bundle.json", "fhir/gap-report.json",
                 "summary.html", "manifest.json", "README.TXT", "INDEX.HTM"):
        assert name in files_a
    differing = [name for name in files_a if files_a[name] != files_b[name]]
    assert differing == []
    assert zip_a.read_bytes() == zip_b.read_bytes()
    # the pull's clock time is nowhere in the package (the data time stands for it)
    day = pulled_a[:10]
    assert day != "2026-10-01"
    for name in ("fhir/bundle.json", "fhir/gap-report.json", "summary.html", "manifest.json"):
        assert pulled_a[:16].encode() not in files_a[name], name


def test_a_time_without_a_zone_is_read_as_utc_on_every_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    """meta.lastUpdated without a zone orders resources and dates the source's data: it must
    not move with the machine's TZ."""
    want = datetime(2026, 9, 30, 12, 0, tzinfo=UTC).timestamp()
    try:
        for tz in ("UTC", "America/Los_Angeles", "Asia/Tokyo"):
            monkeypatch.setenv("TZ", tz)
            time.tzset()
            assert instant("2026-09-30T12:00:00") == want
            assert instant("2026-09-30T14:00:00+02:00") == want
    finally:
        monkeypatch.undo()
        time.tzset()
