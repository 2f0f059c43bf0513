"""One DIMSE association over our own upper-layer code: the DICOM network stack of the project.

pynetdicom moves every PDU through three threads and several queues and naps 1 ms whenever a
queue is empty; a C-GET of 300 instances spent most of its wall time there, not on the wire
(DESIGN.md: 76 MB/s against getscu's 413 MB/s). Query and retrieve are strictly
request/response, so one thread reading PDUs straight off the socket is enough. Association
PDUs are :mod:`connectors.acse`'s and identifiers :mod:`connectors.dicom_identifier`'s; here we
frame P-DATA and the small command sets, and keep the upper-layer protocol rules (PS3.8 9) that
a peer relies on:

* a received A-ABORT is decoded into its source and reason, and named in the error;
* an unrecognised or unexpected PDU, a PDV item whose length overruns its PDU, or a PDV on a
  presentation context that was not accepted is answered with an A-ABORT (source: service
  provider, with the PS3.8 reason) *before* the error is raised, so the peer knows why;
* a release collision (the peer sends A-RELEASE-RQ while awaiting our A-RELEASE-RP, or while we
  await its A-RELEASE-RP) is resolved as PS3.8 Annex table 9-10 says: the requestor answers
  first, the acceptor after the requestor's A-RELEASE-RP;
* the A-ASSOCIATE-AC's application context must be DICOM's; the AE titles it echoes are
  compared with ours and a difference is logged (PS3.8 9.3.3.2 says the acceptor echoes them
  but they "shall not be tested", so a difference does not end the association);
* C-CANCEL-RQ can be sent during a C-FIND, C-GET or C-MOVE (``cancel()``, from any thread).

Every error raised here is in the project's tree (:mod:`aggregator.errors`): the peer going
away or stopping is a :class:`AssociationAborted` (retriable), a rejection an
:class:`AssociationRejected`, a peer breaking the protocol a :class:`PeerProtocolError`.
"""

from __future__ import annotations

import logging
import socket
import struct
import threading
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import NoReturn

from aggregator.errors import AccessDenied, ProtocolError, TransientConnectorError
from connectors import acse
from connectors.dicom_stream import (
    IMPLEMENTATION_CLASS_UID,
    IMPLEMENTATION_VERSION_NAME,
    SpoolBuffer,
    tune_socket,
)

log = logging.getLogger(__name__)

#: Receive buffer size: one ``recv`` takes whatever the socket holds up to this. Smaller than
#: 1 MiB because a buffer lives as long as any instance in it waits for the writer (RSS).
RECV_BLOCK = 256 << 10
#: We announce no maximum PDU length, so a peer may send large ones; past this it is refused
#: rather than allocated (a hostile length field).
MAX_PDU_BYTES = 64 << 20
#: A command set is a few dozen bytes; one larger than this is a broken or hostile peer.
MAX_COMMAND_BYTES = 1 << 20
#: What we assume the peer accepts when it announces no maximum PDU length of its own.
DEFAULT_PEER_MAX_PDU = 16384

PENDING = (0xFF00, 0xFF01)
C_STORE_RQ, C_STORE_RSP = 0x0001, 0x8001
C_GET_RQ, C_GET_RSP = 0x0010, 0x8010
C_MOVE_RQ, C_MOVE_RSP = 0x0021, 0x8021
C_FIND_RQ, C_FIND_RSP = 0x0020, 0x8020
C_ECHO_RQ, C_ECHO_RSP = 0x0030, 0x8030
C_CANCEL_RQ = 0x0FFF
NO_DATASET = 0x0101
HAS_DATASET = 0x0001

#: Command set elements (PS3.7 E.1), group 0000.
AFFECTED_SOP_CLASS = 0x0002
COMMAND_FIELD = 0x0100
MESSAGE_ID = 0x0110
MESSAGE_ID_RESPONDED_TO = 0x0120
MOVE_DESTINATION = 0x0600
PRIORITY = 0x0700
DATASET_TYPE = 0x0800
STATUS = 0x0900
AFFECTED_SOP_INSTANCE = 0x1000

#: Message control header bits of a PDV (PS3.8 E.2).
MCH_COMMAND, MCH_LAST = 0x01, 0x02

