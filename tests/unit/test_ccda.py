"""C-CDA header extraction on the real HL7 and vendor samples, plus hostile XML."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from fhir.resources.R4B.documentreference import DocumentReference

from connectors import ccda


def _samples(shared_data: Path) -> list[Path]:
    files = sorted((shared_data / "ccda").rglob("*.xml"))
    assert files, "no C-CDA samples found"
    return files


def test_every_shared_sample_gives_a_valid_document_reference(shared_data: Path) -> None:
    for path in _samples(shared_data):
        data = path.read_bytes()
        assert ccda.looks_like_ccda(data[:8192]), path.name
        h = ccda.read_header(data)
        assert h.code and h.code_system == ccda.LOINC, path.name
        assert h.title, path.name
        assert h.effective and h.effective[:4].isdigit(), path.name
        assert h.authors, path.name
        assert h.structured, path.name
        fields = ccda.document_reference_fields(h)
        fmt = ccda.format_coding(h)
        assert fmt is not None
        doc = {"resourceType": "DocumentReference", **fields,
               "content": [{"attachment": {"contentType": "application/xml", "url": "file:x.xml"}, "format": fmt}]}
        DocumentReference.model_validate(doc)  # R4B: raises when anything is malformed
        assert fields["type"]["coding"][0]["code"] == h.code
        assert fields["description"] == h.title
        assert [a["display"] for a in fields["author"]] == h.authors


def test_header_values_of_a_known_document(shared_data: Path) -> None:
    """Values read from the file itself: the LOINC code, title and time as written in the XML."""
    path = shared_data / "ccda/hl7-c-cda-examples/Documents/Consultation Note/Consultation_Note.xml"
    if not path.exists():
        pytest.skip("Consultation_Note.xml not in the shared data")
    data = path.read_bytes()
    h = ccda.read_header(data)
    root = ccda.parse_xml(data)
    code = root.find(f"{{{ccda.NS}}}code")
    assert code is not None
    assert h.code == code.get("code") and h.display == code.get("displayName")
    eff = root.find(f"{{{ccda.NS}}}effectiveTime")
    assert eff is not None and h.effective == eff.get("value")
    fields = ccda.document_reference_fields(h)
    raw = str(h.effective)
    assert fields["date"].startswith(f"{raw[:4]}-{raw[4:6]}-{raw[6:8]}T{raw[8:10]}:{raw[10:12]}")
    assert fields["date"].endswith(f"{raw[-5:-2]}:{raw[-2:]}")


@pytest.mark.parametrize(("ts", "instant", "date"), [
    ("20130717114446.302-0500", "2013-07-17T11:44:46.302-05:00", "2013-07-17T11:44:46.302-05:00"),
    ("201308010500-0800", "2013-08-01T05:00:00-08:00", "2013-08-01T05:00:00-08:00"),
    ("20140307121613", None, "2014-03-07"),  # no zone: we will not guess one
    ("20050329", None, "2005-03-29"),
    ("200503", None, "2005-03"),
    ("20200101120000+0000", "2020-01-01T12:00:00Z", "2020-01-01T12:00:00Z"),
    ("garbage", None, None),
    (None, None, None),
])
def test_ts_to_fhir(ts: str | None, instant: str | None, date: str | None) -> None:
    assert ccda.ts_to_fhir(ts) == (instant, date)


MINIMAL = b"""<?xml version="1.0"?>
<ClinicalDocument xmlns="urn:hl7-org:v3">
  <id root="2.16.840.1.113883.19.5" extension="doc-1"/>
  <code code="11506-3" codeSystem="2.16.840.1.113883.6.1" displayName="Progress note"/>
  <title>Progress note</title>
  <effectiveTime value="20240102"/>
  <author><assignedAuthor><assignedAuthoringDevice><softwareName>EHR 9</softwareName>
  </assignedAuthoringDevice></assignedAuthor></author>
  <custodian><assignedCustodian><representedCustodianOrganization><name>Clinic A</name>
  </representedCustodianOrganization></assignedCustodian></custodian>
  <component><nonXMLBody><text mediaType="application/pdf" representation="B64">JVBERi0=</text></nonXMLBody></component>
