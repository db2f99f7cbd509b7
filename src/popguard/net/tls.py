"""The organization's certificate authority and each server's certificate.

On first start popguard makes a CA in the data folder and signs one certificate
per server with it, so a client needs to trust a single file: `tls/ca.pem`.
"""

from __future__ import annotations

import datetime
import fcntl
import ipaddress
import os
import ssl
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from popguard import paths
from popguard.directory.location import directory_elsewhere
from popguard.errors import UserError

# A session from a full handshake, in which the server's certificate was verified,
# is resumed for at most this long; then the next connection verifies it again.
RESUMPTION_LIFETIME = 300.0  # seconds
CA_VALIDITY = datetime.timedelta(days=3650)
SERVER_VALIDITY = datetime.timedelta(days=397)  # the CA/Browser Forum's ceiling
RENEW_BEFORE = datetime.timedelta(days=30)
# A certificate is valid from this long before it was made: a host whose wall clock is
# behind the one that made it (stepped back an hour, say) must still accept it, or every
# handshake it verifies fails ("not yet valid"), its own health probes among them, whose
# responders would then restart its services and move its databases away.
NOT_BEFORE_MARGIN = datetime.timedelta(days=1)
CA_CERTIFICATE = "ca.pem"
CA_KEY = paths.CA_KEY_NAME
# TLS 1.2 suites every server offers: Mozilla's "intermediate" profile (v5.7), AEAD
# only, forward secret only; no CBC suite (RFC 7457: Lucky Thirteen, padding oracles).
# TLS 1.3's suites are all AEAD and OpenSSL keeps them apart from this list.
SERVER_CIPHERS = ":".join([
    "ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-RSA-AES128-GCM-SHA256",
    "ECDHE-ECDSA-AES256-GCM-SHA384", "ECDHE-RSA-AES256-GCM-SHA384",
    "ECDHE-ECDSA-CHACHA20-POLY1305", "ECDHE-RSA-CHACHA20-POLY1305",
    "DHE-RSA-AES128-GCM-SHA256", "DHE-RSA-AES256-GCM-SHA384",
])  # fmt: skip


@dataclass(frozen=True)
class CertificatePair:
    certificate: Path
    key: Path


@contextmanager
def _locked(folder: Path) -> Iterator[None]:
    # Several services of one organization start at once; the lock makes sure only
    # one of them creates the CA or a given certificate.
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _write_owner_only(path: Path, content: bytes) -> None:
    """Keys and certificates alike: the data folder is its owner's alone."""
    temporary = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(content)
        out.flush()
        os.fsync(out.fileno())
    os.replace(temporary, path)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _load_ca_key(folder: Path) -> ec.EllipticCurvePrivateKey:
    """The CA's key, read only to sign: a host or user that only serves (a service
    run as an unprivileged user, a host without the CA) never needs it."""
    key_file = folder / CA_KEY
    try:
        key = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
    except OSError as exc:
        raise UserError(
            f"cannot sign a certificate: {key_file}: {exc.strerror}; the commands that sign "
            "(`popguard up`) run as the owner of the CA key"
        ) from None
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return key


def _ensure_ca(folder: Path, may_make: bool = True) -> x509.Certificate:
    """The CA's certificate; the CA is made (key and certificate) when it has none and
    `may_make` (a host that joined an organization never makes a CA of its own: its
    servers' certificates would be a stranger's to every other host)."""
    cert_file = folder / CA_CERTIFICATE
    if cert_file.exists():
        return x509.load_pem_x509_certificate(cert_file.read_bytes())
    if not may_make:
        raise UserError(
            f"no organization CA certificate on this host ({cert_file}); run "
            "`popguard import-server-credentials FILE` with a file made by "
            "`popguard export-server-credentials` on the host that holds the CA"
        )
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "popguard organization CA")])
    now = _now()
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - NOT_BEFORE_MARGIN)
        .not_valid_after(now + CA_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
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
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write_owner_only(folder / CA_KEY, _key_pem(key))
    _write_owner_only(cert_file, certificate.public_bytes(serialization.Encoding.PEM))
    return certificate


def _subject(name: str, unit: str) -> x509.Name:
    """CN = the name; OU = what the certificate is for, where that matters: replication
    and admin certificates carry theirs, so a POP3 certificate named after a server
    (X509CertificateName is the operator's to choose) is never taken for one."""
    attributes = [x509.NameAttribute(NameOID.COMMON_NAME, name)]
    if unit:
        attributes.append(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, unit))
    return x509.Name(attributes)


