"""Where tokens survive a restart.

Owns: the state file format and writing it safely (0600 from creation, temp
file + fsync + rename, directory 0700). Knows nothing of grants or requests.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol


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


class Store(Protocol):
    """Somewhere to keep a SavedState."""

    def load(self) -> SavedState | None:
        """The saved state, or None when there is none or it is unreadable."""

    def save(self, state: SavedState) -> None:
        """Persist `state` durably before returning."""


class NullStore:
    """A store that keeps nothing (state_file = "")."""

    def load(self) -> SavedState | None:
        """Nothing is ever saved."""
        return None

    def save(self, state: SavedState) -> None:
        """Forget `state`."""


class FileStore:
    """A JSON state file, written atomically with mode 0600. Blocking: call from a thread."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> SavedState | None:
        """The saved state, or None when the file is missing or malformed."""
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            return SavedState(
                credential=str(data["credential"]),
                seed=str(data["seed"]),
                access_token=str(data["access_token"]),
                expires_at=float(data["expires_at"]),
                obtained_at=float(data["obtained_at"]),
                refresh_token=None if data["refresh_token"] is None else str(data["refresh_token"]),
                generation=int(data["generation"]),
            )
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def save(self, state: SavedState) -> None:
        """Write `state` to a 0600 temp file, fsync it, and rename it over the old one."""
        directory = self.path.parent
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        # mkstemp creates the file 0600, so the secret is never readable by others.
        fd, tmp = tempfile.mkstemp(prefix=".state-", suffix=".tmp", dir=directory)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as out:
                json.dump(asdict(state), out)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
