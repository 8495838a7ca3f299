"""The agent_turn handler with a fake agent CLI (tests/fake_agent.py, never a model),
through the real engine: no turn for an empty checklist, the HEARTBEAT_OK contract,
duplicate alerts, the environment allow-list, failures, pauses and the timeout."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest

from heartbeat_consumer import AgentRunner, CheckConfig, RunResult
from heartbeat_consumer.core.schedule import plan
from heartbeat_consumer.handlers.heartbeat_md import DEFAULT_PROMPT
from heartbeat_consumer.ops.metrics import Metrics

from .conftest import ROOT

FAKE = str(Path(__file__).with_name("fake_agent.py"))
MIN = 60_000
DAY = 24 * 60 * MIN
T0 = 1_800_000_000_000


class Agent:
    """The fake agent's working directory: what it will answer, and what it was asked."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir

    def answers(self, reply: str = "", **behaviour: Any) -> None:
        (self.workdir / "behaviour.json").write_bytes(orjson.dumps({"reply": reply, **behaviour}))

    @property
    def calls(self) -> list[dict[str, Any]]:
        path = self.workdir / "calls.jsonl"
        if not path.exists():
            return []
        return [orjson.loads(line) for line in path.read_bytes().splitlines()]


@pytest.fixture
def agent(tmp_path: Path) -> Agent:
    workdir = tmp_path / "work"
    workdir.mkdir()
    fake = Agent(workdir)
    fake.answers("HEARTBEAT_OK")
    return fake


def runner(
    tmp_path: Path, agent: Agent, *, cadence: int = MIN, **meta: Any
) -> tuple[AgentRunner, list[RunResult]]:
    check = {
        "cadenceMs": cadence,
        "handler": "agent_turn",
        "meta": {
            "argv": [sys.executable, FAKE],
            "workdir": str(agent.workdir),
            "checklist": "HEARTBEAT.md",
            **meta,
        },
    }
    config = tmp_path / "agent.heartbeat.json"
    config.write_bytes(orjson.dumps({"agent": "pm", "checks": {"wake": check}}))
    results: list[RunResult] = []

    async def sink(result: RunResult) -> None:
        results.append(result)

    return AgentRunner(config, on_result=sink, clock=lambda: T0), results


async def turn(run: AgentRunner, results: list[RunResult], at: int) -> RunResult:
    report = await run.tick(at)
    assert len(report.results) == 1, report.plan and report.plan.evaluations[0].reason
    return results[-1]


async def test_an_empty_checklist_costs_no_turn(tmp_path: Path, agent: Agent) -> None:
    (agent.workdir / "HEARTBEAT.md").write_text("# HEARTBEAT\n\n<!-- nothing yet -->\n- [ ]\n")
    run, results = runner(tmp_path, agent)
    result = await turn(run, results, T0)
    assert (result.status, result.result["reason"]) == ("skipped", "empty-checklist")
    assert agent.calls == []
    assert run.state.check("wake").avoided == {"empty-checklist": 1}
    (agent.workdir / "HEARTBEAT.md").write_text("# HEARTBEAT\n- check the inbox\n")
    result = await turn(run, results, T0 + MIN)
    assert result.status == "success"
    assert len(agent.calls) == 1


async def test_a_missing_checklist_still_runs_with_the_default_prompt(
    tmp_path: Path, agent: Agent
) -> None:
    run, results = runner(tmp_path, agent)
    result = await turn(run, results, T0)
    assert result.status == "success"
    assert result.result == {
        "status": "success",
        "silent": True,
        "message": "",
    }
    assert agent.calls[0]["prompt"] == DEFAULT_PROMPT


async def test_a_prompt_of_only_whitespace_falls_back_to_the_default(
    tmp_path: Path, agent: Agent
) -> None:
    run, results = runner(tmp_path, agent, prompt="   \n")
    await turn(run, results, T0)
    assert agent.calls[0]["prompt"] == DEFAULT_PROMPT


