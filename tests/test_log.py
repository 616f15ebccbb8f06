"""Logging: fingerprints, the redaction filter, JSON lines."""

from __future__ import annotations

import io
import json
import logging

import jwt

from proxy.observe.log import JsonFormatter, RedactingFilter, fingerprint, redact

A_JWT = jwt.encode({"sub": "x", "exp": 2_000_000_000}, "k" * 32, algorithm="HS256")


def make_logger(handler: logging.Handler) -> logging.Logger:
    logger = logging.getLogger(f"test.{id(handler)}")
    logger.propagate = False
    logger.handlers = [handler]
    logger.setLevel(logging.DEBUG)
    return logger


def test_fingerprint_is_8_hex_and_stable() -> None:
    """A fingerprint is the first 8 hex digits of SHA-256: short, stable, not the token."""
    assert fingerprint("abc") == "ba7816bf"
    assert fingerprint(A_JWT) == fingerprint(A_JWT)


def test_redact_replaces_jwts_and_bearer_values() -> None:
    """Anything shaped like a JWT or following `Bearer ` is replaced."""
    text = redact(f"header was Authorization: Bearer opaque-token-1234567 and {A_JWT}")
    assert A_JWT not in text
    assert "opaque-token-1234567" not in text
    assert f"<jwt {fingerprint(A_JWT)}>" in text


def test_redacting_filter_removes_configured_secrets_and_tracebacks() -> None:
    """The last line of defence: configured secrets and exception text never reach the output."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(RedactingFilter(("client-secret-value",)))
    logger = make_logger(handler)
    logger.info("oops %s", "client-secret-value")
    try:
        raise ValueError(f"bad token {A_JWT}")
    except ValueError:
        logger.exception("failed")
    out = stream.getvalue()
    assert "client-secret-value" not in out
    assert A_JWT not in out
    assert "Traceback" not in out
    assert "failed (ValueError)" in out


def test_json_formatter_writes_one_object_per_line_with_extras() -> None:
    """log.format = json: each line parses, and `extra` fields become keys."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = make_logger(handler)
    logger.info("GET %s", "/x", extra={"status": 200, "resent": False})
    logger.warning("second line")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2
    first = json.loads(lines[0])
    assert first["message"] == "GET /x"
    assert first["status"] == 200 and first["resent"] is False
    assert first["level"] == "info"
    assert json.loads(lines[1])["level"] == "warning"
