"""Property: for random command sequences (rollbacks and checkpoints included, grouped in
random batches), the state the store reads at every event N equals the state folded in
memory right after N, for every scope; repeatedly, and after close and reopen."""

from __future__ import annotations

import datetime as dt
import tempfile
from collections.abc import Callable
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from adapters.sqlite_store import SqliteStore
from domain.commands import Command
from domain.ledger import Draft
from domain.state import ScopeKey, ScopeState
from tests.adapters.store_support import (
    Driver,
    bid,
    checkpoint,
    create,
    finalize,
    open_round,
    register,
    rollback,
    withdraw,
)

SCOPES: list[ScopeKey] = [(2026, "North"), (2026, "South"), (2027, "North")]
INITIALS = ["AB", "CD", "EF", "GH", "IJ", "KL"]
KINDS = [0, 0, 0, 1, 2, 2, 2, 3, 3, 4, 5, 6, 7]  # register, open, bid x2, withdraw, ...

# (scope, kind, a, b, ends_batch): interpreted against the draft's working state
Op = tuple[int, int, int, int, bool]
ops = st.lists(
    st.tuples(
        st.integers(0, len(SCOPES) - 1),
        st.sampled_from(KINDS),
        st.integers(0, 30),
        st.integers(0, 30),
        st.booleans(),
    ),
    min_size=20,
    max_size=60,
)


def maker(op: Op, driver: Driver) -> Callable[[Draft], Command]:
    """A command chosen from the draft's working state, so that most are valid; the
    ``a % 7 == 0`` cases aim wrong on purpose (refused, and left out of the batch)."""
    scope, kind, a, b, _ = op
    key = SCOPES[scope]

    def make(draft: Draft) -> Command:
        state = draft.state(key) or ScopeState(*key)
        users = [u.initials for u in state.users] or INITIALS[:1]
        user = users[a % len(users)] if a % 7 else INITIALS[a % len(INITIALS)]
        current = state.open_round()
        number = current.round if current is not None and a % 7 else len(state.rounds) + 1
        builders: list[Callable[[], Command]] = [
            lambda: register(INITIALS[(a + b) % len(INITIALS)], key),
            lambda: open_round(len(state.rounds) + (1 if a % 7 else 2), key, 1 + b % 2),
            lambda: bid(user, number, *{1 + b % 5, 1 + (a + b) % 8}, key=key),
            lambda: bid(user, number, 1 + b % 3, key=key),
            lambda: withdraw(user, number, key),
            lambda: finalize(number, key),
            lambda: checkpoint(key, label=None if b % 2 else f"label {b}"),
            lambda: rollback(_target(driver, draft, key, b), key),
        ]
        return builders[kind % len(builders)]()

    return make


def _target(driver: Driver, draft: Draft, key: ScopeKey, pick: int) -> int:
    entries = [*driver.entries, *draft.entries]
    ids = [e.event.event_id for e in entries if e.event.scope == key]
    return ids[pick % len(ids)] if ids else pick + 1


async def check_every_point(store: SqliteStore, driver: Driver) -> None:
    """By event id at every N, by time at every event's ``recorded_at``, and now."""
    head = (await store.head()).event_id
    times = {e.event.recorded_at: e.event.event_id for e in driver.entries}  # last id wins
    for key in SCOPES:
        for n in range(head + 1):
            assert await store.state_at(key, at_event=n) == driver.expected(key, n), (key, n)
        for text, last in times.items():
            moment = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
            assert await store.state_at(key, at_time=moment) == driver.expected(key, last)
        assert await store.state_at(key) == driver.ledger.state(key)


@settings(max_examples=80)
@given(script=ops, checkpoint_every=st.sampled_from([0, 2, 3, 1000]))
async def test_state_at_every_event_equals_the_folded_state(
    script: list[Op], checkpoint_every: int
) -> None:
    with tempfile.TemporaryDirectory() as folder:
        db = Path(folder) / "db.sqlite3"
        store = await SqliteStore.open(db, synchronous="normal")
        try:
            driver = Driver(store, checkpoint_every=checkpoint_every)
            batch: list[Command | Callable[[Draft], Command]] = [create(key) for key in SCOPES[:2]]
            for op in script:
                batch.append(maker(op, driver))
                if op[4]:
                    await driver.run(*batch, skip_refused=True)
                    batch = []
            await driver.run(*batch, skip_refused=True)
            await check_every_point(store, driver)
            await check_every_point(store, driver)
        finally:
            await store.close()

        again = await SqliteStore.open(db, writer=False)
        try:
            await check_every_point(again, driver)
            recovered = await again.recover()
            assert recovered.scopes == driver.ledger.scopes
            assert recovered.since_snapshot == driver.ledger.since_snapshot
            verified = await again.verify()
            assert verified["events"] == len(driver.entries)
        finally:
            await again.close()
