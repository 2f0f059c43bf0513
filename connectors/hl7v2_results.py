"""ORU^R01 results -> FHIR R4: one DiagnosticReport per OBR, with its OBX Observations and full text.

Pathology and lab systems send results as ORU^R01 messages; a patient or navigator receives them
as files. What a consultant needs is the report as the pathologist wrote it, so each OBR group
becomes a DiagnosticReport whose ``presentedForm`` is the whole text of the group: the NTE
comments and the text OBX lines (TX, FT, ST) joined in the order they were sent, the other OBX
lines as "label: value units [flag]" (a CAP synoptic report sent as coded OBX lines reads as its
questions and answers), and any document an OBX carries (ED, e.g. a PDF) as one more attachment.
Each OBX but an ED also becomes an Observation that the report's ``result`` points at, so that
results count toward the checklist like any other.

The message structure (segments, fields, repetitions, components) is parsed by python-hl7;
escape sequences and character sets are ours (:func:`connectors.hl7v2.unescape`), because the
library logs field contents on a bad escape and cannot switch character sets. Times without a
zone become dates (FHIR needs a zone on a time; we do not guess one).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import hl7

from aggregator.errors import UnsupportedInput
from connectors.ccda import ts_to_fhir
from connectors.hl7v2 import Message, split_messages, unescape

#: HL7 v2 table 0396 (coding systems) -> FHIR code system URIs
SYSTEMS = {"LN": "http://loinc.org", "SCT": "http://snomed.info/sct", "SNM": "http://snomed.info/sct",
           "I10": "http://hl7.org/fhir/sid/icd-10", "I10C": "http://hl7.org/fhir/sid/icd-10-cm",
           "I9C": "http://hl7.org/fhir/sid/icd-9-cm", "UCUM": "http://unitsofmeasure.org",
           "CAPECC": "urn:aggregator:hl7v2-coding-system:CAPECC", "RXN": "http://www.nlm.nih.gov/research/umls/rxnorm"}
V2_0074 = "http://terminology.hl7.org/CodeSystem/v2-0074"
V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"
INTERPRETATION = "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"
OBS_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
#: OBR-25 / OBX-11 result status -> FHIR status
STATUS = {"F": "final", "C": "corrected", "P": "preliminary", "R": "preliminary", "S": "preliminary",
          "A": "partial", "I": "registered", "O": "registered", "X": "cancelled", "D": "entered-in-error",
          "W": "entered-in-error", "N": "unknown", "U": "final"}
TEXT_TYPES = frozenset({"TX", "FT", "ST"})
CODED_TYPES = frozenset({"CE", "CWE", "CNE", "CF"})
_SN_COMPARATORS = frozenset({"<", ">", "<=", ">="})
_MIME = {"PDF": "application/pdf", "RTF": "application/rtf", "HTML": "text/html", "TEXT": "text/plain",
         "TXT": "text/plain", "XML": "application/xml", "JPEG": "image/jpeg", "JPG": "image/jpeg",
         "PNG": "image/png", "TIFF": "image/tiff", "GIF": "image/gif"}

Reps = list[list[list[str]]]
"""A field: repetitions -> components -> subcomponents, unescaped."""


@dataclass
class Obx:
    index: int
    value_type: str
    code: list[list[str]]
    sub_id: str
    values: Reps
    units: list[list[str]]
    range: str
    flags: list[str]
    status: str
    when: str
    notes: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        return _display(self.code) or "Result"


@dataclass
class Order:
    """One OBR group of an ORU^R01: the report, in the order it was sent."""

    message: int
    index: int
    control_id: str
    placer: str
    filler: str
    code: list[list[str]]
    when: str
    reported: str
    section: str
    status: str
    notes: list[str] = field(default_factory=list)
    results: list[Obx] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)
    """The report's text, line by line, as it will be presented."""
    attachments: list[tuple[str, bytes, str]] = field(default_factory=list)
    """(content type, bytes, title) of the documents the OBX lines carry (ED)."""


