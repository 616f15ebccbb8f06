"""Which configured values are secrets: for messages that must not show them and for the log's redaction.

Owns: reading the `secret()` field markers (in the schema and in every
grant's settings) as key names and as values. Knows nothing of TOML or of
how the redaction filter works.
"""

from __future__ import annotations

from ..auth.settings import secret_shape, secret_values
from .schema import Config, secret_keys, values_of

# Every secret key of the schema and of every grant's settings, and the shape its credential takes.
SECRET_KEYS = secret_keys()


def is_secret_key(key: str) -> bool:
    """True for a secret key, a value inside one, or a table holding one: a message never shows its value."""
    return any(
        key == root or key.startswith((f"{root}.", f"{root}[")) or root.startswith(f"{key}.") for root in SECRET_KEYS
    )


def secrets_of(config: Config) -> tuple[str, ...]:
    """Every configured secret, for the log's redaction filter."""
    values = []
    for _, f, value in values_of(config):
        shape = secret_shape(f.metadata)
        if shape is not None:
            values += secret_values(shape, value)
    return tuple(dict.fromkeys(value for value in values if value))
