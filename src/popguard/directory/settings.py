"""POP settings of one server, with Exchange's property names (Get-PopSettings).

The model is the single source of truth for names, defaults and valid ranges;
the CLI, the directory and the services all go through it.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from popguard.errors import UserError
from popguard.pop3.session import LoginType


class SortOrder(StrEnum):
    ASCENDING = "Ascending"
    DESCENDING = "Descending"


class RollOver(StrEnum):
    HOURLY = "Hourly"
    DAILY = "Daily"
    WEEKLY = "Weekly"
    MONTHLY = "Monthly"


# RFC 2449 section 4: a command line, keyword included, may be at most 255 octets,
# but Exchange's MaxCommandSize defaults to 512 and allows 40..1024.
MAX_COMMAND_SIZE_DEFAULT = 512

# RFC 1939 section 3: an autologout timer "MUST be of at least 10 minutes" once
# authenticated; Exchange defaults to 30 minutes and 1 minute before login.
AUTHENTICATED_TIMEOUT_DEFAULT = 1800
PRE_AUTHENTICATED_TIMEOUT_DEFAULT = 60


class PopSettings(BaseModel):
    """What `get-popsettings` shows and `set-popsettings` changes."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_enum_values=False)

    LoginType: LoginType = LoginType.SECURE_LOGIN
    MaxConnections: Annotated[int, Field(ge=1, le=1_000_000)] = 2000
    MaxConnectionFromSingleIP: Annotated[int, Field(ge=1, le=1_000_000)] = 500
    MaxConnectionsPerUser: Annotated[int, Field(ge=1, le=1_000)] = 16
    MaxCommandSize: Annotated[int, Field(ge=40, le=1024)] = MAX_COMMAND_SIZE_DEFAULT
    PreAuthenticatedConnectionTimeout: Annotated[int, Field(ge=1, le=3600)] = (
        PRE_AUTHENTICATED_TIMEOUT_DEFAULT
    )
    AuthenticatedConnectionTimeout: Annotated[int, Field(ge=1, le=86_400)] = (
        AUTHENTICATED_TIMEOUT_DEFAULT
    )
    # Not an Exchange setting: RFC 2449's LOGIN-DELAY, the least number of seconds
    # between two logins of one mailbox (0: no limit). It stops clients that poll
    # every few seconds; an earlier login gets -ERR [LOGIN-DELAY].
    MinimumLoginInterval: Annotated[int, Field(ge=0, le=86_400)] = 0
    MessageRetrievalSortOrder: SortOrder = SortOrder.ASCENDING
    # A DNS name: it goes into the certificate and names its file.
    X509CertificateName: (
        Annotated[
            str,
            Field(
                max_length=253,
                pattern=r"^[A-Za-z0-9]([A-Za-z0-9-]{0,62})(\.[A-Za-z0-9-]{1,63})*$",
            ),
        ]
        | None
    ) = None
    # Not an Exchange setting: how many worker processes each of this server's mail
    # services (pop3 or pop3be, and delivery) runs; 0 means the host's default
    # (POPGUARD_WORKER_PROCESSES, else one per core).
    WorkerProcesses: Annotated[int, Field(ge=0, le=256)] = 0
    # Not an Exchange setting: whether a front end talks TLS to a back end of its own
    # host too. Off: it uses that back end's Unix socket, in the data folder that only
    # the service user and root may enter, where TLS would hide the bytes from no one
    # who cannot read its keys anyway, for half the leg's CPU. On: for an operator
    # whose rules say every connection is encrypted. A leg to another host is TLS.
    SameHostBackendTls: bool = False
    ProtocolLogEnabled: bool = False
    LogFileLocation: str | None = None
    LogFileRollOverSettings: RollOver = RollOver.DAILY
    LogPerFileSizeQuota: Annotated[int, Field(ge=0)] = 10 * 1024 * 1024

    def with_changes(self, changes: dict[str, Any]) -> PopSettings:
        """Validated copy with `changes` applied; a bad value names its key."""
        merged = self.model_dump() | changes
        try:
            return PopSettings.model_validate(merged)
        except ValidationError as exc:
            raise UserError(describe_validation_error(exc)) from None


def describe_validation_error(exc: ValidationError) -> str:
    first = exc.errors()[0]
    where = ".".join(str(part) for part in first["loc"]) or "value"
    return f"invalid {where}: {first['msg']} (got {first.get('input')!r})"
