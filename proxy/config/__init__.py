"""Configuration: TOML into frozen dataclasses, `${ENV}`, validation naming the key.

schema (the dataclasses and their defaults, field metadata), load (TOML,
`${ENV}`, types), validate (each section's checks; a grant's come from the
grant registry), secrets (which values are credentials), warnings (about
the config file itself).
"""

from .load import (
    CONFIG_SEARCH,
    ConfigError,
    WithoutCredentialSecrets,
    find_config_path,
    interpolate,
    load_config,
    parse_config,
)
from .schema import Config, TokenConfig, restart_only_changes
from .secrets import is_secret_key, secrets_of
from .validate import endpoint_missing, is_loopback, parse_listen
from .warnings import config_file_warnings, exposed_secrets_warning, literal_secrets

__all__ = [
    "CONFIG_SEARCH",
    "Config",
    "ConfigError",
    "TokenConfig",
    "WithoutCredentialSecrets",
    "config_file_warnings",
    "endpoint_missing",
    "exposed_secrets_warning",
    "find_config_path",
    "interpolate",
    "is_loopback",
    "is_secret_key",
    "literal_secrets",
    "load_config",
    "parse_config",
    "parse_listen",
    "restart_only_changes",
    "secrets_of",
]
