"""The web page's users: new-webuser, get-webuser."""

from __future__ import annotations

import sys

import click

from popguard.cli.context import AppContext, pass_app
from popguard.cli.render import format_option, render
from popguard.directory.web_users import ROLES, new_web_user, web_users
from popguard.errors import UserError
from popguard.health.api import when


@click.command("new-webuser")
@click.argument("name")
@click.option("--role", required=True, type=click.Choice(ROLES), help="viewer: sees, never acts.")
@click.option("--password-stdin", is_flag=True, required=True,
              help="Read the password from standard input (never an argument).")  # fmt: skip
@format_option
@pass_app
def new_webuser(app: AppContext, name: str, role: str, password_stdin: bool,
                output_format: str) -> None:  # fmt: skip
    """A user of the operator's web page, with a password hashed as a mailbox's."""
    password = sys.stdin.readline().rstrip("\r\n")
    if not password:
        raise UserError("no password on standard input")
    with app.directory() as directory:
        user = new_web_user(directory, name, role, password)
    render([{"Name": user.name, "Role": user.role, "Created": when(user.created)}], output_format)


@click.command("get-webuser")
@format_option
@pass_app
def get_webuser(app: AppContext, output_format: str) -> None:
    """The web page's users and their roles (never their password hashes)."""
    with app.directory() as directory:
        users = web_users(directory)
    render([{"Name": u.name, "Role": u.role, "Created": when(u.created)} for u in users],
           output_format)  # fmt: skip


COMMANDS = [new_webuser, get_webuser]
