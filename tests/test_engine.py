from __future__ import annotations

import asyncio
import itertools
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from heartbeat_consumer import AgentRunner, CheckConfig, RunResult, register_handler
from heartbeat_consumer.handlers.registry import unregister_handler
from heartbeat_consumer.runtime.local import next_slot, run_local, run_once
from heartbeat_consumer.runtime.store import StateStore

MIN = 60_000
T0 = 1_795_000_000_000 - 1_795_000_000_000 % (24 * 60 * MIN)

WriteConfig = Callable[..., Path]


def config(checks: dict[str, dict[str, Any]], **top: Any) -> dict[str, Any]:
    return {"agent": "bot", "checks": checks, **top}


class Recorder:
    def __init__(self) -> None:
        self.results: list[RunResult] = []

    async def __call__(self, result: RunResult) -> None:
        self.results.append(result)


def runner_for(path: Path, **kwargs: Any) -> tuple[AgentRunner, Recorder]:
    rec = Recorder()
    runner = AgentRunner(path, on_result=rec, clock=lambda: T0 + 123, **kwargs)
    return runner, rec


async def test_tick_runs_due_check_and_saves_state(write_config: WriteConfig) -> None:
    path = write_config(config({"ping": {"cadenceMs": 15 * MIN, "handler": "default"}}))
    runner, rec = runner_for(path)
    report = await runner.tick(T0, {"event_id": "e1"})
    (result,) = report.results
    payload = result.to_payload()
    assert payload["agent"] == "bot"
    assert payload["check"] == "ping"
    assert payload["status"] == "success"
    assert payload["idempotency_key"] == f"bot:ping:{T0}"
    assert payload["overdue_ratio"] is None, "never run: infinitely overdue, sent as null"
    assert rec.results == [result]
    saved, _ = StateStore(path.with_name("heartbeat.json.state.json")).load()
    assert saved.check("ping").last_run == T0
    assert orjson.loads(path.read_bytes()) == config(
        {"ping": {"cadenceMs": 15 * MIN, "handler": "default"}}
    ), "heartbeat.json is never rewritten"


async def test_result_is_emitted_before_state_is_saved(write_config: WriteConfig) -> None:
    path = write_config(config({"ping": {"cadenceMs": MIN, "handler": "default"}}))
    state_path = path.parent / "state.json"
    seen: list[int | None] = []

    async def emit(result: RunResult) -> None:
        state, _ = StateStore(state_path).load()
        seen.append(state.check("ping").last_run)

    runner = AgentRunner(path, state_path=state_path, on_result=emit)
    await runner.tick(T0)
    assert seen == [None]
    assert StateStore(state_path).load()[0].check("ping").last_run == T0


async def test_failed_emit_leaves_state_unsaved_and_the_redelivered_tick_resends_not_reruns(
    write_config: WriteConfig,
) -> None:
    path = write_config(config({"ping": {"cadenceMs": MIN, "handler": "counted"}}))
    state_path = path.parent / "state.json"
    calls: list[str] = []

    @register_handler("counted")
    async def counted(payload: dict[str, Any], check: CheckConfig) -> dict[str, Any]:
        calls.append(payload["idempotency_key"])
        return {"status": "success", "n": len(calls)}

    async def emit(result: RunResult) -> None:
        raise ConnectionError("broker gone")

    runner = AgentRunner(path, state_path=state_path, on_result=emit)
    with pytest.raises(ConnectionError):
        await runner.tick(T0)
    assert not state_path.exists()
    assert runner.state.check("ping").last_run is None, "not adopted in memory either"
    with pytest.raises(ConnectionError):  # the broker is still gone at the redelivery
        await runner.tick(T0)
    assert calls == [f"bot:ping:{T0}"], "the handler ran once"
    rec = Recorder()
    runner.on_result = rec
    report = await runner.tick(T0)  # redelivered again, the broker is back
    assert [r.result for r in report.results] == [{"status": "success", "n": 1}]
    assert rec.results == report.results, "the kept result, re-sent"
    assert calls == [f"bot:ping:{T0}"], "not run a second time"
    assert StateStore(state_path).load()[0].check("ping").last_run == T0
    assert (await runner.tick(T0)).results == [], "done, and nothing left to re-send"


