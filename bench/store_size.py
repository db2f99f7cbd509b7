"""Store size: what a read-and-delete POP3 user costs on disk (issue 14).

    .venv/bin/python -m bench.store_size [--messages 300] [--size 50000]

Under `popguard up --detach` (the default organization: DB01 active on mbx1, a copy
on mbx2), one mailbox in DB01 gets `--messages` messages of `--size` octets over LMTP,
each with a word of its own; then a POP3 client (poplib, TLS, through the front end)
reads and deletes them all. DB01's files (database, -wal, -shm, any other) are measured
on both servers after delivery, after deletion (once both copies have applied it) and
after `--forget-wait` seconds more (the default forget interval is 60 s), and both
servers' folders are searched, byte by byte, for the deleted messages' words.

Run it with another popguard to measure that one: the services run on the Python that
runs this script (`/path/to/other/.venv/bin/python -m bench.store_size`).
"""

from __future__ import annotations

import argparse
import poplib
import secrets
import ssl
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import popguard
from bench.report import machine, write_results
from popguard.directory.directory import Directory
from popguard.services.lmtp_client import deliver
from popguard.testing.organization import POLL, popguard_output, up_organization, wait_until

USER = "store-size@popguard.test"
PASSWORD = "store size benchmark password"
FRONTEND_TLS_PORT = 10995
SERVERS = ("mbx1", "mbx2")


def message(word: str, size: int) -> bytes:
    head = f"From: bench@example.test\r\nTo: {USER}\r\nSubject: {word}\r\n\r\n".encode()
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


def words_found(data: Path, words: list[str]) -> dict[str, int]:
    """server -> how many of `words` some file of its folder still holds."""
    found = {}
    for server in SERVERS:
        seen: set[str] = set()
        for path in (data / "servers" / server).rglob("*"):
            try:
                content = path.read_bytes() if path.is_file() else b""
            except OSError:
                continue
            seen.update(word for word in words if word.encode() in content)
        found[server] = len(seen)
    return found


def copies_agree(org: Any) -> bool:
    rows = org.cli_json("get-mailboxdatabasecopystatus")
    db01 = [r for r in rows if r["Name"].startswith("DB01\\")]
    lsns = {r["LogSequenceNumber"] for r in db01}
    return len(lsns) == 1 and all(r["Status"] in ("Mounted", "Healthy") for r in db01)


def megabytes(files: dict[str, int]) -> float:
    return sum(files.values()) / 1e6


def snapshot(label: str, data: Path, words: list[str]) -> dict[str, Any]:
    files = db01_files(data)
    found = words_found(data, words)
    sizes = {server: round(megabytes(f), 2) for server, f in files.items()}
    total = round(sum(sizes.values()), 2)
    row = {
        "when": label,
        "files": files,
        "MB": sizes,
        "MB_total": total,
        "deleted_words_found": found,
    }
    print(
        f"{label:>22}: "
        + "  ".join(f"{s} {sizes[s]:7.2f} MB" for s in SERVERS)
        + f"  total {total:7.2f} MB  words still readable: "
        + ", ".join(f"{s} {found[s]}/{len(words)}" for s in SERVERS),
        flush=True,
    )
    return row


def run(args: argparse.Namespace) -> dict[str, Any]:
    with up_organization(
        tuple(args.addresses.split(",")), False, "popguard-store-size-", lambda: args.keep
    ) as org:
        popguard_output(
            org.data, "new-mailbox", USER, "--database", "DB01", "--password-stdin",
            stdin=PASSWORD,
        )  # fmt: skip
        wait_until("DB01's copies to agree", lambda: copies_agree(org), 60)
        words = [f"word{secrets.token_hex(6)}" for _ in range(args.messages)]
        started = time.monotonic()
        with Directory(org.data) as directory:
            for word in words:
                result = deliver(directory, USER, message(word, args.size), "b@example.test")
                if result.code != 250:
                    raise SystemExit(f"delivery refused: {result.reply}")
        delivery_seconds = time.monotonic() - started
        live = args.messages * len(message(words[0], args.size))
        print(f"{args.messages} messages, {live / 1e6:.1f} MB delivered in {delivery_seconds:.1f}s")
        wait_until("DB01's copies to agree", lambda: copies_agree(org), 120)
        rows = [snapshot("after delivery", org.data, words)]

        context = ssl.create_default_context(cafile=str(org.ca_file()))
        client = poplib.POP3_SSL(org.addresses["cas1"], FRONTEND_TLS_PORT, context=context)
        client.user(USER)
        client.pass_(PASSWORD)
        count, _ = client.stat()
        for number in range(1, count + 1):
            client.retr(number)
            client.dele(number)
        client.quit()
        wait_until("DB01's copies to agree", lambda: copies_agree(org), 120)
        rows.append(snapshot("after deletion", org.data, words))
        time.sleep(max(args.forget_wait - POLL, 0))
        rows.append(snapshot(f"{args.forget_wait:g}s later", org.data, words))
        return {"live_MB": round(live / 1e6, 2), "delivery_seconds": delivery_seconds,
                "rows": rows}  # fmt: skip


def source_commit() -> str:
    """The commit of the popguard that ran (this script may run another one)."""
    where = Path(popguard.__file__).resolve().parent
    done = subprocess.run(["git", "-C", str(where), "rev-parse", "--short", "HEAD"],
                          capture_output=True, text=True)  # fmt: skip
    return done.stdout.strip() or "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=300)
    parser.add_argument("--size", type=int, default=50_000, help="octets per message")
    parser.add_argument("--forget-wait", type=float, default=75.0,
                        help="seconds to wait after deletion (default 75: the 60 s forget "
                             "interval and some)")  # fmt: skip
    parser.add_argument("--addresses", default="127.0.141.1,127.0.142.1,127.0.143.1",
                        help="cas1, mbx1 and mbx2's loopback addresses")  # fmt: skip
    parser.add_argument("--keep", action="store_true", help="keep the data folder")
    args = parser.parse_args()
    report = {
        "benchmark": "store_size",
        "machine": machine(),
        "popguard": {"source": str(Path(popguard.__file__).parent), "commit": source_commit()},
        "python": sys.executable,
        "messages": args.messages,
        "size": args.size,
        **run(args),
    }
    print(f"results: {write_results('store_size', report)}")


if __name__ == "__main__":
    main()
