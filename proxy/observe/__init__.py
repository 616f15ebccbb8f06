"""Observability: logging (text/JSON, fingerprints, redaction) and Prometheus metrics.

Imports nothing of the package.
"""
