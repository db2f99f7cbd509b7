"""The `popguard` command: the root group, the data folder, and one-line errors.

A command's module is imported only when that command runs (or `--help` lists it):
the modules behind other commands pull in aiohttp, pydantic models, cryptography and
more, and a runbook loop pays every import on every run.
"""

from __future__ import annotations

import importlib
import sqlite3
import sys
from collections.abc import Sequence
from pathlib import Path

import click

from popguard import __version__
from popguard.cli.context import AppContext
from popguard.control import permissions, service_user
from popguard.errors import UserError
from popguard.paths import DATA_ENV, DEFAULT_DATA

# Each command and the module of popguard.cli that defines it (in its COMMANDS).
COMMAND_MODULES = {
    "add-globalmonitoringoverride": "overrides",
    "add-mailboxdatabasecopy": "copies",
    "add-servermonitoringoverride": "overrides",
    "backup-mailboxdatabase": "backups",
    "clear-fault": "faults",
    "down": "up",
    "export-server-credentials": "credentials",
    "get-alerts": "health",
    "get-globalmonitoringoverride": "overrides",
    "get-healthreport": "health",
    "get-mailbox": "mailboxes",
    "get-mailboxdatabase": "servers",
    "get-mailboxdatabasecopystatus": "copies",
    "get-mailboxserver": "copies",
    "get-monitoringitemhelp": "health",
    "get-monitoringitemidentity": "health",
    "get-popsettings": "popsettings",
    "get-recoveryactions": "health",
    "get-server": "servers",
    "get-servercomponentstate": "components",
    "get-serverhealth": "health",
    "get-servermonitoringoverride": "overrides",
    "get-service": "services",
    "get-webuser": "webusers",
    "import-server-credentials": "credentials",
    "inject-fault": "faults",
    "invoke-monitoringprobe": "health",
    "move-activemailboxdatabase": "copies",
    "new-mailbox": "mailboxes",
    "new-mailboxdatabase": "servers",
    "new-server": "servers",
    "new-webuser": "webusers",
    "port-directory": "directory",
    "remove-globalmonitoringoverride": "overrides",
    "remove-mailbox": "mailboxes",
    "remove-mailboxdatabasecopy": "copies",
    "remove-servermonitoringoverride": "overrides",
    "restart-server": "services",
    "restore-mailbox": "backups",
    "restore-mailboxdatabase": "backups",
    "restart-service": "services",
    "send-message": "messages",
    "serve": "serve",
    "set-mailbox": "mailboxes",
    "set-mailboxdatabase": "servers",
    "set-mailboxserver": "copies",
    "set-popsettings": "popsettings",
    "set-servercomponentstate": "components",
    "set-servermonitor": "overrides",
    "start-service": "services",
    "stop-service": "services",
    "test-popconnectivity": "connectivity",
    "up": "up",
}

DATA_OPTION = "--data"


def command_key(name: str) -> str:
    """What a spelling of a command comes down to: PowerShell's cmdlet names ignore
    case, and an operator copying from the runbook types Get-ServerHealth, from
    popguard's help get-serverhealth, and in a hurry getserverhealth."""
    return name.replace("-", "").lower()


_COMMAND_BY_KEY = {command_key(name): name for name in COMMAND_MODULES}


def data_first(args: Sequence[str]) -> list[str]:
    """The arguments with every `--data DIR` / `--data=DIR` moved before the command:
    operators type it after the command as often as before. Two different folders are
    a mistake, not a choice of the last one."""
    values: list[str] = []
    rest: list[str] = []
    index = 0
    while index < len(args):
        arg = args[index]
        if arg == "--":  # what follows is an argument, never an option
            rest.extend(args[index:])
            break
        if arg == DATA_OPTION and index + 1 < len(args):
            values.append(args[index + 1])
            index += 2
            continue
        if arg.startswith(f"{DATA_OPTION}="):
            values.append(arg.removeprefix(f"{DATA_OPTION}="))
        else:
            rest.append(arg)
        index += 1
    if len({Path(value) for value in values}) > 1:
        raise click.UsageError(
            f"{DATA_OPTION} given as {' and '.join(dict.fromkeys(values))}: give one data folder"
        )
    return [DATA_OPTION, values[0], *rest] if values else rest


class PopguardGroup(click.Group):
    """The root group: commands imported when used, named in any Exchange spelling."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMAND_MODULES)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        name = _COMMAND_BY_KEY.get(command_key(cmd_name))
        if name is None:
            return None
        module = importlib.import_module(f"popguard.cli.{COMMAND_MODULES[name]}")
        command: click.Command = next(c for c in module.COMMANDS if c.name == name)
        return command

    def resolve_command(
        self, ctx: click.Context, args: list[str]
    ) -> tuple[str | None, click.Command | None, list[str]]:
        # Usage lines and errors name the command as popguard spells it.
        _, command, rest = super().resolve_command(ctx, args)
        return (command.name if command else None), command, rest

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        return super().parse_args(ctx, data_first(args))


@click.group(
    cls=PopguardGroup,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
@click.option(
    DATA_OPTION,
    type=click.Path(file_okay=False, path_type=Path),
    envvar=DATA_ENV,
    default=DEFAULT_DATA,
    show_default=True,
    help=f"The data folder (also ${DATA_ENV}); before or after the command.",
)
@click.version_option(__version__, prog_name="popguard")
@click.pass_context
def cli(ctx: click.Context, data: Path) -> None:
    """popguard: a POP3 mail service with managed availability built in.

    Commands take Exchange's spellings too (Get-ServerHealth, GET-SERVERHEALTH)."""
    ctx.obj = AppContext(data=data)
    if ctx.invoked_subcommand in service_user.ROOT_COMMANDS:
        # Root, to sign with the CA key or to run systemctl; what it wrote goes back to
        # the folder's owner.
        ctx.call_on_close(lambda: service_user.give_back(data))
    else:
        service_user.become_owner(data)


def main() -> None:
    """Run the CLI; a user's mistake is one line on stderr and exit status 1."""
    permissions.restrict_umask()
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("popguard: aborted", err=True)
        sys.exit(1)
    except click.ClickException as exc:
        click.echo(f"popguard: {exc.format_message()}", err=True)
        sys.exit(1 if exc.exit_code != 0 else 0)
    except UserError as exc:
        click.echo(f"popguard: {exc}", err=True)
        sys.exit(1)
    except sqlite3.Error as exc:
        click.echo(f"popguard: directory error: {exc}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
