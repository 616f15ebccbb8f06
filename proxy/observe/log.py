"""Logging: set-up (text or JSON lines), the access line, token fingerprints.

Owns: the `tokenproxy` loggers' format and the redaction filter that is the
last line of defence against a token reaching a log. Callers log
fingerprints, never values; the filter catches what slips through. In the
proxy's process the access lines go to an `AccessWriter` (accesslog.py),
which formats and writes them off the request path.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import re
import sys
import time
from typing import Any

from ..core.token import fingerprint
from .accesslog import AccessWriter, FlushingHandler, logged_path

LOGGER = "tokenproxy"
ACCESS_LOGGER = "tokenproxy.access"

# Anything shaped like a JWT, or following "Bearer ", is replaced before output.
_JWT = re.compile(r"eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*")
_BEARER = re.compile(r"(?i)(bearer\s+)[A-Za-z0-9._~+/=-]{8,}")


def redact(text: str) -> str:
    """Replace anything that looks like a bearer token or JWT."""
    text = _JWT.sub(lambda m: f"<jwt {fingerprint(m.group(0))}>", text)
    return _BEARER.sub(lambda m: f"{m.group(1)}<redacted>", text)


class RedactingFilter(logging.Filter):
    """Rewrites each record's final message so no token-shaped text is written."""

    def __init__(self, secrets: tuple[str, ...] = ()) -> None:
        super().__init__()
        # Longest first: a secret that holds another (`Basic abc…` and `abc…`) is masked whole.
        self._secrets = tuple(sorted({s for s in secrets if len(s) >= 4}, key=len, reverse=True))

    def clean(self, text: str) -> str:
        """`text` without token-shaped text or any of the configured secrets."""
        cleaned = redact(text)
        for secret in self._secrets:
            if secret in cleaned:
                cleaned = cleaned.replace(secret, "<secret>")
        return cleaned

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = self.clean(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        if record.exc_info:
            # Tracebacks may quote values; keep only the exception type.
            exc = record.exc_info[1]
            record.msg = f"{record.getMessage()} ({type(exc).__name__})"
            record.args, record.exc_info, record.exc_text = None, None, None
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, the worker (in a group) and any `extra` fields."""

    _STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None)))

    def __init__(self, worker: int | None = None) -> None:
        super().__init__()
        self._worker = worker

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if self._worker is not None:
            out["worker"] = self._worker
        for key, value in vars(record).items():
            if key not in self._STANDARD and not key.startswith("_"):
                out[key] = value
        return json.dumps(out, default=str)


class CredentialLog(logging.LoggerAdapter):  # type: ignore[type-arg]
    """The log of one credential's token manager: once a config has several credentials, each line names its own.

    `credential` is set by whoever knows how many there are (the routing);
    empty, lines read as they do for the single credential. The JSON line
    carries it as its `credential` key either way once set.
    """

    def __init__(self, logger: logging.Logger) -> None:
        super().__init__(logger, {})
        self.credential = ""

    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        """Name the credential in the message and in the line's fields."""
        if not self.credential:
            return msg, kwargs
        extra = kwargs.get("extra")
        kwargs["extra"] = {**extra, "credential": self.credential} if extra else {"credential": self.credential}
        return f"credential {self.credential}: {msg}", kwargs


def setup_logging(level: str, fmt: str, secrets: tuple[str, ...] = (), *, access_log: bool = True) -> None:
    """Configure the root handler for the proxy's process (CLI only), and the access log's writer thread.

    Called again on a reload: the previous writer writes what it holds and stops first.
    """
    global _writer, access_lines_wanted  # the process's logging set-up is process-wide; only this function replaces it
    handler = FlushingHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter(_worker))
    else:
        worker = "" if _worker is None else f"[worker {_worker}] "
        handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s {worker}%(name)s: %(message)s"))
    redacting = RedactingFilter(secrets)
    handler.addFilter(redacting)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    if _writer is not None:
        _writer.close()
        atexit.unregister(_writer.close)
        _writer = None
    root.addHandler(handler)
    root.setLevel(level.upper())
    # aiohttp's own access log is replaced by ours; its error logs stay.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    logging.getLogger(ACCESS_LOGGER).setLevel(logging.NOTSET if access_log else logging.WARNING)
    if _access.isEnabledFor(logging.INFO):
        assert handler.lock is not None
        _writer = AccessWriter(
            sys.stderr, handler.lock, json_lines=fmt == "json", clean=redacting.clean, worker=_worker
        )
        handler.access = _writer
        atexit.register(_writer.close)
    access_lines_wanted = _writer is not None


_access = logging.getLogger(ACCESS_LOGGER)
# Set in a worker of a group (its index) before its logging is set up: every line it writes names it.
_worker: int | None = None


def mark_worker(index: int) -> None:
    """This process is worker `index` of a group: the lines it logs from the next `setup_logging` on say so."""
    global _worker  # one process, one index, set once at its start
    _worker = index

# Set by setup_logging in the proxy's process: access lines are queued to it instead of logged here.
_writer: AccessWriter | None = None

# False once setup_logging has turned the access log off: the request path then neither times nor calls
# `access_line` (until then, as in tests, the access logger's level decides).
access_lines_wanted = True


def flush_access_log() -> None:
    """Write the access lines still queued, now (the proxy has stopped serving)."""
    if _writer is not None:
        _writer.flush_pending()


def _writer_after_fork() -> None:
    # Threads do not survive fork: a forked worker needs a writer thread of its own.
    if _writer is not None:
        _writer.after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_writer_after_fork)


def access_line(
    method: str, target: str, status: int, duration: float, resent: bool, generation: int | None, route: str = "default"
) -> None:
    """Log one finished request: its path without the query (never its headers or body), naming the route it took.

    Queued to the writer thread when there is one (which cuts the target down to what is logged).
    """
    writer = _writer
    if writer is not None:
        writer.put((time.time(), method, target, status, duration, resent, generation, route))
        return
    if not _access.isEnabledFor(logging.INFO):
        return
    path = logged_path(target)
    _access.info(
        '"%s %s" %d %.1fms resent=%s gen=%s route=%s',
        method,
        path,
        status,
        duration * 1000.0,
        "yes" if resent else "no",
        "-" if generation is None else generation,
        route,
        extra={
            "method": method,
            "path": path,
            "status": status,
            "duration_ms": round(duration * 1000.0, 3),
            "resent": resent,
            "generation": generation,
            "route": route,
        },
    )


def refresh_fields(
    grant: str,
    result: str,
    *,
    fingerprint: str | None = None,
    generation: int | None = None,
    expires_in: float | None = None,
    duration: float | None = None,
    rotated: bool | None = None,
    reason: str | None = None,
    failures: int | None = None,
    retry_in: float | None = None,
) -> dict[str, object]:
    """The structured fields of a refresh log line (keys of its JSON object), never a token: only its fingerprint.

    `result` is "ok", "adopted" or the error code; `expires_in` is in seconds,
    `duration` (seconds, logged as `duration_ms` like the access line's) is
    how long the refresh took. Keys without a value are written as null, so
    every refresh line has the same keys.
    """
    return {
        "grant": grant,
        "result": result,
        "fingerprint": fingerprint,
        "generation": generation,
        "expires_in": None if expires_in is None else round(expires_in, 1),
        "duration_ms": None if duration is None else round(duration * 1000.0, 1),
        "rotated": rotated,
        "reason": reason,
        "failures": failures,
        "retry_in": retry_in,
    }

