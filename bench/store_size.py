"""Store size: what a read-and-delete POP3 user costs on disk (issue 14).

    .venv/bin/python -m bench.store_size [--messages 300] [--size 50000]
    .venv/bin/python -m bench.store_size --messages 100000 --size 20000 --mailboxes 100
        --keep-percent 10 --connections 8 --readers 2 --dovecot   # as root (Dovecot)

Under `popguard up --detach` (the default organization: DB01 active on mbx1, a copy
on mbx2), `--mailboxes` mailboxes in DB01 get `--messages` messages of `--size` octets
between them (round the mailboxes) over LMTP on `--connections` connections, each with
a word of its own; then a POP3 client (TLS, through the front end) reads them all and
deletes all but the newest `--keep-percent` of each mailbox (the live mail that stays).
DB01's files (database, -wal, -shm, any other) are measured on both servers after
delivery, after deletion (once both copies have applied it) and after `--forget-wait`
seconds more (the default forget interval is 60 s), and both servers' folders are
searched, byte by byte, for the deleted messages' words.

`--dovecot`: the same work on a private Dovecot (popguard.testing.dovecot, default
profile, Debian's packages) afterwards: the same messages written into its maildirs
(one file each, named with S= and W= as Dovecot's LDA names them: a maildir delivery is
a file written), read and deleted over POP3 the same way, and its mail folder measured
after delivery and after deletion (Dovecot unlinks a deleted message's file at QUIT;
there is nothing to wait for).

Run it with another popguard to measure that one: the services run on the Python that
runs this script (`/path/to/other/.venv/bin/python -m bench.store_size`).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import re
import secrets
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import popguard
from bench.large_mailbox import Pop3Error, RawPop3
from bench.lmtp_load import deliver_load
from bench.report import machine, write_results
from popguard.directory.directory import Directory
from popguard.directory.passwords import hash_password
from popguard.testing.dovecot import Dovecot
from popguard.testing.net import free_loopback_address
from popguard.testing.organization import POLL, up_organization, wait_until

USER = "store-size@popguard.test"  # the first mailbox; more are store-size-N@
PASSWORD = "store size benchmark password"
FRONTEND_TLS_PORT = 10995
SERVERS = ("mbx1", "mbx2")
WORD = re.compile(rb"word[0-9a-f]{12}")
MAX_MESSAGES = 200_000  # bounds on one run, whatever the options say
MAX_MAILBOXES = 1_000
DELIVERY_LIMIT = 3600.0  # seconds for all the deliveries
WAIT_LIMIT = 600.0  # seconds for both copies to apply what was delivered or deleted
QUIT_ATTEMPTS = 5  # sessions per mailbox while QUIT says the deletions were not all made
QUIT_RETRY_WAIT = 2.0  # seconds before the next such session


def users(count: int) -> list[str]:
    return [USER, *(f"store-size-{n}@popguard.test" for n in range(2, count + 1))]


def message(word: str, size: int, to: str = USER) -> bytes:
    head = f"From: bench@example.test\r\nTo: {to}\r\nSubject: {word}\r\n\r\n".encode()
    line = b"The quick brown fox jumps over the lazy dog, again and again.\r\n"
    text = head + f"This one's word is {word}.\r\n".encode()
    return text + line * max(0, (size - len(text)) // len(line))


def db01_files(data: Path) -> dict[str, dict[str, int]]:
    """server -> file name -> octets, for DB01's files on each server."""
    return {
        server: {
            f.name: f.stat().st_size
            for f in sorted((data / "servers" / server / "databases").glob("DB01*"))
            if f.is_file()
        }
        for server in SERVERS
    }


def words_in(folder: Path) -> set[bytes]:
    """Every word (as `message` writes them) that some file under `folder` holds."""
    seen: set[bytes] = set()
    for path in folder.rglob("*"):
        # Read whole, not mapped: a forget run may shrink a file meanwhile.
        with contextlib.suppress(OSError):
            seen.update(WORD.findall(path.read_bytes() if path.is_file() else b""))
    return seen


def words_found(data: Path, words: set[bytes]) -> dict[str, int]:
    """server -> how many of `words` some file of its folder still holds."""
    return {server: len(words & words_in(data / "servers" / server)) for server in SERVERS}


def copies_agree(org: Any) -> bool:
    rows = org.cli_json("get-mailboxdatabasecopystatus")
    db01 = [r for r in rows if r["Name"].startswith("DB01\\")]
    lsns = {r["LogSequenceNumber"] for r in db01}
    return len(lsns) == 1 and all(r["Status"] in ("Mounted", "Healthy") for r in db01)


