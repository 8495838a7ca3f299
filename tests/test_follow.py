"""The state events of replicas (heartbeat_consumer.core.follow): pure, no broker."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest

from heartbeat_consumer.bus.provision import InboxOptions
from heartbeat_consumer.bus.settings import InboxSettings
from heartbeat_consumer.core.config import Pause
from heartbeat_consumer.core.follow import (
    StateChange,
    StateEventError,
    apply_change,
    parse_state_event,
    pauses_change,
    run_change,
    snapshot_change,
)
from heartbeat_consumer.core.state import STATUSES, AgentState, CheckState, record_run
from heartbeat_consumer.core.topology import RUN_STATUSES, follow_queue, state_bindings
from heartbeat_consumer.runtime.engine import AgentRunner

SLOT = 1_800_000_000_000


def ran(state: AgentState, check: str, slot: int, status: Any = "success") -> AgentState:
    return record_run(
        state,
        check=check,
        cadence_ms=60_000,
        slot_ms=slot,
        status=status,
        finished_ms=slot + 5,
        duration_ms=5,
        key=f"a:{check}:{slot}",
    )


def event(
    change: StateChange | None, *, agent: str = "a", origin: str = "o", **extra: Any
) -> bytes:
    fields = {} if change is None else change.to_json()
    payload = {"agent": agent, "origin": origin, **fields, **extra}
    return orjson.dumps({"event_id": "e", "event_type": "x", "payload": payload})


def in_result(change: StateChange) -> bytes:
    payload = {"agent": "a", "origin": "o", **change.to_json()}
    result = {"check": "c", "status": "success", "state_change": payload}
    return orjson.dumps({"event_id": "e", "payload": result})


def test_a_run_applied_on_a_standby_gives_the_active_s_state_of_that_check() -> None:
    active = ran(ran(AgentState(), "c", SLOT), "d", SLOT)
    active = ran(active, "c", SLOT + 60_000, "failed")  # a backoff, a failure count
    standby = AgentState(agent="a", checks={"d": CheckState(last_run=1)})
    origin, change = parse_state_event(in_result(run_change(active, "c", ("req-1",))), "a") or (
        "",
        None,
    )
    assert origin == "o" and change is not None and change.requests == ("req-1",)
    after = apply_change(standby, change)
    assert after.checks["c"] == active.checks["c"]
    assert after.checks["c"].next_retry is not None and after.checks["c"].consecutive_failures == 1
    assert after.checks["d"] == CheckState(last_run=1), "other checks are left as they were"
    assert after.history[-1] == active.history[-1]
    assert apply_change(after, change) == after, "applied twice: the same"


def test_pauses_and_snapshots_replace_what_they_name() -> None:
    standby = ran(AgentState(agent="a", pauses={"x": Pause()}), "c", SLOT)
    change = pauses_change({"c": Pause(until=SLOT + 1, reason="r")}, 1)
    after = apply_change(standby, parse_state_event(event(change), "a")[1])  # type: ignore[index]
    assert after.pauses == {"c": Pause(until=SLOT + 1, reason="r")}
    assert after.checks == standby.checks
    assert after.pauses_version == 1
    active = ran(AgentState(agent="other", pauses_version=5), "d", SLOT)
    whole = apply_change(standby, snapshot_change(active))
    assert whole.checks == {**standby.checks, **active.checks}, "merged check by check"
    assert whole.pauses == {} and whole.pauses_version == 5 and whole.agent == "a"
    assert set(whole.history) == {*standby.history, *active.history}


def test_events_that_carry_no_change_are_ignored() -> None:
    plain_result = orjson.dumps({"payload": {"check": "c", "status": "success"}})
    alert = orjson.dumps({"payload": {"agent": "a", "kind": "timeout"}})
    assert parse_state_event(plain_result, "a") is None
    assert parse_state_event(alert, "a") is None


@pytest.mark.parametrize(
    ("body", "why"),
    [
        (b"{", "not JSON"),
        (b"[]", "payload"),
        (event(pauses_change({}, 1), agent="b"), "for agent 'b'"),
        (event(pauses_change({}, 1), origin=""), "origin"),
        (event(None, kind="snapshot", snapshot={"history": 5}), "invalid"),
        (event(None, kind="run"), "check and state"),
        (event(None, kind="run", check="a.b", state={}), "check name"),
        (event(None, kind="pauses"), "pauses"),
        (event(None, kind="snapshot"), "snapshot"),
        (event(None, kind="nope"), "invalid state event"),
        (event(None, kind="pauses", pauses={str(i): {} for i in range(1001)}), "1001 pauses"),
        (event(None, kind="run", check="c", state={}, requests=["r"] * 21), "invalid"),
        (event(None, kind="run", check="c", state={"lastRun": "x"}), "invalid"),
        (event(None, kind="run", check="c", state={"nextRetry": 1e20}), "invalid"),
        (orjson.dumps({"payload": {"state_change": 3}}), "not an object"),
    ],
)
def test_state_events_that_cannot_be_used_say_why_in_one_line(body: bytes, why: str) -> None:
    with pytest.raises(StateEventError, match=why) as caught:
        parse_state_event(body, "a")
    assert "\n" not in str(caught.value)


def test_values_out_of_range_are_repaired_as_in_a_state_file() -> None:
    body = event(
        None,
        kind="run",
        check="c",
        state={"lastRun": 10**17, "nextRetry": -(10**18), "runs": -1},
        entry={"check": "c", "slot": 10**17, "status": "success", "durationMs": 1},
    )
    change = parse_state_event(body, "a")
    assert change is not None
    after = apply_change(AgentState(), change[1])
    assert after.checks["c"].last_run is None and after.checks["c"].next_retry is None
    assert after.checks["c"].runs == 0 and after.history == ()
    forever = event(None, kind="pauses", pauses={"c": {"until": 1e17}})
    paused = apply_change(AgentState(), parse_state_event(forever, "a")[1])  # type: ignore[index]
    assert paused.pauses["c"].until is None, "out of range: holds until resumed"


def test_a_replica_has_a_state_queue_that_hears_state_events_and_results() -> None:
    assert RUN_STATUSES == STATUSES
    assert follow_queue("a", "host-1") == "agent.a.state.host-1"
    assert state_bindings("a") == (
        "heartbeat.a._state.#",
        *(f"heartbeat.a.*.{s}" for s in STATUSES),
    )
    with pytest.raises(ValueError, match="replica name"):
        InboxSettings(replica="a.b")
    with pytest.raises(ValueError, match="replica name"):
        InboxOptions(replica="*")
    arguments = InboxSettings(replica="host-1").queue_options().arguments()
    assert arguments == {"x-queue-type": "classic", "x-single-active-consumer": True}


@pytest.mark.parametrize(
    ("key", "applied"),
    [
        ("heartbeat.a._state._pauses", True),
        ("heartbeat.a.c.success", True),
        ("heartbeat.a.c.timeout", True),
        ("heartbeat.b._state._pauses", False),  # another agent's key (a CC'd copy)
        ("heartbeat.b.c.success", False),
        ("heartbeat.a._alert.timeout", False),  # the monitor's word
        ("heartbeat.a.c.started", False),
        ("agent.a.heartbeat.sync", False),
        ("", False),
    ],
)
def test_only_the_agent_s_own_keys_carry_its_changes(key: str, applied: bool) -> None:
    """Topic permissions check a publish's routing key, not its CC header: a copy in our
    queue keeps the key it was published under, which says who could publish it."""
    body = in_result(run_change(ran(AgentState(), "c", SLOT), "c"))
    assert (parse_state_event(body, "a", key) is not None) is applied


def test_a_result_carries_only_the_change_of_its_own_check() -> None:
    body = in_result(run_change(ran(AgentState(), "c", SLOT), "c"))
    with pytest.raises(StateEventError, match="in a result of d"):
        parse_state_event(body, "a", "heartbeat.a.d.success")


def test_a_change_older_than_what_a_replica_has_is_not_applied() -> None:
    """An old active's late result, a re-sent one, a requeued state event: a check's
    state goes only forward (by its runs), the pauses only by their version."""
    old = ran(AgentState(), "c", SLOT)
    new = ran(old, "c", SLOT + 60_000, "failed")
    standby = apply_change(AgentState(), run_change(new, "c"))
    assert apply_change(standby, run_change(old, "c")) == standby
    assert apply_change(standby, run_change(new, "c")) == standby, "the same again"
    paused = apply_change(standby, pauses_change({"c": Pause()}, 3))
    assert apply_change(paused, pauses_change({}, 2)) == paused
    assert apply_change(paused, pauses_change({}, 3)) == paused
    assert apply_change(paused, pauses_change({}, 4)).pauses == {}
    later = CheckState(runs=1, last_finished=SLOT + 10**6)  # fewer runs, but later
    merged = apply_change(
        paused, snapshot_change(AgentState(checks={"c": later}, pauses_version=9))
    )
    assert merged.checks["c"] == later and merged.pauses == {}
    restored = AgentState(checks={"c": CheckState(runs=99, last_finished=SLOT)}, pauses_version=8)
    assert apply_change(merged, snapshot_change(restored)).checks == merged.checks, (
        "an old state with higher counters (a backup restored) undoes nothing"
    )
    ahead = apply_change(merged, snapshot_change(new))
    assert (ahead.checks, ahead.pauses) == (merged.checks, merged.pauses), "older: not taken"


async def test_an_unsent_result_older_than_the_followed_state_goes_without_its_state(
    tmp_path: Path,
) -> None:
    """A's result for a slot could not be published; meanwhile B ran the check and A
    followed it. A's next tick sends the old result, but not its old state, and keeps
    B's."""
    config = tmp_path / "a.heartbeat.json"
    config.write_bytes(
        orjson.dumps({"agent": "a", "checks": {"c": {"cadenceMs": 60_000, "handler": "default"}}})
    )
    sent: list[str] = []
    failing = [True]

    async def on_result(result: Any) -> None:
        if failing[0]:
            raise ConnectionError("broker away")
        sent.append(result.idempotency_key)

    async def on_state(change: StateChange) -> None:
        pass

    runner = AgentRunner(
        config, state_path=tmp_path / "s.json", on_result=on_result, on_state=on_state
    )
    with pytest.raises(ConnectionError):
        await runner.tick(SLOT)
    assert runner.state.check("c").runs == 0, "not adopted"
    theirs = ran(ran(AgentState(), "c", SLOT), "c", SLOT + 60_000)
    await runner.follow([run_change(theirs, "c")])
    failing[0] = False
    report = await runner.tick(SLOT + 60_000)
    assert sent == [f"a:c:{SLOT}"], "the run happened: its result goes out"
    assert [r.change for r in report.results] == [None], "without its old change"
    assert runner.state.check("c") == theirs.check("c"), "not adopted; and not due"
