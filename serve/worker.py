"""The gunicorn worker of ``imgsearch serve``: gunicorn's threaded worker, except that no request
thread ever waits on a slow client, and every refusal is the JSON error body.

gunicorn's gthread worker gives a connection to a request thread once it is readable; the
thread then blocks until the whole head, and later the body, has arrived, so a few dozen
clients sending a byte a second hold every thread. Here:

- **Requests are read ahead.** Each time a socket is readable a short task reads what is there
  (without blocking) into the connection's buffer, then gives the socket back to gunicorn's
  poller. Only once the head and the body (a Content-Length up to the body limit, or a
  chunked body up to it) are in memory does a request thread run the app, from memory. The
  bytes buffered this way per worker are bounded (``READ_AHEAD_BUDGET``); beyond it a request
  thread reads the rest of the body from the socket, under the same deadline.
- **Deadlines.** The head must be complete ``header_timeout`` seconds after its first byte, the
  body ``body_timeout`` seconds after the head; else the answer is 408 ``request_timeout``
  and the connection is closed.
- **Closing.** After an answer that ends the connection (any error gunicorn answers, a body
  over the limit, a deadline), the worker stops sending and discards what the client still
  sends, up to ``DRAIN_MAX_BYTES`` or ``DRAIN_S``, before closing: a client still sending its
  body then reads the answer, not a connection reset. In the poller too, not in a thread.
- **JSON refusals.** What gunicorn refuses before the app sees it (a bad request line, a URL
  over 4094 bytes, a header over 8190 bytes or more than 100 of them, a bad Content-Length or
  Transfer-Encoding) is answered ``{"error": {"code", "message"}}`` instead of gunicorn's HTML.

It relies on gunicorn 27's gthread worker: ``handle`` returning True gives the connection back
to the poller, False ends it.
"""

from __future__ import annotations

import errno
import json
import re
import socket
import threading
import time

import gunicorn
from gunicorn.config import Config as GunicornConfig
from gunicorn.http import errors as http_errors
from gunicorn.http.unreader import SocketUnreader
from gunicorn.http2 import negotiation
from gunicorn.workers.gthread import TConn, ThreadWorker

from serve.errors import ClientTooSlow

if gunicorn.version_info[0] != 27:
    raise ImportError(f"serve.worker needs gunicorn 27.x (its gthread worker's internals), found {gunicorn.__version__}")

DEFAULT_HEADER_TIMEOUT_S = 10.0
DEFAULT_BODY_TIMEOUT_S = 60.0
READ_AHEAD_BUDGET = 64 << 20  # bytes buffered ahead of the app, per worker, all connections together
DRAIN_MAX_BYTES = 64 << 20  # discarded after a closing answer: a 20 MB upload still reads its 413
DRAIN_S = 10.0
READ_SIZE = 256 << 10
MAX_CHUNK_LINE = 4096
_HEAD_END = re.compile(rb"\n\r?\n")
_HEX = frozenset(b"0123456789abcdefABCDEF")
_EXPECT_LINE = re.compile(rb"(?im)^expect:[^\n]*\n")

# (gunicorn's exception, status, reason, code): the first that matches answers.
_REFUSALS = [
    (http_errors.InvalidResponseHeader, 500, "Internal Server Error", "internal_error"),
    (http_errors.InvalidResponseHeaderName, 500, "Internal Server Error", "internal_error"),
    (http_errors.ConfigurationProblem, 500, "Internal Server Error", "internal_error"),
    (http_errors.LimitRequestLine, 414, "URI Too Long", "uri_too_long"),
    (http_errors.LimitRequestHeaders, 431, "Request Header Fields Too Large", "header_fields_too_large"),
    (http_errors.UnsupportedTransferCoding, 501, "Not Implemented", "unsupported_transfer_coding"),
    (http_errors.ExpectationFailed, 417, "Expectation Failed", "expectation_failed"),
    (http_errors.ForbiddenProxyRequest, 403, "Forbidden", "forbidden"),
    (ClientTooSlow, 408, "Request Timeout", "request_timeout"),
    (http_errors.ParseException, 400, "Bad Request", "bad_http_request"),
]


