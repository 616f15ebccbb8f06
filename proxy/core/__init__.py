"""The pure core: the error types and (soon) the token value and decisions.

Imports nothing of the package and no aiohttp.
"""