async def test_a_pause_between_failure_and_resend_is_kept(write_config: WriteConfig) -> None:
    from heartbeat_consumer.core.config import Pause

    path = write_config(config({"ping": {"cadenceMs": MIN, "handler": "default"}}))
    runner, rec = runner_for(path)

    async def down(result: RunResult) -> None:
        raise ConnectionError("broker gone")

    runner.on_result = down
    with pytest.raises(ConnectionError):
        await runner.tick(T0)
    runner.set_pause("*", Pause(until=T0 + 60 * MIN, reason="maintenance"))
    runner.on_result = rec
    await runner.tick(T0)
    assert [r.check for r in rec.results] == ["ping"]
    assert runner.state.check("ping").last_run == T0
    assert "*" in runner.state.pauses
    assert len(runner.state.history) == 1


async def test_same_slot_twice_runs_once(write_config: WriteConfig) -> None:
    runner, rec = runner_for(write_config(config({"c": {"cadenceMs": MIN, "handler": "default"}})))
    await runner.tick(T0)
    await runner.tick(T0)
    assert len(rec.results) == 1


async def test_fifteen_minute_cadence_runs_every_fifteen_minutes(write_config: WriteConfig) -> None:
    runner, rec = runner_for(
        write_config(config({"c": {"cadenceMs": 15 * MIN, "handler": "default"}}))
    )
    for minute in range(61):
        await runner.tick(T0 + minute * MIN)
    assert [r.slot - T0 for r in rec.results] == [0, 15 * MIN, 30 * MIN, 45 * MIN, 60 * MIN]


