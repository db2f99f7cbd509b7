"""What every command gets from the root group: the data folder and the directory."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import click

from popguard.directory.directory import Directory


@dataclass
class AppContext:
    data: Path

    def directory(self) -> Directory:
        return Directory(self.data)


pass_app = click.make_pass_decorator(AppContext)
