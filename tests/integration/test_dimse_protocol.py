"""Upper-layer protocol handling of our DICOM stack (connectors.dimse_link), peer by peer.

pynetdicom is the peer wherever it can be made to do the thing (abort, C-CANCEL, many
concurrent C-STORE associations); a raw socket peer (tests/integration/raw_peer.py) does what
no library does on purpose: unknown PDUs, PDVs overrunning their PDU, release collision, a
wrong application context or wrong echoed AE titles. What our client sent back is decoded with
pynetdicom's PDU classes.
"""

from __future__ import annotations

import ast
import logging
import struct
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.pdu import A_ABORT_RQ, A_RELEASE_RP
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    Verification,
)

from aggregator.errors import ProtocolError, TransientConnectorError
from connectors import acse
from connectors.base import NullProgress, PatientRef
from connectors.dicom_identifier import encode_identifier
from connectors.dimse import STUDY_ROOT_FIND, DimseConfig, DimseConnector
from connectors.dimse_link import VERIFICATION, AssociationAborted, DimseLink, PeerProtocolError
from connectors.storescp import StorageSCP
from tests.integration.orthanc import free_port
from tests.integration.raw_peer import Conn, RawPeer, command, p_data, pdu, uid, us
from tests.integration.test_dimse_faults import STUDY, instance
from tests.support import make_sink

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parents[2]


def link_to(port: int, **kw: Any) -> DimseLink:
    return DimseLink("127.0.0.1", port, calling_ae="AGGREGATOR", called_ae="PEER", connect_timeout=5,
                     acse_timeout=5, dimse_timeout=5, **kw)


@contextmanager
def pynetdicom_peer(contexts: list[str], handlers: list[tuple[Any, Callable[..., Any]]]) -> Iterator[int]:
    """A pynetdicom SCP called PEER on a free local port, serving ``contexts`` with ``handlers``;
    yields the port and shuts the server down however the test ends."""
    ae = AE(ae_title="PEER")
    for cx in contexts:
        ae.add_supported_context(cx)
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=handlers)
    try:
        yield port
    finally:
        server.shutdown()


def echo_rsp(context_id: int, msg_id: int = 1) -> bytes:
    return p_data(context_id, command({0x0002: uid(VERIFICATION), 0x0100: us(0x8030), 0x0120: us(msg_id),
                                       0x0800: us(0x0101), 0x0900: us(0)}), is_command=True)


def abort_from(conn: Conn) -> A_ABORT_RQ:
    """The A-ABORT our client sent to the raw peer (decoded by pynetdicom)."""
    aborts = [raw for t, raw in conn.received if t == 0x07]
    assert aborts, [t for t, _ in conn.received]
    pdu_ = A_ABORT_RQ()
    pdu_.decode(aborts[-1])
    return pdu_


# --- A-ABORT received -----------------------------------------------------------------------------


@pytest.mark.parametrize(("source", "reason", "words"), [
    (0, 0, "source: service-user"),
    (2, 1, "service-provider, reason: unrecognized PDU"),
    (2, 6, "service-provider, reason: invalid PDU parameter value"),
])
def test_a_received_abort_names_its_source_and_reason(source: int, reason: int, words: str) -> None:
    def script(conn: Conn) -> None:
        conn.accept_association()
        conn.read_pdu()  # our C-ECHO-RQ
        conn.send(pdu(0x07, bytes((0, 0, source, reason))))

    with RawPeer(script) as peer:
        link = link_to(peer.port)
        link.associate([(VERIFICATION, [ExplicitVRLittleEndian])])
        with pytest.raises(AssociationAborted, match=words) as info:
            link.echo()
        assert (info.value.abort_source, info.value.abort_reason) == (source, reason)
        assert link.sock is None
        peer.wait()


