"""Any method token: what llhttp refuses as a method but HTTP allows (RFC 9110 §9.1) is served like any other.

Owns: finding, after llhttp refused a method, where the failing request
began, and resuming a fresh parser there with the unknown method replaced
by a stand-in (request bodies are framed by their headers alone, so any
method other than CONNECT frames like any other), remembering the real one
for that request. Everything else stays with llhttp's strict parser: no
lenient flags. Knows nothing of what the requests are for.

llhttp gives no offset with its error, and fires `on_message_begin` before
it checks the method, so the failing request's first byte is found thus:
at the start of this read when the parser was idle there and no request
completed in it; after k requests completed in this read (the parser idle
at its start), at the end of the smallest prefix on which a fresh parser
completes k requests; for a method begun in an earlier read, the bytes of
that method are carried from it (at most a request line's worth). A request
whose method began mid-read behind the end of a message begun in an earlier
read cannot be placed, and is refused as before.
"""

from __future__ import annotations

import contextlib
import re

import httptools

# An RFC 9110 token: what a method may be.
_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
# The trailing bytes of a read that may be the start of a method.
_TOKEN_TAIL = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]*\Z")
# A method llhttp knows that frames its request as any other (by Content-Length or chunked) and takes any target.
_STAND_IN = b"OPTIONS"
# The usual methods as str, made once.
_KNOWN = {name.encode(): name for name in ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")}


class _Count:
    """Counts the requests a fresh parser completes."""

    __slots__ = ("done",)

    def __init__(self) -> None:
        self.done = 0

    def on_message_complete(self) -> None:
        self.done += 1


def _completed(data: bytes) -> int:
    counter = _Count()
    with contextlib.suppress(httptools.HttpParserError):
        httptools.HttpRequestParser(counter).feed_data(data)
    return counter.done


def _boundary(data: bytes, requests: int) -> int | None:
    """The length of the smallest prefix of `data` on which a fresh parser completes `requests` requests."""
    low, high = 1, len(data)
    if _completed(data) < requests:
        return None
    while low < high:
        middle = (low + high) // 2
        if _completed(data[:middle]) >= requests:
            high = middle
        else:
            low = middle + 1
    return low


class MethodRecovery:
    """The unknown-method bookkeeping of one connection's parser; owned by that connection's callbacks."""

    __slots__ = ("_carry_at_start", "_idle_at_start", "_limit", "_real", "carry", "completions", "fed_data", "pending")

    def __init__(self, max_request_line: int) -> None:
        self._limit = max_request_line
        self.carry = b""  # the start of a method begun in an earlier read, while the parser is still in it
        self._carry_at_start = b""
        self.fed_data = b""  # this read's bytes as fed to the parser
        self._idle_at_start = True  # the parser was between requests when this read began
        self.completions = 0  # requests completed in this read
        self._real: str | None = None  # the method of the next request to complete its head (fed a stand-in)
        self.pending = b""  # an unknown method whose end has not arrived: fed with the next read

    def prepare(self, data: bytes, idle: bool) -> bytes:
        """The bytes to feed the parser for this read (`idle`: the parser is between requests)."""
        self.completions = 0
        self._carry_at_start = self.carry
        if self.pending:
            data = self.pending + data
            self.pending = b""
            idle = True
        self._idle_at_start = idle
        self.fed_data = data
        return data

    def fed(self, in_method: bool) -> None:
        """The read was parsed; `in_method`: the parser is inside a request's method (no target byte yet)."""
        if not in_method:
            if self.carry:
                self.carry = b""
            return
        tail = self.fed_data[-self._limit :]
        carried = (self._carry_at_start + tail) if self.completions == 0 and not self._idle_at_start else tail
        match = _TOKEN_TAIL.search(carried)
        self.carry = carried[match.start() :] if match is not None else b""

    def recover(self) -> bytes | None:
        """After llhttp refused a method in this read: the bytes to resume a fresh parser with, or None (refuse).

        b"" with `pending` set: the method's end has not arrived yet.
        """
        data = self.fed_data
        if self.completions == 0:
            if self._idle_at_start:
                start = 0
            elif self._carry_at_start:
                data = self._carry_at_start + data
                start = 0
            else:
                return None
        elif self._idle_at_start:
            found = _boundary(data, self.completions)
            if found is None:
                return None
            start = found
        else:
            return None
        self.carry = b""
        rest = data[start:]
        space = rest.find(b" ", 0, self._limit + 1)
        if space < 0:
            if len(rest) > self._limit or not _TOKEN.fullmatch(rest):
                return None
            self.pending = rest
            return b""
        method = rest[:space]
        if not _TOKEN.fullmatch(method):
            return None
        self._real = method.decode("ascii")
        return _STAND_IN + rest[space:]

    def method_of(self, parser: httptools.HttpRequestParser) -> str:
        """The method of the request whose head just completed."""
        real = self._real
        if real is not None:
            self._real = None
            return real
        raw = parser.get_method()
        method = _KNOWN.get(raw)
        return method if method is not None else raw.decode("ascii")
