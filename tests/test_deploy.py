"""The deployment files: systemd units, the Dockerfile and the compose fleet.

systemd-analyze and docker-compose check syntax (skipped where they are not installed, failed
under CI=true: .ci/run installs them); the consistency tests below run everywhere and check
that the files agree with the CLI and with each other.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from heartbeat_consumer.cli.parser import build_parser

from .conftest import ROOT
from .requires import need_tool

DEPLOY = ROOT / "deploy"
UNITS = DEPLOY / "systemd"
INSTALLED_BIN = "/opt/heartbeat-consumer/.venv/bin/heartbeat-consumer"
TEST_BIN = str(Path(sys.executable).with_name("heartbeat-consumer"))


def cli_commands() -> set[str]:
    parser = build_parser()
    (sub,) = [a for a in parser._actions if a.dest == "command"]
    return set(sub.choices)  # type: ignore[arg-type]


def unit_entries(path: Path) -> list[tuple[str, str, str]]:
    """(section, key, value) for every assignment, repeated keys kept."""
    entries, section = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        entries.append((section, key.strip(), value.strip()))
    return entries


def unit(path: Path) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for section, key, value in unit_entries(path):
        found.setdefault(f"{section}.{key}", []).append(value)
    return found


def systemd_analyze() -> str:
    __tracebackhide__ = True
    return need_tool("systemd-analyze", "verifies deploy/systemd", "apt-get install systemd")


SERVICES = sorted(UNITS.glob("*.service"))
LONG_RUNNING = [p for p in SERVICES if "run-once" not in p.name]


def test_the_issue_s_units_exist() -> None:
    names = {p.name for p in SERVICES}
    assert {
        "heartbeat-consumer@.service",
        "heartbeat-ticker.service",
        "heartbeat-monitor.service",
    } <= names


@pytest.mark.parametrize("path", SERVICES + sorted(UNITS.glob("*.timer")), ids=lambda p: p.name)
def test_systemd_analyze_verify(path: Path, tmp_path: Path) -> None:
    analyze = systemd_analyze()
    for other in UNITS.iterdir():  # timers need their service beside them
        text = other.read_text().replace(INSTALLED_BIN, TEST_BIN)
        (tmp_path / other.name).write_text(text)
    name = path.name.replace("@.", "@cack.")
    out = subprocess.run(
        [analyze, "verify", str(tmp_path / name)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert not out.stderr.strip(), out.stderr


def test_systemd_analyze_verify_catches_mistakes(tmp_path: Path) -> None:
    """The verify test above is only worth something if verify complains."""
    analyze = systemd_analyze()
    bad = tmp_path / "bad.service"
    bad.write_text(f"[Service]\nTyp=notify\nProtectSystem=strickt\nExecStart={TEST_BIN}\n")
    out = subprocess.run([analyze, "verify", str(bad)], capture_output=True, text=True, check=False)
    assert "Unknown key" in out.stderr
    assert "strickt" in out.stderr


@pytest.mark.parametrize("path", LONG_RUNNING, ids=lambda p: p.name)
def test_long_running_units_notify_restart_and_are_hardened(path: Path) -> None:
    u = unit(path)
    assert u["Service.Type"] == ["notify"]
    assert u["Service.NotifyAccess"] == ["main"]
    assert u["Service.Restart"] == ["always"]
    assert int(u["Service.WatchdogSec"][0]) >= 10
    assert u["Service.NoNewPrivileges"] == ["yes"]
    assert u["Service.ProtectSystem"] == ["strict"]
    assert u.get("Service.DynamicUser") == ["yes"] or u.get("Service.User")
    assert u["Service.CapabilityBoundingSet"] == [""]
    # The only writable path is the unit's own state directory.
    state_dirs = [f"/var/lib/{d}" for d in u.get("Service.StateDirectory", [])]
    assert u.get("Service.ReadWritePaths", []) == state_dirs
    assert u["Install.WantedBy"] == ["multi-user.target"]


@pytest.mark.parametrize("path", SERVICES, ids=lambda p: p.name)
def test_units_run_commands_the_cli_has(path: Path) -> None:
    u = unit(path)
    (exec_start,) = u["Service.ExecStart"]
    binary, *args = shlex.split(exec_start)
    assert binary == INSTALLED_BIN
    commands = cli_commands()
    # Every ${VAR} has a default in the unit (the EnvironmentFile is optional).
    defaults = dict(v.split("=", 1) for v in u.get("Service.Environment", []))

    def expand(arg: str) -> str:
        arg = re.sub(r"%i", "cack", arg)
        return re.sub(r"\$\{(\w+)\}", lambda m: defaults[m.group(1)], arg)

    expanded = [expand(a) for a in args]
    parsed = build_parser().parse_args(expanded)  # exits (fails) on an unknown option
    assert parsed.command in commands or (not args and parsed.command is None)


def test_consumer_unit_uses_the_environment_mode_with_the_instance_name() -> None:
    u = unit(UNITS / "heartbeat-consumer@.service")
    env = dict(v.split("=", 1) for v in u["Service.Environment"])
    assert env["AGENT_NAME"] == "%i"
    assert env["HEARTBEAT_PATH"] == "/etc/heartbeat-consumer/%i.heartbeat.json"
    assert env["HEARTBEAT_STATE_PATH"].startswith("/var/lib/heartbeat-consumer/")
    assert u["Service.EnvironmentFile"] == ["/etc/heartbeat-consumer/%i.env"]
    # Stop: the handler's 60 s grace fits in the stop timeout.
    assert int(u["Service.TimeoutStopSec"][0]) > 60
    assert u["Service.KillMode"] == ["mixed"]


# --- Dockerfile ------------------------------------------------------------------------------


def dockerfile() -> list[tuple[str, str]]:
    text = (DEPLOY / "Dockerfile").read_text().replace("\\\n", " ")
    lines = [x.strip() for x in text.splitlines() if x.strip() and not x.startswith("#")]
    return [(x.split(None, 1)[0].upper(), x.split(None, 1)[1]) for x in lines]


def test_dockerfile_copies_what_the_wheel_needs_and_dockerignore_lets_it_through() -> None:
    copies = [args.split() for op, args in dockerfile() if op == "COPY" and "--from" not in args]
    sources = [s for c in copies for s in c[:-1]]
    for source in sources:
        assert (ROOT / source).exists(), source
    readme = re.search(r'readme = "([^"]+)"', (ROOT / "pyproject.toml").read_text())
    assert readme
    assert readme[1] in sources
    # The package's schema is a symlink into schemas/: both must be in the image.
    assert (ROOT / "heartbeat_consumer/schemas").is_dir()
    assert "schemas" in sources
    allowed = [
        x[1:].rstrip("/") for x in (ROOT / ".dockerignore").read_text().split() if x[0] == "!"
    ]
    assert sorted(sources) == sorted(allowed)


def test_dockerfile_is_slim_non_root_with_a_health_check() -> None:
    ops = dockerfile()
    bases = [args for op, args in ops if op == "FROM"]
    assert all("-slim" in b for b in bases)
    (user,) = [args for op, args in ops if op == "USER"]
    assert user not in ("root", "0")
    (check,) = [args for op, args in ops if op == "HEALTHCHECK"]
    assert "/health" in check
    assert ("ENTRYPOINT", '["heartbeat-consumer"]') in ops
    assert ("VOLUME", '["/state"]') in ops


# --- docker-compose ---------------------------------------------------------------------------


def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    return data


def test_docker_compose_config(tmp_path: Path) -> None:
    tool = need_tool(
        "docker-compose", "checks deploy/docker-compose.yml", "apt-get install docker-compose"
    )
    no_env = tmp_path / "empty.env"  # a developer's deploy/.env must not decide the test
    no_env.write_text("")
    out = subprocess.run(
        [tool, "--env-file", str(no_env), "-f", str(DEPLOY / "docker-compose.yml"), "config", "-q"],
        capture_output=True,
        text=True,
        env={**os.environ, "RABBITMQ_PASSWORD": "test"},
        check=False,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    missing = subprocess.run(
        [tool, "--env-file", str(no_env), "-f", str(DEPLOY / "docker-compose.yml"), "config", "-q"],
        capture_output=True,
        text=True,
        env={k: v for k, v in os.environ.items() if k != "RABBITMQ_PASSWORD"},
        cwd="/",
        check=False,
        timeout=60,
    )
    assert missing.returncode != 0
    assert "RABBITMQ_PASSWORD" in missing.stderr


def heartbeat_services() -> dict[str, dict[str, Any]]:
    return {
        name: svc
        for name, svc in compose()["services"].items()
        if svc.get("image") == "heartbeat-consumer:local"
    }


def test_compose_services_run_cli_commands_with_their_files_mounted() -> None:
    data = compose()
    services = heartbeat_services()
    agents = [s for s in services.values() if s["command"][0] == "run"]
    assert len(agents) >= 2
    assert any(s["command"][0] == "ticker" for s in services.values())
    for name, svc in services.items():
        command = [a.replace("${TICK_EVERY:-60s}", "60s") for a in svc["command"]]
        args = build_parser().parse_args(command)
        mounts = {v.split(":")[1]: v.split(":") for v in svc.get("volumes", [])}
        for path in (getattr(args, "file", None), *(getattr(args, "handlers", None) or [])):
            if path is None:
                continue
            host, _, mode = mounts[path]
            assert mode == "ro", f"{name}: {path} must be read-only"
            assert (DEPLOY / host).resolve().is_file(), f"{name}: {host} missing"
        if getattr(args, "state", None):
            # State on the named volume: it survives restarts and re-creation.
            assert args.state.startswith("/state/")
            assert mounts["/state"][0] == "state"
            assert "state" in data["volumes"]
        env = svc["environment"]
        assert "${RABBITMQ_PASSWORD" in env["RABBIT_URL"], "no literal password"
        assert env["RABBIT_URL"].split("@")[1].split(":")[0] in data["services"]
        assert svc["depends_on"]["rabbitmq"]["condition"] == "service_healthy"
    states = [a["command"][a["command"].index("--state") + 1] for a in agents]
    assert len(set(states)) == len(states), "agents must not share a state file"


def test_only_services_whose_port_is_published_listen_beyond_localhost() -> None:
    """The image listens on 127.0.0.1 (its HEALTHCHECK asks from inside); a service sets
    0.0.0.0 only where compose publishes its port, and publishes it on 127.0.0.1."""
    image_env = " ".join(args for op, args in dockerfile() if op == "ENV")
    assert "0.0.0.0" not in image_env, image_env
    for name, svc in heartbeat_services().items():
        env = svc["environment"]
        wide = [k for k in ("HEALTH_HOST", "MONITOR_HOST") if env.get(k) == "0.0.0.0"]
        ports = svc.get("ports", [])
        if wide:
            assert ports, f"{name} listens on 0.0.0.0 with no port published"
        assert all(p.startswith("127.0.0.1:") for p in ports), f"{name}: {ports}"
    assert heartbeat_services()["monitor"]["environment"]["MONITOR_HOST"] == "0.0.0.0"


def test_compose_rabbitmq_has_a_health_check_and_no_literal_password() -> None:
    rabbit = compose()["services"]["rabbitmq"]
    assert rabbit["healthcheck"]["test"][:2] == ["CMD", "rabbitmq-diagnostics"]
    assert rabbit["environment"]["RABBITMQ_DEFAULT_PASS"].startswith("${RABBITMQ_PASSWORD")
    example = dict(
        line.split("=", 1)
        for line in (DEPLOY / ".env.example").read_text().splitlines()
        if line and not line.startswith("#")
    )
    assert set(example) >= {"RABBITMQ_PASSWORD"}
