"""The long-running mail services: POP3 front end and back end, LMTP delivery."""
