"""What the DIMSE and DICOMweb connectors share: Part 10 framing, status classes, socket options.

Instances are stored *as received*: the dataset bytes that came over the wire are never decoded
and re-encoded, because a re-encode can silently change a file (private tags, odd VRs, character
sets) and costs most of the CPU time of a retrieve. For DIMSE we only add what Part 10 needs
around those bytes - the 128-byte preamble, ``DICM`` and a File Meta group built from the
presentation context the dataset arrived on. WADO-RS parts already are Part 10 files.
"""

from __future__ import annotations

import logging
import re
import socket
import struct
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from connectors.base import KIND_DICOM, KIND_QUERY, PatientRef, Sink

log = logging.getLogger(__name__)

#: Our implementation identity in the File Meta of the files we frame (PS3.7 D.3.3.3 rules:
#: a UID root under 2.25 built from a fixed UUID, plus a short version name).
IMPLEMENTATION_CLASS_UID = "2.25.174906223716470318474418213315418526071"
IMPLEMENTATION_VERSION_NAME = "AGGREGATOR_1"

PREAMBLE = b"\x00" * 128 + b"DICM"

EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"


def _even(value: bytes, pad: bytes) -> bytes:
    return value + pad if len(value) % 2 else value


def _element(group: int, elem: int, vr: bytes, value: bytes) -> bytes:
    """One explicit-VR little-endian element (the File Meta group is always encoded that way)."""
    if vr in (b"OB", b"OW", b"UN", b"SQ", b"UT", b"UC", b"UR"):
        return struct.pack("<HH2sHI", group, elem, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", group, elem, vr, len(value)) + value


def _uid(value: str) -> bytes:
    return _even(value.strip().encode("ascii"), b"\x00")


def file_meta(sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str,
              source_ae: str | None = None) -> bytes:
    """Preamble, ``DICM`` and the File Meta Information group (PS3.10 7.1) for one instance.

    Hand-encoded rather than built with pydicom: it is a few fixed elements, and doing it with
    ``struct`` keeps the per-instance cost in microseconds on 300-instance studies.
    """
    body = b"".join((
        _element(0x0002, 0x0001, b"OB", b"\x00\x01"),
        _element(0x0002, 0x0002, b"UI", _uid(sop_class_uid)),
        _element(0x0002, 0x0003, b"UI", _uid(sop_instance_uid)),
        _element(0x0002, 0x0010, b"UI", _uid(transfer_syntax)),
        _element(0x0002, 0x0012, b"UI", _uid(IMPLEMENTATION_CLASS_UID)),
        _element(0x0002, 0x0013, b"SH", _even(IMPLEMENTATION_VERSION_NAME.encode("ascii"), b" ")),
        _element(0x0002, 0x0016, b"AE", _even(source_ae.strip().encode("ascii"), b" ")) if source_ae else b"",
    ))
    return PREAMBLE + _element(0x0002, 0x0000, b"UL", struct.pack("<I", len(body))) + body


def split_part10(data: bytes | memoryview) -> tuple[int, str]:
    """Return (offset of the dataset, transfer syntax UID) of a Part 10 file held in memory.

    Only the File Meta group is parsed (explicit VR little endian by definition); used to
    compare files with different File Meta but the same dataset bytes, and to read the transfer
    syntax of WADO-RS parts without decoding the dataset.
    """
    mv = memoryview(data)
    if len(mv) < 132 or bytes(mv[128:132]) != b"DICM":
        raise ValueError("not a DICOM Part 10 file (no DICM prefix)")
    pos = 132
    ts = ""
    while pos + 8 <= len(mv):
        group, elem = struct.unpack_from("<HH", mv, pos)
        if group != 0x0002:
            break
        vr = bytes(mv[pos + 4 : pos + 6])
        if vr in (b"OB", b"OW", b"UN", b"SQ", b"UT", b"UC", b"UR"):
            (length,) = struct.unpack_from("<I", mv, pos + 8)
            start = pos + 12
        else:
            (length,) = struct.unpack_from("<H", mv, pos + 6)
            start = pos + 8
        if elem == 0x0010:
            ts = bytes(mv[start : start + length]).rstrip(b"\x00 ").decode("ascii")
        pos = start + length
    return pos, ts


# --- DIMSE statuses ---------------------------------------------------------------------------


@dataclass(frozen=True)
class StatusClass:
    """How a DIMSE status is treated: ``ok`` covers Success *and* Warning (PS3.7 C)."""

    code: int
    category: str
    ok: bool
    pending: bool

    @property
    def hex(self) -> str:
        return f"0x{self.code:04X}"


#: Failure codes in the 01xx/02xx ranges that PS3.7 Annex C names; 0x0107 and 0x0116 are warnings.
_WARNING_CODES = frozenset({0x0001, 0x0107, 0x0116})


def status_category(code: int) -> str:
    """The PS3.7 Annex C class of a DIMSE status: Success, Warning, Failure, Cancel or Pending."""
    if code == 0x0000:
        return "Success"
    if code in (0xFF00, 0xFF01):
        return "Pending"
    if code == 0xFE00:
        return "Cancel"
    if code in _WARNING_CODES or 0xB000 <= code <= 0xBFFF:
        return "Warning"
    if 0xA000 <= code <= 0xAFFF or 0xC000 <= code <= 0xCFFF or 0x0100 <= code <= 0x02FF:
        return "Failure"
    return "Unknown"


def classify_status(code: int) -> StatusClass:
    """Classify a DIMSE status; warnings (0xB000, 0x0107...) count as success."""
    category = status_category(code)
    return StatusClass(code, category, category in ("Success", "Warning"), category == "Pending")


# --- sockets ----------------------------------------------------------------------------------

#: Socket buffer used for large transfers; big enough that one recv() moves a whole max PDU.
SOCKET_BUFFER = 4 * 1024 * 1024


def tune_socket(sock: socket.socket) -> None:
    """TCP_NODELAY on, so small DIMSE responses do not wait for Nagle's ~40 ms delayed ACK."""
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError as exc:  # pragma: no cover - e.g. a non-TCP socket in a test harness
        log.debug("could not set TCP_NODELAY: %s", exc)


# --- handing instances to the sink ------------------------------------------------------------


def store_instance(sink: Sink, chunks: Iterable[bytes | memoryview], *, sop_uid: str,
                   meta: Mapping[str, Any]) -> None:
    """Hand one Part 10 instance (as a few chunks, no concatenation) to the sink.

    The sink hashes and writes the chunks to a temporary file and renames it into the blob
    store, so an instance is either complete or absent. Keys are SOP Instance UIDs, so a second
    copy of the same instance collapses onto the first ledger row.
    """
    sink.dicom(sop_uid, chunks, meta=dict(meta))  # type: ignore[arg-type]


def record_failure(sink: Sink, sop_uid: str, reason: str, status: int | str | None,
                   meta: Mapping[str, Any] | None = None) -> None:
    status_text = f"0x{status:04X}" if isinstance(status, int) else status
    sink.failed(KIND_DICOM, sop_uid, reason, status=status_text, meta=dict(meta or {}))


# --- spooling an incoming instance -------------------------------------------------------------

#: An instance larger than this is spilled to a temporary file while it arrives.
SPILL_BYTES = 16 * 1024 * 1024


class SpoolBuffer:
    """Collects one instance's bytes: chunks kept in memory while small, a temp file past ``SPILL_BYTES``.

    Chunks may be memoryviews of received PDUs: no copy is made while the instance is small, and
    memory stays bounded for a single huge (e.g. multi-frame) instance.
    """

    def __init__(self, spill_bytes: int = SPILL_BYTES) -> None:
        self.chunks: list[bytes | memoryview] = []
        self.size = 0
        self.spill_bytes = spill_bytes
        self.file: Any = None

    def write(self, data: bytes | memoryview) -> None:
        if not len(data):
            return
        self.size += len(data)
        if self.file is not None:
            self.file.write(data)
            return
        self.chunks.append(data)
        if self.size > self.spill_bytes:
            import tempfile

            self.file = tempfile.TemporaryFile()
            for c in self.chunks:
                self.file.write(c)
            self.chunks = []

    def head(self, n: int) -> bytes:
        if self.file is not None:
            self.file.seek(0)
            return bytes(self.file.read(n))
        out = bytearray()
        for c in self.chunks:
            out += c[: n - len(out)]
            if len(out) >= n:
                break
        return bytes(out)

    def iter_chunks(self, block: int = 1024 * 1024) -> Iterable[bytes | memoryview]:
        if self.file is None:
            yield from self.chunks
            return
        self.file.seek(0)
        while True:
            b = self.file.read(block)
            if not b:
                return
            yield b

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
        self.chunks = []


# --- a lean DIMSE association for retrieves -----------------------------------------------------
#
# pynetdicom moves every PDU through three threads and several queues and naps 1 ms whenever a
# queue is empty; a C-GET of 300 instances spends most of its wall time there, not on the wire.
# Retrieval is strictly request/response, so one thread reading PDUs straight off the socket is
# enough. Association PDUs are connectors.acse's and identifiers connectors.dicom_identifier's;
# here we frame P-DATA and the small command sets ourselves.

APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
#: Receive buffer size: one ``recv`` takes whatever the socket holds up to this. Smaller than
#: 1 MiB because a buffer lives as long as any instance in it waits for the writer (RSS).
RECV_BLOCK = 256 << 10
#: We announce no maximum PDU length, so a peer may send large ones; past this it is refused
#: rather than allocated (a hostile length field).
MAX_PDU_BYTES = 64 << 20
PENDING = (0xFF00, 0xFF01)
C_STORE_RQ, C_STORE_RSP = 0x0001, 0x8001
C_GET_RQ, C_GET_RSP = 0x0010, 0x8010
C_MOVE_RQ, C_MOVE_RSP = 0x0021, 0x8021
C_FIND_RQ, C_FIND_RSP = 0x0020, 0x8020
C_CANCEL_RQ = 0x0FFF
NO_DATASET = 0x0101

#: (sop_class_uid, sop_instance_uid, transfer_syntax, source AE, dataset) -> C-STORE status; the
#: handler owns the dataset buffer from then on and closes it.
InstanceSink = Callable[[str, str, str, str, SpoolBuffer], int]


class AssociationRejected(Exception):
    """The peer sent A-ASSOCIATE-RJ; ``args`` = (result, source, reason)."""


class AssociationAborted(Exception):
    """The peer aborted, closed the connection, or stopped answering."""


class AssociationReleased(AssociationAborted):
    """The peer released the association (the normal end when we are the acceptor)."""


def encode_command(fields: Sequence[tuple[int, bytes]]) -> bytes:
    """A command set (group 0000, implicit VR little endian) from (element, encoded value) pairs."""
    body = b"".join(struct.pack("<HHI", 0x0000, el, len(v)) + v for el, v in sorted(fields))
    return struct.pack("<HHII", 0x0000, 0x0000, 4, len(body)) + body


def _us(v: int) -> bytes:
    return struct.pack("<H", v)


def decode_command(data: bytes) -> dict[int, bytes]:
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
    """One synchronous association as requestor: negotiate, exchange DIMSE messages, release.

    Owns its socket (TCP_NODELAY, timeouts); reads whole PDUs with ``recv_into`` and keeps
    dataset fragments as memoryviews of those PDUs, so a received instance is never copied
    before it is written.
    """

    def __init__(self, host: str, port: int, *, calling_ae: str, called_ae: str,
                 connect_timeout: float, acse_timeout: float, dimse_timeout: float) -> None:
        self.host, self.port = host, port
        self.calling_ae, self.called_ae = calling_ae, called_ae
        self.connect_timeout, self.acse_timeout, self.dimse_timeout = connect_timeout, acse_timeout, dimse_timeout
        self.sock: socket.socket | None = None
        #: the AE title at the other end (source of the instances we receive)
        self.peer_ae = called_ae
        self.peer_max_pdu = 16384
        #: accepted presentation contexts: id -> (abstract syntax, transfer syntax)
        self.accepted: dict[int, tuple[str, str]] = {}
        self._msg_id = 0
        # receive buffer: bytes [_pos, _end) are received and not yet handed out
        self._buf = bytearray()
        self._view = memoryview(self._buf)
        self._pos = self._end = 0

    # -- association ----------------------------------------------------------------------------

    def associate(self, contexts: Sequence[tuple[str, Sequence[str]]], scp_roles: Sequence[str] = ()) -> None:
        from connectors import acse

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
        self._send(acse.encode_rq(rq, impl_uid=IMPLEMENTATION_CLASS_UID, impl_version=IMPLEMENTATION_VERSION_NAME))
        pdu_type, body = self._read_pdu()
        try:
            if pdu_type == acse.A_ASSOCIATE_RJ:
                result, source, reason = acse.decode_rj(body)
                self.close()
                raise AssociationRejected(result, source, reason)
            if pdu_type != acse.A_ASSOCIATE_AC:
                self.close()
                raise AssociationAborted(f"unexpected PDU 0x{pdu_type:02X} in answer to A-ASSOCIATE-RQ")
            ac = acse.decode_ac(body)
        except acse.PduError as exc:
            self.close()
            raise AssociationAborted(f"malformed answer to A-ASSOCIATE-RQ: {exc}") from exc
        proposed = {cx.context_id: cx.abstract_syntax for cx in rq.contexts}
        for item in ac.contexts:
            if item.result == acse.ACCEPTANCE and item.context_id in proposed and item.transfer_syntax:
                self.accepted[item.context_id] = (proposed[item.context_id], item.transfer_syntax)
        self.peer_max_pdu = ac.max_pdu if ac.max_pdu is not None else 16384
        self.sock.settimeout(self.dimse_timeout)

    def context_for(self, abstract: str) -> tuple[int, str]:
        for cid, (ab, ts) in self.accepted.items():
            if ab == abstract:
                return cid, ts
        raise KeyError(abstract)

    def release(self) -> None:
        if self.sock is None:
            return
        try:
            self.sock.settimeout(self.acse_timeout)
            self._send(b"\x05\x00\x00\x00\x00\x04\x00\x00\x00\x00")
            while True:
                pdu_type, _ = self._read_pdu()
                if pdu_type in (0x06, 0x07):
                    break
        except (OSError, AssociationAborted):
            pass
        finally:
            self.close()

    def abort(self) -> None:
        if self.sock is None:
            return
        try:
            self._send(b"\x07\x00\x00\x00\x00\x04\x00\x00\x00\x00")
        except OSError:
            pass
        self.close()

    def close(self) -> None:
        if self.sock is not None:
            try:
                self.sock.close()
            finally:
                self.sock = None

    # -- PDUs ---------------------------------------------------------------------------------

    def _send(self, data: bytes) -> None:
        assert self.sock is not None
        self.sock.sendall(data)

    def _fill(self, n: int) -> None:
        """Make at least ``n`` unread bytes available in the receive buffer.

        Reads as much as the socket has (up to ``RECV_BLOCK``) per system call rather than two
        exact reads per PDU. A full buffer is never overwritten: PDUs handed out are views into
        it that may still wait for the writer thread, so a new buffer is started and only the
        unread tail (less than one PDU) is copied into it.
        """
        assert self.sock is not None
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
                raise AssociationAborted("the peer stopped answering (timeout)") from exc
            except OSError as exc:
                raise AssociationAborted(f"connection failed: {exc.strerror or type(exc).__name__}") from exc
            if k == 0:
                raise AssociationAborted("the peer closed the connection")
            self._end += k

    def _read_pdu(self) -> tuple[int, memoryview]:
        """The next PDU as (type, body); the body is a view valid for as long as it is held."""
        self._fill(6)
        pdu_type, _, length = struct.unpack_from(">BBI", self._buf, self._pos)
        if pdu_type not in range(1, 8):
            raise AssociationAborted(f"unknown PDU type 0x{pdu_type:02X}")
        if length > MAX_PDU_BYTES:
            raise AssociationAborted(f"a PDU of {length} bytes exceeds our limit")
        self._pos += 6
        self._fill(length)
        body = self._view[self._pos : self._pos + length]
        self._pos += length
        return pdu_type, body

    def send_message(self, context_id: int, command: bytes, dataset: bytes | None = None) -> None:
        limit = (self.peer_max_pdu or (1 << 24)) - 6
        limit = max(limit, 64)
        for is_cmd, data in ((True, command), (False, dataset)):
            if data is None:
                continue
            for start in range(0, max(len(data), 1), limit):
                frag = data[start : start + limit]
                last = start + limit >= len(data)
                mch = (0x01 if is_cmd else 0x00) | (0x02 if last else 0x00)
                item = struct.pack(">IBB", len(frag) + 2, context_id, mch) + frag
                self._send(struct.pack(">BBI", 0x04, 0, len(item)) + item)

    def next_message(self) -> _Message:
        """Read PDUs until one DIMSE message (command + optional dataset) is complete."""
        command = bytearray()
        cmd: dict[int, bytes] | None = None
        dataset: SpoolBuffer | None = None
        context_id = 0
        while True:
            pdu_type, body = self._read_pdu()
            if pdu_type == 0x07:
                raise AssociationAborted("the peer aborted the association")
            if pdu_type == 0x05:
                self._send(b"\x06\x00\x00\x00\x00\x04\x00\x00\x00\x00")
                raise AssociationReleased("the peer released the association")
            if pdu_type != 0x04:
                raise AssociationAborted(f"unexpected PDU 0x{pdu_type:02X} during DIMSE exchange")
            view = memoryview(body)
            pos = 0
            while pos + 6 <= len(body):
                (item_len,) = struct.unpack_from(">I", body, pos)
                context_id = body[pos + 4]
                mch = body[pos + 5]
                frag = view[pos + 6 : pos + 4 + item_len]
                pos += 4 + item_len
                if mch & 0x01:
                    command += frag
                    if mch & 0x02:
                        cmd = decode_command(bytes(command))
                        if _cmd_us(cmd, 0x0800, NO_DATASET) == NO_DATASET:
                            return _Message(context_id, cmd, None)
                        dataset = SpoolBuffer()
                else:
                    if dataset is None:
                        dataset = SpoolBuffer()
                    dataset.write(frag)
                    if mch & 0x02:
                        if cmd is None:
                            raise AssociationAborted("dataset received before its command")
                        return _Message(context_id, cmd, dataset)

    def next_id(self) -> int:
        self._msg_id = (self._msg_id % 0xFFFF) + 1
        return self._msg_id

    # -- retrieve -----------------------------------------------------------------------------

    def retrieve(self, op: str, model: str, identifier: bytes, on_store: InstanceSink,
                 move_destination: str | None = None) -> tuple[int, bytes | None, str]:
        """Send C-GET/C-MOVE and serve the C-STOREs that follow; return (final status, identifier, ts)."""
        cid, ts = self.context_for(model)
        msg_id = self.next_id()
        fields = [(0x0002, _uid(model)), (0x0110, _us(msg_id)), (0x0700, _us(0)), (0x0800, _us(0x0001))]
        if op == "C-GET":
            fields.append((0x0100, _us(C_GET_RQ)))
        else:
            fields += [(0x0100, _us(C_MOVE_RQ)),
                       (0x0600, _even((move_destination or "").encode("ascii"), b" "))]
        self.send_message(cid, encode_command(fields), identifier)
        rsp_field = C_GET_RSP if op == "C-GET" else C_MOVE_RSP
        while True:
            msg = self.next_message()
            field = _cmd_us(msg.command, 0x0100)
            if field == C_STORE_RQ:
                self._serve_store(msg, on_store)
                continue
            if field != rsp_field:
                raise AssociationAborted(f"unexpected DIMSE command 0x{field:04X} during {op}")
            status = _cmd_us(msg.command, 0x0900, 0xC000)
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
        sop_class = _cmd_str(cmd, 0x0002)
        sop_uid = _cmd_str(cmd, 0x1000)
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
            (0x0002, _uid(sop_class)), (0x0100, _us(C_STORE_RSP)), (0x0120, cmd.get(0x0110, _us(0))),
            (0x0800, _us(NO_DATASET)), (0x0900, _us(status)), (0x1000, _uid(sop_uid)),
        ])
        self.send_message(msg.context_id, rsp)

    # -- query --------------------------------------------------------------------------------

    def find(self, model: str, identifier: bytes) -> Iterator[tuple[int, bytes | None]]:
        """Send C-FIND-RQ; yield (status, identifier bytes) for each response up to the final one."""
        cid, _ = self.context_for(model)
        fields = [(0x0002, _uid(model)), (0x0100, _us(C_FIND_RQ)), (0x0110, _us(self.next_id())),
                  (0x0700, _us(0)), (0x0800, _us(0x0001))]
        self.send_message(cid, encode_command(fields), identifier)
        while True:
            msg = self.next_message()
            field = _cmd_us(msg.command, 0x0100)
            if field != C_FIND_RSP:
                raise AssociationAborted(f"unexpected DIMSE command 0x{field:04X} during C-FIND")
            status = _cmd_us(msg.command, 0x0900, 0xC000)
            data = None
            if msg.dataset is not None:
                data = b"".join(bytes(c) for c in msg.dataset.iter_chunks())
                msg.dataset.close()
            yield status, data
            if status not in PENDING:
                return


