"""The organization's configuration file, DATA/popguard.toml: one typed model.

Every section is optional and the defaults need no file at all:

- `[faults]`: whether `inject-fault` may act (off by default: a production
  service must not be breakable by a typo).
- `[escalation]`: where alerts go once the responders could not repair
  something: e-mail over SMTP and an Alertmanager-compatible JSON webhook, and how
  often one problem may be sent again.
- `[[servers]]`, `[[databases]]`, `[demo]`: the topology `popguard up` starts;
  without them, the organization of DESIGN.md section 3 (cas1, mbx1, mbx2, DB01,
  DB02).

An unknown key or a bad value is refused with one line naming it and the file.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import UserError

CONFIG_FILE = "popguard.toml"


def config_file(data: Path) -> Path:
    return data / CONFIG_FILE


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Faults(Section):
    enabled: bool = False


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
            if "@" not in address or any(c.isspace() for c in address):
                raise ValueError(f"not an e-mail address: {address!r}")
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
    repeat_interval: float = Field(default=3600.0, ge=0)
    send_resolved: bool = True


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
    faults: Faults = Faults()
    escalation: Escalation = Escalation()
    servers: tuple[ServerEntry, ...] = ()
    databases: tuple[DatabaseEntry, ...] = ()
    demo: Demo = Demo()


def parse_config(text: str, source: str) -> Config:
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"{source}: not valid TOML: {exc}") from None
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "file"
        raise UserError(f"{source}: {where}: {first['msg']}") from None


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
