"""tokenproxy: a local reverse proxy that adds a fresh bearer token to every request."""
