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
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from datetime import datetime

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


def _slot(parent: ET.Element, name: str, *values: str) -> None:
    slot = ET.SubElement(parent, f"{{{RIM}}}Slot", name=name)
    vl = ET.SubElement(slot, f"{{{RIM}}}ValueList")
    for v in values:
        ET.SubElement(vl, f"{{{RIM}}}Value").text = v


def _name(parent: ET.Element, text: str) -> None:
    name = ET.SubElement(parent, f"{{{RIM}}}Name")
    ET.SubElement(name, f"{{{RIM}}}LocalizedString", value=text)


def _external_id(parent: ET.Element, owner: str, scheme: str, value: str, label: str) -> None:
    ext = ET.SubElement(parent, f"{{{RIM}}}ExternalIdentifier", id=_urn(owner, scheme), registryObject=owner,
                        identificationScheme=scheme, objectType=EXTERNAL_ID, value=value)
    _name(ext, label)


def _sha1(blobs: BlobStore, sha256: str) -> str:
    h = hashlib.sha1(usedforsecurity=False)
    with blobs.open(sha256) as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def metadata_xml(documents: Sequence[DocumentFile], blobs: BlobStore, *, case_id: str, timestamp: str,
                 seed: str) -> bytes:
    """The METADATA.XML bytes for ``documents`` (already de-duplicated, in package order)."""
    ET.register_namespace("lcm", LCM)
    ET.register_namespace("rim", RIM)
    root = ET.Element(f"{{{LCM}}}SubmitObjectsRequest")
    objects = ET.SubElement(root, f"{{{RIM}}}RegistryObjectList")
    set_id = _urn(seed, "submission-set")
    doc_ids = []
    for n, doc in enumerate(documents, 1):
        doc_id = _urn(seed, "document", doc.path, doc.sha256)
        doc_ids.append(doc_id)
        eo = ET.SubElement(objects, f"{{{RIM}}}ExtrinsicObject", id=doc_id, mimeType=doc.content_type or
                           "application/octet-stream", objectType=STABLE_DOCUMENT, status=
                           "urn:oasis:names:tc:ebxml-regrep:StatusType:Approved")
        _slot(eo, "hash", _sha1(blobs, doc.sha256))
        _slot(eo, "size", str(doc.size))
        _slot(eo, "URI", "../../" + doc.path)
        _slot(eo, "creationTime", _dtm(timestamp))
        _slot(eo, "languageCode", "en-US")
        _name(eo, doc.title or doc.path.rsplit("/", 1)[-1])
        ET.SubElement(eo, f"{{{RIM}}}Classification", id=_urn(seed, "limited", str(n)), classifiedObject=doc_id,
                      classificationNode=LIMITED_METADATA_DOC, objectType=CLASSIFICATION)
        _external_id(eo, doc_id, DOC_UNIQUE_ID, _oid(seed, "document", doc.path, doc.sha256),
                     "XDSDocumentEntry.uniqueId")
    package = ET.SubElement(objects, f"{{{RIM}}}RegistryPackage", id=set_id)
    _slot(package, "submissionTime", _dtm(timestamp))
    _name(package, f"Second-opinion package, case {case_id}")
    ET.SubElement(package, f"{{{RIM}}}Classification", id=_urn(seed, "set-classification"), classifiedObject=set_id,
                  classificationNode=SUBMISSION_SET, objectType=CLASSIFICATION)
    ET.SubElement(package, f"{{{RIM}}}Classification", id=_urn(seed, "set-limited"), classifiedObject=set_id,
                  classificationNode=LIMITED_METADATA_SET, objectType=CLASSIFICATION)
    _external_id(package, set_id, SET_UNIQUE_ID, _oid(seed, "submission-set"), "XDSSubmissionSet.uniqueId")
    _external_id(package, set_id, SET_SOURCE_ID, _oid("second-opinion-aggregator"), "XDSSubmissionSet.sourceId")
    for n, doc_id in enumerate(doc_ids, 1):
        assoc = ET.SubElement(objects, f"{{{RIM}}}Association", id=_urn(seed, "assoc", str(n)),
                              associationType=HAS_MEMBER, sourceObject=set_id, targetObject=doc_id,
                              objectType=ASSOCIATION)
        _slot(assoc, "SubmissionSetStatus", "Original")
    ET.indent(root)
    return ET.tostring(root, encoding="utf-8", xml_declaration=True) + b"\n"
