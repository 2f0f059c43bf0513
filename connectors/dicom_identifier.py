"""Query/retrieve identifiers: the small datasets that C-FIND, C-GET and C-MOVE carry.

Why this exists instead of pydicom's reader and writer: importing pydicom costs about 11.5 MiB
of resident memory (it pulls in ``requests`` through ``pydicom.data``), a sixth of the 64 MiB a
retrieve of a 1 GB study may use, and the retrieve path needs pydicom for nothing else. An
identifier holds a known, short list of string attributes, so a codec for them is small:

* encoding writes the attributes we ask for, in tag order, in the negotiated transfer syntax
  (implicit or explicit VR, little or big endian) per PS3.5 section 7;
* decoding keeps the attributes of :data:`ATTRIBUTES` and skips everything else, sequences of
  defined or undefined length included, so an archive that answers with extra attributes is
  read correctly.

Text is decoded per the identifier's Specific Character Set (PS3.5 6.1). The single-byte sets
and UTF-8, GB18030 and GBK map to Python codecs; the ISO 2022 code-extension sets (Japanese,
Korean) switch character sets inside a value, and for those alone pydicom's decoder is loaded.

Values come back as ``str`` for one value and ``list[str]`` for several, as pydicom gives them.
Errors are ``ValueError`` whose message names no value (an identifier may hold a patient's name).
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from typing import Any

IMPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2"
EXPLICIT_VR_BIG_ENDIAN = "1.2.840.10008.1.2.2"

#: keyword -> (tag, VR) of every attribute we send in a query or read from an answer (PS3.6).
ATTRIBUTES: dict[str, tuple[int, str]] = {
    "SpecificCharacterSet": (0x00080005, "CS"),
    "SOPClassUID": (0x00080016, "UI"),
    "SOPInstanceUID": (0x00080018, "UI"),
    "StudyDate": (0x00080020, "DA"),
    "StudyTime": (0x00080030, "TM"),
    "AccessionNumber": (0x00080050, "SH"),
    "QueryRetrieveLevel": (0x00080052, "CS"),
    "RetrieveAETitle": (0x00080054, "AE"),
    "InstanceAvailability": (0x00080056, "CS"),
    "FailedSOPInstanceUIDList": (0x00080058, "UI"),
    "Modality": (0x00080060, "CS"),
    "ModalitiesInStudy": (0x00080061, "CS"),
    "SOPClassesInStudy": (0x00080062, "UI"),
    "StudyDescription": (0x00081030, "LO"),
    "SeriesDescription": (0x0008103E, "LO"),
    "PatientName": (0x00100010, "PN"),
    "PatientID": (0x00100020, "LO"),
    "IssuerOfPatientID": (0x00100021, "LO"),
    "PatientBirthDate": (0x00100030, "DA"),
    "PatientSex": (0x00100040, "CS"),
    "StudyInstanceUID": (0x0020000D, "UI"),
    "SeriesInstanceUID": (0x0020000E, "UI"),
    "StudyID": (0x00200010, "SH"),
    "SeriesNumber": (0x00200011, "IS"),
    "InstanceNumber": (0x00200013, "IS"),
    "NumberOfStudyRelatedSeries": (0x00201206, "IS"),
    "NumberOfStudyRelatedInstances": (0x00201208, "IS"),
    "NumberOfSeriesRelatedInstances": (0x00201209, "IS"),
}
_BY_TAG = {tag: (keyword, vr) for keyword, (tag, vr) in ATTRIBUTES.items()}

#: VRs whose explicit-VR header has two reserved bytes and a 4-byte length (PS3.5 7.1.2).
_LONG_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"})
#: text VRs whose bytes follow the Specific Character Set; the rest are plain ASCII.
_TEXT_VRS = frozenset({"LO", "LT", "PN", "SH", "ST", "UC", "UT"})
#: VRs holding one value even when it contains a backslash.
_SINGLE_VRS = frozenset({"LT", "ST", "UT", "UR"})

#: characters that reset an ISO 2022 code extension in text (PS3.5 6.1.2.5.3), backslash included
_TEXT_DELIMITERS = {0x09, 0x0A, 0x0C, 0x0D, 0x5C}

_ITEM, _ITEM_END, _SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_UNDEFINED = 0xFFFFFFFF

#: Specific Character Set defined terms (PS3.3 C.12.1.1.2) that map to one Python codec.
_CODECS: dict[str, str] = {
    "": "latin_1", "ISO_IR 6": "latin_1",  # ASCII by the standard; Latin-1 reads what archives send
    "ISO_IR 100": "latin_1", "ISO_IR 101": "iso8859_2", "ISO_IR 109": "iso8859_3",
    "ISO_IR 110": "iso8859_4", "ISO_IR 144": "iso8859_5", "ISO_IR 127": "iso8859_6",
    "ISO_IR 126": "iso8859_7", "ISO_IR 138": "iso8859_8", "ISO_IR 148": "iso8859_9",
    "ISO_IR 203": "iso8859_15", "ISO_IR 13": "shift_jis", "ISO_IR 166": "iso8859_11",
    "ISO_IR 192": "utf_8", "GB18030": "gb18030", "GBK": "gbk",
}


#: longest LO value in characters (PS3.5 table 6.2-1): PatientID and IssuerOfPatientID are LO
MAX_LO_CHARS = 64


def matching_key_problem(value: str) -> str | None:
    """Why ``value`` cannot be sent as a single-value matching key (PatientID, issuer), or None.

    A C-FIND or QIDO-RS key containing ``*`` or ``?`` is a wildcard match (PS3.4 C.2.2.2.4),
    a backslash makes it a list of values (PS3.4 C.2.2.2.3; PatientID is single-valued), a
    value of spaces only is universal matching (every patient), and an LO value is at most 64
    characters with no control characters (PS3.5 6.2). Such a key silently returns nothing or
    another patient's studies, so it is refused before any query. The reason names the rule,
    never the value (a PatientID is PHI).
    """
    if not value.strip(" "):
        return "is empty (an empty matching key would match every patient)"
    if "*" in value or "?" in value:
        return "contains a wildcard character (* or ?), which C-FIND and QIDO-RS treat as a pattern"
    if "\\" in value:
        return "contains a backslash, which DICOM treats as a separator between several values"
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
        return "contains a control character, which a DICOM LO value may not hold"
    if len(value) > MAX_LO_CHARS:
        return f"is longer than {MAX_LO_CHARS} characters, the most a DICOM LO value may hold"
    return None


def patient_key_problem(patient_id: str | None, issuer: str | None) -> str | None:
    """The first of a source's PatientID / IssuerOfPatientID that cannot be a matching key,
    as a PHI-free sentence; connectors refuse to query with it (sources added before
    ``source add`` checked this, or written to the database directly)."""
    for keyword, value in (("PatientID", patient_id), ("IssuerOfPatientID", issuer)):
        problem = matching_key_problem(value) if value else None
        if problem:
            return f"the source's {keyword} cannot be a DICOM query key: it {problem}"
    return None


def encode_identifier(keys: Mapping[str, Any], transfer_syntax: str) -> bytes:
    """``keys`` (keyword -> value, ``None`` left out) as an identifier in ``transfer_syntax``.

    A value is a string, a number or a list of them (several values). Non-ASCII text is sent
    as UTF-8 with Specific Character Set ``ISO_IR 192``, the one set every value fits in.
    """
    implicit, little = _syntax(transfer_syntax)
    values: dict[str, str] = {}
    for keyword, value in keys.items():
        if value is None:
            continue
        if keyword not in ATTRIBUTES:
            raise ValueError(f"identifier attribute {keyword!r} is not one this codec knows")
        values[keyword] = "\\".join(str(v) for v in value) if isinstance(value, (list, tuple)) else str(value)
    if "SpecificCharacterSet" not in values and not all(v.isascii() for v in values.values()):
        values["SpecificCharacterSet"] = "ISO_IR 192"
    codec = _codec(values.get("SpecificCharacterSet", ""))
    order = "<" if little else ">"
    out = bytearray()
    for keyword in sorted(values, key=lambda k: ATTRIBUTES[k][0]):
        tag, vr = ATTRIBUTES[keyword]
        try:
            raw = values[keyword].encode(codec if vr in _TEXT_VRS else "ascii")
        except UnicodeEncodeError:
            raise ValueError(f"identifier attribute {keyword} does not fit its character set") from None
        if len(raw) % 2:
            raw += b"\0" if vr == "UI" else b" "
        if len(raw) > 0xFFFE:
            raise ValueError(f"identifier attribute {keyword} is too long ({len(raw)} bytes)")
        out += struct.pack(order + "HH", tag >> 16, tag & 0xFFFF)
        if implicit:
            out += struct.pack(order + "I", len(raw))
        else:
            out += vr.encode("ascii") + struct.pack(order + "H", len(raw))
        out += raw
    return bytes(out)


def decode_identifier(data: bytes, transfer_syntax: str) -> dict[str, Any]:
    """The attributes of :data:`ATTRIBUTES` found in a received identifier, by keyword.

    Attributes we do not know, and sequences, are skipped by their lengths. Raises ValueError
    when the bytes are not a dataset (a truncated element, an unterminated sequence).
    """
    implicit, little = _syntax(transfer_syntax)
    order = "<" if little else ">"
    raw: dict[str, tuple[str, bytes]] = {}
    pos, end = 0, len(data)
    view = memoryview(data)
    while pos < end:
        tag, vr, length, pos = _header(view, pos, implicit, order)
        if length == _UNDEFINED:
            pos = _skip_undefined(view, pos, implicit or vr == "UN", "<" if vr == "UN" else order)
            continue
        if pos + length > end:
            raise ValueError("identifier element runs past the end of the data")
        known = _BY_TAG.get(tag)
        if known is not None:
            raw[known[0]] = (known[1], bytes(view[pos : pos + length]))
        pos += length
    charset = _text(raw["SpecificCharacterSet"][1], "ascii") if "SpecificCharacterSet" in raw else ""
    return {keyword: _value(vr, value, charset) for keyword, (vr, value) in raw.items()}


def _syntax(transfer_syntax: str) -> tuple[bool, bool]:
    """(implicit VR, little endian) of an uncompressed transfer syntax."""
    uid = str(transfer_syntax)
    return uid == IMPLICIT_VR_LITTLE_ENDIAN, uid != EXPLICIT_VR_BIG_ENDIAN


def _header(view: memoryview, pos: int, implicit: bool, order: str) -> tuple[int, str, int, int]:
    """(tag, VR or "", value length, position of the value) of the element at ``pos``."""
    try:
        group, element = struct.unpack_from(order + "HH", view, pos)
        tag = (group << 16) | element
        if implicit or group == 0xFFFE:  # item and delimiter tags have no VR in any syntax
            (length,) = struct.unpack_from(order + "I", view, pos + 4)
            return tag, _BY_TAG.get(tag, ("", ""))[1], length, pos + 8
        vr = bytes(view[pos + 4 : pos + 6]).decode("ascii")
        if vr in _LONG_VRS:
            (length,) = struct.unpack_from(order + "I", view, pos + 8)
            return tag, vr, length, pos + 12
        (length,) = struct.unpack_from(order + "H", view, pos + 6)
        return tag, vr, length, pos + 8
    except (struct.error, UnicodeDecodeError):
        raise ValueError("identifier element header is truncated or malformed") from None


def _skip_undefined(view: memoryview, pos: int, implicit: bool, order: str) -> int:
    """Position after a sequence of undefined length that starts (its items) at ``pos``.

    Items of defined length are jumped over; items of undefined length are walked element by
    element, nested sequences included, up to their Item Delimitation.
    """
    while True:
        tag, _, length, pos = _header(view, pos, True, order)
        if tag == _SEQUENCE_END:
            return pos
        if tag != _ITEM:
            raise ValueError("identifier sequence holds something other than items")
        if length != _UNDEFINED:
            pos += length
            continue
        while True:
            tag, vr, length, pos = _header(view, pos, implicit, order)
            if tag == _ITEM_END:
                break
            if length == _UNDEFINED:
                pos = _skip_undefined(view, pos, implicit or vr == "UN", "<" if vr == "UN" else order)
            else:
                pos += length
            if pos > len(view):
                raise ValueError("identifier item runs past the end of the data")


def _codec(charset: str) -> str:
    """The Python codec of a single-valued Specific Character Set; unknown terms read as Latin-1."""
    first = charset.split("\\")[0].strip().upper()
    return _CODECS.get(first, "latin_1")


def _text(raw: bytes, codec: str) -> str:
    return raw.decode(codec, errors="replace")


def _value(vr: str, raw: bytes, charset: str) -> str | list[str]:
    """One attribute's value(s), padding stripped, text decoded per ``charset``."""
    if vr == "UI":
        raw = raw.rstrip(b"\0 ")
    if vr in _TEXT_VRS:
        text = _decode_text(raw, charset, vr)
    else:
        text = _text(raw, "ascii")
    if vr in _SINGLE_VRS:
        return text.rstrip(" ")
    if vr == "PN":  # trailing empty component groups dropped ("Wang^XiaoDong=" is one group)
        parts = [p.rstrip(" ").rstrip("=") for p in text.split("\\")]
    else:
        parts = [p.strip(" ") for p in text.split("\\")]
    return parts[0] if len(parts) == 1 else parts


def _decode_text(raw: bytes, charset: str, vr: str) -> str:
    """Text per the Specific Character Set; ISO 2022 code extensions go to pydicom's decoder."""
    terms = [t.strip().upper() for t in charset.split("\\")] if charset else [""]
    if len(terms) == 1 and not terms[0].startswith("ISO 2022") and b"\x1b" not in raw:
        return _text(raw, _codec(terms[0]))
    from pydicom.charset import convert_encodings, decode_bytes  # only for code extensions

    encodings = convert_encodings(terms)
    if vr == "PN":  # each component group, and each component, starts in the default set
        return "=".join(decode_bytes(group, encodings, {0x5E}) for group in raw.split(b"="))
    return str(decode_bytes(raw, encodings, _TEXT_DELIMITERS))