async def test_the_prompt_on_stdin_and_only_allowed_variables_reach_the_agent(
    tmp_path: Path, agent: Agent, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ANTHROPIC_API_KEY", "allowed-key")
    monkeypatch.setenv("DATABASE_PASSWORD", "not-for-the-agent")
    run, results = runner(
        tmp_path,
        agent,
        argv=[sys.executable, FAKE, "--stdin"],
        promptVia="stdin",
        prompt="Check the build. Reply HEARTBEAT_OK if green.",
        env=["ANTHROPIC_API_KEY"],
    )
    await turn(run, results, T0)
    (call,) = agent.calls
    assert call["prompt"] == "Check the build. Reply HEARTBEAT_OK if green."
    env = call["env"]
    assert env["ANTHROPIC_API_KEY"] == "allowed-key"
    assert "DATABASE_PASSWORD" not in env
    assert env["HEARTBEAT_AGENT"] == "pm"
    assert env["HEARTBEAT_CHECK"] == "wake"
    assert env["HEARTBEAT_IDEMPOTENCY_KEY"] == f"pm:wake:{T0}"
    assert set(env) <= {
        *("PATH", "HOME", "LANG", "LC_ALL", "TZ", "TMPDIR", "USER", "ANTHROPIC_API_KEY"),
        *("HEARTBEAT_AGENT", "HEARTBEAT_CHECK", "HEARTBEAT_SLOT", "HEARTBEAT_IDEMPOTENCY_KEY"),
        "PWD",  # set by some platforms' exec
        "LC_CTYPE",  # Python may add it for UTF-8 mode
    }


async def test_an_alert_is_raised_once_a_day_and_a_new_one_at_once(
    tmp_path: Path, agent: Agent
) -> None:
    run, results = runner(tmp_path, agent)
    agent.answers("Disk on db1 is 97% full.")
    first = await turn(run, results, T0)
    assert (first.status, first.result["message"]) == ("alert", "Disk on db1 is 97% full.")
    agent.answers("disk on DB1 is 97%   full.")  # the same, normalised
    again = await turn(run, results, T0 + MIN)
    assert (again.status, again.result["reason"]) == ("skipped", "duplicate")
    assert again.result["first_sent"] == "2027-01-15T08:00:00.000Z"
    agent.answers("Backups failed tonight.")
    other = await turn(run, results, T0 + 2 * MIN)
    assert other.status == "alert"
    agent.answers("Disk on db1 is 97% full.")
    day_later = await turn(run, results, T0 + DAY)
    assert day_later.status == "alert"
    assert run.state.check("wake").avoided == {"duplicate": 1}
    assert len(agent.calls) == 4  # the duplicate was a turn: its text is only known after


async def test_an_alert_is_remembered_only_once_its_result_was_published(
    tmp_path: Path, agent: Agent
) -> None:
    run, results = runner(tmp_path, agent)
    published = run.on_result

    async def broker_down(result: RunResult) -> None:
        raise ConnectionError("broker gone")

    agent.answers("Disk on db1 is 97% full.")
    run.on_result = broker_down
    with pytest.raises(ConnectionError):
        await run.tick(T0)
    run.on_result = published
    retried = await turn(run, results, T0)  # the tick redelivered
    assert retried.status == "alert", "not a duplicate of an alert nobody received"


async def test_a_long_reply_with_the_token_is_an_alert(tmp_path: Path, agent: Agent) -> None:
    run, results = runner(tmp_path, agent, ackMaxChars=20)
    agent.answers("HEARTBEAT_OK\nThree new support tickets need a reply today.")
    result = await turn(run, results, T0)
    assert result.status == "alert"
    assert result.result["message"] == "Three new support tickets need a reply today."


async def test_a_failing_agent_fails_with_its_stderr(tmp_path: Path, agent: Agent) -> None:
    run, results = runner(tmp_path, agent)
    agent.answers("", exit=2, stderr="Traceback: something broke\n")
    result = await turn(run, results, T0)
    assert result.status == "failed"
    assert "something broke" in (result.error or "")
    assert "failure_kind" not in result.result


async def test_auth_failures_in_a_row_pause_the_check(tmp_path: Path, agent: Agent) -> None:
    run, results = runner(tmp_path, agent)
    agent.answers("", exit=1, stderr="Invalid API key · Please run /login\n")
    first = await turn(run, results, T0)
    assert first.result["failure_kind"] == "auth"
    assert first.result["auth_failures"] == 1
    second = await turn(run, results, T0 + 2 * MIN)  # after the 1-minute backoff
    assert second.result["paused_until"] == "2027-01-15T14:02:00.000Z"
    pause = run.state.pauses["wake"]
    assert pause.until == T0 + 2 * MIN + 6 * 60 * MIN
    assert "2 auth failures" in (pause.reason or "")
    report = await run.tick(T0 + 60 * MIN)
    assert report.results == []
    assert len(agent.calls) == 2  # no more paid-for failures
    assert report.plan is not None
    assert "paused" in report.plan.evaluations[0].reason
    loaded = run.source.current()[0]
    assert loaded is not None
    assert plan(loaded.config, run.state, T0 + 9 * 60 * MIN).selected, "the pause ends"
    agent.answers("HEARTBEAT_OK")
    await turn(run, results, T0 + 9 * 60 * MIN)
    assert run.state.check("wake").auth_failures == 0


async def test_the_timeout_kills_the_agent_and_its_children(tmp_path: Path, agent: Agent) -> None:
    run, results = runner(tmp_path, agent)
    config = orjson.loads((tmp_path / "agent.heartbeat.json").read_bytes())
    config["checks"]["wake"]["timeoutMs"] = 1500
    (tmp_path / "agent.heartbeat.json").write_bytes(orjson.dumps(config))
    agent.answers("HEARTBEAT_OK", sleep=30, spawn_sleeper=True)
    result = await turn(run, results, T0)
    assert result.status == "timeout"
    child = int((agent.workdir / "child.pid").read_text())
    for pid in (agent.calls[0]["pid"], child):
        assert not alive(pid), f"process {pid} outlived the timeout"


async def test_output_is_capped(tmp_path: Path, agent: Agent) -> None:
    run, results = runner(tmp_path, agent, maxOutputBytes=1000)
    agent.answers("Something to look at.", bytes=200_000)
    result = await turn(run, results, T0)
    assert result.status == "alert"
    assert len(result.result["message"]) < 1100
    assert result.result["message"].startswith("[... ")


async def test_bad_meta_is_a_clear_failure(tmp_path: Path, agent: Agent) -> None:
    run, results = runner(tmp_path, agent, argv="claude -p")
    result = await turn(run, results, T0)
    assert result.status == "failed"
    assert "meta.argv must be a non-empty list" in (result.error or "")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat").read_text()  # a zombie waiting for its parent is gone
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


async def test_metrics_count_turns_avoided_by_reason(tmp_path: Path, agent: Agent) -> None:
    (agent.workdir / "HEARTBEAT.md").write_text("# nothing\n")
    run, results = runner(tmp_path, agent)
    metrics = Metrics()
    metrics.run(await turn(run, results, T0))
    text = metrics.render().decode()
    line = 'heartbeat_runs_avoided_total{agent="pm",check="wake",reason="empty-checklist"} 1.0'
    assert line in text.splitlines()


async def test_the_shipped_example_runs_with_its_checklist(tmp_path: Path, agent: Agent) -> None:
    """examples/agent.heartbeat.json and examples/HEARTBEAT.md, with the fake agent in
    place of claude: the checklist is not empty, so the turn happens."""
    example = orjson.loads((ROOT / "examples/agent.heartbeat.json").read_bytes())
    meta = example["checks"]["wake"]["meta"]
    assert meta["checklist"] == "HEARTBEAT.md"
    assert meta["argv"][0] == "claude"
    (agent.workdir / "HEARTBEAT.md").write_bytes((ROOT / "examples/HEARTBEAT.md").read_bytes())
    meta.update(argv=[sys.executable, FAKE], workdir=str(agent.workdir))
    config = tmp_path / "pm.heartbeat.json"
    config.write_bytes(orjson.dumps(example))
    run = AgentRunner(config, clock=lambda: T0)
    report = await run.tick(T0)  # 09:00 in Berlin: inside the window
    assert [(r.check, r.status) for r in report.results] == [("wake", "success")]
    assert agent.calls[0]["prompt"] == DEFAULT_PROMPT


async def test_a_checklist_that_is_a_fifo_or_a_device_fails_the_check_at_once(
    tmp_path: Path,
) -> None:
    from heartbeat_consumer.handlers.agent_turn import agent_turn

    fifo = tmp_path / "HEARTBEAT.md"
    os.mkfifo(fifo)
    for checklist in (str(fifo), "/dev/zero"):
        cfg = CheckConfig.model_validate(
            {
                "name": "t",
                "cadenceMs": 60_000,
                "handler": "agent_turn",
                "meta": {"argv": ["true"], "checklist": checklist},
            }
        )
        result = await asyncio.wait_for(agent_turn({}, cfg), 5)
        assert result["status"] == "failed"
        assert "not a regular file" in result["error"]
