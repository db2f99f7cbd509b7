"""One server's credentials in one file: how a host joins an organization.

The host holding the organization's CA key writes, for one server, every certificate
that server's services show (its POP3 certificate, a mailbox server's replication
certificate, its health API's), the operator's client certificate that the commands
of a host show to replication services, their keys, the CA certificate and the
organization's health API token, into one JSON file of mode 0600. The host that runs
the server installs them in its own data folder, where `TlsMaterial` finds them. The
CA's key is never in the file: a host without it uses the certificates it was given
and makes none.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from popguard.errors import UserError
from popguard.net.tls import CertificatePair, TlsMaterial, _issued_by, _write_owner_only

FORMAT = "popguard-server-credentials/1"


@dataclass(frozen=True)
class Credential:
    """One certificate and its key, and the name they are kept under (TlsMaterial's)."""

    name: str
    purpose: str
    certificate: str  # PEM
    key: str  # PEM


@dataclass(frozen=True)
class Bundle:
    server: str
    organization: str
    ca_certificate: str  # PEM
    credentials: tuple[Credential, ...]
    api_token: str


def server_pairs(
    tls: TlsMaterial,
    name: str,
    roles: tuple[str, ...],
    address: str,
    certificate_name: str | None,
) -> list[tuple[str, str, CertificatePair]]:
    """(name, purpose, pair) of every certificate `name`'s services and its host's
    commands show, made or renewed here (this host signs)."""
    pairs = [(certificate_name or name, "", tls.pop3_identity(name, address, certificate_name))]
    if "mailbox" in roles:
        pairs.append((name, "replication", tls.replication_identity(name, address)))
    pairs.append((name, "health", tls.health_identity(name, address)))
    pairs.append(("popguard-admin", "client", tls.admin_identity()))
    return pairs


def write_bundle(
    out: Path,
    tls: TlsMaterial,
    server: str,
    organization: str,
    pairs: list[tuple[str, str, CertificatePair]],
    api_token: str,
) -> None:
    """The file, created with mode 0600 and never over an existing one."""
    body = {
        "format": FORMAT,
        "server": server,
        "organization": organization,
        "ca_certificate": tls.ca_certificate_file.read_text(),
        "credentials": [
            {
                "name": name,
                "purpose": purpose,
                "certificate": pair.certificate.read_text(),
                "key": pair.key.read_text(),
            }
            for name, purpose, pair in pairs
        ],
        "api_token": api_token,
    }
    try:
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise UserError(f"{out} exists: credentials are never written over a file") from None
    except OSError as exc:
        raise UserError(f"{out}: {exc.strerror}") from None
    with os.fdopen(fd, "w") as file:
        json.dump(body, file, indent=2)
        file.write("\n")


def read_bundle(path: Path) -> Bundle:
    """The file's credentials, each checked: a certificate signed by the file's CA, a
    key that is that certificate's. One line naming what is wrong otherwise."""
    try:
        if os.stat(path).st_mode & 0o077:
            raise UserError(
                f"{path} is open to group or others: it holds private keys (`chmod 600 {path}`)"
            )
        raw = json.loads(path.read_text())
    except OSError as exc:
        raise UserError(f"{path}: {exc.strerror}") from None
    except (ValueError, UnicodeDecodeError):
        raise UserError(f"{path}: not a popguard credentials file (not JSON)") from None
    try:
        if raw["format"] != FORMAT:
            raise UserError(f"{path}: not a popguard credentials file (format {raw['format']!r})")
        bundle = Bundle(
            server=str(raw["server"]),
            organization=str(raw["organization"]),
            ca_certificate=str(raw["ca_certificate"]),
            credentials=tuple(
                Credential(
                    str(entry["name"]),
                    str(entry["purpose"]),
                    str(entry["certificate"]),
                    str(entry["key"]),
                )
                for entry in raw["credentials"]
            ),
            api_token=str(raw["api_token"]),
        )
    except (KeyError, TypeError):
        raise UserError(f"{path}: not a popguard credentials file (a field is missing)") from None
    try:
        ca = x509.load_pem_x509_certificate(bundle.ca_certificate.encode())
    except ValueError:
        raise UserError(f"{path}: ca_certificate is not a PEM certificate") from None
    for credential in bundle.credentials:
        what = f"{path}: the certificate of {credential.name}"
        if not _safe_name(credential.name) or not _safe_name(credential.purpose or "x"):
            raise UserError(f"{what}: not a name for a file: {credential.name!r}")
        try:
            certificate = x509.load_pem_x509_certificate(credential.certificate.encode())
            key = serialization.load_pem_private_key(credential.key.encode(), password=None)
        except ValueError:
            raise UserError(f"{what}: not a PEM certificate and key") from None
        if not _issued_by(certificate, ca):
            raise UserError(f"{what} is not signed by the file's CA")
        if _public(key.public_key()) != _public(certificate.public_key()):
            raise UserError(f"{what}: its key is not the certificate's")
    if not bundle.api_token.strip():
        raise UserError(f"{path}: api_token is empty")
    return bundle


def _public(key: object) -> bytes:
    return key.public_bytes(  # type: ignore[attr-defined,no-any-return]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _safe_name(name: str) -> bool:
    return bool(name) and all(c.isalnum() or c in "-_." for c in name) and name[0] != "."


def install_bundle(tls: TlsMaterial, bundle: Bundle, source: Path) -> list[Path]:
    """The CA certificate (when this host has none) and each certificate and key, where
    TlsMaterial looks for them; refused when this host trusts another CA."""
    installed = []
    ca_file = tls.ca_certificate_file
    wanted = x509.load_pem_x509_certificate(bundle.ca_certificate.encode())
    if ca_file.exists():
        current = x509.load_pem_x509_certificate(ca_file.read_bytes())
        if current != wanted:
            raise UserError(
                f"{source}: its CA ({wanted.subject.rfc4514_string()}, serial "
                f"{wanted.serial_number:x}) is not the one this host has in {ca_file} "
                f"(serial {current.serial_number:x}): made by another organization"
            )
    else:
        ca_file.parent.mkdir(parents=True, exist_ok=True)
        _write_owner_only(ca_file, bundle.ca_certificate.encode())
        installed.append(ca_file)
    for credential in bundle.credentials:
        pair = tls.certificate_pair(credential.name, credential.purpose)
        pair.certificate.parent.mkdir(parents=True, exist_ok=True)
        _write_owner_only(pair.key, credential.key.encode())
        _write_owner_only(pair.certificate, credential.certificate.encode())
        installed += [pair.certificate, pair.key]
    return installed
