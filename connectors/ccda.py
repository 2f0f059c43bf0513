"""C-CDA documents: recognise them and read the header a consultant needs to file them.

A C-CDA is kept whole (the original XML is attached); this module only reads the header of the
``ClinicalDocument`` - its LOINC type, time, authors, title, custodian and whether it has a
structured body - so the document can be described by a FHIR R4 DocumentReference without
interpreting its clinical content.

The header also names whose record it is (``recordTarget/patientRole``: ids, names, gender,
birthTime). Those demographics become a FHIR Patient the DocumentReference points at, so that
normalization compares them with the case's patient like any other Patient: a document about
another person must never count for this one.

The XML comes from outside, so it is parsed with ``defusedxml``, which refuses entity
declarations (billion laughs, quadratic blow-up) and external entities/DTDs (XXE) instead of
expanding them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any
from xml.etree.ElementTree import Element  # only the type; parsing goes through defusedxml

import defusedxml.ElementTree as SafeET
from defusedxml import DefusedXmlException

from aggregator.errors import UnsupportedInput

NS = "urn:hl7-org:v3"
_H = f"{{{NS}}}"
LOINC = "http://loinc.org"
LOINC_OID = "2.16.840.1.113883.6.1"
#: FHIR format codes for C-CDA (IHE format code value set used by US Core / C-CDA on FHIR).
FORMAT_SYSTEM = "http://ihe.net/fhir/ihe.formatcode.fhir/CodeSystem/formatcode"
FORMAT_STRUCTURED = "urn:hl7-org:sdwg:ccda-structuredBody:2.1"
FORMAT_NON_XML = "urn:hl7-org:sdwg:ccda-nonXMLBody:2.1"
_OIDS = {LOINC_OID: LOINC, "2.16.840.1.113883.6.96": "http://snomed.info/sct"}

#: ``meta.tag`` system marking a Patient made from a document's own demographics
DEMOGRAPHICS_TAG = "urn:aggregator:demographics-from"
_OID = re.compile(r"^[0-2](\.(0|[1-9][0-9]*))+$")
_UUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")

_TS = re.compile(
    r"^(?P<y>\d{4})(?P<mo>\d{2})?(?P<d>\d{2})?(?P<h>\d{2})?(?P<mi>\d{2})?(?P<s>\d{2})?(?:\.(?P<f>\d{1,6}))?"
    r"(?P<tz>[+-]\d{4})?$"
)


class NotCcda(UnsupportedInput):
    """The XML is well formed but is not an HL7 v3 ClinicalDocument."""


class MalformedXml(UnsupportedInput):
    """The file is not well-formed XML, or uses entity tricks that are refused."""


@dataclass
class CcdaHeader:
    """The ClinicalDocument header fields used to describe the document."""

    code: str | None = None
    code_system: str | None = None
    display: str | None = None
    title: str | None = None
    effective: str | None = None
    """HL7 TS as written (e.g. ``20130717114446.302-0500``)."""
    authors: list[str] = field(default_factory=list)
    custodian: str | None = None
    doc_id: tuple[str, str | None] | None = None
    """``(root, extension)`` of ClinicalDocument/id."""
    structured: bool = False
    non_xml_body: bool = False
    template_ids: list[str] = field(default_factory=list)
    service_period: tuple[str | None, str | None] = (None, None)
    record_targets: list[Demographics] = field(default_factory=list)
    """One per ``recordTarget`` (a C-CDA names one patient; more is read, never merged)."""


@dataclass
class Demographics:
    """Who a document is about, as the document states it (empty when it says nothing)."""

    identifiers: list[tuple[str, str]] = field(default_factory=list)
    """``(system, value)``: ``urn:oid:<root>`` and the extension."""
    names: list[tuple[tuple[str, ...], str | None]] = field(default_factory=list)
    """``(given names, family)`` per name."""
    birth_date: str | None = None
    """FHIR date (YYYY, YYYY-MM or YYYY-MM-DD)."""
    gender: str | None = None
    """FHIR administrative gender."""

    @property
    def empty(self) -> bool:
        return not (self.identifiers or self.names or self.birth_date or self.gender)

    def same_as(self, other: Demographics) -> bool:
        """Both state exactly the same things (two PIDs of one file about one person)."""
        return (sorted(self.identifiers), sorted(self.names), self.birth_date, self.gender) == \
            (sorted(other.identifiers), sorted(other.names), other.birth_date, other.gender)


#: HL7 v3 AdministrativeGender -> FHIR administrative-gender
V3_GENDER = {"F": "female", "M": "male", "UN": "other"}


def looks_like_ccda(head: bytes) -> bool:
    """Cheap sniff on the first bytes: an XML document whose root is a ClinicalDocument."""
    return b"ClinicalDocument" in head[:8192] and b"urn:hl7-org:v3" in head[:8192]


def parse_xml(data: bytes) -> Element:
    """Parse untrusted XML; entity declarations and external references are refused."""
    try:
        return SafeET.fromstring(data)
    except DefusedXmlException as exc:
        raise MalformedXml(f"XML uses a refused construct ({exc.__class__.__name__})") from exc
    except SafeET.ParseError as exc:
        line, col = getattr(exc, "position", (0, 0))
        raise MalformedXml(f"malformed XML at line {line}, column {col}") from exc
    except LookupError as exc:
        # expat looks the declared encoding up in Python's codecs: encoding="EVIL-9"
        raise MalformedXml("XML declares an encoding that does not exist") from exc
    except (UnicodeError, ValueError) as exc:
        raise MalformedXml(f"XML text does not match its declared encoding ({exc.__class__.__name__})") from exc


def _text(el: Element | None) -> str | None:
    if el is None:
        return None
    text = " ".join("".join(el.itertext()).split())
    return text or None


def _name(el: Element | None) -> str | None:
    """A person/organisation ``name`` element as display text: prefix given family suffix."""
    if el is None:
        return None
    parts: list[str] = []
    children = list(el)
    if not children:
        return _text(el)
    for tag in ("prefix", "given", "family", "suffix"):
        parts += [t for c in el.findall(_H + tag) if (t := _text(c))]
    return " ".join(parts) or _text(el)


def _author_display(author: Element) -> str | None:
    aa = author.find(_H + "assignedAuthor")
    if aa is None:
        return None
    person = _name(aa.find(f"{_H}assignedPerson/{_H}name"))
    org = _name(aa.find(f"{_H}representedOrganization/{_H}name"))
    device = _text(aa.find(f"{_H}assignedAuthoringDevice/{_H}softwareName"))
    if person and org:
        return f"{person} ({org})"
    return person or org or device


def read_header(data: bytes) -> CcdaHeader:
    """Read the header of a C-CDA; raises :class:`NotCcda` or :class:`MalformedXml`."""
    root = parse_xml(data)
    if root.tag != _H + "ClinicalDocument":
        tag = root.tag.rsplit("}", 1)[-1]
        raise NotCcda(f"XML root is <{tag}>, not an HL7 v3 ClinicalDocument")
    h = CcdaHeader()
    code = root.find(_H + "code")
    if code is not None:
        h.code = code.get("code")
        oid = code.get("codeSystem")
        h.code_system = _OIDS.get(oid or "", f"urn:oid:{oid}" if oid else None)
        h.display = code.get("displayName") or None
    h.title = _text(root.find(_H + "title"))
    eff = root.find(_H + "effectiveTime")
    if eff is not None:
        low = eff.find(_H + "low")
        h.effective = eff.get("value") or (low.get("value") if low is not None else None)
    h.authors = [d for a in root.findall(_H + "author") if (d := _author_display(a))]
    h.custodian = _name(root.find(
        f"{_H}custodian/{_H}assignedCustodian/{_H}representedCustodianOrganization/{_H}name"))
    ident = root.find(_H + "id")
    if ident is not None and ident.get("root"):
        h.doc_id = (str(ident.get("root")), ident.get("extension") or None)
    h.template_ids = [str(t.get("root")) + (f":{t.get('extension')}" if t.get("extension") else "")
                      for t in root.findall(_H + "templateId") if t.get("root")]
    comp = root.find(_H + "component")
    if comp is not None:
        h.structured = comp.find(_H + "structuredBody") is not None
        h.non_xml_body = comp.find(_H + "nonXMLBody") is not None
    se = root.find(f"{_H}documentationOf/{_H}serviceEvent/{_H}effectiveTime")
    if se is not None:
        low, high = se.find(_H + "low"), se.find(_H + "high")
        h.service_period = (low.get("value") if low is not None else se.get("value"),
                            high.get("value") if high is not None else None)
    h.record_targets = [_demographics(role) for role in root.findall(f"{_H}recordTarget/{_H}patientRole")]
    return h


def _demographics(role: Element) -> Demographics:
    """``patientRole``: its ids (nullFlavor ids carry nothing), the patient's names, gender and
    birth date. Values are taken as written; matching is normalization's job."""
    d = Demographics()
    for ident in role.findall(_H + "id"):
        root, ext = ident.get("root"), ident.get("extension")
        if root and ext and not ident.get("nullFlavor"):
            d.identifiers.append((f"urn:oid:{root}" if _OID.match(root) else f"urn:uuid:{root.lower()}"
                                  if _UUID.match(root) else root, ext))
    patient = role.find(_H + "patient")
    if patient is None:
        return d
    for nm in patient.findall(_H + "name"):
        given = tuple(t for g in nm.findall(_H + "given") if (t := _text(g)))
        family = " ".join(t for f in nm.findall(_H + "family") if (t := _text(f))) or None
        if not given and not family and (whole := _text(nm)):
            parts = whole.split()
            given, family = tuple(parts[:-1]), parts[-1]
        if given or family:
            d.names.append((given, family))
    gender = patient.find(_H + "administrativeGenderCode")
    if gender is not None and gender.get("code"):
        d.gender = V3_GENDER.get(str(gender.get("code")).upper(), "unknown")
    birth = patient.find(_H + "birthTime")
    if birth is not None and birth.get("value"):
        d.birth_date = ts_to_fhir(birth.get("value"))[1]
    return d


