"""The monitor's dead-man's-switch rules (pure): incidents open once, resolve once, and
survive a restart of the monitor."""

from __future__ import annotations

from typing import Any

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from heartbeat_consumer.monitor.rules import (
    Alert,
    WatchConfig,
    WatchState,
    evaluate,
    next_due_at,
    observe,
    repair,
)

MIN = 60_000
T0 = 1_800_000_000_000


def status(agent: str, value: str) -> dict[str, Any]:
    return {"event_type": "heartbeat.status", "payload": {"agent": agent, "status": value}}


def started(agent: str, check: str, key: str, timeout_ms: int = MIN) -> dict[str, Any]:
    return {
        "event_type": "heartbeat.started",
        "payload": {
            "agent": agent,
            "check": check,
            "idempotency_key": key,
            "timeout_ms": timeout_ms,
            "cadence_ms": 15 * MIN,
        },
    }


def result(agent: str, check: str, value: str = "success", key: str = "") -> dict[str, Any]:
    return {
        "event_type": "heartbeat.result",
        "payload": {
            "agent": agent,
            "check": check,
            "status": value,
            "idempotency_key": key,
            "cadence_ms": 15 * MIN,
        },
    }


def kinds(alerts: list[Alert]) -> list[tuple[str, str, str | None]]:
    return [(a.agent, a.kind, a.check) for a in alerts]


CONFIG = WatchConfig(stale_ms=5 * MIN)  # the rules at a 5-minute threshold (the default is 10)


def test_an_agent_that_goes_silent_is_stale_once_then_resolved() -> None:
    state = observe(WatchState(), status("a", "online"), T0)
    state, alerts = evaluate(state, CONFIG, T0 + 5 * MIN)
    assert alerts == []  # exactly the threshold: not yet
    state, alerts = evaluate(state, CONFIG, T0 + 5 * MIN + 1)
    assert kinds(alerts) == [("a", "stale", None)]
    assert alerts[0].severity == "warning"
    for minute in range(6, 30):
        state, alerts = evaluate(state, CONFIG, T0 + minute * MIN)
        assert alerts == [], "an open incident is not sent again"
    state = observe(state, result("a", "c"), T0 + 30 * MIN)
    state, alerts = evaluate(state, CONFIG, T0 + 30 * MIN)
    assert kinds(alerts) == [("a", "resolved", None)]
    assert "stale resolved after" in alerts[0].detail
    assert state.incidents == {}


def test_repeat_reminds_at_the_configured_interval() -> None:
    config = WatchConfig(stale_ms=5 * MIN, repeat_ms=10 * MIN)
    state = observe(WatchState(), status("a", "online"), T0)
    sent = []
    for minute in range(0, 40):
        state, alerts = evaluate(state, config, T0 + minute * MIN)
        sent += [(minute, a.repeat) for a in alerts]
    assert sent == [(6, False), (16, True), (26, True), (36, True)]


def test_per_agent_stale_threshold_and_offline_agents_are_not_stale() -> None:
    config = WatchConfig(stale_ms_by_agent={"slow": 60 * MIN})
    state = WatchState()
    for agent in ("slow", "fast", "gone"):
        state = observe(state, status(agent, "online"), T0)
    state = observe(state, status("gone", "offline"), T0 + MIN)
    state, alerts = evaluate(state, config, T0 + 30 * MIN)
    assert kinds(alerts) == [("fast", "stale", None)]


def test_a_run_that_does_not_finish_within_its_timeout_is_an_error() -> None:
    state = observe(WatchState(), started("a", "c", "a:c:1", timeout_ms=MIN), T0)
    state, alerts = evaluate(state, CONFIG, T0 + MIN + 30_000)  # timeout + grace: not yet
    assert alerts == []
    state, alerts = evaluate(state, CONFIG, T0 + MIN + 30_001)
    assert kinds(alerts) == [("a", "timeout", "c")]
    assert alerts[0].severity == "error"
    state = observe(state, result("a", "c", "timeout", key="a:c:1"), T0 + 2 * MIN)
    state, alerts = evaluate(state, CONFIG, T0 + 2 * MIN)
    assert kinds(alerts) == [("a", "resolved", "c")]