def json_error(status: int, reason: str, code: str, message: str) -> bytes:
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    head = (f"HTTP/1.1 {status} {reason}\r\nConnection: close\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n")
    return head.encode("latin-1") + body


class _Budget:
    """Bytes read ahead by one worker's connections."""

    def __init__(self, limit: int):
        self.limit, self.used = limit, 0
        self._lock = threading.Lock()

    def add(self, n: int) -> bool:
        with self._lock:
            self.used += n
            return self.used <= self.limit

    def give(self, n: int) -> None:
        with self._lock:
            self.used -= n


class DeadlineUnreader(SocketUnreader):
    """gunicorn's socket reader, but a read past ``deadline`` raises :class:`ClientTooSlow`."""

    deadline: float | None = None
    late = "the request did not arrive in time"

    def chunk(self, size_hint=None):
        if self.deadline is None:
            return super().chunk(size_hint)
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise ClientTooSlow(self.late)
        self.sock.settimeout(left)
        try:
            return super().chunk(size_hint)
        except TimeoutError:
            raise ClientTooSlow(self.late) from None
        finally:
            self.sock.settimeout(None)


class Conn(TConn):
    """A client connection and the request being read ahead on it."""

    def __init__(self, cfg, sock, client, server, budget: _Budget):
        super().__init__(cfg, sock, client, server)
        self.budget = budget
        self.buffer = bytearray()
        self.counted = 0
        self.closed = False
        self.drain: list | None = None  # [deadline, bytes left] once closing
        self.next_request()

    def next_request(self) -> None:
        self.scanned = 0
        self.head_end: int | None = None
        self.body: int | str | None = None  # bytes to read ahead, "chunked", or None (none / read by the app)
        self.chunk_pos = 0
        self.chunk_bytes = 0
        self.deadline: float | None = None
        self.late = ""

    def add(self, data: bytes) -> bool:
        """Buffer ``data``; False once the worker's read-ahead budget is spent."""
        self.buffer += data
        self.counted += len(data)
        return self.budget.add(len(data))

    def take(self) -> bytes:
        data = bytes(self.buffer)
        self.buffer = bytearray()
        self.budget.give(self.counted)
        self.counted = 0
        return data

    def close(self, graceful=False):
        """Close now (a lingering close is the worker's drain, in the poller); idempotent."""
        if not self.closed:
            self.closed = True
            self.take()
            try:
                self.sock.close()
            except OSError:
                pass


_WAIT, _READY, _GONE, _LATE = "wait", "ready", "gone", "late"


def head_limits(cfg=None) -> dict:
    """The request-head limits gunicorn enforces (its settings, defaults unless overridden), past which
    it answers 414 or 431: what clients are told in the OpenAPI document."""
    cfg = cfg if cfg is not None else GunicornConfig()
    return {"max_request_line_bytes": cfg.limit_request_line, "max_header_fields": cfg.limit_request_fields,
            "max_header_field_bytes": cfg.limit_request_field_size}