def test_pynetdicom_aborting_is_a_service_user_abort() -> None:
    def on_echo(event: Any) -> int:
        event.assoc.abort()
        return 0x0000

    with pynetdicom_peer([Verification], [(evt.EVT_C_ECHO, on_echo)]) as port:
        link = link_to(port)
        link.associate([(VERIFICATION, [ExplicitVRLittleEndian])])
        with pytest.raises(AssociationAborted, match="service-user") as info:
            link.echo()
        assert info.value.abort_source == acse.ABORT_SOURCE_USER
        # and through the connector: check() reports it instead of raising
        cfg = DimseConfig(host="127.0.0.1", port=port, called_ae="PEER")
        result = DimseConnector(cfg).check()
        assert not result.ok and "aborted" in result.details["echo_error"]


# --- protocol errors: A-ABORT first, then our error ---------------------------------------------------


def _bad_pdv(cid: int) -> list[tuple[str, bytes, str]]:
    return [
        ("pdv overruns its pdu", pdu(0x04, struct.pack(">IBB", 200, cid, 3) + bytes(20)), "overruns"),
        ("pdv shorter than its header", pdu(0x04, struct.pack(">IBB", 1, cid, 3)), "overruns"),
        ("bytes after the last pdv", pdu(0x04, struct.pack(">IBB", 2, cid, 3) + b"\x00\x00\x00"), "truncated"),
        ("empty p-data", pdu(0x04, b""), "no PDV"),
        ("context not accepted", pdu(0x04, struct.pack(">IBB", 4, 99, 3) + b"ab"), "not accepted"),
    ]


@pytest.mark.parametrize("case", range(5))
def test_a_pdv_that_does_not_fit_its_pdu_is_aborted(case: int) -> None:
    expected: dict[str, str] = {}

    def script(conn: Conn) -> None:
        rq = conn.accept_association()
        cid = rq.presentation_context[0].context_id
        conn.read_pdu()
        _name, data, words = _bad_pdv(cid)[case]
        expected["words"] = words
        conn.send(data)
        conn.drain()

    with RawPeer(script) as peer:
        link = link_to(peer.port)
        link.associate([(VERIFICATION, [ExplicitVRLittleEndian])])
        with pytest.raises(PeerProtocolError) as info:
            link.echo()
        peer.wait()
        assert expected["words"] in str(info.value)
        ab = abort_from(peer.conns[0])
        assert (ab.source, ab.reason_diagnostic) == (acse.ABORT_SOURCE_PROVIDER, acse.ABORT_INVALID_PARAMETER)


@pytest.mark.parametrize(("data", "reason", "words"), [
    (pdu(0x0A, bytes(4)), acse.ABORT_UNRECOGNIZED_PDU, "unknown PDU type 0x0A"),
    (pdu(0x00, bytes(4)), acse.ABORT_UNRECOGNIZED_PDU, "unknown PDU type 0x00"),
    (pdu(0x06, bytes(4)), acse.ABORT_UNEXPECTED_PDU, "unexpected A-RELEASE-RP"),
    (pdu(0x01, bytes(68)), acse.ABORT_UNEXPECTED_PDU, "unexpected A-ASSOCIATE-RQ"),
    (struct.pack(">BBI", 0x04, 0, 0x7FFFFFFF), acse.ABORT_INVALID_PARAMETER, "exceeds our limit"),
])
def test_an_unknown_or_unexpected_pdu_is_answered_with_an_abort(data: bytes, reason: int, words: str) -> None:
    def script(conn: Conn) -> None:
        conn.accept_association()
        conn.read_pdu()
        conn.send(data)
        conn.drain()

    with RawPeer(script) as peer:
        link = link_to(peer.port)
        link.associate([(VERIFICATION, [ExplicitVRLittleEndian])])
        with pytest.raises(PeerProtocolError, match=words):
            link.echo()
        peer.wait()
        ab = abort_from(peer.conns[0])
        assert (ab.source, ab.reason_diagnostic) == (acse.ABORT_SOURCE_PROVIDER, reason)


