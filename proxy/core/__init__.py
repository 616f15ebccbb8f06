"""The pure core: the error types, the token value and the pure decisions about it.

Imports nothing of the package and no aiohttp.
"""