def patient_resource(d: Demographics, rid: str, kind: str = "ccda",
                     display: str = "demographics from a C-CDA recordTarget") -> dict[str, Any]:
    """A FHIR R4 Patient stating exactly what the document says about its patient; tagged so that
    normalization knows the demographics came from a document (and from which kind)."""
    p: dict[str, Any] = {"resourceType": "Patient", "id": rid,
                         "meta": {"tag": [{"system": DEMOGRAPHICS_TAG, "code": kind, "display": display}]}}
    if d.identifiers:
        p["identifier"] = [{"system": s, "value": v} for s, v in d.identifiers]
    if d.names:
        p["name"] = [{k: v for k, v in (("family", fam), ("given", list(giv))) if v} for giv, fam in d.names]
    if d.gender:
        p["gender"] = d.gender
    if d.birth_date:
        p["birthDate"] = d.birth_date
    return p


def ts_to_fhir(ts: str | None) -> tuple[str | None, str | None]:
    """HL7 v3 TS -> ``(instant, dateTime)`` in FHIR R4 form; either may be None.

    FHIR instants need seconds and a time zone, and a FHIR dateTime with a time needs a time zone
    too. A TS without a zone can therefore only become a date (we will not guess the zone), and
    gives no instant.
    """
    if not ts:
        return None, None
    m = _TS.match(ts.strip())
    if not m:
        return None, None
    y, mo, d, hh, mi, s, f, tz = (m.group(k) for k in ("y", "mo", "d", "h", "mi", "s", "f", "tz"))
    date = y + (f"-{mo}" if mo else "") + (f"-{d}" if mo and d else "")
    if not (mo and d and hh and tz):
        return None, date
    zone = "Z" if tz in ("+0000", "-0000") else f"{tz[:3]}:{tz[3:]}"
    time = f"{hh}:{mi or '00'}:{s or '00'}" + (f".{f}" if f and s else "")
    full = f"{date}T{time}{zone}"
    return full, full


