"""IHE XDM metadata (``IHE_XDM/SUBSET01/METADATA.XML``) for the package's documents.

XDM lets a receiving system import the documents of a portable medium with their metadata: an
ebRIM ``SubmitObjectsRequest`` holding one ExtrinsicObject (DocumentEntry) per document with
its size, SHA-1 hash, MIME type and URI, a RegistryPackage (SubmissionSet) and one HasMember
Association per document.

Choice: the documents are *referenced in place* (URI ``../../documents/NAME``, relative to the
subset folder) rather than copied a second time under ``SUBSET01``. The package then holds each
document once, the manifest covers them once, and any reader that resolves the URI relative to
METADATA.XML, as XDM says, finds the file. The entries are marked with the XDS "limited
metadata" flag because a download rarely carries class/type/format/facility codes and we do
not invent them.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterator, Sequence
from datetime import datetime
from pathlib import Path

from aggregator.blobs import BlobStore
from aggregator.model import DocumentFile

LCM = "urn:oasis:names:tc:ebxml-regrep:xsd:lcm:3.0"
RIM = "urn:oasis:names:tc:ebxml-regrep:xsd:rim:3.0"
NAMESPACE = uuid.UUID("5e0a7d3c-2b9f-5c41-8e6a-1f3d0c9b7a24")
PATH = "IHE_XDM/SUBSET01/METADATA.XML"

STABLE_DOCUMENT = "urn:uuid:7edca82f-054d-47f2-a032-9b2a5b5186c1"
SUBMISSION_SET = "urn:uuid:a54d6aa5-d40d-43f9-88c1-73ada48cc1ae"
LIMITED_METADATA_DOC = "urn:uuid:ab9b591b-83ab-4d03-8f5d-f93b1fb92e85"
LIMITED_METADATA_SET = "urn:uuid:5003a9db-8d8d-49e6-bf0c-990e34ac7707"
DOC_UNIQUE_ID = "urn:uuid:2e82c1f6-a085-4c72-9da3-8640a32e42ab"
SET_UNIQUE_ID = "urn:uuid:96fdda7c-d067-4183-912e-bf5ee74998a8"
SET_SOURCE_ID = "urn:uuid:554ac39e-e3fe-47fe-b233-965d2a147832"
HAS_MEMBER = "urn:oasis:names:tc:ebxml-regrep:AssociationType:HasMember"
CLASSIFICATION = "urn:oasis:names:tc:ebxml-regrep:ObjectType:RegistryObject:Classification"
EXTERNAL_ID = "urn:oasis:names:tc:ebxml-regrep:ObjectType:RegistryObject:ExternalIdentifier"
ASSOCIATION = "urn:oasis:names:tc:ebxml-regrep:ObjectType:RegistryObject:Association"
#: OID root for UUID-derived OIDs (ISO/IEC 9834-8, "2.25.<uuid as integer>")
UUID_OID = "2.25"


def _oid(*parts: str) -> str:
    return f"{UUID_OID}.{uuid.uuid5(NAMESPACE, '|'.join(parts)).int}"


def _urn(*parts: str) -> str:
    return f"urn:uuid:{uuid.uuid5(NAMESPACE, '|'.join(parts))}"


def _dtm(timestamp: str) -> str:
    """ISO 8601 instant -> HL7 DTM in UTC (YYYYMMDDhhmmss) as XDS wants."""
    try:
        return datetime.fromisoformat(timestamp.replace("Z", "+00:00")).strftime("%Y%m%d%H%M%S")
    except ValueError:
        return "19700101000000"


# The XML is written as text, element by element, in exactly the form ElementTree gives it
# (attributes in order, two-space indentation, ``<a />`` for empty elements): building the whole
# tree held ~2.5 KB per document in memory and serialising it was a third of packaging 100k
# small documents. tests/unit/test_package.py re-serialises the output with ElementTree and
# expects the same bytes.

_ATTR_ESCAPES = str.maketrans({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "\r": "&#13;",
                               "\n": "&#10;", "\t": "&#09;"})
_TEXT_ESCAPES = str.maketrans({"&": "&amp;", "<": "&lt;", ">": "&gt;"})


def _open(level: int, tag: str, attrs: dict[str, str] | None = None, *, empty: bool = False) -> str:
    attr = "".join(f' {k}="{str(v).translate(_ATTR_ESCAPES)}"' for k, v in (attrs or {}).items())
    return f"{'  ' * level}<rim:{tag}{attr}{' />' if empty else '>'}\n"


def _close(level: int, tag: str) -> str:
    return f"{'  ' * level}</rim:{tag}>\n"


def _slot(level: int, name: str, *values: str) -> str:
    inner = "  " * (level + 2)
    vals = "".join(f"{inner}<rim:Value>{v.translate(_TEXT_ESCAPES)}</rim:Value>\n" if v else f"{inner}<rim:Value />\n"
                   for v in values)
    if not values:
        return _open(level, "Slot", {"name": name}) + _open(level + 1, "ValueList", empty=True) + _close(level, "Slot")
    return (_open(level, "Slot", {"name": name}) + _open(level + 1, "ValueList") + vals
            + _close(level + 1, "ValueList") + _close(level, "Slot"))


def _name(level: int, text: str) -> str:
    return (_open(level, "Name") + _open(level + 1, "LocalizedString", {"value": text}, empty=True)
            + _close(level, "Name"))


def _external_id(level: int, owner: str, scheme: str, value: str, label: str) -> str:
    return (_open(level, "ExternalIdentifier", {"id": _urn(owner, scheme), "registryObject": owner,
                                                "identificationScheme": scheme, "objectType": EXTERNAL_ID,
                                                "value": value})
            + _name(level + 1, label) + _close(level, "ExternalIdentifier"))


def _sha1(blobs: BlobStore, sha256: str) -> str:
    h = hashlib.sha1(usedforsecurity=False)
    with blobs.open(sha256) as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def metadata_xml(documents: Sequence[DocumentFile], blobs: BlobStore, *, case_id: str, timestamp: str,
                 seed: str) -> bytes:
    """The METADATA.XML bytes for ``documents`` (already de-duplicated, in package order)."""
    return "".join(metadata_parts(documents, blobs, case_id=case_id, timestamp=timestamp, seed=seed)).encode("utf-8")


def write_metadata_xml(path: Path, documents: Sequence[DocumentFile], blobs: BlobStore, *, case_id: str,
                       timestamp: str, seed: str) -> None:
    """Write METADATA.XML to ``path`` as it is produced: memory stays flat however many documents."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as out:
        batch: list[str] = []
        for part in metadata_parts(documents, blobs, case_id=case_id, timestamp=timestamp, seed=seed):
            batch.append(part)
            if len(batch) >= 1000:
                out.write("".join(batch))
                batch.clear()
        out.write("".join(batch))


