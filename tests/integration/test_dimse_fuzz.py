"""Malformed-PDU fuzzing of our DIMSE client: mutated answers from a raw socket peer.

A well-formed exchange (A-ASSOCIATE-AC, C-FIND answers, A-RELEASE-RP; or the C-ECHO of
``endpoint check``) is mutated by Hypothesis - PDU types, PDU and PDV length fields, item
lengths, bytes flipped, inserted or cut - and sent to the real connector. Every case must end
in a clean result or in one of our own errors (:mod:`aggregator.errors`), promptly: never a
foreign exception (struct.error, IndexError, UnicodeDecodeError...), never a hang.
"""

from __future__ import annotations

import socket
import struct
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pynetdicom.pdu import A_ASSOCIATE_RQ

from aggregator.errors import AggregatorError
from connectors.base import NullProgress, PatientRef
from connectors.dimse import PATIENT_ROOT_FIND, STUDY_ROOT_FIND, DimseConfig, DimseConnector
from connectors.dimse_link import VERIFICATION
from tests.integration.raw_peer import Conn, RawPeer, associate_ac, command, p_data, pdu, uid, us
from tests.support import SinkHarness, make_sink

pytestmark = pytest.mark.timeout(600)

#: each exchange must end well within this (the client's timeouts are 0.5 s)
PROMPT = 8.0


def identifier() -> bytes:
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    ds.StudyInstanceUID = "2.25.4242"
    ds.PatientID = "SOMEONE-ELSE"  # not the patient asked for: a clean pull stores nothing
    ds.PatientName = "Fuzz^Peer"
    ds.NumberOfStudyRelatedInstances = "3"
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_dataset(fp, ds)
    return fp.getvalue()


def find_answers(cid: int) -> list[bytes]:
    pending = command({0x0002: uid(STUDY_ROOT_FIND), 0x0100: us(0x8020), 0x0120: us(1), 0x0800: us(0x0001),
                       0x0900: us(0xFF00)})
    final = command({0x0002: uid(STUDY_ROOT_FIND), 0x0100: us(0x8020), 0x0120: us(1), 0x0800: us(0x0101),
                     0x0900: us(0x0000)})
    return [p_data(cid, pending, is_command=True), p_data(cid, identifier(), is_command=False),
            p_data(cid, final, is_command=True), pdu(0x06, bytes(4))]


def echo_answers(cid: int) -> list[bytes]:
    rsp = command({0x0002: uid(VERIFICATION), 0x0100: us(0x8030), 0x0120: us(1), 0x0800: us(0x0101),
                   0x0900: us(0)})
    return [p_data(cid, rsp, is_command=True), pdu(0x06, bytes(4))]


Mutation = tuple[str, int, int, bytes]

mutations = st.lists(st.tuples(
    st.sampled_from(["pdu_type", "pdu_length", "pdv_length", "item_length", "flip", "insert", "cut"]),
    st.integers(0, 10),  # which PDU
    st.integers(0, 1 << 32),  # a position or a value
    st.binary(min_size=1, max_size=6),
), min_size=1, max_size=3)


def mutate(parts: list[bytes], muts: list[Mutation]) -> bytes:
    out = [bytearray(p) for p in parts]
    for kind, which, number, blob in muts:
        part = out[which % len(out)]
        if kind == "pdu_type":
            part[0] = number & 0xFF
        elif kind == "pdu_length":
            struct.pack_into(">I", part, 2, number & 0xFFFFFFFF)
        elif kind == "pdv_length" and part[0] == 0x04 and len(part) >= 10:
            struct.pack_into(">I", part, 6, number & 0xFFFFFFFF)
        elif kind == "item_length" and len(part) > 80:
            # a 2-byte length inside a negotiation item or a command element's 4-byte one
            at = 6 + number % (len(part) - 8)
            struct.pack_into(">H", part, at, blob[0] * 256 + blob[-1])
        elif kind == "flip" and part:
            part[number % len(part)] ^= blob[0] or 0xFF
        elif kind == "insert":
            at = number % (len(part) + 1)
            part[at:at] = blob
        elif kind == "cut" and part:
            del part[number % len(part):]
    return b"".join(out)


class Fuzzer:
    """A raw peer that accepts any association and then sends the current (mutated) answers."""

    def __init__(self, answers: Callable[[int], list[bytes]]) -> None:
        self.answers = answers
        self.muts: list[Mutation] = []
        self.peer = RawPeer(self.script)

    def script(self, conn: Conn) -> None:
        _, raw = conn.read_pdu()
        rq = A_ASSOCIATE_RQ()
        rq.decode(raw)
        cid = rq.presentation_context[0].context_id
        ac = associate_ac(rq, accept=lambda abstract: abstract != PATIENT_ROOT_FIND)  # one C-FIND only
        conn.send(mutate([ac, *self.answers(cid)], self.muts))
        conn.sock.shutdown(socket.SHUT_WR)
        conn.drain(timeout=PROMPT)


def run_case(fuzzer: Fuzzer, muts: list[Mutation], call: Callable[[], Any]) -> None:
    fuzzer.muts = muts
    t0 = time.monotonic()
    try:
        call()
    except AggregatorError:
        pass  # our own error: the expected end of most cases
    # anything else propagates and fails the example
    assert time.monotonic() - t0 < PROMPT


def fast_config(port: int) -> DimseConfig:
    return DimseConfig(host="127.0.0.1", port=port, called_ae="PEER", acse_timeout=0.5, dimse_timeout=0.5,
                       network_timeout=0.5)


@pytest.fixture(scope="module")
def harness() -> SinkHarness:
    return make_sink(Path(tempfile.mkdtemp(prefix="dimse-fuzz-")), kind="dimse")


def test_the_unmutated_exchanges_end_cleanly(harness: SinkHarness) -> None:
    """The baseline the fuzzing mutates is itself a clean exchange (no error at all)."""
    f = Fuzzer(find_answers)
    try:
        cursor = DimseConnector(fast_config(f.peer.port)).pull(PatientRef(id="FUZZ-1"), None, harness.sink,
                                                                NullProgress())
        assert cursor == {"studies": {"studies": {}}}
    finally:
        f.peer.close()
    e = Fuzzer(echo_answers)
    try:
        result = DimseConnector(fast_config(e.peer.port)).check()
        assert result.details["echo"] is True
    finally:
        e.peer.close()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(muts=mutations)
def test_mutated_c_find_answers_end_in_our_errors(harness: SinkHarness, muts: list[Mutation]) -> None:
    f = Fuzzer(find_answers)
    try:
        conn = DimseConnector(fast_config(f.peer.port))
        run_case(f, muts, lambda: conn.pull(PatientRef(id="FUZZ-1"), None, harness.sink, NullProgress()))
    finally:
        f.peer.close()


@settings(max_examples=60, deadline=None)
@given(muts=mutations)
def test_mutated_c_echo_answers_end_in_our_errors(muts: list[Mutation]) -> None:
    f = Fuzzer(echo_answers)
    try:
        conn = DimseConnector(fast_config(f.peer.port))
        run_case(f, muts, conn.check)
    finally:
        f.peer.close()