</ClinicalDocument>"""


def test_minimal_non_xml_body_document() -> None:
    h = ccda.read_header(MINIMAL)
    assert (h.code, h.title, h.authors, h.custodian) == ("11506-3", "Progress note", ["EHR 9"], "Clinic A")
    assert h.non_xml_body and not h.structured
    assert ccda.format_coding(h)["code"] == ccda.FORMAT_NON_XML  # type: ignore[index]
    fields = ccda.document_reference_fields(h)
    assert "date" not in fields and fields["context"]["period"] == {"start": "2024-01-02"}
    assert fields["masterIdentifier"] == {"system": "urn:oid:2.16.840.1.113883.19.5", "value": "doc-1"}


def test_external_entities_are_refused_and_nothing_is_read(tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP-SECRET")
    xxe = (f'<?xml version="1.0"?><!DOCTYPE d [<!ENTITY x SYSTEM "file://{secret}">]>'
           '<ClinicalDocument xmlns="urn:hl7-org:v3"><title>&x;</title></ClinicalDocument>').encode()
    with pytest.raises(ccda.MalformedXml, match="refused") as exc:
        ccda.read_header(xxe)
    assert "TOP-SECRET" not in str(exc.value)


def test_billion_laughs_is_refused_quickly() -> None:
    lol = ['<!ENTITY lol0 "lol">'] + [f'<!ENTITY lol{i} "{f"&lol{i - 1};" * 10}">' for i in range(1, 10)]
    doc = ('<?xml version="1.0"?><!DOCTYPE d [' + "".join(lol) + ']>'
           '<ClinicalDocument xmlns="urn:hl7-org:v3"><title>&lol9;</title></ClinicalDocument>').encode()
    start = time.monotonic()
    with pytest.raises(ccda.MalformedXml, match="refused"):
        ccda.read_header(doc)
    assert time.monotonic() - start < 5  # a guard against hanging, not a speed measurement


def test_other_xml_and_broken_xml() -> None:
    with pytest.raises(ccda.NotCcda, match="<Bundle>"):
        ccda.read_header(b'<Bundle xmlns="http://hl7.org/fhir"><type value="collection"/></Bundle>')
    with pytest.raises(ccda.NotCcda):
        ccda.read_header(b"<ClinicalDocument><title>no namespace</title></ClinicalDocument>")
    with pytest.raises(ccda.MalformedXml, match="line 2"):
        ccda.read_header(b'<ClinicalDocument xmlns="urn:hl7-org:v3">\n<title>unclosed</ClinicalDocument>')


def test_record_target_demographics_of_the_generated_note() -> None:
    from fhir.resources.R4B.patient import Patient

    from fixtures import identity as fx

    h = ccda.read_header(fx.wrong_patient_ccda())
    (d,) = h.record_targets
    assert d.names == [((fx.OTHER.given,), fx.OTHER.family)]
    assert d.birth_date == fx.OTHER.birth and d.gender == "male"
    assert d.identifiers == [("urn:oid:2.16.840.1.113883.19.5.99999.1", fx.OTHER.mrn)]
    p = ccda.patient_resource(d, "doc-1")
    Patient.model_validate(p)
    assert p["meta"]["tag"][0] == {"system": ccda.DEMOGRAPHICS_TAG, "code": "ccda",
                                   "display": "demographics from a C-CDA recordTarget"}


def test_record_target_demographics_of_every_shared_sample(shared_data: Path) -> None:
    from fhir.resources.R4B.patient import Patient

    for path in _samples(shared_data):
        h = ccda.read_header(path.read_bytes())
        assert h.record_targets, path.name
        for d in h.record_targets:
            assert d.names and d.birth_date, path.name  # every sample names its patient
            Patient.model_validate(ccda.patient_resource(d, "x"))


def test_record_target_null_flavors_and_text_names() -> None:
    xml = (b'<ClinicalDocument xmlns="urn:hl7-org:v3"><recordTarget><patientRole>'
           b'<id nullFlavor="NI"/><id root="2.16.840.1.113883.19" extension="A1"/>'
           b'<patient><name>Pat Q Example</name><administrativeGenderCode code="UN"/>'
           b'<birthTime value="1960"/></patient></patientRole></recordTarget></ClinicalDocument>')
    (d,) = ccda.read_header(xml).record_targets
    assert d.identifiers == [("urn:oid:2.16.840.1.113883.19", "A1")]
    assert d.names == [(("Pat", "Q"), "Example")] and d.birth_date == "1960" and d.gender == "other"
    empty = ccda.read_header(b'<ClinicalDocument xmlns="urn:hl7-org:v3"><recordTarget><patientRole>'
                             b'<id nullFlavor="UNK"/></patientRole></recordTarget></ClinicalDocument>')
    assert empty.record_targets[0].empty