def megabytes(files: dict[str, int]) -> float:
    return sum(files.values()) / 1e6


def snapshot(label: str, data: Path, words: set[bytes], live: int) -> dict[str, Any]:
    """DB01's files on each server, and how many of `words` (the deleted messages', or
    every message's before deletion) some file of its folder still holds."""
    files = db01_files(data)
    found = words_found(data, words)
    sizes = {server: round(megabytes(f), 2) for server, f in files.items()}
    total = round(sum(sizes.values()), 2)
    row = {
        "when": label,
        "files": files,
        "MB": sizes,
        "MB_total": total,
        "live_MB": round(live / 1e6, 2),
        "deleted_words_found": found,
    }
    print(
        f"{label:>22}: "
        + "  ".join(f"{s} {sizes[s]:8.2f} MB" for s in SERVERS)
        + f"  total {total:8.2f} MB  (live mail {live / 1e6:.2f} MB)  words readable: "
        + ", ".join(f"{s} {found[s]}/{len(words)}" for s in SERVERS),
        flush=True,
    )
    return row


# -- reading and deleting ------------------------------------------------------------


class Pop3Reader(RawPop3):
    """bench.large_mailbox's cheap client, over TLS when given a context, that also
    returns a message."""

    def __init__(self, address: str, port: int, context: ssl.SSLContext | None) -> None:
        super().__init__(address, port)
        if context is not None:
            self.sock = context.wrap_socket(self.sock, server_hostname=address)
        self.status()  # the greeting

    def retrieve(self, number: int) -> bytes:
        self.command(f"RETR {number}")
        while (end := self.buffer.find(b"\r\n.\r\n")) < 0:
            self._fill()
        content = bytes(self.buffer[: end + 2])
        del self.buffer[: end + 5]
        return content


def read_and_delete(
    address: str, port: int, context: ssl.SSLContext | None, user: str, keep_percent: float
) -> tuple[set[bytes], set[bytes], int]:
    """RETR every message, DELE all but the newest `keep_percent`, QUIT; again while the
    QUIT says the deletions were not all made (-ERR [SYS/TEMP], as RFC 1939 has it: a
    store error, or no passive copy confirmed them in time), as a client's next poll
    would, at most QUIT_ATTEMPTS sessions. The words of the messages deleted and of
    those kept, and the sessions whose QUIT said -ERR."""
    deleted: set[bytes] = set()
    keep: int | None = None  # how many stay, from the first session's count
    for attempt in range(QUIT_ATTEMPTS):
        client = Pop3Reader(address, port, context)
        try:
            client.command(f"USER {user}")
            client.command(f"PASS {PASSWORD}")
            count = int(client.command("STAT").split()[1])
            if keep is None:
                keep = math.ceil(count * keep_percent / 100)
            kept: set[bytes] = set()
            for number in range(1, count + 1):
                found = WORD.search(client.retrieve(number))
                word = found.group() if found else b""
                if number <= count - keep:
                    client.command(f"DELE {number}")
                    deleted.add(word)
                else:
                    kept.add(word)
            try:
                client.command("QUIT")  # the deletions take effect here
            except Pop3Error:
                time.sleep(QUIT_RETRY_WAIT)
                continue
        finally:
            client.close()
        return deleted - kept, kept, attempt
    raise Pop3Error(f"{user}: {QUIT_ATTEMPTS} QUITs in a row said -ERR")


