"""A mailbox database's change log entries: their checksum chain and their framing.

Replication ships these entries from the active copy to the passive ones. Each
entry's checksum covers the entry and the checksum of the entry before it, so a
copy whose last checksum matches the active copy's at the same LSN holds exactly
the same history, and a corrupt, missing, reordered or foreign entry is found
before it is applied.

The checksum covers a payload by its SHA-256 digest, not its octets, so that an
entry whose payload is gone still chains: a delivery's message lives only in the
copy's message table (the log never holds a second copy of it), and once the message
is deleted the entry that delivered it is shipped "forgotten", with its digest and
no payload. A copy replaying a forgotten delivery stores no message: a later entry
of the same log deletes it. That is what lets a deletion reach every file of every
copy in bounded time (see mailbox_database.forget).

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
    # Only for an entry whose payload is gone (a delivery of a message deleted since):
    # the digest of the payload it had. With a payload it is None (the payload says it).
    forgotten_digest: bytes | None = None

    @property
    def payload_digest(self) -> bytes | None:
        if self.payload is not None:
            return payload_digest(self.payload)
        return self.forgotten_digest

    @property
    def forgotten(self) -> bool:
        return self.payload is None and self.forgotten_digest is not None

    def chained_checksum(self, previous: bytes) -> bytes:
        return digest_checksum(
            previous,
            self.lsn,
            self.at,
            self.kind,
            self.address,
            self.uid,
            self.size,
            self.payload_digest,
        )


def payload_digest(payload: bytes) -> bytes:
    return hashlib.sha256(payload).digest()


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
    """The chain's checksum of an entry with this payload (see digest_checksum)."""
    digest = None if payload is None else payload_digest(payload)
    return digest_checksum(previous, lsn, at, kind, address, uid, size, digest)


def digest_checksum(
    previous: bytes,
    lsn: int,
    at: float,
    kind: str,
    address: str,
    uid: int | None,
    size: int | None,
    digest: bytes | None,
) -> bytes:
    """SHA-256 over the previous checksum and every field of the entry, the payload by
    its digest."""
    chained = hashlib.sha256(previous)
    chained.update(
        struct.pack(">qdqq", lsn, at, -1 if uid is None else uid, -1 if size is None else size)
    )
    chained.update(kind.encode() + b"\0" + address.encode() + b"\0")
    chained.update(b"\1" + digest if digest is not None else b"\0")
    return chained.digest()


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
            "digest": None if (digest := entry.payload_digest) is None else digest.hex(),
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
            payload = body[position : position + length]
            if payload_digest(payload) != entry.forgotten_digest:
                raise LogFormatError(f"entry {entry.lsn}: payload does not match its digest")
            entry = dataclasses.replace(entry, payload=payload, forgotten_digest=None)
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
    checksum, digest = header["checksum"], header["digest"]
    if not (isinstance(checksum, str) and _HEX_256.fullmatch(checksum)):
        raise LogFormatError(f"entry {lsn}: checksum is not 64 lowercase hex digits")
    if digest is not None and not (isinstance(digest, str) and _HEX_256.fullmatch(digest)):
        raise LogFormatError(f"entry {lsn}: digest is not 64 lowercase hex digits")
    if length is not None and digest is None:
        raise LogFormatError(f"entry {lsn}: a payload without its digest")
    entry = LogEntry(
        lsn,
        float(at),
        kind,
        address,
        uid,
        size,
        None,
        bytes.fromhex(checksum),
        None if digest is None else bytes.fromhex(digest),
    )
    return entry, length


_FIELDS = {"lsn", "at", "kind", "address", "uid", "size", "payload_length", "digest", "checksum"}
_HEX_256 = re.compile("[0-9a-f]{64}")


def _whole(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
