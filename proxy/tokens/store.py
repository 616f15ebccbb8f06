"""Where tokens survive a restart.

Owns: the state file format and writing it safely (0600 from creation, temp
file + fsync + rename, directory 0700), moving a corrupt one aside rather
than overwriting it, opening the lock file beside it, and refusing a state
file, lock file or directory that another user could have planted or
changed, as ssh refuses such a `~/.ssh`. Knows nothing of grants or requests,
nor of how the lock is taken (file_lock.py).
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import json
import logging
import os
import secrets
import stat
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

# Its own logger, so that commands that keep their output quiet (`check`, `token`) can still let its warnings through.
STATE_LOGGER = "tokenproxy.tokens.state"
logger = logging.getLogger(STATE_LOGGER)

# A state file is a few hundred bytes; anything much larger is not one of ours.
_MAX_STATE_BYTES = 1 << 20


@dataclass(frozen=True)
class SavedState:
    """What is kept across restarts for one credential."""

    credential: str  # fingerprint of the config the state belongs to
    seed: str  # fingerprint of the configured refresh token the chain started from
    access_token: str
    expires_at: float  # wall-clock seconds since the epoch
    obtained_at: float
    refresh_token: str | None
    generation: int
    # The client `tokenproxy login` registered (RFC 7591) for a config that names none; "" when none was.
    client_id: str = ""


class UnsafeStateError(PermissionError):
    """The state file or its directory could have been written by another user: it is not used.

    A PermissionError (EPERM) whose message (`strerror`, and `str()` alone)
    is one line naming the path, what is wrong and how to fix it.
    """

    def __init__(self, message: str) -> None:
        super().__init__(errno.EPERM, message)

    def __str__(self) -> str:
        return str(self.strerror)


class Store(Protocol):
    """Somewhere to keep a SavedState."""

    def load(self) -> SavedState | None:
        """The saved state, or None when there is none or it is unreadable.

        Raises UnsafeStateError when it could have been planted by another user.
        """

    def save(self, state: SavedState) -> None:
        """Persist `state` durably before returning."""


class NullStore:
    """A store that keeps nothing (state_file = "")."""

    def load(self) -> SavedState | None:
        """Nothing is ever saved."""
        return None

    def save(self, state: SavedState) -> None:
        """Forget `state`."""


def _mode(st: os.stat_result) -> str:
    return f"{stat.S_IMODE(st.st_mode):04o}"


def check_directory(directory: Path, st: os.stat_result) -> None:
    """Raise UnsafeStateError unless the state directory (`st`: its stat, a link followed) is safe.

    Safe: owned by this process's effective user or by root, and writable by
    no one else, unless it has the sticky bit (like /tmp), where nobody may
    remove or rename another user's file. Anyone else who can write to it can
    replace the state file with one of their own.
    """
    euid = os.geteuid()
    if st.st_uid not in (euid, 0):
        raise UnsafeStateError(
            f"state directory {directory} is owned by uid {st.st_uid}, not by this user (uid {euid}) or root: "
            "its owner could plant or replace the state file; use a directory of your own"
        )
    if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
        raise UnsafeStateError(
            f"state directory {directory} is writable by other users (mode {_mode(st)}, no sticky bit): "
            f"anyone could plant or replace the state file; chmod 700 {directory}"
        )


def check_file(path: Path, st: os.stat_result, what: str = "state file") -> None:
    """Raise UnsafeStateError unless the state file (`st`: its lstat) is a regular file only this user can write.

    The owner must be this process's effective user exactly: root is not
    exempt, and a root proxy refuses another user's file too. `what` names
    the file in the message (the state lock file is held to the same checks).
    """
    euid = os.geteuid()
    if stat.S_ISLNK(st.st_mode):
        fix = "set token.state_file to the real file, or remove the link" if what == "state file" else "remove it"
        raise UnsafeStateError(f"{what} {path} is a symbolic link, which is not followed: {fix}")
    if not stat.S_ISREG(st.st_mode):
        raise UnsafeStateError(f"{what} {path} is not a regular file: remove it")
    if st.st_uid != euid:
        raise UnsafeStateError(
            f"{what} {path} is owned by uid {st.st_uid}, not by this user (uid {euid}), so it is not used: "
            "another user could have planted it; remove it"
        )
    if st.st_mode & 0o022:
        raise UnsafeStateError(
            f"{what} {path} is writable by other users (mode {_mode(st)}), so it is not used: "
            "another user could have changed it; remove it, or chmod 600 it if you trust what it holds"
        )


class FileStore:
    """A JSON state file, written atomically with mode 0600. Blocking: call from a thread.

    Each call opens the directory once, checks it, and reaches the file
    relative to it without following a symbolic link (O_NOFOLLOW): what is
    checked is what is read or replaced. Beside the state file lies its lock
    file (`<state_file>.lock`, see file_lock.py), held to the same checks and
    never removed, so every process locks the same file.
    """

    def __init__(self, path: Path, credential: str | None = None) -> None:
        self.path = path
        self.lock_path = path.with_name(path.name + ".lock")
        # Whose entry `load` reads: a credential id; None reads the file's only entry (`tokenproxy login`).
        # Set on the event loop (a reload that changes the credential); read by the thread that loads.
        self.credential = credential

    def open_directory(self, *, create: bool = False) -> int:
        """The state directory, opened (a link to a directory is followed) and checked; made 0700 with `create`."""
        directory = self.path.parent
        if create:
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            check_directory(directory, os.fstat(dir_fd))
        except BaseException:
            os.close(dir_fd)
            raise
        return dir_fd

    def open_lock(self, dir_fd: int) -> int:
        """The lock file in the checked directory `dir_fd`, created 0600 if missing, never through a link; checked."""
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        try:
            fd = os.open(self.lock_path.name, flags, 0o600, dir_fd=dir_fd)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                link = os.stat(self.lock_path.name, dir_fd=dir_fd, follow_symlinks=False)
                check_file(self.lock_path, link, "state lock file")
            raise
        try:
            check_file(self.lock_path, os.fstat(fd), "state lock file")
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _open_file(self, dir_fd: int) -> int | None:
        """The state file, opened read-only without following a link, and checked; None when there is none."""
        name = self.path.name
        try:
            check_file(self.path, os.stat(name, dir_fd=dir_fd, follow_symlinks=False))
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
        except FileNotFoundError:
            return None
        except OSError as exc:
            if exc.errno == errno.ELOOP:  # became a link after the lstat
                raise UnsafeStateError(f"state file {self.path} is a symbolic link, which is not followed") from None
            raise
        try:
            check_file(self.path, os.fstat(fd))
        except BaseException:
            os.close(fd)
            raise
        return fd

    def check(self) -> None:
        """Raise UnsafeStateError when the state directory, file or lock file is unsafe; read nothing.

        For the command line, to refuse before anything starts. A directory or
        file that is missing or cannot be opened is not an error here.
        """
        try:
            dir_fd = self.open_directory()
        except UnsafeStateError:
            raise
        except OSError:
            return
        try:
            with contextlib.suppress(FileNotFoundError):
                st = os.stat(self.lock_path.name, dir_fd=dir_fd, follow_symlinks=False)
                check_file(self.lock_path, st, "state lock file")
            fd = self._open_file(dir_fd)
        except UnsafeStateError:
            raise
        except OSError:
            fd = None
        finally:
            os.close(dir_fd)
        if fd is not None:
            os.close(fd)

    def load(self) -> SavedState | None:
        """The saved state, or None when the file is missing, unreadable or malformed.

        Raises UnsafeStateError, reading nothing, when the directory or the
        file could have been written by another user or the file is a link.
        """
        return self._load(set_aside=False)

    def load_all(self) -> dict[str, SavedState]:
        """Every credential's entry, by credential id ({} when the file is missing, unreadable or malformed).

        Raises UnsafeStateError as `load` does.
        """
        entries: dict[str, SavedState] = {}
        self._load(set_aside=False, into=entries)
        return entries

    def load_locked(self) -> SavedState | None:
        """`load()` for the holder of the state lock: a corrupt file is also moved aside, and a warning logged.

        Only under the lock: the file that is renamed is then the one that was read.
        """
        return self._load(set_aside=True)

    def _load(self, *, set_aside: bool, into: dict[str, SavedState] | None = None) -> SavedState | None:
        try:
            dir_fd = self.open_directory()
        except UnsafeStateError:
            raise
        except OSError:
            return None
        try:
            fd = self._open_file(dir_fd)
            if fd is None:
                return None
            try:
                entries, problem = _parse(_read_at_most(fd, _MAX_STATE_BYTES + 1))
                state = _entry_of(entries, self.credential)
                if into is not None:
                    into.update(entries)
                if problem is not None and set_aside:
                    self._set_aside(dir_fd, fd, problem)
            finally:
                os.close(fd)
        except UnsafeStateError:
            raise
        except OSError:
            return None
        finally:
            os.close(dir_fd)
        return state

    def _set_aside(self, dir_fd: int, fd: int, problem: str) -> None:
        """Rename the corrupt state file open as `fd` to `<name>.corrupt-<UTC time>`, 0600, and say so once."""
        name = self.path.name
        read = os.fstat(fd)
        there = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        if (there.st_dev, there.st_ino) != (read.st_dev, read.st_ino):
            return  # replaced since it was read: what is there now is not the corrupt file
        stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
        for attempt in range(1, 100):
            aside = f"{name}.corrupt-{stamp}" if attempt == 1 else f"{name}.corrupt-{stamp}-{attempt}"
            try:
                os.stat(aside, dir_fd=dir_fd, follow_symlinks=False)
            except FileNotFoundError:
                break
        else:  # pragma: no cover - 99 corrupt files in one second
            raise FileExistsError(errno.EEXIST, "no free name to move the corrupt state file aside")
        try:
            os.fchmod(fd, 0o600)
            os.rename(name, aside, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
            os.fsync(dir_fd)
        except OSError as exc:
            logger.warning(
                "state file %s is corrupt (%s) and could not be moved aside to %s (%s); it is not used",
                self.path, problem, self.path.with_name(aside), exc.strerror,
            )
            raise
        logger.warning(
            "state file %s is corrupt (%s): moved it aside to %s (0600); it is not used",
            self.path, problem, self.path.with_name(aside),
        )

    def save(self, state: SavedState) -> None:
        """Write `state` as its credential's entry, every other credential's entry kept, to a 0600 temp
        file, fsync it, and rename it over the old one.

        A state of no credential (what `logout` saves: no tokens, the
        registered client) takes the place of this store's credential's entry.
        A read-modify-write of the whole file: callers hold the state lock
        (file_lock.py), so no other process or credential writes meanwhile.
        Raises UnsafeStateError (an OSError) rather than write into a
        directory that another user could write to.
        """
        dir_fd = self.open_directory(create=True)
        try:
            entries = self._entries(dir_fd)
            if not state.credential and self.credential:
                entries.pop(self.credential, None)  # `logout`: this credential's tokens go, its registration stays
            entries[state.credential] = state
            payload = json.dumps({"credentials": {key: asdict(value) for key, value in entries.items()}})
            tmp = _write_temp(dir_fd, payload.encode("utf-8"))
            try:
                os.replace(tmp, self.path.name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
            except BaseException:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp, dir_fd=dir_fd)
                raise
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def _entries(self, dir_fd: int) -> dict[str, SavedState]:
        """Every credential's entry in the state file as it is now; none when it is missing or corrupt."""
        fd = self._open_file(dir_fd)
        if fd is None:
            return {}
        try:
            return _parse(_read_at_most(fd, _MAX_STATE_BYTES + 1))[0]
        finally:
            os.close(fd)


