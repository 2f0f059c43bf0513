"""The consultant's summary page as a physician reads it: dates, numbers, units, charts, identifiers,
thumbnails, and 'not received' never read as a finding (issue 16)."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file

from aggregator.blobs import BlobStore
from aggregator.model import CaseInfo, ImageRef, NormalizedRecord
from aggregator.package.dicomdir import place_images
from aggregator.package.pages.fmt import fmt_date, fmt_number, fmt_unit
from aggregator.package.pages.thumbnails import render_series
from aggregator.package.summary import render_summary

CASE = CaseInfo(id="c1", checklist="oncology", case_date="2024-03-01")
LAB = [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "laboratory"}]}]
VITAL = [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "vital-signs"}]}]
SOCIAL = [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category",
                       "code": "social-history"}]}]
HGB = {"coding": [{"system": "http://loinc.org", "code": "718-7", "display": "Hemoglobin"}]}
SVG = "{http://www.w3.org/2000/svg}"


def _hgb(n: int, when: str, value: float, interp: str | None = None) -> dict[str, Any]:
    obs: dict[str, Any] = {
        "resourceType": "Observation", "id": f"hgb{n}", "status": "final", "category": LAB, "code": HGB,
        "effectiveDateTime": when, "valueQuantity": {"value": value, "unit": "g/dL", "system": "http://unitsofmeasure.org",
                                                     "code": "g/dL"},
        "referenceRange": [{"low": {"value": 12.0, "unit": "g/dL"}, "high": {"value": 15.5, "unit": "g/dL"}}]}
    if interp:
        obs["interpretation"] = [{"coding": [{"code": interp}]}]
    return obs


HGB_VALUES = [  # (when, value, expected flag): a low value, a high one flagged by range only, two on one day
    ("2023-11-02T08:00:00+01:00", 10.9, "L"),
    ("2023-12-01", 13.0, ""),
    ("2024-01-15T07:30:00+01:00", 16.2, "H"),
    ("2024-01-15T18:10:00+01:00", 14.1, ""),
]


def _record(extra: list[dict[str, Any]] | None = None, *, patient: dict[str, Any] | None = None) -> NormalizedRecord:
    resources: list[dict[str, Any]] = [patient or {
        "resourceType": "Patient", "id": "p1", "name": [{"family": "Doe", "given": ["Jane"]}],
        "birthDate": "1970-01-01", "gender": "female",
        "identifier": [
            {"type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "MR"}]},
             "system": "urn:oid:1.2.3", "value": "MRN-555", "assigner": {"display": "General Hospital"}},
            {"type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "SS"}]},
             "system": "http://hl7.org/fhir/sid/us-ssn", "value": "999-12-3456"},
            {"type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "DL"}]},
             "system": "urn:oid:2.16.840.1.113883.4.3.25", "value": "S99912345"},
            {"type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "PPN"}]},
             "system": "http://hl7.org/fhir/sid/passport-USA", "value": "X12345678"},
        ]}]
    resources += [_hgb(i, w, v, "L" if f == "L" else None) for i, (w, v, f) in enumerate(HGB_VALUES)]
    resources += extra or []
    bundle = {"resourceType": "Bundle", "type": "collection",
              "entry": [{"fullUrl": f"urn:uuid:00000000-0000-4000-8000-{i:012d}", "resource": r}
                        for i, r in enumerate(resources)]}
    return NormalizedRecord(bundle=bundle, patient_ref="Patient/p1")


def _render(tmp_path: Path, record: NormalizedRecord, placed: Any = ()) -> str:
    return render_summary(CASE, record, {}, [], list(placed), BlobStore(tmp_path / "blobs"), "2024-03-01T00:00:00Z")


def _section(html: str, anchor: str, until: str) -> str:
    return html[html.index(f'id="{anchor}"'):html.index(f'id="{until}"')]


def test_numbers_dates_and_units_read_as_written() -> None:
    assert fmt_number(82.60002748167719) == "82.6"
    assert fmt_number(0.84) == "0.84" and fmt_number(254) == "254" and fmt_number(1.0) == "1.0"
    assert fmt_number(123456.78901234) == "123457"
    assert fmt_date("2020-08-24T00:52:41+00:00") == "24 Aug 2020"
    assert fmt_date("2020-08-24T00:52:41+00:00", with_time=True) == "24 Aug 2020 00:52"
    assert fmt_date("2020-08") == "Aug 2020"
    assert fmt_unit("mm[Hg]") == "mmHg" and fmt_unit(None, "10*3/uL") == "10³/µL" and fmt_unit("Cel") == "°C"
    assert fmt_unit("{beats}/min") == "beats/min" and fmt_unit("g/dL", "g/dL") == "g/dL"


def test_trend_chart_points_match_the_data(tmp_path: Path) -> None:
    html = _render(tmp_path, _record())
    labs = _section(html, "labs", "vitals")
    svg = re.search(r"<svg class=\"trend\".*?</svg>", labs, re.S)
    assert svg, "a test with four values has a trend chart"
    root = ET.fromstring(svg.group(0))
    points = [el for el in root.iter() if el.get("class", "").startswith("pt")]
    assert [(p.get("data-date"), p.get("data-value")) for p in points] == [(w, fmt_number(v)) for w, v, _ in HGB_VALUES]
    # abnormal points are drawn differently (a square, not only a colour) and carry their flag
    assert [p.get("data-flag") or "" for p in points] == [f for _, _, f in HGB_VALUES]
    assert [p.tag for p in points] == [SVG + ("rect" if f else "circle") for _, _, f in HGB_VALUES]

    def centre(p: ET.Element) -> tuple[float, float]:
        if p.tag == SVG + "circle":
            return float(p.get("cx", 0)), float(p.get("cy", 0))
        return float(p.get("x", 0)) + 4, float(p.get("y", 0)) + 4

    xy = [centre(p) for p in points]
    # x is proportional to time, y to value (inverted: SVG y grows downwards)
    times = [datetime.fromisoformat(w[:16]) if "T" in w else datetime.fromisoformat(w) for w, _, _ in HGB_VALUES]
    span = (times[-1] - times[0]).total_seconds()
    x0, x1 = xy[0][0], xy[-1][0]
    for (x, _), t in zip(xy, times, strict=True):
        assert x == pytest.approx(x0 + (x1 - x0) * (t - times[0]).total_seconds() / span, abs=0.2)
    values = [v for _, v, _ in HGB_VALUES]
    slope = (xy[1][1] - xy[0][1]) / (values[1] - values[0])
    for (_, y), v in zip(xy, values, strict=True):
        assert y == pytest.approx(xy[0][1] + slope * (v - values[0]), abs=0.2)
    band = root.find(f"{SVG}rect[@class='ref-band']")
    assert band is not None  # the reference band spans 12.0-15.5
    top, height = float(band.get("y", 0)), float(band.get("height", 0))
    assert top == pytest.approx(xy[0][1] + slope * (15.5 - values[0]), abs=0.2)
    assert top + height == pytest.approx(xy[0][1] + slope * (12.0 - values[0]), abs=0.2)
    # the table: latest value, its flag as arrow + letter, readable dates, times only on the day drawn twice
    assert '<td class="num">14.1</td>' in labs and "12.0\u201315.5" in labs
    assert "15 Jan 2024 18:10" in labs and "15 Jan 2024 07:30" in labs and "1 Dec 2023 <strong>" in labs
    assert "▲ H" in labs and "▼ L" in labs
    assert "2023-12-01T" not in labs and "+01:00" not in labs.replace('data-date="', "").split("<div")[-1]


def test_minimum_necessary_identifiers_and_no_empty_patient_row(tmp_path: Path) -> None:
    html = _render(tmp_path, _record())
    for secret in ("999-12-3456", "S99912345", "X12345678"):
        assert secret not in html
    assert "MRN MRN-555" in html and "issuer: General Hospital" in html
    assert "<tr><th></th>" not in html and "<th></th>" not in html


def test_no_allergy_data_is_not_a_finding(tmp_path: Path) -> None:
    html = _render(tmp_path, _record())
    assert "No allergy information was received" in html
    assert "No known allergies" not in html and "No allergies" not in html
    nka = {"resourceType": "AllergyIntolerance", "id": "a1", "patient": {"reference": "Patient/p1"},
           "code": {"coding": [{"system": "http://snomed.info/sct", "code": "716186003",
                                "display": "No known allergy"}]}, "recordedDate": "2024-01-02"}
    html = _render(tmp_path, _record([nka]))
    assert "No allergy information was received" not in html
    overview = _section(html, "overview", "gaps")
    assert "No known allergy" in overview and "2 Jan 2024" in overview


def test_vitals_and_social_history_have_their_own_sections(tmp_path: Path) -> None:
    bp = {"resourceType": "Observation", "id": "bp1", "status": "final", "category": VITAL,
          "code": {"coding": [{"system": "http://loinc.org", "code": "85354-9", "display": "Blood pressure panel"}]},
          "effectiveDateTime": "2020-08-24T00:52:41+00:00",
          "component": [
              {"code": {"coding": [{"system": "http://loinc.org", "code": "8480-6", "display": "Systolic"}]},
               "valueQuantity": {"value": 82.60002748167719, "unit": "mm[Hg]", "code": "mm[Hg]"}},
              {"code": {"coding": [{"system": "http://loinc.org", "code": "8462-4", "display": "Diastolic"}]},
               "valueQuantity": {"value": 61, "unit": "mm[Hg]", "code": "mm[Hg]"}}]}
    smoke = {"resourceType": "Observation", "id": "sm1", "status": "final", "category": SOCIAL,
             "code": {"coding": [{"system": "http://loinc.org", "code": "72166-2",
                                  "display": "Tobacco smoking status"}]},
             "effectiveDateTime": "2020-08-24", "valueCodeableConcept": {"text": "Never smoker"}}
    html = _render(tmp_path, _record([bp, smoke]))
    labs, vitals = _section(html, "labs", "vitals"), _section(html, "vitals", "social")
    social = _section(html, "social", "medications")
    assert "Systolic" in vitals and "82.6" in vitals and "mmHg" in vitals and "24 Aug 2020" in vitals
    assert "82.60002748167719" not in html and "mm[Hg]" not in html
    assert "Never smoker" in social and "Never smoker" not in labs and "Systolic" not in labs


def test_record_text_is_escaped_and_page_is_deterministic(tmp_path: Path) -> None:
    evil = {"resourceType": "Condition", "id": "c1", "code": {"text": "<script>alert(1)</script>"},
            "clinicalStatus": {"coding": [{"code": "active"}]}, "onsetDateTime": "2024-01-01"}
    record = _record([evil])
    html = _render(tmp_path, record)
    assert "<script" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert _render(tmp_path, record) == html


def test_case_question_comes_first_escaped_with_its_line_breaks(tmp_path: Path) -> None:
    question = "Is this <b>DCIS</b> or invasive & ER+?\nPlease review the 2024-01 biopsy."
    case = CaseInfo(id="c1", checklist="oncology", case_date="2024-03-01", question=question)
    html = render_summary(case, _record(), {"score": 50, "items": []}, [], [], BlobStore(tmp_path / "blobs"),
                          "2024-03-01T00:00:00Z")
    asked = html[html.index('id="case-question"'):]
    asked = asked[:asked.index("</blockquote>")]
    assert "Is this &lt;b&gt;DCIS&lt;/b&gt; or invasive &amp; ER+?<br>Please review the 2024-01 biopsy." in asked
    assert "<b>DCIS" not in html
    # the order of reading: the question, then the checklist status, then the overview
    main = html[html.index("<main"):]
    assert main.index('id="case-question"') < main.index("Record completeness") < main.index('id="overview"')
    assert "No free-text case question" not in html
    # without one the page says so, instead of inventing one
    assert "No free-text case question was entered" in _render(tmp_path, _record())


# --- thumbnails -------------------------------------------------------------------------------


def _testfile(name: str) -> Path:
    path = get_testdata_file(name)
    assert isinstance(path, str), name
    return Path(path)


def test_ct_thumbnail_matches_an_independent_windowing(tmp_path: Path) -> None:
    src = _testfile("CT_small.dcm")
    before = src.read_bytes()
    thumb = render_series([(1, "x", src)])
    assert thumb.png and "mediastinal" in thumb.window
    assert src.read_bytes() == before  # the DICOM is only read
    ds = pydicom.dcmread(src)
    hu = ds.pixel_array.astype(float) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    # reference: a plain per-pixel mediastinal window W400/L40, written out long-hand
    ref = np.zeros(hu.shape)
    for (r, c), v in np.ndenumerate(hu):
        ref[r, c] = 0 if v <= -160 else 255 if v >= 240 else (v + 160) / 400 * 255
    import io

    got = np.asarray(Image.open(io.BytesIO(thumb.png)).convert("L"), dtype=float)
    assert got.shape == ref.shape  # 128 x 128 is already thumbnail size
    assert np.abs(got - ref).mean() < 1.0 and np.abs(got - ref).max() <= 1.0
    assert render_series([(1, "x", src)]).png == thumb.png  # byte-identical across runs


@pytest.mark.parametrize("name", ["SC_rgb_jpeg_dcmtk.dcm", "JPEG2000.dcm", "MR_small.dcm"])
def test_compressed_and_other_modalities_render(name: str) -> None:
    thumb = render_series([(1, "x", _testfile(name))])
    assert thumb.png, thumb.reason
    img = Image.open(__import__("io").BytesIO(thumb.png))
    assert max(img.size) <= 200 and np.asarray(img).std() > 5  # a picture, not a flat square


def test_a_series_without_pixels_says_why(tmp_path: Path) -> None:
    ds = pydicom.dcmread(_testfile("CT_small.dcm"))
    del ds.PixelData
    path = tmp_path / "nopix.dcm"
    ds.save_as(path)
    thumb = render_series([(1, "x", path)])
    assert thumb.png is None and "no pixel data" in thumb.reason
    broken = tmp_path / "broken.dcm"
    raw = _testfile("CT_small.dcm").read_bytes()
    broken.write_bytes(raw[: len(raw) - 20000])
    thumb = render_series([(1, "y", broken)])
    assert thumb.png is None and thumb.reason


def test_every_series_on_the_page_has_a_thumbnail_or_a_reason(tmp_path: Path) -> None:
    blobs = BlobStore(tmp_path / "blobs")
    images = []
    for name in ("CT_small.dcm", "MR_small.dcm"):
        path = _testfile(name)
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        ref = blobs.put_file(path)
        images.append(ImageRef(str(ds.SOPInstanceUID), str(ds.SOPClassUID), str(ds.StudyInstanceUID),
                               str(ds.SeriesInstanceUID), str(ds.file_meta.TransferSyntaxUID), ref.sha256, ref.size,
                               str(ds.Modality)))
    placed = place_images(images, blobs)
    html = render_summary(CASE, _record(), {}, [], placed, blobs, "2024-03-01")
    imaging = _section(html, "imaging", "labs")
    assert imaging.count('<img src="data:image/png;base64,') == 2
    assert "images without an ImagingStudy" in imaging or "without an ImagingStudy" in imaging


def _note(rtype: str, rid: str, text: str) -> dict[str, Any]:
    import base64

    att = {"contentType": "text/plain", "data": base64.b64encode(text.encode()).decode()}
    res: dict[str, Any] = {"resourceType": rtype, "id": rid, "status": "final" if rtype == "DiagnosticReport"
                           else "current", "type": {"text": "History and physical note"},
                           "code": {"text": "History and physical note"}}
    if rtype == "DiagnosticReport":
        res.update(effectiveDateTime="2020-12-09T10:00:00Z", presentedForm=[att],
                   category=[{"coding": [{"system": "http://loinc.org", "code": "34117-2"}]}])
    else:
        res.update(date="2020-12-09T10:00:00Z", content=[{"attachment": att}])
    return res


def test_a_note_recorded_twice_is_printed_once_naming_both(tmp_path: Path) -> None:
    text = "# Chief Complaint\nNo complaints.\n"
    other = "# Chief Complaint\nCough for three weeks.\n"
    html = _render(tmp_path, _record([_note("DocumentReference", "n1", text), _note("DiagnosticReport", "n2", text),
                                      _note("DocumentReference", "n3", other)]))
    notes = html[html.index('id="notes"'):html.index('id="sources"')]
    assert notes.count("No complaints.") == 1 and notes.count("Cough for three weeks.") == 1
    assert "DocumentReference and DiagnosticReport" in notes or "DiagnosticReport and DocumentReference" in notes


def test_print_header_names_patient_birth_date_and_page(tmp_path: Path) -> None:
    html = _render(tmp_path, _record())
    page_rule = html[html.index("@page"):html.index("</style>")]
    assert "Jane Doe · born 1 Jan 1970" in page_rule and 'counter(page)' in page_rule
    assert "@media print" in html and "break-before:page" in html
