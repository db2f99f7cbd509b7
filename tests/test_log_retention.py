"""The truncation rule: trim behind the slowest copy that counts; a copy too far behind
is named for a reseed and not waited for."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from popguard.replication.log_retention import (
    SUSPENDED,
    CopyProgress,
    RetentionLimits,
    plan_trim,
)
from popguard.store.mailbox_database import LogLag

NOW = 1_000_000.0
LIMITS = RetentionLimits(max_lag_seconds=3600.0, max_lag_bytes=10_000_000)


def copy(
    server: str, applied: int, status: str = "Healthy", age: float = 10.0, octets: int = 0
) -> CopyProgress:
    return CopyProgress(server, status, applied, LogLag(NOW - age, octets))


def test_the_log_is_kept_for_the_slowest_healthy_copy() -> None:
    plan = plan_trim(100, 0, [copy("mbx2", 80), copy("mbx3", 60)], LIMITS, NOW)
    assert (plan.through, plan.held_for, plan.reseed) == (60, "mbx3", ())


def test_with_every_copy_caught_up_the_whole_log_goes() -> None:
    plan = plan_trim(100, 40, [copy("mbx2", 100, status="Mounted")], LIMITS, NOW)
    assert (plan.through, plan.held_for) == (100, None)


def test_a_down_copy_within_the_limits_is_waited_for() -> None:
    plan = plan_trim(100, 0, [copy("mbx2", 30, status="ServiceDown", age=3000)], LIMITS, NOW)
    assert (plan.through, plan.reseed) == (30, ())


def test_a_copy_too_old_behind_is_named_for_a_reseed_and_not_waited_for() -> None:
    plan = plan_trim(100, 0, [copy("mbx2", 90), copy("mbx3", 5, age=7200)], LIMITS, NOW)
    assert plan.through == 90
    ((server, why),) = plan.reseed
    assert server == "mbx3"
    assert "max_copy_lag_seconds" in why and "after LSN 5" in why and "snapshot" in why


def test_a_copy_too_many_bytes_behind_is_named_for_a_reseed() -> None:
    plan = plan_trim(100, 0, [copy("mbx2", 5, octets=20_000_000)], LIMITS, NOW)
    assert plan.through == 100
    assert [server for server, _ in plan.reseed] == ["mbx2"]
    assert "max_copy_lag_bytes" in plan.reseed[0][1]


def test_suspended_copies_and_copies_trimmed_past_hold_nothing_and_are_not_named_again() -> None:
    others = [copy("mbx2", 10, status=SUSPENDED, age=1e6), copy("mbx3", 20, age=1e6)]
    plan = plan_trim(100, 50, others, LIMITS, NOW)
    assert (plan.through, plan.reseed) == (100, ())


PROGRESS = st.builds(
    CopyProgress,
    server=st.sampled_from(["mbx2", "mbx3", "mbx4"]),
    status=st.sampled_from(["Healthy", "ServiceDown", "Seeding", "Failed", SUSPENDED]),
    applied_lsn=st.integers(0, 200),
    lag=st.builds(
        LogLag,
        oldest=st.one_of(st.none(), st.floats(NOW - 10_000, NOW)),
        octets=st.integers(0, 20_000_000),
    ),
)


@given(
    st.integers(0, 200),
    st.integers(0, 200),
    st.lists(PROGRESS, max_size=3, unique_by=lambda c: c.server),
)
def test_no_copy_that_counts_loses_an_entry_it_needs(
    head: int, base: int, others: list[CopyProgress]
) -> None:
    base = min(base, head)
    plan = plan_trim(head, base, others, LIMITS, NOW)
    assert plan.through <= head
    named = {server for server, _ in plan.reseed}
    for other in others:
        counts = other.status != SUSPENDED and base <= other.applied_lsn < head
        if counts and other.server not in named:
            assert plan.through <= other.applied_lsn
        if other.server in named:
            assert other.status != SUSPENDED
