"""One renderer for every command: table, list (Format-List style) or JSON.

Commands build plain rows (dicts keyed by Exchange's property names) and hand
them here, so a script written against one format reads the others.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import Any

import click

FORMATS = ("table", "list", "json")

format_option = click.option(
    "--format",
    "output_format",
    type=click.Choice(FORMATS),
    default="table",
    show_default=True,
    help="Output format.",
)


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, list | tuple):
        return ", ".join(_text(v) for v in value)
    if isinstance(value, dict):
        return ", ".join(f"{k}={_text(v)}" for k, v in value.items())
    return str(value)


def _json_value(value: Any) -> Any:
    # An empty text is a value that is not there (no error, not yet inspected, no
    # uptime): a script tests for null, as PowerShell's ConvertTo-Json writes $null.
    if value == "":
        return None
    if isinstance(value, list | tuple):
        return [_json_value(v) for v in value]
    if isinstance(value, dict):
        return {k: _json_value(v) for k, v in value.items()}
    return value


def render(rows: Sequence[dict[str, Any]], output_format: str) -> None:
    if output_format == "json":
        click.echo(json.dumps([_json_value(row) for row in rows], indent=2, default=str))
        return
    if not rows:
        return
    if output_format == "list":
        width = max(len(key) for row in rows for key in row)
        blocks = []
        for row in rows:
            blocks.append("\n".join(f"{key.ljust(width)} : {_text(v)}" for key, v in row.items()))
        click.echo("\n\n".join(blocks))
        return
    # Rich is imported by the commands that print a table, not by every command.
    from rich.console import Console
    from rich.table import Table

    # Every key of any row: rows of several servers need not all have the same keys
    # (a server whose health service did not answer has only Server and Error).
    columns = list(dict.fromkeys(key for row in rows for key in row))
    table = Table(box=None, header_style="bold", pad_edge=False)
    for column in columns:
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(*(_text(row.get(column)) for column in columns))
    # On a terminal, fit its width; into a pipe or file, never fold a value.
    console = Console() if sys.stdout.isatty() else Console(width=100_000)
    console.print(table)
