"""Handing a message to a mailbox server's LMTP service (send-message, up, tests)."""

from __future__ import annotations

import smtplib
from dataclasses import dataclass

from popguard.directory.directory import Directory
from popguard.errors import UserError

LMTP_TIMEOUT = 30.0


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
    try:
        with smtplib.LMTP(server.address, server.port("lmtp"), timeout=LMTP_TIMEOUT) as client:
            client.ehlo_or_helo_if_needed()
            code, reply = client.mail(sender)
            if code == 250:
                code, reply = client.rcpt(mailbox.address)
            if code == 250:
                code, reply = client.data(message)
    except (OSError, smtplib.SMTPException) as exc:
        raise UserError(
            f"cannot deliver through LMTP on {server.name} "
            f"({server.address}:{server.port('lmtp')}): {exc}"
        ) from None
    return DeliveryResult(mailbox.address, server.name, code, reply.decode(errors="replace"))
