"""send-message: deliver a file through LMTP, as an MTA would."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from popguard.cli.context import AppContext, pass_app
from popguard.cli.render import format_option, render
from popguard.errors import UserError
from popguard.services.lmtp_client import deliver


@click.command("send-message")
@click.option("--to", "recipients", multiple=True, required=True, help="Recipient address.")
@click.option(
    "--file",
    "message_file",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="The message (RFC 5322), '-' for standard input.",
)
@click.option("--from", "sender", default="", help="Envelope sender (default: none, <>).")
@format_option
@pass_app
def send_message(
    app: AppContext,
    recipients: tuple[str, ...],
    message_file: Path,
    sender: str,
    output_format: str,
) -> None:
    """Deliver a message through the LMTP service of the recipient's mailbox server."""
    if str(message_file) == "-":
        message = sys.stdin.buffer.read()
    else:
        try:
            message = message_file.read_bytes()
        except OSError as exc:
            raise UserError(f"cannot read {message_file}: {exc.strerror}") from None
    if not message.strip():
        raise UserError("the message is empty")
    rows = []
    failed = False
    with app.directory() as directory:
        for recipient in recipients:
            result = deliver(directory, recipient, message, sender)
            failed |= result.code != 250
            rows.append(
                {
                    "Recipient": result.recipient,
                    "Server": result.server,
                    "Status": result.code,
                    "Reply": result.reply,
                }
            )
    render(rows, output_format)
    if failed:
        raise UserError("not every recipient accepted the message")


COMMANDS = [send_message]
