"""Deployment files: they parse, and they run exactly the command line the tests exercise."""

from __future__ import annotations

import asyncio
import configparser
import json
import os
import re
import shlex
import signal
import sys
import tomllib
from pathlib import Path

import aiohttp
import yaml

from proxy.config import parse_config
from tests.fakes.token_server import CLIENT_ID, CLIENT_SECRET
from tests.helpers import read_until

ROOT = Path(__file__).resolve().parent.parent
RUN_ARGS = ["run", "-c", "/etc/tokenproxy/tokenproxy.toml"]
CREDENTIALS = {"CLIENT_ID": "c", "CLIENT_SECRET": "s", "REFRESH_TOKEN": "r"}

# The [Service]/[Unit]/[Install] keys systemd knows that these units use.
SYSTEMD_KEYS = {
    "unit": {"description", "documentation", "after", "wants"},
    "service": {
        "type", "execstart", "execreload", "environmentfile", "environment", "dynamicuser", "statedirectory",
        "statedirectorymode", "umask", "restart", "restartsec", "timeoutstopsec", "killsignal", "nonewprivileges",
        "protectsystem", "protecthome", "privatetmp", "privatedevices", "protectkerneltunables",
        "protectkernelmodules", "protectcontrolgroups", "restrictaddressfamilies", "restrictnamespaces",
        "lockpersonality", "memorydenywriteexecute", "systemcallarchitectures", "capabilityboundingset",
    },
    "install": {"wantedby"},
}


def test_deploy_sidecar_yaml_runs_tokenproxy_with_probes_and_state_volume() -> None:
    """The Kubernetes manifest loads; the sidecar runs `tokenproxy run -c FILE` (with the image's ENTRYPOINT), probes the admin port, keeps state on an emptyDir."""
    docs = list(yaml.safe_load_all((ROOT / "deploy/kubernetes/sidecar.yaml").read_text()))
    kinds = {doc["kind"]: doc for doc in docs}
    assert set(kinds) == {"Secret", "ConfigMap", "Deployment"}
    pod = kinds["Deployment"]["spec"]["template"]["spec"]
    sidecar = next(c for c in pod["containers"] if c["name"] == "tokenproxy")
    # What Kubernetes runs: `command` (when not empty) replaces the image's ENTRYPOINT, `args` follow either.
    entrypoint = json.loads(re.search(r"^ENTRYPOINT (.+)$", (ROOT / "Dockerfile").read_text(), re.M).group(1))  # type: ignore[union-attr]
    argv = (sidecar.get("command") or entrypoint) + sidecar.get("args", [])
    assert argv == ["tokenproxy", *RUN_ARGS]
    assert sidecar["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert sidecar["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert sidecar["envFrom"][0]["secretRef"]["name"] == "tokenproxy-credentials"
    state = next(v for v in pod["volumes"] if v["name"] == "state")
    assert "emptyDir" in state
    config = parse_config(tomllib.loads(kinds["ConfigMap"]["data"]["tokenproxy.toml"]), CREDENTIALS)
    assert config.server.listen == "127.0.0.1:8080"
    assert config.server.admin_listen.endswith(":8081")
    # SIGTERM comes after the app has had time to drain; the grace period covers that wait and the proxy's drain.
    wait = int(sidecar["lifecycle"]["preStop"]["exec"]["command"][1])
    assert pod["terminationGracePeriodSeconds"] > wait + config.server.shutdown_timeout
    assert set(kinds["Secret"]["stringData"]) == set(CREDENTIALS)


def test_deploy_systemd_units_use_known_keys_and_the_run_command() -> None:
    """Both units parse, use only keys systemd knows, and start `tokenproxy run -c FILE`."""
    for name in ("tokenproxy.service", "tokenproxy-user.service"):
        parser = configparser.ConfigParser(strict=True, interpolation=None)
        parser.read_string((ROOT / "deploy/systemd" / name).read_text())
        for section in parser.sections():
            unknown = set(parser[section]) - SYSTEMD_KEYS[section.lower()]
            assert not unknown, f"{name} [{section}] unknown keys {unknown}"
        command = shlex.split(parser["Service"]["ExecStart"])
        assert command[0].endswith("/tokenproxy") and command[1:3] == ["run", "-c"]
    system = configparser.ConfigParser(interpolation=None)
    system.read_string((ROOT / "deploy/systemd/tokenproxy.service").read_text())
    service = system["Service"]
    assert service["DynamicUser"] == "yes" and service["NoNewPrivileges"] == "yes"
    assert service["ProtectSystem"] == "strict" and service["StateDirectory"] == "tokenproxy"


def test_deploy_dockerfile_non_root_healthcheck_and_entrypoint() -> None:
    """The Dockerfile runs as a non-root user, checks /healthz on the admin port, and runs `tokenproxy run -c FILE`."""
    text = (ROOT / "Dockerfile").read_text()
    entry = json.loads(re.search(r"^ENTRYPOINT (.+)$", text, re.M).group(1))  # type: ignore[union-attr]
    assert entry == ["tokenproxy", *RUN_ARGS]
    assert re.search(r"^USER tokenproxy$", text, re.M)
    assert "HEALTHCHECK" in text and "127.0.0.1:8081/healthz" in text
    assert re.search(r"^FROM python:3\.\d+-slim$", text, re.M)


async def test_deploy_config_serves_with_the_deployed_command_line(tmp_path, token_server, api) -> None:
    """deploy/tokenproxy.toml, run as the deployment files run it, serves requests and /healthz."""
    env = {
        **os.environ,
        "UPSTREAM_URL": api.base_url,
        "TOKEN_URL": f"{token_server.base_url}/oauth/token",
        "CLIENT_ID": CLIENT_ID,
        "CLIENT_SECRET": CLIENT_SECRET,
        "REFRESH_TOKEN": token_server.current_refresh,
        "TOKENPROXY_LISTEN": "127.0.0.1:0",
        "TOKENPROXY_ADMIN_LISTEN": "127.0.0.1:0",
        "TOKENPROXY_STATE_FILE": str(tmp_path / "state.json"),
        "TOKENPROXY_LOG_FORMAT": "text",
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "run", "-c", str(ROOT / "deploy/tokenproxy.toml"),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env,
    )
    seen: list[str] = []
    try:
        assert proc.stderr is not None
        proxy = await read_until(proc.stderr, r"listening on (http://127\.0\.0\.1:\d+)", seen)
        admin = await read_until(proc.stderr, r"admin listening on (http://127\.0\.0\.1:\d+)", seen)
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{proxy.group(1)}/echo/deployed") as resp:
                assert resp.status == 200
            async with session.get(f"{admin.group(1)}/healthz") as resp:
                assert resp.status == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0
