from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from heartbeat_consumer.cli import main

from .conftest import ROOT

WriteConfig = Callable[..., Path]
EXAMPLE = str(ROOT / "examples/cack.heartbeat.json")
BIN = str(Path(sys.executable).with_name("heartbeat-consumer"))


def lines(text: str) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in text.splitlines() if line.strip()]


def test_validate_ok(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", EXAMPLE]) == 0
    assert capsys.readouterr().out.strip() == (
        f"ok: {EXAMPLE}: format heartbeat.v1, agent cack, 2 check(s)"
    )


def test_validate_prints_every_problem_and_exits_1(
    write_config: WriteConfig, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_config(
        {
            "agent": "a",
            "checks": {
                "x": {"cadenceMs": "900000", "handler": "default"},
                "y": {"cadenceMs": 1, "handler": "nope"},
                "z": {
                    "cadenceMs": 1,
                    "handler": "default",
                    "window": {"start": "9", "end": "10:00"},
                },
            },
        }
    )
    assert main(["validate", str(path)]) == 1
    err = capsys.readouterr().err
    assert "3 problem(s)" in err
    assert "$.checks.x.cadenceMs: '900000' is not of type 'integer'" in err
    assert "$.checks.y.handler: unknown handler 'nope'" in err
    assert "$.checks.z.window.start: '9' is not a time HH:MM" in err
    assert "Traceback" not in err


def test_validate_unparsable_file(
    write_config: WriteConfig, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["validate", str(write_config('{"agent": '))]) == 1
    assert "$: invalid JSON" in capsys.readouterr().err


def test_validate_knows_plugin_handlers(
    write_config: WriteConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "cli_plugin_mod.py").write_text(
        "from heartbeat_consumer import register_handler\n"
        "@register_handler('cli_ping')\n"
        "async def ping(p, c):\n    return {'status': 'success'}\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    path = write_config({"agent": "a", "checks": {"p": {"cadenceMs": 1, "handler": "cli_ping"}}})
    monkeypatch.setenv("HEARTBEAT_HANDLERS", "cli_plugin_mod")
    assert main(["validate", str(path)]) == 0
    sys.modules.pop("cli_plugin_mod", None)


def test_plan_explains_every_check(
    write_config: WriteConfig, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_config(
        {
            "agent": "a",
            "checks": {
                "due": {"cadenceMs": 60000, "handler": "default"},
                "off": {"cadenceMs": 60000, "handler": "default", "enabled": False},
                "night": {
                    "cadenceMs": 60000,
                    "handler": "default",
                    "window": {"start": "22:00", "end": "06:00", "tz": "Europe/Berlin"},
                },
                "recent": {"cadenceMs": 3600000, "handler": "default", "lastRun": 1780315200000},
            },
        }
    )
    assert (
        main(["plan", str(path), "--at", "2026-06-01T12:30:00Z", "--state", str(path) + ".s"]) == 0
    )
    out = capsys.readouterr().out
    assert "agent a at 2026-06-01T12:30:00.000Z" in out
    rows = {line[2:].split()[0]: line for line in out.splitlines()[3:]}
    assert rows["due"].startswith("*")
    assert "RUNS NOW" in rows["due"]
    assert "disabled" in rows["off"]
    assert "outside window 22:00-06:00 Europe/Berlin (local 14:30)" in rows["night"]
    assert "not due: ratio 0.50, due in 30m" in rows["recent"]


def test_plan_json(write_config: WriteConfig, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_config({"agent": "a", "checks": {"c": {"cadenceMs": 1000, "handler": "default"}}})
    assert main(["plan", str(path), "--at", "1000", "--json"]) == 0
    (doc,) = lines(capsys.readouterr().out)
    assert doc["at"] == "1970-01-01T00:00:01.000Z"
    assert doc["checks"] == [
        {
            "check": "c",
            "handler": "default",
            "priority": 100,
            "due": True,
            "runs_now": True,
            "overdue_ratio": None,
            "last_run": None,
            "next_due": None,
            "reasons": [],
        }
    ]


def test_plan_bad_time_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", EXAMPLE, "--at", "tomorrow-ish"]) == 2
    assert "not a time: 'tomorrow-ish'" in capsys.readouterr().err


def test_simulate_over_berlin_spring_forward(
    write_config: WriteConfig, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_config(
        {
            "agent": "a",
            "checks": {
                "c": {
                    "cadenceMs": 900000,
                    "handler": "default",
                    "window": {"start": "02:00", "end": "04:00", "tz": "Europe/Berlin"},
                }
            },
        }
    )
    args = ["simulate", str(path), "--from", "2026-03-29T00:00:00Z", "--to", "2026-03-29T03:00:00Z"]
    assert main(args) == 0
    runs = lines(capsys.readouterr().out)
    # 02:00-02:59 does not exist that night: the window opens at 03:00 CEST (01:00 UTC).
    assert [r["local"] for r in runs] == [
        "2026-03-29T03:00+02:00",
        "2026-03-29T03:15+02:00",
        "2026-03-29T03:30+02:00",
        "2026-03-29T03:45+02:00",
        "2026-03-29T04:00+02:00",
    ]
    assert runs[0]["slot"] == "2026-03-29T01:00:00.000Z"
    assert runs[0]["overdue_ratio"] is None
    assert runs[1]["overdue_ratio"] == 1.0


def test_simulate_rejects_reversed_range(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["simulate", EXAMPLE, "--from", "2026-01-02", "--to", "2026-01-01"]) == 2
    assert "--to must be after --from" in capsys.readouterr().err


def test_run_once_then_status(
    write_config: WriteConfig, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_config(
        {
            "agent": "a",
            "checks": {
                "ok": {"cadenceMs": 900000, "handler": "default", "priority": 1},
                "bad": {"cadenceMs": 900000, "handler": "command", "meta": {"argv": ["false"]}},
            },
            "maxChecksPerTick": 2,
        }
    )
    assert main(["run-once", str(path), "--at", "2026-06-01T12:00:30Z"]) == 3
    results = lines(capsys.readouterr().out)
    assert [(r["check"], r["status"], r["slot"]) for r in results] == [
        ("ok", "success", "2026-06-01T12:00:00.000Z"),
        ("bad", "failed", "2026-06-01T12:00:00.000Z"),
    ]
    assert main(["run-once", str(path), "--at", "2026-06-01T12:01:10Z"]) == 3
    assert lines(capsys.readouterr().out)[0]["check"] == "bad"
    assert main(["run-once", str(path), "--at", "2026-06-01T12:02:10Z"]) == 0, "bad backs off"
    assert capsys.readouterr().out == ""
    assert main(["status", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"state: {path}.state.json" in out
    bad = next(line for line in out.splitlines() if line.split()[0] == "bad")
    assert "failed" in bad
    assert "retry after 2026-06-01T12:03:00.000Z" in bad
    assert "exit code 1" in bad
    assert main(["status", str(path), "--json"]) == 0
    doc = lines(capsys.readouterr().out)[0]
    assert doc["checks"]["ok"]["lastRun"] == 1780315200000
    assert doc["checks"]["bad"]["consecutiveFailures"] == 2


def test_state_path_from_environment(
    write_config: WriteConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_config({"agent": "a", "checks": {"c": {"cadenceMs": 1000, "handler": "default"}}})
    monkeypatch.setenv("HEARTBEAT_STATE_PATH", str(tmp_path / "elsewhere.json"))
    assert main(["run-once", str(path)]) == 0
    assert (tmp_path / "elsewhere.json").exists()
    assert not (tmp_path / "heartbeat.json.state.json").exists()


def test_run_once_unusable_config_and_state(
    write_config: WriteConfig, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["run-once", str(write_config("[]"))]) == 1
    assert main(["run-once", EXAMPLE, "--state", str(tmp_path / "missing-dir" / "s.json")]) == 1
    err = capsys.readouterr().err
    assert "does not exist" in err
    assert "Traceback" not in err


def test_unknown_plugin_module_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", EXAMPLE, "--handlers", "no_such_plugin_mod"]) == 1
    assert "cannot import handler module 'no_such_plugin_mod'" in capsys.readouterr().err


def test_no_subcommand_without_environment_explains_itself(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AGENT_NAME", raising=False)
    monkeypatch.delenv("HEARTBEAT_PATH", raising=False)
    assert main([]) == 2
    assert "set AGENT_NAME and HEARTBEAT_PATH" in capsys.readouterr().err


def test_schema_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["schema"]) == 0
    assert orjson.loads(capsys.readouterr().out) == orjson.loads(
        (ROOT / "schemas/heartbeat.v1.json").read_bytes()
    )


def test_console_script_run_local_prints_json_lines_and_stops_on_sigterm(tmp_path: Path) -> None:
    config = tmp_path / "hb.json"
    config.write_bytes(
        orjson.dumps({"agent": "cli", "checks": {"c": {"cadenceMs": 1000, "handler": "default"}}})
    )
    proc = subprocess.Popen(
        [BIN, "run", "--local", str(config), "--every", "1s"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    first = orjson.loads(proc.stdout.readline())
    second = orjson.loads(proc.stdout.readline())
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err
    assert first["agent"] == "cli"
    assert first["status"] == "success"
    assert second["slot"] > first["slot"]
    assert "Traceback" not in err


def test_second_local_runner_for_one_state_is_refused(tmp_path: Path) -> None:
    config = tmp_path / "hb.json"
    config.write_bytes(orjson.dumps({"agent": "x", "checks": {}}))
    proc = subprocess.Popen([BIN, "run", "--local", str(config)], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 10
        assert proc.stderr is not None
        while "running" not in proc.stderr.readline():
            assert time.monotonic() < deadline
        second = subprocess.run(
            [BIN, "run", "--local", str(config)],
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
        )
        assert second.returncode == 1
        assert "another process runs this agent" in second.stderr
        once = subprocess.run(
            [BIN, "run-once", str(config)], capture_output=True, text=True, timeout=20, check=False
        )
        assert once.returncode == 0
        assert "nothing done" in once.stderr
    finally:
        os.kill(proc.pid, signal.SIGINT)
        proc.wait(timeout=10)
    assert proc.returncode == 0


def test_read_only_commands_leave_a_corrupt_state_file_alone(
    write_config: WriteConfig, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_config({"agent": "a", "checks": {"c": {"cadenceMs": 1000, "handler": "default"}}})
    state = Path(str(path) + ".state.json")
    state.write_text("{broken")
    assert main(["plan", str(path)]) == 0
    assert main(["status", str(path)]) == 0
    assert "is corrupt" in capsys.readouterr().err
    assert state.read_text() == "{broken"
    assert main(["run-once", str(path)]) == 0, "a run rebuilds it"
    assert Path(str(state) + ".corrupt").read_text() == "{broken"


def test_a_bad_monitor_setting_in_the_environment_is_a_clear_monitor_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """MONITOR_PORT is read only by `monitor`, and a bad value is its usage error."""
    monkeypatch.setenv("MONITOR_PORT", "abc")
    assert main(["validate", str(ROOT / "examples/cack.heartbeat.json")]) == 0
    with pytest.raises(SystemExit) as exit_:
        main(["monitor"])
    assert exit_.value.code == 2
    assert "argument --port: not a port number: 'abc'" in capsys.readouterr().err
    monkeypatch.delenv("MONITOR_PORT")
    assert main(["monitor", "--stale-for", "x"]) == 2
    assert "--stale-for wants AGENT=DURATION, not 'x'" in capsys.readouterr().err


# --- bad input: floats, values out of range, malformed URLs ---------------------------------


def test_integral_floats_are_integers_and_fractions_a_clear_problem(
    write_config: WriteConfig, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    floats = {"cadenceMs": 6000.0, "priority": 2.0, "timeoutMs": 1000.0, "lastRun": 0.0}
    path = write_config(
        {"agent": "a", "maxChecksPerTick": 1.0, "checks": {"c": {**floats, "handler": "default"}}}
    )
    assert main(["validate", str(path)]) == 0
    assert capsys.readouterr().out.startswith("ok:")
    assert main(["run-once", str(path), "--state", str(tmp_path / "s.json")]) == 0
    assert lines(capsys.readouterr().out)[-1]["status"] == "success"
    path = write_config(
        {"agent": "a", "checks": {"c": {"cadenceMs": 6000.5, "handler": "default"}}}
    )
    assert main(["validate", str(path)]) == 1
    assert "$.checks.c.cadenceMs: 6000.5 is not of type 'integer'" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("where", "value"),
    [
        ("paused", 1e17),
        ("paused", "10000-01-01T00:00:00Z"),
        ("paused", "100000000000000000000"),
        ("lastRun", 1e17),
        ("cadenceMs", 1e20),
    ],
)
def test_times_out_of_range_in_a_config_are_problems_with_their_path(
    write_config: WriteConfig, capsys: pytest.CaptureFixture[str], where: str, value: Any
) -> None:
    check: dict[str, Any] = {"cadenceMs": 1000, "handler": "default"}
    paused: dict[str, Any] = {}
    if where == "paused":
        paused = {"c": {"until": value}}
    else:
        check[where] = value
    path = write_config({"agent": "a", "checks": {"c": check}, "paused": paused})
    assert main(["validate", str(path)]) == 1
    err = capsys.readouterr().err
    path_text = "$.paused.c.until" if where == "paused" else f"$.checks.c.{where}"
    assert path_text in err
    assert "Traceback" not in err
    assert main(["plan", str(path)]) in (0, 1)  # the check invalid, or the file: no crash
    shown = capsys.readouterr()
    assert path_text in shown.out + shown.err


def test_a_state_file_with_times_out_of_range_is_repaired_not_fatal(
    write_config: WriteConfig, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_config({"agent": "a", "checks": {"c": {"cadenceMs": 1000, "handler": "default"}}})
    state = Path(str(path) + ".state.json")
    check = {"lastRun": 10**17, "nextRetry": 1e17, "consecutiveFailures": 3}
    state.write_bytes(
        orjson.dumps({"checks": {"c": check}, "pauses": {"*": {"until": 1e17, "reason": "x"}}})
    )
    assert main(["plan", str(path), "--json"]) == 0
    out = capsys.readouterr()
    assert "repaired" in out.err
    (plan,) = lines(out.out)
    assert plan["checks"][0]["reasons"] == ["agent paused until resumed (x)"]
    assert main(["status", str(path)]) == 0
    assert main(["run-once", str(path)]) == 0


@pytest.mark.parametrize(
    "url",
    [
        "amqp://agent:s3cret@host:notaport/",
        "amqp://agent:s3cret@host:99999/",
        "http://agent:s3cret@host/",
        "amqp://agent:s3cret@/",
    ],
)
def test_a_malformed_broker_url_is_a_one_line_usage_error(url: str) -> None:
    done = subprocess.run(
        [BIN, "tick", "--rabbit-url", url], capture_output=True, text=True, timeout=30, check=False
    )
    assert done.returncode == 2, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "broker URL" in done.stderr
    assert "s3cret" not in done.stderr


@pytest.mark.parametrize(
    "args",
    [
        ["run-once", EXAMPLE, "--tick", "0.5ms"],
        ["simulate", EXAMPLE, "--from", "2026-01-01", "--to", "2026-01-02", "--tick", "0.0001s"],
        ["simulate", EXAMPLE, "--from", "1970-01-01", "--to", "9999-01-01", "--tick", "1ms"],
        ["run", EXAMPLE, "--local", "--max-ticks", "0"],
        ["run", EXAMPLE, "--health-port", "70000"],
        ["monitor", "--port", "-1"],
        ["monitor", "--check-every", "1ms"],
        ["fleet", ".", "--rescan", "0.5ms"],
        ["tick", "--agent", "a.b.#"],
        ["run-check", "bad.agent", "c"],
        ["run-check", "a", "bad check*"],
        # the exchange's name is refused once connected: these two need the broker
        pytest.param(["tick", "--exchange", "a b#*"], marks=pytest.mark.rabbit),
        pytest.param(["tick", "--exchange", "x" * 300], marks=pytest.mark.rabbit),
        ["tick", "--rabbit-url", "amqp://guest:guest@local host/"],
        ["tick", "--rabbit-url", "amqp://guest:guest@localhost/?ssl=1"],
        ["tick", "--rabbit-url", f"amqp://guest:guest@{'a' * 300}/"],
        ["monitor", "--queue", ""],
        ["fleet", str(Path(__file__).parent), "--replica", "one"],
        ["fleet", "dir", "--standby", "--replica", "a.b"],
        ["run", EXAMPLE, "--standby", "--replica", "x" * 65],
        ["provision", "--replica", "one"],
        ["provision", "--agent", "a", "--replica", "#"],
    ],
)
def test_bad_values_on_the_command_line_are_usage_errors(
    args: list[str], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    try:
        code = main(args)
        usage = False
    except SystemExit as exit_:  # argparse's own usage errors: usage lines, then the error
        code, usage = int(exit_.code or 0), True
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err, err
    if not usage:
        assert len(err.strip().splitlines()) == 1, err


def test_times_at_the_end_of_the_range_work_in_every_zone(
    write_config: WriteConfig, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    window = {"start": "00:00", "end": "23:59", "tz": "Pacific/Kiritimati"}
    path = write_config(
        {
            "agent": "a",
            "tz": "Asia/Tokyo",
            "checks": {
                "w": {"cadenceMs": 60_000, "handler": "default", "window": window},
                "q": {"cadenceMs": 60_000, "handler": "default", "triggerOnQuarters": ["Q3"]},
            },
        }
    )
    at = "9999-12-30T23:00:00Z"
    assert main(["plan", str(path), "--at", at]) == 0
    assert main(["run-once", str(path), "--at", at, "--state", str(tmp_path / "s.json")]) == 0
    assert main(["simulate", str(path), "--from", "9999-12-30T22:00Z", "--to", at]) == 0
    assert main(["plan", str(path), "--at", "9999-12-31T00:00:00Z"]) == 2


def test_tls_files_must_be_regular_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fifo = tmp_path / "ca.pem"
    os.mkfifo(fifo)
    url = "amqps://guest:guest@localhost:5671/"
    assert main(["tick", "--rabbit-url", url, "--ca-file", str(fifo)]) == 1
    assert "ca.pem is not a regular file" in capsys.readouterr().err


def test_state_files_that_could_not_be_saved_again_are_set_aside(
    write_config: WriteConfig, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    path = write_config({"agent": "a", "checks": {"c": {"cadenceMs": 1000, "handler": "default"}}})
    state = Path(str(path) + ".state.json")
    deep: dict[str, Any] = {}
    inner = deep
    for _ in range(300):
        inner["a"] = {}
        inner = inner["a"]
    state.write_text(json.dumps({"checks": {"c": {"lastRun": 1}, "o": {"lastResult": deep}}}))
    assert main(["status", str(path), "--json"]) == 0
    assert "is corrupt" in capsys.readouterr().err
    assert main(["run-once", str(path)]) == 0, "rebuilt, run, saved"
    state.write_text(json.dumps({"checks": {"c": {"runs": 2**64 - 1, "lastRun": 1}}}))
    assert main(["run-once", str(path)]) == 0
    saved = orjson.loads(state.read_bytes())
    assert saved["checks"]["c"]["runs"] == 1, "the counter was reset, then counted the run"


def _free_port_held() -> tuple[Any, int]:
    import socket

    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    held.listen()
    return held, held.getsockname()[1]


def test_simulate_into_a_closed_pipe_ends_quietly() -> None:
    """`simulate ... | head -1`: no "cannot reach RabbitMQ", no traceback, exit 0."""
    proc = subprocess.Popen(
        [BIN, "simulate", EXAMPLE, "--from", "2026-01-01T00:00Z", "--to", "2026-06-01T00:00Z"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None
    assert proc.stderr is not None
    proc.stdout.readline()
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(30) == 0, err
    assert err == "", err


def test_run_once_into_a_closed_pipe_still_saves_the_state(
    write_config: WriteConfig, tmp_path: Path
) -> None:
    """`run-once | head`: the check ran, so its state is saved and it does not run again."""
    config = write_config(
        {"agent": "a", "checks": {"c": {"cadenceMs": 3_600_000, "handler": "default"}}}
    )
    state = tmp_path / "s.json"
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader has gone before anything is written
    done = subprocess.run(
        [BIN, "run-once", str(config), "--state", str(state)],
        check=False,
        stdout=write_end,
        stderr=subprocess.PIPE,
        text=True,
        timeout=30,
    )
    os.close(write_end)
    assert done.returncode == 0, done.stderr
    assert "RabbitMQ" not in done.stderr, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    assert orjson.loads(state.read_bytes())["checks"]["c"]["runs"] == 1


def test_a_file_that_cannot_be_written_is_named_not_blamed_on_the_broker(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "missing" / "a.yaml"
    assert main(["asyncapi", "--output", str(target)]) == 1
    err = capsys.readouterr().err
    assert err == f"heartbeat-consumer asyncapi: {target}: No such file or directory\n", err


@pytest.mark.parametrize("command", ["run", "monitor"])
def test_a_port_in_use_is_found_before_anything_connects_or_runs(
    write_config: WriteConfig, tmp_path: Path, command: str
) -> None:
    """The port is bound first: with a broker that is not even there, the error is the
    port's, and no check ran (no state written)."""
    held, port = _free_port_held()
    config = write_config({"agent": "a", "checks": {"c": {"cadenceMs": 1, "handler": "default"}}})
    state = tmp_path / "s.json"
    url = "amqp://guest:guest@127.0.0.1:1/"
    args = (
        ["run", str(config), "--state", str(state), "--health-port", str(port)]
        if command == "run"
        else ["monitor", "--state", str(state), "--port", str(port)]
    )
    try:
        done = subprocess.run(
            [BIN, *args, "--rabbit-url", url],
            check=False,
            capture_output=True,
            text=True,
            timeout=30,
        )
    finally:
        held.close()
    assert done.returncode == 1, done.stderr
    assert f"cannot serve HTTP on 127.0.0.1:{port}: Address already in use" in done.stderr
    assert "RabbitMQ" not in done.stderr, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) <= 2, done.stderr
    assert not state.exists()


@pytest.mark.parametrize(
    "args",
    [["run"], ["run", "--local", "--max-ticks", "1"], ["status"]],
    ids=["run", "run-local", "status"],
)
def test_a_missing_config_file_is_an_error_that_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str]
) -> None:
    missing = tmp_path / "nope.heartbeat.json"
    assert main([*args, str(missing)]) == 1
    err = capsys.readouterr().err
    assert f"{missing}: no such file" in err, err
    assert "--agent" not in err, err


def test_agent_names_are_checked_wherever_a_queue_would_be_made(
    write_config: WriteConfig, capsys: pytest.CaptureFixture[str]
) -> None:
    from heartbeat_consumer import HeartbeatConsumer
    from heartbeat_consumer.core.topology import InvalidName

    config = write_config({"agent": "a", "checks": {"c": {"cadenceMs": 1}}})
    for argv in (
        ["provision", "--agent", "bad.name"],
        ["run", str(config), "--agent", "bad.name"],
        ["run-check", "bad.name", "c"],
        ["tick", "--agent", "bad.name"],
    ):
        assert main(argv) == 2, argv
        assert "invalid agent name 'bad.name'" in capsys.readouterr().err
    with pytest.raises(InvalidName):
        HeartbeatConsumer("bad.name", config)


@pytest.mark.parametrize("url", ["amqp://u:SECRET#x@h:5672/", "amqp://u:SE/CRET@h/"])
def test_a_password_with_unencoded_characters_is_masked_too(
    url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["run-check", "a", "c", "--rabbit-url", url]) == 2
    err = capsys.readouterr().err
    assert "SECRET" not in err, err
    assert "CRET" not in err, err
    assert "u:***@h" in err, err
    assert "%23" in err, "says how to write such a password"


def test_the_ecosystem_s_environment_names_are_aliases_and_ours_win(tmp_path: Path) -> None:
    """RABBITMQ_URL, BLOODBANK_EXCHANGE, HEARTBEAT_JSON and AGENT_CONFIGS (Bloodbank's
    heartbeat_tick) are read when ours are not set; when both are, ours wins, with a
    warning. Seen through the one-line error naming the (masked) URL it tried."""
    base = {k: v for k, v in os.environ.items() if k not in ("RABBIT_URL", "EXCHANGE_NAME")}
    theirs = {**base, "RABBITMQ_URL": "amqp://bb:s3cret@127.0.0.1:1/"}
    done = subprocess.run(
        [BIN, "tick"], env=theirs, capture_output=True, text=True, timeout=30, check=False
    )
    assert done.returncode == 1, done.stderr
    assert "amqp://bb:***@127.0.0.1:1/" in done.stderr, done.stderr
    both = {**theirs, "RABBIT_URL": "amqp://ours:x@127.0.0.1:2/"}
    done = subprocess.run(
        [BIN, "tick"], env=both, capture_output=True, text=True, timeout=30, check=False
    )
    assert "amqp://ours:***@127.0.0.1:2/" in done.stderr, done.stderr
    assert "both RABBIT_URL and RABBITMQ_URL are set; using RABBIT_URL" in done.stderr
    missing = {**base, "AGENT_CONFIGS": str(tmp_path / "nope"), "RABBITMQ_URL": "amqp://h:1/"}
    done = subprocess.run(
        [BIN, "fleet"], env=missing, capture_output=True, text=True, timeout=30, check=False
    )
    assert done.returncode == 1, done.stderr
    assert f"fleet directory {tmp_path / 'nope'} does not exist" in (done.stderr), done.stderr
    config = tmp_path / "a.json"
    config.write_text('{"agent": "a", "checks": {}}')
    env_mode = {
        **base,
        "AGENT_NAME": "a",
        "HEARTBEAT_JSON": str(config),
        "RABBITMQ_URL": "amqp://h:1/",
    }
    done = subprocess.run(
        [BIN], env=env_mode, capture_output=True, text=True, timeout=30, check=False
    )
    assert done.returncode == 1, done.stderr
    assert "cannot reach RabbitMQ at amqp://h:1/" in done.stderr, done.stderr
