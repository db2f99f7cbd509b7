"""Mailbox databases: messages, the change log that replicates them, and what is mounted."""
