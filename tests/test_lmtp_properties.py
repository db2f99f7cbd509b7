"""Property-based tests (hypothesis) of LMTP delivery's parsers: the RCPT argument, the
DATA content, the enhanced status codes on replies, and the limits `serve delivery` takes."""

from __future__ import annotations

import asyncio
import itertools
import re

import click
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from popguard.cli.serve import serve_delivery
from popguard.services.lmtp_data import MessageData, read_message_data
from popguard.services.lmtp_limits import MAX_LINE_LENGTH, MAX_TIMEOUT, MIN_LINE_LENGTH, MIN_TIMEOUT
from popguard.services.lmtp_path import (
    MAX_LOCAL_PART,
    MAX_PATH,
    PathError,
    parse_rcpt_argument,
)
from popguard.services.lmtp_replies import with_enhanced_codes

ATEXT = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$%&'*+-/=?^_`{|}~"
ATOMS = st.text(alphabet=ATEXT + "é", min_size=1, max_size=10)
LOCAL_PARTS = st.lists(ATOMS, min_size=1, max_size=4).map(".".join)
LABELS = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?", fullmatch=True)
DOMAINS = st.lists(LABELS, min_size=1, max_size=4).map(".".join)
PARAMETERS = st.lists(st.from_regex(r"[A-Z]{1,8}(=[A-Za-z0-9]{1,8})?", fullmatch=True), max_size=3)


@given(local=LOCAL_PARTS, domain=DOMAINS, parameters=PARAMETERS, space=st.booleans())
def test_a_bracketed_mailbox_parses_to_itself(
    local: str, domain: str, parameters: list[str], space: bool
) -> None:
    address = f"{local}@{domain}"
    argument = "TO:" + (" " if space else "") + f"<{address}>"
    argument += "".join(" " + parameter for parameter in parameters)
    if len(address.encode()) + 2 > MAX_PATH or len(local.encode()) > MAX_LOCAL_PART:
        with pytest.raises(PathError, match=r"^501 5\.1\.3 "):
            parse_rcpt_argument(argument)
        return
    recipient = parse_rcpt_argument(argument)
    assert recipient.address == address
    assert list(recipient.parameters) == parameters


@given(local=LOCAL_PARTS, domain=DOMAINS)
def test_an_address_without_angle_brackets_is_refused(local: str, domain: str) -> None:
    with pytest.raises(PathError) as refused:
        parse_rcpt_argument(f"TO:{local}@{domain}")
    assert refused.value.reply.startswith("501 5.1.3 ")


@settings(max_examples=500)
@given(st.text(max_size=80) | st.text(max_size=80).map(lambda text: "TO:<" + text))
def test_any_argument_gives_a_mailbox_or_one_reply_line(argument: str) -> None:
    try:
        recipient = parse_rcpt_argument(argument)
    except PathError as refused:
        assert re.fullmatch(r"5\d\d 5\.\d\.\d [^\r\n]+", refused.reply)
        return
    # What the directory is asked for, and what a reply may echo: one printable line.
    assert recipient.address and not re.search(r"[\x00-\x1f\x7f]", recipient.address)
    assert len(recipient.address.encode("utf-8", "surrogateescape")) + 2 <= MAX_PATH


@pytest.mark.parametrize(
    ("argument", "address"),
    [
        ('TO:<"a b>c"@example.test>', '"a b>c"@example.test'),
        ("TO:<@one.example,@two.example:a@example.test>", "a@example.test"),
        ("to:<Postmaster>", "Postmaster"),
        ("TO:<a@[192.0.2.1]>", "a@[192.0.2.1]"),
    ],
)
def test_quoted_routed_postmaster_and_literal_paths(argument: str, address: str) -> None:
    assert parse_rcpt_argument(argument).address == address


@pytest.mark.parametrize(
    "argument",
    ["TO:<>", "TO:<a@b", "TO:<a..b@example.test>", "TO:<a@-x.test>", "TO:<@x:>", 'TO:<"a@b>'],
)
def test_null_unclosed_and_malformed_paths_are_refused(argument: str) -> None:
    with pytest.raises(PathError, match=r"^501 5\.1\.3 "):
        parse_rcpt_argument(argument)


BODY_LINES = st.lists(
    st.binary(max_size=60).map(lambda line: line.replace(b"\r", b"").replace(b"\n", b"")),
    max_size=20,
)


def on_the_wire(lines: list[bytes]) -> bytes:
    """DATA as a client sends it: dot-stuffed lines, then the final dot."""
    return b"".join((b"." if line.startswith(b".") else b"") + line + b"\r\n" for line in lines) + (
        b".\r\n"
    )


async def read_split(
    wire: bytes, cuts: list[int], size_limit: int, line_limit: int
) -> tuple[MessageData, bytes]:
    """read_message_data over a real StreamReader fed `wire` in pieces cut at `cuts`;
    what it read, and what it left in the reader."""
    reader = asyncio.StreamReader(limit=line_limit)
    edges = [0, *sorted(cut % (len(wire) + 1) for cut in cuts), len(wire)]
    reading = asyncio.ensure_future(read_message_data(reader, size_limit, line_limit))
    for start, end in itertools.pairwise(edges):
        reader.feed_data(wire[start:end])
        await asyncio.sleep(0)
    reader.feed_eof()
    return await reading, await reader.read()


