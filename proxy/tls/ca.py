"""The local certificate authority: `tokenproxy ca init` makes it; CONNECT interception signs leaves with it.

Owns: the CA's two files in `server.ca_dir` (`ca.key`, 0600, written
atomically; `ca.crt`), their safety checks (the state directory's: a key
another user could have written is refused), and minting a short-lived leaf
certificate per intercepted host, cached in memory. Knows nothing of the
config file or of HTTP.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import os
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ..tokens.store import UnsafeStateError, check_directory, check_file

CA_CERT = "ca.crt"
CA_KEY = "ca.key"
BUNDLE = "bundle.pem"  # the system's roots plus the local CA, for tools given one CA file

# A leaf lives this long; one process mints it once per host (a restart mints anew).
LEAF_DAYS = 30
# Clocks a little behind ours still accept a fresh certificate.
_BACKDATE = datetime.timedelta(minutes=5)


class CAError(Exception):
    """The local CA cannot be made or used; the message says why and what to do."""


class NoCA(CAError):
    """There is no local CA in the directory yet."""


def default_ca_dir() -> Path:
    """`~/.local/state/tokenproxy/ca` (under $XDG_STATE_HOME when set)."""
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "tokenproxy" / "ca"


def ca_name() -> str:
    """The CA's common name: says tokenproxy and the machine, so a person who finds it in a trust store knows it."""
    return f"tokenproxy local CA ({socket.gethostname()})"


def _ensure_directory(directory: Path) -> None:
    """Create `directory` (0700, parents as needed) or check the existing one; UnsafeStateError when unsafe."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    check_directory(directory, directory.stat())


def create_ca(directory: Path, *, days: int = 365, force: bool = False) -> Path:
    """Make a CA in `directory` (EC P-256 key 0600, certificate valid `days` days); returns the certificate path.

    Refuses (CAError) to replace an existing CA unless `force`.
    """
    _ensure_directory(directory)
    cert_path, key_path = directory / CA_CERT, directory / CA_KEY
    if not force and (cert_path.exists() or key_path.exists()):
        raise CAError(f"a CA already exists in {directory}: `tokenproxy ca init --force` replaces it")
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "tokenproxy"),
            x509.NameAttribute(NameOID.COMMON_NAME, ca_name()),
        ]
    )
    now = datetime.datetime.now(datetime.UTC)
    public = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    # The key first, then the certificate: a CA is usable only once both are whole.
    write_atomically(key_path, key_pem, 0o600)
    write_atomically(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return cert_path


def write_atomically(path: Path, data: bytes, mode: int) -> None:
    """Write `data` to a new file beside `path` with `mode`, flush it to disk, and rename it over `path`."""
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.chmod(temp, mode)  # the umask may have taken bits off
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            temp.unlink()
        raise


def system_roots(avoid: Path) -> Path | None:
    """The system's root certificates as one PEM file (OpenSSL's default, else certifi's), never `avoid`."""
    paths = ssl.get_default_verify_paths()
    candidates = [paths.cafile, paths.openssl_cafile]
    try:
        import certifi  # optional: used where installed

        candidates.append(certifi.where())
    except ImportError:
        pass
    for candidate in candidates:
        if candidate and Path(candidate).is_file() and Path(candidate).resolve() != avoid.resolve():
            return Path(candidate)
    return None


def trust_bundle(directory: Path, cert_path: Path) -> Path:
    """`directory/bundle.pem` (0644): the system's roots plus the local CA, rewritten when missing or stale."""
    bundle = directory / BUNDLE
    roots = system_roots(bundle)
    wanted = (roots.read_bytes().rstrip(b"\n") + b"\n" if roots is not None else b"") + cert_path.read_bytes()
    try:
        current = bundle.read_bytes()
    except FileNotFoundError:
        current = None
    if current != wanted:
        write_atomically(bundle, wanted, 0o644)
    return bundle


