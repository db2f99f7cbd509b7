"""Errors with a direction: a user's mistake is a `UserError`, shown as one line."""


class UserError(Exception):
    """Bad input from an operator: the CLI prints the message alone and exits 1."""


class NotFoundError(UserError):
    """A named object (server, database, mailbox) does not exist."""