async def test_failure_backs_off_and_others_still_run(write_config: WriteConfig) -> None:
    calls: list[str] = []

    @register_handler("t_flaky")
    async def flaky(tick_payload: dict[str, Any], check_config: CheckConfig) -> dict[str, Any]:
        calls.append(tick_payload["check_name"])
        raise RuntimeError("nope")

    path = write_config(
        config(
            {
                "flaky": {"cadenceMs": 60 * MIN, "handler": "t_flaky", "priority": 1},
                "steady": {"cadenceMs": 60 * MIN, "handler": "default", "priority": 2},
            }
        )
    )
    runner, rec = runner_for(path)
    for minute in range(8):
        await runner.tick(T0 + minute * MIN)
    by_minute = [((r.slot - T0) // MIN, r.check, r.status) for r in rec.results]
    assert by_minute == [
        (0, "flaky", "failed"),
        (1, "flaky", "failed"),  # 1 min backoff
        (2, "steady", "success"),  # flaky backs off 2 min: the other check gets its turn
        (3, "flaky", "failed"),
        (7, "flaky", "failed"),  # then 4 min
    ]
    assert rec.results[0].error == "RuntimeError: nope"
    state = runner.state.check("flaky")
    assert state.consecutive_failures == 4
    assert state.last_run is None


async def test_broken_config_keeps_last_good_and_reports_every_tick(
    write_config: WriteConfig, caplog: pytest.LogCaptureFixture
) -> None:
    path = write_config(config({"c": {"cadenceMs": MIN, "handler": "default"}}))
    runner, rec = runner_for(path)
    await runner.tick(T0)
    path.write_text('{"agent": "bot", "checks": {"c": ')
    for minute in (1, 2):
        report = await runner.tick(T0 + minute * MIN)
        assert report.config_error is not None
        assert "invalid JSON" in str(report.config_error)
    assert len(rec.results) == 3, "the last good config keeps running"
    assert sum("keeping the last good config" in r.message for r in caplog.records) == 2
    path.write_text(
        orjson.dumps(config({"c": {"cadenceMs": MIN, "handler": "default"}})).decode() + " "
    )
    report = await runner.tick(T0 + 3 * MIN)
    assert report.config_error is None
    assert len(report.results) == 1


async def test_no_good_config_yet_runs_nothing_without_raising(write_config: WriteConfig) -> None:
    runner, rec = runner_for(write_config("{oops"))
    report = await runner.tick(T0)
    assert report.plan is None
    assert report.config_error is not None
    assert rec.results == []


async def test_bad_checks_and_unknown_handlers_do_not_block_the_rest(
    write_config: WriteConfig, caplog: pytest.LogCaptureFixture
) -> None:
    path = write_config(
        config(
            {
                "a_string_cadence": {"cadenceMs": "900000", "handler": "default", "priority": 1},
                "b_unknown": {"cadenceMs": MIN, "handler": "no_such_handler", "priority": 1},
                "c_good": {"cadenceMs": MIN, "handler": "default", "priority": 9},
            }
        )
    )
    runner, rec = runner_for(path)
    caplog.set_level(logging.ERROR)
    report = await runner.tick(T0)
    await runner.tick(T0 + MIN)
    assert [r.check for r in rec.results] == ["c_good", "c_good"]
    assert [p.check for p in report.problems] == ["a_string_cadence"]
    messages = [r.message for r in caplog.records]
    assert any("a_string_cadence disabled" in m and "not of type 'integer'" in m for m in messages)
    assert any("b_unknown disabled: unknown handler 'no_such_handler'" in m for m in messages)
    assert len(messages) == 2, "check problems are reported once per config version"


async def test_unwritable_state_is_reported_not_fatal_and_not_rerun(
    write_config: WriteConfig, tmp_path: Path
) -> None:
    path = write_config(config({"c": {"cadenceMs": 10 * MIN, "handler": "default"}}))
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    runner, rec = runner_for(path, state_path=state_dir / "s.json")
    runner.start()
    state_dir.rmdir()
    report = await runner.tick(T0)
    assert report.state_error is not None
    assert "cannot write state file" in str(report.state_error)
    await runner.tick(T0 + MIN)
    assert len(rec.results) == 1, "the run is remembered in memory"


async def test_corrupt_state_is_rebuilt_on_start(
    write_config: WriteConfig, caplog: pytest.LogCaptureFixture
) -> None:
    path = write_config(config({"c": {"cadenceMs": 10 * MIN, "handler": "default"}}))
    path.with_name("heartbeat.json.state.json").write_text("{{{")
    runner, rec = runner_for(path)
    await runner.tick(T0)
    assert len(rec.results) == 1
    assert any("was corrupt" in r.message for r in caplog.records)


async def test_handler_receives_the_documented_payload(write_config: WriteConfig) -> None:
    received: list[dict[str, Any]] = []

    @register_handler("t_capture")
    async def capture(tick_payload: dict[str, Any], check_config: CheckConfig) -> dict[str, Any]:
        received.append(tick_payload)
        return {"status": "success", "meta": check_config.meta}

    path = write_config(config({"c": {"cadenceMs": MIN, "handler": "t_capture", "meta": {"k": 1}}}))
    runner, rec = runner_for(path)
    await runner.tick(T0, {"event_id": "abc", "payload": {"tick_id": "x"}})
    (payload,) = received
    assert set(payload) == {"agent", "check_name", "timestamp", "envelope", "idempotency_key"}
    assert payload["timestamp"].endswith("Z")
    assert payload["envelope"]["event_id"] == "abc"
    assert payload["idempotency_key"] == f"bot:c:{T0}"
    assert rec.results[0].result == {"status": "success", "meta": {"k": 1}}


async def test_quarterly_compaction_and_sub_health_use_the_run_state(
    write_config: WriteConfig,
) -> None:
    path = write_config(
        config(
            {
                "noise": {"cadenceMs": MIN, "handler": "default", "priority": 1},
                "compact": {
                    "cadenceMs": 30 * MIN,
                    "handler": "quarterly_compaction",
                    "priority": 2,
                    "lastRun": T0,
                    "meta": {"keepPerCheck": 2},
                },
                "health": {
                    "cadenceMs": 60 * MIN,
                    "handler": "sub_health",
                    "priority": 0,
                    "lastRun": T0,
                },
            },
            maxChecksPerTick=3,
        )
    )
    runner, rec = runner_for(path)
    for minute in range(31):
        await runner.tick(T0 + minute * MIN)
    compaction = next(r for r in rec.results if r.check == "compact")
    assert compaction.result["removed"] == 29
    assert compaction.result["kept"] == 2
    history = [(h.check, (h.slot - T0) // MIN) for h in runner.state.history]
    assert history == [("noise", 29), ("noise", 30), ("compact", 30)]
    await runner.tick(T0 + 60 * MIN)
    health = next(r for r in rec.results if r.check == "health")
    assert health.result["checks"]["noise"]["last_status"] == "success"
    assert health.status == "success"
    assert health.result["pid"] > 0


def test_next_slot_skips_missed_boundaries_instead_of_bursting() -> None:
    assert next_slot(T0, T0 + 5_000, MIN) == T0 + MIN
    assert next_slot(T0, T0 + MIN + 1, MIN) == T0 + MIN
    assert next_slot(T0, T0 + 10 * MIN + 30_000, MIN) == T0 + 10 * MIN


async def test_run_local_ticks_on_boundaries_with_slot_timestamps(
    write_config: WriteConfig,
) -> None:
    path = write_config(config({"c": {"cadenceMs": 100, "handler": "default"}}))
    rec = Recorder()
    runner = AgentRunner(path, on_result=rec)
    ticks = await run_local(runner, every_ms=100, max_ticks=4)
    assert ticks == 4
    slots = [r.slot for r in rec.results]
    assert all(s % 100 == 0 for s in slots)
    assert [b - a for a, b in itertools.pairwise(slots)] == [100, 100, 100]


async def test_run_local_stops_when_asked(write_config: WriteConfig) -> None:
    runner = AgentRunner(write_config(config({"c": {"cadenceMs": MIN, "handler": "default"}})))
    stop = asyncio.Event()
    task = asyncio.create_task(run_local(runner, every_ms=60 * MIN, stop=stop))
    await asyncio.sleep(0.2)
    stop.set()
    assert await asyncio.wait_for(task, 2) == 1


async def test_run_once_uses_the_slot_containing_now(write_config: WriteConfig) -> None:
    runner, rec = runner_for(
        write_config(config({"c": {"cadenceMs": 15 * MIN, "handler": "default"}}))
    )
    await run_once(runner, every_ms=MIN, now_ms=T0 + 59_999)
    await run_once(runner, every_ms=MIN, now_ms=T0 + 15 * MIN + 400)  # cron fired a bit late
    assert [r.slot for r in rec.results] == [T0, T0 + 15 * MIN]


def test_exclusive_lock(write_config: WriteConfig) -> None:
    path = write_config(config({}))
    first, second = AgentRunner(path), AgentRunner(path)
    with first.exclusive() as mine:
        assert mine
        with second.exclusive() as theirs:
            assert not theirs
    with second.exclusive() as theirs:
        assert theirs


async def test_agent_name_given_by_the_transport_wins_over_the_file(
    write_config: WriteConfig, caplog: pytest.LogCaptureFixture
) -> None:
    path = write_config(config({"c": {"cadenceMs": MIN, "handler": "default"}}))
    rec = Recorder()
    runner = AgentRunner(path, on_result=rec, agent="queue-name")
    await runner.tick(T0)
    (result,) = rec.results
    assert result.agent == "queue-name"
    assert result.idempotency_key == f"queue-name:c:{T0}"
    assert any("says agent 'bot'; running it as 'queue-name'" in r.message for r in caplog.records)


async def test_cost_accounting_counts_wall_time_and_ticks_not_due(
    write_config: WriteConfig,
) -> None:
    """A 15-minute check on one-minute ticks: 3 runs in 31 ticks, 28 ticks avoided as not
    due (added to the state with the runs), and the runs' wall time."""
    path = write_config(config({"c": {"cadenceMs": 15 * MIN, "handler": "default"}}))
    clock = itertools.count(T0, 7)  # every reading 7 ms later: each run lasts 7 ms
    runner = AgentRunner(path, clock=lambda: next(clock))
    for minute in range(31):
        await runner.tick(T0 + minute * MIN)
    state = runner.state.check("c")
    assert state.runs == 3
    assert state.avoided == {"not-due": 28}
    assert state.wall_ms == 3 * 7
    saved, _ = StateStore(path.with_name(path.name + ".state.json")).load()
    assert saved.check("c").avoided == {"not-due": 28}


YEAR = 365 * 24 * 60 * MIN


async def test_a_last_run_in_the_future_is_clamped_to_the_slot_with_a_warning(
    write_config: WriteConfig, caplog: pytest.LogCaptureFixture
) -> None:
    """A clock that was wrong (or a hand edit) once wrote a lastRun a year ahead: the
    check runs again one cadence after now, not in a year."""
    checks = {
        "from_state": {"cadenceMs": 15 * MIN, "handler": "default"},
        "from_config": {"cadenceMs": 15 * MIN, "handler": "default", "lastRun": T0 + YEAR},
    }
    path = write_config(config(checks, maxChecksPerTick=2))
    state = path.with_name("state.json")
    state.write_bytes(orjson.dumps({"checks": {"from_state": {"lastRun": T0 + YEAR}}}))
    runner, rec = runner_for(path, state_path=state)
    assert (await runner.tick(T0)).results == []
    assert "is after the slot" in caplog.text
    ran = [r.check for s in range(1, 17) for r in (await runner.tick(T0 + s * MIN)).results]
    assert sorted(ran) == ["from_config", "from_state"], "each runs once a cadence after now"
    assert {r.slot for r in rec.results} == {T0 + 15 * MIN}


async def test_a_config_edited_to_floats_is_picked_up_not_ignored(
    write_config: WriteConfig,
) -> None:
    path = write_config(config({"c": {"cadenceMs": 15 * MIN, "handler": "default"}}))
    runner, _ = runner_for(path)
    await runner.tick(T0)
    path.write_bytes(
        orjson.dumps(
            config(
                {"c": {"cadenceMs": 60_000.0, "handler": "default", "priority": 1.0}},
                maxChecksPerTick=2.0,
            )
        )
    )
    report = await runner.tick(T0 + MIN)
    assert report.config_error is None
    assert [r.check for r in report.results] == ["c"]
    path.write_bytes(orjson.dumps(config({"c": {"cadenceMs": 60_000.5, "handler": "default"}})))
    report = await runner.tick(T0 + 2 * MIN)
    assert not report.results, "a fraction is a clear problem of that check"
    assert [str(p) for p in report.problems] == [
        "$.checks.c.cadenceMs: 60000.5 is not of type 'integer'"
    ]


async def test_a_fifo_or_a_device_as_config_blocks_nothing(
    tmp_path: Path, write_config: WriteConfig
) -> None:
    fifo = tmp_path / "fifo.heartbeat.json"
    os.mkfifo(fifo)
    device = tmp_path / "zero.heartbeat.json"
    device.symlink_to("/dev/zero")
    for path in (fifo, device):
        runner, _ = runner_for(path, state_path=tmp_path / f"{path.name}.state")
        report = await asyncio.wait_for(runner.tick(T0), 5)
        assert report.config_error is not None
        assert "not a regular file" in str(report.config_error)


async def test_the_started_event_is_confirmed_while_the_handler_runs_and_before_the_result(
    write_config: WriteConfig,
) -> None:
    """Pipelined: the started event's confirmation is awaited beside the handler, not
    before it (here it can only come once the handler has begun), and the result is
    handed on only after it."""
    handler_began = asyncio.Event()
    order: list[str] = []

    @register_handler("pipelined_probe")
    async def probe(payload: dict[str, Any], check: CheckConfig) -> dict[str, Any]:
        order.append("handler")
        handler_began.set()
        await asyncio.sleep(0.01)
        return {"status": "success"}

    async def on_start(run: Any) -> None:
        await handler_began.wait()  # a confirmation that arrives while the handler runs
        await asyncio.sleep(0.05)  # and after the handler is done
        order.append("started")

    path = write_config(config({"c": {"cadenceMs": MIN, "handler": "pipelined_probe"}}))
    runner, rec = runner_for(path, on_start=on_start)
    try:
        report = await asyncio.wait_for(runner.tick(T0, {"event_id": "e"}), 5)
    finally:
        unregister_handler("pipelined_probe")
    assert [r.status for r in report.results] == ["success"]
    assert order == ["handler", "started"]
    assert len(rec.results) == 1


async def test_a_started_event_that_fails_does_not_undo_the_run(
    write_config: WriteConfig, caplog: pytest.LogCaptureFixture
) -> None:
    """The handler has run by the time the started event's publish fails: its result is
    handed on and the state saved (not a second run on the redelivery)."""

    async def on_start(run: Any) -> None:
        raise ConnectionError("the broker went away")

    path = write_config(config({"c": {"cadenceMs": MIN, "handler": "default"}}))
    runner, rec = runner_for(path, on_start=on_start)
    report = await runner.tick(T0, {"event_id": "e"})
    assert [r.status for r in report.results] == ["success"]
    assert len(rec.results) == 1
    assert "started event not confirmed" in caplog.text
    saved, _ = StateStore(path.with_name("heartbeat.json.state.json")).load()
    assert saved.check("c").last_run == T0


async def test_a_run_cancelled_in_its_handler_leaves_no_started_event_behind(
    write_config: WriteConfig,
) -> None:
    """The started event is sent beside the handler; if the run is cancelled (shutdown,
    a lost connection) before that event went out, it is not sent afterwards."""
    began = asyncio.Event()
    announced: list[str] = []
    announcing_cancelled = asyncio.Event()

    @register_handler("cancelled_probe")
    async def probe(payload: dict[str, Any], check: CheckConfig) -> dict[str, Any]:
        began.set()
        await asyncio.sleep(3600)
        return {"status": "success"}

    async def on_start(run: Any) -> None:
        try:
            await asyncio.sleep(0.2)  # a confirmation still on its way
        except asyncio.CancelledError:
            announcing_cancelled.set()
            raise
        announced.append(run.idempotency_key)

    path = write_config(config({"c": {"cadenceMs": MIN, "handler": "cancelled_probe"}}))
    runner, rec = runner_for(path, on_start=on_start)
    try:
        task = asyncio.create_task(runner.tick(T0, {"event_id": "e"}))
        await asyncio.wait_for(began.wait(), 5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.wait_for(announcing_cancelled.wait(), 5)
        await asyncio.sleep(0.3)
    finally:
        unregister_handler("cancelled_probe")
    assert announced == []
    assert rec.results == []