def read_and_delete_all(
    address: str, port: int, context: ssl.SSLContext | None, mailboxes: list[str],
    keep_percent: float, readers: int,
) -> tuple[set[bytes], set[bytes], int]:  # fmt: skip
    """Every mailbox, on `readers` threads at a time: the words deleted and kept, and
    how many QUITs said -ERR (and were tried again)."""
    deleted: set[bytes] = set()
    quits_refused = [0]
    kept: set[bytes] = set()
    lock = threading.Lock()
    failures: list[BaseException] = []
    pending = iter(mailboxes)

    def reader() -> None:
        while True:
            with lock:
                user = next(pending, None)
            if user is None:
                return
            try:
                gone, staying, refused = read_and_delete(address, port, context, user, keep_percent)
            except Exception as exc:  # reported below, after the other threads end
                with lock:
                    failures.append(exc)
                return
            with lock:
                deleted.update(gone)
                kept.update(staying)
                quits_refused[0] += refused

    threads = [threading.Thread(target=reader) for _ in range(max(1, readers))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if failures:
        raise SystemExit(f"reading and deleting failed: {failures[0]!r}")
    return deleted, kept, quits_refused[0]


# -- the two servers -----------------------------------------------------------------


def run_popguard(
    args: argparse.Namespace, words: list[str], sizes: dict[bytes, int]
) -> dict[str, Any]:
    mailboxes = users(args.mailboxes)
    with up_organization(
        tuple(args.addresses.split(",")), False, "popguard-store-size-", lambda: args.keep
    ) as org:
        with Directory(org.data) as directory:
            hashed = hash_password(PASSWORD)  # once: one argon2id costs a second or so
            for user in mailboxes:
                directory.new_mailbox(user, "DB01", hashed)
        wait_until("DB01's copies to agree", lambda: copies_agree(org), 60)
        delivered = deliver_load(
            org.addresses["mbx1"],
            lambda n: (mailboxes[n % len(mailboxes)],
                       message(words[n], args.size, mailboxes[n % len(mailboxes)])),
            connections=args.connections, max_messages=len(words), seconds=DELIVERY_LIMIT,
        )  # fmt: skip
        if len(delivered.latencies) != len(words):
            raise SystemExit(
                f"{len(delivered.latencies)} of {len(words)} delivered (refused: "
                f"{delivered.refused}, failures: {delivered.failures[:3]})"
            )
        all_words = {w.encode() for w in words}
        print(
            f"popguard: {len(words)} messages, {sum(sizes.values()) / 1e6:.1f} MB to "
            f"{len(mailboxes)} mailboxes in {delivered.seconds:.1f}s "
            f"({delivered.per_second:.0f}/s on {args.connections} connections)",
            flush=True,
        )
        wait_until("DB01's copies to agree", lambda: copies_agree(org), WAIT_LIMIT)
        rows = [snapshot("after delivery", org.data, all_words, sum(sizes.values()))]

        context = ssl.create_default_context(cafile=str(org.ca_file()))
        started = time.monotonic()
        deleted, kept, quits_refused = read_and_delete_all(
            org.addresses["cas1"], FRONTEND_TLS_PORT, context, mailboxes, args.keep_percent,
            args.readers,
        )  # fmt: skip
        deletion_seconds = time.monotonic() - started
        if deleted | kept != all_words:
            raise SystemExit(f"read {len(deleted | kept)} of {len(words)} messages' words")
        live = sum(sizes[w] for w in kept)
        print(f"popguard: read {len(words)}, deleted {len(deleted)} in {deletion_seconds:.1f}s "
              f"({quits_refused} QUITs answered -ERR [SYS/TEMP], tried again)",
              flush=True)  # fmt: skip
        wait_until("DB01's copies to agree", lambda: copies_agree(org), WAIT_LIMIT)
        rows.append(snapshot("after deletion", org.data, deleted, live))
        time.sleep(max(args.forget_wait - POLL, 0))
        rows.append(snapshot(f"{args.forget_wait:g}s later", org.data, deleted, live))
        kept_found = words_found(org.data, kept)
        print(f"popguard: kept messages' words found: {kept_found} of {len(kept)} each")
        return {
            "live_MB": round(live / 1e6, 2),
            "delivery_seconds": delivered.seconds,
            "deliveries_per_second": delivered.per_second,
            "deletion_seconds": deletion_seconds,
            "quits_refused": quits_refused,
            "kept": len(kept),
            "kept_words_found": kept_found,
            "rows": rows,
        }


def mail_folder_size(root: Path) -> dict[str, int]:
    """Octets (st_size) and allocated octets (st_blocks) of every file under `root`, and
    how many files there are."""
    octets = allocated = count = 0
    for path in root.rglob("*"):
        with contextlib.suppress(OSError):
            info = path.lstat()
            if path.is_file():
                octets += info.st_size
                allocated += info.st_blocks * 512
                count += 1
    return {"octets": octets, "allocated": allocated, "files": count}


def dovecot_snapshot(label: str, root: Path, words: set[bytes], live: int) -> dict[str, Any]:
    size = mail_folder_size(root)
    found = len(words & words_in(root))
    print(
        f"{label:>22}: dovecot {size['octets'] / 1e6:8.2f} MB in {size['files']} files "
        f"({size['allocated'] / 1e6:.2f} MB allocated)  (live mail {live / 1e6:.2f} MB)  "
        f"words readable: {found}/{len(words)}",
        flush=True,
    )
    return {"when": label, **size, "MB": round(size["octets"] / 1e6, 2),
            "MB_allocated": round(size["allocated"] / 1e6, 2), "live_MB": round(live / 1e6, 2),
            "deleted_words_found": found}  # fmt: skip


def run_dovecot(
    args: argparse.Namespace, words: list[str], sizes: dict[bytes, int]
) -> dict[str, Any]:
    mailboxes = users(args.mailboxes)
    with contextlib.ExitStack() as stack:
        folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="store-size-")))
        folder.chmod(0o755)  # Dovecot's unprivileged processes reach their folder through it
        dovecot = stack.enter_context(
            Dovecot("default", free_loopback_address(()), mailboxes, PASSWORD, [], workdir=folder)
        )
        started = time.monotonic()
        for index, user in enumerate(mailboxes):
            dovecot.fill(
                user,
                (message(w, args.size, user) for w in words[index :: len(mailboxes)]),
                sizes_in_names=True,
            )
        fill_seconds = time.monotonic() - started
        mail = dovecot.root / "mail"
        all_words = {w.encode() for w in words}
        rows = [dovecot_snapshot("after delivery", mail, all_words, sum(sizes.values()))]
        started = time.monotonic()
        deleted, kept, quits_refused = read_and_delete_all(
            dovecot.address, dovecot.port, None, mailboxes, args.keep_percent, args.readers
        )
        deletion_seconds = time.monotonic() - started
        if deleted | kept != all_words:
            raise SystemExit(f"Dovecot: read {len(deleted | kept)} of {len(words)} words")
        print(f"dovecot: read {len(words)}, deleted {len(deleted)} in {deletion_seconds:.1f}s "
              f"({quits_refused} QUITs answered -ERR)", flush=True)  # fmt: skip
        live = sum(sizes[w] for w in kept)
        rows.append(dovecot_snapshot("after deletion", mail, deleted, live))
        return {"fill_seconds": fill_seconds, "deletion_seconds": deletion_seconds,
                "quits_refused": quits_refused, "kept": len(kept), "rows": rows}  # fmt: skip


