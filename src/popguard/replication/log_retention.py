"""How much of a copy's change log may go, and which copies are too far behind.

Every copy trims its own log (the active one and each passive one, each in its own
replication service) behind the slowest copy that still counts, as the copies'
replication services last reported their applied LSNs to the directory. Reports only
lag the truth (a copy reports what it has applied, a second or two late), so trimming
behind a report never removes an entry that copy still needs.

A copy counts while it can still catch up from the log: it is not suspended, it has
not been trimmed past already, and what it still needs is within the limits (its
oldest unapplied change younger than `max_lag_seconds`, and no more than
`max_lag_bytes` to ship). A copy beyond them is not waited for: the active copy marks
it FailedAndSuspended with the reason, and it reseeds from a snapshot when it next
asks for the log. A down server's copy is waited for within the same limits, so a
server back from maintenance catches up from the log rather than by a reseed.

A copy that never reported is not waited for: it has no place in the log yet, and
seeds from a snapshot if the log no longer starts at LSN 1.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from popguard.store.mailbox_database import LogLag

SUSPENDED = "FailedAndSuspended"


@dataclass(frozen=True)
class RetentionLimits:
    max_lag_seconds: float
    max_lag_bytes: int


@dataclass(frozen=True)
class CopyProgress:
    """Another copy of the database, as its last report and this log see it."""

    server: str
    status: str
    applied_lsn: int
    lag: LogLag  # what it still needs of this copy's log


@dataclass(frozen=True)
class TrimPlan:
    through: int  # trim the entries up to and including this LSN
    held_for: str | None  # the copy the log is kept for (the slowest that counts)
    reseed: tuple[tuple[str, str], ...]  # (server, why) of copies too far behind


def plan_trim(
    head: int, base: int, others: Sequence[CopyProgress], limits: RetentionLimits, now: float
) -> TrimPlan:
    """Trim behind the slowest copy that counts; name those too far behind."""
    through, held_for = head, None
    reseed = []
    for copy in sorted(others, key=lambda c: c.applied_lsn):
        if copy.status == SUSPENDED or copy.applied_lsn < base or copy.applied_lsn >= head:
            continue  # waiting for a snapshot, past help already, or needs nothing
        why = too_far_behind(copy, limits, now)
        if why:
            reseed.append((copy.server, why))
        elif copy.applied_lsn < through:
            through, held_for = copy.applied_lsn, copy.server
    return TrimPlan(through, held_for, tuple(reseed))


def too_far_behind(copy: CopyProgress, limits: RetentionLimits, now: float) -> str:
    """Why `copy` is beyond catching up from the log, or '' if it is not."""
    needs = f"it needs the log after LSN {copy.applied_lsn}"
    if copy.lag.oldest is not None and now - copy.lag.oldest > limits.max_lag_seconds:
        return (
            f"{needs}, {now - copy.lag.oldest:.0f}s old, over max_copy_lag_seconds "
            f"({limits.max_lag_seconds:g}s): to be reseeded from a snapshot"
        )
    if copy.lag.octets > limits.max_lag_bytes:
        return (
            f"{needs}, {copy.lag.octets} octets to ship, over max_copy_lag_bytes "
            f"({limits.max_lag_bytes}): to be reseeded from a snapshot"
        )
    return ""