def _issued_by(certificate: x509.Certificate, ca: x509.Certificate) -> bool:
    """Signed by this CA's key, not merely by a CA of the same name."""
    try:
        certificate.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _subject_names(certificate: x509.Certificate) -> set[str]:
    try:
        extension = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return set()
    names = {str(n) for n in extension.value.get_values_for_type(x509.DNSName)}
    names |= {str(ip) for ip in extension.value.get_values_for_type(x509.IPAddress)}
    return names


def server_context(pair: CertificatePair) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(SERVER_CIPHERS)
    context.load_cert_chain(pair.certificate, pair.key)
    return context


# The name on the certificate an operator's commands show to replication services.
ADMIN_IDENTITY = "popguard-admin"
ADMIN_UNIT = "popguard admin"
REPLICATION_UNIT = "popguard replication"
HEALTH_UNIT = "popguard health"


def peer_name(certificate: dict[str, object] | None) -> str | None:
    """The common name of a verified peer certificate (ssl's getpeercert() form)."""
    return _peer_field(certificate, "commonName")


def peer_unit(certificate: dict[str, object] | None) -> str | None:
    return _peer_field(certificate, "organizationalUnitName")


def _peer_field(certificate: dict[str, object] | None, field: str) -> str | None:
    for rdn in (certificate or {}).get("subject", ()):  # type: ignore[attr-defined]
        for key, value in rdn:
            if key == field:
                return str(value)
    return None


class ResumingClientContext(ssl.SSLContext):
    """A client context that resumes, per server name, the session of the last
    full handshake (TLS 1.2 session tickets).

    A resumed TLS 1.2 handshake skips the certificate, the signature and the key
    exchange: both sides only check a ticket and derive new keys from the saved
    master secret. (TLS 1.3 resumption in OpenSSL still runs an ECDHE exchange,
    so it saves far less.) asyncio's and uvloop's create_connection take no
    session, but both make their SSLObject through `wrap_bio`, which adds it.

    The price: a resumed connection's keys come from the master secret of the
    full handshake, which the server's ticket carries, encrypted with a key that
    OpenSSL keeps for the life of the server's context (the back end process).
    Whoever reads that key from the back end's memory can decrypt recorded
    connections resumed from tickets it made; RESUMPTION_LIFETIME bounds how
    many connections one master secret serves. Only the front end's own leg to
    the back ends uses this context.
    """

    def __init__(self, protocol: int = ssl.PROTOCOL_TLS_CLIENT) -> None:
        super().__init__()
        # server name -> (session, when the full handshake that verified it ended)
        self._sessions: dict[str, tuple[ssl.SSLSession, float]] = {}

    def wrap_bio(
        self,
        incoming: ssl.MemoryBIO,
        outgoing: ssl.MemoryBIO,
        server_side: bool = False,
        server_hostname: str | bytes | None = None,
        session: ssl.SSLSession | None = None,
    ) -> ssl.SSLObject:
        if session is None and not server_side and isinstance(server_hostname, str):
            session = self._session_for(server_hostname)
        return super().wrap_bio(incoming, outgoing, server_side, server_hostname, session)

    def _session_for(self, server_hostname: str) -> ssl.SSLSession | None:
        entry = self._sessions.get(server_hostname)
        if entry is None:
            return None
        if time.monotonic() - entry[1] > RESUMPTION_LIFETIME:
            del self._sessions[server_hostname]
            return None
        return entry[0]

    def handshake_done(self, ssl_object: ssl.SSLObject | ssl.SSLSocket | None) -> None:
        """Keep the session of a full handshake for the next connections.

        A resumed handshake leaves the kept session as it is: reading
        `SSLObject.session` copies it (CPython serializes and parses it, the
        server's certificate included), which costs about what resuming saves.
        The server does not renew a TLS 1.2 ticket it accepted, so the kept one
        stays good until RESUMPTION_LIFETIME or until the server refuses it.
        """
        if ssl_object is None or ssl_object.server_side or ssl_object.session_reused:
            return
        name, session = ssl_object.server_hostname, ssl_object.session
        if name is not None and session is not None:
            self._sessions[name] = (session, time.monotonic())


