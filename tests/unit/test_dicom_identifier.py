"""Our identifier codec against pydicom's reader and writer (an independent PS3.5 implementation).

The decoding cases use pydicom's bundled character-set test files (single-byte sets, UTF-8,
GB18030, and the ISO 2022 Japanese and Korean code extensions), re-encoded by pydicom in each
uncompressed transfer syntax with their sequences and private elements kept.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pydicom
import pydicom.uid
import pytest
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset
from pydicom.sequence import Sequence

from connectors import storescp
from connectors.dicom_identifier import ATTRIBUTES, decode_identifier, encode_identifier

SYNTAXES = {
    "implicit": pydicom.uid.ImplicitVRLittleEndian,
    "explicit": pydicom.uid.ExplicitVRLittleEndian,
    "big": pydicom.uid.ExplicitVRBigEndian,
}
CHARSET_DIR = Path(pydicom.__file__).parent / "data" / "charset_files"


def pydicom_bytes(ds: Dataset, syntax: str) -> bytes:
    uid = pydicom.uid.UID(syntax)
    fp = DicomBytesIO()
    fp.is_little_endian = uid.is_little_endian
    fp.is_implicit_VR = uid.is_implicit_VR
    write_dataset(fp, ds)
    return fp.getvalue()


def pydicom_values(data: bytes, syntax: str) -> dict[str, Any]:
    """What pydicom reads from ``data``, for the attributes our codec knows, as str / list[str]."""
    uid = pydicom.uid.UID(syntax)
    ds = read_dataset(__import__("io").BytesIO(data), uid.is_implicit_VR, uid.is_little_endian)
    ds.set_original_encoding(uid.is_implicit_VR, uid.is_little_endian, None)  # decoded per (0008,0005)
    out: dict[str, Any] = {}
    for keyword in ATTRIBUTES:
        if keyword in ds:
            value = ds[keyword].value
            if isinstance(value, (list, pydicom.multival.MultiValue)):
                out[keyword] = [str(v) for v in value]
            else:
                out[keyword] = "" if value is None else str(value)
    return out


@pytest.mark.parametrize("syntax", SYNTAXES.values(), ids=SYNTAXES.keys())
def test_query_encodes_as_pydicom_does(syntax: str) -> None:
    keys: dict[str, Any] = {
        "QueryRetrieveLevel": "IMAGE", "PatientID": "100200", "IssuerOfPatientID": "HOSP-A",
        "StudyInstanceUID": "1.2.826.0.1.3680043.8.498.1", "SeriesInstanceUID": "",
        "SOPInstanceUID": ["1.2.3.4", "1.2.3.45"], "StudyDate": "20200101-20201231",
        "ModalitiesInStudy": "", "NumberOfStudyRelatedInstances": "", "PatientName": "",
    }
    ds = Dataset()
    for k, v in keys.items():
        setattr(ds, k, v)
    assert encode_identifier(keys, syntax) == pydicom_bytes(ds, syntax)
    assert decode_identifier(encode_identifier(keys, syntax), syntax) == keys


def test_non_ascii_text_is_sent_as_utf8_with_its_character_set() -> None:
    keys = {"QueryRetrieveLevel": "STUDY", "PatientName": "Müller^Zoë", "PatientID": "7"}
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    for k, v in keys.items():
        setattr(ds, k, v)
    syntax = pydicom.uid.ExplicitVRLittleEndian
    ours = encode_identifier(keys, syntax)
    assert ours == pydicom_bytes(ds, syntax)
    assert decode_identifier(ours, syntax)["PatientName"] == "Müller^Zoë"


def dataset_bytes(path: Path) -> tuple[bytes, str]:
    """A file's dataset as stored (after its File Meta group) and its transfer syntax."""
    raw = path.read_bytes()
    assert raw[128:132] == b"DICM"
    meta_end = 132 + 12 + int.from_bytes(raw[140:144], "little")
    return raw[meta_end:], str(pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)


def test_decodes_what_pydicom_reads_from_real_charset_files() -> None:
    """The files' own bytes, pixel data and sequences included, in the syntax each was stored in."""
    paths = sorted(CHARSET_DIR.glob("*.dcm"))
    assert len(paths) >= 15
    names = set()
    for path in paths:
        data, syntax = dataset_bytes(path)
        theirs = pydicom_values(data, syntax)
        assert decode_identifier(data, syntax) == theirs, path.name
        names.add(theirs.get("PatientName"))
    assert len(names - {None}) >= 12  # the names themselves are what the files exercise


