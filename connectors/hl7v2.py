"""HL7 v2 messages (ER7, the ``|``-delimited form) in a download: who they are about, and their text.

Portals and interfaces hand out results as raw HL7 v2 (``.hl7`` files, MLLP exports). This module
reads the bytes: it splits a file (or a batch) into messages, decodes each in the character set
its MSH-18 declares, and resolves escape sequences. It reads the PID segment (identifiers PID-3,
names PID-5, birth date PID-7, sex PID-8), because a document is only allowed to count for the
case's patient once its demographics were compared with theirs; :mod:`connectors.hl7v2_results`
turns ORU^R01 results into FHIR reports, parsed with python-hl7.

Separators come from MSH-1/MSH-2 of each message. Segments end at CR; LF and CRLF are accepted,
as files are often re-saved. A message without MSH-18 is read as UTF-8, else Windows-1252 (the
two encodings such files are found in); a declared character set must decode, or the file is
refused with the reason. Escapes that switch character sets inside a field (``\\C..\\``, ``\\M..\\``)
are refused too: guessing would garble names and report text.
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
_DATE = re.compile(r"^(\d{4})(\d{2})?(\d{2})?")
#: HL7 v2 table 0211 (alternate character sets) -> Python codec; byte-oriented sets only
CHARSETS = {
    "ASCII": "ascii", "UNICODE UTF-8": "utf-8", "UTF-8": "utf-8", "UNICODE": "utf-8", "ISO IR192": "utf-8",
    "8859/1": "iso8859-1", "8859/2": "iso8859-2", "8859/3": "iso8859-3", "8859/4": "iso8859-4",
    "8859/5": "iso8859-5", "8859/6": "iso8859-6", "8859/7": "iso8859-7", "8859/8": "iso8859-8",
    "8859/9": "iso8859-9", "8859/15": "iso8859-15", "GB 18030-2000": "gb18030", "KS X 1001": "euc_kr",
    "BIG-5": "big5", "ISO IR87": "iso2022_jp", "ISO IR159": "iso2022_jp_2", "ISO IR14": "shift_jis",
}
_BATCH = (b"FHS", b"BHS", b"BTS", b"FTS")


class NotHl7(UnsupportedInput):
    """The bytes do not start with an MSH segment."""


@dataclass(frozen=True)
class Separators:
    field: str
    component: str
    repetition: str
    escape: str
    subcomponent: str


@dataclass(frozen=True)
class Message:
    """One message of a file: its text (segments joined by CR), separators and character set."""

    text: str
    sep: Separators
    encoding: str
    charset: str
    """MSH-18 as written ("" when absent)."""

    @property
    def segments(self) -> list[str]:
        return [s for s in self.text.split("\r") if s]

    @property
    def type(self) -> str:
        """MSH-9 message type and trigger event, e.g. ``ORU^R01``."""
        msh = self.text.split("\r", 1)[0].split(self.sep.field)
        parts = (msh[8] if len(msh) > 8 else "").split(self.sep.component)
        return "^".join(p for p in parts[:2] if p)


def looks_like_hl7(head: bytes) -> bool:
    """An ER7 message starts with ``MSH`` and its field separator (any non-alphanumeric byte)."""
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n\x0b")  # \x0b: the MLLP start byte of an export
    for tag in _BATCH[:2]:  # a batch file opens with FHS/BHS before its first MSH
        if text.startswith(tag):
            first_msh = text.find(b"MSH")
            text = text[first_msh:] if first_msh > 0 else text
    return len(text) > 8 and text[:3] == b"MSH" and not chr(text[3]).isalnum() and chr(text[3]) not in " \r\n"


def _separators(msh: str) -> Separators:
    enc = msh[4:8]
    if len(msh) < 8 or len(set(msh[3] + enc)) != 5:
        raise NotHl7("MSH segment has no valid encoding characters")
    return Separators(msh[3], enc[0], enc[1], enc[2], enc[3])


def _raw_charset(msh: bytes) -> str:
    """MSH-18 (its first repetition), read from the bytes: the MSH itself is ASCII in every set we read."""
    if len(msh) < 8:
        return ""
    fields = msh.split(msh[3:4])
    if len(fields) <= 17:
        return ""
    return fields[17].split(msh[5:6])[0].decode("ascii", errors="replace").strip()


def _decode(raw: bytes, charset: str) -> tuple[str, str]:
    if not charset:
        try:
            return raw.decode("utf-8"), "utf-8"
        except UnicodeDecodeError:
            return raw.decode("cp1252", errors="replace"), "cp1252"
    codec = CHARSETS.get(charset.upper())
    if codec is None:
        raise UnsupportedInput(f"HL7 v2 character set {charset[:40]!r} (MSH-18) is not supported; "
                               f"supported: {', '.join(sorted(CHARSETS))}")
    try:
        return raw.decode(codec), codec
    except UnicodeDecodeError as exc:
        raise UnsupportedInput(f"HL7 v2 message declares character set {charset[:40]!r} (MSH-18) "
                               f"but holds bytes outside it (at byte {exc.start})") from None


def split_messages(data: bytes) -> list[Message]:
    """The messages of a file or batch, each decoded in its own MSH-18 character set.

    Line ends become CR; batch envelopes (FHS/BHS/BTS/FTS) are dropped; segments before the first
    MSH make the file not HL7.
    """
    body = data.lstrip(b"\xef\xbb\xbf \t\r\n\x0b").replace(b"\r\n", b"\r").replace(b"\n", b"\r")
    groups: list[list[bytes]] = []
    for seg in body.split(b"\r"):
        seg = seg.strip(b"\x0b\x1c")  # MLLP frame bytes left in an export
        if not seg.strip() or seg[:3] in _BATCH:
            continue
        if seg.startswith(b"MSH"):
            groups.append([seg])
        elif not groups:
            raise NotHl7("the file does not start with an HL7 v2 MSH segment")
        else:
            groups[-1].append(seg)
    if not groups:
        raise NotHl7("the file does not start with an HL7 v2 MSH segment")
    out = []
    for g in groups:
        charset = _raw_charset(g[0])
        text, codec = _decode(b"\r".join(g), charset)
        out.append(Message(text, _separators(text.split("\r", 1)[0]), codec, charset))
    return out


_FORMATTING = {".br": "\n", ".sp": "\n", ".fi": "", ".nf": "", ".ce": "\n", "H": "", "N": ""}


def unescape(text: str, sep: Separators, encoding: str = "utf-8") -> str:
    """Resolve escape sequences (HL7 v2 chapter 2.7): separators, formatting, hex bytes.

    ``\\.br\\`` and ``\\.sp\\`` break lines; highlighting (``\\H\\``, ``\\N\\``) and indents are dropped
    (the words stay); ``\\Xhh..\\`` are bytes in the message's character set; ``\\Z..\\`` are local
    and dropped. Character-set switches raise :class:`UnsupportedInput`.
    """
    e = sep.escape
    if e not in text:
        return text
    table = {"F": sep.field, "S": sep.component, "T": sep.subcomponent, "R": sep.repetition, "E": e}
    out: list[str] = []
    i = 0
    while i < len(text):
        c = text[i]
        end = text.find(e, i + 1) if c == e else -1
        if c != e or end < 0:
            out.append(c)
            i += 1
            continue
        code = text[i + 1:end]
        i = end + 1
        if code in table:
            out.append(table[code])
        elif code[:3] in (".sp", ".sk"):
            count = code[3:].lstrip("+")
            out.append(("\n" if code[:3] == ".sp" else " ") * (int(count) if count.isdigit() else 1))
        elif code in _FORMATTING:
            out.append(_FORMATTING[code])
        elif code[:3] in (".in", ".ti") or code.startswith("Z"):
            continue
        elif code.startswith("X") and re.fullmatch(r"(?:[0-9A-Fa-f]{2})+", code[1:]):
            out.append(bytes.fromhex(code[1:]).decode(encoding, errors="replace"))
        elif code.startswith(("C", "M")):
            raise UnsupportedInput("HL7 v2 escape sequences that switch character sets (\\C, \\M) are not "
                                   "supported")
        else:
            out.append(e + code + e)  # not an escape we know: the text stays as written
    return "".join(out)


def read_patients(data: bytes) -> list[Demographics]:
    """The demographics of every PID segment in the file (a batch may hold several messages)."""
    out: list[Demographics] = []
    for msg in split_messages(data):
        for seg in msg.segments:
            if seg.startswith("PID" + msg.sep.field):
                out.append(_pid(seg.split(msg.sep.field), msg.sep, msg.encoding))
    return out


def _field(fields: list[str], n: int) -> str:
    return fields[n] if len(fields) > n else ""


def _pid(fields: list[str], sep: Separators, encoding: str = "utf-8") -> Demographics:
    d = Demographics()
    for rep in _field(fields, 3).split(sep.repetition):
        comps = rep.split(sep.component)
        value = unescape(comps[0], sep, encoding).strip()
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
        comps = [unescape(c, sep, encoding).strip() for c in rep.split(sep.component)]
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
