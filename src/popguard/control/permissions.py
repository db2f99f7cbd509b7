"""The data folder is its owner's alone: every mailbox's mail and password hash, the
keys, the health results and the logs.

Every popguard process sets its own umask at start, so whatever it makes (SQLite's
-wal and -shm files too, which take the database file's mode) is owner-only, whoever
started it and whatever umask they had. `popguard up` refuses to start while anything
in the data folder (itself included) is open to group or others.
"""

from __future__ import annotations

import os
import shlex
import stat
from pathlib import Path

from popguard.errors import UserError

OWNER_ONLY_UMASK = 0o077  # new folders 0700, new files 0600
GROUP_OR_OTHER = stat.S_IRWXG | stat.S_IRWXO


def restrict_umask() -> None:
    os.umask(OWNER_ONLY_UMASK)


def open_to_others(data: Path) -> tuple[Path, int] | None:
    """The first file or folder in `data` (itself included) that group or others may
    use, with its mode; None when everything is owner-only or `data` is not made yet.
    Symbolic links are skipped: their own mode means nothing and their targets are
    checked where they are."""
    entries = (Path(folder) / name for folder, folders, files in os.walk(data)
               for name in [*folders, *files])  # fmt: skip
    for path in (data, *entries):
        mode = _mode(path)
        if mode is not None and mode & GROUP_OR_OTHER:
            return path, mode
    return None


def _mode(path: Path) -> int | None:
    try:
        status = path.lstat()
    except FileNotFoundError:  # not made yet, or removed meanwhile (a rotated log)
        return None
    if stat.S_ISLNK(status.st_mode):
        return None
    return stat.S_IMODE(status.st_mode)


def check_owner_only(data: Path) -> None:
    """One line naming the first thing group or others may use, and the command that
    closes the whole folder."""
    found = open_to_others(data)
    if found is None:
        return
    path, mode = found
    raise UserError(
        f"{path} is open to group or others (mode {mode:04o}): the data folder holds mail "
        f"and password hashes and must be its owner's alone; `chmod -R go-rwx "
        f"{shlex.quote(str(data))}` closes it"
    )
