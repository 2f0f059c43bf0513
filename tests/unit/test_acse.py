"""Our association PDUs against pynetdicom's codec (an independent implementation of PS3.8)."""

from __future__ import annotations

import struct

import pytest
from pynetdicom.pdu import A_ABORT_RQ, A_ASSOCIATE_AC, A_ASSOCIATE_RJ, A_ASSOCIATE_RQ, A_RELEASE_RP, A_RELEASE_RQ
from pynetdicom.pdu_primitives import (
    A_ABORT,
    A_ASSOCIATE,
    A_P_ABORT,
    ImplementationClassUIDNotification,
    MaximumLengthNotification,
    SCP_SCU_RoleSelectionNegotiation,
)
from pynetdicom.presentation import build_context
from pynetdicom.status import code_to_category

from connectors import acse
from connectors.dicom_stream import status_category

CT = "1.2.840.10008.5.1.4.1.1.2"
GET = "1.2.840.10008.5.1.4.1.2.2.3"
EXPLICIT, IMPLICIT, J2K = "1.2.840.10008.1.2.1", "1.2.840.10008.1.2", "1.2.840.10008.1.2.4.90"


def test_our_request_is_what_pynetdicom_reads() -> None:
    rq = acse.AssociateRQ(called_ae="ORTHANC", calling_ae="AGGREGATOR", max_pdu=0,
                          contexts=[acse.ProposedContext(1, GET, [EXPLICIT, IMPLICIT]),
                                    acse.ProposedContext(3, CT, [J2K, EXPLICIT])],
                          roles={CT: (False, True)})
    raw = acse.encode_rq(rq, impl_uid="2.25.1", impl_version="AGG_1")
    theirs = A_ASSOCIATE_RQ()
    theirs.decode(raw)
    assert theirs.called_ae_title.strip() == "ORTHANC" and theirs.calling_ae_title.strip() == "AGGREGATOR"
    assert theirs.application_context_name == acse.APPLICATION_CONTEXT
    got = {cx.context_id: (str(cx.abstract_syntax), [str(t) for t in cx.transfer_syntax])
           for cx in theirs.presentation_context}
    assert got == {1: (GET, [EXPLICIT, IMPLICIT]), 3: (CT, [J2K, EXPLICIT])}
    ui = theirs.user_information
    assert ui is not None
    assert ui.maximum_length == 0 and ui.implementation_class_uid == "2.25.1"
    assert ui.implementation_version_name == "AGG_1"
    (role,) = ui.role_selection.values()
    assert role.sop_class_uid == CT and not role.scu_role and role.scp_role
    # and our own decoder reads it back the same
    assert acse.decode_rq(raw[6:]) == rq


def test_pynetdicoms_request_and_answers_are_what_we_read() -> None:
    prim = A_ASSOCIATE()
    prim.application_context_name = acse.APPLICATION_CONTEXT
    prim.calling_ae_title = "ORTHANC"
    prim.called_ae_title = "AGGMOVE"
    cx = build_context(CT, [J2K, EXPLICIT])
    cx.context_id = 5
    prim.presentation_context_definition_list = [cx]
    ml = MaximumLengthNotification()
    ml.maximum_length_received = 16384
    ic = ImplementationClassUIDNotification()
    ic.implementation_class_uid = "1.2.3.4"
    role = SCP_SCU_RoleSelectionNegotiation()
    role.sop_class_uid = CT
    role.scu_role = True
    role.scp_role = False
    prim.user_information = [ml, ic, role]
    rq = A_ASSOCIATE_RQ()
    rq.from_primitive(prim)
    ours = acse.decode_rq(rq.encode()[6:])
    assert (ours.called_ae, ours.calling_ae, ours.max_pdu) == ("AGGMOVE", "ORTHANC", 16384)
    assert ours.contexts == [acse.ProposedContext(5, CT, [J2K, EXPLICIT])]
    assert ours.roles == {CT: (True, False)}

    # an AC we encode, read by pynetdicom
    raw = acse.encode_ac("AGGMOVE", "ORTHANC", [acse.ContextResult(5, acse.ACCEPTANCE, J2K),
                                                acse.ContextResult(7, acse.ABSTRACT_SYNTAX_NOT_SUPPORTED, IMPLICIT)],
                         max_pdu=0, impl_uid="2.25.1", impl_version="AGG_1")
    ac = A_ASSOCIATE_AC()
    ac.decode(raw)
    assert [(c.context_id, c.result, str(c.transfer_syntax)) for c in ac.presentation_context] == [
        (5, 0, J2K), (7, 3, IMPLICIT)]
    assert ac.user_information is not None and ac.user_information.maximum_length == 0
    # and read back by us
    back = acse.decode_ac(raw[6:])
    assert back.max_pdu == 0 and [(c.context_id, c.result, c.transfer_syntax) for c in back.contexts] == [
        (5, 0, J2K), (7, 3, IMPLICIT)]

    rj = acse.encode_rj(1, 1, 7)
    theirs = A_ASSOCIATE_RJ()
    theirs.decode(rj)
    assert (theirs.result, theirs.source, theirs.reason_diagnostic) == (1, 1, 7)
    assert acse.decode_rj(rj[6:]) == (1, 1, 7)