def _read_at_most(fd: int, limit: int) -> bytes:
    """Up to `limit` bytes from the start of `fd`."""
    chunks: list[bytes] = []
    size = 0
    while size < limit:
        chunk = os.read(fd, min(65536, limit - size))
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def _entry_of(entries: dict[str, SavedState], credential: str | None) -> SavedState | None:
    """The entry of `credential`; with None, the only entry (None when there are several)."""
    if credential is not None:
        return entries.get(credential)
    return next(iter(entries.values())) if len(entries) == 1 else None


def _parse(raw: bytes) -> tuple[dict[str, SavedState], str | None]:
    """Every credential's state a file's bytes hold, by credential id, and what is wrong with them (never
    their content). A file of one state (written before several credentials shared a file) is the entry of
    the credential it names."""
    if len(raw) > _MAX_STATE_BYTES:
        return {}, f"larger than {_MAX_STATE_BYTES} bytes"
    try:
        data = json.loads(raw.decode("utf-8"))
    except ValueError:
        return {}, "not JSON"
    if not isinstance(data, dict):
        return {}, "fields missing or of the wrong type"
    if "credentials" not in data:
        state = _state(data)
        return ({}, "fields missing or of the wrong type") if state is None else ({state.credential: state}, None)
    table = data["credentials"]
    if not isinstance(table, dict):
        return {}, "fields missing or of the wrong type"
    entries = {}
    for key, value in table.items():
        state = _state(value)
        if state is None or state.credential != key:
            return {}, "fields missing or of the wrong type"
        entries[key] = state
    return entries, None


