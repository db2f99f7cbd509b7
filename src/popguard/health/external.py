"""POP3 servers popguard did not build (a Dovecot, say), watched by the same probes.

`DATA/health/external.toml` lists them; each entry names the popguard server whose
health service watches it. The probes marked `external = true` in the health-set
files (PopSelfTestProbe, PopDeepTestProbe) then run against it too, with its name
as TargetResource, and their monitors alert on it as on popguard's own back end.

    [[pop3_servers]]
    name = "dovecot1"               # TargetResource
    host = "127.0.9.5"
    port = 995
    tls = "tls"                     # tls | stls | plain
    credentials_file = "/etc/popguard/dovecot1.creds"   # line 1 user, line 2 password
    ca_file = "/etc/ssl/dovecot-ca.pem"                 # to verify its certificate
    watched_by = "mbx1"
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError

from popguard.errors import UserError
from popguard.health.definitions import Strict, validation_message
from popguard.health.probes import Credential


class ExternalPop3Server(Strict):
    name: str = Field(pattern=r"^[A-Za-z][A-Za-z0-9._-]{0,62}$")
    host: str
    port: int = Field(ge=1, le=65535)
    tls: Literal["tls", "stls", "plain"] = "tls"
    credentials_file: Path | None = None
    ca_file: Path | None = None
    watched_by: str

    def credential(self) -> Credential | None:
        """Read at each run, so a changed password file needs no restart."""
        if self.credentials_file is None:
            return None
        try:
            lines = self.credentials_file.read_text().splitlines()
        except OSError:
            return None
        return Credential(lines[0], lines[1]) if len(lines) >= 2 else None


class ExternalConfig(Strict):
    pop3_servers: tuple[ExternalPop3Server, ...] = ()


def config_file(data: Path) -> Path:
    return data / "health" / "external.toml"


def load_external(data: Path) -> list[ExternalPop3Server]:
    """The entries of the file (none if there is no file); UserError naming a bad key."""
    path = config_file(data)
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    try:
        config = ExternalConfig.model_validate(tomllib.loads(text))
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"{path}: not valid TOML: {exc}") from None
    except ValidationError as exc:
        raise UserError(validation_message(str(path), exc)) from None
    names = [s.name.lower() for s in config.pop3_servers]
    if len(names) != len(set(names)):
        raise UserError(f"{path}: two entries have the same name")
    return list(config.pop3_servers)