# --- writing behind the network -----------------------------------------------------------------


class BackgroundWriter:
    """Runs sink writes on one worker thread, so hashing and disk writes overlap the network.

    Both hashlib and file writes release the GIL on large buffers, so on two cores the socket
    keeps being read while the previous instance is written. At most ``max_bytes`` of received
    data wait in the queue (bounded memory). The sink is only ever called from the worker while
    the writer is open, so it needs no locking. ``close()`` waits for everything and re-raises
    the first error that was not an item-level failure.
    """

    #: Received bytes that may wait for the writer. Measured on a 300 x 512 KiB WADO-RS study:
    #: 8 MiB cost ~7-9 MiB of RSS growth, 2 MiB ~3-4 MiB, with no measurable loss of speed.
    MAX_PENDING = 2 * 1024 * 1024

    def __init__(self, max_bytes: int = MAX_PENDING) -> None:
        import threading

        self.max_bytes = max_bytes
        self._pending = 0
        self._queue: list[tuple[Callable[[], None], int]] = []
        self._cond = threading.Condition()
        self._closed = False
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="dicom-writer", daemon=True)
        self._thread.start()

    def submit(self, job: Callable[[], None], size: int) -> None:
        with self._cond:
            while self._pending and self._pending + size > self.max_bytes and self.error is None:
                self._cond.wait()
            if self.error is not None:
                raise self.error
            self._queue.append((job, size))
            self._pending += size
            self._cond.notify_all()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if not self._queue:
                    return
                job, size = self._queue.pop(0)
            try:
                if self.error is None:
                    job()
            except BaseException as exc:  # handed to the submitting thread
                self.error = exc
            finally:
                with self._cond:
                    self._pending -= size
                    self._cond.notify_all()

    def drain(self) -> None:
        """Wait until every submitted job has run; re-raise a worker error."""
        with self._cond:
            while self._pending or self._queue:
                if self.error is not None:
                    break
                self._cond.wait()
        if self.error is not None:
            raise self.error

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join()
        if self.error is not None:
            raise self.error

    def __enter__(self) -> BackgroundWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- report to study: hints from the FHIR data, matched against the archive ---------------------