VERIFICATION = "1.2.840.10008.1.1"

#: (sop_class_uid, sop_instance_uid, transfer_syntax, source AE, dataset) -> C-STORE status; the
#: handler owns the dataset buffer from then on and closes it.
InstanceSink = Callable[[str, str, str, str, SpoolBuffer], int]


class AssociationRejected(AccessDenied):
    """The peer sent A-ASSOCIATE-RJ; ``result``, ``source`` and ``reason`` as PS3.8 Table 9-21."""

    def __init__(self, result: int, source: int, reason: int) -> None:
        super().__init__(f"the peer rejected the association (result {result}, source {source}, reason {reason})")
        self.result, self.source, self.reason = result, source, reason

    @property
    def transient(self) -> bool:
        return self.result == acse.RJ_TRANSIENT


class AssociationAborted(TransientConnectorError):
    """The peer aborted, closed the connection, or stopped answering.

    ``abort_source`` / ``abort_reason`` are the fields of the peer's A-ABORT when it sent one.
    """

    def __init__(self, message: str, *, abort_source: int | None = None, abort_reason: int | None = None) -> None:
        super().__init__(message)
        self.abort_source, self.abort_reason = abort_source, abort_reason


class AssociationReleased(AssociationAborted):
    """The peer released the association (the normal end when we are the acceptor)."""


class PeerProtocolError(ProtocolError):
    """The peer broke PS3.8 (unknown PDU, lengths that overrun, ...); we sent it an A-ABORT."""


def encode_command(fields: Sequence[tuple[int, bytes]]) -> bytes:
    """A command set (group 0000, implicit VR little endian) from (element, encoded value) pairs."""
    body = b"".join(struct.pack("<HHI", 0x0000, el, len(v)) + v for el, v in sorted(fields))
    return struct.pack("<HHII", 0x0000, 0x0000, 4, len(body)) + body


def _us(v: int) -> bytes:
    return struct.pack("<H", v)


def _even(value: bytes, pad: bytes) -> bytes:
    return value + pad if len(value) % 2 else value


def _uid(value: str) -> bytes:
    return _even(value.strip().encode("ascii"), b"\x00")


def decode_command(data: bytes) -> dict[int, bytes]:
    """A command set's elements by element number; a truncated tail is ignored (values are checked on use)."""
    out: dict[int, bytes] = {}
    pos = 0
    while pos + 8 <= len(data):
        _group, el, length = struct.unpack_from("<HHI", data, pos)
        out[el] = data[pos + 8 : pos + 8 + length]
        pos += 8 + length
    return out


def _cmd_us(cmd: Mapping[int, bytes], el: int, default: int = 0) -> int:
    v = cmd.get(el)
    return struct.unpack("<H", v[:2])[0] if v and len(v) >= 2 else default


def _cmd_str(cmd: Mapping[int, bytes], el: int) -> str:
    return cmd.get(el, b"").rstrip(b"\x00 ").decode("ascii", "replace")


@dataclass
class _Message:
    context_id: int
    command: dict[int, bytes]
    dataset: SpoolBuffer | None


