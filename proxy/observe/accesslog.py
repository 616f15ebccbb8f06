"""The access log's writer: lines formatted and written in a thread of their own, in batches.

Owns: taking one finished request's fields off the request path (a tuple
appended to a queue, well under a microsecond), and a thread that turns
what has queued into lines (text or JSON, the same layout as the other log
lines, redacted the same way) and writes them with one write per batch.
Knows nothing of HTTP: it is handed the fields.

The thread is woken by the first line of a batch only, then gathers lines
for `LINGER` seconds before it writes them: waking it for every line would
cost a thread switch and a turn of the interpreter lock per request (it
halved the requests/s under load when tried).

Bounded: at most `max_pending` lines wait. When the output is slower than
the requests (a blocked pipe), further lines are dropped and counted, never
held without bound, and the next batch written says how many were lost. No
line is lost at exit: `close()` (registered with atexit) writes what waits.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import TextIO

_json_string: Callable[[str], str] = json.encoder.encode_basestring_ascii

# About 10 MB of queued lines at most; one second of a busy proxy's requests.
MAX_PENDING = 50_000

# How long the thread gathers lines after the first of a batch before writing them.
LINGER = 0.05

# How long `close()` waits for the thread to finish its batch before writing the rest itself.
_CLOSE_WAIT = 5.0

# time (epoch), method, request target (as received), status, duration (s), resent, token generation, route
Entry = tuple[float, str, str, int, float, bool, int | None, str]


def logged_path(target: str) -> str:
    """What an access line shows of a request target: never its query string, nor the `user:password@` of an
    absolute-form one (either may carry credentials)."""
    path = target.partition("?")[0]
    if path.startswith("/"):
        return path
    scheme, sep, rest = path.partition("://")
    if not sep:
        return path
    authority, slash, tail = rest.partition("/")
    return f"{scheme}://{authority.rpartition('@')[2]}{slash}{tail}"


class AccessWriter:
    """The queue of finished requests and the thread that writes them to `stream`.

    `put` is called on the event loop's thread; the writer thread alone
    pops, formats and writes. Writes happen under `lock` (the log handler's
    lock, so an access batch and another log line never interleave), and
    `flush_pending` lets the handler write the queued lines before a line of
    its own, which keeps the output in the order things happened.
    """

    def __init__(
        self,
        stream: TextIO,
        lock: threading.RLock,
        *,
        json_lines: bool,
        clean: Callable[[str], str],
        max_pending: int = MAX_PENDING,
        worker: int | None = None,
    ) -> None:
        self._stream = stream
        # A worker of a group names itself in every line: `[worker N] ` in text, a `worker` key in JSON.
        self._worker = worker
        self._worker_text = "" if worker is None else f"[worker {worker}] "
        self._worker_json = "" if worker is None else f', "worker": {worker}'
        self._lock = lock
        self._json = json_lines
        self._clean = clean  # redaction of the path: no token-shaped text or configured secret is written
        self._max = max_pending
        self._pending: deque[Entry] = deque()  # appended by the loop's thread, popped under `_lock`
        self._wake = threading.Event()  # set by the first line of a batch
        self._closing = threading.Event()  # cuts the linger short
        self._closed = False
        self.dropped = 0  # lines not queued because `max_pending` were waiting; read and reset under `_lock`
        self._second = -1  # the time-of-day prefix cached for the current second
        self._prefix = ""
        self._thread = threading.Thread(target=self._run, name="tokenproxy-access-log", daemon=True)
        self._thread.start()

    def after_fork(self) -> None:
        """In a forked child (a worker): the parent's queued lines are the parent's; start a thread of its own."""
        self._pending.clear()
        self.dropped = 0
        self._wake = threading.Event()
        self._closing = threading.Event()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="tokenproxy-access-log", daemon=True)
        self._thread.start()

    def put(self, entry: Entry) -> None:
        """Queue one finished request's line; never blocks, never formats."""
        pending = self._pending
        if len(pending) >= self._max:
            self.dropped += 1
            return
        pending.append(entry)
        if len(pending) == 1:
            self._wake.set()

    def _run(self) -> None:
        while not self._closed:
            self._wake.wait()
            # Cleared before the lines are taken: a first line queued from here on sets it again.
            self._wake.clear()
            self._closing.wait(LINGER)
            self.flush_pending()

    def flush_pending(self) -> None:
        """Write every queued line now, in one write (from any thread)."""
        with self._lock:
            if not self._pending and not self.dropped:
                return
            lines = []
            pending = self._pending
            for _ in range(len(pending)):
                lines.append(self._line(pending.popleft()))
            if self.dropped:
                lines.append(self._dropped_line(self.dropped))
                self.dropped = 0
            try:
                self._stream.write("".join(lines))
                self._stream.flush()
            except (OSError, ValueError):
                pass  # stderr closed or broken: the log is gone, the proxy carries on

    def close(self) -> None:
        """Stop the thread and write what is still queued."""
        if self._closed:
            return
        self._closed = True
        self._closing.set()
        self._wake.set()
        if self._thread is not threading.current_thread():
            self._thread.join(_CLOSE_WAIT)
        self.flush_pending()

    def _time(self, when: float) -> tuple[str, int]:
        second = int(when)
        if second != self._second:
            self._second = second
            fmt = "%Y-%m-%dT%H:%M:%S" if self._json else "%Y-%m-%d %H:%M:%S"
            self._prefix = time.strftime(fmt, time.gmtime(when) if self._json else time.localtime(when))
        return self._prefix, int((when - second) * 1000)

    def _line(self, entry: Entry) -> str:
        when, method, target, status, duration, resent, generation, route = entry
        path = self._clean(logged_path(target))
        message = '"%s %s" %d %.1fms resent=%s gen=%s route=%s' % (  # noqa: UP031 - the access line's fixed layout
            method,
            path,
            status,
            duration * 1000.0,
            "yes" if resent else "no",
            "-" if generation is None else generation,
            route,
        )
        prefix, millis = self._time(when)
        if not self._json:
            return f"{prefix},{millis:03d} INFO {self._worker_text}tokenproxy.access: {message}\n"
        # What json.dumps would write for these keys, built without its per-call set-up.
        text = _json_string
        return (
            f'{{"time": "{prefix}.{millis:03d}Z", "level": "info", "logger": "tokenproxy.access", '
            f'"message": {text(message)}, "method": {text(method)}, "path": {text(path)}, "status": {status}, '
            f'"duration_ms": {round(duration * 1000.0, 3)!r}, "resent": {"true" if resent else "false"}, '
            f'"generation": {"null" if generation is None else generation}, "route": {text(route)}'
            f"{self._worker_json}}}\n"
        )

    def _dropped_line(self, count: int) -> str:
        message = f"{count} access lines were dropped: the log output was slower than the requests"
        prefix, millis = self._time(time.time())
        if not self._json:
            return f"{prefix},{millis:03d} WARNING {self._worker_text}tokenproxy.access: {message}\n"
        fields: dict[str, object] = {
            "time": f"{prefix}.{millis:03d}Z",
            "level": "warning",
            "logger": "tokenproxy.access",
        }
        if self._worker is not None:
            fields["worker"] = self._worker
        return json.dumps({**fields, "message": message, "dropped": count}) + "\n"


class FlushingHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """The log's handler: writes the access lines queued so far before each line of its own, keeping the order."""

    access: AccessWriter | None = None

    def emit(self, record: logging.LogRecord) -> None:
        """Write queued access lines, then this record."""
        access = self.access
        if access is not None:
            access.flush_pending()
        super().emit(record)