def ca_paths(directory: Path) -> tuple[Path, Path]:
    """The certificate and key paths of the CA in `directory`; NoCA when either is missing."""
    cert_path, key_path = directory / CA_CERT, directory / CA_KEY
    if not cert_path.is_file() or not key_path.exists():
        raise NoCA(f"no local CA in {directory}: run `tokenproxy ca init`")
    return cert_path, key_path


class LocalCA:
    """The CA loaded from its directory, and the TLS server contexts of the hosts it intercepts.

    Contexts are made on first use per host and kept for the process's life
    (the set of hosts is bounded by the routes). One leaf key serves every
    host; it lives only in memory.
    """

    def __init__(self, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey, cert_path: Path) -> None:
        self.cert = cert
        self.cert_path = cert_path
        self._key = key
        self._leaf_key = ec.generate_private_key(ec.SECP256R1())
        self._contexts: dict[str, ssl.SSLContext] = {}

    @classmethod
    def load(cls, directory: Path) -> LocalCA:
        """Read the CA in `directory`: NoCA when there is none; CAError when its key or directory is unsafe or
        unreadable."""
        cert_path, key_path = ca_paths(directory)
        try:
            check_directory(directory, directory.stat())
            check_file(key_path, key_path.lstat(), "CA key")
            if key_path.lstat().st_mode & 0o077:
                raise UnsafeStateError(f"CA key {key_path} is readable by other users: chmod 600 {key_path}")
            key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
            cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        except UnsafeStateError as error:
            raise CAError(str(error)) from None
        except (OSError, ValueError) as error:
            raise CAError(f"cannot read the local CA in {directory} ({type(error).__name__}): "
                          "`tokenproxy ca init --force` makes a new one") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise CAError(f"the CA key {key_path} is not an EC key: `tokenproxy ca init --force` makes a new one")
        return cls(cert, key, cert_path)

    def context_for(self, host: str) -> ssl.SSLContext:
        """The server TLS context for `host` (a name or an IP address, no port): its leaf, ALPN http/1.1, and an
        SNI check (a client that names another host, or none for a name, fails the handshake)."""
        context = self._contexts.get(host)
        if context is None:
            context = self._contexts[host] = self._make_context(host)
        return context

    def _make_context(self, host: str) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.set_alpn_protocols(["http/1.1"])
        cert_pem, key_pem = self._mint(host)
        with _memory_file(cert_pem + self.cert.public_bytes(serialization.Encoding.PEM)) as chain, _memory_file(
            key_pem
        ) as key:
            context.load_cert_chain(chain, key)
        expected = None if _ip(host) is not None else host

        def check_sni(_: object, server_name: str | None, __: ssl.SSLContext) -> int | None:
            if (server_name or None) != expected:
                return ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME
            return None

        context.sni_callback = check_sni
        return context

    def _mint(self, host: str) -> tuple[bytes, bytes]:
        """A leaf certificate for `host` signed by the CA, and the leaf key, as PEM."""
        now = datetime.datetime.now(datetime.UTC)
        address = _ip(host)
        san: x509.GeneralName = x509.IPAddress(address) if address is not None else x509.DNSName(host)
        public = self._leaf_key.public_key()
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)]))
            .issuer_name(self.cert.subject)
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _BACKDATE)
            .not_valid_after(min(now + datetime.timedelta(days=LEAF_DAYS), self.cert.not_valid_after_utc))
            .add_extension(x509.SubjectAlternativeName([san]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()), critical=False
            )
            .sign(self._key, hashes.SHA256())
        )
        key_pem = self._leaf_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        return cert.public_bytes(serialization.Encoding.PEM), key_pem


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


@contextlib.contextmanager
def _memory_file(data: bytes) -> Iterator[str]:
    """A path to `data` that exists only in memory (memfd), for `load_cert_chain`, which reads files only."""
    fd = os.memfd_create("tokenproxy-leaf", getattr(os, "MFD_CLOEXEC", 0))
    try:
        os.write(fd, data)
        yield f"/proc/self/fd/{fd}"
    finally:
        os.close(fd)

