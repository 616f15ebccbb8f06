"""Observability: logging (text/JSON, fingerprints, redaction) and Prometheus metrics.

Imports only the core (a token's fingerprint).
"""
