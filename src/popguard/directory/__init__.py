"""The directory (servers, databases, copies, mailboxes, settings) and the organization's files."""
