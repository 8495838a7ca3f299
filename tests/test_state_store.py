from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest

from heartbeat_consumer.core.state import (
    HISTORY_LIMIT,
    AgentState,
    backoff_ms,
    compact_history,
    idempotency_key,
    record_run,
)
from heartbeat_consumer.runtime.store import StateError, StateStore, default_state_path

from .requires import need_tool

MIN = 60_000


def run(
    state: AgentState, status: str, slot: int, check: str = "c", cadence: int = 15 * MIN
) -> AgentState:
    return record_run(
        state,
        check=check,
        cadence_ms=cadence,
        slot_ms=slot,
        status=status,  # type: ignore[arg-type]
        finished_ms=slot + 5,
        duration_ms=5,
        key=idempotency_key("a", check, slot),
        initial_last_run=123,
    )


def test_success_records_slot_as_last_run() -> None:
    state = run(AgentState(), "success", 1000)
    cs = state.check("c")
    assert (cs.last_run, cs.last_success, cs.last_status, cs.runs) == (1000, 1000, "success", 1)
    assert cs.last_key == "a:c:1000"
    assert cs.last_finished == 1005
    assert state.history[-1].status == "success"


@pytest.mark.parametrize("status", ["alert", "skipped"])
def test_alert_and_skipped_count_as_completed_runs(status: str) -> None:
    cs = run(AgentState(), status, 1000).check("c")
    assert cs.last_run == 1000
    assert cs.consecutive_failures == 0
    assert cs.next_retry is None


@pytest.mark.parametrize("status", ["failed", "timeout"])
def test_failure_keeps_last_run_and_backs_off(status: str) -> None:
    state = run(AgentState(), status, 10 * MIN)
    cs = state.check("c")
    assert cs.last_run == 123, "the config's initial lastRun is kept"
    assert cs.consecutive_failures == 1
    assert cs.next_retry == 11 * MIN
    state = run(state, status, 11 * MIN)
    assert state.check("c").next_retry == 13 * MIN
    state = run(state, "success", 13 * MIN)
    assert state.check("c").consecutive_failures == 0
    assert state.check("c").next_retry is None


def test_backoff_doubles_from_a_minute_capped_at_cadence() -> None:
    assert [backoff_ms(n, 15 * MIN) for n in range(1, 7)] == [
        MIN,
        2 * MIN,
        4 * MIN,
        8 * MIN,
        15 * MIN,
        15 * MIN,
    ]
    assert backoff_ms(10_000, 3 * MIN) == 3 * MIN
    assert backoff_ms(1, 10_000) == 10_000


def test_history_is_bounded_and_compacts_per_check() -> None:
    state = AgentState()
    for i in range(HISTORY_LIMIT + 10):
        state = run(state, "success", i, check="x" if i % 2 else "y")
    assert len(state.history) == HISTORY_LIMIT
    compacted, removed = compact_history(state, 3)
    assert removed == HISTORY_LIMIT - 6
    assert [(e.check, e.slot) for e in compacted.history] == [
        ("y", HISTORY_LIMIT + 4),
        ("x", HISTORY_LIMIT + 5),
        ("y", HISTORY_LIMIT + 6),
        ("x", HISTORY_LIMIT + 7),
        ("y", HISTORY_LIMIT + 8),
        ("x", HISTORY_LIMIT + 9),
    ]


def test_default_state_path_is_beside_the_config() -> None:
    assert default_state_path("/etc/hb/cack.heartbeat.json") == Path(
        "/etc/hb/cack.heartbeat.json.state.json"
    )


