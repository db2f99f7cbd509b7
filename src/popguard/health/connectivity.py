"""`popguard test-popconnectivity`: Exchange's Test-PopConnectivity, step by step.

Connects to a front end as a client would and times each step: connect, TLS, login,
and unless in light mode LIST, RETR and DELE of a test message it delivers first
(through LMTP, to the mailbox it logs in to). The first step that fails says why;
the steps after it are Skipped. Built on the health probes' POP3 dialog, so its
transcript and failure reasons read the same.
"""

from __future__ import annotations

import asyncio
import secrets
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from popguard import paths
from popguard.directory.directory import Directory
from popguard.errors import UserError
from popguard.health.probes import Credential, Pop3Dialog, ProbeFailure, ProbeTarget, Transcript
from popguard.services.lmtp_client import deliver
from popguard.store.mailbox_database import MailboxDatabase

# Exchange's connection types, and the popguard TLS mode and front-end port each uses.
# Tries of a login refused [IN-USE] (a probe holding the health mailbox), a second apart.
IN_USE_RETRIES = 5

CONNECTION_TYPES = {
    "plaintext": ("plain", "pop3"),
    "tls": ("stls", "pop3"),
    "ssl": ("tls", "pop3-tls"),
}


@dataclass(frozen=True)
class StepResult:
    server: str
    scenario: str
    result: str  # Success | Failure | Skipped
    latency_ms: float | None
    error: str = ""

    def row(self) -> dict[str, object]:
        return {
            "CasServer": self.server,
            "Scenario": self.scenario,
            "Result": self.result,
            "Latency(MS)": self.latency_ms,
            "Error": self.error,
        }


@dataclass(frozen=True)
class ConnectivityTest:
    data: Path
    server: str
    credential: Credential
    connection_type: str = "tls"
    port: int | None = None
    trust_any_certificate: bool = False
    light_mode: bool = False
    per_connection_timeout: float = 30.0


def _context(data: Path, trust_any: bool) -> ssl.SSLContext:
    if trust_any:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context
    from popguard.net import tls

    return tls.TlsMaterial.of(data).client_context()


