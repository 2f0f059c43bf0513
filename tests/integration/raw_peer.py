"""A scripted DICOM peer on a raw loopback socket, for what pynetdicom cannot be made to do.

pynetdicom never sends an unknown PDU, a PDV that overruns its PDU, a release collision or a
wrong application context; these tests need a peer that does. The PDUs here are built with
``struct`` from PS3.8 (not with :mod:`connectors.acse`, the code under test), and what our
client sends is read back with pynetdicom's PDU classes, an independent implementation.
"""

from __future__ import annotations

import socket
import struct
import threading
from collections.abc import Callable
from typing import Any

from pynetdicom.pdu import A_ASSOCIATE_RQ

from tests.integration.orthanc import free_port

APP_CONTEXT = "1.2.840.10008.3.1.1.1"


def pdu(pdu_type: int, body: bytes) -> bytes:
    return struct.pack(">BBI", pdu_type, 0, len(body)) + body


def item(item_type: int, value: bytes) -> bytes:
    return struct.pack(">BBH", item_type, 0, len(value)) + value


def associate_ac(rq: A_ASSOCIATE_RQ, *, app_context: str = APP_CONTEXT, called: str | None = None,
                 calling: str | None = None, accept: Callable[[str], bool] = lambda uid: True) -> bytes:
    """An A-ASSOCIATE-AC accepting each proposed context (first transfer syntax) that ``accept`` likes."""
    called = rq.called_ae_title if called is None else called
    calling = rq.calling_ae_title if calling is None else calling
    fixed = struct.pack(">HH", 1, 0) + called.encode().ljust(16) + calling.encode().ljust(16) + bytes(32)
    items = [item(0x10, app_context.encode())]
    for cx in rq.presentation_context:
        ok = accept(str(cx.abstract_syntax))
        ts = str(cx.transfer_syntax[0]).encode()
        items.append(item(0x21, bytes((cx.context_id, 0, 0 if ok else 3, 0)) + item(0x40, ts)))
    items.append(item(0x50, item(0x51, struct.pack(">I", 16384)) + item(0x52, b"1.2.3.4")))
    return pdu(0x02, fixed + b"".join(items))


def command(fields: dict[int, bytes]) -> bytes:
    """A command set, implicit VR little endian, with its group length."""
    body = b"".join(struct.pack("<HHI", 0, el, len(v)) + v for el, v in sorted(fields.items()))
    return struct.pack("<HHII", 0, 0, 4, len(body)) + body


def us(v: int) -> bytes:
    return struct.pack("<H", v)


def uid(v: str) -> bytes:
    raw = v.encode()
    return raw + b"\0" if len(raw) % 2 else raw


def p_data(context_id: int, data: bytes, *, is_command: bool, last: bool = True) -> bytes:
    mch = (0x01 if is_command else 0) | (0x02 if last else 0)
    return pdu(0x04, struct.pack(">IBB", len(data) + 2, context_id, mch) + data)


class Conn:
    """One accepted connection: read whole PDUs, send bytes, remember what the client sent."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.received: list[tuple[int, bytes]] = []

    def read_pdu(self) -> tuple[int, bytes]:
        head = self._exact(6)
        pdu_type, _, length = struct.unpack(">BBI", head)
        raw = head + self._exact(length)
        self.received.append((pdu_type, raw))
        return pdu_type, raw

    def _exact(self, n: int) -> bytes:
        out = b""
        while len(out) < n:
            chunk = self.sock.recv(n - len(out))
            if not chunk:
                raise ConnectionError("client closed")
            out += chunk
        return out

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def accept_association(self, **kw: Any) -> A_ASSOCIATE_RQ:
        pdu_type, raw = self.read_pdu()
        assert pdu_type == 0x01
        rq = A_ASSOCIATE_RQ()
        rq.decode(raw)
        self.send(associate_ac(rq, **kw))
        return rq

    def drain(self, timeout: float = 3.0) -> None:
        """Read (and record) PDUs until the client closes the connection or goes quiet."""
        self.sock.settimeout(timeout)
        try:
            while True:
                self.read_pdu()
        except (ConnectionError, OSError):
            return


class RawPeer:
    """Listens on a free loopback port; runs ``script`` on each accepted connection in a thread."""

    def __init__(self, script: Callable[[Conn], None]) -> None:
        self.port = free_port()
        self.script = script
        self.conns: list[Conn] = []
        self.errors: list[BaseException] = []
        self.finished = 0
        self._sock = socket.create_server(("127.0.0.1", self.port))
        self._sock.settimeout(0.2)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                s, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            s.settimeout(5)
            conn = Conn(s)
            self.conns.append(conn)
            try:
                self.script(conn)
            except (ConnectionError, OSError):
                pass
            except BaseException as exc:  # surfaced by the test
                self.errors.append(exc)
            finally:
                s.close()
                self.finished += 1

    def wait(self, n: int = 1, timeout: float = 10) -> None:
        """Until ``n`` connections have run their script to the end."""
        import time

        deadline = time.monotonic() + timeout
        while self.finished < n and time.monotonic() < deadline:
            time.sleep(0.01)
        assert self.finished >= n, "the raw peer's script did not finish"
        assert not self.errors, self.errors

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._sock.close()

    def __enter__(self) -> RawPeer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
