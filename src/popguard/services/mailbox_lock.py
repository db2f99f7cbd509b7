"""One POP3 session per mailbox on a server, whichever worker process serves it.

RFC 1939 section 8 has the server lock the maildrop for the session; a lock in one
process's memory would let two workers each hand the same mailbox out. The lock is
`flock` on a file per mailbox instead: the kernel keeps it per open file, so it
holds between the workers and within one, and it is released when the file is
closed, also when the process holding it dies, SIGKILL included: nothing is left
for anyone to clean up. The file's modification time is the mailbox's last login
here, for MinimumLoginInterval (RFC 2449's LOGIN-DELAY), shared the same way.

The files are named by a digest of the address (any octet may be in a local part)
and stay: one small file per mailbox that ever logged in here; removing one could
race with a session opening it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import time
from pathlib import Path


class MailboxLock:
    """A mailbox held by one session, until `release`."""

    def __init__(self, fd: int) -> None:
        self._fd: int | None = fd

    def last_login(self) -> float:
        """When the mailbox last logged in here (the epoch: never)."""
        assert self._fd is not None
        return os.fstat(self._fd).st_mtime

    def mark_login(self) -> None:
        assert self._fd is not None
        os.utime(self._fd, (time.time(), time.time()))

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)  # the lock goes with the last descriptor of the open file


class MailboxLocks:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)

    def _file(self, address: str) -> Path:
        return self.folder / f"{hashlib.sha256(address.encode()).hexdigest()[:32]}.lock"

    def take(self, address: str) -> MailboxLock | None:
        """The mailbox's lock, or None while another session holds it."""
        path = self._file(address)
        created = True
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except FileExistsError:
            created = False
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if created:
                os.utime(fd, (0, 0))  # a new file is no login
        except BlockingIOError:
            os.close(fd)
            return None
        except BaseException:
            with contextlib.suppress(OSError):
                os.close(fd)
            raise
        return MailboxLock(fd)