def test_the_connector_translates_a_protocol_error() -> None:
    def script(conn: Conn) -> None:
        conn.accept_association()
        conn.read_pdu()
        conn.send(pdu(0x0B, bytes(4)))
        conn.drain()

    with RawPeer(script) as peer:
        cfg = DimseConfig(host="127.0.0.1", port=peer.port, called_ae="PEER", dimse_timeout=5)
        h = make_sink(Path(__import__("tempfile").mkdtemp()), kind="dimse")
        with pytest.raises(ProtocolError, match="unknown PDU type 0x0B"):
            DimseConnector(cfg).pull(PatientRef(id="P-1"), None, h.sink, NullProgress())
        peer.wait()


# --- release collision ------------------------------------------------------------------------------


def test_release_collision_as_requestor() -> None:
    """Peer answers our A-RELEASE-RQ with its own: we send A-RELEASE-RP first, then await its RP."""
    def script(conn: Conn) -> None:
        conn.accept_association()
        assert conn.read_pdu()[0] == 0x05
        conn.send(pdu(0x05, bytes(4)))  # collision
        assert conn.read_pdu()[0] == 0x06  # the requestor answers first (PS3.8 Sta9 -> Sta11)
        conn.send(pdu(0x06, bytes(4)))
        conn.drain()

    with RawPeer(script) as peer:
        link = link_to(peer.port)
        link.associate([(VERIFICATION, [ExplicitVRLittleEndian])])
        t0 = time.monotonic()
        link.release()
        assert time.monotonic() - t0 < 2  # not the 5 s ACSE timeout
        assert link.sock is None
        peer.wait()
        conn = peer.conns[0]
        assert [t for t, _ in conn.received] == [0x01, 0x05, 0x06]
        rp = A_RELEASE_RP()
        rp.decode(conn.received[2][1])  # a well-formed A-RELEASE-RP by pynetdicom's reading


def test_plain_release_with_pynetdicom() -> None:
    released = threading.Event()
    with pynetdicom_peer([Verification], [(evt.EVT_RELEASED, lambda e: released.set())]) as port:
        link = link_to(port)
        link.associate([(VERIFICATION, [ExplicitVRLittleEndian])])
        assert link.echo() == 0x0000
        link.release()
        assert released.wait(5)


# --- A-ASSOCIATE-AC checks ---------------------------------------------------------------------------


def test_a_wrong_application_context_is_aborted() -> None:
    def script(conn: Conn) -> None:
        conn.accept_association(app_context="1.2.840.10008.3.1.1.2")
        conn.drain()

    with RawPeer(script) as peer:
        link = link_to(peer.port)
        with pytest.raises(PeerProtocolError, match="application context"):
            link.associate([(VERIFICATION, [ExplicitVRLittleEndian])])
        peer.wait()
        ab = abort_from(peer.conns[0])
        assert (ab.source, ab.reason_diagnostic) == (acse.ABORT_SOURCE_PROVIDER, acse.ABORT_INVALID_PARAMETER)
        cfg = DimseConfig(host="127.0.0.1", port=peer.port, called_ae="PEER")
        with pytest.raises(ProtocolError, match="application context"):
            DimseConnector(cfg).check()


def test_wrong_echoed_ae_titles_are_reported_but_not_fatal(caplog: pytest.LogCaptureFixture) -> None:
    """PS3.8 9.3.3.2: the acceptor echoes the titles, but they "shall not be tested"."""
    def script(conn: Conn) -> None:
        rq = conn.accept_association(called="NOTPEER", calling="NOTUS")
        conn.read_pdu()
        conn.send(echo_rsp(rq.presentation_context[0].context_id))
        assert conn.read_pdu()[0] == 0x05
        conn.send(pdu(0x06, bytes(4)))

    with RawPeer(script) as peer:
        link = link_to(peer.port)
        with caplog.at_level(logging.WARNING, logger="connectors.dimse_link"):
            link.associate([(VERIFICATION, [ExplicitVRLittleEndian])])
        assert link.echo_mismatch == ("NOTPEER", "NOTUS")
        assert "echoes AE titles" in caplog.text
        assert link.echo() == 0
        link.release()
        peer.wait()


