"""The first operator of a new organization's web page: made by `popguard up` with a
random password, kept in an owner-only file of the data folder (as the demo mailbox's)."""

from __future__ import annotations

import os
from pathlib import Path

from popguard.directory.directory import Directory
from popguard.directory.passwords import generate_password
from popguard.directory.web_users import new_web_user, web_users

FIRST_OPERATOR = "operator"


def first_operator_file(data: Path) -> Path:
    return data / "web-operator.txt"


def ensure_first_operator(directory: Directory, data: Path) -> Path | None:
    """The file with the first operator's name and password, made now if the page has
    no user yet; None when users were made otherwise (new-webuser) and no file is kept."""
    path = first_operator_file(data)
    if web_users(directory):
        return path if path.exists() else None
    password = generate_password()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(f"{FIRST_OPERATOR} {password}\n")
    new_web_user(directory, FIRST_OPERATOR, "operator", password)
    return path