@pytest.mark.parametrize("syntax", SYNTAXES.values(), ids=SYNTAXES.keys())
@pytest.mark.parametrize("undefined_lengths", [False, True], ids=["defined", "undefined"])
def test_skips_sequences_and_private_elements_in_every_syntax(syntax: str, undefined_lengths: bool) -> None:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.PatientName = "Gérard^Hélène"
    ds.PatientID = "42"
    ds.StudyInstanceUID = "1.2.3"
    ds.ModalitiesInStudy = ["CT", "PT"]
    ds.add_new(0x00091002, "LO", "PRIVATE CREATOR")
    ds.add_new(0x00091010, "LO", "private")
    nested = Dataset()
    nested.CodeMeaning = "nested"
    item = Dataset()
    item.CodeValue = "T-A0100"
    item.ConceptCodeSequence = Sequence([nested])
    ds.AnatomicRegionSequence = Sequence([item, Dataset()])
    ds.OtherPatientIDsSequence = Sequence([])
    for elem in ds.iterall():
        if elem.VR == "SQ":
            elem.is_undefined_length = undefined_lengths
            for it in elem.value:
                it.is_undefined_length_sequence_item = undefined_lengths
    data = pydicom_bytes(ds, syntax)
    assert decode_identifier(data, syntax) == pydicom_values(data, syntax) == {
        "SpecificCharacterSet": "ISO_IR 100", "PatientName": "Gérard^Hélène", "PatientID": "42",
        "StudyInstanceUID": "1.2.3", "ModalitiesInStudy": ["CT", "PT"]}


def test_sequences_in_undefined_length_un_are_skipped() -> None:
    """An unknown sequence sent as UN with undefined length is implicit VR inside (PS3.5 6.2.2)."""
    inner = bytes.fromhex("08000001") + (4).to_bytes(4, "little") + b"ABCD"
    item = bytes.fromhex("feff00e0") + b"\xff\xff\xff\xff" + inner + bytes.fromhex("feff0de0") + bytes(4)
    un = (bytes.fromhex("09001110") + b"UN" + bytes(2) + b"\xff\xff\xff\xff" + item
          + bytes.fromhex("feffdde0") + bytes(4))
    tail = encode_identifier({"PatientID": "42"}, pydicom.uid.ExplicitVRLittleEndian)
    head = encode_identifier({"AccessionNumber": "A1"}, pydicom.uid.ExplicitVRLittleEndian)
    assert decode_identifier(head + un + tail, pydicom.uid.ExplicitVRLittleEndian) == \
        {"AccessionNumber": "A1", "PatientID": "42"}


@pytest.mark.parametrize("cut", [3, 7, 11, 20])
def test_truncated_identifiers_are_refused_without_their_values(cut: int) -> None:
    data = encode_identifier({"PatientName": "Doe^Jane", "PatientID": "1234567"}, pydicom.uid.ExplicitVRLittleEndian)
    with pytest.raises(ValueError) as err:
        decode_identifier(data[:cut], pydicom.uid.ExplicitVRLittleEndian)
    assert "Doe" not in str(err.value) and "1234567" not in str(err.value)


def test_an_unterminated_sequence_is_refused() -> None:
    sq = bytes.fromhex("08001511") + b"SQ" + bytes(2) + b"\xff\xff\xff\xff" + bytes.fromhex("feff00e0") + bytes(4)
    with pytest.raises(ValueError):
        decode_identifier(sq, pydicom.uid.ExplicitVRLittleEndian)


def test_unknown_attributes_are_refused_when_encoding() -> None:
    with pytest.raises(ValueError, match="PixelData"):
        encode_identifier({"PixelData": b"x"}, pydicom.uid.ImplicitVRLittleEndian)


def test_the_move_scp_accepts_every_storage_class_pydicom_names() -> None:
    named = {str(v) for k, v in vars(pydicom.uid).items()
             if "Storage" in k and isinstance(v, pydicom.uid.UID) and "Commitment" not in k}
    assert len(named) > 100
    missing = {u for u in named if not storescp._accepts(u)}
    assert not missing


def test_the_retrieve_path_does_not_import_pydicom() -> None:
    """pydicom (and the requests it loads) is ~11 MiB of a retrieve's 64 MiB budget."""
    import subprocess
    import sys

    code = ("import sys, connectors.dimse, connectors.storescp, aggregator.ledger;"
            "print(sorted(m for m in ('pydicom', 'pynetdicom', 'requests') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.stdout.strip() == "[]"