class JsonThreadWorker(ThreadWorker):
    """See the module's notes. ``run_gunicorn`` sets the class attributes on a subclass."""

    header_timeout = DEFAULT_HEADER_TIMEOUT_S
    body_timeout = DEFAULT_BODY_TIMEOUT_S
    max_body_bytes = 10 * 1024 * 1024

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.read_ahead = _Budget(READ_AHEAD_BUDGET)
        cfg = self.cfg
        limits = tuple(head_limits(cfg).values())  # request line, field count, field size
        # Past the largest head gunicorn accepts, its parser refuses what is buffered.
        self.head_max = limits[0] + limits[1] * (limits[2] + 2) + 4 if all(limits) else 1 << 20

    @classmethod
    def configured(cls, header_timeout: float, body_timeout: float, max_body_bytes: int) -> type:
        return type("ImgsearchWorker", (cls,), {"header_timeout": float(header_timeout), "body_timeout": float(body_timeout),
                                                "max_body_bytes": int(max_body_bytes)})

    def accept(self, listener):
        """gunicorn's accept, with this worker's connection class."""
        try:
            client_sock, client_addr = listener.accept()
            self.nr_conns += 1
            client_sock.setblocking(True)
            self.enqueue_req(Conn(self.cfg, client_sock, client_addr, listener.getsockname(), self.read_ahead))
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.ECONNABORTED, errno.EWOULDBLOCK):
                raise

    # ------------------------------------------------------------------ one readable event

    def handle(self, conn):
        if not isinstance(conn, Conn) or self.cfg.is_ssl or negotiation.prior_knowledge_allowed(self.cfg, conn.client):
            return super().handle(conn)
        if conn.closed:
            return False
        try:
            conn.init()
            if not isinstance(conn.parser.unreader, DeadlineUnreader):
                conn.parser.unreader = DeadlineUnreader(conn.sock)
            if conn.drain is not None:
                return self._drain(conn)
            state = self._read_ahead(conn)
        except OSError:
            conn.close()
            return False
        if state == _WAIT:
            return True
        if state == _GONE:
            conn.close()
            return False
        if state == _LATE:
            self.handle_error(None, conn.sock, conn.client, ClientTooSlow(conn.late))
            return self._start_drain(conn)
        unreader = conn.parser.unreader
        unreader.unread(conn.take())
        unreader.deadline, unreader.late = conn.deadline, conn.late
        conn.next_request()
        try:
            keep = super().handle(conn)
        finally:
            unreader.deadline = None
        return True if keep else self._start_drain(conn)

    def handle_request(self, req, conn):
        try:
            return super().handle_request(req, conn)
        finally:
            # What the app left unread is discarded from memory only; the rest is the drain's.
            if isinstance(getattr(conn.parser, "unreader", None), DeadlineUnreader):
                conn.parser.unreader.deadline = 0.0

    def _read_ahead(self, conn: Conn) -> str:
        leftover = conn.parser.unreader.take_buffered()  # the next request, read with the last one
        if leftover:
            conn.deadline = time.monotonic() + self.header_timeout
            conn.late = f"the request head did not arrive within {self.header_timeout:g} s"
            conn.add(leftover)
        conn.sock.setblocking(False)
        full = False
        while True:
            if self._parse(conn) == _READY or full:
                return _READY  # complete, or the worker's read-ahead is full: a request thread reads the rest
            if conn.deadline is not None and time.monotonic() > conn.deadline:
                return _LATE
            try:
                data = conn.sock.recv(READ_SIZE)
            except (BlockingIOError, InterruptedError):
                return _WAIT
            if not data:
                return _GONE
            if not conn.buffer:
                conn.deadline = time.monotonic() + self.header_timeout
                conn.late = f"the request head did not arrive within {self.header_timeout:g} s"
            full = not conn.add(data)

    def _parse(self, conn: Conn) -> str:
        buf = conn.buffer
        if conn.head_end is None:
            found = _HEAD_END.search(buf, max(0, conn.scanned - 2))
            if found is None:
                conn.scanned = len(buf)
                return _READY if len(buf) > self.head_max else _WAIT
            conn.head_end = found.end()
            conn.body = self._body_of(conn)
            conn.deadline = time.monotonic() + self.body_timeout
            conn.late = f"the request body did not arrive within {self.body_timeout:g} s"
            conn.chunk_pos = conn.head_end
        if conn.body is None:
            return _READY
        if conn.body == "chunked":
            return self._chunks_done(conn)
        return _READY if len(buf) - conn.head_end >= conn.body else _WAIT

    def _body_of(self, conn: Conn):
        """What to read ahead after this head: a byte count, "chunked", or None (no body, or one
        the app reads or refuses itself: over the limit, or framed oddly, which gunicorn refuses)."""
        head = bytes(conn.buffer[:conn.head_end])
        lengths, codings, expect = [], [], False
        for line in head.split(b"\n")[1:]:
            name, sep, value = line.partition(b":")
            name, value = name.strip().lower(), value.strip()
            if not sep:
                continue
            if name == b"content-length":
                lengths.append(value)
            elif name == b"transfer-encoding":
                codings.append(value.lower())
            elif name == b"expect":
                expect = value.lower() == b"100-continue"
        body = None
        if codings:
            body = "chunked" if codings == [b"chunked"] and not lengths else None
        elif len(set(lengths)) == 1 and lengths[0].isdigit() and 0 < int(lengths[0]):
            body = int(lengths[0])
            if body > self.max_body_bytes:
                # Refused by its length, unread, and the connection ends after the answer:
                # make the answer say so (gunicorn's answer follows the request's Connection).
                line_end = head.index(b"\n") + 1
                conn.buffer[line_end:line_end] = b"Connection: close\r\n"
                conn.head_end += len(b"Connection: close\r\n")
                body = None
        if body is not None and expect and head.split(b"\n", 1)[0].strip().endswith(b"HTTP/1.1"):
            # The client waits for this before sending the body: say it here, and take the
            # expectation out of the head so gunicorn does not say it again.
            conn.sock.send(b"HTTP/1.1 100 Continue\r\n\r\n")
            kept = _EXPECT_LINE.sub(b"", head)
            conn.buffer[:conn.head_end] = kept
            conn.head_end = len(kept)
        return body

    def _chunks_done(self, conn: Conn) -> str:
        buf = conn.buffer
        while True:
            line_end = buf.find(b"\n", conn.chunk_pos)
            if line_end < 0:
                return _READY if len(buf) - conn.chunk_pos > MAX_CHUNK_LINE else _WAIT
            size = bytes(buf[conn.chunk_pos:line_end]).split(b";", 1)[0].strip()
            if not size or not set(size) <= _HEX:
                return _READY  # malformed: gunicorn's chunk parser says how
            size = int(size, 16)
            if size == 0:  # the last chunk: complete once its trailer section ends
                return _READY if _HEAD_END.search(buf, line_end) else _WAIT
            if conn.chunk_bytes + size > self.max_body_bytes:
                return _READY  # over the limit: the app reads one byte past it and answers 413
            end = line_end + 1 + size + 2
            if len(buf) < end:
                return _WAIT
            conn.chunk_pos, conn.chunk_bytes = end, conn.chunk_bytes + size

    # ------------------------------------------------------------------ closing

    def _start_drain(self, conn: Conn) -> bool:
        """Stop sending and discard what the client still sends, for a while, then close."""
        if conn.closed:
            return False
        left = DRAIN_MAX_BYTES - len(conn.parser.unreader.take_buffered() if conn.parser else b"") - len(conn.take())
        try:
            conn.sock.shutdown(socket.SHUT_WR)
        except OSError:
            conn.close()
            return False
        conn.drain = [time.monotonic() + DRAIN_S, left]
        return self._drain(conn)

    def _drain(self, conn: Conn) -> bool:
        deadline, left = conn.drain
        conn.sock.setblocking(False)
        try:
            while left > 0 and time.monotonic() < deadline:
                data = conn.sock.recv(min(READ_SIZE, left))
                if not data:
                    break
                left -= len(data)
        except (BlockingIOError, InterruptedError):
            conn.drain[1] = left
            return True
        except OSError:
            pass
        conn.close()
        return False

    # ------------------------------------------------------------------ refusals

    def handle_error(self, req, client, addr, exc):
        """gunicorn's refusals, as the JSON error body (gunicorn writes HTML)."""
        status, reason, code = next((answer for kind, *answer in _REFUSALS if isinstance(exc, kind)),
                                    (500, "Internal Server Error", "internal_error"))
        if status >= 500:
            self.log.exception("Error handling request %s", getattr(req, "uri", "(no URI read)"))
            message = f"internal error: {type(exc).__name__}"
        else:
            self.log.warning("Invalid request from ip=%s: %s: %s", (addr or ("",))[0], type(exc).__name__, exc)
            text = str(exc) or type(exc).__name__
            message = f"{reason}: {text if len(text) <= 200 else text[:197] + '...'}"
        try:
            client.setblocking(True)
            client.settimeout(2.0)
            client.sendall(json_error(status, reason, code, message))
        except OSError:
            self.log.debug("Failed to send error message.")
