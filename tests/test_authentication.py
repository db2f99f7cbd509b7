"""Password checks under parallel guessing: the bounds on argon2id verifications in
flight, the failure delay before the KDF, and a clean login's precedence.

The limiter's logic is checked against a model (hypothesis); the Authenticator with
real argon2id and a real directory in-process; the front end as a real process
with real poplib clients from several loopback addresses.
"""

from __future__ import annotations

import asyncio
import poplib
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from popguard.directory.directory import Directory
from popguard.directory.passwords import (
    FAILED_LOGIN_BASE_DELAY,
    FAILED_LOGIN_MAX_DELAY,
    LoginDelays,
    generate_password,
    hash_password,
)
from popguard.services.authentication import KDF_SLOTS, Authenticator, Slots
from popguard.services.counters import ServiceCounters
from popguard.testing.net import free_loopback_address

from .conftest import PASSWORD, Organization
from .test_frontend import counters, login, secure_client

# The limiter: a model of two FIFO lanes, the first always served first ---------------

OPERATIONS = st.lists(
    st.one_of(
        st.tuples(st.just("acquire"), st.booleans()),
        st.tuples(st.just("release"), st.integers(0, 30)),
        st.tuples(st.just("cancel"), st.integers(0, 30)),
    ),
    max_size=40,
)


@settings(max_examples=300, deadline=None)
@given(capacity=st.integers(1, 3), operations=OPERATIONS)
def test_slots_serve_the_first_lane_first_and_never_exceed_capacity(
    capacity: int, operations: list[tuple[str, object]]
) -> None:
    async def run() -> None:
        slots = Slots(capacity)
        tasks: list[asyncio.Task[bool]] = []
        released: set[int] = set()
        # The model: who holds a slot, and who waits in which lane, in order.
        holding: list[int] = []
        model_lanes: tuple[deque[int], deque[int]] = (deque(), deque())

        def model_grant() -> None:
            while len(holding) < capacity and (model_lanes[0] or model_lanes[1]):
                holding.append((model_lanes[0] or model_lanes[1]).popleft())

        for operation, argument in operations:
            if operation == "acquire":
                tasks.append(asyncio.create_task(slots.acquire(bool(argument))))
                model_lanes[0 if argument else 1].append(len(tasks) - 1)
                model_grant()
            elif operation == "release" and holding:
                released.add(holding.pop(int(str(argument)) % len(holding)))
                slots.release()
                model_grant()
            elif operation == "cancel":
                queued = [i for lane in model_lanes for i in lane]
                if queued:
                    index = queued[int(str(argument)) % len(queued)]
                    tasks[index].cancel()
                    for lane in model_lanes:
                        if index in lane:
                            lane.remove(index)
            for _ in range(3):
                await asyncio.sleep(0)
            granted = {i for i, task in enumerate(tasks) if task.done() and not task.cancelled()}
            assert granted - released == set(holding)
            assert slots.held == len(holding) <= capacity
            assert slots.waiting == len(model_lanes[0]) + len(model_lanes[1])
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    asyncio.run(run())


def test_a_first_lane_waiter_never_sees_a_second_lane_grant() -> None:
    async def run() -> tuple[bool, bool]:
        slots = Slots(1)
        await slots.acquire(True)
        failing = asyncio.create_task(slots.acquire(False))
        clean = asyncio.create_task(slots.acquire(True))
        await asyncio.sleep(0)
        slots.release()  # the clean one, though it queued later, goes first
        clean_saw_failing = await clean
        assert not failing.done()
        slots.release()
        return clean_saw_failing, await failing

    clean_saw_failing, failing_saw_failing = asyncio.run(run())
    assert not clean_saw_failing
    assert not failing_saw_failing


# The delay before the KDF ---------------------------------------------------------


@dataclass
class FakeClock:
    now: float = 1000.0

    def __call__(self) -> float:
        return self.now


FAILURES = st.lists(
    st.tuples(
        st.sampled_from(["10.0.0.1", "10.0.0.2"]), st.sampled_from(["a", "b"]), st.floats(0, 20)
    ),
    max_size=20,
)


