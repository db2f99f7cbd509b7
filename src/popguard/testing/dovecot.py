"""Start a private Dovecot POP3 server for a test or a benchmark, and stop it again.

Each instance lives in its own temporary directory: its own config file (passed with
`dovecot -c FILE`), base_dir, state_dir, log files, passwd-file and maildirs, on a
loopback address and port of its own, so it never touches the system's Dovecot and
two instances never see each other.

Two profiles, as in Dovecot's performance tuning guide:

- `default`: stock service settings. Every login is handled by a fresh pop3-login
  process (service_count = 1, "high-security mode") and every session by a fresh
  pop3 process.
- `highperf`: pop3-login processes serve many connections each (service_count = 0)
  and are kept ready (process_min_avail = number of cores); pop3 processes are
  reused for many sessions; the limits are raised so that 64 clients fit.

An instance can also be a proxy (`mail=False`, `passdb_extra="proxy=y host=..."`):
its passdb verifies the password and hands the session on to another instance;
`extra_config` adds settings such as login_trusted_networks or ssl_client_ca_file.
With `certificate`, it serves that certificate (signed by a CA of the caller's) instead
of a self-signed one; with `ssl_required`, no login before STLS or implicit TLS.

The mail is written straight into the maildirs. The same message files are
hard-linked into every user's maildir: the content is identical per user and this
keeps 128 users x 4 MiB from costing 512 MiB of disk and page cache per instance.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from popguard.testing.net import free_port, wait_for_greeting, wait_port
from popguard.testing.processes import Started, remove_unless_kept, wait_or_kill_group

PROFILES = ("default", "highperf")
MAIL_USER = "mail"  # a system user that exists on Debian; owns the maildirs
DOVECOT = "/usr/sbin/dovecot"
DOVEADM = "/usr/bin/doveadm"

_BASE_CONFIG = """\
# Written by popguard.testing.dovecot for one run; nothing here is read from /etc.
base_dir = {root}/run
state_dir = {root}/state
instance_name = {instance}
protocols = pop3
listen = {address}
log_path = {root}/log/dovecot.log
info_log_path = {root}/log/dovecot-info.log
ssl = {ssl}
{ssl_files}
disable_plaintext_auth = no
auth_mechanisms = plain login
mail_location = maildir:~/Maildir
mail_uid = {uid}
mail_gid = {gid}
first_valid_uid = {uid}
last_valid_uid = {uid}
first_valid_gid = {gid}
last_valid_gid = {gid}

passdb {{
  driver = passwd-file
  args = {root}/passwd
}}
userdb {{
  driver = passwd-file
  args = {root}/passwd
}}

service pop3-login {{
  inet_listener pop3 {{
    address = {address}
    port = {port}
  }}
  inet_listener pop3s {{
    address = {address}
    port = {tls_port}
  }}
{login_extra}}}
{extra}"""

# Dovecot's "high-performance mode": login processes that serve many connections,
# kept ready; pop3 processes reused; limits high enough for 64 clients and more.
_HIGHPERF_LOGIN = """\
  service_count = 0
  process_min_avail = {cores}
  vsz_limit = 1G
  client_limit = 1000
