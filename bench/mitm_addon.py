"""mitmdump addon for the bench: set a static bearer on every request it forwards.

Loaded with `mitmdump -s bench/mitm_addon.py`; the token comes from the
`BENCH_TOKEN` environment variable. The header value is built once, as
mitmproxy's own upstream_auth addon does.
"""

from __future__ import annotations

import os
from typing import Any

_HEADER = f"Bearer {os.environ.get('BENCH_TOKEN', 'static-bench-token')}"


def request(flow: Any) -> None:
    """mitmproxy's request hook: replace the client's Authorization with ours."""
    flow.request.headers["Authorization"] = _HEADER
