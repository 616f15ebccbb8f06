"""Which configured values are secrets: for messages that must not show them and for the log's redaction.

Owns: reading the `secret()` field markers (in the schema and in every
grant's settings) as key names and as values. Knows nothing of TOML or of
how the redaction filter works.
"""

from __future__ import annotations

import re

from ..auth.settings import secret_shape, secret_values
from .schema import Config, secret_keys, values_of

# Every secret key of the schema and of every grant's settings, and the shape its credential takes.
SECRET_KEYS = secret_keys()
# The start of a credential's key, which names the same keys as `[token]`.
_CREDENTIAL_KEY = re.compile(r"^(?:credentials\.[^.]+|route\[\d+\]\.token)\.")


def is_secret_key(key: str) -> bool:
    """True for a secret key, a value inside one, or a table holding one: a message never shows its value.

    A credential's key (`credentials.NAME.key`, `route[N].token.key`) is judged as the `[token]` key it is.
    """
    key = _CREDENTIAL_KEY.sub("token.", key)
    return any(
        key == root or key.startswith((f"{root}.", f"{root}[")) or root.startswith(f"{key}.") for root in SECRET_KEYS
    )


def secrets_of(config: Config) -> tuple[str, ...]:
    """Every configured secret, for the log's redaction filter."""
    values = []
    sections: list[object] = [config, *config.credentials.values()]
    for section in sections:
        for _, f, value in values_of(section):
            shape = secret_shape(f.metadata)
            if shape is not None:
                values += secret_values(shape, value)
    return tuple(dict.fromkeys(value for value in values if value))