def test_store_round_trip(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "s.json")
    assert store.load() == (AgentState(), None)
    state = run(run(AgentState(), "success", 1000), "failed", 2000, check="d")
    store.save(state)
    loaded, warning = store.load()
    assert warning is None
    assert loaded == state
    on_disk = orjson.loads((tmp_path / "s.json").read_bytes())
    assert on_disk["checks"]["c"]["lastRun"] == 1000
    assert on_disk["checks"]["d"]["consecutiveFailures"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["s.json"], "no temp files left behind"


@pytest.mark.parametrize(
    "content", [b"{not json", b'{"checks": {"c": {"lastRun": "x"}}}', b"[]", b""]
)
def test_corrupt_state_is_set_aside_and_rebuilt(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "s.json"
    path.write_bytes(content)
    state, warning = StateStore(path).load()
    assert state == AgentState()
    assert warning is not None
    assert "corrupt" in warning
    assert "s.json.corrupt" in warning
    assert (tmp_path / "s.json.corrupt").read_bytes() == content
    assert not path.exists()


def test_unwritable_state_directory_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(StateError, match="does not exist"):
        StateStore(tmp_path / "nope" / "s.json").check_writable()
    (tmp_path / "a-file").write_text("")
    with pytest.raises(StateError, match="does not exist"):
        StateStore(tmp_path / "a-file" / "s.json").check_writable()
    if os.geteuid() != 0:
        locked = tmp_path / "ro"
        locked.mkdir()
        locked.chmod(0o500)
        try:
            with pytest.raises(StateError, match="cannot write state file"):
                StateStore(locked / "s.json").check_writable()
        finally:
            locked.chmod(0o700)
        return
    # Root writes anywhere: run the real command as an unprivileged user instead.
    setpriv = need_tool(
        "setpriv", "run as root, the test drops privileges with it", "apt-get install util-linux"
    )
    cmd = [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-m"]
    probe = subprocess.run(
        [*cmd, "heartbeat_consumer", "--version"], capture_output=True, check=False
    )
    if probe.returncode != 0:
        pytest.skip(f"the unprivileged user cannot run this Python: {probe.stderr[-200:]!r}")
    public = Path(tempfile.mkdtemp(prefix="hb-ro-"))
    try:
        public.chmod(0o755)
        config = public / "hb.json"
        config.write_text('{"agent": "a", "checks": {}}')
        config.chmod(0o644)
        (public / "ro").mkdir(mode=0o755)
        hidden = public / "hidden"
        hidden.mkdir(mode=0o700)
        for state, message in (
            (public / "ro" / "s.json", "cannot write state file"),
            (hidden / "s.json", "cannot write state file"),
            (hidden / "sub" / "s.json", "cannot access state directory"),
        ):
            args = ["heartbeat_consumer", "run-once", str(config), "--state", str(state)]
            done = subprocess.run([*cmd, *args], capture_output=True, text=True, check=False)
            assert done.returncode == 1, done
            assert message in done.stderr, done.stderr
            assert "Permission denied" in done.stderr, done.stderr
            assert "Traceback" not in done.stderr
    finally:
        shutil.rmtree(public)


def test_save_into_a_missing_directory_raises_state_error(tmp_path: Path) -> None:
    with pytest.raises(StateError, match="cannot write state file"):
        StateStore(tmp_path / "gone" / "s.json").save(AgentState())


KILL_WRITER = """
import sys
from heartbeat_consumer.core.state import AgentState, record_run
from heartbeat_consumer.runtime.store import StateStore
store = StateStore(sys.argv[1])
state = AgentState()
i = 0
while True:
    i += 1
    state = record_run(state, check=f"c{i % 50}", cadence_ms=60000, slot_ms=i, status="success",
                       finished_ms=i, duration_ms=0, key=str(i))
    store.save(state)
    if i == 20:
        print("ready", flush=True)
"""


def test_state_file_survives_sigkill_during_writes(tmp_path: Path) -> None:
    """Kill a writer that saves in a loop: whatever is on disk must parse."""
    path = tmp_path / "s.json"
    for _ in range(5):
        proc = subprocess.Popen(
            [sys.executable, "-c", KILL_WRITER, str(path)], stdout=subprocess.PIPE, text=True
        )
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        proc.kill()
        proc.wait()
        state, warning = StateStore(path).load()
        assert warning is None, warning
        assert len(state.history) >= 20


def test_the_agent_lock_is_not_taken_through_a_link_or_instead_of_the_state(
    tmp_path: Path, write_config: Callable[..., Path]
) -> None:
    from heartbeat_consumer import HeartbeatConsumer
    from heartbeat_consumer.runtime.store import AgentBusy, AgentLock

    (tmp_path / "x").write_text("")
    (tmp_path / "a.lock").symlink_to(tmp_path / "x")
    with pytest.raises(AgentBusy, match="cannot take its lock"):
        AgentLock(tmp_path, "a").acquire()
    assert (tmp_path / "x").read_text() == "", "nothing written through the link"
    config = write_config({"agent": "b", "checks": {"c": {"cadenceMs": 1, "handler": "default"}}})
    for state in ("b.lock", "b"):
        with pytest.raises(StateError, match=r"would be .* the agent.s lock file"):
            HeartbeatConsumer("b", config, state_path=tmp_path / state)
