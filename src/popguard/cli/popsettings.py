"""get-popsettings and set-popsettings.

The options of set-popsettings are made from the PopSettings model itself, one
per property (LoginType becomes --login-type), so the two never disagree.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import click

from popguard import paths
from popguard.cli.context import AppContext, pass_app
from popguard.cli.render import FORMATS, render
from popguard.directory.directory import Server
from popguard.directory.exchange_values import timespan_parts
from popguard.directory.settings import PopSettings
from popguard.errors import UserError

# The spelling the runbook uses for ProtocolLogEnabled.
ALIASES = {"protocol-logging-enabled": "ProtocolLogEnabled"}

_SIZE = re.compile(r"^(\d+)\s*(B|KB|MB|GB)?$", re.IGNORECASE)
_SIZE_UNITS = {"B": 1, "KB": 1024, "MB": 1024**2, "GB": 1024**3}
_TRUE = {"true", "$true", "1", "yes", "on"}
_FALSE = {"false", "$false", "0", "no", "off"}


def option_name(field: str) -> str:
    """LoginType -> login-type, MaxConnectionFromSingleIP -> max-connection-from-single-ip."""
    words = re.findall(r"X509|[A-Z]+(?![a-z])|[A-Z][a-z0-9]*", field)
    return "-".join(word.lower() for word in words)


OPTION_TO_FIELD = {option_name(name): name for name in PopSettings.model_fields} | ALIASES


def parse_value(field: str, raw: str) -> Any:
    """Turn command-line text into the value PopSettings validates."""
    if field.endswith("Timeout"):
        parts = timespan_parts(raw)
        if parts:  # Exchange's [d.]hh:mm:ss
            days, hours, minutes, seconds = parts
            return ((days * 24 + hours) * 60 + minutes) * 60 + seconds
        return raw
    if field == "LogPerFileSizeQuota":
        match = _SIZE.match(raw.strip())
        if not match:
            raise UserError(f"invalid LogPerFileSizeQuota: {raw!r} (bytes, or e.g. 10MB)")
        return int(match.group(1)) * _SIZE_UNITS[(match.group(2) or "B").upper()]
    if field == "ProtocolLogEnabled":
        lowered = raw.lower()
        if lowered in _TRUE:
            return True
        if lowered in _FALSE:
            return False
        raise UserError(f"invalid ProtocolLogEnabled: {raw!r} (true or false)")
    if field in ("X509CertificateName", "LogFileLocation") and raw == "":
        return None
    return raw


# The POP3 service of each role, whose protocol log LogFileLocation places.
LOGGING_SERVICE = {"frontend": "pop3", "mailbox": "pop3be"}


def settings_row(data: Path, server: Server, settings: PopSettings) -> dict[str, Any]:
    """The settings as stored, with the folder the protocol log goes to when none is
    set: the runbook's step is "find the log file location"."""
    row = {"Server": server.name} | settings.model_dump(mode="json")
    if not settings.LogFileLocation:
        folder = paths.server_folder(data, server.name)
        effective = [
            str(folder.default_protocol_log_dir(LOGGING_SERVICE[role]).resolve())
            for role in server.roles
            if role in LOGGING_SERVICE
        ]
        row["LogFileLocation"] = ", ".join(effective)  # as Exchange: the folder in use
    return row


@click.command("get-popsettings")
@click.option("--server", required=True)
@click.option("--format", "output_format", type=click.Choice(FORMATS), default="list")
@pass_app
def get_popsettings(app: AppContext, server: str, output_format: str) -> None:
    """Show the POP settings of a server."""
    with app.directory() as directory:
        settings, _ = directory.pop_settings(server)
        host = directory.get_server(server)
    render([settings_row(app.data, host, settings)], output_format)


def _set_popsettings(app: AppContext, server: str, output_format: str, **options: Any) -> None:
    changes = {
        OPTION_TO_FIELD[name.replace("_", "-")]: parse_value(
            OPTION_TO_FIELD[name.replace("_", "-")], value
        )
        for name, value in options.items()
        if value is not None
    }
    if not changes:
        raise UserError("nothing to change: give at least one setting, e.g. --login-type")
    with app.directory() as directory:
        current, _ = directory.pop_settings(server)
        updated = current.with_changes(changes)
        host = directory.get_server(server)
        if updated.X509CertificateName != current.X509CertificateName:
            _make_certificate(app, host, updated.X509CertificateName)
        revision = directory.set_pop_settings(server, updated)
    name = host.name
    render([settings_row(app.data, host, updated)], output_format)
    # Every setting is picked up by the running services; none needs a restart.
    click.echo(
        f"revision {revision}: running POP3 services on {name} apply it within seconds", err=True
    )


def _make_certificate(app: AppContext, host: Server, certificate_name: str | None) -> None:
    """The certificate of a new X509CertificateName, made before the setting is
    written when this command may sign: services run as the unprivileged service user
    cannot (the CA key is root's), and would go on with the old one."""
    from popguard.net.tls import TlsMaterial

    material = TlsMaterial.of(app.data)
    if os.access(material.ca_key_file, os.R_OK):
        material.pop3_identity(host.name, host.address, certificate_name)


def _build_set_command() -> click.Command:
    command = click.Command(
        "set-popsettings",
        callback=click.pass_obj(_set_popsettings),
        help="Change POP settings of a server (Exchange's Set-PopSettings).",
        params=[
            click.Option(["--server"], required=True),
            click.Option(["--format", "output_format"], type=click.Choice(FORMATS), default="list"),
        ],
    )
    for option, field in OPTION_TO_FIELD.items():
        command.params.append(click.Option([f"--{option}"], metavar="VALUE", help=f"Sets {field}."))
    return command


set_popsettings = _build_set_command()

COMMANDS = [get_popsettings, set_popsettings]
