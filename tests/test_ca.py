"""`tokenproxy ca init` and `ca path`: the local CA's files, modes, name, extensions, and the refusals."""

from __future__ import annotations

import datetime
import os
import socket
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.helpers import run_cli

OTHER_UID = 12345


def home_env(tmp_path: Path) -> dict[str, str]:
    """A HOME of the test's own, no XDG_STATE_HOME and no config file found in the environment."""
    return {"HOME": str(tmp_path / "home"), "XDG_STATE_HOME": "", "TOKENPROXY_CONFIG": ""}


def ca_config(tmp_path: Path, ca_dir: Path, extra: str = "") -> Path:
    path = tmp_path / "c.toml"
    path.write_text(
        '[upstream]\nurl = "https://api.example.com"\n[token]\ngrant = "static"\naccess_token = "t-0123456789"\n'
        f'[server]\nca_dir = "{ca_dir}"\n{extra}'
    )
    path.chmod(0o600)
    return path


async def test_ca_init_creates_a_key_0600_and_a_signing_only_certificate_in_the_default_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # no tokenproxy.toml found there
    code, out, err = await run_cli("ca", "init", env=home_env(tmp_path))
    directory = tmp_path / "home" / ".local" / "state" / "tokenproxy" / "ca"
    assert (code, err) == (0, "")
    assert out == (
        f"created a local CA valid for 365 days: {directory / 'ca.crt'}\n"
        "tools trust it through `tokenproxy env` or `tokenproxy exec`; its key never leaves this machine\n"
    )
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert stat.S_IMODE((directory / "ca.key").stat().st_mode) == 0o600
    assert sorted(p.name for p in directory.iterdir()) == ["ca.crt", "ca.key"]  # no temporary file left
    key = serialization.load_pem_private_key((directory / "ca.key").read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp256r1"
    cert = x509.load_pem_x509_certificate((directory / "ca.crt").read_bytes())
    assert cert.public_key() == key.public_key()
    common_name = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    assert common_name == f"tokenproxy local CA ({socket.gethostname()})"
    assert cert.issuer == cert.subject
    constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca and constraints.value.path_length == 0
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical
    assert usage.value.key_cert_sign and usage.value.crl_sign
    assert not any(
        getattr(usage.value, name)
        for name in ("digital_signature", "content_commitment", "key_encipherment", "data_encipherment", "key_agreement")
    )
    lifetime = cert.not_valid_after_utc - datetime.datetime.now(datetime.UTC)
    assert datetime.timedelta(days=364) < lifetime <= datetime.timedelta(days=365)

    code, out, err = await run_cli("ca", "path", env=home_env(tmp_path))
    assert (code, out, err) == (0, f"{directory / 'ca.crt'}\n", "")


async def test_ca_init_refuses_to_replace_a_ca_unless_forced(tmp_path: Path) -> None:
    ca_dir = tmp_path / "ca"
    config = ca_config(tmp_path, ca_dir)
    assert (await run_cli("ca", "init", "-c", str(config), "--days", "30"))[0] == 0
    first = (ca_dir / "ca.key").read_bytes()
    code, out, err = await run_cli("ca", "init", "-c", str(config))
    assert (code, out) == (1, "")
    assert err == f"ca init: a CA already exists in {ca_dir}: `tokenproxy ca init --force` replaces it\n"
    assert (ca_dir / "ca.key").read_bytes() == first
    code, out, err = await run_cli("ca", "init", "-c", str(config), "--force")
    assert (code, err) == (0, "")
    assert out.startswith(f"created a local CA valid for 365 days: {ca_dir / 'ca.crt'}\n")
    assert (ca_dir / "ca.key").read_bytes() != first
    assert stat.S_IMODE((ca_dir / "ca.key").stat().st_mode) == 0o600


async def test_ca_init_days(tmp_path: Path) -> None:
    ca_dir = tmp_path / "ca"
    code, out, _ = await run_cli("ca", "init", "-c", str(ca_config(tmp_path, ca_dir)), "--days", "30")
    assert code == 0 and out.startswith("created a local CA valid for 30 days")
    cert = x509.load_pem_x509_certificate((ca_dir / "ca.crt").read_bytes())
    lifetime = cert.not_valid_after_utc - datetime.datetime.now(datetime.UTC)
    assert datetime.timedelta(days=29) < lifetime <= datetime.timedelta(days=30)


async def test_ca_path_without_a_ca_says_to_run_ca_init(tmp_path: Path) -> None:
    ca_dir = tmp_path / "ca"
    code, out, err = await run_cli("ca", "path", "-c", str(ca_config(tmp_path, ca_dir)))
    assert (code, out) == (1, "")
    assert err == f"ca path: no local CA in {ca_dir}: run `tokenproxy ca init`\n"


@pytest.mark.parametrize("planted", ["writable", "foreign"])
async def test_ca_init_refuses_a_directory_another_user_could_write(tmp_path: Path, planted: str) -> None:
    ca_dir = tmp_path / "ca"
    ca_dir.mkdir()
    if planted == "writable":
        ca_dir.chmod(0o777)
        why = f"state directory {ca_dir} is writable by other users (mode 0777, no sticky bit)"
    else:
        os.chown(ca_dir, OTHER_UID, OTHER_UID)
        why = f"state directory {ca_dir} is owned by uid {OTHER_UID}"
    code, out, err = await run_cli("ca", "init", "-c", str(ca_config(tmp_path, ca_dir)))
    assert (code, out) == (1, "")
    assert err.startswith(f"ca init: {why}") and err.count("\n") == 1
    assert list(ca_dir.iterdir()) == []


async def test_bad_connect_passthrough_exits_2_naming_the_key(tmp_path: Path) -> None:
    config = ca_config(tmp_path, tmp_path / "ca", 'connect_passthrough = ["*.example.org", "https://x/"]\n')
    code, out, err = await run_cli("ca", "path", "-c", str(config))
    assert (code, out) == (2, "")
    assert err == (
        'config: server.connect_passthrough[1]: must be a host name pattern like "*.example.org" (optionally :PORT), '
        "got 'https://x/'\n"
    )
