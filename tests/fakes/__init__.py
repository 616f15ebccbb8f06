"""Real HTTP fakes for the tests: a token server and an API, both aiohttp apps on 127.0.0.1."""
