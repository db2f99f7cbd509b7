"""A mailbox database's change log entries: their checksum chain and their framing.

Replication ships these entries from the active copy to the passive ones. Each
entry's checksum covers the entry and the checksum of the entry before it, so a
copy whose last checksum matches the active copy's at the same LSN holds exactly
the same history, and a corrupt, missing, reordered or foreign entry is found
before it is applied.

Framing (the body of a log response, and of a redelivery request): per entry one
header line of JSON ending in LF, then `payload_length` octets of payload.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

KINDS = ("deliver", "expunge", "purge")
GENESIS = bytes(32)  # the checksum "before" the first entry
MAX_HEADER_LINE = 4096
MAX_PAYLOAD = 256 * 1024 * 1024


class LogFormatError(Exception):
    """Bytes that are not a well-formed sequence of entries."""


@dataclass(frozen=True)
class LogEntry:
    lsn: int
    at: float
    kind: str
    address: str
    uid: int | None
    size: int | None
    payload: bytes | None
    checksum: bytes

    def chained_checksum(self, previous: bytes) -> bytes:
        return entry_checksum(
            previous, self.lsn, self.at, self.kind, self.address, self.uid, self.size, self.payload
        )


def entry_checksum(
    previous: bytes,
    lsn: int,
    at: float,
    kind: str,
    address: str,
    uid: int | None,
    size: int | None,
    payload: bytes | None,
) -> bytes:
    """SHA-256 over the previous checksum and every field of the entry."""
    digest = hashlib.sha256(previous)
    digest.update(
        struct.pack(">qdqq", lsn, at, -1 if uid is None else uid, -1 if size is None else size)
    )
    digest.update(kind.encode() + b"\0" + address.encode() + b"\0")
    digest.update(b"\1" + payload if payload is not None else b"\0")
    return digest.digest()


def encode(entries: Iterable[LogEntry]) -> Iterator[bytes]:
    for entry in entries:
        header = {
            "lsn": entry.lsn,
            "at": entry.at,
            "kind": entry.kind,
            "address": entry.address,
            "uid": entry.uid,
            "size": entry.size,
            "payload_length": None if entry.payload is None else len(entry.payload),
            "checksum": entry.checksum.hex(),
        }
        yield json.dumps(header, separators=(",", ":")).encode() + b"\n"
        if entry.payload is not None:
            yield entry.payload


def decode(body: bytes) -> list[LogEntry]:
    """Every entry in `body`; LogFormatError on anything else, including a truncation."""
    entries, position = [], 0
    while position < len(body):
        end = body.find(b"\n", position, position + MAX_HEADER_LINE + 1)
        if end < 0:
            raise LogFormatError("entry header missing its end or longer than 4096 octets")
        entry, length = _header(body[position:end])
        position = end + 1
        if length is not None:
            if len(body) - position < length:
                raise LogFormatError(f"entry {entry.lsn} truncated in its payload")
            entry = dataclasses.replace(entry, payload=body[position : position + length])
            position += length
        entries.append(entry)
    return entries


def _header(line: bytes) -> tuple[LogEntry, int | None]:
    """The entry a header line describes (payload still empty) and its payload length."""
    try:
        header = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise LogFormatError("entry header is not JSON") from None
    if not isinstance(header, dict) or set(header) != _FIELDS:
        raise LogFormatError("entry header has missing or unknown fields")
    lsn, at, kind, address = header["lsn"], header["at"], header["kind"], header["address"]
    if not _whole(lsn) or lsn < 1:
        raise LogFormatError("entry lsn is not a positive integer")
    if not isinstance(at, int | float) or isinstance(at, bool):
        raise LogFormatError(f"entry {lsn}: time is not a number")
    if kind not in KINDS:
        raise LogFormatError(f"entry {lsn}: unknown kind {kind!r}")
    if not isinstance(address, str) or not address:
        raise LogFormatError(f"entry {lsn}: no address")
    uid, size, length = header["uid"], header["size"], header["payload_length"]
    for name, value in (("uid", uid), ("size", size), ("payload_length", length)):
        if value is not None and (not _whole(value) or value < 0):
            raise LogFormatError(f"entry {lsn}: {name} is not a count")
    if length is not None and length > MAX_PAYLOAD:
        raise LogFormatError(f"entry {lsn}: payload larger than {MAX_PAYLOAD} octets")
    checksum = header["checksum"]
    if not (isinstance(checksum, str) and re.fullmatch("[0-9a-f]{64}", checksum)):
        raise LogFormatError(f"entry {lsn}: checksum is not 64 lowercase hex digits")
    entry = LogEntry(lsn, float(at), kind, address, uid, size, None, bytes.fromhex(checksum))
    return entry, length


_FIELDS = {"lsn", "at", "kind", "address", "uid", "size", "payload_length", "checksum"}


def _whole(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