def test_right_echoed_ae_titles_are_not_reported() -> None:
    def script(conn: Conn) -> None:
        conn.accept_association()
        conn.drain()

    with RawPeer(script) as peer:
        link = link_to(peer.port)
        link.associate([(VERIFICATION, [ExplicitVRLittleEndian])])
        assert link.echo_mismatch is None
        link.abort()
        peer.wait()


# --- C-ECHO and check() without pynetdicom -----------------------------------------------------------


def test_check_echoes_and_probes_with_our_own_stack() -> None:
    echoed = []
    with pynetdicom_peer(
            [Verification, StudyRootQueryRetrieveInformationModelFind, StudyRootQueryRetrieveInformationModelGet],
            [(evt.EVT_C_ECHO, lambda e: echoed.append(1) or 0x0000),
             (evt.EVT_C_FIND, lambda e: iter([(0x0000, None)])),
             (evt.EVT_C_GET, lambda e: iter([0, (0x0000, None)]))]) as port:
        result = DimseConnector(DimseConfig(host="127.0.0.1", port=port, called_ae="PEER")).check()
    assert echoed == [1]
    assert result.ok and result.details["echo"] is True
    assert result.details["find"]["STUDY"] is True
    assert result.details["retrieve_works"] == {"get": True, "move": False}


def test_no_runtime_module_imports_pynetdicom() -> None:
    """pynetdicom is the tests' peer only: no module of the service imports it."""
    offenders = []
    for folder in ("aggregator", "connectors"):
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                    [node.module or ""] if isinstance(node, ast.ImportFrom) else []
                if any(n.split(".")[0] == "pynetdicom" for n in names):
                    offenders.append(str(path.relative_to(ROOT)))
    assert offenders == []


# --- C-CANCEL -----------------------------------------------------------------------------------------


