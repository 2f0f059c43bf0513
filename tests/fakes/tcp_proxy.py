"""A TCP relay in front of a real peer (Orthanc's DICOM port) that counts and can cut connections.

For DIMSE one TCP connection is one association. ``active`` counts a connection from its
accept until its client sends A-RELEASE-RQ or A-ABORT (or it closes), so ``peak`` is the most
associations the client held at once, what a test of a parallel retrieve's bound reads; the
TCP close that follows a release would otherwise overlap the client's next association. ``requests`` keeps what
each connection's client sent (DIMSE requests and C-STORE responses: small), so a test can
see which series a pull asked for. ``cut_when(pattern)`` closes both sides of a connection as
soon as its client has sent ``pattern`` (a series UID in a C-GET identifier): the archive
then sees a dropped association, and so does the client.
"""

from __future__ import annotations

import socket
import threading
import time


class CountingRelay:
    """Relays 127.0.0.1:``port`` to 127.0.0.1:``upstream_port``, one pair of threads per connection."""

    def __init__(self, upstream_port: int, *, hold: float = 0.0) -> None:
        self.upstream_port = upstream_port
        #: seconds each connection's first answer (the A-ASSOCIATE-AC) is held back, so that
        #: associations a client opens together are sure to overlap even on a loaded machine
        self.hold = hold
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        self.lock = threading.Lock()
        self.active = 0
        self.peak = 0
        self.opened = 0
        #: bytes each connection's client sent, in the order connections were opened
        self.requests: list[bytearray] = []
        self.cuts: list[bytes] = []
        self._closing = False
        self._thread = threading.Thread(target=self._accept, daemon=True, name="relay-accept")

    def __enter__(self) -> CountingRelay:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._closing = True
        self.listener.close()

    def cut_when(self, pattern: bytes) -> None:
        """Close any connection whose client sends ``pattern`` (until :meth:`heal`)."""
        with self.lock:
            self.cuts.append(pattern)

    def heal(self) -> None:
        with self.lock:
            self.cuts.clear()

    def reset_counts(self) -> None:
        with self.lock:
            self.peak = self.active
            self.opened = 0
            self.requests = []

    def asked_for(self, pattern: bytes) -> int:
        """How many connections' clients sent ``pattern``."""
        with self.lock:
            return sum(1 for r in self.requests if pattern in r)

    def _accept(self) -> None:
        while not self._closing:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.upstream_port), timeout=10)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            for s in (client, upstream):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sent = bytearray()
            with self.lock:
                self.active += 1
                self.opened += 1
                self.peak = max(self.peak, self.active)
                self.requests.append(sent)
            pair = _Pair(self, client, upstream, sent)
            threading.Thread(target=pair.pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=pair.pump, args=(upstream, client, False), daemon=True).start()


class _Pair:
    def __init__(self, relay: CountingRelay, client: socket.socket, upstream: socket.socket,
                 sent: bytearray) -> None:
        self.relay, self.client, self.upstream, self.sent = relay, client, upstream, sent
        self.ended = 0
        self.parsed = 0  # offset of the next client PDU header in ``sent``
        self.released = False
        self.lock = threading.Lock()

    def pump(self, src: socket.socket, dst: socket.socket, from_client: bool) -> None:
        held = from_client or not self.relay.hold
        try:
            while True:
                data = src.recv(1 << 16)
                if not data:
                    break
                if from_client:
                    with self.relay.lock:
                        self.sent += data
                        cut = any(p in self.sent for p in self.relay.cuts)
                        self._watch_release()
                    if cut:
                        break
                if not held:
                    time.sleep(self.relay.hold)
                    held = True
                dst.sendall(data)
        except OSError:
            pass
        finally:
            self._close()

    def _watch_release(self) -> None:
        """Walk the client's PDU headers; A-RELEASE-RQ (5) or A-ABORT (7) ends its association."""
        while len(self.sent) - self.parsed >= 6:
            pdu_type = self.sent[self.parsed]
            length = int.from_bytes(self.sent[self.parsed + 2 : self.parsed + 6], "big")
            if pdu_type in (5, 7) and not self.released:
                self.released = True
                self.relay.active -= 1
            self.parsed += 6 + length

    def _close(self) -> None:
        with self.lock:
            self.ended += 1
            first = self.ended == 1
        if not first:
            return
        for s in (self.client, self.upstream):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()
        with self.relay.lock:
            if not self.released:
                self.released = True
                self.relay.active -= 1