def _reps(node: Any, msg: Message) -> Reps:
    """python-hl7's Field -> repetitions -> components -> subcomponents, each unescaped."""
    if node is None:
        return []
    out: Reps = []
    for rep in [node] if isinstance(node, str) else node:
        if isinstance(rep, str):
            out.append([[unescape(rep, msg.sep, msg.encoding)]])
            continue
        out.append([[unescape(comp, msg.sep, msg.encoding)] if isinstance(comp, str)
                    else [unescape(str(sub), msg.sep, msg.encoding) for sub in comp] for comp in rep])
    return out


def _f(seg: Any, n: int, msg: Message) -> Reps:
    return _reps(seg[n], msg) if len(seg) > n else []


def _first(reps: Reps) -> list[list[str]]:
    return reps[0] if reps else []


def _c(comps: list[list[str]], n: int) -> str:
    """Component ``n`` (1-based) of one repetition, its subcomponents joined by a space."""
    return " ".join(s for s in comps[n - 1] if s).strip() if len(comps) >= n else ""


def _plain(reps: Reps) -> str:
    return _c(_first(reps), 1)


def _display(comps: list[list[str]]) -> str:
    return _c(comps, 2) or _c(comps, 1)


def _concept(comps: list[list[str]]) -> dict[str, Any]:
    """CE/CWE: identifier^text^system[^alternate identifier^text^system] -> CodeableConcept."""
    codings = []
    for base in (1, 4):
        code, text, system = _c(comps, base), _c(comps, base + 1), _c(comps, base + 2)
        if not code:
            continue
        coding: dict[str, Any] = {"code": code}
        uri = SYSTEMS.get(system.upper()) if system else None
        if uri:
            coding = {"system": uri, **coding}
        elif system:
            coding = {"system": f"urn:aggregator:hl7v2-coding-system:{_safe(system)}", **coding}
        if text:
            coding["display"] = text
        codings.append(coding)
    out: dict[str, Any] = {}
    if codings:
        out["coding"] = codings
    text = _display(comps) or _c(comps, 9)
    if text:
        out["text"] = text
    return out


def _safe(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in text)[:64]


def _number(text: str) -> int | float | None:
    t = text.strip()
    try:
        return int(t) if t.lstrip("+-").isdigit() else float(t)
    except ValueError:
        return None


def _quantity(value: int | float, units: list[list[str]]) -> dict[str, Any]:
    q: dict[str, Any] = {"value": value}
    code, text, system = _c(units, 1), _c(units, 2), _c(units, 3)
    if code or text:
        q["unit"] = text or code
    if code and system.upper() in ("UCUM", ""):
        q["system"], q["code"] = "http://unitsofmeasure.org", code
    return q


def _value_text(obx: Obx) -> str:
    """The value as a reader sees it, for the report's text."""
    if obx.value_type in CODED_TYPES:
        return "; ".join(_display(rep) for rep in obx.values if _display(rep))
    if obx.value_type == "SN" and obx.values:
        return "".join(_c(obx.values[0], i) for i in range(1, 5))
    return "; ".join(" ".join(_c(rep, i) for i in range(1, len(rep) + 1) if _c(rep, i)) for rep in obx.values)


def _value(obx: Obx) -> dict[str, Any]:
    """Observation.value[x] from OBX-2/OBX-5; anything not typed more closely is kept as text."""
    t, reps = obx.value_type, obx.values
    if not reps:
        return {}
    if t == "NM":
        n = _number(_c(reps[0], 1))
        if n is not None:
            return {"valueQuantity": _quantity(n, obx.units)}
    elif t in CODED_TYPES:
        concept = _concept(reps[0])
        if concept:
            return {"valueCodeableConcept": concept}
    elif t == "SN":
        comp, n1, sep, n2 = (_c(reps[0], i) for i in (1, 2, 3, 4))
        a, b = _number(n1), _number(n2)
        if a is not None and sep in (":", "/") and b is not None:
            return {"valueRatio": {"numerator": {"value": a}, "denominator": {"value": b}}}
        if a is not None and sep == "-" and b is not None:
            return {"valueRange": {"low": _quantity(a, obx.units), "high": _quantity(b, obx.units)}}
        if a is not None and not sep and comp in _SN_COMPARATORS | {"", "="}:
            q = _quantity(a, obx.units)
            if comp in _SN_COMPARATORS:
                q["comparator"] = comp
            return {"valueQuantity": q}
    elif t in ("DT", "TS", "DTM"):
        _instant, when = ts_to_fhir(_c(reps[0], 1))
        if when:
            return {"valueDateTime": when}
    if t in TEXT_TYPES:
        return {"valueString": "\n".join(_c(rep, 1) for rep in reps)}
    text = _value_text(obx)
    return {"valueString": text} if text else {}