@settings(max_examples=200, deadline=None)
@given(steps=FAILURES)
def test_wait_before_is_what_is_left_of_the_last_failures_delay(
    steps: list[tuple[str, str, float]],
) -> None:
    clock = FakeClock()
    delays = LoginDelays(clock)
    answered_at: dict[str, float] = {}  # when each key's last failure was answered
    counts: dict[str, int] = {}  # failures per key (all within the forget period)
    for client_ip, user, pause in steps:
        wait = delays.wait_before(client_ip, user)
        expected = max(
            [answered_at.get(f"ip:{client_ip}", 0.0) - clock.now,
             answered_at.get(f"user:{user}", 0.0) - clock.now, 0.0]
        )  # fmt: skip
        assert abs(wait - expected) < 1e-9
        assert 0.0 <= wait <= FAILED_LOGIN_MAX_DELAY + 1e-9  # the clock is a float
        assert delays.failing_address(client_ip) == (f"ip:{client_ip}" in answered_at)
        clock.now += wait
        delay = delays.record_failure(client_ip, user)
        assert FAILED_LOGIN_BASE_DELAY <= delay <= FAILED_LOGIN_MAX_DELAY
        # Both keys now wait out their own count's delay from this failure.
        for key in (f"ip:{client_ip}", f"user:{user}"):
            counts[key] = counts.get(key, 0) + 1
            answered_at[key] = clock.now + min(
                FAILED_LOGIN_BASE_DELAY * 2.0 ** (counts[key] - 1), FAILED_LOGIN_MAX_DELAY
            )
        clock.now += pause


# The Authenticator in-process, with real argon2id ------------------------------------


def test_a_clean_login_takes_a_kdf_slot_before_queued_failing_ones(tmp_path: Path) -> None:
    """Attackers from many addresses, each already failing, queue for the KDF slots
    at once; a login from a clean address for a clean user is served before them."""
    attackers = 4 * KDF_SLOTS
    with Directory(tmp_path / "data") as directory:
        directory.new_server("mbx1", ["mailbox"], "127.0.0.1")
        directory.new_database("DB01", "mbx1")
        hashed = hash_password(PASSWORD)
        for n in range(attackers):
            directory.new_mailbox(f"victim{n}@example.test", "DB01", hashed)
        directory.new_mailbox("legit@example.test", "DB01", hashed)
        counters = ServiceCounters("pop3")
        authenticator = Authenticator(directory, counters)
        finished: list[str] = []

        async def attempt(user: str, password: str, client_ip: str) -> bool:
            found = await authenticator.verify(user, password, client_ip, client_ip, "USER")
            finished.append(user)
            return found is not None

        async def run() -> bool:
            def guess(n: int) -> asyncio.Task[bool]:
                return asyncio.create_task(
                    attempt(f"victim{n}@example.test", "guess", f"10.1.0.{n}")
                )

            # One failure each: every attacking address and user is now failing.
            await asyncio.gather(*(guess(n) for n in range(attackers)))
            finished.clear()
            # Past the delay that failure earned, so no guess waits for it: they all
            # go for the KDF slots at once and queue there.
            await asyncio.sleep(FAILED_LOGIN_BASE_DELAY + 0.1)
            guesses = [guess(n) for n in range(attackers)]
            await asyncio.sleep(0)
            legit = asyncio.create_task(attempt("legit@example.test", PASSWORD, "10.2.0.1"))
            results = await asyncio.gather(*guesses)
            assert not any(results)
            return await legit

        assert asyncio.run(run())
    assert counters.logins_queued_behind_failing == 0
    assert counters.peak_verifications_in_flight <= KDF_SLOTS
    # Served at the first free slot: at most the guesses already running finish first.
    assert finished.index("legit@example.test") <= KDF_SLOTS
    assert counters.failed_logins == 2 * attackers


def test_parallel_guesses_each_wait_for_the_delay_the_one_before_earned(tmp_path: Path) -> None:
    guesses = 4  # answered after 0.25, 0.5, 1 and 2 s of delay before each KDF but the first
    with Directory(tmp_path / "data") as directory:
        directory.new_server("mbx1", ["mailbox"], "127.0.0.1")
        directory.new_database("DB01", "mbx1")
        directory.new_mailbox("target@example.test", "DB01", hash_password(PASSWORD))
        counters = ServiceCounters("pop3")
        authenticator = Authenticator(directory, counters)

        async def run() -> list[bool]:
            found = await asyncio.gather(
                *(
                    authenticator.verify("target@example.test", f"guess{n}", "10.5.0.1", "", "USER")
                    for n in range(guesses)
                )
            )
            return [mailbox is None for mailbox in found]

        assert all(asyncio.run(run()))
    assert counters.delayed_before_verification == guesses - 1
    assert counters.peak_verifications_per_user == counters.peak_verifications_per_address == 1
    # The first went straight to its KDF; the others all queued behind it.
    assert counters.peak_verifications_waiting == guesses - 1