class DimseLink:
    """One synchronous association: negotiate (as requestor), exchange DIMSE messages, release.

    Owns its socket (TCP_NODELAY, timeouts); reads whole PDUs with ``recv_into`` and keeps
    dataset fragments as memoryviews of those PDUs, so a received instance is never copied
    before it is written. The storage SCP drives one as the acceptor (``requestor=False``).
    """

    def __init__(self, host: str, port: int, *, calling_ae: str, called_ae: str,
                 connect_timeout: float, acse_timeout: float, dimse_timeout: float,
                 cancel_event: threading.Event | None = None, requestor: bool = True) -> None:
        self.host, self.port = host, port
        self.calling_ae, self.called_ae = calling_ae, called_ae
        self.connect_timeout, self.acse_timeout, self.dimse_timeout = connect_timeout, acse_timeout, dimse_timeout
        self.requestor = requestor
        self.sock: socket.socket | None = None
        #: the AE title at the other end (source of the instances we receive)
        self.peer_ae = called_ae
        self.peer_max_pdu = DEFAULT_PEER_MAX_PDU
        #: accepted presentation contexts: id -> (abstract syntax, transfer syntax)
        self.accepted: dict[int, tuple[str, str]] = {}
        #: set (from any thread) to send C-CANCEL-RQ for the running C-FIND/C-GET/C-MOVE
        self.cancel_event = cancel_event if cancel_event is not None else threading.Event()
        #: the AE titles the A-ASSOCIATE-AC echoed, when they differ from ours (called, calling)
        self.echo_mismatch: tuple[str, str] | None = None
        self._msg_id = 0
        # receive buffer: bytes [_pos, _end) are received and not yet handed out
        self._buf = bytearray()
        self._view = memoryview(self._buf)
        self._pos = self._end = 0
        # PDVs of the last P-DATA-TF not yet consumed: (context id, control header, fragment)
        self._pdvs: deque[tuple[int, int, memoryview]] = deque()

    # -- association ----------------------------------------------------------------------------

    def associate(self, contexts: Sequence[tuple[str, Sequence[str]]], scp_roles: Sequence[str] = ()) -> None:
        if len(contexts) > 128:
            raise ValueError("at most 128 presentation contexts per association")
        rq = acse.AssociateRQ(
            called_ae=self.called_ae, calling_ae=self.calling_ae,
            contexts=[acse.ProposedContext(2 * i + 1, abstract, list(syntaxes))
                      for i, (abstract, syntaxes) in enumerate(contexts)],
            max_pdu=0, roles={uid: (False, True) for uid in dict.fromkeys(scp_roles)})
        try:
            self.sock = socket.create_connection((self.host, self.port), timeout=self.connect_timeout)
        except OSError as exc:
            raise AssociationAborted(f"cannot connect: {exc.strerror or type(exc).__name__}") from exc
        tune_socket(self.sock)
        self.sock.settimeout(self.acse_timeout)
        try:
            self._send(acse.encode_rq(rq, impl_uid=IMPLEMENTATION_CLASS_UID,
                                      impl_version=IMPLEMENTATION_VERSION_NAME))
        except OSError as exc:
            self.close()
            raise AssociationAborted(f"connection failed: {exc.strerror or type(exc).__name__}") from exc
        pdu_type, body = self._read_pdu()
        if pdu_type == acse.A_ASSOCIATE_RJ:
            try:
                result, source, reason = acse.decode_rj(body)
            except acse.PduError as exc:
                self._violation(acse.ABORT_INVALID_PARAMETER, f"malformed A-ASSOCIATE-RJ: {exc}")
            self.close()
            raise AssociationRejected(result, source, reason)
        if pdu_type == acse.A_ABORT:
            self._aborted(body)
        if pdu_type != acse.A_ASSOCIATE_AC:
            self._violation(acse.ABORT_UNEXPECTED_PDU,
                            f"unexpected {acse.PDU_NAMES[pdu_type]} in answer to A-ASSOCIATE-RQ")
        try:
            ac = acse.decode_ac(body)
        except acse.PduError as exc:
            self._violation(acse.ABORT_INVALID_PARAMETER, f"malformed A-ASSOCIATE-AC: {exc}")
        if ac.application_context != acse.APPLICATION_CONTEXT:
            self._violation(acse.ABORT_INVALID_PARAMETER,
                            f"the A-ASSOCIATE-AC names application context {ac.application_context[:64]!r}, "
                            f"not DICOM's {acse.APPLICATION_CONTEXT}")
        if (ac.called_ae, ac.calling_ae) != (self.called_ae.strip(), self.calling_ae.strip()):
            self.echo_mismatch = (ac.called_ae, ac.calling_ae)
            log.warning("the A-ASSOCIATE-AC from %s:%s echoes AE titles %r/%r instead of %r/%r "
                        "(PS3.8: not tested; association kept)", self.host, self.port, ac.called_ae,
                        ac.calling_ae, self.called_ae.strip(), self.calling_ae.strip())
        proposed = {cx.context_id: cx.abstract_syntax for cx in rq.contexts}
        for item in ac.contexts:
            if item.result == acse.ACCEPTANCE and item.context_id in proposed and item.transfer_syntax:
                self.accepted[item.context_id] = (proposed[item.context_id], item.transfer_syntax)
        self.peer_max_pdu = ac.max_pdu if ac.max_pdu is not None else DEFAULT_PEER_MAX_PDU
        self.sock.settimeout(self.dimse_timeout)

    def context_for(self, abstract: str) -> tuple[int, str]:
        for cid, (ab, ts) in self.accepted.items():
            if ab == abstract:
                return cid, ts
        raise KeyError(abstract)

    def release(self) -> None:
        """A-RELEASE-RQ, then wait for the A-RELEASE-RP; never raises (it must not mask an error).

        Release collision (the peer's own A-RELEASE-RQ arrives first): as requestor we answer
        with A-RELEASE-RP and keep waiting for the peer's; as acceptor we wait for the
        requestor's A-RELEASE-RP and answer it (PS3.8 9.2, states Sta9-Sta12). P-DATA that
        was already on its way is dropped.
        """
        if self.sock is None:
            return
        try:
            self.sock.settimeout(self.acse_timeout)
            self._send(acse.encode_release_rq())
            collided = False
            while True:
                pdu_type, _ = self._read_pdu()
                if pdu_type == acse.A_RELEASE_RP:
                    if collided and not self.requestor:
                        self._send(acse.encode_release_rp())
                    break
                if pdu_type == acse.A_RELEASE_RQ and not collided:
                    collided = True
                    if self.requestor:
                        self._send(acse.encode_release_rp())
                    continue
                if pdu_type == acse.P_DATA_TF:
                    continue
                if pdu_type != acse.A_ABORT:
                    self._send(acse.encode_abort(acse.ABORT_SOURCE_PROVIDER, acse.ABORT_UNEXPECTED_PDU))
                break
        except (OSError, AssociationAborted, PeerProtocolError) as exc:
            log.debug("release of the association ended early: %s", exc)
        finally:
            self.close()

    def abort(self, source: int = acse.ABORT_SOURCE_USER, reason: int = acse.ABORT_NOT_SPECIFIED) -> None:
        if self.sock is None:
            return
        try:
            self._send(acse.encode_abort(source, reason))
        except OSError:
            pass
        self.close()

    def close(self) -> None:
        if self.sock is not None:
            try:
                self.sock.close()
            finally:
                self.sock = None

    def _violation(self, reason: int, message: str) -> NoReturn:
        """The peer broke the protocol: A-ABORT (service provider, ``reason``), then raise."""
        log.info("aborting the association with %s:%s: %s", self.host, self.port, message)
        self.abort(acse.ABORT_SOURCE_PROVIDER, reason)
        raise PeerProtocolError(message)

    def _aborted(self, body: memoryview) -> NoReturn:
        source, reason = acse.decode_abort(body)
        self.close()
        raise AssociationAborted(f"the peer aborted the association ({acse.describe_abort(source, reason)})",
                                 abort_source=source, abort_reason=reason)

    # -- PDUs ---------------------------------------------------------------------------------

    def _send(self, data: bytes) -> None:
        if self.sock is None:
            raise AssociationAborted("the association is closed")
        self.sock.sendall(data)

    def _fill(self, n: int) -> None:
        """Make at least ``n`` unread bytes available in the receive buffer.

        Reads as much as the socket has (up to ``RECV_BLOCK``) per system call rather than two
        exact reads per PDU. A full buffer is never overwritten: PDUs handed out are views into
        it that may still wait for the writer thread, so a new buffer is started and only the
        unread tail (less than one PDU) is copied into it.
        """
        if self.sock is None:
            raise AssociationAborted("the association is closed")
        if self._end - self._pos >= n:
            return
        if len(self._buf) - self._pos < n:
            tail = self._buf[self._pos : self._end]
            self._buf = bytearray(max(RECV_BLOCK, n))
            self._buf[: len(tail)] = tail
            self._view = memoryview(self._buf)
            self._pos, self._end = 0, len(tail)
        while self._end - self._pos < n:
            try:
                k = self.sock.recv_into(self._view[self._end :])
            except TimeoutError as exc:
                self.abort()
                raise AssociationAborted("the peer stopped answering (timeout)") from exc
            except OSError as exc:
                self.close()
                raise AssociationAborted(f"connection failed: {exc.strerror or type(exc).__name__}") from exc
            if k == 0:
                self.close()
                raise AssociationAborted("the peer closed the connection")
            self._end += k

    def _read_pdu(self) -> tuple[int, memoryview]:
        """The next PDU as (type, body); the body is a view valid for as long as it is held."""
        self._fill(6)
        pdu_type, _, length = struct.unpack_from(">BBI", self._buf, self._pos)
        if pdu_type not in acse.PDU_TYPES:
            self._violation(acse.ABORT_UNRECOGNIZED_PDU, f"unknown PDU type 0x{pdu_type:02X}")
        if length > MAX_PDU_BYTES:
            self._violation(acse.ABORT_INVALID_PARAMETER, f"a PDU of {length} bytes exceeds our limit")
        self._pos += 6
        self._fill(length)
        body = self._view[self._pos : self._pos + length]
        self._pos += length
        return pdu_type, body

    def send_message(self, context_id: int, command: bytes, dataset: bytes | None = None) -> None:
        limit = (self.peer_max_pdu or (1 << 24)) - 6
        limit = max(limit, 64)
        try:
            for is_cmd, data in ((True, command), (False, dataset)):
                if data is None:
                    continue
                for start in range(0, max(len(data), 1), limit):
                    frag = data[start : start + limit]
                    last = start + limit >= len(data)
                    mch = (MCH_COMMAND if is_cmd else 0) | (MCH_LAST if last else 0)
                    item = struct.pack(">IBB", len(frag) + 2, context_id, mch) + frag
                    self._send(struct.pack(">BBI", acse.P_DATA_TF, 0, len(item)) + item)
        except OSError as exc:
            self.close()
            raise AssociationAborted(f"connection failed: {exc.strerror or type(exc).__name__}") from exc

    def _next_pdv(self) -> tuple[int, int, memoryview]:
        """The next PDV item (context id, control header, fragment), reading a P-DATA-TF if needed.

        Each P-DATA-TF is checked whole before any of its PDVs is used: every item's length
        must lie within the PDU and be at least 2 (the header), nothing may trail the last item,
        and its presentation context must be one that was accepted.
        """
        while not self._pdvs:
            pdu_type, body = self._read_pdu()
            if pdu_type == acse.A_ABORT:
                self._aborted(body)
            if pdu_type == acse.A_RELEASE_RQ:
                try:
                    self._send(acse.encode_release_rp())
                except OSError:
                    pass
                self.close()
                raise AssociationReleased("the peer released the association")
            if pdu_type != acse.P_DATA_TF:
                self._violation(acse.ABORT_UNEXPECTED_PDU,
                                f"unexpected {acse.PDU_NAMES[pdu_type]} during the DIMSE exchange")
            pos, size = 0, len(body)
            if size < 6:
                self._violation(acse.ABORT_INVALID_PARAMETER, "a P-DATA-TF holds no PDV item")
            while pos < size:
                if pos + 6 > size:
                    self._violation(acse.ABORT_INVALID_PARAMETER, "a PDV item header is truncated")
                (item_len,) = struct.unpack_from(">I", body, pos)
                if item_len < 2 or pos + 4 + item_len > size:
                    self._violation(acse.ABORT_INVALID_PARAMETER,
                                    f"a PDV item of {item_len} bytes overruns its P-DATA-TF of {size}")
                context_id, mch = body[pos + 4], body[pos + 5]
                if context_id not in self.accepted:
                    self._violation(acse.ABORT_INVALID_PARAMETER,
                                    f"a PDV names presentation context {context_id}, which was not accepted")
                self._pdvs.append((context_id, mch, body[pos + 6 : pos + 4 + item_len]))
                pos += 4 + item_len
        return self._pdvs.popleft()

    def next_message(self) -> _Message:
        """Read PDVs until one DIMSE message (command + optional dataset) is complete."""
        command = bytearray()
        cmd: dict[int, bytes] | None = None
        dataset: SpoolBuffer | None = None
        context_id: int | None = None
        try:
            while True:
                cid, mch, frag = self._next_pdv()
                if context_id is None:
                    context_id = cid
                elif cid != context_id:
                    self._violation(acse.ABORT_INVALID_PARAMETER,
                                    "a DIMSE message changes presentation context part-way")
                if mch & MCH_COMMAND:
                    if cmd is not None:
                        self._violation(acse.ABORT_UNEXPECTED_PARAMETER, "a command fragment follows a whole command")
                    command += frag
                    if len(command) > MAX_COMMAND_BYTES:
                        self._violation(acse.ABORT_INVALID_PARAMETER, "a DIMSE command set is implausibly large")
                    if mch & MCH_LAST:
                        cmd = decode_command(bytes(command))
                        if _cmd_us(cmd, DATASET_TYPE, NO_DATASET) == NO_DATASET:
                            return _Message(context_id, cmd, None)
                        dataset = SpoolBuffer()
                else:
                    if cmd is None or dataset is None:
                        self._violation(acse.ABORT_UNEXPECTED_PARAMETER,
                                        "a dataset fragment arrived before its command")
                    dataset.write(frag)
                    if mch & MCH_LAST:
                        return _Message(context_id, cmd, dataset)
        except BaseException:
            if dataset is not None:
                dataset.close()
            raise

    def next_id(self) -> int:
        self._msg_id = (self._msg_id % 0xFFFF) + 1
        return self._msg_id

    # -- cancellation ---------------------------------------------------------------------------

    def cancel(self) -> None:
        """Ask for the running C-FIND/C-GET/C-MOVE to be cancelled; safe from any thread.

        The reading thread sends the C-CANCEL-RQ before it next waits for a message (sending
        from here could interleave with its PDUs); the peer then ends the operation with a
        Cancel (0xFE00) status, which the operation returns like any final status.
        """
        self.cancel_event.set()

    def _maybe_cancel(self, context_id: int, msg_id: int, sent: bool) -> bool:
        if sent or not self.cancel_event.is_set():
            return sent
        rq = encode_command([(COMMAND_FIELD, _us(C_CANCEL_RQ)), (MESSAGE_ID_RESPONDED_TO, _us(msg_id)),
                             (DATASET_TYPE, _us(NO_DATASET))])
        self.send_message(context_id, rq)
        log.info("C-CANCEL-RQ sent for message %d", msg_id)
        return True

    def _unexpected(self, field: int, op: str) -> NoReturn:
        self._violation(acse.ABORT_NOT_SPECIFIED, f"unexpected DIMSE command 0x{field:04X} during {op}")

    # -- verification ---------------------------------------------------------------------------

    def echo(self) -> int:
        """C-ECHO-RQ on the Verification context; the status of the C-ECHO-RSP."""
        cid, _ = self.context_for(VERIFICATION)
        self.send_message(cid, encode_command([
            (AFFECTED_SOP_CLASS, _uid(VERIFICATION)), (COMMAND_FIELD, _us(C_ECHO_RQ)),
            (MESSAGE_ID, _us(self.next_id())), (DATASET_TYPE, _us(NO_DATASET))]))
        msg = self.next_message()
        if msg.dataset is not None:
            msg.dataset.close()
        field = _cmd_us(msg.command, COMMAND_FIELD)
        if field != C_ECHO_RSP:
            self._unexpected(field, "C-ECHO")
        return _cmd_us(msg.command, STATUS, 0xC000)

    def answer_echo(self, msg: _Message) -> None:
        """C-ECHO-RSP (success) to a received C-ECHO-RQ (the storage SCP's side)."""
        self.send_message(msg.context_id, encode_command([
            (AFFECTED_SOP_CLASS, msg.command.get(AFFECTED_SOP_CLASS, _uid(VERIFICATION))),
            (COMMAND_FIELD, _us(C_ECHO_RSP)), (MESSAGE_ID_RESPONDED_TO, msg.command.get(MESSAGE_ID, _us(0))),
            (DATASET_TYPE, _us(NO_DATASET)), (STATUS, _us(0))]))

    # -- retrieve -----------------------------------------------------------------------------

    def retrieve(self, op: str, model: str, identifier: bytes, on_store: InstanceSink,
                 move_destination: str | None = None) -> tuple[int, bytes | None, str]:
        """Send C-GET/C-MOVE and serve the C-STOREs that follow; return (final status, identifier, ts)."""
        cid, ts = self.context_for(model)
        msg_id = self.next_id()
        fields = [(AFFECTED_SOP_CLASS, _uid(model)), (MESSAGE_ID, _us(msg_id)), (PRIORITY, _us(0)),
                  (DATASET_TYPE, _us(HAS_DATASET))]
        if op == "C-GET":
            fields.append((COMMAND_FIELD, _us(C_GET_RQ)))
        else:
            fields += [(COMMAND_FIELD, _us(C_MOVE_RQ)),
                       (MOVE_DESTINATION, _even((move_destination or "").encode("ascii"), b" "))]
        self.send_message(cid, encode_command(fields), identifier)
        rsp_field = C_GET_RSP if op == "C-GET" else C_MOVE_RSP
        cancelled = False
        while True:
            cancelled = self._maybe_cancel(cid, msg_id, cancelled)
            msg = self.next_message()
            field = _cmd_us(msg.command, COMMAND_FIELD)
            if field == C_STORE_RQ:
                self._serve_store(msg, on_store)
                continue
            if msg.dataset is not None and field != rsp_field:
                msg.dataset.close()
            if field != rsp_field:
                self._unexpected(field, op)
            status = _cmd_us(msg.command, STATUS, 0xC000)
            if status in PENDING:
                if msg.dataset is not None:
                    msg.dataset.close()
                continue
            data = None
            if msg.dataset is not None:
                data = b"".join(bytes(c) for c in msg.dataset.iter_chunks())
                msg.dataset.close()
            return status, data, self.accepted[msg.context_id][1] if msg.context_id in self.accepted else ts

    def _serve_store(self, msg: _Message, on_store: InstanceSink) -> None:
        cmd = msg.command
        sop_class = _cmd_str(cmd, AFFECTED_SOP_CLASS)
        sop_uid = _cmd_str(cmd, AFFECTED_SOP_INSTANCE)
        dataset = msg.dataset or SpoolBuffer()
        ts = self.accepted.get(msg.context_id, ("", ""))[1]
        try:
            if not ts:
                dataset.close()
                status = 0x0122  # no such accepted context: SOP class not supported
            else:
                status = on_store(sop_class, sop_uid, ts, self.peer_ae, dataset)
        except Exception:
            log.exception("storing instance %s failed", sop_uid)
            status = 0xA700
        rsp = encode_command([
            (AFFECTED_SOP_CLASS, _uid(sop_class)), (COMMAND_FIELD, _us(C_STORE_RSP)),
            (MESSAGE_ID_RESPONDED_TO, cmd.get(MESSAGE_ID, _us(0))),
            (DATASET_TYPE, _us(NO_DATASET)), (STATUS, _us(status)), (AFFECTED_SOP_INSTANCE, _uid(sop_uid)),
        ])
        self.send_message(msg.context_id, rsp)

    # -- query --------------------------------------------------------------------------------

    def find(self, model: str, identifier: bytes) -> Iterator[tuple[int, bytes | None]]:
        """Send C-FIND-RQ; yield (status, identifier bytes) for each response up to the final one.

        ``cancel()`` (or setting ``cancel_event``) between two answers sends C-CANCEL-RQ; the
        peer's last answer then carries the Cancel status.
        """
        cid, _ = self.context_for(model)
        msg_id = self.next_id()
        fields = [(AFFECTED_SOP_CLASS, _uid(model)), (COMMAND_FIELD, _us(C_FIND_RQ)), (MESSAGE_ID, _us(msg_id)),
                  (PRIORITY, _us(0)), (DATASET_TYPE, _us(HAS_DATASET))]
        self.send_message(cid, encode_command(fields), identifier)
        cancelled = False
        while True:
            cancelled = self._maybe_cancel(cid, msg_id, cancelled)
            msg = self.next_message()
            field = _cmd_us(msg.command, COMMAND_FIELD)
            data = None
            if msg.dataset is not None:
                data = b"".join(bytes(c) for c in msg.dataset.iter_chunks())
                msg.dataset.close()
            if field != C_FIND_RSP:
                self._unexpected(field, "C-FIND")
            status = _cmd_us(msg.command, STATUS, 0xC000)
            yield status, data
            if status not in PENDING:
                return