#
# Rule (which archive studies a hint may bring in):
#   * A hint is queried at STUDY level by StudyInstanceUID, else by AccessionNumber, else by
#     StudyDate + ModalitiesInStudy scoped to the patient's PatientID (only when one is known).
#   * Only exact matches count (the archive's answer is re-checked: no wildcard or prefix match).
#   * A match under the patient's own PatientID (and issuer, when given) is taken.
#   * A UID or accession match under another PatientID (an archive that files the patient under
#     its own identifier) is taken only when nothing contradicts the patient: the birth date and
#     the family name, where both sides have one, must agree, and all the matches must belong to
#     one patient. A date + modality match is never taken outside the patient's PatientID.
#   * Anything else is a ``query`` gap in the ledger keyed ``study:<ref>``, with the reason.

_HINT_UID = re.compile(r"^[0-9]+(\.[0-9]+)+$")


@dataclass(frozen=True)
class StudyHint:
    """One report or ImagingStudy that names an imaging study (see ``aggregator.jobs.hints``)."""

    ref: str
    study_uid: str | None = None
    accession: str | None = None
    date: str | None = None
    modality: str | None = None

    @classmethod
    def parse(cls, data: Mapping[str, Any]) -> StudyHint:
        """A hint from config JSON; values that could widen a C-FIND/QIDO match are dropped.

        A ``*``, ``?`` or ``\\`` in an accession number would make it a wildcard or list query,
        so such a value is not used; UIDs must be well-formed, dates YYYYMMDD.
        """
        def text(key: str) -> str | None:
            v = data.get(key)
            return str(v).strip() or None if v is not None else None

        uid, acc, date, mod = text("study_uid"), text("accession"), text("date"), text("modality")
        return cls(
            ref=text("ref") or "unknown",
            study_uid=uid if uid and len(uid) <= 64 and _HINT_UID.match(uid) else None,
            accession=acc if acc and len(acc) <= 64 and not set(acc) & set("*?\\") else None,
            date=date.replace("-", "") if date and re.match(r"^\d{4}-?\d{2}-?\d{2}$", date) else None,
            modality=mod.upper() if mod and re.match(r"^[A-Za-z]{2,3}$", mod) else None,
        )

    @property
    def key(self) -> str:
        return "study:" + self.ref

    def criterion(self, patient_id: str | None) -> str | None:
        if self.study_uid:
            return "uid"
        if self.accession:
            return "accession"
        if self.date and self.modality and patient_id:
            return "date+modality"
        return None


