"""LMTP delivery (`popguard serve delivery`): RFC 2033 with aiosmtpd.

Each recipient is checked at RCPT time (550 5.1.1 when unknown). After DATA the
message is written, durably, into the active copy of each recipient's mailbox
database, and the server answers once per accepted recipient, in RCPT order, as
RFC 2033 section 4.2 requires. aiosmtpd's LMTP class sends one reply by itself;
the handler returns the per-recipient lines joined, which aiosmtpd writes as is.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
from pathlib import Path
from typing import Any

from aiosmtpd.lmtp import LMTP

from popguard.directory.directory import Server
from popguard.net.serving import every, listen
from popguard.services.context import ServerContext
from popguard.services.counters import PUBLISH_INTERVAL, ServiceCounters
from popguard.store.mailbox_database import NotMountedError
from popguard.store.mounted import MountedDatabases

log = logging.getLogger("popguard.delivery")

# The largest message accepted, in octets (552 5.3.4 beyond it).
DEFAULT_MAX_MESSAGE_SIZE = 50 * 1024 * 1024
# RFC 5321 section 4.5.3.1.8: at least 100 recipients must be accepted.
MAX_RECIPIENTS = 1000


class PerRecipientLMTP(LMTP):
    """aiosmtpd's LMTP, made to answer an aborted DATA once per recipient.

    When a message is over the size limit (552) or has an over-long line (500),
    aiosmtpd answers the end of DATA itself, once. RFC 2033 section 4.2 wants one
    reply per accepted recipient, and an LMTP client such as Postfix waits for all
    of them, so the same reply is repeated for each.
    """

    _after_data_prompt = False

    async def smtp_DATA(self, arg: str) -> None:
        try:
            await super().smtp_DATA(arg)
        finally:
            self._after_data_prompt = False

    async def push(self, status: Any) -> None:
        text = status.decode() if isinstance(status, bytes) else str(status)
        if text.startswith("354"):
            self._after_data_prompt = True
        elif self._after_data_prompt and text.startswith(("552", "500")):
            self._after_data_prompt = False
            recipients = max(1, len(self.envelope.rcpt_tos)) if self.envelope else 1
            await super().push("\r\n".join([text] * recipients))
            return
        await super().push(status)


class DeliveryHandler:
    def __init__(self, service: DeliveryService) -> None:
        self._service = service

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, rcpt_options: list[str]
    ) -> str:
        if len(envelope.rcpt_tos) >= MAX_RECIPIENTS:
            return "452 4.5.3 Too many recipients"
        mailbox = self._service.directory.find_mailbox(address)
        if mailbox is None:
            return f"550 5.1.1 <{address}>: no such mailbox"
        envelope.rcpt_tos.append(mailbox.address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        content: bytes = envelope.original_content or b""
        sender = (envelope.mail_from or "").strip("<>")
        # RFC 5321 section 4.4: the final delivery adds the Return-Path.
        message = f"Return-Path: <{sender}>\r\n".encode() + content
        replies = []
        for recipient in envelope.rcpt_tos:
            replies.append(await self._service.deliver(recipient, message))
        return "\r\n".join(replies)


class DeliveryService:
    def __init__(
        self, context: ServerContext, max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE
    ) -> None:
        self.context = context
        self.directory = context.directory
        self.server: Server = context.server
        self.databases = MountedDatabases(context.folder, self.server.name, self.directory)
        self.counters = ServiceCounters("delivery")
        self.max_message_size = max_message_size

    async def deliver(self, recipient: str, message: bytes) -> str:
        """Store one copy for one recipient; the LMTP reply line for it. Never raises:
        an exception would make aiosmtpd answer once, with its text, for everyone."""
        try:
            mailbox = self.directory.find_mailbox(recipient)
            if mailbox is None:  # removed between RCPT and the end of DATA
                return f"550 5.1.1 <{recipient}>: no such mailbox"
            uid = await self.databases.write(
                mailbox.database, lambda store: store.deliver(mailbox.address, message)
            )
        except NotMountedError as exc:
            log.warning("not delivering to %s: %s", recipient, exc)
            return f"451 4.3.0 <{recipient}>: mailbox database not mounted here, try again later"
        except Exception:
            log.exception("delivery to %s failed", recipient)
            return f"451 4.3.0 <{recipient}>: temporary store failure, try again later"
        self.counters.command_done(0.0)
        log.info("delivered to %s as uid %d (%d octets)", recipient, uid, len(message))
        return f"250 2.0.0 <{recipient}> delivered as uid {uid}"

    async def run(self, stop: asyncio.Event) -> None:
        handler = DeliveryHandler(self)
        loop = asyncio.get_running_loop()
        address, port = self.server.address, self.server.port("lmtp")
        listener = await listen(
            functools.partial(
                loop.create_server,
                lambda: PerRecipientLMTP(
                    handler,
                    data_size_limit=self.max_message_size,
                    enable_SMTPUTF8=True,
                    decode_data=False,
                    hostname=self.server.name,
                    ident="popguard LMTP",
                ),
                address,
                port,
                reuse_address=True,
            ),
            "lmtp",
            address,
            port,
        )
        log.info(
            "LMTP listening on %s:%d, pid %d",
            self.server.address,
            self.server.port("lmtp"),
            os.getpid(),
        )
        counters_file = self.context.folder.counters_file("delivery")
        publisher = asyncio.create_task(
            every(PUBLISH_INTERVAL, lambda: self.counters.publish(counters_file), stop)
        )
        await stop.wait()
        listener.close()
        await publisher
        self.databases.close()
        self.directory.close()


def serve(data: Path, server_name: str, max_message_size: int) -> None:
    from popguard.net.serving import run_until_stopped, setup_logging

    setup_logging("delivery", server_name)
    service = DeliveryService(ServerContext.open(data, server_name, "mailbox"), max_message_size)
    run_until_stopped(service.run)