@settings(max_examples=200, deadline=None)
@given(lines=BODY_LINES, cuts=st.lists(st.integers(0, 10_000), max_size=6))
def test_data_gives_the_lines_back_byte_exact_however_it_is_split(
    lines: list[bytes], cuts: list[int]
) -> None:
    wire = on_the_wire(lines)
    data, rest = asyncio.run(read_split(wire, cuts, size_limit=10_000, line_limit=1000))
    assert rest == b""
    expected = b"".join(line + b"\r\n" for line in lines)
    if any(b"\0" in line for line in lines):
        assert data.refusal is not None and data.refusal.startswith("554 5.6.0 ")
        assert data.content == b""
    else:
        assert data.refusal is None
        assert data.content == expected


@settings(max_examples=100, deadline=None)
# The reader drops 1500 octets of the long line and keeps its dot: that dot and the
# CRLF after it end the long line, not the message.
@example(lines=[], long_line=b"x" * 1500 + b".", position=0, cuts=[1501])
@given(
    lines=BODY_LINES,
    long_line=st.binary(min_size=1001, max_size=3000).map(
        lambda line: line.replace(b"\r", b"x").replace(b"\n", b"x")
    ),
    position=st.integers(0, 20),
    cuts=st.lists(st.integers(0, 10_000), max_size=6),
)
def test_a_line_over_the_limit_refuses_the_message_and_the_end_is_still_found(
    lines: list[bytes], long_line: bytes, position: int, cuts: list[int]
) -> None:
    """Even when the long line itself ends in a dot, the final dot is the one found."""
    lines.insert(min(position, len(lines)), long_line)
    wire = on_the_wire(lines) + b"NOOP\r\n"
    data, rest = asyncio.run(read_split(wire, cuts, size_limit=100_000, line_limit=1000))
    assert rest == b"NOOP\r\n"
    assert data.refusal is not None
    assert data.refusal.startswith(("500 5.6.0 Line too long", "554 5.6.0 "))
    assert data.content == b""


@given(lines=BODY_LINES.filter(lambda lines: not any(b"\0" in line for line in lines)))
def test_data_over_the_size_limit_is_refused(lines: list[bytes]) -> None:
    data = MessageData(size_limit=100, line_limit=1000)
    for line in on_the_wire(lines).split(b"\r\n")[:-1]:
        if data.add_line(line + b"\r\n"):
            break
    size = sum(len(line) + 2 for line in lines)
    assert (data.refusal is not None) == (size > 100)
    assert data.refusal is None or data.refusal.startswith("552 5.3.4 ")


REPLY_TEXT = st.text(alphabet=st.characters(blacklist_categories=["Cs", "Cc"]), max_size=40).filter(
    lambda text: not text.startswith((" ", "-"))
)
ENHANCED = re.compile(r"^([245])\d\d[ -]\1\.\d{1,3}\.\d{1,3}( |$)")


@given(code=st.integers(200, 599), separator=st.sampled_from([" ", "-"]), text=REPLY_TEXT)
def test_every_2xx_4xx_5xx_reply_line_gets_a_code_of_its_class(
    code: int, separator: str, text: str
) -> None:
    line = f"{code}{separator}{text}".rstrip()
    coded = with_enhanced_codes(line)
    if code == 220 or str(code)[0] == "3":
        assert coded == line
        return
    assert ENHANCED.match(coded), coded
    assert with_enhanced_codes(coded) == coded
    assert coded.startswith(f"{code}{separator}")


@given(st.lists(st.sampled_from(["250 OK", "550 5.1.1 <a@b.c>: no such mailbox", "221 Bye"])))
def test_each_line_of_a_multiline_reply_gets_its_code(lines: list[str]) -> None:
    coded = with_enhanced_codes("\r\n".join(lines)).split("\r\n")
    assert len(coded) == len(lines) or not lines
    assert all(ENHANCED.match(line) for line in coded if line)


LIMIT_OPTIONS = {
    param.name: param
    for param in serve_delivery.params
    if param.name in ("max_line_length", "idle_timeout", "command_timeout")
}


@settings(max_examples=300)
@given(
    name=st.sampled_from(sorted(LIMIT_OPTIONS)),
    text=st.text(max_size=12) | st.floats(allow_nan=True).map(str) | st.integers().map(str),
)
def test_a_limit_option_is_in_range_or_refused_in_one_line(name: str, text: str) -> None:
    option = LIMIT_OPTIONS[name]
    context = click.Context(serve_delivery)
    try:
        value = option.process_value(context, text)
    except click.BadParameter as refused:
        message = refused.format_message()
        assert "--" + name.replace("_", "-") in message and "\n" not in message
        return
    if name == "max_line_length":
        assert isinstance(value, int) and MIN_LINE_LENGTH <= value <= MAX_LINE_LENGTH
    else:
        assert MIN_TIMEOUT <= value <= MAX_TIMEOUT