def _document(obx: Obx) -> tuple[str, bytes]:
    """An ED value: ``source^type^subtype^encoding^data`` -> (content type, bytes)."""
    comps = _first(obx.values)
    kind, subtype, encoding, data = _c(comps, 2), _c(comps, 3), _c(comps, 4).upper(), "".join(
        "".join(x) for x in comps[4:5])
    if kind.lower() in ("application", "text", "image", "audio", "video") and subtype:
        ctype = f"{kind.lower()}/{subtype.lower()}"
    else:
        ctype = _MIME.get(subtype.upper(), _MIME.get(kind.upper(), "application/octet-stream"))
    try:
        if encoding in ("BASE64", "B64"):
            raw = base64.b64decode("".join(data.split()), validate=True)
        elif encoding == "HEX":
            raw = bytes.fromhex("".join(data.split()))
        elif encoding in ("A", ""):
            raw = data.encode("utf-8")
        else:
            raise UnsupportedInput(f"HL7 v2 ED value with encoding {encoding[:20]!r} is not supported")
    except (binascii.Error, ValueError) as exc:
        raise UnsupportedInput(f"HL7 v2 ED value (OBX {obx.index}) is not valid {encoding or 'text'} data") from exc
    return ctype, raw


def read_orders(data: bytes) -> tuple[list[Order], list[str]]:
    """The OBR groups of every ORU^R01 message of a file, and the types of the other messages.

    Only ORU^R01 is read for results; other types are returned so that the caller can say so.
    """
    orders: list[Order] = []
    others: list[str] = []
    for m_index, msg in enumerate(split_messages(data), 1):
        if msg.type != "ORU^R01":
            others.append(msg.type or "unknown")
            continue
        parsed = hl7.parse(msg.text)
        control = _plain(_f(parsed.segment("MSH"), 10, msg))
        current: Order | None = None
        last_text_label: str | None = None
        last: Obx | None = None
        for seg in parsed:
            name = str(seg[0])
            if name == "OBR":
                current = Order(m_index, len(orders) + 1, control, _plain(_f(seg, 2, msg)), _plain(_f(seg, 3, msg)),
                                _first(_f(seg, 4, msg)), _plain(_f(seg, 7, msg)), _plain(_f(seg, 22, msg)),
                                _plain(_f(seg, 24, msg)), _plain(_f(seg, 25, msg)))
                orders.append(current)
                last_text_label, last = None, None
            elif current is None:
                continue
            elif name == "NTE":
                comment = [_c(rep, 1) for rep in _f(seg, 3, msg)]
                text = "\n".join(comment)
                (last.notes if last is not None else current.notes).append(text)
                current.lines += text.split("\n")
            elif name == "OBX":
                obx = Obx(len(current.results) + 1, _plain(_f(seg, 2, msg)).upper(), _first(_f(seg, 3, msg)),
                          _plain(_f(seg, 4, msg)), _f(seg, 5, msg), _first(_f(seg, 6, msg)),
                          _plain(_f(seg, 7, msg)), [_c(r, 1) for r in _f(seg, 8, msg) if _c(r, 1)],
                          _plain(_f(seg, 11, msg)), _plain(_f(seg, 14, msg)))
                current.results.append(obx)
                last = obx
                if obx.value_type == "ED":
                    ctype, raw = _document(obx)
                    current.attachments.append((ctype, raw, obx.label))
                    current.lines.append(f"[{obx.label}: attached document ({ctype})]")
                    last_text_label = None
                elif obx.value_type in TEXT_TYPES:
                    if obx.label != last_text_label:
                        if current.lines:
                            current.lines.append("")
                        current.lines.append(f"{obx.label}:")
                        last_text_label = obx.label
                    for rep in obx.values or [[[""]]]:
                        current.lines += _c(rep, 1).split("\n")
                else:
                    units = _display(obx.units)
                    flags = f" [{', '.join(obx.flags)}]" if [f for f in obx.flags if f != "N"] else ""
                    current.lines.append(f"{obx.label}: {_value_text(obx)}{' ' + units if units else ''}{flags}")
                    last_text_label = None
    return orders, others