@pytest.mark.parametrize("cut", [10, 67, 70, 75])
def test_truncated_or_overrunning_pdus_are_refused(cut: int) -> None:
    raw = acse.encode_rq(acse.AssociateRQ("A", "B", [acse.ProposedContext(1, CT, [EXPLICIT])]),
                         impl_uid="2.25.1", impl_version="")
    with pytest.raises(acse.PduError):
        acse.decode_rq(raw[6 : 6 + cut])
    # an item whose length field claims more than the PDU holds
    body = bytearray(raw[6:])
    struct.pack_into(">H", body, 68 + 2, 0xFFF0)
    with pytest.raises(acse.PduError, match="overruns"):
        acse.decode_rq(bytes(body))
    with pytest.raises(acse.PduError):
        acse.decode_rj(b"\x00\x01")


def test_status_classes_agree_with_pynetdicom() -> None:
    codes = [0x0000, 0x0001, 0x0107, 0x0116, 0x0105, 0x0122, 0x0124, 0x0210, 0xA700, 0xA801, 0xA900,
             0xB000, 0xB007, 0xC000, 0xC123, 0xFE00, 0xFF00, 0xFF01]
    assert {c: status_category(c) for c in codes} == {c: code_to_category(c) for c in codes}


def test_the_pdu_type_constants_are_pynetdicoms() -> None:
    from pynetdicom.pdu import PDU_TYPES

    theirs = {code: cls.__name__ for cls, code in PDU_TYPES.items()}
    assert {code: name.replace("-", "_") for code, name in acse.PDU_NAMES.items()} == {
        code: name.replace("A_ABORT_RQ", "A_ABORT") for code, name in theirs.items()}


@pytest.mark.parametrize(("source", "reason"), [(0, 0), (2, 0), (2, 1), (2, 2), (2, 4), (2, 5), (2, 6)])
def test_abort_both_ways_with_pynetdicom(source: int, reason: int) -> None:
    ours = acse.encode_abort(source, reason)
    theirs = A_ABORT_RQ()
    theirs.decode(ours)
    assert (theirs.source, theirs.reason_diagnostic) == (source, reason)
    if source == 2:
        prim: A_ABORT | A_P_ABORT = A_P_ABORT()
        prim.provider_reason = reason
    else:
        prim = A_ABORT()
        prim.abort_source = source
    made = A_ABORT_RQ()
    made.from_primitive(prim)
    assert acse.decode_abort(made.encode()[6:]) == (source, reason)
    assert acse.describe_abort(source, reason).startswith("source: service-")


def test_release_pdus_are_what_pynetdicom_reads() -> None:
    A_RELEASE_RQ().decode(acse.encode_release_rq())
    A_RELEASE_RP().decode(acse.encode_release_rp())
    assert acse.encode_release_rq() == A_RELEASE_RQ().encode()
    assert acse.encode_release_rp() == A_RELEASE_RP().encode()


def test_the_ac_echoes_are_read() -> None:
    raw = acse.encode_ac("ORTHANC", "AGGREGATOR", [acse.ContextResult(1, acse.ACCEPTANCE, EXPLICIT)], max_pdu=0,
                         impl_uid="2.25.1", impl_version="")
    ac = acse.decode_ac(raw[6:])
    assert (ac.called_ae, ac.calling_ae, ac.application_context) == ("ORTHANC", "AGGREGATOR", acse.APPLICATION_CONTEXT)
