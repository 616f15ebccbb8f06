"""The proxy's HTTP side: entry, forwarding and relay, bodies, headers, access rules, server limits,
listener, admin port and the one error renderer.
"""
