"""How a token is obtained: the grants and their one call to a token endpoint."""
