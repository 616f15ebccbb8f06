"""Configuration: TOML into frozen dataclasses, `${ENV}`, validation naming the key."""