def document_reference_fields(h: CcdaHeader) -> dict[str, Any]:
    """DocumentReference elements (R4) that describe the document from its header.

    The caller adds ``content.attachment``; ``subject`` is left for normalization, which links
    the document to the case's patient.
    """
    out: dict[str, Any] = {"status": "current"}
    if h.doc_id:
        root, ext = h.doc_id
        out["masterIdentifier"] = (
            {"system": f"urn:oid:{root}", "value": ext} if ext else {"system": "urn:ietf:rfc:3986",
                                                                    "value": f"urn:oid:{root}"})
    if h.code:
        coding: dict[str, Any] = {"system": h.code_system or LOINC, "code": h.code}
        if h.display:
            coding["display"] = h.display
        out["type"] = {"coding": [coding], **({"text": h.title} if h.title else {})}
    out["category"] = [{"coding": [{
        "system": "http://hl7.org/fhir/us/core/CodeSystem/us-core-documentreference-category",
        "code": "clinical-note", "display": "Clinical Note"}]}]
    instant, date = ts_to_fhir(h.effective)
    if instant:
        out["date"] = instant
    if h.authors:
        out["author"] = [{"display": a} for a in h.authors]
    if h.custodian:
        out["custodian"] = {"display": h.custodian}
    if h.title:
        out["description"] = h.title
    start = ts_to_fhir(h.service_period[0])[1] or date
    end = ts_to_fhir(h.service_period[1])[1]
    if start or end:
        period = {k: v for k, v in (("start", start), ("end", end)) if v}
        out["context"] = {"period": period}
    return out


def format_coding(h: CcdaHeader) -> dict[str, str] | None:
    """``content.format`` for the attached XML, when the body kind is known."""
    if h.structured:
        return {"system": FORMAT_SYSTEM, "code": FORMAT_STRUCTURED, "display": "C-CDA R2.1 structured body"}
    if h.non_xml_body:
        return {"system": FORMAT_SYSTEM, "code": FORMAT_NON_XML, "display": "C-CDA R2.1 non-XML body"}
    return None
