"""Handing a message to a mailbox server's LMTP service (send-message, up, tests)."""

from __future__ import annotations

import smtplib
from dataclasses import dataclass

from popguard.directory.directory import Directory
from popguard.errors import UserError

LMTP_TIMEOUT = 30.0
# popguard's LMTP greets with its organization's id after these words (RFC 5321 lets the
# greeting carry any text after the name), which its own clients check.
IDENT = "popguard LMTP of organization"


def lmtp_ident(organization: str) -> str:
    return f"{IDENT} {organization}"


@dataclass(frozen=True)
class DeliveryResult:
    recipient: str
    server: str
    code: int
    reply: str


def deliver(
    directory: Directory, recipient: str, message: bytes, sender: str = ""
) -> DeliveryResult:
    """One LMTP transaction for one recipient, on the server that holds its database."""
    mailbox = directory.get_mailbox(recipient)
    server = directory.get_server(directory.active_server(mailbox.database))
    where = f"{server.address}:{server.port('lmtp')}"
    try:
        with smtplib.LMTP(timeout=LMTP_TIMEOUT) as client:
            _, greeting = client.connect(server.address, server.port("lmtp"))
            if not greeting.decode(errors="replace").endswith(
                lmtp_ident(directory.organization_id())
            ):
                raise UserError(
                    f"the LMTP service at {where} is not {server.name}'s of this organization "
                    f"(it greets {greeting.decode(errors='replace')!r}): nothing delivered"
                )
            client.ehlo_or_helo_if_needed()
            code, reply = client.mail(sender)
            if code == 250:
                code, reply = client.rcpt(mailbox.address)
            if code == 250:
                code, reply = client.data(message)
    except (OSError, smtplib.SMTPException) as exc:
        raise UserError(f"cannot deliver through LMTP on {server.name} ({where}): {exc}") from None
    return DeliveryResult(mailbox.address, server.name, code, reply.decode(errors="replace"))
