"""The organization's configuration file, DATA/popguard.toml: one typed model.

Every section is optional and the defaults need no file at all:

- `[directory]`: where the directory lives (directory/location.py): SQLite in the
  data folder when absent, PostgreSQL with `url`.
- `[faults]`: whether `inject-fault` may act (off by default: a production
  service must not be breakable by a typo).
- `[escalation]`: where alerts go once the responders could not repair
  something: e-mail over SMTP and an Alertmanager-compatible JSON webhook, and how
  often one problem may be sent again.
- `[store]`: how soon deleted mail leaves every file of a copy (`forget_interval`),
  and how far a copy may fall behind before it is reseeded from a snapshot instead
  of the log being kept for it (`max_copy_lag_seconds`, `max_copy_lag_bytes`).
- `[delivery]`: `quota_full_tempfail`, whether mail for a mailbox over its quota is
  refused for good (552 5.2.2, the default) or for now (452 4.2.2).
- `[active_manager]`: `enabled`, the automatic failover of a mailbox server whose
  lease lapsed (by default on with a PostgreSQL directory, off with SQLite), and
  `synchronous_copy`: acknowledgements wait for a passive copy (on by default).
- `[[servers]]`, `[[databases]]`, `[demo]`: the topology `popguard up` starts;
  without servers, the organization of DESIGN.md section 3 (cas1, mbx1, mbx2, DB01,
  DB02).

An unknown key or a bad value is refused with one line naming it and the file, and
so is a topology that cannot run: no front end or no mailbox server, a name or an
address used twice, a copy on a server that is not a mailbox server of the file,
a demo mailbox in a database the file does not have.
"""

from __future__ import annotations

import ipaddress
import os
import tempfile
import tomllib
from pathlib import Path
from typing import Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from popguard.directory.directory import normalize_address
from popguard.directory.location import DirectorySection
from popguard.errors import UserError

CONFIG_FILE = "popguard.toml"


def config_file(data: Path) -> Path:
    return data / CONFIG_FILE


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Faults(Section):
    enabled: bool = False


class Host(Section):
    # `restart-server --reboot-host` reboots the machine (under systemd) only when this
    # is true: a host runs more than one logical server.
    allow_reboot: bool = False


