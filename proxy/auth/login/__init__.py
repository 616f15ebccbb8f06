"""`tokenproxy login` for people: the device grant, the authorization code with PKCE, revocation."""
