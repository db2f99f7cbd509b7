"""The POP3 protocol log: one CSV line per command, in Exchange's columns.

Off by default (ProtocolLogEnabled). Files roll over per LogFileRollOverSettings
(a new file each hour, day, week or month) and when one reaches
LogPerFileSizeQuota. Secrets never reach this module: the session redacts PASS
and AUTH before a record is made, and `write` applies the same (idempotent)
redaction again in case a caller forgets. USER's argument is shown only when it
is the address of a known mailbox (`shown_user_argument`): a password typed
into USER stays out of the file.

Every worker of a service writes to the same files. A line is one `write` to a
file opened with O_APPEND, which the kernel appends whole, so lines from two
workers never interleave; the size that decides a rollover is the file's own
(fstat), not what this process wrote, and the header is written under a `flock`
by whoever finds the file empty.
"""

from __future__ import annotations

import csv
import datetime
import fcntl
import io
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from popguard.directory.settings import RollOver
from popguard.pop3.session import REDACTED, redact

FIELDS = (
    "dateTime",
    "sessionId",
    "seqNumber",
    "sIp",
    "cIp",
    "user",
    "duration",
    "rqsize",
    "rpsize",
    "command",
    "parameters",
    "context",
)


@dataclass(frozen=True)
class ProtocolLogRecord:
    session_id: str
    sequence: int
    server_endpoint: str
    client_endpoint: str
    user: str
    duration_ms: float
    request_size: int
    response_size: int
    command: str
    parameters: str
    context: str = ""
    # When the command was done; None: now. A USER line is written once the login
    # after it is decided, but keeps its own time.
    moment: datetime.datetime | None = None


@dataclass(frozen=True)
class ProtocolLogConfig:
    enabled: bool
    folder: Path
    rollover: RollOver
    size_quota: int  # bytes per file; 0 means no limit


# What a mailbox address can look like: one "@", no spaces, a local part of at most
# 64 octets and a domain of at most 255 (RFC 5321 section 4.5.3.1). Anything else
# is not looked up at all.
_ADDRESS_SHAPE = re.compile(r"[^@\s]{1,64}@[^@\s]{1,255}")


def shown_user_argument(argument: str, logged_in: str, is_known: Callable[[str], bool]) -> str:
    """USER's argument as the protocol log shows it: as typed when it names a known
    mailbox, else `****` (it may be a password typed in the wrong place).

    `logged_in` is the address the session then logged in as ("" if none): when
    the argument names it, nothing is looked up. Otherwise `is_known` is asked,
    and only for something shaped like an address.
    """
    address = argument.strip().lower()
    if not address:
        return argument
    if logged_in and address == logged_in:
        return argument
    if _ADDRESS_SHAPE.fullmatch(address) and is_known(address):
        return argument
    return REDACTED


def _period(moment: datetime.datetime, rollover: RollOver) -> str:
    if rollover is RollOver.HOURLY:
        return moment.strftime("%Y%m%d%H")
    if rollover is RollOver.WEEKLY:
        year, week, _ = moment.isocalendar()
        return f"{year}W{week:02d}"
    if rollover is RollOver.MONTHLY:
        return moment.strftime("%Y%m")
    return moment.strftime("%Y%m%d")


class ProtocolLog:
    def __init__(self, prefix: str) -> None:
        self.prefix = prefix  # POP3BE or POP3, as Exchange names its files
        self.config: ProtocolLogConfig | None = None
        self._file: int | None = None  # the open file's descriptor
        self._path: Path | None = None
        self._period = ""

    @property
    def enabled(self) -> bool:
        return self.config is not None and self.config.enabled

    @property
    def current_file(self) -> Path | None:
        return self._path

    def configure(self, config: ProtocolLogConfig) -> None:
        """Apply new settings; the next record goes to a file that matches them."""
        if config != self.config:
            self.close()
            self.config = config

    def close(self) -> None:
        if self._file is not None:
            os.close(self._file)
        self._file = None
        self._path = None

    def _open(self, moment: datetime.datetime, config: ProtocolLogConfig) -> int:
        period = _period(moment, config.rollover)
        if self._file is not None and period == self._period:
            full = config.size_quota > 0 and os.fstat(self._file).st_size >= config.size_quota
            if not full:
                return self._file
        self.close()
        config.folder.mkdir(parents=True, exist_ok=True)
        sequence = 1
        while True:
            path = config.folder / f"{self.prefix}{period}-{sequence}.LOG"
            size = path.stat().st_size if path.exists() else 0
            if config.size_quota == 0 or size < config.size_quota:
                break
            sequence += 1
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            if os.fstat(fd).st_size == 0:
                header = (
                    "#Software: popguard\r\n#Version: 1\r\n"
                    f"#Log-type: {self.prefix} Protocol Log\r\n"
                    f"#Date: {moment.isoformat()}\r\n#Fields: {','.join(FIELDS)}\r\n"
                )
                os.write(fd, header.encode())
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
        self._file, self._path, self._period = fd, path, period
        return fd

    def write(self, record: ProtocolLogRecord) -> None:
        config = self.config
        if config is None or not config.enabled:
            return
        moment = record.moment or datetime.datetime.now(datetime.UTC)
        parameters = redact(record.command.upper(), record.parameters)
        row = io.StringIO()
        csv.writer(row, lineterminator="\r\n").writerow(
            (
                moment.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
                record.session_id,
                record.sequence,
                record.server_endpoint,
                record.client_endpoint,
                record.user,
                round(record.duration_ms),
                record.request_size,
                record.response_size,
                record.command,
                parameters,
                record.context,
            )
        )
        line = row.getvalue().encode()
        # One write per line, unbuffered: whole however many workers append, readable
        # while the session runs, and not lost when the process dies.
        os.write(self._open(moment, config), line)