class EmailEscalation(Section):
    """Alerts as e-mail, one message per alert with its whole history."""

    smtp_host: str = "127.0.0.1"
    smtp_port: int = Field(default=25, ge=1, le=65535)
    sender: str = Field(default="popguard@localhost", alias="from")
    to: tuple[str, ...] = Field(min_length=1)
    starttls: bool = False
    username: str | None = None
    # A file holding the SMTP password (not the password itself: this file is
    # readable by every service of the organization).
    password_file: Path | None = None
    timeout: float = Field(default=10.0, gt=0, le=120)

    @field_validator("to")
    @classmethod
    def _addresses(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for address in value:
            _address(address)
        return value

    @field_validator("sender")
    @classmethod
    def _sender(cls, value: str) -> str:
        return _address(value)

    @model_validator(mode="after")
    def _no_password_in_clear(self) -> EmailEscalation:
        if self.username is not None and not self.starttls:
            raise ValueError("SMTP AUTH (username) needs starttls = true: no password in clear")
        return self


def _address(value: str) -> str:
    if "@" not in value or any(c.isspace() or not c.isprintable() for c in value):
        raise ValueError(f"not an e-mail address: {value!r}")
    return value


class WebhookEscalation(Section):
    """Alerts POSTed as JSON in the payload format of Alertmanager's webhook receiver."""

    url: str = Field(pattern=r"^https?://")
    timeout: float = Field(default=10.0, gt=0, le=120)
    receiver: str = "popguard"


class Escalation(Section):
    email: EmailEscalation | None = None
    webhook: WebhookEscalation | None = None
    # Alertmanager's repeat_interval: one problem (server, monitor, resource) is sent
    # again no sooner than this, in seconds.
    repeat_interval: float = Field(default=3600.0, gt=0)
    send_resolved: bool = True


class ActiveManagerSection(Section):
    # Automatic failover of a dead mailbox server's active copies (replication/
    # active_manager.py), and with it every mailbox server fencing itself when it
    # cannot renew its lease. Unset: on for an organization whose directory is on
    # PostgreSQL (one that may span hosts, where a host can die while the others
    # live), off for the one-machine SQLite directory (where the host that dies takes
    # every copy with it, and fencing would only add ways to stop serving).
    enabled: bool | None = None
    # A delivery's 250 and a QUIT's +OK wait until a passive copy holds the change
    # (replication/synchronous.py), so a failover loses nothing acknowledged; off, they
    # wait for the active copy's own disk only, and no copy is ever synchronous.
    synchronous_copy: bool = True


class Store(Section):
    # Seconds between two runs of each copy's forgetting (log trimming, free pages given
    # back, WAL checkpointed and truncated). Deleted mail is in no file of a copy at
    # most this long after the copy applied the deletion. 60 s: a privacy promise
    # measured in one minute, for the cost of one checkpoint (an fsync) a minute per
    # copy; at most 300 s ("a few minutes").
    forget_interval: float = Field(default=60.0, gt=0, le=300)
    # A copy whose oldest unapplied change is older than this, or that would need more
    # than max_copy_lag_bytes shipped to catch up, is marked FailedAndSuspended and
    # reseeded from a snapshot, and the log is no longer kept for it. A day covers a
    # server down for maintenance; the log holds no messages, so a day of it is small.
    max_copy_lag_seconds: float = Field(default=86400.0, gt=0)
    max_copy_lag_bytes: int = Field(default=1024**3, gt=0)


class DeliverySection(Section):
    # Mail that would put a mailbox over its ProhibitSendReceiveQuota: 552 5.2.2 (the
    # MTA bounces it) or, with this true, 452 4.2.2 (the MTA keeps it and tries again,
    # for as long as its queue lifetime, while the user makes room). Dovecot's name.
    quota_full_tempfail: bool = False


class ServerEntry(Section):
    name: str = Field(pattern=r"^[A-Za-z][A-Za-z0-9-]{0,62}$")
    roles: tuple[Literal["frontend", "mailbox"], ...] = Field(min_length=1)
    address: str


class DatabaseEntry(Section):
    name: str = Field(pattern=r"^[A-Za-z][A-Za-z0-9_-]{0,62}$")
    # Mailbox servers holding a copy, in activation preference: the first is active.
    copies: tuple[str, ...] = Field(min_length=1)


class Demo(Section):
    address: str = "demo@popguard.test"
    database: str | None = None  # default: the first database


class Config(Section):
    directory: DirectorySection = DirectorySection()
    faults: Faults = Faults()
    host: Host = Host()
    escalation: Escalation = Escalation()
    store: Store = Store()
    delivery: DeliverySection = DeliverySection()
    active_manager: ActiveManagerSection = ActiveManagerSection()
    servers: tuple[ServerEntry, ...] = ()
    databases: tuple[DatabaseEntry, ...] = ()
    demo: Demo = Demo()

    @property
    def active_manager_on(self) -> bool:
        """`[active_manager] enabled`, or by default whether the directory is PostgreSQL."""
        if self.active_manager.enabled is not None:
            return self.active_manager.enabled
        return self.directory.url is not None


def parse_config(text: str, source: str) -> Config:
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"{source}: not valid TOML: {exc}") from None
    try:
        config = Config.model_validate(raw)
    except ValidationError as exc:
        raise UserError(f"{source}: {_first_error(exc)}") from None
    check_topology(config, source)
    return config