def test_a_result_of_an_older_run_does_not_clear_the_running_one() -> None:
    state = observe(WatchState(), started("a", "c", "a:c:2"), T0)
    state = observe(state, result("a", "c", key="a:c:1"), T0 + 1)
    assert state.agents["a"].checks["c"].running_key == "a:c:2"


def test_missed_when_the_last_success_is_older_than_cadence_plus_grace() -> None:
    state = observe(WatchState(), result("a", "c"), T0)
    keep_alive = status("a", "online")
    for minute in range(1, 18):
        state = observe(state, keep_alive, T0 + minute * MIN)
        state, alerts = evaluate(state, CONFIG, T0 + minute * MIN)
        assert alerts == [], minute  # 15 min cadence + 2 min grace
    state = observe(state, result("a", "c", "failed"), T0 + 17 * MIN + 1)
    state, alerts = evaluate(state, CONFIG, T0 + 17 * MIN + 1)
    assert kinds(alerts) == [("a", "missed", "c")]
    assert "last success 17m ago" in alerts[0].detail
    state = observe(state, result("a", "c", "alert"), T0 + 18 * MIN)  # alert = it ran
    state, alerts = evaluate(state, CONFIG, T0 + 18 * MIN)
    assert kinds(alerts) == [("a", "resolved", "c")]


def test_a_check_that_never_succeeds_is_missed_from_when_it_was_first_seen() -> None:
    state = observe(WatchState(), result("a", "c", "failed"), T0)
    state = observe(state, status("a", "online"), T0 + 17 * MIN + 1)
    state, alerts = evaluate(state, CONFIG, T0 + 17 * MIN + 1)
    assert kinds(alerts) == [("a", "missed", "c")]
    assert "no success since first seen" in alerts[0].detail


def test_incidents_survive_a_monitor_restart_and_are_not_sent_again() -> None:
    state = observe(WatchState(), status("a", "online"), T0)
    state, alerts = evaluate(state, CONFIG, T0 + 10 * MIN)
    assert len(alerts) == 1
    restored = WatchState.from_json(state.to_json())
    assert restored == state
    restored, alerts = evaluate(restored, CONFIG, T0 + 11 * MIN)
    assert alerts == []


def test_events_without_an_agent_are_ignored() -> None:
    state = WatchState()
    assert observe(state, {"event_type": "heartbeat.result", "payload": {}}, T0) == state
    assert observe(state, {"event_type": "x"}, T0) == state


def test_any_status_but_offline_is_a_sign_of_life_and_alerts_are_not() -> None:
    """A monitor started after its agents said ``online`` learns of them from ``alive``;
    its own alerts (which come back through ``heartbeat.#``) never count as life."""
    state = observe(WatchState(), status("a", "alive"), T0)
    assert state.agents["a"].online
    assert state.agents["a"].status == "alive"
    alert = {"event_type": "heartbeat.alert", "payload": {"agent": "a", "kind": "stale"}}
    assert observe(state, alert, T0 + 9 * MIN) == state
    state, alerts = evaluate(state, CONFIG, T0 + 9 * MIN)
    assert kinds(alerts) == [("a", "stale", None)]


def test_next_due_is_the_last_successful_slot_plus_the_cadence() -> None:
    event = result("a", "c")
    event["payload"] |= {"slot": "2027-01-15T08:00:00.000Z", "duration_ms": 12}
    state = observe(WatchState(), event, T0 + 5_000)
    check = state.agents["a"].checks["c"]
    assert check.last_slot == T0  # T0 is 2027-01-15T08:00:00Z
    assert next_due_at(check) == check.last_slot + 15 * MIN
    assert check.duration_ms == 12
    failed = result("a", "c", "failed")
    failed["payload"]["error"] = "x" * 5000
    check = observe(state, failed, T0 + 1).agents["a"].checks["c"]
    assert check.last_slot == state.agents["a"].checks["c"].last_slot  # failures keep lastRun
    assert check.last_error == "x" * 200
    assert check.failures == 1
    again = observe(observe(state, failed, T0 + 1), failed, T0 + 2)
    assert again.agents["a"].checks["c"].failures == 2
    assert observe(again, result("a", "c"), T0 + 3).agents["a"].checks["c"].failures == 0


