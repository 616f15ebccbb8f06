"""What a login flow says to the person at the keyboard, and the error that ends a login.

Owns: the Prompt interface the flows talk through (whole lines, and a
status line a terminal redraws in place) and LoginError. Knows nothing of
terminals: the command line implements Prompt.
"""

from __future__ import annotations

from typing import Protocol


class LoginError(Exception):
    """The login did not give a token: one line saying why and what to do; never a token, code or secret."""


class Prompt(Protocol):
    """Where a login flow talks to the person."""

    def line(self, text: str) -> None:
        """Show one line (instructions, a URL, what happened)."""

    def status(self, text: str) -> None:
        """Show how the wait is going (a countdown); a terminal redraws it in place, elsewhere it may be dropped."""

    def done(self) -> None:
        """The wait is over: clear the status line."""
