"""Reaching an upstream: its model, the fast pool, aiohttp's session, the one error-mapping boundary."""
