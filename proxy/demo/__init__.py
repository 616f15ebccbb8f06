"""The demo's servers: an OAuth2 token endpoint and an API that checks its tokens, for `tokenproxy demo`.

Shared with the tests' fakes and the benchmark's token server, which build on
them. Knows nothing of the proxy: only the CLI imports this package.
"""
