"""The argument of LMTP's RCPT command: `TO:<forward-path> [parameters]` (RFC 5321
section 4.1.2, with RFC 6531's UTF-8 mailboxes), or the reply that refuses it.

aiosmtpd's own parser takes an address without angle brackets and turns `<>` into the
address "<>"; this one holds to the grammar, so a recipient is always a mailbox.
"""

from __future__ import annotations

import string
from dataclasses import dataclass

# RFC 5321 section 4.5.3.1.1 (local part), 4.5.3.1.2 (domain), 4.5.3.1.3 (path,
# brackets included), in octets.
MAX_LOCAL_PART = 64
MAX_DOMAIN = 255
MAX_PATH = 256

SYNTAX_REPLY = "501 5.5.4 Syntax: RCPT TO:<address>"
_BAD_ADDRESS = "501 5.1.3 Bad recipient address syntax"

# RFC 1035 section 2.3.4: a label has at most 63 octets.
MAX_LABEL = 63

# RFC 5321 section 4.1.2 (atext of RFC 5322 section 3.2.3).
_ATEXT = frozenset(string.ascii_letters + string.digits + "!#$%&'*+-/=?^_`{|}~")
_LABEL_TEXT = frozenset(string.ascii_letters + string.digits + "-")


class PathError(ValueError):
    """An RCPT argument that is not a forward path; `reply` is the LMTP reply."""

    def __init__(self, reply: str) -> None:
        super().__init__(reply)
        self.reply = reply


@dataclass(frozen=True)
class Recipient:
    address: str
    parameters: tuple[str, ...]


def parse_rcpt_argument(argument: str) -> Recipient:
    """`argument` is what follows `RCPT ` on the command line."""
    if argument[:3].upper() != "TO:":
        raise PathError(SYNTAX_REPLY)
    # Leniency that Postfix and Dovecot share: a space after the colon.
    rest = argument[3:].lstrip(" ")
    if not rest.startswith("<"):
        raise PathError(f"{_BAD_ADDRESS}: the address must be in angle brackets")
    end = _closing_bracket(rest)
    if end is None:
        raise PathError(f"{_BAD_ADDRESS}: no closing '>'")
    path, tail = rest[1:end], rest[end + 1 :]
    if not path:
        raise PathError(f"{_BAD_ADDRESS}: the null path <> is not a recipient")
    if _octets(path) + 2 > MAX_PATH:
        raise PathError(f"{_BAD_ADDRESS}: a path has at most {MAX_PATH} octets")
    if tail and not tail.startswith(" "):
        raise PathError(SYNTAX_REPLY)
    address = _without_source_route(path)
    _check_mailbox(address)
    return Recipient(address, tuple(tail.split()))


def _octets(text: str) -> int:
    return len(text.encode("utf-8", errors="surrogateescape"))


def _closing_bracket(text: str) -> int | None:
    """Where the path that `text` opens ends: the first '>' outside a quoted string."""
    quoted = escaped = False
    for index, character in enumerate(text):
        if escaped:
            escaped = False
        elif quoted and character == "\\":
            escaped = True
        elif character == '"':
            quoted = not quoted
        elif character == ">" and not quoted:
            return index
    return None


def _without_source_route(path: str) -> str:
    """RFC 5321 section 4.1.2 and appendix C: a source route is accepted and ignored."""
    if not path.startswith("@"):
        return path
    route, colon, mailbox = path.partition(":")
    if not colon:
        raise PathError(f"{_BAD_ADDRESS}: a source route ends with ':'")
    for hop in route.split(","):
        if not hop.startswith("@") or not _is_domain(hop[1:]):
            raise PathError(f"{_BAD_ADDRESS}: bad source route")
    return mailbox


def _check_mailbox(address: str) -> None:
    # "Postmaster" without a domain is a recipient every server accepts (section 4.1.1.3).
    if address.lower() == "postmaster":
        return
    local, at, domain = address.rpartition("@")
    if not at or not local:
        raise PathError(f"{_BAD_ADDRESS}: expected local-part@domain")
    if _octets(local) > MAX_LOCAL_PART:
        raise PathError(f"{_BAD_ADDRESS}: a local part has at most {MAX_LOCAL_PART} octets")
    if not (_is_quoted_string(local) or _is_dot_string(local)):
        raise PathError(f"{_BAD_ADDRESS}: bad local part")
    if _octets(domain) > MAX_DOMAIN:
        raise PathError(f"{_BAD_ADDRESS}: a domain has at most {MAX_DOMAIN} octets")
    if not (_is_address_literal(domain) or _is_domain(domain)):
        raise PathError(f"{_BAD_ADDRESS}: bad domain")


def _is_utf8_non_ascii(character: str) -> bool:
    # RFC 6531 section 3.3 adds UTF-8 to atext, qtext and labels; a lone surrogate is
    # an undecodable octet that aiosmtpd's surrogateescape kept, not UTF-8.
    return character > "\x7f" and not "\udc80" <= character <= "\udcff"


def _is_dot_string(local: str) -> bool:
    return all(
        atom and all(c in _ATEXT or _is_utf8_non_ascii(c) for c in atom)
        for atom in local.split(".")
    )


def _is_quoted_string(local: str) -> bool:
    if len(local) < 2 or local[0] != '"' or local[-1] != '"':
        return False
    inner = local[1:-1]
    index = 0
    while index < len(inner):
        character = inner[index]
        if character == "\\":  # quoted-pairSMTP: a backslash and one printable
            if index + 1 == len(inner) or not " " <= inner[index + 1] <= "~":
                return False
            index += 2
            continue
        if not (" " <= character <= "~" or _is_utf8_non_ascii(character)) or character == '"':
            return False
        index += 1
    return True


def _is_domain(domain: str) -> bool:
    labels = domain.split(".")
    return all(
        label
        and _octets(label) <= MAX_LABEL
        and label[0] != "-"
        and label[-1] != "-"
        and all(c in _LABEL_TEXT or _is_utf8_non_ascii(c) for c in label)
        for label in labels
    )


def _is_address_literal(domain: str) -> bool:
    # RFC 5321 section 4.1.3; the literal's content is left to the directory, which
    # has no such mailbox and says 550.
    inner = domain[1:-1]
    return (
        len(domain) > 2
        and domain[0] == "["
        and domain[-1] == "]"
        and all("!" <= c <= "~" and c not in "[]\\" for c in inner)
    )
