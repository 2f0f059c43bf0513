"""The consultant's pages open in a real headless Chromium, offline, with their content."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from aggregator.app import App
from aggregator.demo import run_demo

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    # no name resolves: a page that needed the network would render incomplete
    "--host-resolver-rules=MAP * ~NOTFOUND",
]


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not CHROMIUM:
        pytest.skip("Chromium is not installed (Debian package chromium)")
    home = tmp_path_factory.mktemp("home")
    app = App.open(home)
    result = run_demo(app, progress=False)
    assert result["verified"]
    return Path(result["package"])


def _chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    assert CHROMIUM
    return subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={tmp_path / 'profile'}", *args],
                          capture_output=True, text=True, timeout=120)


def test_summary_renders_with_the_record(package: Path, tmp_path: Path) -> None:
    r = _chromium(tmp_path, "--dump-dom", (package / "summary.html").as_uri())
    assert r.returncode == 0, r.stderr[-2000:]
    dom = r.stdout
    for heading in ("Patient", "Pathology", "Labs", "Medications", "Sources"):
        assert heading in dom
    # the pathology report's full text is on the page, not only a link to it
    assert "FINAL DIAGNOSIS" in dom
    shot = tmp_path / "summary.png"
    r = _chromium(tmp_path, "--window-size=1200,2000", f"--screenshot={shot}", (package / "summary.html").as_uri())
    assert r.returncode == 0 and shot.stat().st_size > 10_000


def test_index_links_to_the_summary_and_readme(package: Path, tmp_path: Path) -> None:
    r = _chromium(tmp_path, "--dump-dom", (package / "INDEX.HTM").as_uri())
    assert r.returncode == 0
    assert "summary.html" in r.stdout