def test_agents_silent_for_the_forget_period_are_dropped() -> None:
    config = WatchConfig(forget_ms=60 * MIN)
    state = observe(WatchState(), status("gone", "offline"), T0)
    state = observe(state, status("here", "online"), T0 + 50 * MIN)
    state, _ = evaluate(state, config, T0 + 60 * MIN)
    assert set(state.agents) == {"gone", "here"}
    state, _ = evaluate(state, config, T0 + 60 * MIN + 1)
    assert set(state.agents) == {"here"}


EVENTS = st.lists(
    st.tuples(
        st.integers(0, 120),  # minute
        st.sampled_from(
            ["online", "offline", "alive", "config_invalid", "started", "success", "failed"]
        ),
        st.sampled_from(["a", "b"]),
        st.sampled_from(["c", "d"]),
    ),
    max_size=30,
)


@settings(max_examples=200, deadline=None)
@given(EVENTS, st.integers(0, 200))
def test_every_incident_opens_once_and_resolves_once(
    events: list[tuple[int, str, str, str]], horizon: int
) -> None:
    """Over any event history: an incident id alternates open, resolved, open...; a second
    evaluation at the same time sends nothing; the state round-trips through JSON."""
    state = WatchState()
    timeline = sorted(events)
    is_open: dict[str, bool] = {}
    for minute in range(horizon):
        for at, what, agent, check in timeline:
            if at == minute:
                if what in ("online", "offline", "alive", "config_invalid"):
                    event = status(agent, what)
                elif what == "started":
                    event = started(agent, check, f"{agent}:{check}:{minute}")
                else:
                    event = result(agent, check, what, f"{agent}:{check}:{minute - 1}")
                event["payload"]["slot"] = T0 + minute * MIN
                state = observe(state, event, T0 + minute * MIN)
        state, alerts = evaluate(state, CONFIG, T0 + minute * MIN)
        for alert in alerts:
            opening = alert.kind != "resolved"
            assert is_open.get(alert.incident, False) != opening, (minute, alert)
            is_open[alert.incident] = opening
        assert set(state.incidents) == {k for k, v in is_open.items() if v}
        again, repeat = evaluate(state, CONFIG, T0 + minute * MIN)
        assert repeat == []
        assert again == state
    assert WatchState.from_json(state.to_json()) == state


# --- config_invalid: an agent whose heartbeat.json is unusable ------------------------------


def invalid(
    agent: str, error: object = "heartbeat.json: Expecting value (line 1)"
) -> dict[str, Any]:
    event = status(agent, "config_invalid")
    event["payload"]["error"] = error
    return event


def ran(agent: str, check: str, slot: int, value: str | None = None) -> dict[str, Any]:
    """A tick's started event (``value`` None) or result, as a consumer sends them."""
    if value is None:
        event = started(agent, check, f"{agent}:{check}:{slot}")
    else:
        event = result(agent, check, value, key=f"{agent}:{check}:{slot}")
    event["payload"]["slot"] = slot
    return event