def test_c_cancel_during_c_find_against_pynetdicom() -> None:
    seen: dict[str, int] = {}

    def find(event: Any) -> Iterator[tuple[int, Dataset | None]]:
        for n in range(200):
            if event.is_cancelled:
                seen["cancelled_after"] = n
                yield 0xFE00, None
                return
            ds = Dataset()
            ds.QueryRetrieveLevel, ds.StudyInstanceUID = "STUDY", f"2.25.{n + 1}"
            yield 0xFF00, ds
            time.sleep(0.02)
        yield 0x0000, None

    with pynetdicom_peer([StudyRootQueryRetrieveInformationModelFind], [(evt.EVT_C_FIND, find)]) as port:
        link = link_to(port)
        link.associate([(STUDY_ROOT_FIND, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])])
        _, ts = link.context_for(STUDY_ROOT_FIND)
        statuses = []
        for status, _ in link.find(STUDY_ROOT_FIND, encode_identifier(
                {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": ""}, ts)):
            statuses.append(status)
            if len(statuses) == 3:
                link.cancel()
        link.release()
    assert statuses[-1] == 0xFE00
    assert "cancelled_after" in seen and seen["cancelled_after"] < 50
    assert len(statuses) == seen["cancelled_after"] + 1


def test_cancelling_a_c_get_pull_from_another_thread(tmp_path: Path) -> None:
    instances = [instance(n) for n in range(40)]
    sent = threading.Event()
    seen: dict[str, int] = {}

    def find(event: Any) -> Iterator[tuple[int, Dataset | None]]:
        ds = Dataset()
        ds.QueryRetrieveLevel, ds.StudyInstanceUID, ds.PatientID = "STUDY", STUDY, "FAULT-1"
        ds.NumberOfStudyRelatedInstances = len(instances)
        ds.SOPClassesInStudy = CTImageStorage
        yield 0xFF00, ds
        yield 0x0000, None

    def get(event: Any) -> Iterator[Any]:
        yield len(instances)
        for n, inst in enumerate(instances):
            if event.is_cancelled:
                seen["cancelled_after"] = n
                yield 0xFE00, None
                return
            yield 0xFF00, inst
            if n == 2:
                sent.set()
            time.sleep(0.05)

    ae = AE(ae_title="PEER")
    ae.add_supported_context(StudyRootQueryRetrieveInformationModelFind)
    ae.add_supported_context(StudyRootQueryRetrieveInformationModelGet)
    ae.add_supported_context(CTImageStorage, ExplicitVRLittleEndian, scu_role=True, scp_role=True)
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False,
                             evt_handlers=[(evt.EVT_C_FIND, find), (evt.EVT_C_GET, get)])
    conn = DimseConnector(DimseConfig(host="127.0.0.1", port=port, called_ae="PEER"))
    threading.Thread(target=lambda: sent.wait(10) and conn.cancel(), daemon=True).start()
    h = make_sink(tmp_path, kind="dimse")
    try:
        with pytest.raises(TransientConnectorError, match="cancelled") as info:
            conn.pull(PatientRef(id="FAULT-1"), None, h.sink, NullProgress())
    finally:
        server.shutdown()
    assert info.value.status == "0xFE00"
    assert "cancelled_after" in seen and seen["cancelled_after"] < len(instances)
    done = {e.key for e in h.entries("done")}
    assert 3 <= len(done) <= seen["cancelled_after"]  # what arrived before the cancel is kept


# --- storage SCP: bounded threads, finished ones pruned ---------------------------------------------


def test_storage_scp_bounds_and_prunes_its_threads(tmp_path: Path) -> None:
    stored: list[str] = []
    lock = threading.Lock()

    def handler(sop_class: str, sop_uid: str, ts: str, source_ae: str, data: Any) -> int:
        data.close()
        time.sleep(0.3)
        with lock:
            stored.append(sop_uid)
        return 0x0000

    port = free_port()
    scp = StorageSCP(ae_title="AGGMOVE", host="127.0.0.1", port=port, handler=handler, max_associations=3,
                     acse_timeout=5, dimse_timeout=5, network_timeout=5)
    outcomes: list[str] = []
    peak = {"threads": 0, "active": 0}
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            live = sum(1 for t in threading.enumerate() if t.name == "storescp-assoc")
            peak["threads"] = max(peak["threads"], live)
            peak["active"] = max(peak["active"], scp.active())
            time.sleep(0.005)

    def send(n: int) -> None:
        ae = AE(ae_title="ORTHANC")
        ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", port, ae_title="AGGMOVE")
        if assoc.is_established:
            status = assoc.send_c_store(instance(1000 + n))
            assoc.release()
            outcomes.append("stored" if status and status.Status == 0 else "failed")
        elif assoc.is_rejected:
            outcomes.append("rejected")
        else:
            outcomes.append("other")

    with scp:
        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        senders = [threading.Thread(target=send, args=(n,)) for n in range(12)]
        for t in senders:
            t.start()
        for t in senders:
            t.join(30)
        # afterwards, one association at a time: the finished threads do not accumulate
        for n in range(12, 20):
            send(n)
            assert len(scp._threads) <= 3
        stop.set()
        watcher.join()
        deadline = time.monotonic() + 10
        while scp.active() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert scp.active() == 0
    assert peak["threads"] <= 3 and peak["active"] <= 3
    assert len(outcomes) == 20 and set(outcomes) <= {"stored", "rejected"}
    assert outcomes.count("rejected") == scp.refused >= 1  # 12 at once against a bound of 3
    assert outcomes[12:] == ["stored"] * 8
    assert len(stored) == outcomes.count("stored")
