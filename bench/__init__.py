"""The benchmark of issue 6: tokenproxy beside nginx, mitmdump and a plain aiohttp proxy (see bench/README.md)."""