def source_commit() -> str:
    """The commit of the popguard that ran (this script may run another one)."""
    where = Path(popguard.__file__).resolve().parent
    done = subprocess.run(["git", "-C", str(where), "rev-parse", "--short", "HEAD"],
                          capture_output=True, text=True)  # fmt: skip
    return done.stdout.strip() or "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=300, help="in all mailboxes together")
    parser.add_argument("--size", type=int, default=50_000, help="octets per message")
    parser.add_argument("--mailboxes", type=int, default=1)
    parser.add_argument("--keep-percent", type=float, default=0.0,
                        help="of each mailbox's messages, the newest this many percent stay "
                             "(the live mail; default 0: all are deleted)")  # fmt: skip
    parser.add_argument("--connections", type=int, default=1, help="LMTP connections")
    parser.add_argument("--readers", type=int, default=1,
                        help="POP3 sessions at a time (each on a mailbox of its own)")  # fmt: skip
    parser.add_argument("--dovecot", action="store_true",
                        help="the same work on a private Dovecot afterwards (as root)")  # fmt: skip
    parser.add_argument("--forget-wait", type=float, default=75.0,
                        help="seconds to wait after deletion (default 75: the 60 s forget "
                             "interval and some)")  # fmt: skip
    parser.add_argument("--addresses", default="127.0.141.1,127.0.142.1,127.0.143.1",
                        help="cas1, mbx1 and mbx2's loopback addresses")  # fmt: skip
    parser.add_argument("--keep", action="store_true", help="keep the data folder")
    args = parser.parse_args()
    if not 0 < args.messages <= MAX_MESSAGES or not 0 < args.mailboxes <= MAX_MAILBOXES:
        parser.error(f"--messages 1..{MAX_MESSAGES}, --mailboxes 1..{MAX_MAILBOXES}")
    if not 0 <= args.keep_percent < 100:
        parser.error("--keep-percent: from 0 to less than 100")
    words = [f"word{secrets.token_hex(6)}" for _ in range(args.messages)]
    mailboxes = users(args.mailboxes)
    # word -> its message's octets (the To: line is the mailbox's: sizes differ a little)
    sizes = {w.encode(): len(message(w, args.size, mailboxes[n % len(mailboxes)]))
             for n, w in enumerate(words)}  # fmt: skip
    report = {
        "benchmark": "store_size",
        "machine": machine(),
        "popguard": {"source": str(Path(popguard.__file__).parent), "commit": source_commit()},
        "python": sys.executable,
        "messages": args.messages,
        "size": args.size,
        "mailboxes": args.mailboxes,
        "keep_percent": args.keep_percent,
        "connections": args.connections,
        **run_popguard(args, words, sizes),
    }
    if args.dovecot:
        report["dovecot"] = run_dovecot(args, words, sizes)
    report["load_average_after"] = machine()["load_average"]
    print(f"results: {write_results('store_size', report)}")


if __name__ == "__main__":
    main()