async def run_test(test: ConnectivityTest) -> list[StepResult]:
    with Directory(test.data) as directory:
        server = directory.get_server(test.server)
        if "frontend" not in server.roles:
            raise UserError(f"{server.name} is not a client access server (role frontend)")
    mode, endpoint = CONNECTION_TYPES[test.connection_type]
    port = test.port or server.port(endpoint)
    target = ProbeTarget(
        resource=server.name, host=server.address, port=port, tls=mode,
        context=_context(test.data, test.trust_any_certificate), credential=test.credential,
    )  # fmt: skip
    transcript = Transcript()
    dialog = Pop3Dialog(transcript)
    results: list[StepResult] = []
    failed = False  # a step of the connection failed: the steps after it are Skipped
    undelivered = False  # no test message: the steps that read it are Skipped
    marker = f"popguard connectivity test {secrets.token_hex(6)}"
    found: dict[str, int] = {}

    async def step(
        scenario: str, action: Callable[[], Awaitable[None]], needs_message: bool = False
    ) -> None:
        nonlocal failed
        if failed or (needs_message and undelivered):
            results.append(StepResult(server.name, scenario, "Skipped", None))
            return
        started = time.monotonic()
        try:
            async with asyncio.timeout(test.per_connection_timeout):
                await action()
        except TimeoutError:
            error = f"no answer within {test.per_connection_timeout:g}s"
        except ProbeFailure as failure:
            error = f"{failure} ({failure.component})"
        else:
            latency = round((time.monotonic() - started) * 1000, 1)
            results.append(StepResult(server.name, scenario, "Success", latency))
            return
        failed = True
        results.append(StepResult(server.name, scenario, "Failure", None, error))

    async def check_greeting() -> None:
        greeting = await dialog.greeting()
        if not greeting.ok:
            code = f"[{greeting.code}] " if greeting.code else ""
            raise ProbeFailure(
                "POP3", greeting.code or "-ERR", f"greeting: -ERR {code}{greeting.text}"
            )

    async def connect() -> None:
        await dialog.open(target)
        if mode != "tls":  # with implicit TLS the greeting comes after the handshake
            await check_greeting()

    async def start_tls() -> None:
        if mode == "stls":
            await dialog.expect_ok("STLS", "POP3")
        await dialog.start_tls(target)
        if mode == "tls":
            await check_greeting()

    async def deliver_test_message() -> None:
        def send() -> None:
            message = (
                f"From: popguard <postmaster@popguard.test>\r\nSubject: {marker}\r\n\r\n"
                "Sent by test-popconnectivity; it deletes this message again.\r\n"
            ).encode()
            with Directory(test.data) as directory:
                result = deliver(directory, test.credential.address, message)
            if result.code != 250:
                raise ProbeFailure("Delivery", str(result.code), f"LMTP: {result.reply}")
            uid = result.reply.rsplit(" ", 1)[-1]
            found["uid"] = int(uid) if uid.isdigit() else -1

        try:
            await asyncio.to_thread(send)
        except UserError as exc:
            raise ProbeFailure("Delivery", "LMTP", str(exc)) from None

    async def login() -> None:
        # The default credential is a health mailbox, which the probes log in to every
        # few seconds: one of their sessions holding it ([IN-USE]) ends within a
        # second or two, so that refusal is waited out (RFC 1939: USER/PASS may be
        # sent again after a failed PASS) rather than reported as the front end's.
        for attempt in range(IN_USE_RETRIES + 1):
            await dialog.expect_ok(f"USER {test.credential.address}", "Auth")
            reply = await dialog.command(f"PASS {test.credential.password}", "Auth")
            if reply.ok or reply.code != "IN-USE" or attempt == IN_USE_RETRIES:
                break
            await asyncio.sleep(1.0)
        if not reply.ok:
            code = f"[{reply.code}] " if reply.code else ""
            raise ProbeFailure("Auth", reply.code or "-ERR", f"login: -ERR {code}{reply.text}")

    async def list_messages() -> None:
        await dialog.expect_ok("UIDL", "POP3")
        for line in await dialog.multiline():
            number, _, uid = line.decode().strip().partition(" ")
            if uid == str(found.get("uid")):
                found["number"] = int(number)
        await dialog.expect_ok("LIST", "POP3")
        await dialog.multiline()
        if "number" not in found:
            raise ProbeFailure("Store", "missing", "the test message is not in the mailbox")

    async def retrieve() -> None:
        await dialog.expect_ok(f"RETR {found['number']}", "Store")
        body = b"".join(await dialog.multiline())
        if marker.encode() not in body:
            raise ProbeFailure("Store", "wrong message", "RETR returned another message")

    async def delete() -> None:
        await dialog.expect_ok(f"DELE {found['number']}", "Store")
        await dialog.expect_ok("QUIT", "Store")

    try:
        if not test.light_mode:
            await step("Deliver test message", deliver_test_message)
            # A failed delivery says nothing of the front end: connect, TLS and login
            # are tested all the same; only the steps that read the message are skipped.
            undelivered, failed = failed, False
        await step("Connect", connect)
        if mode != "plain":
            await step("TLS", start_tls)
        await step("Login", login)
        if not test.light_mode:
            await step("List", list_messages, needs_message=True)
            await step("Retrieve", retrieve, needs_message=True)
            await step("Delete", delete, needs_message=True)
        elif not failed:
            await dialog.expect_ok("QUIT", "POP3")
    except ProbeFailure:
        pass  # the QUIT of light mode: the steps already say what mattered
    finally:
        await dialog.close()
        deleted = any(r.scenario == "Delete" and r.result == "Success" for r in results)
        if "uid" in found and not deleted:
            await asyncio.to_thread(_remove_test_message, test, found["uid"])
    return results


def _remove_test_message(test: ConnectivityTest, uid: int) -> None:
    """The test message is never left in the user's mailbox: when the test could not
    delete it over POP3 (a wrong password, a failed step), it is expunged from the
    active copy directly, through the change log like any deletion."""
    if uid < 0:  # delivered, but its uid was not in the reply: nothing to find it by
        return
    with Directory(test.data) as directory:
        mailbox = directory.get_mailbox(test.credential.address)
        active = directory.active_server(mailbox.database)
    path = paths.server_folder(test.data, active).database_copy_file(mailbox.database)
    if not path.exists():  # another host's copy: never an empty one made here
        return
    store = MailboxDatabase(path, mailbox.database)
    try:
        store.expunge(mailbox.address, [uid])
    finally:
        store.close()
