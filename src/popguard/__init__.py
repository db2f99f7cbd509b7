"""popguard: a POP3 mail service with managed availability built in."""

__version__ = "0.1.0"
