"""Property-based tests (hypothesis) of every parser: the session and message format."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from popguard.pop3.message_format import normalize, stuff, to_wire, top, unstuff
from popguard.pop3.session import (
    Authenticate,
    Close,
    LoginType,
    MaildropEntry,
    NeedData,
    Reply,
    Retrieve,
    ServerSession,
    SessionConfig,
    StartTls,
    Update,
)

KEYWORDS = [
    b"USER", b"PASS", b"STAT", b"LIST", b"RETR", b"DELE", b"NOOP", b"RSET", b"QUIT",
    b"TOP", b"UIDL", b"CAPA", b"AUTH", b"STLS", b"APOP", b"XYZZY",
]  # fmt: skip

ARGUMENTS = st.one_of(
    st.just(b""),
    st.integers(-3, 12).map(lambda n: b" " + str(n).encode()),
    st.tuples(st.integers(0, 5), st.integers(0, 5)).map(lambda t: f" {t[0]} {t[1]}".encode()),
    st.binary(max_size=40).map(lambda b: b" " + b),
    st.just(b" alice@example.test"),
    st.just(b" PLAIN AGFsaWNlQGV4YW1wbGUudGVzdABzZWNyZXQ="),
    st.just(b" secret"),
)
COMMANDS = st.tuples(st.sampled_from(KEYWORDS), ARGUMENTS, st.sampled_from([b"\r\n", b"\n"])).map(
    lambda t: t[0] + t[1] + t[2]
)
STREAMS = st.one_of(
    st.lists(COMMANDS, max_size=40).map(b"".join),
    st.binary(max_size=4000),
    st.lists(st.one_of(COMMANDS, st.binary(max_size=600)), max_size=20).map(b"".join),
)
MAILDROP = [MaildropEntry(uid, 30 + uid) for uid in (3, 4, 8)]
BODY = b"Subject: x\r\n\r\nline\r\n..dot\r\n"


def _run(stream: bytes, chunks: list[int], login_type: LoginType) -> list[bytes]:
    """Feed `stream` in pieces; answer requests; return every reply written."""
    session = ServerSession(SessionConfig(login_type=login_type))
    replies: list[bytes] = []
    position = 0
    sizes = iter(chunks)
    while True:
        event = session.next_event()
        if isinstance(event, NeedData):
            if position >= len(stream):
                session.receive_data(b"")
                continue
            size = next(sizes, 64) or 1
            session.receive_data(stream[position : position + size])
            position += size
        elif isinstance(event, Reply):
            replies.append(event.data)
        elif isinstance(event, Authenticate):
            if event.password == "secret":
                session.login_succeeded(event.user, MAILDROP)
            else:
                session.login_failed("authentication failed")
        elif isinstance(event, Retrieve):
            session.message_found(event, BODY)
        elif isinstance(event, Update):
            assert set(event.deleted_uids) <= {3, 4, 8}
            session.update_done(True)
        elif isinstance(event, StartTls):
            replies.append(event.reply)
            session.tls_started()
        elif isinstance(event, Close):
            return replies
        assert len(session._buffer) <= 600 + 1100  # bounded whatever the input


@settings(max_examples=400, deadline=None)
@given(
    stream=STREAMS,
    chunks=st.lists(st.integers(1, 700), max_size=30),
    login_type=st.sampled_from(list(LoginType)),
)
def test_any_input_gets_well_formed_replies_and_ends(
    stream: bytes, chunks: list[int], login_type: LoginType
) -> None:
    replies = _run(stream, chunks, login_type)
    status_lines = [r for r in replies if r.startswith((b"+OK", b"-ERR", b"+ "))]
    for reply in status_lines:
        first = reply.split(b"\r\n", 1)[0]
        assert first.startswith((b"+OK", b"-ERR", b"+ "))
        assert b"Traceback" not in reply and b"Error:" not in first
        assert reply.endswith(b"\r\n")


@settings(max_examples=300, deadline=None)
@given(
    # STLS is left out: what a client pipelines after it is dropped on purpose.
    stream=st.lists(COMMANDS.filter(lambda c: not c.startswith(b"STLS")), max_size=30).map(
        b"".join
    ),
    split=st.integers(1, 50),
)
def test_reply_stream_does_not_depend_on_how_input_is_split(stream: bytes, split: int) -> None:
    whole = b"".join(_run(stream, [len(stream) + 1], LoginType.PLAIN_TEXT_LOGIN))
    pieces = b"".join(
        _run(stream, [split] * (len(stream) // split + 2), LoginType.PLAIN_TEXT_LOGIN)
    )
    assert whole == pieces


LINES = st.lists(
    st.binary(max_size=30).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")), max_size=20
)


@given(st.binary(max_size=2000))
def test_stuff_round_trips_and_never_ends_a_message_early(content: bytes) -> None:
    normalized = normalize(content)
    wire = stuff(normalized)
    assert unstuff(wire) == normalized
    # The terminator can only appear at the very end once ".\r\n" is appended.
    assert b"\r\n.\r\n" not in wire[:-2] or wire.endswith(b"\r\n") is False
    assert not wire.startswith(b".\r\n")
    assert (wire + b".\r\n").find(b"\r\n.\r\n") in (len(wire) - 2, -1)


@given(st.binary(max_size=2000))
def test_normalize_gives_crlf_only(content: bytes) -> None:
    normalized = normalize(content)
    assert normalized.endswith(b"\r\n")
    assert normalized.count(b"\n") == normalized.count(b"\r\n")
    assert to_wire(content)[1] == len(normalized)


@given(header=LINES, body=LINES, count=st.integers(0, 25))
def test_top_gives_header_and_first_body_lines(
    header: list[bytes], body: list[bytes], count: int
) -> None:
    header = [h or b"X-Empty: 1" for h in header]
    message = b"".join(h + b"\r\n" for h in header) + b"\r\n" + b"".join(b + b"\r\n" for b in body)
    wire = stuff(normalize(message))
    got = unstuff(top(wire, count))
    expected_lines = [*header, b"", *body[:count]]
    assert got == b"".join(line + b"\r\n" for line in expected_lines)
