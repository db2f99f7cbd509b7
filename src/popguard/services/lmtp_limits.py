"""The limits of one LMTP delivery service, and the bounds an operator may set them in.

Apart from the service so that `popguard serve`'s options can name them without
importing the whole delivery service (aiosmtpd, the store, TLS) into every process.
"""

from __future__ import annotations

from dataclasses import dataclass

# The largest message accepted, in octets (552 5.3.4 beyond it).
DEFAULT_MAX_MESSAGE_SIZE = 50 * 1024 * 1024
# RFC 5321 section 4.5.3.1.6 asks for at least 1000 octets a line; HTML newsletters
# send far longer ones and Dovecot's LMTP stores them, so popguard does too, up to this.
DEFAULT_MAX_LINE_LENGTH = 64 * 1024
# RFC 5321 section 4.5.3.2.7 has a server wait 5 minutes for a command; LMTP's clients
# are the organization's own MTAs, which send at once or close (Postfix keeps an idle
# LMTP connection 2 s), so popguard waits less and frees the connection sooner.
DEFAULT_IDLE_TIMEOUT = 120.0
# From a command line's first octet to its end, however slowly the octets come.
DEFAULT_COMMAND_TIMEOUT = 60.0
# DATA may take a command's time plus the largest message at this rate, in octets a
# second: RFC 5321 bounds no whole DATA (section 4.5.3.2.5 has a client wait 3 minutes
# on each send), and a local MTA sends far faster than this.
DATA_MIN_RATE = 64 * 1024

# RFC 5321 section 4.5.3.1.6: 998 octets of text (1000 with CRLF) plus the transparency
# dot; the upper bound keeps one line's buffer well under a message.
MIN_LINE_LENGTH = 999
MAX_LINE_LENGTH = 16 * 1024 * 1024
# Timeouts one may set, in seconds: above an hour a connection is not "bounded".
MIN_TIMEOUT = 0.01
MAX_TIMEOUT = 3600.0


@dataclass(frozen=True)
class LmtpLimits:
    """The limits of one delivery service; `popguard serve delivery` sets them."""

    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE
    max_line_length: int = DEFAULT_MAX_LINE_LENGTH
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT
    command_timeout: float = DEFAULT_COMMAND_TIMEOUT

    @property
    def data_timeout(self) -> float:
        return self.command_timeout + self.max_message_size / DATA_MIN_RATE