def test_config_invalid_opens_from_the_first_event_of_an_agent_never_valid() -> None:
    """The first event the monitor ever hears of the agent is its config_invalid: one
    error alert with the reason (bounded), not sent again while the agent repeats it
    every tick, resolved once by ``alive``."""
    state = observe(WatchState(), invalid("a", "x" * 5000), T0)
    state, alerts = evaluate(state, CONFIG, T0)
    assert kinds(alerts) == [("a", "config_invalid", None)]
    (alert,) = alerts
    assert alert.severity == "error"
    assert alert.incident == "a:config_invalid:*"
    assert alert.detail == "x" * 200
    assert alert.to_payload()["kind"] == "config_invalid"
    for minute in range(1, 20):  # the agent says it again on every tick
        state = observe(state, invalid("a"), T0 + minute * MIN)
        state, alerts = evaluate(state, CONFIG, T0 + minute * MIN)
        assert alerts == [], minute
    assert state.incidents["a:config_invalid:*"].detail.startswith("heartbeat.json: Expecting")
    state = observe(state, status("a", "alive"), T0 + 20 * MIN)
    state, alerts = evaluate(state, CONFIG, T0 + 20 * MIN)
    assert kinds(alerts) == [("a", "resolved", None)]
    assert alerts[0].incident == "a:config_invalid:*"
    assert "config_invalid resolved after 20m" in alerts[0].detail
    assert state.incidents == {}
    state, alerts = evaluate(state, CONFIG, T0 + 21 * MIN)
    assert alerts == []


def test_config_invalid_without_a_reason_still_opens() -> None:
    _, alerts = evaluate(observe(WatchState(), invalid("a", None), T0), CONFIG, T0)
    assert kinds(alerts) == [("a", "config_invalid", None)]
    assert "no reason" in alerts[0].detail


def test_online_and_offline_keep_config_invalid_open_online_then_alive_resolves() -> None:
    """Stopping a broken agent does not fix its file: offline keeps the incident (and is
    not stale); a restart's online says nothing about the config; its alive does."""
    state = observe(WatchState(), status("a", "online"), T0)
    state = observe(state, invalid("a"), T0 + 1)
    state, alerts = evaluate(state, CONFIG, T0 + 1)
    assert kinds(alerts) == [("a", "config_invalid", None)]
    state = observe(state, status("a", "offline"), T0 + MIN)
    for minute in (2, 30, 600):
        state, alerts = evaluate(state, CONFIG, T0 + minute * MIN)
        assert alerts == []
        assert list(state.incidents) == ["a:config_invalid:*"]
    state = observe(state, status("a", "online"), T0 + 601 * MIN)
    state, alerts = evaluate(state, CONFIG, T0 + 601 * MIN)
    assert alerts == []
    state = observe(state, status("a", "alive"), T0 + 601 * MIN + 5)
    state, alerts = evaluate(state, CONFIG, T0 + 601 * MIN + 5)
    assert kinds(alerts) == [("a", "resolved", None)]


def test_runs_of_the_last_good_config_do_not_resolve_config_invalid() -> None:
    """An agent whose config broke keeps running its last good one and announces
    config_invalid after each tick's runs: evaluations between a run and that
    announcement do not resolve (no flapping). Once fixed, its ticks run without
    announcing it: the run of the next tick resolves the incident."""
    state = observe(WatchState(), ran("a", "c", T0, "success"), T0 + 1)
    state = observe(state, invalid("a"), T0 + 2)
    state, alerts = evaluate(state, CONFIG, T0 + 2)
    assert kinds(alerts) == [("a", "config_invalid", None)]
    for minute in range(1, 10):  # a tick: started, (evaluation), result, (evaluation), invalid
        slot = T0 + minute * MIN
        for offset, event in ((1, ran("a", "c", slot)), (40_000, ran("a", "c", slot, "failed"))):
            state = observe(state, event, slot + offset)
            state, alerts = evaluate(state, CONFIG, slot + offset + 1)
            assert alerts == [], minute
        state = observe(state, invalid("a"), slot + 40_002)
    # A result re-sent after an outage and a manual run in the minute already announced
    # (its slot is that minute), then the next tick's run: still invalid.
    last = T0 + 9 * MIN
    state = observe(state, ran("a", "c", T0, "success"), last + 50_000)
    state = observe(state, ran("a", "c", last, "success"), last + 55_000)
    state = observe(state, ran("a", "c", last + MIN), last + MIN + 1)
    state, alerts = evaluate(state, CONFIG, last + MIN + 2)
    assert alerts == []
    assert state.agents["a"].config_error is not None
    # Fixed: that tick ends without config_invalid; the next tick's run shows it.
    state = observe(state, ran("a", "c", last + MIN, "success"), last + MIN + 10)
    state, alerts = evaluate(state, CONFIG, last + 2 * MIN - 1)
    assert alerts == []
    state = observe(state, ran("a", "c", last + 2 * MIN), last + 2 * MIN + 1)
    state, alerts = evaluate(state, CONFIG, last + 2 * MIN + 2)
    assert kinds(alerts) == [("a", "resolved", None)]
    assert state.agents["a"].config_error is None


