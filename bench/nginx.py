"""nginx in two roles: the upstream API every contender talks to, and a contender itself.

Owns: the fixed bodies the upstream serves, the two nginx configs and
starting an nginx master in the foreground (so its PID is ours to stop).

The upstream's routes:
- `/tiny` (13 bytes of JSON) and `/16k` (16 KiB): static files.
- `/large`: a sparse file of the streaming size, served with sendfile.
- `/upload`: reads the whole request body before it answers 200. nginx's
  `return` would answer first and discard the body afterwards, which lets a
  proxy stop uploading early; so the body is read with
  `proxy_request_buffering on` (into a temp file on tmpfs) and the request
  then passed, without its body, to `/uploaded`, which answers 200.
- `/storm`: 401 with `WWW-Authenticate: Bearer error="invalid_token"` unless
  the bearer starts with `new-` (the token server's tokens after the first);
  so every request sent with the first token sees it rejected.
"""

from __future__ import annotations

import grp
import os
import resource
from pathlib import Path

from .procs import Proc, start

TINY_BODY = b'{"ok": true}\n'
MEDIUM_SIZE = 16 * 1024
STATIC_TOKEN = "static-bench-token"


def write_bodies(www: Path, large_size: int) -> None:
    """Create the files the upstream serves; `large.bin` is sparse, so it costs no disk."""
    www.mkdir(parents=True, exist_ok=True)
    (www / "tiny.json").write_bytes(TINY_BODY)
    (www / "16k.bin").write_bytes(b"x" * MEDIUM_SIZE)
    with (www / "large.bin").open("wb") as large:
        large.truncate(large_size)
    for path in (www, *www.iterdir()):
        path.chmod(0o755 if path.is_dir() else 0o644)


def _common(run_dir: Path, name: str) -> str:
    """The part both configs share: one worker, no access log, temp paths in our own folders."""
    user = ""
    if os.geteuid() == 0:
        group = "nogroup"
        try:
            grp.getgrnam(group)
        except KeyError:
            group = "nobody"
        user = f"user nobody {group};"
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    nofile = 65536 if nofile == resource.RLIM_INFINITY else nofile
    return f"""
{user}
worker_processes 1;
daemon off;
pid {run_dir}/{name}.pid;
error_log {run_dir}/{name}-error.log warn;
worker_rlimit_nofile {nofile};
events {{ worker_connections {min(16384, nofile // 2)}; }}
"""


def _temp_paths(run_dir: Path, name: str, body_temp: Path) -> str:
    return f"""
    client_body_temp_path {body_temp}/{name}-body;
    proxy_temp_path {run_dir}/{name}-proxy;
    fastcgi_temp_path {run_dir}/{name}-fastcgi;
    uwsgi_temp_path {run_dir}/{name}-uwsgi;
    scgi_temp_path {run_dir}/{name}-scgi;
    access_log off;
    keepalive_requests 100000000;
    keepalive_timeout 300s;
    lingering_time 300s;
"""


def upstream_conf(run_dir: Path, www: Path, port: int, body_temp: Path) -> str:
    """The upstream API: fixed bodies, an upload sink, and the token-checking storm route."""
    return (
        _common(run_dir, "upstream")
        + f"""
http {{
    {_temp_paths(run_dir, "upstream", body_temp)}
    sendfile on;
    tcp_nopush on;
    default_type application/octet-stream;
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location = /tiny {{ default_type application/json; alias {www}/tiny.json; }}
        location = /16k {{ alias {www}/16k.bin; }}
        location = /large {{ alias {www}/large.bin; }}
        location = /upload {{
            client_max_body_size 0;
            client_body_buffer_size 1m;
            proxy_request_buffering on;
            proxy_pass_request_body off;
            proxy_set_header Content-Length "";
            proxy_pass http://127.0.0.1:{port}/uploaded;
        }}
        location = /uploaded {{ return 200 "stored\\n"; }}
        location = /storm {{
            default_type application/json;
            if ($http_authorization !~ "^Bearer new-") {{
                add_header WWW-Authenticate 'Bearer error="invalid_token"' always;
                return 401 '{{"error": "invalid_token"}}\\n';
            }}
            return 200 '{{"ok": true}}\\n';
        }}
    }}
}}
"""
    )


def https_upstream_conf(run_dir: Path, www: Path, port: int, body_temp: Path, cert: Path, key: Path) -> str:
    """The upstream of the HTTPS_PROXY scenario: `/tiny` and `/16k` over TLS, only with a bench bearer.

    A request without `Authorization: Bearer` and the static token or one of
    the token server's (`old-1`, `new-<n>`) gets 401, so every 2xx the load
    generator counts proves the proxy added the header.
    """
    guard = f'if ($http_authorization !~ "^Bearer ({STATIC_TOKEN}$|old-|new-)") {{ return 401 "no bearer\\n"; }}'
    return (
        _common(run_dir, "https-upstream")
        + f"""
http {{
    {_temp_paths(run_dir, "https-upstream", body_temp)}
    sendfile on;
    tcp_nopush on;
    default_type application/octet-stream;
    server {{
        listen 127.0.0.1:{port} ssl backlog=4096;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_session_cache shared:bench:10m;
        location = /tiny {{ {guard} default_type application/json; alias {www}/tiny.json; }}
        location = /16k {{ {guard} alias {www}/16k.bin; }}
    }}
}}
"""
    )


def proxy_conf(run_dir: Path, port: int, upstream_port: int, body_temp: Path) -> str:
    """nginx as the reverse proxy a user would write for a token that never changes.

    Keep-alive to the upstream, and no buffering either way so that
    streams flow as they do through the other contenders. With unbuffered
    proxying nginx relays through `proxy_buffer_size`; its default (one
    page) holds a 1 GiB download to about 300 MB/s here, 64k gives about
    1.3 GB/s, so the streaming comparison is against a tuned nginx.
    """
    return (
        _common(run_dir, "proxy")
        + f"""
http {{
    {_temp_paths(run_dir, "proxy", body_temp)}
    upstream api {{
        server 127.0.0.1:{upstream_port};
        keepalive 128;
        keepalive_requests 100000000;
        keepalive_timeout 300s;
    }}
    server {{
        listen 127.0.0.1:{port};
        client_max_body_size 0;
        location / {{
            proxy_pass http://api;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Authorization "Bearer {STATIC_TOKEN}";
            proxy_buffering off;
            proxy_request_buffering off;
            proxy_buffer_size 64k;
            proxy_buffers 8 64k;
        }}
    }}
}}
"""
    )


def start_nginx(nginx: str, name: str, conf: str, run_dir: Path, port: int) -> Proc:
    """Write `conf` and start an nginx master in the foreground; return once it listens."""
    path = run_dir / f"{name}.conf"
    path.write_text(conf)
    error_log = run_dir / f"{name}-error.log"
    return start(
        f"nginx-{name}",
        [nginx, "-p", str(run_dir), "-c", str(path), "-e", str(error_log)],
        run_dir / f"{name}.out",
        port=port,
        count_children=True,
    )