def check_topology(config: Config, source: str) -> None:
    """A topology `popguard up` can start, or one line naming the key that is wrong.

    Names are compared case-insensitively, as the directory compares them; addresses
    as IP addresses, so two spellings of one address are one address.
    """

    def refuse(where: str, why: str) -> UserError:
        return UserError(f"{source}: {where}: {_one_line(why)}")

    try:
        normalize_address(config.demo.address)
    except UserError as exc:
        raise refuse("demo.address", str(exc)) from None
    if not config.servers:
        if config.databases:
            raise refuse(
                "databases", "[[databases]] need the [[servers]] that hold them in the same file"
            )
        return  # the default organization
    roles: dict[str, tuple[str, ...]] = {}
    addresses: dict[ipaddress.IPv4Address | ipaddress.IPv6Address, str] = {}
    for index, server in enumerate(config.servers):
        if server.name.lower() in roles:
            raise refuse(f"servers.{index}.name", f"server {server.name} is named twice")
        roles[server.name.lower()] = server.roles
        try:
            address = ipaddress.ip_address(server.address)
        except ValueError:
            raise refuse(
                f"servers.{index}.address", f"not an IP address: {server.address!r}"
            ) from None
        if address in addresses:
            raise refuse(
                f"servers.{index}.address",
                f"{server.name}'s address {server.address} is also {addresses[address]}'s",
            )
        addresses[address] = server.name
    for role, what in (("frontend", "front end"), ("mailbox", "mailbox server")):
        if not any(role in server_roles for server_roles in roles.values()):
            raise refuse("servers", f"no {what}: no server has the {role} role")
    if not config.databases:
        raise refuse("databases", "no [[databases]]: the demo mailbox needs one")
    databases: set[str] = set()
    for index, database in enumerate(config.databases):
        if database.name.lower() in databases:
            raise refuse(f"databases.{index}.name", f"database {database.name} is named twice")
        databases.add(database.name.lower())
        seen: set[str] = set()
        for holder in database.copies:
            where = f"databases.{index}.copies"
            if holder.lower() not in roles:
                raise refuse(where, f"{holder} is not a server of this file")
            if "mailbox" not in roles[holder.lower()]:
                raise refuse(where, f"{holder} is not a mailbox server")
            if holder.lower() in seen:
                raise refuse(where, f"{database.name} has two copies on {holder}")
            seen.add(holder.lower())
    if config.demo.database is not None and config.demo.database.lower() not in databases:
        raise refuse("demo.database", f"{config.demo.database} is not a database of this file")


def _first_error(exc: ValidationError) -> str:
    """'key.path: what is wrong', on one line."""
    first = exc.errors()[0]
    where = ".".join(str(part) for part in first["loc"]) or "file"
    return f"{_one_line(where)}: {_one_line(first['msg'])}"


def _one_line(text: str) -> str:
    """An error is one line: a name from the file with a newline in it is shown escaped."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def load_escalation(data: Path) -> Escalation:
    """The [escalation] section alone: a mistake elsewhere in the file (a topology
    typo, say) must not silence alerts."""
    path = config_file(data)
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        return Escalation()
    except OSError as exc:
        raise UserError(f"{path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"{path}: not valid TOML: {exc}") from None
    try:
        return Escalation.model_validate(raw.get("escalation", {}))
    except ValidationError as exc:
        raise UserError(f"{path}: escalation.{_first_error(exc)}") from None


def load_config(data: Path) -> Config:
    """DATA/popguard.toml, or the defaults when there is none."""
    path = config_file(data)
    try:
        text = path.read_text()
    except FileNotFoundError:
        return Config()
    except OSError as exc:
        raise UserError(f"{path}: {exc.strerror}") from None
    return parse_config(text, str(path))


def install_config(data: Path, text: str, source: str, replace: bool = False) -> Path:
    """Make `text` DATA/popguard.toml, whole or not at all (services read it any time).

    An existing file with other content is kept unless `replace`: it may hold
    settings (faults, escalation) the new file would drop without a word.
    """
    path = config_file(data)
    try:
        current: str | None = path.read_text()
    except FileNotFoundError:
        current = None
    except OSError as exc:
        raise UserError(f"{path}: {exc.strerror}") from None
    if current == text:
        return path
    if current is not None and not replace:
        raise UserError(
            f"{path} already exists and differs from {source} (--replace-config replaces it)"
        )
    data.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=data, prefix=".popguard.toml.")
    try:
        with os.fdopen(fd, "w") as out:
            out.write(text)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path
