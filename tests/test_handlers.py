from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import orjson
import pytest

from heartbeat_consumer import CheckConfig, register_handler
from heartbeat_consumer.core.config import parse_config
from heartbeat_consumer.handlers.builtin import command
from heartbeat_consumer.handlers.registry import (
    HandlerError,
    get_handler,
    handler_names,
    invoke,
    load_entry_points,
    load_plugins,
    plugin_modules_from_env,
)


def check(**fields: Any) -> CheckConfig:
    raw = {"cadenceMs": 60_000, "handler": "h", **fields}
    loaded = parse_config(orjson.dumps({"agent": "a", "checks": {"c": raw}}))
    assert not loaded.problems, loaded.problems
    return loaded.config.checks["c"]


PAYLOAD = {
    "agent": "a",
    "check_name": "c",
    "timestamp": "t",
    "envelope": {},
    "idempotency_key": "a:c:1",
}


def test_builtins_are_registered() -> None:
    assert {"default", "sub_health", "quarterly_compaction", "command"} <= handler_names()


async def test_async_handler_result() -> None:
    @register_handler("t_async")
    async def h(tick_payload: dict[str, Any], check_config: CheckConfig) -> dict[str, Any]:
        return {
            "status": "alert",
            "seen": tick_payload["idempotency_key"],
            "cadence": check_config.cadence_ms,
        }

    outcome = await invoke(h, dict(PAYLOAD), check())
    assert outcome.status == "alert"
    assert outcome.result == {"status": "alert", "seen": "a:c:1", "cadence": 60000}


async def test_sync_handler_runs_in_a_thread() -> None:
    import threading

    main = threading.get_ident()

    @register_handler("t_sync")
    def h(tick_payload: dict[str, Any], check_config: CheckConfig) -> dict[str, Any]:
        return {"status": "success", "thread": threading.get_ident() != main}

    outcome = await invoke(h, dict(PAYLOAD), check())
    assert outcome.status == "success"
    assert outcome.result["thread"] is True


async def test_exception_is_failed_with_error_text() -> None:
    async def h(tick_payload: dict[str, Any], check_config: CheckConfig) -> dict[str, Any]:
        raise RuntimeError("disk on fire")

    outcome = await invoke(h, dict(PAYLOAD), check())
    assert outcome.status == "failed"
    assert outcome.error == "RuntimeError: disk on fire"


async def test_timeout_status() -> None:
    async def h(tick_payload: dict[str, Any], check_config: CheckConfig) -> dict[str, Any]:
        await asyncio.sleep(10)
        return {"status": "success"}

    started = time.monotonic()
    outcome = await invoke(h, dict(PAYLOAD), check(timeoutMs=50))
    assert outcome.status == "timeout"
    assert outcome.error == "handler timed out after 0.05s"
    assert time.monotonic() - started < 2


async def test_handler_raising_timeout_error_itself_is_failed_not_timeout() -> None:
    async def h(tick_payload: dict[str, Any], check_config: CheckConfig) -> dict[str, Any]:
        raise TimeoutError("upstream API timed out")

    outcome = await invoke(h, dict(PAYLOAD), check())
    assert outcome.status == "failed"
    assert "upstream API" in (outcome.error or "")


@pytest.mark.parametrize(
    ("value", "error"),
    [
        (None, "handler returned NoneType, expected a dict with 'status'"),
        ({"message": "pong"}, "handler returned status None"),
        ({"status": "ok"}, "handler returned status 'ok'"),
        ({"status": "timeout"}, "handler returned status 'timeout'"),
    ],
)
async def test_garbage_results_are_failed(value: object, error: str) -> None:
    async def h(tick_payload: dict[str, Any], check_config: CheckConfig) -> object:
        return value

    outcome = await invoke(h, dict(PAYLOAD), check())  # type: ignore[arg-type]
    assert outcome.status == "failed"
    assert (outcome.error or "").startswith(error)


async def test_result_is_made_json_safe() -> None:
    async def h(tick_payload: dict[str, Any], check_config: CheckConfig) -> dict[str, Any]:
        return {"status": "success", "path": Path("/x"), 3: "int key"}

    outcome = await invoke(h, dict(PAYLOAD), check())
    assert outcome.result == {"status": "success", "path": "/x", "3": "int key"}


def test_same_name_from_another_function_is_refused() -> None:
    @register_handler("t_dup")
    async def first(tick_payload: dict[str, Any], check_config: CheckConfig) -> dict[str, Any]:
        return {"status": "success"}

    with pytest.raises(HandlerError, match="already registered"):

        @register_handler("t_dup")
        async def second(tick_payload: dict[str, Any], check_config: CheckConfig) -> dict[str, Any]:
            return {"status": "success"}

    assert get_handler("t_dup") is first


