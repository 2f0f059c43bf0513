"""The consultant's pages open in a real headless Chromium, offline, with their content.

Two ways: the Chromium command line (dump the DOM, take a screenshot), and Playwright driving
Debian's Chromium (never a downloaded browser) on every fixture patient and on shared records:
no console error, no request leaving the package, a screenshot and a printed PDF saved in the
test's tmp dir, and axe-core's accessibility checks (axe-core fetched with npm into the tmp dir).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from aggregator.app import App
from aggregator.cases import add_source, create_case
from aggregator.demo import run_demo
from aggregator.jobs.pull import pull_case
from aggregator.pipeline import package_case

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


# --- Playwright: every fixture patient and shared records ---------------------------------------


CHROMIUM_BIN = Path("/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--no-first-run"]
#: axe rules the page must pass; only 'serious' and 'critical' impacts fail the test
FAILING_IMPACTS = {"serious", "critical"}
SHARED_RECORDS = {
    "notes": "fhir/synthea-r4-bundles-with-notes/Cecelia952_Romaguera67_f1731e33-dc55-4ee8-72d7-cece2e49bedd.json",
    "mcode": "fhir/mcode-examples/Bundle-mcode-patient-bundle-jenny-m.json",
}


def _generators() -> dict[str, tuple[Callable[..., Any], str]]:
    from fixtures.cardiology import generate_cardiology_download
    from fixtures.generate import generate_download
    from fixtures.surgery import generate_surgery_download

    return {"oncology": (generate_download, "oncology"), "cardiology": (generate_cardiology_download, "cardiology"),
            "surgery": (generate_surgery_download, "surgery")}


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not CHROMIUM_BIN.exists():
        pytest.skip("Chromium is not installed at /usr/bin/chromium (Debian package chromium)")
    playwright_api = pytest.importorskip("playwright.sync_api")
    with playwright_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=str(CHROMIUM_BIN), args=ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture(scope="module")
def axe_source(tmp_path_factory: pytest.TempPathFactory) -> str | None:
    """axe-core's script, fetched with npm into the test's tmp dir (None when npm cannot fetch it)."""
    npm = shutil.which("npm")
    if not npm:
        return None
    where = tmp_path_factory.mktemp("axe")
    r = subprocess.run([npm, "pack", "axe-core@4", "--silent"], cwd=where, capture_output=True, text=True,
                       timeout=120)
    tgz = sorted(where.glob("axe-core-*.tgz"))
    if r.returncode != 0 or not tgz:
        return None
    with tarfile.open(tgz[0]) as t:
        member = t.extractfile("package/axe.min.js")
        return member.read().decode("utf-8") if member else None


def _package(tmp_path: Path, download: Path, checklist: str, **case: Any) -> Path:
    app = App.open(tmp_path / "home")
    create_case(app, "c", checklist, **case)
    add_source(app, "c", media=str(download))
    (summary,) = pull_case(app, "c")
    assert summary.state == "done", summary.error
    path, _ = package_case(app, "c", tmp_path / "pkg")
    return path


def _open(browser: Any, page_file: Path, shot: Path, axe: str | None) -> dict[str, Any]:
    context = browser.new_context(viewport={"width": 1280, "height": 900}, java_script_enabled=True)
    page = context.new_page()
    errors: list[str] = []
    requests: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("request", lambda r: requests.append(r.url) if not r.url.startswith(("file:", "data:")) else None)
    # anything that would leave the machine is refused, and recorded above
    page.route("**/*", lambda route: route.continue_() if route.request.url.startswith(("file:", "data:"))
               else route.abort())
    page.goto(page_file.as_uri(), wait_until="load")
    page.screenshot(path=str(shot), full_page=True)
    page.emulate_media(media="print")
    pdf = page.pdf(format="A4", display_header_footer=False, print_background=True)
    page.emulate_media(media="screen")
    result: dict[str, Any] = {"errors": errors, "requests": requests, "pdf": pdf, "violations": None,
                              "images": page.eval_on_selector_all(
                                  "img", "els => els.map(e => [e.naturalWidth, e.complete])"),
                              "text": page.inner_text("body")}
    if axe:
        page.add_script_tag(content=axe)
        result["violations"] = page.evaluate(
            "async () => (await axe.run(document, {resultTypes: ['violations']})).violations"
            ".map(v => ({id: v.id, impact: v.impact, n: v.nodes.length}))")
    context.close()
    return result


def _check(result: dict[str, Any], shot: Path) -> None:
    assert result["errors"] == [], result["errors"]
    assert result["requests"] == [], result["requests"]
    assert shot.stat().st_size > 20_000
    assert result["pdf"].count(b"/Type /Page") - result["pdf"].count(b"/Type /Pages") >= 2  # printed, paginated
    for width, complete in result["images"]:
        assert complete and width > 0  # every thumbnail decodes
    if result["violations"] is not None:
        bad = [v for v in result["violations"] if v["impact"] in FAILING_IMPACTS]
        assert bad == [], json.dumps(bad)


@pytest.mark.parametrize("patient", ["oncology", "cardiology", "surgery"])
def test_fixture_patient_summary_in_chromium(browser: Any, axe_source: str | None, tmp_path: Path,
                                             patient: str) -> None:
    generate, checklist = _generators()[patient]
    info = generate(tmp_path / "dl")
    pkg = _package(tmp_path, tmp_path / "dl", checklist, patient_name=info.patient_name,
                   birth_date=info.birth_date, case_date=info.case_date.isoformat())
    shot = tmp_path / f"summary-{patient}.png"
    result = _open(browser, pkg / "summary.html", shot, axe_source)
    _check(result, shot)
    text = result["text"]
    assert "Overview" in text and "Key dates" in text and "Laboratory results" in text
    # every series in the package shows a thumbnail, or says why it has none
    n_series = len({p.parent for p in (pkg / "DICOM").rglob("*") if p.is_file()}) if (pkg / "DICOM").exists() else 0
    assert len(result["images"]) + text.count("No thumbnail:") == n_series
    assert "No allergies in the record" not in text
    html = (pkg / "summary.html").read_text()
    assert "<script" not in html.lower()


@pytest.mark.parametrize("name", sorted(SHARED_RECORDS))
def test_shared_record_summary_in_chromium(browser: Any, axe_source: str | None, shared_data: Path,
                                           tmp_path: Path, name: str) -> None:
    src = shared_data / SHARED_RECORDS[name]
    if not src.is_file():
        pytest.skip(f"{SHARED_RECORDS[name]} is not in the shared data")
    dl = tmp_path / "dl"
    dl.mkdir()
    shutil.copy(src, dl / src.name)
    pkg = _package(tmp_path, dl, "general", case_date="2026-10-01")
    shot = tmp_path / f"summary-{name}.png"
    result = _open(browser, pkg / "summary.html", shot, axe_source)
    _check(result, shot)
    html = (pkg / "summary.html").read_text()
    # no unrounded computed float, no full timestamp in the table cells
    assert "82.60002748167719" not in html
    assert not re.search(r"<td[^>]*>\d{4}-\d{2}-\d{2}T\d{2}:\d{2}", html)