"""
_HIGHPERF_REST = """\
service pop3 {{
  service_count = 1000
  process_min_avail = {cores}
  process_limit = 1024
}}
default_process_limit = 1024
default_client_limit = 4000
protocol pop3 {{
  mail_max_userip_connections = 100
}}
"""


def hash_password(password: str, scheme: str) -> str:
    """The passwd-file form of the password: {PLAIN}... or a hash made by doveadm."""
    if scheme.upper() == "PLAIN":
        return "{PLAIN}" + password
    out = subprocess.run(
        [DOVEADM, "pw", "-s", scheme, "-p", password],
        check=True,
        capture_output=True,
        text=True,
        timeout=30,
    )
    return out.stdout.strip()


# Key types for the throw-away certificate: RSA 2048 (the default) or ECDSA P-256
# (what popguard's own certificates use; a handshake costs the server far less CPU).
KEY_TYPES = {
    "rsa:2048": ["-newkey", "rsa:2048"],
    "ec-p256": ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"],
}


def _self_signed(root: Path, address: str, key_type: str = "rsa:2048") -> tuple[Path, Path]:
    """A throw-away certificate for `address` (it is its own CA for the client)."""
    cert, key = root / "tls" / "cert.pem", root / "tls" / "key.pem"
    cert.parent.mkdir()
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            *KEY_TYPES[key_type],
            "-nodes",
            "-days",
            "2",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-subj",
            f"/CN={address}",
            "-addext",
            f"subjectAltName=IP:{address}",
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return cert, key


@dataclass(frozen=True)
class Certificate:
    """A server certificate and its key, and the CA file a client verifies it with."""

    ca_file: Path
    cert_file: Path
    key_file: Path


class Dovecot(Started):
    """One Dovecot instance; a context manager that always stops what it started."""

    def __init__(
        self,
        profile: str,
        address: str,
        users: Sequence[str],
        password: str,
        messages: Sequence[bytes],
        scheme: str = "PLAIN",
        tls: bool = False,
        workdir: Path | None = None,
        *,
        mail: bool = True,
        passdb_extra: str = "",
        extra_config: str = "",
        name: str | None = None,
        key_type: str = "rsa:2048",
        certificate: Certificate | None = None,
        ssl_required: bool = False,
    ) -> None:
        """`mail=False`: no maildirs (a proxy's users live elsewhere); `passdb_extra`:
        extra fields for every user's passwd-file line (e.g. "proxy=y host=A port=P");
        `extra_config`: appended to dovecot.conf; `name`: shown in the instance name
        and the temporary directory's (the profile by default); `key_type`: of the
        self-signed certificate when `tls` (see KEY_TYPES); `certificate`: served instead
        of a self-signed one; `ssl_required`: refuse logins without TLS."""
        if profile not in PROFILES:
            raise ValueError(f"unknown profile {profile!r}, expected one of {PROFILES}")
        if key_type not in KEY_TYPES:
            raise ValueError(f"unknown key type {key_type!r}, expected one of {list(KEY_TYPES)}")
        self.profile = profile
        self.address = address
        self.users = list(users)
        self.password = password
        self.messages = list(messages)
        self.scheme = scheme
        self.tls = tls
        self.workdir = workdir
        self.mail = mail
        self.passdb_extra = passdb_extra
        self.extra_config = extra_config
        self.name = name or profile
        self.key_type = key_type
        self.certificate = certificate
        self.ssl_required = ssl_required
        self.root = Path()
        self.config = Path()
        self.port = 0
        self.tls_port = 0
        self.ca_file: Path | None = None
        self.proc: subprocess.Popen[bytes] | None = None

    # -- setup ---------------------------------------------------------------------

    def maildir(self, user: str) -> Path:
        return self.root / "mail" / user / "Maildir"

    def _write_mail(self, uid: int, gid: int) -> None:
        """Maildirs for every user, the message files hard-linked from one copy."""
        store = self.root / "messages"
        store.mkdir()
        originals: list[tuple[Path, str]] = []
        for i, data in enumerate(self.messages):
            # Dovecot reads the sizes from S= (physical) and W= (virtual, CRLF) in the
            # file name, so STAT and LIST need not open the files; the ":2,S" flags
            # mark them as seen, as they are after the first RETR anyway.
            size = len(data)
            name = f"{1700000000 + i}.M{i}P1.bench,S={size},W={size}:2,S"
            path = store / name
            path.write_bytes(data)
            originals.append((path, name))
        for user in self.users:
            maildir = self.maildir(user)
            for sub in ("cur", "new", "tmp"):
                (maildir / sub).mkdir(parents=True)
            for path, name in originals:
                os.link(path, maildir / "cur" / name)
        _chown_tree(self.root / "mail", uid, gid)
        for path, _name in originals:
            os.chown(path, uid, gid)

    def _write_config(self, uid: int, gid: int) -> None:
        cores = os.cpu_count() or 1
        login_extra, extra = "", ""
        if self.profile == "highperf":
            login_extra = _HIGHPERF_LOGIN.format(cores=cores)
            extra = _HIGHPERF_REST.format(cores=cores)
        extra += self.extra_config
        ssl_files, ssl = "", "no"
        if self.tls:
            if self.certificate is None:
                cert, key = _self_signed(self.root, self.address, self.key_type)
                self.ca_file = cert
            else:
                cert, key = self.certificate.cert_file, self.certificate.key_file
                self.ca_file = self.certificate.ca_file
            ssl_files = f"ssl_cert = <{cert}\nssl_key = <{key}"
            ssl = "required" if self.ssl_required else "yes"
        self.config.write_text(
            _BASE_CONFIG.format(
                root=self.root,
                instance=f"popbench-{self.name}-{self.port}",
                address=self.address,
                port=self.port,
                uid=uid,
                gid=gid,
                tls_port=self.tls_port if self.tls else 0,
                ssl=ssl,
                ssl_files=ssl_files,
                login_extra=login_extra,
                extra=extra,
            )
        )
        hashed = hash_password(self.password, self.scheme)
        # passwd-file: user:password:uid:gid:gecos:home:shell:extra; uid/gid come from
        # mail_uid/mail_gid; the extra fields are space-separated key=value pairs.
        lines = [f"{u}:{hashed}::::{self.root}/mail/{u}::{self.passdb_extra}" for u in self.users]
        (self.root / "passwd").write_text("\n".join(lines) + "\n")

    def start(self) -> None:
        mail = pwd.getpwnam(MAIL_USER)
        self.root = Path(
            tempfile.mkdtemp(prefix=f"popbench-dovecot-{self.name}-", dir=self.workdir)
        )
        # mkdtemp makes the directory 0700; the mail user must be able to reach the
        # maildirs and Dovecot's unprivileged processes the run directory and the
        # passwd-file, whatever umask the caller runs under (popguard's is 077).
        self.root.chmod(0o755)
        previous = os.umask(0o022)
        try:
            for sub in ("run", "state", "log"):
                (self.root / sub).mkdir()
            self.config = self.root / "dovecot.conf"
            self.port = free_port(self.address)
            self.tls_port = free_port(self.address) if self.tls else 0
            if self.mail:
                self._write_mail(mail.pw_uid, mail.pw_gid)
            self._write_config(mail.pw_uid, mail.pw_gid)
        finally:
            os.umask(previous)
        # -F keeps the master in the foreground, so we hold its pid and can always
        # stop it; a new session keeps a Ctrl-C in the terminal from reaching it.
        self.proc = subprocess.Popen(
            [DOVECOT, "-F", "-c", str(self.config)],
            stdout=open(self.root / "log" / "master.out", "wb"),  # noqa: SIM115
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            wait_for_greeting(self.address, self.port)
            if self.tls:
                wait_port(self.address, self.tls_port)
        except Exception:
            self.stop()
            raise RuntimeError(f"Dovecot did not start:\n{self.log_tail()}") from None

    def fill(self, user: str, messages: Iterable[bytes], *, sizes_in_names: bool = False) -> None:
        """Replace `user`'s mailbox with these messages, while the server runs.

        `sizes_in_names`: S= and W= in the file names, as Dovecot names the files it
        saves itself, so that STAT and LIST need not open them; only for messages with
        CRLF line ends (their virtual size is their size)."""
        mail = pwd.getpwnam(MAIL_USER)
        maildir = self.maildir(user)
        for sub in ("cur", "new", "tmp"):
            shutil.rmtree(maildir / sub, ignore_errors=True)
            (maildir / sub).mkdir(parents=True)
        for i, content in enumerate(messages, start=1):
            # Without S=/W= by default: a test's message may end its lines in a bare
            # LF, and then only Dovecot can count its virtual (CRLF) size.
            sizes = f",S={len(content)},W={len(content)}" if sizes_in_names else ""
            name = f"{1700000000 + i}.M{i}P1.popguard-test{sizes}:2,"
            (maildir / "cur" / name).write_bytes(content)
        _chown_tree(self.root / "mail", mail.pw_uid, mail.pw_gid)

    def files(self, user: str) -> list[Path]:
        """The message files in `user`'s maildir."""
        maildir = self.maildir(user)
        return [path for sub in ("cur", "new") for path in (maildir / sub).iterdir()]

    @property
    def pids(self) -> list[int]:
        """The master's pid: every Dovecot process descends from it."""
        return [self.proc.pid] if self.proc else []

    def log_tail(self, lines: int = 20) -> str:
        text = ""
        for name in ("master.out", "dovecot.log"):
            path = self.root / "log" / name
            if path.exists():
                text += "".join(path.read_text(errors="replace").splitlines(True)[-lines:])
        return text

    def error_count(self) -> int:
        """Lines in Dovecot's error log (warnings, errors, fatals)."""
        path = self.root / "log" / "dovecot.log"
        return len(path.read_text(errors="replace").splitlines()) if path.exists() else 0

    # -- teardown ------------------------------------------------------------------

    def stop(self) -> None:
        """Stop the master (doveadm stop, then signals) and remove the directory."""
        proc, self.proc = self.proc, None
        if proc is not None:
            if proc.poll() is None:
                with contextlib.suppress(subprocess.SubprocessError, OSError):
                    subprocess.run(
                        [DOVEADM, "-c", str(self.config), "stop"], capture_output=True, timeout=15
                    )
            wait_or_kill_group(proc)
        remove_unless_kept(self.root)


def _chown_tree(top: Path, uid: int, gid: int) -> None:
    for dirpath, _dirs, files in os.walk(top):
        os.chown(dirpath, uid, gid)
        for name in files:
            os.chown(os.path.join(dirpath, name), uid, gid)