def parse_hints(raw: Sequence[Mapping[str, Any]] | None) -> list[StudyHint]:
    """Config hints, one per ref (the first wins)."""
    out: dict[str, StudyHint] = {}
    for item in raw or []:
        if isinstance(item, Mapping):
            hint = StudyHint.parse(item)
            out.setdefault(hint.ref, hint)
    return list(out.values())


@dataclass
class StudyMatch:
    """A study the archive returned for a hint query, with what identifies its patient."""

    study_uid: str
    patient_id: str = ""
    issuer: str = ""
    name: str = ""
    birth_date: str = ""
    accession: str = ""
    date: str = ""
    modalities: frozenset[str] = frozenset()
    count: int | None = None
    sop_classes: tuple[str, ...] = ()


NO_CRITERIA = ("the report names no StudyInstanceUID or accession number, and no date with a modality "
               "for a known PatientID", "no-criteria")


def select_hinted(hint: StudyHint, how: str, found: Sequence[StudyMatch], patient: PatientRef
                  ) -> tuple[list[StudyMatch], str | None, str | None]:
    """Apply the rule above: (studies to take, gap reason, gap status); the reason is PHI-free."""
    if how == "uid":
        exact = [m for m in found if m.study_uid == hint.study_uid]
    elif how == "accession":
        exact = [m for m in found if m.accession == hint.accession]
    else:
        exact = [m for m in found if m.date == hint.date and hint.modality in m.modalities]
    if not exact:
        return [], f"no matching study at the archive (matched on {how})", "not-found"
    own = [m for m in exact if patient.id and m.patient_id == patient.id
           and (not patient.issuer or not m.issuer or m.issuer == patient.issuer)]
    if own:
        return own, None, None
    if how == "date+modality":
        return [], "no matching study of this patient at the archive (matched on date+modality)", "not-found"
    fitting = [m for m in exact if not _contradicts(m, patient)]
    if not fitting:
        return [], (f"the study matching on {how} belongs to another patient at the archive "
                    "(birth date or name differ)"), "other-patient"
    if len({(m.patient_id, m.issuer) for m in fitting}) > 1:
        return [], f"the {how} matches studies of several patients at the archive", "ambiguous"
    return fitting, None, None


