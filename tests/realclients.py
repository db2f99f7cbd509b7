"""Drive real POP3 clients and a real Postfix from tests.

Every ``fetch_with_*`` function runs one real client as a subprocess against a POP3
server, in a private temporary directory, with a timeout, and returns what it
retrieved: one ``bytes`` per message, in server order.  The returned messages are
normalised to what the server sent on the wire (CRLF line ends, dot-unstuffed) with the
header fields the client itself prepends removed (see :func:`strip_client_headers`);
pass ``raw=True`` to get exactly what the client delivered instead.

TLS is always on and always verified against ``cafile`` (never switched off):

========= ============================ ========================== ========================
client    STLS (``tls="stls"``)         implicit (``"implicit"``)  delete (``keep=False``)
========= ============================ ========================== ========================
curl      ``pop3://`` + ``--ssl-reqd``  ``pop3s://``               ``--request DELE --head``
fetchmail ``sslproto "tls1.2+"``        ``ssl``                    ``no keep``
mpop      ``tls_starttls on``           ``tls_starttls off``       ``keep off``
getmail6  not supported (raises)        ``SimplePOP3SSLRetriever`` ``delete = true``
poplib    ``POP3.stls()``               ``POP3_SSL``               ``POP3.dele()``
========= ============================ ========================== ========================

getmail6 (6.18) has no STARTTLS for POP3 at all: ``SimplePOP3Retriever`` is plain text
only and has no TLS parameters, so ``fetch_with_getmail(tls="stls")`` raises
:class:`UnsupportedByClient` rather than fetch in clear text.

fetchmail checks the server name with OpenSSL's host-name matching, which treats an
IP-address host as a DNS name: a certificate for ``127.0.9.1`` must carry
``DNS:127.0.9.1`` in its subjectAltName (as :func:`make_test_pki` does), or pass
``server_name`` with a DNS name that the certificate does carry.

Also here: :func:`make_test_pki` (a throw-away CA and server certificate), a private
Postfix instance that relays a domain over LMTP (:func:`start_postfix_to_lmtp`),
:func:`send_via_smtp` and :func:`wait_for_postfix_delivery`.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import poplib
import pwd
import re
import shlex
import shutil
import signal
import smtplib
import socket
import ssl
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

TlsMode = Literal["stls", "implicit"]
TLS_MODES: tuple[TlsMode, ...] = ("stls", "implicit")

DEFAULT_TIMEOUT = 30.0


class ClientError(RuntimeError):
    """A real client failed (non-zero exit, timeout, or unusable output)."""

    def __init__(
        self,
        client: str,
        message: str,
        *,
        returncode: int | None = None,
        output: str = "",
    ) -> None:
        detail = f"{client}: {message}"
        if returncode is not None:
            detail += f" (exit {returncode})"
        if output:
            detail += "\n" + output[-4000:]
        super().__init__(detail)
        self.client = client
        self.returncode = returncode
        self.output = output


class UnsupportedByClient(NotImplementedError):
    """The client cannot do what was asked (e.g. getmail6 has no POP3 STARTTLS)."""


# --------------------------------------------------------------------------------------
# message helpers


_CLIENT_RECEIVED = re.compile(rb"\(fetchmail-[^)]*\)|\(mpop-[^)]*\)|\bgetmail6?\b", re.IGNORECASE)


def _header_fields(head: bytes) -> list[bytes]:
    """Split a header block (CRLF lines, no final blank line) into folded fields."""
    fields: list[bytes] = []
    for line in head.split(b"\r\n"):
        if fields and line[:1] in (b" ", b"\t"):
            fields[-1] += b"\r\n" + line
        else:
            fields.append(line)
    return fields


def to_crlf(data: bytes) -> bytes:
    """Normalise every line ending (LF, CRLF, lone CR) to CRLF."""
    return re.sub(rb"\r\n|\r|\n", b"\r\n", data)


def strip_client_headers(message: bytes) -> bytes:
    """Remove header fields that a POP3 client prepended on delivery.

    Only fields at the very top are removed, and only those a client adds:
    ``Received:`` fields naming fetchmail, mpop or getmail, and getmail's
    ``Return-Path:`` / ``Delivered-To:``.  ``Received:`` fields written by MTAs on the
    server side are kept.  Line ends are normalised to CRLF.
    """
    message = to_crlf(message)
    head, sep, body = message.partition(b"\r\n\r\n")
    if not sep:
        return message
    fields = _header_fields(head)
    added_by_getmail = any(
        f.lower().startswith(b"received:") and b"getmail" in f.lower() for f in fields[:4]
    )
    i = 0
    while i < len(fields):
        name = fields[i].split(b":", 1)[0].strip().lower()
        by_client = name == b"received" and _CLIENT_RECEIVED.search(fields[i]) is not None
        by_getmail = added_by_getmail and name in (b"return-path", b"delivered-to")
        if not (by_client or by_getmail):
            break
        i += 1
    return b"\r\n".join(fields[i:]) + b"\r\n\r\n" + body


def comparable(message: bytes) -> bytes:
    """A form of ``message`` that compares equal across clients.

    CRLF line ends, client-added header fields stripped, and every ``Return-Path:``
    field dropped (getmail deletes any Return-Path the message had and writes its own).
    """
    message = strip_client_headers(message)
    head, sep, body = message.partition(b"\r\n\r\n")
    if not sep:
        return message
    kept = [f for f in _header_fields(head) if not f.lower().startswith(b"return-path:")]
    return b"\r\n".join(kept) + b"\r\n\r\n" + body


def parse_mboxrd(data: bytes) -> list[bytes]:
    """Split an mboxrd file (as mpop and getmail write it) into messages.

    Drops each ``From `` separator line and the blank line the writer appends after
    each message, and un-escapes ``>From `` lines by one ``>``.
    """
    messages: list[list[bytes]] = []
    for line in data.splitlines(keepends=True):
        if line.startswith(b"From "):
            messages.append([])
            continue
        if not messages:
            if line.strip():
                raise ValueError("mbox does not start with a From_ line")
            continue
        if re.match(rb">+From ", line):
            line = line[1:]
        messages[-1].append(line)
    out: list[bytes] = []
    for lines in messages:
        if lines and lines[-1] in (b"\n", b"\r\n"):
            lines = lines[:-1]
        out.append(b"".join(lines))
    return out


def _finish(messages: list[bytes], raw: bool) -> list[bytes]:
    return messages if raw else [strip_client_headers(m) for m in messages]


# --------------------------------------------------------------------------------------
# test PKI


@dataclass(frozen=True)
class TestPki:
    """Files of a throw-away CA and one server certificate signed by it."""

    __test__ = False  # not a pytest test class

    ca_file: Path
    cert_file: Path
    key_file: Path


def make_test_pki(
    directory: Path, hosts: Sequence[str], *, common_name: str | None = None
) -> TestPki:
    """A fresh organization CA (popguard's own, in ``directory``) and one server certificate.

    The server certificate's subjectAltName has, for each entry of ``hosts``, an
    iPAddress entry when it is an IP address, and always a dNSName entry with the
    literal string: the latter is what fetchmail's name check needs for IP hosts.
    """
    from popguard.net import tls

    ip_hosts = []
    for host in hosts:
        with contextlib.suppress(ValueError):
            ip_hosts.append(str(ipaddress.ip_address(host)))
    name = common_name or (hosts[0] if hosts else "popguard-test-server")
    pair = tls.TlsMaterial.of(directory).ensure_server_certificate(name, list(hosts), ip_hosts)
    return TestPki(tls.TlsMaterial.of(directory).ca_certificate_file, pair.certificate, pair.key)


# --------------------------------------------------------------------------------------
# subprocess plumbing


@contextlib.contextmanager
def _private_dir(prefix: str, parent: Path | None) -> Iterator[Path]:
    """A fresh 0700 directory; removed afterwards unless ``parent`` was given."""
    if parent is not None:
        parent.mkdir(parents=True, exist_ok=True)
        yield Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
        return
    with tempfile.TemporaryDirectory(prefix=prefix) as d:
        yield Path(d)


def _write_private(path: Path, text: str) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    path.chmod(0o600)
    return path


def _quote(value: str) -> str:
    """Double-quoted string for a curl ``-K`` config file (``\\\\`` and ``\\"``)."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _mpop_quote(value: str) -> str:
    """Double-quoted mpop config argument.

    mpop only strips the outer quotes and takes the rest literally (no escapes:
    ``"a"b\\c "`` is ``a"b\\c ``), so only a line break cannot be expressed.
    """
    if "\n" in value or "\r" in value:
        raise ValueError("mpop config values cannot contain line breaks")
    return '"' + value + '"'


def _fm_quote(value: str) -> str:
    """Double-quoted fetchmailrc string.

    fetchmail knows no ``\\"`` or ``\\\\`` escapes, only ``\\xhh`` and a few others,
    so every byte that is not printable ASCII, or is ``"`` or ``\\``, becomes ``\\xhh``.
    """
    out = []
    for byte in value.encode():
        ch = chr(byte)
        out.append(ch if 0x20 <= byte < 0x7F and ch not in '"\\' else f"\\x{byte:02x}")
    return '"' + "".join(out) + '"'


def _run(
    client: str,
    argv: Sequence[str],
    *,
    timeout: float,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    ok_codes: Sequence[int] = (0,),
) -> subprocess.CompletedProcess[str]:
    exe = shutil.which(argv[0], path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
    if exe is None:
        raise ClientError(client, f"{argv[0]} not installed (scripts/install-test-deps.sh)")
    full_env = dict(os.environ)
    full_env.update({"LC_ALL": "C", "LANG": "C"})
    if env:
        full_env.update(env)
    try:
        proc = subprocess.run(
            [exe, *argv[1:]],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            errors="replace",
            timeout=timeout,
            env=full_env,
            cwd=cwd,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        out = (_text(exc.stdout) + _text(exc.stderr)).strip()
        raise ClientError(client, f"timed out after {timeout:g}s", output=out) from exc
    if proc.returncode not in ok_codes:
        raise ClientError(
            client,
            "failed: " + " ".join(argv),
            returncode=proc.returncode,
            output=(proc.stdout + proc.stderr).strip(),
        )
    return proc


def _text(data: bytes | str | None) -> str:
    if data is None:
        return ""
    if isinstance(data, bytes):
        return data.decode("utf-8", "replace")
    return data


def _check_tls(tls: str) -> None:
    if tls not in TLS_MODES:
        raise ValueError(f"tls must be one of {TLS_MODES}, not {tls!r}")


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _current_user() -> str:
    return pwd.getpwuid(os.geteuid()).pw_name


# MDA used with fetchmail: store stdin as the next numbered file in a folder.
_NUMBERED_MDA = """#!/bin/sh
set -e
n=$(ls -1 "$1" | wc -l)
exec cat > "$1/$(printf %06d "$n")"
"""


def _read_numbered(folder: Path) -> list[bytes]:
    return [p.read_bytes() for p in sorted(folder.iterdir())]


# --------------------------------------------------------------------------------------
# clients


def fetch_with_curl(
    host: str,
    port: int,
    tls: TlsMode,
    cafile: str | Path,
    user: str,
    password: str,
    *,
    keep: bool,
    timeout: float = DEFAULT_TIMEOUT,
    server_name: str | None = None,
    workdir: Path | None = None,
    raw: bool = False,
) -> list[bytes]:
    """Retrieve (and unless ``keep``, delete) every message with the curl CLI.

    curl does one POP3 command per URL: ``pop3://h:p/`` is LIST, ``pop3://h:p/N`` is
    RETR N, and ``--request DELE --head`` on ``/N`` is DELE N (``--head`` tells curl
    that no multi-line body follows; without it curl waits for one and times out).
    So: one run for LIST, then one run that RETRs every message and, after ``--next``,
    DELEs them all.  curl re-uses the connection across URLs and ``--next`` groups, so
    that is one POP3 session ending in QUIT; ``--fail-early`` stops before any DELE if
    a RETR failed.  Credentials go in a 0600 ``-K`` config file, not on argv.
    """
    _check_tls(tls)
    scheme = "pop3s" if tls == "implicit" else "pop3"
    name = server_name or host
    base = f"{scheme}://{_url_host(name)}:{port}/"
    with _private_dir("popguard-curl-", workdir) as d:
        lines = [
            f"user = {_quote(f'{user}:{password}')}",
            f"cacert = {_quote(str(cafile))}",
            "silent",
            "show-error",
            f"max-time = {timeout:g}",
            f"connect-timeout = {min(timeout, 10.0):g}",
        ]
        if tls == "stls":
            lines.append("ssl-reqd")
        if server_name:
            lines.append(f"resolve = {_quote(f'{server_name}:{port}:{host}')}")
        cfg = _write_private(d / "curl.cfg", "\n".join(lines) + "\n")
        proc = _run("curl", ["curl", "-K", str(cfg), base], timeout=timeout + 5, cwd=d)
        numbers: list[int] = []
        for line in proc.stdout.splitlines():
            parts = line.split()
            if len(parts) >= 2 and parts[0].isdigit():
                numbers.append(int(parts[0]))
        if not numbers:
            return []
        out = d / "out"
        out.mkdir()
        argv = ["curl", "--fail-early", "-K", str(cfg)]
        for n in numbers:
            argv += ["-o", str(out / f"{n:06d}"), f"{base}{n}"]
        if not keep:
            argv += ["--next", "-K", str(cfg), "--request", "DELE", "--head"]
            argv += [f"{base}{n}" for n in sorted(numbers, reverse=True)]
        _run("curl", argv, timeout=timeout + 5, cwd=d)
        messages = [(out / f"{n:06d}").read_bytes() for n in numbers]
    return _finish(messages, raw)


def fetch_with_fetchmail(
    host: str,
    port: int,
    tls: TlsMode,
    cafile: str | Path,
    user: str,
    password: str,
    *,
    keep: bool,
    timeout: float = DEFAULT_TIMEOUT,
    server_name: str | None = None,
    workdir: Path | None = None,
    raw: bool = False,
) -> list[bytes]:
    """Retrieve (and unless ``keep``, delete) every message with fetchmail.

    rcfile (mode 0600, fetchmail refuses others) with ``sslcertck`` and
    ``sslcertfile`` (which also stops fetchmail loading the system CAs); STLS is
    ``sslproto "tls1.2+"`` without ``ssl`` (this makes TLS mandatory; with neither
    option fetchmail only tries STLS opportunistically), implicit TLS is ``ssl``.
    ``fetchall`` so kept messages are fetched again, ``no rewrite`` so fetchmail does
    not edit addresses in headers, ``mda`` writes each message to a numbered file.
    ``FETCHMAILHOME`` (there is no ``--fetchmailhome`` option) keeps the pid/lock and
    id files in the temp dir.  Exit status 1 means "no mail".
    """
    _check_tls(tls)
    with _private_dir("popguard-fetchmail-", workdir) as d:
        out = d / "out"
        out.mkdir()
        mda = d / "mda.sh"
        mda.write_text(_NUMBERED_MDA)
        mda.chmod(0o700)
        ssl_opts = f"sslproto {_fm_quote('tls1.2+')} sslcertck"
        ssl_opts += f" sslcertfile {_fm_quote(str(cafile))}"
        if tls == "implicit":
            ssl_opts = "ssl " + ssl_opts
        if server_name:
            ssl_opts += f" sslcommonname {_fm_quote(server_name)}"
        rc = (
            "set no syslog\n"
            f"poll {_fm_quote(host)} service {port} protocol pop3 auth password"
            f" timeout {max(1, int(timeout))}\n"
            f"  user {_fm_quote(user)} there with password {_fm_quote(password)}"
            f" is {_fm_quote(_current_user())} here\n"
            f"  {ssl_opts}\n"
            f"  {'keep' if keep else 'no keep'} fetchall no rewrite\n"
            f"  mda {_fm_quote(f'{shlex.quote(str(mda))} {shlex.quote(str(out))}')}\n"
        )
        rcfile = _write_private(d / "fetchmailrc", rc)
        env = {
            "FETCHMAILHOME": str(d),
            # As root, fetchmail runs the MDA as the user these name.
            "FETCHMAILUSER": _current_user(),
            "HOME": str(d),
        }
        _run(
            "fetchmail",
            ["fetchmail", "-f", str(rcfile), "--nodetach", "--nosyslog", "-v"],
            timeout=timeout,
            env=env,
            cwd=d,
            ok_codes=(0, 1),
        )
        messages = _read_numbered(out)
    return _finish(messages, raw)


def fetch_with_mpop(
    host: str,
    port: int,
    tls: TlsMode,
    cafile: str | Path,
    user: str,
    password: str,
    *,
    keep: bool,
    timeout: float = DEFAULT_TIMEOUT,
    server_name: str | None = None,
    workdir: Path | None = None,
    raw: bool = False,
) -> list[bytes]:
    """Retrieve (and unless ``keep``, delete) every message with mpop.

    Config file (0600) with ``tls on``, ``tls_starttls on`` (STLS) or ``off``
    (implicit), ``tls_trust_file``, ``auth user``, ``delivery mbox`` (mboxrd),
    ``keep on|off``, ``only_new off`` and ``uidls_file`` in the temp dir.
    """
    _check_tls(tls)
    with _private_dir("popguard-mpop-", workdir) as d:
        mbox = d / "inbox.mbox"
        mbox.touch()
        lines = [
            "defaults",
            "account popguard",
            f"host {host}",
            f"port {port}",
            f"timeout {max(1, int(timeout))}",
            "tls on",
            f"tls_starttls {'on' if tls == 'stls' else 'off'}",
            f"tls_trust_file {_mpop_quote(str(cafile))}",
            "tls_certcheck on",
            "auth user",
            f"user {_mpop_quote(user)}",
            f"password {_mpop_quote(password)}",
            f"delivery mbox {_mpop_quote(str(mbox))}",
            f"keep {'on' if keep else 'off'}",
            "only_new off",
            f"uidls_file {_mpop_quote(str(d / 'uidls'))}",
        ]
        if server_name:
            lines.append(f"tls_host_override {server_name}")
        cfg = _write_private(d / "mpoprc", "\n".join(lines) + "\n")
        _run(
            "mpop",
            ["mpop", "--quiet", "-C", str(cfg), "popguard"],
            timeout=timeout + 5,
            env={"HOME": str(d), "TMPDIR": str(d)},
            cwd=d,
        )
        messages = parse_mboxrd(mbox.read_bytes())
    return _finish(messages, raw)


def fetch_with_getmail(
    host: str,
    port: int,
    tls: TlsMode,
    cafile: str | Path,
    user: str,
    password: str,
    *,
    keep: bool,
    timeout: float = DEFAULT_TIMEOUT,
    server_name: str | None = None,
    workdir: Path | None = None,
    raw: bool = False,
) -> list[bytes]:
    """Retrieve (and unless ``keep``, delete) every message with getmail6.

    ``SimplePOP3SSLRetriever`` with ``ca_certs`` (getmail then requires a valid chain
    and checks the host name, ``ssl_cert_hostname`` overriding it), an ``Mboxrd``
    destination, ``read_all = true``, ``delete = true|false``, ``--getmaildir`` in the
    temp dir.  getmail refuses to deliver as root, so as root the destination gets
    ``user = nobody`` and the mbox is owned by nobody.

    Raises :class:`UnsupportedByClient` for ``tls="stls"``: getmail6 6.18 has no
    POP3 STARTTLS (``SimplePOP3Retriever`` takes no TLS options at all).
    """
    _check_tls(tls)
    if tls == "stls":
        raise UnsupportedByClient(
            "getmail6 has no STARTTLS for POP3 (SimplePOP3Retriever is clear text only)"
        )
    with contextlib.ExitStack() as stack:
        d = stack.enter_context(_private_dir("popguard-getmail-", workdir))
        dest_user = ""
        if os.geteuid() == 0:
            # getmail refuses to deliver as root: deliver as nobody, who must be able
            # to reach the mbox (pytest's tmp_path is under a 0700 directory).
            nobody = pwd.getpwnam("nobody")
            if _traversable_by_others(d.parent):
                d.chmod(0o711)  # the rcfile inside stays 0600
                mdir = d / "mbox"
            else:
                outer = Path(stack.enter_context(tempfile.TemporaryDirectory(dir="/tmp")))
                outer.chmod(0o711)
                mdir = outer / "mbox"
            mdir.mkdir()
            mbox = mdir / "inbox"
            mbox.touch()
            for p in (mdir, mbox):
                os.chown(p, nobody.pw_uid, nobody.pw_gid)
            mdir.chmod(0o700)
            dest_user = "user = nobody\n"
        else:
            mdir = d / "mbox"
            mdir.mkdir()
            mbox = mdir / "inbox"
            mbox.touch()
        retriever = (
            "[retriever]\n"
            "type = SimplePOP3SSLRetriever\n"
            f"server = {host}\n"
            f"port = {port}\n"
            f"username = {user}\n"
            f"password = {password}\n"
            f"ca_certs = {cafile}\n"
            f"timeout = {max(1, int(timeout))}\n"
        )
        if server_name:
            retriever += f"ssl_cert_hostname = {server_name}\n"
        rc = (
            retriever
            + "\n[destination]\ntype = Mboxrd\n"
            + f"path = {mbox}\n"
            + dest_user
            + "\n[options]\n"
            + "read_all = true\n"
            + f"delete = {'false' if keep else 'true'}\n"
            + "verbose = 1\n"
            + "message_log_syslog = false\n"
        )
        _write_private(d / "getmailrc", rc)
        # getmail exits 127 when any retrieval or delivery failed (and then does not
        # delete that message), 2 on configuration and 3 on operation errors.
        _run(
            "getmail",
            ["getmail", "--getmaildir", str(d), "--rcfile", "getmailrc"],
            timeout=timeout + 5,
            env={"HOME": str(d)},
            cwd=d,
        )
        messages = parse_mboxrd(mbox.read_bytes())
    return _finish(messages, raw)


def fetch_with_poplib(
    host: str,
    port: int,
    tls: TlsMode,
    cafile: str | Path,
    user: str,
    password: str,
    *,
    keep: bool,
    timeout: float = DEFAULT_TIMEOUT,
    server_name: str | None = None,
    workdir: Path | None = None,
    raw: bool = False,
) -> list[bytes]:
    """Retrieve (and unless ``keep``, delete) every message with Python's poplib.

    ``workdir`` and ``raw`` are accepted for a uniform signature; poplib adds no
    headers, and its lines are joined with CRLF.
    """
    del workdir, raw
    _check_tls(tls)
    ctx = ssl.create_default_context(cafile=str(cafile))
    name = server_name or host
    conn: poplib.POP3
    if tls == "implicit":
        conn = _POP3SSLNamed(host, port, ctx, name, timeout)
    else:
        conn = poplib.POP3(host, port, timeout=timeout)
        if "STLS" not in conn.capa():
            conn.close()
            raise ClientError("poplib", "server does not offer STLS")
        conn.host = name  # stls() verifies the certificate against self.host
        conn.stls(ctx)
    try:
        conn.user(user)
        conn.pass_(password)
        count, _size = conn.stat()
        messages = []
        for n in range(1, count + 1):
            _resp, lines, _octets = conn.retr(n)
            messages.append(b"\r\n".join(lines) + b"\r\n")
        if not keep:
            for n in range(1, count + 1):
                conn.dele(n)
        conn.quit()
    except BaseException:
        conn.close()
        raise
    return messages


class _POP3SSLNamed(poplib.POP3_SSL):
    """POP3_SSL that verifies the certificate against ``server_name``, not ``host``."""

    def __init__(
        self, host: str, port: int, ctx: ssl.SSLContext, server_name: str, timeout: float
    ) -> None:
        self._ctx = ctx
        self._server_name = server_name
        super().__init__(host, port, context=ctx, timeout=timeout)

    def _create_socket(self, timeout: float) -> socket.socket:
        sock = socket.create_connection((self.host, self.port), timeout)
        return self._ctx.wrap_socket(sock, server_hostname=self._server_name)


CLIENTS = {
    "curl": fetch_with_curl,
    "fetchmail": fetch_with_fetchmail,
    "mpop": fetch_with_mpop,
    "getmail": fetch_with_getmail,
    "poplib": fetch_with_poplib,
}
"""Every fetch function by client name; all share one signature."""


# --------------------------------------------------------------------------------------
# Postfix


_POSTFIX_SERVICES = """\
pickup     unix  n - n 60 1 pickup
cleanup    unix  n - n -  0 cleanup
qmgr       unix  n - n 300 1 qmgr
rewrite    unix  - - n -  - trivial-rewrite
bounce     unix  - - n -  0 bounce
defer      unix  - - n -  0 bounce
trace      unix  - - n -  0 bounce
verify     unix  - - n -  1 verify
flush      unix  n - n 1000? 0 flush
proxymap   unix  - - n -  - proxymap
proxywrite unix  - - n -  1 proxymap
smtp       unix  - - n -  - smtp
relay      unix  - - n -  - smtp
showq      unix  n - n -  - showq
error      unix  - - n -  - error
retry      unix  - - n -  - error
discard    unix  - - n -  - discard
lmtp       unix  - - n -  - lmtp
anvil      unix  - - n -  1 anvil
scache     unix  - - n -  1 scache
postlog    unix-dgram n - n - 1 postlogd
"""

_QUEUE_DIRS = ("maildrop", "incoming", "active", "deferred", "hold")


@dataclass
class PostfixInstance:
    """A private Postfix started by :func:`start_postfix_to_lmtp`."""

    root: Path
    config_dir: Path
    queue_dir: Path
    data_dir: Path
    maillog: Path
    smtp_host: str
    smtp_port: int
    lmtp_host: str
    lmtp_port: int
    domain: str
    workdir: Path
    _remove_root: bool = field(default=False, repr=False)
    _stopped: bool = field(default=False, repr=False)

    def log_text(self) -> str:
        try:
            return self.maillog.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def sent_count(self) -> int:
        return len(re.findall(r"\bstatus=sent\b", self.log_text()))

    def queue_files(self) -> list[Path]:
        files: list[Path] = []
        for name in _QUEUE_DIRS:
            qdir = self.queue_dir / name
            if qdir.is_dir():
                files += [p for p in qdir.rglob("*") if p.is_file()]
        return files

    def queue_is_empty(self) -> bool:
        return not self.queue_files()

    def master_pid(self) -> int | None:
        try:
            return int((self.queue_dir / "pid" / "master.pid").read_text().split()[0])
        except (FileNotFoundError, ValueError, IndexError):
            return None

    def stop(self, *, timeout: float = 10.0) -> None:
        """Stop this instance (and only it), wait for its master, remove its dirs.

        The maillog is kept (copied to ``workdir`` when the instance lived elsewhere).
        """
        if self._stopped:
            return
        self._stopped = True
        pid = self.master_pid()
        with contextlib.suppress(Exception):
            subprocess.run(
                [_postfix_cmd(), "-c", str(self.config_dir), "stop"],
                capture_output=True,
                timeout=timeout,
                check=False,
            )
        if pid is not None:
            deadline = time.monotonic() + timeout
            while _pid_alive(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if _pid_alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        if self._remove_root:
            with contextlib.suppress(OSError):
                shutil.copyfile(self.maillog, self.workdir / "postfix-maillog")
            self.maillog = self.workdir / "postfix-maillog"
            shutil.rmtree(self.root, ignore_errors=True)
            link = self.workdir / "postfix"
            if link.is_symlink():
                link.unlink()
        else:
            for d in (self.queue_dir, self.data_dir):
                shutil.rmtree(d, ignore_errors=True)

    def __enter__(self) -> PostfixInstance:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (exited, not yet reaped) still answers kill(0).
    try:
        status = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return status != "Z"


def _postfix_cmd() -> str:
    exe = shutil.which("postfix", path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
    if exe is None:
        raise ClientError("postfix", "postfix not installed (scripts/install-test-deps.sh)")
    return exe


def _traversable_by_others(path: Path) -> bool:
    """True when every directory from / to ``path`` has the o+x bit."""
    p = path.resolve()
    return all(d.stat().st_mode & stat.S_IXOTH for d in [p, *p.parents])


def _smtp_host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def start_postfix_to_lmtp(
    workdir: Path,
    smtp_host: str,
    smtp_port: int,
    lmtp_host: str,
    lmtp_port: int,
    domain: str,
    *,
    timeout: float = 20.0,
    more_lmtp_hops: Sequence[tuple[str, int]] = (),
    extra_main_cf: str = "",
) -> PostfixInstance:
    """Start a private Postfix that relays mail for ``domain`` over LMTP.

    ``more_lmtp_hops`` are further LMTP next hops after ``lmtp_host:lmtp_port``, tried in
    order when one does not answer (Postfix 3.5's list of next hops). ``extra_main_cf``
    is appended to main.cf (recipient checks, ...).

    Runs as root (``postfix start`` needs it).  The instance has its own
    ``config_directory`` (``postfix -c DIR``: root may use any directory, no
    ``alternate_config_directories`` or postmulti needed), ``queue_directory`` and
    ``data_directory`` (owned by postfix; the queue's subdirectories are made by
    ``postfix start``'s own ``create-missing`` check).  SMTP listens only on
    ``smtp_host:smtp_port`` (an explicit master.cf address, so any 127/8 address
    works; ``inet_interfaces = loopback-only`` because Postfix requires that value to
    name configured interface addresses).  ``relay_domains = domain`` with
    ``relay_transport = lmtp:[lmtp_host]:lmtp_port``; everything else is
    rejected at RCPT, there is no local delivery, no DNS
    (``*_dns_support_level = disabled``, ``*_host_lookup = native``), and the log
    goes to ``maillog_file`` (via postlogd).  Retries are fast (1-2 s backoff).

    Postfix daemons run as the postfix user and must be able to reach these
    directories, so when ``workdir`` is not world-traversable (pytest's tmp_path is
    under a 0700 directory) the instance lives in a fresh directory under /tmp
    instead, linked from ``workdir/postfix``, and is removed by ``stop()``.
    """
    if os.geteuid() != 0:
        raise ClientError("postfix", "a private Postfix instance needs root")
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    remove_root = False
    if _traversable_by_others(workdir):
        root = workdir / "postfix"
        root.mkdir()
    else:
        root = Path(tempfile.mkdtemp(prefix="popguard-postfix-", dir="/tmp"))
        remove_root = True
        with contextlib.suppress(OSError):
            (workdir / "postfix").symlink_to(root)
    root.chmod(0o755)
    config_dir, queue_dir, data_dir = root / "etc", root / "spool", root / "data"
    for d in (config_dir, queue_dir, data_dir):
        d.mkdir()
        d.chmod(0o755)
    pf = pwd.getpwnam("postfix")
    os.chown(data_dir, pf.pw_uid, pf.pw_gid)
    data_dir.chmod(0o700)
    maillog = root / "maillog"
    # Postfix reads "inet:" on a list's first next hop only; TCP is the LMTP client's
    # default, so every hop is written without it.
    hops = [(lmtp_host, lmtp_port), *more_lmtp_hops]
    relay = "lmtp:" + ", ".join(f"[{host}]:{port}" for host, port in hops)
    main_cf = (
        f"""\
compatibility_level = 3.6
queue_directory = {queue_dir}
data_directory = {data_dir}
mail_owner = postfix
setgid_group = postdrop
syslog_name = postfix-popguard
maillog_file = {maillog}
maillog_file_prefixes = {root}
myhostname = postfix.popguard.invalid
mydomain = popguard.invalid
myorigin = $myhostname
mydestination =
local_recipient_maps =
local_transport = error:5.1.1 local delivery is disabled
alias_maps =
alias_database =
inet_interfaces = loopback-only
inet_protocols = {"ipv6" if ":" in smtp_host else "ipv4"}
mynetworks = 127.0.0.0/8 [::1]/128
relay_domains = {domain}
relay_transport = {relay}
default_transport = error:5.3.0 only {domain} is delivered here
smtpd_relay_restrictions = reject_unauth_destination
smtpd_recipient_restrictions =
disable_dns_lookups = yes
smtp_dns_support_level = disabled
lmtp_dns_support_level = disabled
smtp_host_lookup = native
lmtp_host_lookup = native
smtpd_peername_lookup = no
biff = no
queue_run_delay = 1s
minimal_backoff_time = 1s
maximal_backoff_time = 2s
lmtp_connect_timeout = 5s
"""
        + extra_main_cf
    )
    master_cf = (
        f"{_smtp_host_port(smtp_host, smtp_port)} inet n - n - - smtpd\n" + _POSTFIX_SERVICES
    )
    (config_dir / "main.cf").write_text(main_cf)
    (config_dir / "master.cf").write_text(master_cf)
    inst = PostfixInstance(
        root=root,
        config_dir=config_dir,
        queue_dir=queue_dir,
        data_dir=data_dir,
        maillog=maillog,
        smtp_host=smtp_host,
        smtp_port=smtp_port,
        lmtp_host=lmtp_host,
        lmtp_port=lmtp_port,
        domain=domain,
        workdir=workdir,
        _remove_root=remove_root,
    )
    proc = subprocess.run(
        [_postfix_cmd(), "-c", str(config_dir), "start"],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if proc.returncode != 0:
        log = inst.log_text()
        inst.stop()
        raise ClientError(
            "postfix",
            "start failed",
            returncode=proc.returncode,
            output=(proc.stdout + proc.stderr + log).strip(),
        )
    # `postfix start` returns once master runs; wait until smtpd's port accepts.
    deadline = time.monotonic() + timeout
    while True:
        try:
            with smtplib.SMTP(smtp_host, smtp_port, timeout=2) as s:
                s.noop()
            break
        except OSError as exc:
            if time.monotonic() > deadline:
                log = inst.log_text()
                inst.stop()
                raise ClientError(
                    "postfix", f"SMTP port never answered: {exc}", output=log
                ) from exc
            time.sleep(0.05)
    return inst


def send_via_smtp(
    host: str,
    port: int,
    mail_from: str,
    to: str | Sequence[str],
    message: bytes,
    *,
    timeout: float = 10.0,
) -> None:
    """Submit one message over plain SMTP (smtplib); raises if any recipient fails."""
    rcpts = [to] if isinstance(to, str) else list(to)
    with smtplib.SMTP(host, port, timeout=timeout) as s:
        refused = s.sendmail(mail_from, rcpts, message)
    if refused:
        raise smtplib.SMTPRecipientsRefused(refused)


def wait_for_postfix_delivery(
    handle: PostfixInstance, count: int, timeout: float = 15.0
) -> list[str]:
    """Wait until the maillog shows ``status=sent`` for ``count`` deliveries.

    Returns those log lines.  Raises ``TimeoutError`` (with the log) otherwise; a
    ``status=bounced`` line fails at once, as the message will never be sent.
    """
    deadline = time.monotonic() + timeout
    while True:
        log = handle.log_text()
        sent = [line for line in log.splitlines() if "status=sent" in line]
        if len(sent) >= count:
            return sent
        if "status=bounced" in log:
            raise AssertionError(f"Postfix bounced a message:\n{log[-4000:]}")
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"{len(sent)}/{count} deliveries after {timeout:g}s; queue holds "
                f"{len(handle.queue_files())} files\n{log[-4000:]}"
            )
        time.sleep(0.05)
