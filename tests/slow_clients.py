"""Slow clients for load tests: raw sockets that trickle a request one byte at a time, watched in one thread.

Two kinds, as a slowloris attack sends them: ``headers`` never finishes its request headers; ``body`` sends
complete headers promising a large body, then trickles the body. Each connection notes when its first byte
left, what the server answered and when the server closed it (``None``: still held).
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

HEADERS_HEAD = b"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\nx-slow: "
BODY_HEAD = (
    b"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
    b"content-length: 100000\r\n\r\n"
)


@dataclass
class SlowConnection:
    kind: str  # "headers" or "body"
    source: str
    sock: socket.socket
    first_byte_at: float = 0.0
    closed_at: float | None = None
    answer: bytes = b""
    sent: int = 0

    @property
    def status(self) -> int | None:
        if not self.answer.startswith(b"HTTP/1.1 "):
            return None
        return int(self.answer[9:12])


@dataclass
class SlowClients:
    """``count`` connections to 127.0.0.1:``port``, alternating kinds, spread over the ``sources`` addresses
    (loopback aliases such as 127.0.0.2), each sending one byte every ``interval_s``."""

    port: int
    count: int
    sources: list[str]
    interval_s: float
    kinds: tuple[str, ...] = ("headers", "body")
    connections: list[SlowConnection] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def open(self) -> None:
        for i in range(self.count):
            source = self.sources[i % len(self.sources)]
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind((source, 0))
            sock.connect(("127.0.0.1", self.port))
            sock.setblocking(False)
            self.connections.append(SlowConnection(self.kinds[i % len(self.kinds)], source, sock))
        for conn in self.connections:
            self._first_bytes(conn)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _first_bytes(self, conn: SlowConnection) -> None:
        # headers: the first byte starts the request; body: the headers go at once, then the body trickles
        data = HEADERS_HEAD[:1] if conn.kind == "headers" else BODY_HEAD + b"{"
        conn.first_byte_at = time.monotonic()
        self._send(conn, data)

    def _next_byte(self, conn: SlowConnection) -> bytes:
        if conn.kind == "headers":
            return HEADERS_HEAD[conn.sent : conn.sent + 1] or b"a"
        return b" "

    def _send(self, conn: SlowConnection, data: bytes) -> None:
        try:
            conn.sent += conn.sock.send(data)
        except BlockingIOError:
            pass
        except OSError:
            self._closed(conn)

    def _closed(self, conn: SlowConnection) -> None:
        if conn.closed_at is None:
            conn.closed_at = time.monotonic()

    def _run(self) -> None:
        with selectors.DefaultSelector() as selector:
            for conn in self.connections:
                selector.register(conn.sock, selectors.EVENT_READ, conn)
            next_send = time.monotonic() + self.interval_s
            while not self._stop.is_set() and any(c.closed_at is None for c in self.connections):
                for key, _ in selector.select(timeout=max(0.0, next_send - time.monotonic())):
                    conn = key.data
                    try:
                        data = conn.sock.recv(65536)
                    except OSError:
                        data = b""
                    if data:
                        conn.answer += data
                    else:
                        self._closed(conn)
                        selector.unregister(conn.sock)
                if time.monotonic() >= next_send:
                    next_send += self.interval_s
                    for conn in self.connections:
                        if conn.closed_at is None:
                            self._send(conn, self._next_byte(conn))

    def held(self) -> list[SlowConnection]:
        return [c for c in self.connections if c.closed_at is None]

    def wait_closed(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while self.held() and time.monotonic() < deadline:
            time.sleep(0.05)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        for conn in self.connections:
            conn.sock.close()


@contextlib.contextmanager
def slow_clients(port: int, count: int, sources: list[str], interval_s: float) -> Iterator[SlowClients]:
    clients = SlowClients(port, count, sources, interval_s)
    try:
        clients.open()
        yield clients
    finally:
        clients.close()