def _fold(text: str) -> set[str]:
    import unicodedata

    plain = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode().lower()
    return {t for t in re.split(r"[^a-z]+", plain) if len(t) > 1}


def _contradicts(m: StudyMatch, patient: PatientRef) -> bool:
    """True when the study's birth date or family name disagrees with the patient's."""
    if patient.birth_date and m.birth_date:
        mine = re.sub(r"\D", "", patient.birth_date)[:8]
        theirs = re.sub(r"\D", "", m.birth_date)[:8]
        if len(mine) == 8 and len(theirs) == 8 and mine != theirs:
            return True
    if patient.name and m.name:
        family = _fold(m.name.split("^")[0])
        if family and not family & _fold(patient.name):
            return True
    return False


def record_hint_gap(sink: Sink, hint: StudyHint, reason: str, status: str) -> None:
    log.info("study hint %s: %s", hint.ref, reason)
    sink.failed(KIND_QUERY, hint.key, reason, status=status, meta={"ref": hint.ref})


# --- whose studies: one PatientID, several people -------------------------------------------------
#
# A PatientID is unique only within its issuer. An archive fed by several hospitals can hold two
# people under one PatientID, and a query by PatientID alone returns both. With the source's
# issuer configured, the connectors query with it and drop other issuers. Without one,
# :func:`own_studies` decides: studies whose birth date or family name contradict the case's
# patient are another person's; if what remains still belongs to more than one person
# (different issuers or birth dates), none of it is taken, because guessing would put another
# patient's images in the consultant's package. Both outcomes are query gaps, so the navigator
# sees them and what to do.

