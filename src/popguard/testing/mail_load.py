"""A mail load that keeps count, for fault tests across hosts: run on a host of its own.

`python -m popguard.testing.mail_load load ...` delivers "load-N" messages over LMTP,
trying the mailbox servers in the order given (as Postfix tries its next hops), and
at the same time, through the front end over POP3S, deletes the oldest load message
now and then. It prints one JSON object: which numbers were acknowledged (with the
attempts each took) and which deletions a QUIT confirmed. `inventory` prints the
Subject of every message in the mailbox. Bounded in count and in time.
"""

from __future__ import annotations

import argparse
import json
import poplib
import re
import smtplib
import ssl
import sys
import threading
import time

LMTP_PORT = 2424
POP3S_PORT = 10995


def _pop3(args: argparse.Namespace) -> poplib.POP3_SSL:
    context = ssl.create_default_context(cafile=args.ca)
    client = poplib.POP3_SSL(args.pop3s, POP3S_PORT, context=context, timeout=20)
    client.user(args.user)
    client.pass_(args.password)
    return client


def _subject(client: poplib.POP3_SSL, number: int) -> str:
    head = b"\r\n".join(client.top(number, 0)[1]).decode(errors="replace")
    found = re.search(r"^Subject: (.*)$", head, re.MULTILINE)
    return found.group(1).strip() if found else ""


def _deliver(servers: list[str], user: str, number: int) -> tuple[bool, int]:
    """Whether a server acknowledged load-N, and how many servers were tried: each try
    after the first may have stored a copy the reply never said was stored."""
    for tries, server in enumerate(servers, start=1):
        try:
            with smtplib.LMTP(server, LMTP_PORT, timeout=30) as client:
                client.ehlo("load.example")
                client.mail("load@example.test")
                code, _ = client.rcpt(user)
                if code == 250:
                    content = f"Subject: load-{number}\r\n\r\nmessage {number}\r\n"
                    code, _ = client.data(content.encode())
                if code == 250:
                    return True, tries
        except (OSError, smtplib.SMTPException):
            continue
    return False, len(servers)


def load(args: argparse.Namespace) -> dict[str, object]:
    servers = args.lmtp.split(",")
    deadline = time.monotonic() + args.seconds
    acknowledged: dict[int, int] = {}
    deleted: list[int] = []
    # Marked for deletion, and the QUIT got -ERR or no answer: the deletion may or may
    # not have been applied (a QUIT that no passive copy confirmed answers -ERR with the
    # deletion applied on the active copy only), so neither outcome is a fault.
    uncertain: list[int] = []
    stop = threading.Event()

    def delete_now_and_then() -> None:
        while not stop.wait(args.delete_every):
            try:
                client = _pop3(args)
            except (OSError, poplib.error_proto):
                continue
            marked: int | None = None
            try:
                # The oldest load message among the first few (the demo mailbox starts
                # with a welcome message).
                for number in range(1, min(client.stat()[0], 5) + 1):
                    subject = _subject(client, number)
                    if subject.startswith("load-"):
                        client.dele(number)
                        marked = int(subject.split("-")[1])
                        client.quit()  # raises on -ERR
                        deleted.append(marked)
                        break
                else:
                    client.quit()
            except (OSError, poplib.error_proto):
                if marked is not None:
                    uncertain.append(marked)
                continue

    deleter = threading.Thread(target=delete_now_and_then, daemon=True)
    deleter.start()
    number, attempts = 0, 0
    while number < args.count and time.monotonic() < deadline:
        delivered, tries = _deliver(servers, args.user, number)
        attempts += tries
        if delivered:
            acknowledged[number] = attempts
            number, attempts = number + 1, 0
            time.sleep(args.pace)
        else:
            time.sleep(0.2)
    stop.set()
    deleter.join(60)
    return {"acknowledged": acknowledged, "deleted": deleted, "uncertain": uncertain}


def inventory(args: argparse.Namespace) -> list[str]:
    client = _pop3(args)
    try:
        return [_subject(client, n) for n in range(1, client.stat()[0] + 1)]
    finally:
        client.quit()


def main() -> None:
    parser = argparse.ArgumentParser(prog="popguard.testing.mail_load")
    parser.add_argument("what", choices=("load", "inventory"))
    parser.add_argument("--lmtp", default="", help="mailbox servers' addresses, in order")
    parser.add_argument("--pop3s", required=True, help="the front end's address")
    parser.add_argument("--ca", required=True)
    parser.add_argument("--user", required=True)
    parser.add_argument("--password", required=True)
    parser.add_argument("--count", type=int, default=3000)
    parser.add_argument("--seconds", type=float, default=90.0)
    parser.add_argument("--pace", type=float, default=0.05)
    parser.add_argument("--delete-every", type=float, default=1.0)
    args = parser.parse_args()
    result = load(args) if args.what == "load" else inventory(args)
    json.dump(result, sys.stdout)


if __name__ == "__main__":
    main()