def _rid(key: str) -> str:
    return "v2-" + hashlib.sha256(key.encode()).hexdigest()[:40]


def _status(order: Order) -> str:
    if order.status:
        return STATUS.get(order.status.upper(), "unknown")
    states = {STATUS.get(o.status.upper(), "unknown") for o in order.results}
    return states.pop() if len(states) == 1 else "unknown"


def resources(orders: list[Order], key: str, subject: dict[str, Any] | None) -> Iterator[tuple[str, dict[str, Any]]]:
    """(ledger key, FHIR resource) for each Observation, then the DiagnosticReport of each order."""
    for order in orders:
        base = f"{key}#msg{order.message}.obr{order.index}"
        _instant, when = ts_to_fhir(order.when)
        refs = []
        for obx in order.results:
            if obx.value_type == "ED":
                continue
            okey = f"{base}.obx{obx.index}"
            obs: dict[str, Any] = {"resourceType": "Observation", "id": _rid(okey),
                                   "status": STATUS.get(obx.status.upper(), _status(order)),
                                   "category": [{"coding": [{"system": OBS_CATEGORY, "code": "laboratory"}]}],
                                   "code": _concept(obx.code) or {"text": "Result"}}
            if subject:
                obs["subject"] = subject
            _i, obs_when = ts_to_fhir(obx.when)
            if obs_when or when:
                obs["effectiveDateTime"] = obs_when or when
            obs.update(_value(obx))
            if obx.flags:
                obs["interpretation"] = [{"coding": [{"system": INTERPRETATION, "code": f}]} for f in obx.flags]
            if obx.range:
                obs["referenceRange"] = [{"text": obx.range}]
            if obx.notes:
                obs["note"] = [{"text": n} for n in obx.notes]
            if obx.sub_id:
                obs["identifier"] = [{"system": "urn:aggregator:hl7v2-obx-sub-id", "value": obx.sub_id}]
            refs.append({"reference": f"Observation/{obs['id']}"})
            yield okey, obs
        report: dict[str, Any] = {"resourceType": "DiagnosticReport", "id": _rid(base), "status": _status(order),
                                  "code": _concept(order.code) or {"text": "Report"}}
        idents = []
        if order.filler:
            idents.append({"type": {"coding": [{"system": V2_0203, "code": "FILL"}]}, "value": order.filler})
            if order.section.upper() in ("SP", "CP", "CY", "PAT"):  # a pathology filler number is its accession
                idents.append({"type": {"coding": [{"system": V2_0203, "code": "ACSN"}]}, "value": order.filler})
        if order.placer:
            idents.append({"type": {"coding": [{"system": V2_0203, "code": "PLAC"}]}, "value": order.placer})
        if idents:
            report["identifier"] = idents
        if order.section:
            report["category"] = [{"coding": [{"system": V2_0074, "code": order.section.upper()}]}]
        if subject:
            report["subject"] = subject
        if when:
            report["effectiveDateTime"] = when
        issued, _d = ts_to_fhir(order.reported)
        if issued:
            report["issued"] = issued
        if refs:
            report["result"] = refs
        text = "\n".join(order.lines).strip("\n")
        title = _display(order.code) or "Report"
        forms = []
        if text:
            forms.append({"contentType": "text/plain; charset=utf-8", "title": title,
                          "data": base64.b64encode((text + "\n").encode("utf-8")).decode("ascii")})
        forms += [{"contentType": ctype, "title": doc_title, "data": base64.b64encode(raw).decode("ascii")}
                  for ctype, raw, doc_title in order.attachments]
        if forms:
            report["presentedForm"] = forms
        yield base, report