#: ledger key prefix of such a gap; the StudyInstanceUID follows. The gap report reads "Study" in
#: a query key as "about images" and finds the study by its UID in the key.
PATIENT_STUDY = "query:Study/"


def patient_studies(found: Iterable[StudyMatch], patient: PatientRef, modalities: str | None,
                    sink: Sink) -> list[StudyMatch]:
    """What a query by the patient's PatientID returned, kept when it is this patient's study.

    Dropped: answers without a StudyInstanceUID, of another PatientID (an archive that matched
    loosely), of another issuer when the source names one, or without any of ``modalities``
    (comma or backslash separated). The rest goes through :func:`own_studies`.
    """
    wanted = {m.strip().upper() for m in (modalities or "").replace("\\", ",").split(",") if m.strip()}
    issuer = (patient.issuer or "").strip()
    kept: list[StudyMatch] = []
    for m in found:
        if not m.study_uid:
            continue
        if (m.patient_id or patient.id) != patient.id:
            log.warning("the query returned a study of another PatientID; skipped: %s", m.study_uid)
            continue
        if issuer and m.issuer != issuer:
            log.info("study %s belongs to another issuer of the same PatientID; skipped", m.study_uid)
            continue
        if wanted and not wanted & m.modalities:
            continue
        kept.append(m)
    return own_studies(kept, patient, sink)


