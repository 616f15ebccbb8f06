"""Why a network operation failed, in plain words, and where it was aimed, without secrets.

Owns: turning an OS-level failure (`OSError` and its errno, a DNS lookup
error, a TLS error, a timeout) found anywhere in an exception's cause chain
into a short phrase a person understands ("connection refused", "DNS lookup
failed for api.example.com", "TLS certificate not trusted (self-signed
certificate)"), and a URL shown as scheme://host:port/path only. Knows
nothing of aiohttp: the layers that use it unwrap their own exceptions
around it (aiohttp keeps the OS error as the cause of its own).
"""

from __future__ import annotations

import os
import re
import socket
import ssl
from collections.abc import Iterator
from urllib.parse import urlsplit

# asyncio joins the errors of several addresses tried in turn into one OSError without an errno.
_JOINED_ERRNO = re.compile(r"\[Errno (\d+)\]")

def _chain(exc: BaseException) -> Iterator[BaseException]:
    """`exc`, then its causes (explicit first), a bounded walk."""
    seen: BaseException | None = exc
    for _ in range(8):
        if seen is None:
            return
        yield seen
        seen = seen.__cause__ or seen.__context__


def _lower_first(text: str) -> str:
    return text[:1].lower() + text[1:]


def _errno_words(number: int) -> str | None:
    try:
        text = os.strerror(number)
    except ValueError:
        return None
    if text.startswith("Unknown error"):
        return None
    return _lower_first(text)


def _tls_words(exc: ssl.SSLError) -> str | None:
    if isinstance(exc.__cause__, ssl.SSLError):
        return None  # a wrapper that is also an SSLError (aiohttp's): the one underneath says more
    if isinstance(exc, ssl.SSLCertVerificationError):
        detail = getattr(exc, "verify_message", None) or getattr(exc, "reason", None) or ""
        return f"TLS certificate not trusted ({_lower_first(detail)})" if detail else "TLS certificate not trusted"
    reason = getattr(exc, "reason", None)
    return f"TLS handshake failed ({reason.lower().replace('_', ' ')})" if reason else "TLS handshake failed"


def _words(exc: BaseException, host: str | None, timeout: float | None) -> str | None:
    if isinstance(exc, socket.gaierror):
        what = f"DNS lookup failed for {host}" if host else "DNS lookup failed"
        return f"{what} ({_lower_first(exc.strerror)})" if exc.strerror else what
    if isinstance(exc, ssl.SSLError):
        return _tls_words(exc)
    if isinstance(exc, TimeoutError):
        return f"timed out after {timeout:g} s" if timeout is not None else "timed out"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, ConnectionResetError):
        return "connection reset"
    if isinstance(exc, OSError):
        if exc.errno is not None and exc.errno > 0:
            return _errno_words(exc.errno)
        numbers = set(_JOINED_ERRNO.findall(str(exc)))
        if len(numbers) == 1:
            return _errno_words(int(numbers.pop()))
    return None


def cause_in_words(exc: BaseException, *, host: str | None = None, timeout: float | None = None) -> str | None:
    """The first failure in `exc`'s cause chain that can be said in words; None when there is none.

    `host` is named in a DNS failure, `timeout` (seconds) in a timeout. The
    words never contain more than the error's kind, the host and a TLS
    library's verdict: no URL, no query string, no secret.
    """
    for seen in _chain(exc):
        words = _words(seen, host, timeout)
        if words:
            return words
    return None


def safe_url(url: str) -> str:
    """`url` as a message may show it: scheme://host:port/path, never userinfo, query or fragment."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = parts.port
    except ValueError:
        return "(an invalid URL)"
    if ":" in host:
        host = f"[{host}]"
    if port is None:
        port = {"http": 80, "https": 443}.get(parts.scheme.lower())
    authority = f"{host}:{port}" if port is not None else host
    return f"{parts.scheme.lower()}://{authority}{parts.path}"