def metadata_parts(documents: Sequence[DocumentFile], blobs: BlobStore, *, case_id: str, timestamp: str,
                   seed: str) -> Iterator[str]:
    """METADATA.XML as pieces of text, one document entry at a time."""
    yield "<?xml version='1.0' encoding='utf-8'?>\n"
    yield f'<lcm:SubmitObjectsRequest xmlns:lcm="{LCM}" xmlns:rim="{RIM}">\n'
    yield _open(1, "RegistryObjectList")
    set_id = _urn(seed, "submission-set")
    created = _dtm(timestamp)
    doc_ids = []
    for n, doc in enumerate(documents, 1):
        doc_id = _urn(seed, "document", doc.path, doc.sha256)
        doc_ids.append(doc_id)
        yield (_open(2, "ExtrinsicObject", {"id": doc_id, "mimeType": doc.content_type or "application/octet-stream",
                                            "objectType": STABLE_DOCUMENT,
                                            "status": "urn:oasis:names:tc:ebxml-regrep:StatusType:Approved"})
               + _slot(3, "hash", _sha1(blobs, doc.sha256))
               + _slot(3, "size", str(doc.size))
               + _slot(3, "URI", "../../" + doc.path)
               + _slot(3, "creationTime", created)
               + _slot(3, "languageCode", "en-US")
               + _name(3, doc.title or doc.path.rsplit("/", 1)[-1])
               + _open(3, "Classification", {"id": _urn(seed, "limited", str(n)), "classifiedObject": doc_id,
                                             "classificationNode": LIMITED_METADATA_DOC,
                                             "objectType": CLASSIFICATION}, empty=True)
               + _external_id(3, doc_id, DOC_UNIQUE_ID, _oid(seed, "document", doc.path, doc.sha256),
                              "XDSDocumentEntry.uniqueId")
               + _close(2, "ExtrinsicObject"))
    yield (_open(2, "RegistryPackage", {"id": set_id})
           + _slot(3, "submissionTime", created)
           + _name(3, f"Second-opinion package, case {case_id}")
           + _open(3, "Classification", {"id": _urn(seed, "set-classification"), "classifiedObject": set_id,
                                         "classificationNode": SUBMISSION_SET, "objectType": CLASSIFICATION},
                   empty=True)
           + _open(3, "Classification", {"id": _urn(seed, "set-limited"), "classifiedObject": set_id,
                                         "classificationNode": LIMITED_METADATA_SET, "objectType": CLASSIFICATION},
                   empty=True)
           + _external_id(3, set_id, SET_UNIQUE_ID, _oid(seed, "submission-set"), "XDSSubmissionSet.uniqueId")
           + _external_id(3, set_id, SET_SOURCE_ID, _oid("second-opinion-aggregator"), "XDSSubmissionSet.sourceId")
           + _close(2, "RegistryPackage"))
    for n, doc_id in enumerate(doc_ids, 1):
        yield (_open(2, "Association", {"id": _urn(seed, "assoc", str(n)), "associationType": HAS_MEMBER,
                                        "sourceObject": set_id, "targetObject": doc_id, "objectType": ASSOCIATION})
               + _slot(3, "SubmissionSetStatus", "Original")
               + _close(2, "Association"))
    yield _close(1, "RegistryObjectList")
    yield "</lcm:SubmitObjectsRequest>\n"