def own_studies(found: Sequence[StudyMatch], patient: PatientRef, sink: Sink) -> list[StudyMatch]:
    """The studies found by PatientID alone that are this patient's (see the rule above)."""
    if patient.issuer or _people(found) <= 1:
        return list(found)
    other = [m for m in found if _contradicts(m, patient)]
    for m in other:
        _record_patient_gap(sink, m, "a study under this PatientID belongs to another patient at the archive "
                                     "(birth date or name differ)", "other-patient")
    rest = [m for m in found if m not in other]
    if _people(rest) <= 1:
        return rest
    issuers = sorted({m.issuer for m in rest if m.issuer})
    named = f" (issuers {', '.join(issuers)})" if issuers else " (different birth dates)"
    reason = (f"this PatientID names several patients at the archive{named}; nothing of them was retrieved: "
              "set the source's --issuer, or the case's --birth-date and patient name")
    for m in rest:
        _record_patient_gap(sink, m, reason, "ambiguous")
    return []


def _people(matches: Sequence[StudyMatch]) -> int:
    """How many different people the studies certainly belong to (by issuer, then birth date)."""
    issuers = {m.issuer for m in matches if m.issuer}
    births = {d for d in (re.sub(r"\D", "", m.birth_date)[:8] for m in matches) if len(d) == 8}
    return max(len(issuers), len(births), 1 if matches else 0)


def _record_patient_gap(sink: Sink, m: StudyMatch, reason: str, status: str) -> None:
    log.warning("study %s not retrieved: %s", m.study_uid, status)
    sink.failed(KIND_QUERY, PATIENT_STUDY + m.study_uid, reason, status=status, meta={"study": m.study_uid})
