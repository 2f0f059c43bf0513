"""The built-in storage SCP that receives the instances a C-MOVE sends us.

C-MOVE makes the archive open a *second* association back to us (the move destination) and
C-STORE each instance there. This listener is bound to the configured address and port only,
answers only to our AE title (and, when configured, only to the archive's), accepts every
storage SOP class in whatever transfer syntax the archive proposes first (we never decode, so
any syntax is fine and the archive need not transcode), and hands each dataset on undecoded.

It uses the same single-threaded PDU loop as the C-GET client (:class:`DimseLink`) rather than
pynetdicom's server, whose per-message thread hand-offs made C-MOVE several times slower;
the negotiation PDUs are :mod:`connectors.acse`'s.

One thread serves each association, and at most ``max_associations`` run at once: an archive
(or anyone else on the network) opening more is answered with A-ASSOCIATE-RJ "local limit
exceeded" (transient), which a C-MOVE SCP retries or reports as a failed sub-operation.
Finished threads are pruned on every accept, so a long C-MOVE session does not accumulate them.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable

from aggregator.errors import ConfigError
from connectors import acse
from connectors.dicom_stream import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME, SpoolBuffer, tune_socket
from connectors.dimse_link import (
    C_ECHO_RQ,
    C_STORE_RQ,
    COMMAND_FIELD,
    DEFAULT_PEER_MAX_PDU,
    VERIFICATION,
    AssociationAborted,
    AssociationReleased,
    DimseLink,
    PeerProtocolError,
    _cmd_us,
)

log = logging.getLogger(__name__)

#: Called for each received instance: (sop_class_uid, sop_instance_uid, transfer_syntax,
#: source AE title, raw dataset) -> DIMSE status to answer with; the handler closes the dataset.
InstanceHandler = Callable[[str, str, str, str, SpoolBuffer], int]

#: Associations served at once by default; Orthanc and most archives send a C-MOVE over one.
MAX_ASSOCIATIONS = 8

#: Every Storage SOP Class of the standard lives under this root (PS3.4 B.5), retired and
#: future ones included ...
STORAGE_ROOT = "1.2.840.10008.5.1.4.1.1."
#: ... but these (PS3.4 Annex B and GG, PS3.6 Annex A). Spelled out rather than read from
#: pydicom's UID constants so a C-MOVE never imports pydicom (~11 MiB of resident memory).
OTHER_STORAGE_CLASSES = frozenset({
    "1.2.840.10008.1.3.10",  # Media Storage Directory Storage
    "1.2.840.10008.5.1.4.34.7",  # RT Beams Delivery Instruction Storage
    "1.2.840.10008.5.1.4.34.10",  # RT Brachy Application Setup Delivery Instruction Storage
    "1.2.840.10008.5.1.4.38.1",  # Hanging Protocol Storage
    "1.2.840.10008.5.1.4.39.1",  # Color Palette Storage
    "1.2.840.10008.5.1.4.43.1",  # Generic Implant Template Storage
    "1.2.840.10008.5.1.4.44.1",  # Implant Assembly Template Storage
    "1.2.840.10008.5.1.4.45.1",  # Implant Template Group Storage
})


def _accepts(abstract: str) -> bool:
    """Whether the SCP takes a presentation context of this abstract syntax."""
    return abstract.startswith(STORAGE_ROOT) or abstract in OTHER_STORAGE_CLASSES or abstract == VERIFICATION


class StorageSCP:
    """A Storage SCP listening on ``host:port`` as ``ae_title``; use as a context manager."""

    def __init__(self, *, ae_title: str, host: str, port: int, handler: InstanceHandler,
                 allowed_calling_ae: str | None = None, acse_timeout: float = 30,
                 dimse_timeout: float = 120, network_timeout: float = 60,
                 max_associations: int = MAX_ASSOCIATIONS) -> None:
        self.ae_title = ae_title
        self.host = host
        self.port = port
        self.handler = handler
        self.allowed_calling_ae = allowed_calling_ae
        self.acse_timeout, self.dimse_timeout, self.network_timeout = acse_timeout, dimse_timeout, network_timeout
        self.max_associations = max(1, max_associations)
        self._listener: socket.socket | None = None
        self._acceptor: threading.Thread | None = None
        #: threads serving associations; finished ones are pruned on each accept
        self._threads: list[threading.Thread] = []
        #: associations refused because ``max_associations`` were already being served
        self.refused = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()

    def __enter__(self) -> StorageSCP:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        try:
            infos = socket.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM)
            family, _, _, _, addr = infos[0]
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(addr)
            sock.listen(8)
        except OSError as exc:
            raise ConfigError(
                f"cannot listen for C-MOVE on {self.host}:{self.port} ({exc.strerror or exc}); "
                "choose another --store-port or --store-host",
                item=f"{self.host}:{self.port}",
            ) from exc
        sock.settimeout(0.2)
        self._listener = sock
        self._acceptor = threading.Thread(target=self._accept_loop, name="storescp-accept", daemon=True)
        self._acceptor.start()
        log.debug("storage SCP %s listening on %s:%s", self.ae_title, self.host, self.port)

    def stop(self) -> None:
        self._stop.set()
        if self._acceptor is not None:
            self._acceptor.join(timeout=self.network_timeout)
        for t in list(self._threads):
            t.join(timeout=self.network_timeout)
        if self._listener is not None:
            self._listener.close()
            self._listener = None

    # -- connections ----------------------------------------------------------------------------

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self._threads = [t for t in self._threads if t.is_alive()]
            if len(self._threads) >= self.max_associations:
                self._refuse(conn)
                continue
            t = threading.Thread(target=self._serve, args=(conn,), name="storescp-assoc", daemon=True)
            t.start()
            self._threads.append(t)

    def active(self) -> int:
        """Associations being served now."""
        return sum(1 for t in self._threads if t.is_alive())

    def _refuse(self, conn: socket.socket) -> None:
        """A-ASSOCIATE-RJ (transient, local limit exceeded) without a thread of its own.

        The request is read (briefly) first, so that closing does not reset the connection
        before the peer has read our answer.
        """
        self.refused += 1
        log.warning("storage SCP: %d associations already open; one refused", self.max_associations)
        try:
            conn.settimeout(0.5)
            conn.sendall(acse.encode_rj(acse.RJ_TRANSIENT, acse.RJ_SOURCE_PRESENTATION, acse.RJ_LOCAL_LIMIT_EXCEEDED))
            conn.shutdown(socket.SHUT_WR)
            while conn.recv(65536):
                pass
        except OSError:
            pass
        finally:
            conn.close()

    def _serve(self, conn: socket.socket) -> None:
        tune_socket(conn)
        conn.settimeout(self.acse_timeout)
        try:
            peer = conn.getpeername()
        except OSError:
            conn.close()
            return
        link = DimseLink(str(peer[0]), int(peer[1]), calling_ae=self.ae_title, called_ae="",
                         connect_timeout=self.network_timeout, acse_timeout=self.acse_timeout,
                         dimse_timeout=self.dimse_timeout, requestor=False)
        link.sock = conn
        try:
            if not self._negotiate(link):
                return
            conn.settimeout(self.dimse_timeout)
            while True:
                msg = link.next_message()
                field = _cmd_us(msg.command, COMMAND_FIELD)
                if field == C_STORE_RQ:
                    link._serve_store(msg, self._locked_handler)
                elif field == C_ECHO_RQ:
                    link.answer_echo(msg)
                else:
                    log.warning("storage SCP: unexpected DIMSE command 0x%04X; aborting", field)
                    link.abort()
                    return
        except AssociationReleased:
            pass
        except (AssociationAborted, PeerProtocolError) as exc:
            log.info("storage SCP association ended: %s", exc)
        except Exception:  # a thread's error would otherwise vanish; the archive sees an abort
            log.exception("storage SCP association failed")
            link.abort()
        finally:
            link.close()

    def _locked_handler(self, sop_class: str, sop_uid: str, ts: str, source_ae: str, data: SpoolBuffer) -> int:
        with self._lock:
            return self.handler(sop_class, sop_uid, ts, source_ae, data)

    def _negotiate(self, link: DimseLink) -> bool:
        """Answer the A-ASSOCIATE-RQ: accept storage contexts, reject strangers."""
        pdu_type, body = link._read_pdu()
        if pdu_type != acse.A_ASSOCIATE_RQ:
            link.abort(acse.ABORT_SOURCE_PROVIDER, acse.ABORT_UNEXPECTED_PDU)
            return False
        try:
            rq = acse.decode_rq(body)
        except acse.PduError:
            log.info("storage SCP aborted an association: malformed A-ASSOCIATE-RQ")
            link.abort(acse.ABORT_SOURCE_PROVIDER, acse.ABORT_INVALID_PARAMETER)
            return False
        reason = None
        if rq.called_ae != self.ae_title.strip():
            reason = acse.RJ_CALLED_AE_NOT_RECOGNIZED
        elif self.allowed_calling_ae and rq.calling_ae != self.allowed_calling_ae.strip():
            reason = acse.RJ_CALLING_AE_NOT_RECOGNIZED
        if reason is not None:
            link._send(acse.encode_rj(acse.RJ_PERMANENT, acse.RJ_SOURCE_USER, reason))
            log.info("storage SCP rejected an association (reason %d)", reason)
            link.close()
            return False
        link.peer_ae = rq.calling_ae
        link.peer_max_pdu = rq.max_pdu if rq.max_pdu is not None else DEFAULT_PEER_MAX_PDU
        results = []
        for cx in rq.contexts:
            if _accepts(cx.abstract_syntax) and cx.transfer_syntaxes:
                # the first proposed transfer syntax: the sender's preference, so it need not convert
                results.append(acse.ContextResult(cx.context_id, acse.ACCEPTANCE, cx.transfer_syntaxes[0]))
                link.accepted[cx.context_id] = (cx.abstract_syntax, cx.transfer_syntaxes[0])
            else:
                ts = cx.transfer_syntaxes[0] if cx.transfer_syntaxes else "1.2.840.10008.1.2"
                results.append(acse.ContextResult(cx.context_id, acse.ABSTRACT_SYNTAX_NOT_SUPPORTED, ts))
        link._send(acse.encode_ac(rq.called_ae, rq.calling_ae, results, max_pdu=0,
                                  impl_uid=IMPLEMENTATION_CLASS_UID, impl_version=IMPLEMENTATION_VERSION_NAME))
        return True