def test_plugin_modules_load_and_report_import_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "my_plugin_mod.py").write_text(
        textwrap.dedent(
            """
            from heartbeat_consumer import register_handler

            @register_handler("from_plugin")
            async def ping(tick_payload, check_config):
                return {"status": "success", "message": "pong"}
            """
        )
    )
    (tmp_path / "broken_plugin_mod.py").write_text("raise ImportError('missing dependency foo')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert load_plugins(["my_plugin_mod", " "]) == ["my_plugin_mod"]
    assert "from_plugin" in handler_names()
    with pytest.raises(
        HandlerError, match=r"cannot import handler module 'broken_plugin_mod'.*foo"
    ):
        load_plugins(["broken_plugin_mod"])
    with pytest.raises(HandlerError, match="no_such_module_xyz"):
        load_plugins(["no_such_module_xyz"])
    sys.modules.pop("my_plugin_mod", None)


def test_plugin_modules_from_env() -> None:
    assert plugin_modules_from_env({"HEARTBEAT_HANDLERS": "a.b, c  d,"}) == ["a.b", "c", "d"]
    assert plugin_modules_from_env({}) == []


async def test_command_success_captures_output_and_env() -> None:
    cfg = check(
        meta={
            "argv": [
                sys.executable,
                "-c",
                "import os;print(os.environ['HEARTBEAT_IDEMPOTENCY_KEY'])",
            ]
        }
    )
    result = await command(dict(PAYLOAD), cfg)
    assert result["status"] == "success"
    assert result["exit_code"] == 0
    assert result["stdout"] == "a:c:1\n"


async def test_command_sees_an_allow_list_of_the_environment_not_the_broker_password(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("RABBIT_URL", "amqp://agent:s3cret@broker:5672/")
    monkeypatch.setenv("SHARED_SETTING", "visible")
    printer = "import os, json; print(json.dumps(dict(os.environ)))"
    listed = check(meta={"argv": [sys.executable, "-c", printer], "env": ["SHARED_SETTING"]})
    seen = orjson.loads((await command(dict(PAYLOAD), listed))["stdout"])
    assert "RABBIT_URL" not in seen
    assert "s3cret" not in str(seen)
    assert seen["SHARED_SETTING"] == "visible"
    assert seen["HEARTBEAT_CHECK"] == "c"
    assert seen["PATH"] == os.environ["PATH"]
    setting = check(meta={"argv": [sys.executable, "-c", printer], "env": {"MODE": "x"}})
    seen = orjson.loads((await command(dict(PAYLOAD), setting))["stdout"])
    assert seen["MODE"] == "x"
    assert "RABBIT_URL" not in seen
    assert "SHARED_SETTING" not in seen
    bad = await command(dict(PAYLOAD), check(meta={"argv": ["true"], "env": "RABBIT_URL"}))
    assert bad["status"] == "failed"
    assert "meta.env must be" in bad["error"]


async def test_command_failure_and_missing_binary() -> None:
    cfg = check(
        meta={"argv": [sys.executable, "-c", "import sys; sys.stderr.write('boom'); sys.exit(4)"]}
    )
    result = await command(dict(PAYLOAD), cfg)
    assert result["status"] == "failed"
    assert result["exit_code"] == 4
    assert result["stderr"] == "boom"
    missing = await command(dict(PAYLOAD), check(meta={"argv": ["/no/such/binary"]}))
    assert missing["status"] == "failed"
    assert "cannot start '/no/such/binary'" in missing["error"]
    no_argv = await command(dict(PAYLOAD), check(meta={"argv": "ls -l"}))
    assert no_argv["status"] == "failed"
    assert "meta.argv must be a non-empty list" in no_argv["error"]


async def test_command_does_not_use_a_shell() -> None:
    result = await command(dict(PAYLOAD), check(meta={"argv": ["echo", "$HOME", ";", "id"]}))
    assert result["stdout"] == "$HOME ; id\n"


async def test_command_output_is_truncated_to_the_tail() -> None:
    script = "import sys; sys.stdout.write('x' * 1_000_000 + 'END')"
    cfg = check(meta={"argv": [sys.executable, "-c", script], "maxOutputBytes": 100})
    result = await command(dict(PAYLOAD), cfg)
    assert result["stdout"].endswith("x" * 97 + "END")
    assert result["stdout"].startswith("[... 999903 bytes cut ...]")


async def test_command_timeout_kills_the_process_group(tmp_path: Path) -> None:
    marker = tmp_path / "grandchild-alive"
    script = textwrap.dedent(
        f"""
        import subprocess, sys, time
        subprocess.Popen([sys.executable, "-c",
            "import time, pathlib; time.sleep(1.5); "
            "pathlib.Path({str(marker)!r}).write_text('alive')"])
        time.sleep(60)
        """
    )
    cfg = check(timeoutMs=300, meta={"argv": [sys.executable, "-c", script]})
    started = time.monotonic()
    outcome = await invoke(command, dict(PAYLOAD), cfg)
    assert outcome.status == "timeout"
    assert time.monotonic() - started < 5
    await asyncio.sleep(2)
    assert not marker.exists(), "the grandchild survived the timeout"


def test_entry_point_plugins_load_and_a_broken_one_is_skipped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "ep_plugin_mod.py").write_text(
        "from heartbeat_consumer import register_handler\n"
        "@register_handler('ep_decorated')\n"
        "async def decorated(p, c):\n    return {'status': 'success'}\n"
        "async def bare(p, c):\n    return {'status': 'alert'}\n"
    )
    dist = tmp_path / "hb_fake_plugin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: hb-fake-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(
        "[heartbeat_consumer.handlers]\n"
        "ep_module = ep_plugin_mod\n"
        "ep_bare = ep_plugin_mod:bare\n"
        "ep_broken = no_such_module_for_ep:thing\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    names = load_entry_points()
    assert {"ep_module", "ep_bare"} <= set(names)
    assert "ep_broken" not in names
    assert {"ep_decorated", "ep_bare"} <= handler_names()
    assert any("ep_broken" in r.message and "failed to load" in r.message for r in caplog.records)
    sys.modules.pop("ep_plugin_mod", None)


async def test_an_oversized_result_is_sent_as_a_preview() -> None:
    async def big(tick_payload: dict[str, Any], check_config: CheckConfig) -> dict[str, Any]:
        return {"status": "success", "blob": "x" * 10_000_000}

    outcome = await invoke(big, dict(PAYLOAD), check())
    assert outcome.status == "success"
    assert outcome.result["truncated"] is True
    assert outcome.result["bytes"] > 10_000_000
    assert len(orjson.dumps(outcome.result)) < 2000


async def test_a_hung_sync_handler_times_out_and_blocks_only_its_own_check() -> None:
    release = __import__("threading").Event()

    def hang(tick_payload: dict[str, Any], check_config: CheckConfig) -> dict[str, Any]:
        release.wait(30)
        return {"status": "success"}

    def quick(tick_payload: dict[str, Any], check_config: CheckConfig) -> dict[str, Any]:
        return {"status": "success"}

    hung_check = check(timeoutMs=200)
    first = await invoke(hang, dict(PAYLOAD), hung_check)
    assert first.status == "timeout"
    second = await invoke(hang, dict(PAYLOAD), hung_check)
    assert second.status == "failed"
    assert "still running in its thread" in (second.error or "")
    other = await invoke(
        quick, dict(PAYLOAD), check(timeoutMs=200).model_copy(update={"name": "d"})
    )
    assert other.status == "success", "other checks keep their threads"
    release.set()
    for _ in range(100):
        third = await invoke(quick, dict(PAYLOAD), hung_check)
        if third.status == "success":
            break
        await asyncio.sleep(0.01)
    assert third.status == "success", "runs again once the hung thread ended"


def test_a_hung_sync_handler_does_not_hold_up_exit(tmp_path: Path) -> None:
    script = textwrap.dedent(
        """
        import asyncio, time
        from heartbeat_consumer.handlers.registry import invoke
        from heartbeat_consumer.core.config import parse_config
        cfg = parse_config(b'{"agent":"a","checks":{"c":{"cadenceMs":60000,"handler":"h",'
                           b'"timeoutMs":100}}}').config.checks["c"]
        def hang(payload, check):
            time.sleep(3600)
        print(asyncio.run(invoke(hang, {}, cfg)).status)
        """
    )
    started = time.monotonic()
    out = subprocess.run(
        [sys.executable, "-c", script], check=False, capture_output=True, text=True, timeout=30
    )
    assert out.stdout.strip() == "timeout", out.stderr
    assert time.monotonic() - started < 20, "exit waited for the thread"


async def test_output_limits_and_kept_history_are_whole_numbers_in_range() -> None:
    for limit in (10**11, 0, -1, "4096", 1.5, True):
        cfg = check(meta={"argv": ["true"], "maxOutputBytes": limit})
        result = await command(dict(PAYLOAD), cfg)
        assert result["status"] == "failed", limit
        assert "maxOutputBytes" in result["error"], limit


@pytest.mark.parametrize(
    "key",
    [
        "system.heartbeat.tick",
        "agent.a.heartbeat.tick",  # a Bloodbank check named 'tick' would tick its own agent
        "agent.other.heartbeat.run",
        "heartbeat.a.c.success",
        "heartbeat.a._status.online",
        "heartbeat.a._command.ack",
        "heartbeat.a._alert.stale",
        "heartbeat.a._state._pauses",  # a replica's state event: it would clear the pauses
        "heartbeat.a._state._snapshot",
    ],
)
async def test_publish_refuses_the_heartbeat_s_own_keys(key: str) -> None:
    from heartbeat_consumer.core.state import AgentState
    from heartbeat_consumer.handlers.registry import RunContext

    sent: list[str] = []

    async def publish(routing_key: str, payload: dict[str, Any]) -> None:
        sent.append(routing_key)

    handler = get_handler("publish")
    assert handler is not None
    for event_type, expected in ((key, "failed"), ("ops.a.ping", "success")):
        config = check(handler="publish", meta={"eventType": event_type})
        context = RunContext(
            agent="a",
            check=config,
            config=parse_config(b'{"agent": "a", "checks": {}}').config,
            state=AgentState(),
            slot_ms=0,
            process_started_ms=0,
            publish=publish,
        )
        outcome = await invoke(handler, PAYLOAD, config, context)
        assert outcome.status == expected, outcome
        if expected == "failed":
            assert "is the key of a heartbeat" in (outcome.error or ""), outcome
    assert sent == ["ops.a.ping"]
