"""Association negotiation PDUs (PS3.8 9.3.2-9.3.4): A-ASSOCIATE-RQ, -AC and -RJ, both ways.

Our DIMSE links (requestor in :mod:`connectors.dicom_stream`, acceptor in
:mod:`connectors.storescp`) encode and decode these few fixed layouts themselves. Borrowing
pynetdicom's PDU classes for them loaded all of pynetdicom (about 8 MiB of a retrieve's
resident memory, the difference between meeting a 64 MiB budget and not) for a few hundred
bytes exchanged once per association.

Layout, from PS3.8: a PDU header (type, reserved, 4-byte big-endian length); for RQ and AC a
fixed part (protocol version, reserved, called and calling AE titles of 16 bytes each, 32
reserved bytes), then variable items, each ``type, reserved, 2-byte length, value``:

* 0x10 application context name;
* 0x20 (RQ) presentation context: id, 3 reserved bytes, one 0x30 abstract syntax sub-item and
  one or more 0x40 transfer syntax sub-items;
* 0x21 (AC) presentation context: id, reserved, result, reserved, one 0x40 sub-item;
* 0x50 user information, with sub-items 0x51 maximum length (4 bytes), 0x52 implementation class
  UID, 0x55 implementation version name and 0x54 SCP/SCU role selection (2-byte UID length, UID,
  SCU role, SCP role).

An A-ASSOCIATE-RJ is a 4-byte body: reserved, result, source, reason. A-RELEASE-RQ and -RP are
4 reserved bytes; an A-ABORT is reserved, reserved, source, reason (PS3.8 9.3.6-9.3.8).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass, field

APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
PROTOCOL_VERSION = 1

#: PDU types (PS3.8 Table 9-1); anything else is an unrecognised PDU.
A_ASSOCIATE_RQ, A_ASSOCIATE_AC, A_ASSOCIATE_RJ = 0x01, 0x02, 0x03
P_DATA_TF, A_RELEASE_RQ, A_RELEASE_RP, A_ABORT = 0x04, 0x05, 0x06, 0x07
PDU_TYPES = frozenset({A_ASSOCIATE_RQ, A_ASSOCIATE_AC, A_ASSOCIATE_RJ, P_DATA_TF, A_RELEASE_RQ,
                       A_RELEASE_RP, A_ABORT})
PDU_NAMES = {A_ASSOCIATE_RQ: "A-ASSOCIATE-RQ", A_ASSOCIATE_AC: "A-ASSOCIATE-AC", A_ASSOCIATE_RJ: "A-ASSOCIATE-RJ",
             P_DATA_TF: "P-DATA-TF", A_RELEASE_RQ: "A-RELEASE-RQ", A_RELEASE_RP: "A-RELEASE-RP", A_ABORT: "A-ABORT"}

#: Item types inside negotiation PDUs (PS3.8 9.3.2.1-9.3.3.3, D.3.3).
ITEM_APPLICATION_CONTEXT = 0x10
ITEM_CONTEXT_RQ, ITEM_CONTEXT_AC = 0x20, 0x21
ITEM_ABSTRACT_SYNTAX, ITEM_TRANSFER_SYNTAX = 0x30, 0x40
ITEM_USER_INFORMATION = 0x50
SUB_MAXIMUM_LENGTH, SUB_IMPLEMENTATION_UID, SUB_ROLE_SELECTION, SUB_IMPLEMENTATION_VERSION = 0x51, 0x52, 0x54, 0x55

#: A-ABORT sources (PS3.8 Table 9-26) and the service provider's reasons.
ABORT_SOURCE_USER, ABORT_SOURCE_PROVIDER = 0, 2
ABORT_NOT_SPECIFIED, ABORT_UNRECOGNIZED_PDU, ABORT_UNEXPECTED_PDU = 0, 1, 2
ABORT_UNRECOGNIZED_PARAMETER, ABORT_UNEXPECTED_PARAMETER, ABORT_INVALID_PARAMETER = 4, 5, 6
ABORT_SOURCES = {0: "service-user", 1: "reserved", 2: "service-provider"}
ABORT_REASONS = {0: "reason not specified", 1: "unrecognized PDU", 2: "unexpected PDU",
                 4: "unrecognized PDU parameter", 5: "unexpected PDU parameter", 6: "invalid PDU parameter value"}

#: A-ASSOCIATE-RJ fields (PS3.8 Table 9-21).
RJ_PERMANENT, RJ_TRANSIENT = 1, 2
RJ_SOURCE_USER, RJ_SOURCE_ACSE, RJ_SOURCE_PRESENTATION = 1, 2, 3
RJ_CALLING_AE_NOT_RECOGNIZED, RJ_CALLED_AE_NOT_RECOGNIZED = 3, 7
RJ_LOCAL_LIMIT_EXCEEDED = 2  # with source 3 (presentation)

#: Presentation context results (PS3.8 Table 9-18)
ACCEPTANCE = 0
ABSTRACT_SYNTAX_NOT_SUPPORTED = 3


class PduError(ValueError):
    """A negotiation PDU that does not follow PS3.8 (truncated, lengths that overrun, ...)."""


@dataclass
class ProposedContext:
    context_id: int
    abstract_syntax: str
    transfer_syntaxes: list[str]


@dataclass
class ContextResult:
    context_id: int
    result: int
    transfer_syntax: str


@dataclass
class AssociateRQ:
    called_ae: str
    calling_ae: str
    contexts: list[ProposedContext] = field(default_factory=list)
    max_pdu: int | None = None
    #: SOP class UID -> (SCU role, SCP role) proposed by the requestor
    roles: dict[str, tuple[bool, bool]] = field(default_factory=dict)


@dataclass
class AssociateAC:
    contexts: list[ContextResult] = field(default_factory=list)
    max_pdu: int | None = None
    #: what the acceptor put in the fields the standard asks it to echo from our request
    called_ae: str = ""
    calling_ae: str = ""
    application_context: str = ""


def _ae(title: str) -> bytes:
    raw = title.encode("ascii", "replace")[:16]
    return raw.ljust(16, b" ")


def _uid(value: str) -> bytes:
    return value.strip().encode("ascii")


def _item(item_type: int, value: bytes) -> bytes:
    if len(value) > 0xFFFF:
        raise PduError("a negotiation item is longer than 65535 bytes")
    return struct.pack(">BBH", item_type, 0, len(value)) + value


def _pdu(pdu_type: int, body: bytes) -> bytes:
    return struct.pack(">BBI", pdu_type, 0, len(body)) + body


def _fixed(called_ae: str, calling_ae: str) -> bytes:
    return struct.pack(">HH", PROTOCOL_VERSION, 0) + _ae(called_ae) + _ae(calling_ae) + bytes(32)


def _user_information(max_pdu: int, impl_uid: str, impl_version: str,
                      roles: Sequence[tuple[str, bool, bool]] = ()) -> bytes:
    subs = [_item(SUB_MAXIMUM_LENGTH, struct.pack(">I", max_pdu)), _item(SUB_IMPLEMENTATION_UID, _uid(impl_uid))]
    for uid, scu, scp in roles:
        raw = _uid(uid)
        subs.append(_item(SUB_ROLE_SELECTION, struct.pack(">H", len(raw)) + raw + bytes((int(scu), int(scp)))))
    if impl_version:
        subs.append(_item(SUB_IMPLEMENTATION_VERSION, impl_version.encode("ascii")[:16]))
    return _item(ITEM_USER_INFORMATION, b"".join(subs))


def encode_rq(rq: AssociateRQ, *, impl_uid: str, impl_version: str) -> bytes:
    """A whole A-ASSOCIATE-RQ PDU; ``rq.max_pdu`` None or 0 announces no limit."""
    items = [_item(ITEM_APPLICATION_CONTEXT, _uid(APPLICATION_CONTEXT))]
    for cx in rq.contexts:
        subs = _item(ITEM_ABSTRACT_SYNTAX, _uid(cx.abstract_syntax)) + b"".join(
            _item(ITEM_TRANSFER_SYNTAX, _uid(t)) for t in cx.transfer_syntaxes)
        items.append(_item(ITEM_CONTEXT_RQ, bytes((cx.context_id, 0, 0, 0)) + subs))
    roles = [(uid, scu, scp) for uid, (scu, scp) in rq.roles.items()]
    items.append(_user_information(rq.max_pdu or 0, impl_uid, impl_version, roles))
    return _pdu(A_ASSOCIATE_RQ, _fixed(rq.called_ae, rq.calling_ae) + b"".join(items))


def encode_ac(called_ae: str, calling_ae: str, results: Sequence[ContextResult], *, max_pdu: int,
              impl_uid: str, impl_version: str) -> bytes:
    """A whole A-ASSOCIATE-AC PDU answering a request from ``calling_ae`` to ``called_ae``."""
    items = [_item(ITEM_APPLICATION_CONTEXT, _uid(APPLICATION_CONTEXT))]
    for r in results:
        items.append(_item(ITEM_CONTEXT_AC, bytes((r.context_id, 0, r.result, 0))
                           + _item(ITEM_TRANSFER_SYNTAX, _uid(r.transfer_syntax))))
    items.append(_user_information(max_pdu, impl_uid, impl_version))
    return _pdu(A_ASSOCIATE_AC, _fixed(called_ae, calling_ae) + b"".join(items))


def encode_rj(result: int, source: int, reason: int) -> bytes:
    return _pdu(A_ASSOCIATE_RJ, bytes((0, result, source, reason)))


def encode_release_rq() -> bytes:
    return _pdu(A_RELEASE_RQ, bytes(4))


def encode_release_rp() -> bytes:
    return _pdu(A_RELEASE_RP, bytes(4))


def encode_abort(source: int = ABORT_SOURCE_USER, reason: int = ABORT_NOT_SPECIFIED) -> bytes:
    """An A-ABORT; the reason is only meaningful with source 2 (service provider), else 0."""
    return _pdu(A_ABORT, bytes((0, 0, source, reason if source == ABORT_SOURCE_PROVIDER else 0)))


def decode_abort(body: bytes | memoryview) -> tuple[int, int]:
    """(source, reason) of an A-ABORT body; a truncated body reads as (service-user, 0)."""
    if len(body) < 4:
        return ABORT_SOURCE_USER, ABORT_NOT_SPECIFIED
    return body[2], body[3]


def describe_abort(source: int, reason: int) -> str:
    """What an A-ABORT says, in words (for errors and logs)."""
    who = ABORT_SOURCES.get(source, f"source {source}")
    if source != ABORT_SOURCE_PROVIDER:
        return f"source: {who}"
    return f"source: {who}, reason: {ABORT_REASONS.get(reason, f'reason {reason}')}"


def decode_rj(body: bytes | memoryview) -> tuple[int, int, int]:
    """(result, source, reason) of an A-ASSOCIATE-RJ body."""
    if len(body) < 4:
        raise PduError("A-ASSOCIATE-RJ is truncated")
    return body[1], body[2], body[3]


def _items(body: bytes | memoryview, start: int) -> list[tuple[int, bytes]]:
    out = []
    pos = start
    data = bytes(body)
    while pos < len(data):
        if pos + 4 > len(data):
            raise PduError("a negotiation item header is truncated")
        item_type, _, length = struct.unpack_from(">BBH", data, pos)
        end = pos + 4 + length
        if end > len(data):
            raise PduError(f"negotiation item 0x{item_type:02X} overruns its PDU")
        out.append((item_type, data[pos + 4 : end]))
        pos = end
    return out


def _text(value: bytes) -> str:
    return value.decode("ascii", "replace").strip(" \x00")


def _decode_user_information(value: bytes) -> tuple[int | None, dict[str, tuple[bool, bool]]]:
    max_pdu: int | None = None
    roles: dict[str, tuple[bool, bool]] = {}
    for sub_type, sub in _items(value, 0):
        if sub_type == SUB_MAXIMUM_LENGTH and len(sub) >= 4:
            (max_pdu,) = struct.unpack_from(">I", sub)
        elif sub_type == SUB_ROLE_SELECTION and len(sub) >= 2:
            (n,) = struct.unpack_from(">H", sub)
            if len(sub) >= 2 + n + 2:
                roles[_text(sub[2 : 2 + n])] = (bool(sub[2 + n]), bool(sub[3 + n]))
    return max_pdu, roles


def _check_fixed(body: bytes | memoryview, what: str) -> None:
    if len(body) < 68:
        raise PduError(f"{what} is truncated")


def decode_rq(body: bytes | memoryview) -> AssociateRQ:
    """An A-ASSOCIATE-RQ body (everything after the 6-byte PDU header)."""
    _check_fixed(body, "A-ASSOCIATE-RQ")
    data = bytes(body)
    rq = AssociateRQ(called_ae=_text(data[4:20]), calling_ae=_text(data[20:36]))
    for item_type, value in _items(data, 68):
        if item_type == ITEM_CONTEXT_RQ and len(value) >= 4:
            abstract = ""
            syntaxes = []
            for sub_type, sub in _items(value, 4):
                if sub_type == ITEM_ABSTRACT_SYNTAX:
                    abstract = _text(sub)
                elif sub_type == ITEM_TRANSFER_SYNTAX:
                    syntaxes.append(_text(sub))
            rq.contexts.append(ProposedContext(value[0], abstract, syntaxes))
        elif item_type == ITEM_USER_INFORMATION:
            rq.max_pdu, rq.roles = _decode_user_information(value)
    return rq


def decode_ac(body: bytes | memoryview) -> AssociateAC:
    """An A-ASSOCIATE-AC body (everything after the 6-byte PDU header)."""
    _check_fixed(body, "A-ASSOCIATE-AC")
    data = bytes(body)
    ac = AssociateAC(called_ae=_text(data[4:20]), calling_ae=_text(data[20:36]))
    for item_type, value in _items(data, 68):
        if item_type == ITEM_APPLICATION_CONTEXT:
            ac.application_context = _text(value)
        elif item_type == ITEM_CONTEXT_AC and len(value) >= 4:
            ts = ""
            for sub_type, sub in _items(value, 4):
                if sub_type == ITEM_TRANSFER_SYNTAX:
                    ts = _text(sub)
            ac.contexts.append(ContextResult(value[0], value[2], ts))
        elif item_type == ITEM_USER_INFORMATION:
            ac.max_pdu, _ = _decode_user_information(value)
    return ac