class TlsMaterial:
    """The organization's CA and the certificates made from it, in one folder.

    Whoever holds one can make and renew certificates and build the TLS contexts that
    trust the organization's CA and nothing else.
    """

    def __init__(self, folder: Path, may_make_ca: bool = True) -> None:
        self.folder = folder
        self.may_make_ca = may_make_ca

    @classmethod
    def of(cls, data: Path) -> TlsMaterial:
        """The material in a data folder. A data folder whose directory lives elsewhere
        (a `[directory]` in its popguard.toml) belongs to a host that joined the
        organization: it gets its certificates from the CA's host, never a CA."""
        return cls(paths.tls_dir(data), may_make_ca=not directory_elsewhere(data))

    def ensure_ca(self) -> Path:
        """Make the organization's CA here if this folder has none: what the host that
        makes the organization does (its first `popguard up`), whatever its directory."""
        with _locked(self.folder):
            _ensure_ca(self.folder, may_make=True)
        return self.ca_certificate_file

    @property
    def ca_key_file(self) -> Path:
        return self.folder / CA_KEY

    def certificate_pair(self, name: str, purpose: str = "") -> CertificatePair:
        """Where the certificate of `name` for `purpose` is kept (made or not)."""
        folder = self.folder / "servers"
        stem = f"{name}-{purpose}" if purpose else name
        return CertificatePair(folder / f"{stem}.pem", folder / f"{stem}.key")

    @property
    def ca_certificate_file(self) -> Path:
        return self.folder / CA_CERTIFICATE

    def ensure_server_certificate(
        self,
        name: str,
        dns_names: list[str],
        ip_addresses: list[str],
        purpose: str = "",
        unit: str = "",
    ) -> CertificatePair:
        """A certificate for `name`, made or renewed when missing, expiring or wrong.

        `purpose` keeps certificates of one name for different uses in separate files.
        """
        pair = self.certificate_pair(name, purpose)
        folder = pair.certificate.parent
        wanted = set(dns_names) | set(ip_addresses)
        with _locked(self.folder):
            ca_certificate = _ensure_ca(self.folder, self.may_make_ca)
            usable = False
            if pair.certificate.exists() and pair.key.exists():
                current = x509.load_pem_x509_certificate(pair.certificate.read_bytes())
                usable = (
                    current.not_valid_after_utc > _now()
                    and _subject_names(current) == wanted
                    and current.subject == _subject(name, unit)
                    and _issued_by(current, ca_certificate)
                )
                if usable and current.not_valid_after_utc - _now() > RENEW_BEFORE:
                    return pair
            if self.ca_key_file.exists() and not os.access(self.ca_key_file, os.R_OK):
                # A service run as the unprivileged service user: root's `up` made its
                # certificates; renewing one, or one for a new name, is root's too.
                if usable:
                    return pair
                what = f"{name} ({purpose})" if purpose else name
                raise UserError(
                    f"no certificate for {what} that this user may use, and the CA key is "
                    "root's: run `popguard up` as root, which makes the certificates of the "
                    "servers it runs (then restart the service)"
                )
            if not self.ca_key_file.exists():
                # A host without the CA's key (it joined with import-server-credentials):
                # an imported certificate serves until it expires; renewing it, or making
                # one for a new name, is the CA host's.
                if usable:
                    return pair
                what = f"{name} ({purpose})" if purpose else name
                raise UserError(
                    f"no certificate for server {what} on this host (and no CA key to make "
                    "one); run `popguard export-server-credentials SERVER --out FILE` on the "
                    "host holding the CA, then `popguard import-server-credentials FILE` here"
                )
            ca_key = _load_ca_key(self.folder)
            folder.mkdir(parents=True, exist_ok=True)
            key = ec.generate_private_key(ec.SECP256R1())
            now = _now()
            alternative_names: list[x509.GeneralName] = [x509.DNSName(n) for n in dns_names]
            alternative_names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ip_addresses]
            certificate = (
                x509.CertificateBuilder()
                .subject_name(_subject(name, unit))
                .issuer_name(ca_certificate.subject)
                .public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - NOT_BEFORE_MARGIN)
                .not_valid_after(now - NOT_BEFORE_MARGIN + SERVER_VALIDITY)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.SubjectAlternativeName(alternative_names), critical=False)
                .add_extension(
                    x509.ExtendedKeyUsage(
                        [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                    ),
                    critical=False,
                )
                .add_extension(
                    x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                    critical=False,
                )
                .sign(ca_key, hashes.SHA256())
            )
            _write_owner_only(pair.key, _key_pem(key))
            _write_owner_only(
                pair.certificate, certificate.public_bytes(serialization.Encoding.PEM)
            )
            return pair

    def client_context(self) -> ssl.SSLContext:
        """Trusts the organization's CA and nothing else (made here if it is not yet)."""
        if not self.ca_certificate_file.exists():
            with _locked(self.folder):
                _ensure_ca(self.folder, self.may_make_ca)
        context = ssl.create_default_context(cafile=str(self.ca_certificate_file))
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        return context

    def pop3_identity(
        self, server_name: str, address: str, certificate_name: str | None = None
    ) -> CertificatePair:
        """What a POP3 service shows its clients: named by the server's own name, the
        certificate name of its POP settings and its own address, nothing else, so it
        never passes for another server (not even one on 127.0.0.1 or localhost)."""
        name = certificate_name or server_name
        # The address appears as a DNS name too: fetchmail matches a host given as an
        # IP address against the certificate's DNS names only.
        dns_names = sorted({server_name.lower(), name.lower(), address})
        return self.ensure_server_certificate(name, dns_names, [address])

    def replication_identity(self, server_name: str, address: str) -> CertificatePair:
        """What a mailbox server shows other servers, as a server and as a client."""
        return self.ensure_server_certificate(
            server_name, [server_name.lower()], [address], purpose="replication",
            unit=REPLICATION_UNIT,
        )  # fmt: skip

    def health_identity(self, server_name: str, address: str) -> CertificatePair:
        """What a health API shows its callers (the commands, on this host or another)."""
        return self.ensure_server_certificate(
            server_name, [server_name.lower()], [address], purpose="health", unit=HEALTH_UNIT
        )

    def admin_identity(self) -> CertificatePair:
        """The operator's client certificate: readable only by whoever can read the data folder."""
        return self.ensure_server_certificate(
            ADMIN_IDENTITY, [ADMIN_IDENTITY], [], purpose="client", unit=ADMIN_UNIT
        )

    def mutual_server_context(self, pair: CertificatePair) -> ssl.SSLContext:
        """A server context that demands a client certificate from the organization's CA."""
        context = server_context(pair)
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(cafile=str(self.ca_certificate_file))
        return context

    def mutual_client_context(self, pair: CertificatePair) -> ssl.SSLContext:
        context = self.client_context()
        context.load_cert_chain(pair.certificate, pair.key)
        return context

    def resuming_client_context(self) -> ResumingClientContext:
        """For one organization server to another (the front end to its back ends):
        trusts the organization's CA only, TLS 1.2 with session resumption."""
        context = ResumingClientContext(ssl.PROTOCOL_TLS_CLIENT)
        context.load_verify_locations(cafile=str(self.ca_certificate_file))
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.maximum_version = ssl.TLSVersion.TLSv1_2
        return context
