"""Named protocol limits, each beside the rule that sets it."""

# RFC 5034 section 4: a SASL response line may be longer than a command; PLAIN
# carries authzid, authcid and password, each at most 255 octets (RFC 4616),
# which base64 makes (3 * 255 + 2) * 4 / 3 = 1024 octets.
MAX_SASL_LINE = 1024 + 2

# After this many bad commands in one session the server closes it, so that a
# stream of garbage costs little (Dovecot uses 20 too).
MAX_BAD_COMMANDS = 20

# RFC 1939 message numbers are positive decimal integers; more digits than this
# cannot name a message in any maildrop we would serve.
MAX_MESSAGE_NUMBER_DIGITS = 10