def test_a_front_ends_address_gets_no_slot_of_its_own_on_the_back_end(tmp_path: Path) -> None:
    """A front end logs in on the back end for all its clients: their first logins
    from its one address must not go through the back end one at a time."""
    users = [f"user{n}@example.test" for n in range(2 * KDF_SLOTS)]
    with Directory(tmp_path / "data") as directory:
        directory.new_server("mbx1", ["mailbox"], "127.0.0.1")
        directory.new_server("cas1", ["frontend"], "10.3.0.1")
        directory.new_database("DB01", "mbx1")
        hashed = hash_password(PASSWORD)
        for user in users:
            directory.new_mailbox(user, "DB01", hashed)

        def peak_per_address(client_ip: str) -> int:
            counters = ServiceCounters("pop3be")
            authenticator = Authenticator(directory, counters)

            async def run() -> list[bool]:
                found = await asyncio.gather(
                    *(
                        authenticator.verify(u, PASSWORD, client_ip, client_ip, "USER")
                        for u in users
                    )
                )
                return [mailbox is not None for mailbox in found]

            assert all(asyncio.run(run()))
            assert counters.peak_verifications_in_flight <= KDF_SLOTS
            return counters.peak_verifications_per_address

        assert peak_per_address("10.3.0.1") == KDF_SLOTS
        assert peak_per_address("10.4.0.1") == 1


# The front end as a real process ----------------------------------------------------


def guess_wrong(
    org: Organization,
    user: str,
    source: str,
    failures: list[str],
    together: threading.Barrier | None = None,
) -> None:
    client = secure_client(org, source)
    try:
        client.user(user)
        if together is not None:
            together.wait(30)
        client.pass_("not the password")
    except poplib.error_proto as exc:
        failures.append(str(exc))
    finally:
        client.close()


def test_parallel_guesses_for_one_user_from_one_address_run_one_at_a_time(
    organization: Organization,
) -> None:
    user = organization.add_mailbox("target@example.test")
    attacker = free_loopback_address()
    guesses = 5  # delays 0.25 + 0.5 + 1 + 2 + 4 s: the whole attack ends within ~16 s
    failures: list[str] = []
    together = threading.Barrier(guesses)  # every PASS sent at once
    threads = [
        threading.Thread(
            target=guess_wrong, args=(organization, user, attacker, failures, together)
        )
        for _ in range(guesses)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(failures) == guesses
    assert all("[AUTH]" in failure for failure in failures)
    shown = counters_after(organization, FailedLogins=guesses)
    assert shown["PeakVerificationsPerUser"] == 1
    assert shown["PeakVerificationsPerAddress"] == 1
    assert 1 <= int(str(shown["PeakVerificationsInFlight"])) <= KDF_SLOTS
    # The guesses after the first queued, then waited for the delay the one before
    # earned before their KDF ran: in parallel, no faster than one by one. (The
    # second guess may reach the front end only after the first delay of 0.25 s
    # on a busy machine, and then has nothing left to wait for.)
    assert int(str(shown["PeakVerificationsWaiting"])) >= 2
    assert int(str(shown["DelayedBeforeVerification"])) >= guesses - 2
    assert shown["VerificationsInFlight"] == 0


def test_a_first_login_from_another_address_is_not_queued_behind_an_attack(
    organization: Organization,
) -> None:
    legit = organization.add_mailbox("legit@example.test")
    attackers = [
        (free_loopback_address(), organization.add_mailbox(f"victim{n}@example.test"))
        for n in range(2 * KDF_SLOTS)
    ]
    failures: list[str] = []
    threads = [
        threading.Thread(target=guess_wrong, args=(organization, user, address, failures))
        for address, user in attackers
        for _ in range(3)
    ]
    for thread in threads:
        thread.start()
    # Logged in while the guesses from every attacking address are still queued or
    # waiting for their delays (each address's third guess waits 0.5 s at least).
    client = login(organization, legit, free_loopback_address())
    assert client.stat() == (0, 0)
    client.quit()
    for thread in threads:
        thread.join(60)
    assert len(failures) == len(threads)
    shown = counters_after(organization, FailedLogins=len(threads))
    assert shown["SuccessfulLogins"] == 1
    assert shown["LoginsQueuedBehindFailing"] == 0
    assert int(str(shown["PeakVerificationsInFlight"])) <= KDF_SLOTS
    assert shown["PeakVerificationsPerUser"] == 1
    assert shown["PeakVerificationsPerAddress"] == 1


def counters_after(org: Organization, **expected: object) -> dict[str, object]:
    """The front end's counters once they show `expected` (published every second)."""
    shown: dict[str, object] = {}
    for _ in range(100):
        shown = counters(org, "cas1", "pop3")
        if all(shown.get(key) == value for key, value in expected.items()):
            return shown
        time.sleep(0.2)
    raise AssertionError(f"front end counters {shown} never showed {expected}")


def test_a_generated_password_never_looks_like_an_option() -> None:
    """A password `up` or new-mailbox makes is pasted after `--password` or `-p`: one
    beginning with "-" (one in 64 of token_urlsafe's) would be taken for an option."""
    passwords = [generate_password() for _ in range(2000)]
    assert not [password for password in passwords if password.startswith("-")]
    assert len(set(passwords)) == len(passwords)
