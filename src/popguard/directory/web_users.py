"""The operator's web page's users (viewer or operator, argon2id as mailboxes) and the
actions they took there, kept in the directory so that every front end's page knows
the same users and shows the same feed."""

from __future__ import annotations

import functools
import re
import time
from dataclasses import dataclass

from popguard.directory.directory import Directory
from popguard.directory.passwords import hash_password, verify_password
from popguard.errors import UserError

ROLES = ("operator", "viewer")
_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9._-]{0,63}$")
MIN_PASSWORD_LENGTH = 12  # a page that can move databases deserves more than a PIN
MAX_REASON_LENGTH = 500
ACTIONS_SHOWN = 200  # the newest actions a feed reads


@dataclass(frozen=True)
class WebUser:
    name: str
    role: str
    password_hash: str
    created: float

    @property
    def is_operator(self) -> bool:
        return self.role == "operator"


@dataclass(frozen=True)
class WebAction:
    id: int
    at: float
    user: str
    action: str
    target: str
    reason: str
    result: str


def check_password(password: str) -> str:
    if len(password) < MIN_PASSWORD_LENGTH:
        raise UserError(f"a web user's password has at least {MIN_PASSWORD_LENGTH} characters")
    return password


def new_web_user(directory: Directory, name: str, role: str, password: str) -> WebUser:
    if not _NAME.match(name):
        raise UserError(f"not a valid web user name: {name!r} (letters, digits, '.', '_', '-')")
    if role not in ROLES:
        raise UserError(f"a web user's role is {' or '.join(ROLES)}, not {role!r}")
    password_hash = hash_password(check_password(password))
    engine = directory.raw_engine()
    with engine.transaction() as db:
        if db.execute("SELECT 1 FROM web_users WHERE name = $1", (name,)).fetchone():
            raise UserError(f"web user {name} already exists")
        db.execute(
            "INSERT INTO web_users (name, role, password_hash, created) VALUES ($1, $2, $3, $4)",
            (name, role, password_hash, time.time()),
        )
    user = find_web_user(directory, name)
    assert user is not None
    return user


def find_web_user(directory: Directory, name: str) -> WebUser | None:
    row = (
        directory.raw_engine()
        .execute("SELECT * FROM web_users WHERE name = $1", (name,))
        .fetchone()
    )
    if row is None:
        return None
    return WebUser(row["name"], row["role"], row["password_hash"], row["created"])


def web_users(directory: Directory) -> list[WebUser]:
    rows = directory.raw_engine().execute("SELECT * FROM web_users ORDER BY name").fetchall()
    return [WebUser(r["name"], r["role"], r["password_hash"], r["created"]) for r in rows]


def verified_user(directory: Directory, name: str, password: str) -> WebUser | None:
    """The user if the password is theirs. An unknown name costs a hash as a known one
    does, so the time taken does not tell which names exist."""
    user = find_web_user(directory, name)
    if user is None:
        verify_password(_unknown_user_hash(), password)
        return None
    return user if verify_password(user.password_hash, password) else None


@functools.cache
def _unknown_user_hash() -> str:
    return hash_password("no such web user")


def record_action(
    directory: Directory, user: str, action: str, target: str, reason: str, result: str
) -> int:
    with directory.raw_engine().transaction() as db:
        row = db.execute(
            "INSERT INTO web_actions (at, user_name, action, target, reason, result) "
            "VALUES ($1, $2, $3, $4, $5, $6) RETURNING id",
            (time.time(), user, action, target, reason[:MAX_REASON_LENGTH], result),
        ).fetchone()
    assert row is not None
    return int(row[0])


def recent_actions(directory: Directory, limit: int = ACTIONS_SHOWN) -> list[WebAction]:
    rows = (
        directory.raw_engine()
        .execute("SELECT * FROM web_actions ORDER BY id DESC LIMIT $1", (limit,))
        .fetchall()
    )
    return [
        WebAction(r["id"], r["at"], r["user_name"], r["action"], r["target"], r["reason"],
                  r["result"])
        for r in rows
    ]  # fmt: skip
