"""The local certificate authority and the leaf certificates it signs for intercepted CONNECT tunnels."""
