"""The composition root: config to routes to listeners; reload; signals.

Only the CLI imports it.
"""
