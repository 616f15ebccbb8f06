"""The grants, one module each; this package also names the Grant interface the token manager uses."""

from ..protocol import BadAnswer, Grant, TokenResponse

__all__ = ["BadAnswer", "Grant", "TokenResponse"]
