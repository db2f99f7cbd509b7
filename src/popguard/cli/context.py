"""What every command gets from the root group: the data folder and the directory."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:
    from popguard.directory.directory import Directory


@dataclass
class AppContext:
    data: Path

    def directory(self) -> Directory:
        # Imported here: the directory's settings models cost a third of a second,
        # which --version, --help and the commands that never open it need not pay.
        from popguard.directory.directory import Directory

        return Directory(self.data)


pass_app = click.make_pass_decorator(AppContext)
