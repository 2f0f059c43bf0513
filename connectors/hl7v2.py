"""HL7 v2 messages (ER7, the ``|``-delimited form) in a download: who they are about, nothing more.

Portals and interfaces sometimes hand out results as raw HL7 v2 (``.hl7`` files). Their clinical
content is not interpreted here: the file is kept whole as a text document. What is read is the
PID segment (identifiers PID-3, names PID-5, birth date PID-7, sex PID-8), because a document is
only allowed to count for the case's patient once its demographics were compared with theirs.
The demographics become a FHIR Patient (tagged as coming from a document) that the
DocumentReference points at; normalization does the comparing.

The reader is deliberately small and strict: the separators come from MSH-1/MSH-2, segments end
at CR (LF and CRLF are accepted, as files are often re-saved), escape sequences other than the
separators themselves are dropped from names rather than guessed at.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from aggregator.errors import UnsupportedInput
from connectors import ccda
from connectors.ccda import Demographics

#: HL7 v2 table 0001 (administrative sex) -> FHIR administrative-gender
SEX = {"F": "female", "M": "male", "O": "other", "A": "other", "N": "other", "U": "unknown"}
_SEGMENTS = re.compile(r"\r\n|\r|\n")
_DATE = re.compile(r"^(\d{4})(\d{2})?(\d{2})?")


class NotHl7(UnsupportedInput):
    """The bytes do not start with an MSH segment."""


@dataclass(frozen=True)
class Separators:
    field: str
    component: str
    repetition: str
    escape: str
    subcomponent: str


def looks_like_hl7(head: bytes) -> bool:
    """An ER7 message starts with ``MSH`` and its field separator (any non-alphanumeric byte)."""
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n")
    return len(text) > 8 and text[:3] == b"MSH" and not chr(text[3]).isalnum() and chr(text[3]) not in " \r\n"


def _separators(msh: str) -> Separators:
    enc = msh[4:8]
    if len(msh) < 8 or len(set(msh[3] + enc)) != 5:
        raise NotHl7("MSH segment has no valid encoding characters")
    return Separators(msh[3], enc[0], enc[1], enc[2], enc[3])


def _unescape(text: str, sep: Separators) -> str:
    """Resolve the separator escapes (\\F\\, \\S\\, \\T\\, \\R\\, \\E\\); any other escape is removed."""
    e = re.escape(sep.escape)
    table = {"F": sep.field, "S": sep.component, "T": sep.subcomponent, "R": sep.repetition, "E": sep.escape}
    return re.sub(f"{e}([^{e}]*){e}", lambda m: table.get(m.group(1), ""), text)


def read_patients(data: bytes) -> list[Demographics]:
    """The demographics of every PID segment in the file (a batch may hold several messages)."""
    text = data.decode("utf-8", errors="replace").lstrip("\ufeff \t\r\n")
    if not text.startswith("MSH"):
        raise NotHl7("the file does not start with an HL7 v2 MSH segment")
    sep = _separators(text.split("\r", 1)[0].split("\n", 1)[0])
    out: list[Demographics] = []
    for seg in _SEGMENTS.split(text):
        if seg.startswith("MSH"):
            sep = _separators(seg)  # each message of a batch states its own
        elif seg.startswith("PID" + sep.field):
            out.append(_pid(seg.split(sep.field), sep))
    return out


def _field(fields: list[str], n: int) -> str:
    return fields[n] if len(fields) > n else ""


def _pid(fields: list[str], sep: Separators) -> Demographics:
    d = Demographics()
    for rep in _field(fields, 3).split(sep.repetition):
        comps = rep.split(sep.component)
        value = _unescape(comps[0], sep).strip()
        if not value:
            continue
        authority = comps[3].split(sep.subcomponent) if len(comps) > 3 else []
        oid = authority[1] if len(authority) > 2 and authority[2].upper() == "ISO" else ""
        if oid:
            system = f"urn:oid:{oid}"
        elif authority and authority[0]:
            system = "urn:aggregator:hl7v2-authority:" + re.sub(r"[^A-Za-z0-9._-]", "_", authority[0])
        else:
            system = "urn:aggregator:hl7v2-patient-id"
        d.identifiers.append((system, value))
    for rep in _field(fields, 5).split(sep.repetition):
        comps = [_unescape(c, sep).strip() for c in rep.split(sep.component)]
        family = comps[0].split(sep.subcomponent)[0].strip() if comps and comps[0] else ""
        given = tuple(g for g in comps[1:3] if g)
        if family or given:
            d.names.append((given, family or None))
    m = _DATE.match(_field(fields, 7).strip())
    if m:
        y, mo, dd = m.groups()
        d.birth_date = y + (f"-{mo}" if mo else "") + (f"-{dd}" if mo and dd else "")
    sex = _field(fields, 8).strip().upper()
    if sex:
        d.gender = SEX.get(sex, "unknown")
    return d


def patient_resource(d: Demographics, rid: str) -> dict[str, Any]:
    """The FHIR R4 Patient the messages' PID describes, tagged as demographics from HL7 v2."""
    return ccda.patient_resource(d, rid, "hl7v2", "demographics from an HL7 v2 PID")
