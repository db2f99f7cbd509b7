"""An enhanced status code (RFC 2034, RFC 3463) on every LMTP reply.

popguard's own replies carry theirs; aiosmtpd's (syntax errors, unknown commands,
`250 OK`, ...) do not, so each line without one gets the code RFC 3463 gives its basic
code. RFC 2034 section 3 exempts the greeting and the reply to LHLO; 3xx replies
(354) have none.
"""

from __future__ import annotations

import re

_ENHANCED = re.compile(r"([245])\.\d{1,3}\.\d{1,3}(?: |$)")
_BASIC = re.compile(r"([245])(\d\d)([ -]|$)")

# aiosmtpd words some replies for SMTP; LMTP's greeting command is LHLO.
_LMTP_WORDING = {
    "503 Error: send HELO first": "503 Error: send LHLO first",
    "503 Error: send EHLO first": "503 Error: send LHLO first",
    "501 Syntax: EHLO hostname": "501 Syntax: LHLO hostname",
}

# RFC 3463 section 3: the detail of each basic code aiosmtpd sends without one; any
# other gets its class's "other or undefined" X.0.0 (250 OK, 221 Bye, 252 ...).
_DETAIL_BY_CODE = {
    "454": "4.7.0",  # TLS not available
    "500": "5.5.2",  # syntax error, command unrecognized, line too long
    "501": "5.5.4",  # syntax error in parameters
    "502": "5.5.1",  # command not implemented
    "503": "5.5.1",  # bad sequence of commands
    "552": "5.3.4",  # message too big
    "555": "5.5.4",  # MAIL/RCPT parameters not recognized
}
# aiosmtpd's 500 is a syntax error, a line too long or, worded so, an unknown command.
_UNKNOWN_COMMAND = ('500 Error: command "', "5.5.1")

# RFC 2034 section 3: the greeting carries no enhanced code (no STARTTLS here, so 220
# is only ever the greeting).
_GREETING = "220"


def with_enhanced_codes(reply: str) -> str:
    """`reply` (one or more lines joined by CRLF) with a code on every line."""
    return "\r\n".join(_line_with_code(line) for line in reply.split("\r\n"))


def _line_with_code(line: str) -> str:
    line = _LMTP_WORDING.get(line, line)
    basic = _BASIC.match(line)
    if basic is None:  # 354, or not a reply line
        return line
    text = line[basic.end() :]
    enhanced = _ENHANCED.match(text)
    # RFC 3463 section 2: the enhanced code's class is the basic code's first digit.
    if enhanced is not None and enhanced.group(1) == basic.group(1):
        return line
    code = basic.group(1) + basic.group(2)
    if code == _GREETING:
        return line
    if line.startswith(_UNKNOWN_COMMAND[0]):
        detail = _UNKNOWN_COMMAND[1]
    else:
        detail = _DETAIL_BY_CODE.get(code, f"{basic.group(1)}.0.0")
    return f"{code}{basic.group(3) or ' '}{detail} {text}".rstrip()
