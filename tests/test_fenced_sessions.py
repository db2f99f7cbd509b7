"""A mailbox server that fences itself (Active Manager on, its lease not renewed) ends
its logged-in sessions at once, with a line saying why, and a front end's relay ends
with them: the client does not sit in a session on a server that no longer serves its
mailbox until its next command (issue 13, item 2)."""

from __future__ import annotations

import poplib
from pathlib import Path

import pytest

from .conftest import Organization, message, running_organization, wait_for
from .test_frontend import login


def _logged_in(org: Organization, user: str) -> poplib.POP3_SSL | None:
    """A session through cas1, once mbx1 serves (it is fenced until its replication
    service has renewed its lease a first time)."""
    try:
        return login(org, user)
    except poplib.error_proto:
        return None


@pytest.mark.timeout(240)
def test_a_fenced_server_ends_its_sessions_and_the_relay_ends_with_them(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    (data / "popguard.toml").write_text("[active_manager]\nenabled = true\n")
    with running_organization(data, replication=True) as org:
        user = org.add_mailbox("fenced@example.test")
        org.deliver(user, message("before the fence"))
        sessions: list[poplib.POP3_SSL] = []

        def logged_in() -> bool:
            session = _logged_in(org, user)
            if session is not None:
                sessions.append(session)
            return session is not None

        wait_for("a login through cas1 to mbx1", logged_in, 60)
        client = sessions[0]
        assert client.stat()[0] == 1
        # mbx1 can no longer renew its lease: its replication service is gone.
        org.mailbox["mbx1"].kill("replication")
        # The session sends nothing: what comes is the server's own doing. 6 s of fence
        # deadline and a half-second watch, bounded well above that.
        client.sock.settimeout(60)
        try:
            line = client.file.readline()
        except TimeoutError:
            raise AssertionError("the fenced server's session stayed open") from None
        assert line.startswith(b"-ERR [SYS/TEMP] this server cannot renew its lease"), line
        assert client.file.readline() == b"", "the relay did not end with the session"
        client.sock.close()
        # A new login: refused for now, or served by mbx2 once Active Manager moved DB01.
        try:
            login(org, user).quit()
        except poplib.error_proto as exc:
            assert str(exc).startswith("b'-ERR [SYS/TEMP]"), exc
