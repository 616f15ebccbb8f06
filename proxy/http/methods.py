"""Any method token: what llhttp refuses as a method but HTTP allows (RFC 9110 §9.1) is served like any other.

Owns: finding, after llhttp refused a method, where the failing request
began, and resuming a fresh parser there with the unknown method replaced
by a known one of the same framing, remembering the real one for that
request. Everything else stays with llhttp's strict parser.
"""

from __future__ import annotations

import httptools


class MethodRecovery:
    """The unknown-method bookkeeping of one connection's parser."""

    __slots__ = ("_limit",)

    def __init__(self, max_request_line: int) -> None:
        self._limit = max_request_line

    def prepare(self, data: bytes, in_head: bool) -> bytes:
        """The bytes to feed the parser for this read."""
        return data

    def recover(self, data: bytes) -> bytes | None:
        """After llhttp refused a method in this read: the bytes to resume a fresh parser with, or None."""
        return None

    def method_of(self, parser: httptools.HttpRequestParser) -> str:
        """The method of the request whose head just completed."""
        return parser.get_method().decode("ascii")

    def completed(self) -> None:
        """A request was parsed whole."""

    def completed_all(self) -> None:
        """The parser was replaced at a message boundary."""
