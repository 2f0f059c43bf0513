"""A TCP forwarder that limits how fast the peer's bytes reach us: a slow link to a real peer.

Why: a pull from a local Orthanc or HTTP server finishes before a test (or a benchmark) can
cancel, kill or time it; a real hospital link is slower. Everything the upstream sends is
passed on at ``rate`` bytes per second (shared by all connections through the forwarder), what
we send goes through at once. ``received`` counts the upstream's bytes, so a test can tell how
much a pull really fetched. For C-GET (one association carries everything) and HTTP; C-MOVE
opens a connection back to us, which does not pass here.
"""

from __future__ import annotations

import socket
import threading
import time
from types import TracebackType


class ThrottledLink:
    """Listen on a free loopback port; forward each connection to ``host:port``."""

    def __init__(self, host: str, port: int, rate: float, *, chunk: int = 16384) -> None:
        self.upstream = (host, port)
        self.rate = float(rate)
        self.chunk = chunk
        self.received = 0
        self._lock = threading.Lock()
        self._next_free = time.monotonic()
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._server.getsockname()[1])
        self._stop = threading.Event()
        self._socks: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True, name="throttle-accept")

    def __enter__(self) -> ThrottledLink:
        self._thread.start()
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        self._stop.set()
        self._server.close()
        with self._lock:
            socks, self._socks = list(self._socks), []
        for s in socks:
            try:
                s.close()
            except OSError:
                pass

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.upstream, timeout=10)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            for s in (client, upstream):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._socks += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, True), daemon=True).start()

    def _wait_for(self, n: int) -> None:
        """Book ``n`` bytes on the shared link and sleep until they may go."""
        with self._lock:
            start = max(self._next_free, time.monotonic())
            self._next_free = until = start + n / self.rate
            self.received += n
        delay = until - time.monotonic()
        if delay > 0:
            time.sleep(delay)

    def _pump(self, src: socket.socket, dst: socket.socket, throttled: bool) -> None:
        try:
            while True:
                data = src.recv(self.chunk)
                if not data:
                    break
                if throttled:
                    self._wait_for(len(data))
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