def test_config_invalid_reminds_like_the_other_kinds() -> None:
    config = WatchConfig(repeat_ms=10 * MIN)
    state = WatchState()
    sent = []
    for minute in range(0, 31):
        state = observe(state, invalid("a"), T0 + minute * MIN)
        state, alerts = evaluate(state, config, T0 + minute * MIN)
        sent += [(minute, a.kind, a.repeat) for a in alerts]
    assert sent == [
        (0, "config_invalid", False),
        (10, "config_invalid", True),
        (20, "config_invalid", True),
        (30, "config_invalid", True),
    ]


def test_config_invalid_survives_a_state_save_and_load() -> None:
    """A restarted monitor remembers the open incident and the reason, does not send it
    again, and still resolves it; a state file of a version without the kind loads."""
    state = observe(WatchState(), invalid("a"), T0)
    state, alerts = evaluate(state, CONFIG, T0)
    assert len(alerts) == 1
    restored = WatchState.from_json(state.to_json())
    assert restored == state
    assert repair(restored) == (restored, 0)
    assert restored.incidents["a:config_invalid:*"].kind == "config_invalid"
    assert restored.agents["a"].config_error == "heartbeat.json: Expecting value (line 1)"
    restored, alerts = evaluate(restored, CONFIG, T0 + MIN)
    assert alerts == []
    restored = observe(restored, status("a", "alive"), T0 + 2 * MIN)
    restored, alerts = evaluate(restored, CONFIG, T0 + 2 * MIN)
    assert kinds(alerts) == [("a", "resolved", None)]

    raw = orjson.loads(state.to_json())
    for key in ("config_error", "config_invalid_at", "ran_slot"):
        del raw["agents"]["a"][key]
    old = WatchState.from_json(orjson.dumps(raw))
    assert old.agents["a"].config_error is None
    # Written by hand or by another version: values out of range are repaired.
    raw = orjson.loads(state.to_json())
    raw["agents"]["a"].update(config_error="y" * 999, config_invalid_at=-(10**17))
    fixed, count = repair(WatchState.from_json(orjson.dumps(raw)))
    assert count == 2
    assert fixed.agents["a"].config_error == "y" * 200
    assert fixed.agents["a"].config_invalid_at is None


def test_a_started_folded_after_its_own_result_is_not_a_new_run() -> None:
    """Deliveries are handled concurrently: a run's started can be folded after its
    result. It must not leave the check shown as running (nor time it out later)."""
    state = observe(WatchState(), result("a", "c", key="a:c:1"), T0 + 5)
    state = observe(state, started("a", "c", "a:c:1", timeout_ms=MIN), T0)
    check = state.agents["a"].checks["c"]
    assert check.started_at is None
    assert check.last_status == "success"
    state, alerts = evaluate(state, CONFIG, T0 + 10 * MIN)
    assert [a for a in alerts if a.kind == "timeout"] == []
    # A forced rerun in the same slot (same key) starts after the result: it is running.
    state = observe(state, started("a", "c", "a:c:1"), T0 + 6)
    assert state.agents["a"].checks["c"].started_at == T0 + 6