def _state(data: object) -> SavedState | None:
    """One credential's SavedState from its JSON object; None when fields are missing or of the wrong type."""
    if not isinstance(data, dict):
        return None
    try:
        return SavedState(
            credential=str(data["credential"]),
            seed=str(data["seed"]),
            access_token=str(data["access_token"]),
            expires_at=float(data["expires_at"]),
            obtained_at=float(data["obtained_at"]),
            refresh_token=None if data["refresh_token"] is None else str(data["refresh_token"]),
            generation=int(data["generation"]),
            client_id=str(data.get("client_id") or ""),
        )
    except (ValueError, KeyError, TypeError, OverflowError):
        return None


def _write_temp(dir_fd: int, payload: bytes) -> str:
    """A new file in the directory holding `payload`, created 0600 (never readable by others), fsynced; its name."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    for _ in range(100):
        name = f".state-{secrets.token_hex(8)}.tmp"
        try:
            fd = os.open(name, flags, 0o600, dir_fd=dir_fd)
        except FileExistsError:
            continue
        break
    else:  # pragma: no cover - 100 collisions of 64 random bits
        raise FileExistsError(errno.EEXIST, "no free name for a temporary file in the state directory")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(payload)
            out.flush()
            os.fsync(out.fileno())
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name, dir_fd=dir_fd)
        raise
    return name
